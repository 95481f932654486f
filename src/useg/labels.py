"""Mask encodings: how class indices are stored in mask files, found from the masks themselves.

Masks come as 0/255 binaries, label ids 0..K-1, evenly spaced greys (0, 85, 170, 255), palette
PNGs (the index is the label, the palette its colour) or RGB colour maps. A :class:`LabelMap`
holds the stored value of each class; it decodes files into class indices for training and
encodes predictions back, so a 0/255 training set gives 0/255 predictions.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsegError

logger = logging.getLogger(__name__)

MODES = ("grey", "palette", "rgb")
MAX_CLASSES = 32  # more distinct values than this is a grey image or an interpolated mask


@dataclass(frozen=True)
class LabelMap:
    """The stored mask value of every class.

    Attributes:
        values: stored value of class k at index k, distinct and ascending (class 0 = smallest).
        mode: "grey" (one-channel values), "palette" (palette-PNG indices) or "rgb" (colours
            packed as ``r << 16 | g << 8 | b``).
        palette: flat 768-entry RGB palette, to write palette PNGs back (palette mode only).
    """

    values: tuple[int, ...]
    mode: str = "grey"
    palette: tuple[int, ...] | None = None

    def __post_init__(self):
        values = tuple(int(v) for v in self.values)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not values or list(values) != sorted(set(values)):
            raise ValueError(f"values must be distinct and ascending, got {values}")
        top = {"palette": 255, "rgb": 0xFFFFFF}.get(self.mode)
        if top is not None and (values[0] < 0 or values[-1] > top):
            raise ValueError(f"{self.mode} values must lie in [0, {top}], got {values}")
        palette = self.palette
        if palette is not None:
            palette = tuple(int(v) for v in palette)
            if len(palette) != 768:
                raise ValueError(f"palette must hold 768 entries (256 RGB colours), got {len(palette)}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "palette", palette)

    @property
    def num_classes(self) -> int:
        """Number of classes K (the network's output channels)."""
        return len(self.values)

    def decode(self, raw: np.ndarray, path: str | Path | None = None) -> np.ndarray:
        """Stored values -> class indices.

        Args:
            raw: (*S) stored values as :func:`useg.io.read_mask` returns them; in rgb mode an
                (*S, 3) uint8 colour array is packed first.
            path: the file the values came from, named in the error.

        Returns:
            (*S) int64 class indices in [0, K).

        Raises:
            UsegError: a value that is not in the map, naming the file, the values and the fix.
        """
        raw = np.asarray(raw)
        if self.mode == "rgb" and raw.ndim >= 3 and raw.shape[-1] == 3 and raw.dtype == np.uint8:
            raw = pack_rgb(raw)
        values = np.asarray(self.values, dtype=np.int64)
        raw = raw.astype(np.int64, copy=False)
        idx = np.minimum(np.searchsorted(values, raw), len(values) - 1)
        bad = values[idx] != raw
        if bad.any():
            where = str(path) if path is not None else "the mask"
            raise UsegError(
                f"{where} has mask values {_fmt(np.unique(raw[bad]).tolist(), self.mode)} outside the "
                f"label map {_fmt(list(self.values), self.mode)}; re-save it with the training masks' "
                "values or pass --labels"
            )
        return idx

    def encode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices -> stored values.

        Args:
            classes: (*S) integer class indices in [0, K).

        Returns:
            (*S) uint8 when the values fit, else uint16 or int32 (grey, palette); (*S, 3) uint8
            colours (rgb).
        """
        classes = np.asarray(classes)
        if not (np.issubdtype(classes.dtype, np.integer) or classes.dtype == bool):
            raise ValueError(f"class indices must be integers, got dtype {classes.dtype}")
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class indices must lie in [0, {self.num_classes}), "
                             f"got {classes.min()}..{classes.max()}")
        stored = np.asarray(self.values, dtype=np.int64)[classes]
        if self.mode == "rgb":
            rgb = np.stack([(stored >> 16) & 255, (stored >> 8) & 255, stored & 255], axis=-1)
            return rgb.astype(np.uint8)
        lo, hi = self.values[0], self.values[-1]
        if lo >= 0 and hi <= 255:
            return stored.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return stored.astype(np.uint16)
        return stored.astype(np.int32 if -(2**31) <= lo and hi < 2**31 else np.int64)

    def to_dict(self) -> dict:
        """JSON-able form; :meth:`from_dict` rebuilds an equal map."""
        return {"values": list(self.values), "mode": self.mode,
                "palette": list(self.palette) if self.palette is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping) -> LabelMap:
        """Inverse of :meth:`to_dict`."""
        if "values" not in d:
            raise ValueError(f"a label map needs 'values', got keys {sorted(d)}")
        pal = d.get("palette")
        return cls(tuple(d["values"]), d.get("mode", "grey"), tuple(pal) if pal is not None else None)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(*S, 3) colours -> (*S) int32 ``r << 16 | g << 8 | b``."""
    rgb = np.asarray(rgb).astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _fmt(values: Sequence[int], mode: str, limit: int = 8) -> str:
    values = sorted(values)
    shown = [f"#{v:06x}" if mode == "rgb" else str(v) for v in values[:limit]]
    if len(values) > limit:
        shown.append(f"... ({len(values)} values)")
    return "{" + ", ".join(shown) + "}"


# per encoding: what its stored values are called, and what too many of them look like
_TOO_MANY = {"grey": ("values", "grey images"), "rgb": ("colours", "colour photographs"),
             "palette": ("palette indices", "photographs saved with a palette")}


def _evenly_spaced(values: list[int]) -> bool:
    """Values on a grid 0, s, 2s, ..., top (within rounding, so 0/127/255 counts) using at least
    half of the grid's levels, so one stray value cannot pass as a 30-level grey scale."""
    if values[0] < 0 or len(values) > MAX_CLASSES:
        return False
    arr = np.asarray(values, dtype=np.float64)
    top = values[-1]
    for n in range(1, MAX_CLASSES):  # n steps, n + 1 levels
        step = top / n
        if step < 4:  # a one-unit tolerance would accept anything on a grid this fine
            break
        if np.all(np.abs(arr - np.round(arr / step) * step) < 1) and 2 * len(values) >= n + 1:
            return True
    return False


def plausible(values: set[int], mode: str) -> bool:
    """Whether a set of stored values is a known kind of label encoding.

    Known kinds: a single value; a binary set {0, v}; ids below 32 (gaps allowed); evenly spaced
    greys (0, s, 2s, ...); at most 32 palette indices (any of 0..255, as VOC's 255 border); at most
    32 rgb colours. One rule for every encoding: more than 32 classes is a picture, not a mask (a
    photograph quantised to a palette holds dozens of indices).

    >>> plausible({0, 1, 255}, "palette"), plausible(set(range(58)), "palette")
    (True, False)
    """
    if not values:
        return False
    if mode == "palette":
        return min(values) >= 0 and max(values) <= 255 and len(values) <= MAX_CLASSES
    if mode == "rgb":
        return len(values) <= MAX_CLASSES
    v = sorted(values)
    if len(v) == 1 or (len(v) == 2 and v[0] == 0):
        return True
    if v[0] >= 0 and v[-1] < MAX_CLASSES:
        return True
    return _evenly_spaced(v)


def _explicit_label_map(
    value_sets: Mapping[str, set[int]], explicit: Sequence[int], mode: str, pal: tuple[int, ...] | None
) -> tuple[LabelMap, list[str]]:
    """:func:`infer_label_map` for the user's ``explicit`` values: any other value is a problem."""
    allowed = sorted({int(v) for v in explicit})
    if not allowed:
        raise ValueError("explicit label values must not be empty")
    problems: list[str] = []
    for name, vals in value_sets.items():
        extra = set(vals) - set(allowed)
        if extra:
            problems.append(f"{name} has mask values {_fmt(extra, mode)} that are not in --labels "
                            f"{_fmt(allowed, mode)}; fix the mask or add the values to --labels")
    return LabelMap(tuple(allowed), mode, pal), problems


def infer_label_map(
    value_sets: Mapping[str, set[int]],
    mode: str = "grey",
    palette: Sequence[int] | None = None,
    explicit: Sequence[int] | None = None,
) -> tuple[LabelMap, list[str]]:
    """The label map of a training set from each mask file's set of stored values.

    Without ``explicit`` values the union of all files' values is kept when it is a
    :func:`plausible` encoding. Otherwise suspicious values (found in fewer than half of the
    files, or in one file only) are dropped, rarest first, until it is; values then seen only in
    files already reported are dropped too, so one antialiased mask among id masks cannot add
    classes. Every file holding a dropped value is reported. Common values that still form no
    known encoding are kept when there are at most 32 of them and reported otherwise.

    Args:
        value_sets: mask file name -> its set of stored values.
        mode: "grey", "palette" or "rgb" (from :func:`useg.io.read_mask`).
        palette: the palette of palette PNGs, kept to write predictions back.
        explicit: the user's values (``--labels 0,255``); any other value is a problem.

    Returns:
        (label map, problems): one sentence per problem, naming the file and the fix.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    pal = tuple(int(x) for x in palette) if palette is not None and mode == "palette" else None
    if explicit is not None:
        return _explicit_label_map(value_sets, explicit, mode, pal)
    problems: list[str] = []
    n_files = len(value_sets)
    counts = Counter(v for vals in value_sets.values() for v in set(vals))
    keep = set(counts)
    if not keep:
        return LabelMap((0,), mode, pal), problems
    suspicious = {v for v, c in counts.items() if 2 * c < n_files or (c == 1 and n_files > 1)}
    dropped: set[int] = set()
    if not plausible(keep, mode):
        # rarest first; among equally rare values first those from the noisiest file (an
        # antialiased mask holds many rare values, a genuine rare class one), the background last
        noise = {v: max(len(set(vals) & suspicious) for vals in value_sets.values() if v in vals)
                 for v in suspicious}
        for v in sorted(suspicious, key=lambda x: (counts[x], -noise[x], x == 0, -x)):
            if plausible(keep, mode):
                break
            keep.discard(v)
            dropped.add(v)
        flagged = {name for name, vals in value_sets.items() if set(vals) & dropped}
        for v in sorted(keep & suspicious, key=lambda x: (counts[x], -x)):
            only_in_flagged = all(name in flagged for name, vals in value_sets.items() if v in vals)
            if only_in_flagged and len(keep) > 1 and plausible(keep - {v}, mode):
                keep.discard(v)
                dropped.add(v)
    for name, vals in value_sets.items():
        bad = set(vals) & dropped
        if bad:
            problems.append(f"{name} has mask values {_fmt(bad, mode)} that no label encoding explains "
                            f"(the other masks use {_fmt(keep, mode)}); re-save it without antialiasing "
                            "or interpolation, or pass --labels")
    if not plausible(keep, mode):
        if len(keep) > MAX_CLASSES:
            busiest = sorted(value_sets, key=lambda k: -len(value_sets[k]))[:3]
            what, like = _TOO_MANY[mode]
            problems.append(f"the masks share {len(keep)} distinct {what} {_fmt(keep, mode)}, more than "
                            f"{MAX_CLASSES} classes (e.g. {', '.join(busiest)}); they look like {like} "
                            "or resized masks: re-save them with nearest-neighbour resizing or pass --labels")
        else:
            logger.info("mask values %s form no known encoding; using them as %d classes",
                        sorted(keep), len(keep))
    return LabelMap(tuple(sorted(keep)), mode, pal), problems


def label_map_of_masks(
    value_sets: Mapping[str, set[int]],
    modes: Mapping[str, str],
    palettes: Mapping[str, Sequence[int]] | None = None,
    explicit: Sequence[int] | None = None,
    folder: str | Path = "the masks",
    min_classes: int = 2,
) -> tuple[LabelMap, list[str]]:
    """The label map of a set of mask files from what each holds, with every problem found.

    Used by the data check and by folder evaluation alike, so both read and flag masks the same
    way. The way most masks are saved (grey, palette or rgb) wins; every mask saved another way
    is a problem and left out. The values then go through :func:`infer_label_map`; palette masks
    whose palette gives a used index another colour are problems, and so is a single class.

    Args:
        value_sets: mask file name -> its set of stored values; at least one file.
        modes: mask file name -> "grey", "palette" or "rgb" (from :func:`useg.io.read_mask`).
        palettes: mask file name -> its flat 768-entry palette, for palette masks.
        explicit: the user's values (``--labels 0,255``), see :func:`infer_label_map`.
        folder: the masks' folder, named in the single-class problem.
        min_classes: fewer classes than this is a problem: 2 to train on the masks, 1 to score
            predictions against them (an all-background truth set is a fair test).

    Returns:
        (label map, problems): one sentence per problem, naming the file and the fix.

    >>> values = {"a.png": {0, 255}, "b.png": {0, 255}}
    >>> lm, problems = label_map_of_masks(values, {"a.png": "grey", "b.png": "grey"})
    >>> lm.values, problems
    ((0, 255), [])
    >>> _, problems = label_map_of_masks({"a.png": {0}}, {"a.png": "grey"}, folder="masks")
    >>> problems[0].startswith("every mask in masks holds only the value 0")
    True
    """
    if not value_sets:
        raise ValueError("label_map_of_masks needs the values of at least one mask")
    by_mode: dict[str, list[str]] = {}
    for name in value_sets:
        by_mode.setdefault(modes[name], []).append(name)
    mode = max(by_mode, key=lambda m: len(by_mode[m]))  # ties: the mode seen first
    problems = [f"{n} is a {m} mask but most masks are {mode}; save all masks the same way"
                for m, names in by_mode.items() if m != mode for n in names]
    kept = {n: value_sets[n] for n in by_mode[mode]}
    palettes = palettes or {}
    palette = palettes[by_mode[mode][0]] if mode == "palette" else None
    label_map, label_problems = infer_label_map(kept, mode, palette, explicit=explicit)
    problems.extend(label_problems)
    if mode == "palette":
        problems.extend(_palette_problems(palettes, kept, label_map))
    if label_map.num_classes < min_classes:
        problems.append(f"every mask in {folder} holds only the value {label_map.values[0]}; "
                        "a segmentation needs at least two classes, check the masks or pass --labels")
    return label_map, problems


def _palette_problems(palettes: Mapping[str, Sequence[int]], names: Mapping,
                      label_map: LabelMap) -> list[str]:
    """Masks whose palette gives a used index another colour than the label map's palette."""
    ref = label_map.palette
    if ref is None:
        return []
    out = []
    for name in names:
        pal = tuple(palettes[name])
        differ = [v for v in label_map.values if pal[3 * v: 3 * v + 3] != ref[3 * v: 3 * v + 3]]
        if differ:
            out.append(f"{name} gives palette indices {differ[:8]} other colours than the other masks; "
                       "re-save the masks with one palette, or as RGB colours")
    return out


def region_classes(regions: Sequence[Sequence[int]]) -> list[int]:
    """The class each region writes when it is the innermost region that applies.

    nnU-Net's rule for nested regions: walk the regions in order and let every region whose
    probability passes 0.5 overwrite the label; region r writes the smallest of its classes that no
    later region contains (BraTS WT=1-4, TC=1,3,4, ET=4 write 2, 1 and 4).

    Raises:
        ValueError: a region whose classes all lie in later regions (it could never be written).
    """
    out = []
    for i, r in enumerate(regions):
        later = {c for q in regions[i + 1:] for c in q}
        own = sorted(set(r) - later)
        if not own:
            raise ValueError(f"region {tuple(r)} has no class outside the regions after it; "
                             "order regions outer to inner")
        out.append(own[0])
    return out


def regions_to_labels(
    probs: np.ndarray, regions: Sequence[Sequence[int]], threshold: float = 0.5
) -> np.ndarray:
    """Region probabilities (R, *S) -> class indices (*S) int64 by :func:`region_classes`' rule."""
    labels = np.zeros(probs.shape[1:], dtype=np.int64)
    for p, c in zip(probs, region_classes(regions)):
        labels[p > threshold] = c
    return labels
