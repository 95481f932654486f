"""Pairing images with their masks (or regions of interest) by file stem: pure functions, no I/O.

Data folders as published rarely name a mask exactly like its image (``07_scan.tif`` with
``07_truth.gif``, ``case7_img.tif`` with ``case7_label.png``). :func:`pair_stems` tries these rules
in order; the first that pairs every image wins, otherwise the one that pairs the most (the
earlier on a tie):

1. ``"same stem"``: ``case7`` with ``case7``.
2. ``"mask suffix"``: the other stem is the image's plus one of :data:`MASK_STEM_SUFFIXES`
   (``case7_mask``), or equal to it.
3. ``"shared affixes"``: equal once a prefix and/or suffix that every image stem shares and one that
   every other stem shares are cut off (``s01_raw`` with ``s01_gt``); an affix ends at a separator
   or where digits meet letters, so ``case1_img`` / ``case11_img`` lose ``_img``, never ``1_img``.
4. ``"number"``: each stem holds exactly one number and the numbers match one to one (``7`` is
   ``07``).

Patterns given by the user (``{stem}_seg``) override every rule (``"pattern"``). Nothing is
guessed: a name that could pair with two others pairs with neither and is listed in
:attr:`Pairing.ambiguous`. A leaf: it imports only :mod:`useg.errors`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from .errors import UsegError

MASK_STEM_SUFFIXES = ("_mask", "_label", "_labels", "_seg")  # mask stem = image stem + one of these
SEPARATORS = frozenset("_-. ")  # where a shared prefix or suffix may end
STEM = "{stem}"  # the placeholder of --image-pattern / --mask-pattern
RULES = ("same stem", "mask suffix", "shared affixes", "number")  # in the order they are tried
# how each rule pairs, for the sentences of useg check ("... pairs with it by the one number in each name")
RULE_TEXT = {
    "same stem": "equal names",
    "mask suffix": "the image's name plus _mask, _label, _labels or _seg",
    "shared affixes": "the names without the prefix and suffix each folder shares",
    "number": "the one number in each name",
    "pattern": "--image-pattern / --mask-pattern",
}
_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Ambiguity:
    """Stems of both sides that share one key (a name, a number) without pairing one to one."""

    key: str  # what they share: the image stem of two masks, or the number
    images: tuple[str, ...]  # image stems with that key
    others: tuple[str, ...]  # other (mask or ROI) stems with that key


@dataclass(frozen=True)
class Pairing:
    rule: str  # how the folder paired: "same stem", "mask suffix", "shared affixes", "number", "pattern"
    pairs: dict[str, str]  # image stem -> other (mask or ROI) stem
    unpaired_images: tuple[str, ...]  # image stems without a partner
    unpaired_others: tuple[str, ...]  # other stems without a partner
    # stems left unpaired because they could pair with more than one (also in the unpaired_* tuples)
    ambiguous: tuple[Ambiguity, ...] = field(default=())


def mask_stem(stem: str) -> str:
    """The stem without one of :data:`MASK_STEM_SUFFIXES` (any case), or the stem itself.

    >>> mask_stem("case7_Label"), mask_stem("case7"), mask_stem("_seg")
    ('case7', 'case7', '_seg')
    """
    for suffix in MASK_STEM_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a name pattern: ``{stem}`` once, literal text around it.

    >>> compile_pattern("{stem}_seg").fullmatch("case7_seg").group(1)
    'case7'

    Raises:
        UsegError: the pattern holds ``{stem}`` not exactly once.
    """
    if pattern.count(STEM) != 1:
        raise UsegError(f"the name pattern {pattern!r} must hold {STEM} exactly once, "
                        f"like '{STEM}_seg' for case7_seg.png beside case7.tif")
    before, after = pattern.split(STEM)
    return re.compile(re.escape(before) + "(.+)" + re.escape(after))


def pair_stems(image_stems: Sequence[str], other_stems: Sequence[str], image_pattern: str | None = None,
               other_pattern: str | None = None) -> Pairing:
    """Pair image stems with mask (or ROI) stems by the first rule that pairs every image.

    Args:
        image_stems: the images' file stems, each once, in case order.
        other_stems: the masks' (or ROIs') file stems, each once.
        image_pattern: the image stem around ``{stem}`` (default ``{stem}``); with
            ``other_pattern`` it overrides every rule.
        other_pattern: the other stem around ``{stem}``, e.g. ``{stem}_seg``.

    Returns:
        The :class:`Pairing`: its rule, image stem -> other stem in image order, what stayed
        unpaired (in input order) and the ambiguities.

    Raises:
        UsegError: a pattern without ``{stem}`` exactly once.
        ValueError: a stem given twice on one side.

    >>> pair_stems(["case7_img", "case8_img"], ["case7_label", "case8_label"]).pairs
    {'case7_img': 'case7_label', 'case8_img': 'case8_label'}
    >>> pair_stems(["07_scan", "12_scan"], ["7_truth", "12_truth"]).rule  # 07 is 7
    'number'
    >>> p = pair_stems(["scan-07", "scan-12"], ["07", "12a"])
    >>> p.rule, p.pairs
    ('number', {'scan-07': '07', 'scan-12': '12a'})
    >>> pair_stems(["a1", "b1"], ["x1"]).ambiguous[0]
    Ambiguity(key='1', images=('a1', 'b1'), others=('x1',))
    >>> pair_stems(["c7"], ["seg_c7", "c7"], other_pattern="seg_{stem}").pairs
    {'c7': 'seg_c7'}
    """
    images, others = list(image_stems), list(other_stems)
    for side, stems in (("image", images), ("other", others)):
        repeated = [s for s, n in Counter(stems).items() if n > 1]
        if repeated:
            raise ValueError(f"{side} stems must be unique, {repeated[0]!r} is given twice")
    if image_pattern is not None or other_pattern is not None:
        keys = _pattern_keys(images, image_pattern or STEM), _pattern_keys(others, other_pattern or STEM)
        return _match("pattern", images, others, *keys)
    best, best_score = None, (-1, -1)
    for rule, keys_of in _RULES.items():
        pairing = _match(rule, images, others, *keys_of(images, others))
        # the most pairs; on a tie the rule that explains more names (ambiguity is reported, not lost)
        score = (len(pairing.pairs), sum(len(a.images) + len(a.others) for a in pairing.ambiguous))
        if score > best_score:
            best, best_score = pairing, score
        if len(best.pairs) == len(images):
            break
    return best


def _match(rule: str, images: list[str], others: list[str], image_keys: dict[str, Hashable],
           other_keys: dict[str, Hashable]) -> Pairing:
    """Pair stems whose keys are equal and held by one stem on each side; a stem without a key
    (None) pairs with nothing."""
    by_key: dict[Hashable, tuple[list[str], list[str]]] = {}
    for side, stems, keys in ((0, images, image_keys), (1, others, other_keys)):
        for s in stems:
            if keys.get(s) is not None:
                by_key.setdefault(keys[s], ([], []))[side].append(s)
    pairs, ambiguous = {}, []
    for key, (imgs, oths) in by_key.items():
        if len(imgs) == 1 and len(oths) == 1:
            pairs[imgs[0]] = oths[0]
        elif imgs and oths:
            ambiguous.append(Ambiguity(str(key), tuple(imgs), tuple(oths)))
    pairs = {s: pairs[s] for s in images if s in pairs}
    taken = set(pairs.values())
    return Pairing(rule, pairs, tuple(s for s in images if s not in pairs),
                   tuple(s for s in others if s not in taken), tuple(ambiguous))


def _pattern_keys(stems: Sequence[str], pattern: str) -> dict[str, str | None]:
    regex = compile_pattern(pattern)
    return {s: (m.group(1) if (m := regex.fullmatch(s)) else None) for s in stems}


def _same_keys(images: Sequence[str], others: Sequence[str]) -> tuple[dict, dict]:
    return {s: s for s in images}, {s: s for s in others}


def _suffix_keys(images: Sequence[str], others: Sequence[str]) -> tuple[dict, dict]:
    names = set(images)
    return {s: s for s in images}, {s: s if s in names else mask_stem(s) for s in others}


def _number_keys(images: Sequence[str], others: Sequence[str]) -> tuple[dict, dict]:
    def key(stem: str) -> int | None:
        numbers = _NUMBER.findall(stem)
        return int(numbers[0]) if len(numbers) == 1 else None

    return {s: key(s) for s in images}, {s: key(s) for s in others}


def _affix_keys(images: Sequence[str], others: Sequence[str]) -> tuple[dict, dict]:
    """Keys of the cuts (one per side) that pair the most stems, the longest cuts on a tie."""
    if not images or not others:
        return {}, {}
    sides = [[(cut, _cut_keys(stems, cut)) for cut in _cuts(stems)] for stems in (images, others)]
    unique = [[{k for k, n in Counter(keys.values()).items() if n == 1} for _, keys in side]
              for side in sides]
    best, best_score = (0, 0), (-1, -1)
    for i, (cut_i, _) in enumerate(sides[0]):
        for j, (cut_o, _) in enumerate(sides[1]):
            score = (len(unique[0][i] & unique[1][j]), sum(cut_i) + sum(cut_o))
            if score > best_score:
                best, best_score = (i, j), score
    return sides[0][best[0]][1], sides[1][best[1]][1]


def _cut_keys(stems: Sequence[str], cut: tuple[int, int]) -> dict[str, str]:
    prefix, suffix = cut
    return {s: s[prefix: len(s) - suffix] for s in stems}


def _boundary(stem: str, i: int) -> bool:
    """Whether an affix may end between ``stem[i - 1]`` and ``stem[i]``: at a separator, or where
    digits meet other characters."""
    a, b = stem[i - 1], stem[i]
    return a in SEPARATORS or b in SEPARATORS or (a in _DIGITS) != (b in _DIGITS)


def _cuts(stems: Sequence[str]) -> list[tuple[int, int]]:
    """Every (prefix length, suffix length) that all ``stems`` share, each ending at a boundary and
    leaving at least one character, longest first; (0, 0) always."""
    shortest = min(len(s) for s in stems)
    first = stems[0]
    common_prefix = next((i for i in range(shortest) if any(s[i] != first[i] for s in stems)), shortest)
    common_suffix = next((i for i in range(shortest) if any(s[-1 - i] != first[-1 - i] for s in stems)),
                         shortest)
    prefixes = [0] + [p for p in range(1, min(common_prefix, shortest - 1) + 1)
                      if all(_boundary(s, p) for s in stems)]
    suffixes = [0] + [k for k in range(1, min(common_suffix, shortest - 1) + 1)
                      if all(_boundary(s, len(s) - k) for s in stems)]
    cuts = [(p, k) for p in prefixes for k in suffixes if p + k <= shortest - 1]
    return sorted(cuts, key=lambda c: (-(c[0] + c[1]), -c[1]))


_RULES: dict[str, Callable[[Sequence[str], Sequence[str]], tuple[dict, dict]]] = {
    "same stem": _same_keys, "mask suffix": _suffix_keys, "shared affixes": _affix_keys,
    "number": _number_keys,
}


__all__ = ["MASK_STEM_SUFFIXES", "RULES", "RULE_TEXT", "Ambiguity", "Pairing", "compile_pattern",
           "mask_stem", "pair_stems"]
