"""Pairing files by name: which image stem each other stem (a mask, an ROI) belongs to.

A minimal version with the API the full pairing module keeps: equal stems, and a stem that is an
image stem plus one of :data:`OTHER_SUFFIXES` (``case7_mask`` with ``case7``). A leaf: it imports no
useg module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

OTHER_SUFFIXES = ("_mask", "_label", "_labels", "_seg", "_roi")  # other stem = image stem + one of these


@dataclass(frozen=True)
class Pairing:
    """How two lists of stems paired.

    Attributes:
        rule: the rule that paired them ("equal stems", "stem + suffix", or "none").
        pairs: image stem -> the other stem paired with it.
        unpaired_images: image stems without a partner, in the given order.
        unpaired_others: other stems without a partner, in the given order.
    """

    rule: str
    pairs: dict[str, str]
    unpaired_images: tuple[str, ...]
    unpaired_others: tuple[str, ...]


def _base(stem: str, image_set: set[str]) -> str | None:
    """The image stem that ``stem`` names: itself, or itself without a known suffix."""
    if stem in image_set:
        return stem
    for suffix in OTHER_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix) and stem[: -len(suffix)] in image_set:
            return stem[: -len(suffix)]
    return None


def pair_stems(image_stems: Iterable[str], other_stems: Iterable[str], image_pattern: str | None = None,
               other_pattern: str | None = None) -> Pairing:
    """Pair image stems with other stems (masks, ROI masks): equal, or image stem + a known suffix.

    Args:
        image_stems: the images' file stems.
        other_stems: the other files' stems.
        image_pattern, other_pattern: ``{stem}`` patterns (e.g. ``"{stem}_seg"``) naming the files
            explicitly; this minimal version reads ``other_pattern`` only.

    Returns:
        A :class:`Pairing`; an image claimed by two other stems keeps the first (the equal stem
        before a suffixed one) and the second stays unpaired.

    >>> p = pair_stems(["a", "b"], ["a_roi", "b", "c"])
    >>> p.pairs, p.unpaired_others, p.rule
    ({'a': 'a_roi', 'b': 'b'}, ('c',), 'stem + suffix')
    """
    images = list(dict.fromkeys(image_stems))
    others = list(dict.fromkeys(other_stems))
    image_set = set(images)
    pairs: dict[str, str] = {}
    suffixed = False
    for stem in sorted(others, key=lambda s: s not in image_set):  # equal stems claim first
        if other_pattern and "{stem}" in other_pattern:
            head, _, tail = other_pattern.partition("{stem}")
            ok = stem.startswith(head) and stem.endswith(tail) and len(stem) >= len(head) + len(tail)
            base = stem[len(head): len(stem) - len(tail)] if ok else None
            base = base if base in image_set else None
        else:
            base = _base(stem, image_set)
        if base is not None and base not in pairs:
            pairs[base] = stem
            suffixed = suffixed or base != stem
    rule = "none" if not pairs else ("stem + suffix" if suffixed else "equal stems")
    paired = set(pairs.values())
    return Pairing(rule, {s: pairs[s] for s in images if s in pairs},
                   tuple(s for s in images if s not in pairs), tuple(s for s in others if s not in paired))
