"""Mask encodings: how class indices are stored in mask files, found from the masks themselves.

Masks come as 0/255 binaries, label ids 0..K-1, evenly spaced greys (0, 85, 170, 255), palette
PNGs (the index is the label, the palette its colour) or RGB colour maps. A :class:`LabelMap`
holds the stored value of each class; it decodes files into class indices for training and
encodes predictions back, so a 0/255 training set gives 0/255 predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsegError

MODES = ("grey", "palette", "rgb")
MAX_CLASSES = 32  # more distinct values than this is a grey image or an interpolated mask


@dataclass(frozen=True)
class LabelMap:
    values: tuple[int, ...]  # stored value of class k at index k, ascending
    mode: str = "grey"  # "grey", "palette" (PNG palette indices) or "rgb" (r<<16 | g<<8 | b)
    palette: tuple[int, ...] | None = None  # flat 768-entry RGB palette of palette PNGs

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not self.values or list(self.values) != sorted(set(self.values)):
            raise ValueError(f"values must be distinct and ascending, got {self.values}")

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def decode(self, raw: np.ndarray, path: str | Path | None = None) -> np.ndarray:
        """Stored values (*S) -> class indices (*S) int64.

        Raises:
            UsegError: a value that is not in the map, naming the file and the values.
        """
        values = np.asarray(self.values, dtype=np.int64)
        raw = np.asarray(raw).astype(np.int64, copy=False)
        idx = np.searchsorted(values, raw)
        idx_clipped = np.minimum(idx, len(values) - 1)
        bad = values[idx_clipped] != raw
        if bad.any():
            unknown = sorted(set(np.unique(raw[bad]).tolist()))
            where = str(path) if path is not None else "the mask"
            raise UsegError(
                f"{where} has mask values {_fmt(unknown[:8], self.mode)} outside the label map "
                f"{_fmt(list(self.values), self.mode)}; re-save it with the training set's values or pass --labels"
            )
        return idx_clipped

    def encode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices (*S) -> stored values: uint8/uint16/int32 (grey, palette) or (*S, 3) uint8 (rgb)."""
        classes = np.asarray(classes)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class indices must be in [0, {self.num_classes}), got {classes.min()}..{classes.max()}")
        stored = np.asarray(self.values, dtype=np.int64)[classes]
        if self.mode == "rgb":
            return np.stack([(stored >> 16) & 255, (stored >> 8) & 255, stored & 255], axis=-1).astype(np.uint8)
        top = max(self.values)
        dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
        return stored.astype(dtype)

    def to_dict(self) -> dict:
        return {"values": list(self.values), "mode": self.mode,
                "palette": list(self.palette) if self.palette is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping) -> LabelMap:
        pal = d.get("palette")
        return cls(tuple(int(v) for v in d["values"]), d.get("mode", "grey"),
                   tuple(int(v) for v in pal) if pal is not None else None)


def _fmt(values: Sequence[int], mode: str) -> str:
    if mode == "rgb":
        return "{" + ", ".join(f"#{v:06x}" for v in values) + "}"
    return "{" + ", ".join(str(v) for v in values) + "}"


def plausible(values: set[int], mode: str) -> bool:
    """Whether a set of stored values is a known kind of label encoding."""
    if not values:
        return False
    if mode in ("palette", "rgb"):
        return len(values) <= MAX_CLASSES
    v = sorted(values)
    if len(v) <= 2 and v[0] == 0:
        return True  # binary {0, x} (0/1, 0/255, ...) or a single class
    if v[-1] < MAX_CLASSES:
        return True  # label ids, gaps allowed
    step = v[1] if v[0] == 0 else 0
    # evenly spaced greys (0, 85, 170, 255): every value a multiple of the smallest non-zero one
    return step > 0 and len(v) <= MAX_CLASSES and all(x % step == 0 for x in v)


def infer_label_map(
    value_sets: Mapping[str, set[int]],
    mode: str = "grey",
    palette: Sequence[int] | None = None,
    explicit: Sequence[int] | None = None,
) -> tuple[LabelMap, list[str]]:
    """The label map of a training set from each mask file's set of stored values.

    Without ``explicit`` values, the union of all files' values is used when it is a plausible
    encoding; otherwise the values found in the fewest files are dropped until it is, and every
    file holding a dropped value is reported (antialiased edges, a stray brush stroke).

    Args:
        value_sets: mask file name -> its set of stored values.
        mode: "grey", "palette" or "rgb" (from :func:`useg.io.read_mask`).
        palette: the palette of palette PNGs, kept to write predictions back.
        explicit: the user's values (``--labels 0,255``); any other value is a problem.

    Returns:
        (label map, problems): one sentence per problem, naming the file.
    """
    problems: list[str] = []
    union = set().union(*value_sets.values()) if value_sets else set()
    if explicit is not None:
        allowed = set(int(v) for v in explicit)
        for name, vals in value_sets.items():
            extra = vals - allowed
            if extra:
                problems.append(f"{name} has mask values {_fmt(sorted(extra)[:8], mode)} that are not in --labels "
                                f"{_fmt(sorted(allowed), mode)}; fix the mask or add them to --labels")
        keep = allowed
    else:
        counts = {v: sum(v in s for s in value_sets.values()) for v in union}
        keep = set(union)
        # drop the rarest values first, keeping 0 (background) to the end
        for v in sorted(union, key=lambda x: (counts[x], x != 0, -x)):
            if plausible(keep, mode):
                break
            keep.discard(v)
        if not keep:
            keep = union
        dropped = union - keep
        if dropped:
            for name, vals in value_sets.items():
                bad = vals & dropped
                if bad:
                    problems.append(
                        f"{name} has mask values {_fmt(sorted(bad)[:8], mode)} that no label encoding explains "
                        f"(the other masks use {_fmt(sorted(keep)[:8], mode)}); re-save it without "
                        "antialiasing or interpolation, or pass --labels"
                    )
    if not keep:
        keep = {0}
    pal = tuple(int(x) for x in palette) if palette is not None and mode == "palette" else None
    return LabelMap(tuple(sorted(keep)), mode, pal), problems
