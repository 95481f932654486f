"""Post-processing of label images, chosen by cross-validation: pure functions on arrays.

Two kinds of step, applied in this order by :func:`apply_postprocessing`:

1. keep the largest connected component: of all foreground classes together (one organ, one
   tumour: everything else is a false positive), then of single classes;
2. remove the objects of a class smaller than a minimum size, found from the training masks
   (:func:`object_sizes`, :func:`min_sizes_from`).

:func:`choose_postprocessing` tries each step on (prediction, truth) pairs, the out-of-fold
predictions of a cross-validation, and keeps it only if it raises the mean Dice and lowers no
class's Dice by more than a tiny tolerance: the idea of nnU-Net's ``determine_postprocessing``
(Isensee et al. 2021, Nature Methods 18), extended by the size filter. Components are connected
by faces, edges and corners (8 neighbours in 2D, 26 in 3D: ``scipy.ndimage``'s full structure,
as skimage's default labelling that nnU-Net uses) unless ``connectivity`` says otherwise.
Negative labels (:data:`useg.roi.IGNORE`, outside a region of interest) are never foreground,
never changed, and truth pixels with them are not scored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .arrays import check_label_image, check_label_pair
from .metrics import confusion, dice

GAIN = 1e-9  # a step must raise its Dice by more than float noise to count as an improvement
TOLERANCE = 1e-4  # how much Dice any class may lose to a kept step
PERCENTILE = 1.0  # objects smaller than this percentile of the true object sizes are removed


@dataclass(frozen=True)
class Postprocessing:
    """Which post-processing steps to apply; the default applies none.

    >>> pp = Postprocessing(largest_foreground=True, min_sizes=((2, 30),))
    >>> Postprocessing.from_json(pp.to_json()) == pp
    True
    >>> Postprocessing().is_identity
    True
    """

    largest_foreground: bool = False  # keep the largest component of all foreground classes together
    largest_classes: tuple[int, ...] = ()  # classes of which only the largest component is kept
    min_sizes: tuple[tuple[int, int], ...] = ()  # (class, voxels): smaller objects of it become background
    connectivity: int | None = None  # 1 = faces only ... ndim = faces, edges, corners; None = ndim

    def __post_init__(self):
        classes = list(self.largest_classes) + [c for c, _ in self.min_sizes]
        if any(not _is_int(c) or c < 1 for c in classes):
            raise ValueError(f"post-processing classes must be integers >= 1, got {classes}")
        if len(set(self.largest_classes)) != len(self.largest_classes) or \
                len({c for c, _ in self.min_sizes}) != len(self.min_sizes):
            raise ValueError("each class may appear once per post-processing step")
        if any(not _is_int(n) or n < 1 for _, n in self.min_sizes):
            raise ValueError(f"minimum object sizes must be integers >= 1 voxel, got {list(self.min_sizes)}")
        if self.connectivity is not None and not (_is_int(self.connectivity) and 1 <= self.connectivity <= 3):
            raise ValueError(f"connectivity must be 1, 2, 3 or None, got {self.connectivity!r}")
        if not isinstance(self.largest_foreground, bool):
            raise ValueError(f"largest_foreground must be true or false, got {self.largest_foreground!r}")

    @property
    def is_identity(self) -> bool:
        """True when no step is chosen: applying it returns the labels unchanged."""
        return not (self.largest_foreground or self.largest_classes or self.min_sizes)

    @property
    def classes(self) -> tuple[int, ...]:
        """Every class a per-class step names, sorted."""
        return tuple(sorted({*self.largest_classes, *(c for c, _ in self.min_sizes)}))

    def to_dict(self) -> dict:
        """JSON-able: ``min_sizes`` as {"class": voxels}."""
        return {"largest_foreground": self.largest_foreground, "largest_classes": list(self.largest_classes),
                "min_sizes": {str(c): n for c, n in self.min_sizes}, "connectivity": self.connectivity}

    @classmethod
    def from_dict(cls, d: Mapping) -> Postprocessing:
        """The inverse of :meth:`to_dict`; unknown or mistyped fields raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"post-processing must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown post-processing field(s) {sorted(unknown)}")
        sizes, classes = d.get("min_sizes", {}), d.get("largest_classes", [])
        if not isinstance(sizes, Mapping) or not isinstance(classes, list):
            raise ValueError("largest_classes must be a list and min_sizes an object {class: voxels}")
        try:
            min_sizes = tuple(sorted((int(c), n) for c, n in sizes.items()))
        except ValueError:
            raise ValueError(f"min_sizes keys must be class numbers, got {sorted(sizes)}") from None
        return cls(largest_foreground=d.get("largest_foreground", False), largest_classes=tuple(classes),
                   min_sizes=min_sizes, connectivity=d.get("connectivity"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Postprocessing:
        return cls.from_dict(json.loads(text))

    def describe(self) -> list[str]:
        """One line per step, in the order they are applied ("none" without steps).

        >>> Postprocessing(largest_classes=(1,), min_sizes=((2, 9),)).describe()
        ['class 1: keep the largest component', 'class 2: remove objects under 9 voxels']
        """
        lines = ["keep the largest foreground component"] if self.largest_foreground else []
        lines += [f"class {c}: keep the largest component" for c in self.largest_classes]
        lines += [f"class {c}: remove objects under {n} voxels" for c, n in self.min_sizes]
        return lines or ["none"]


def apply_postprocessing(labels: np.ndarray, pp: Postprocessing) -> np.ndarray:
    """Apply ``pp`` to a label image: the largest foreground component, then per class the largest
    component, then per class the minimum object size; removed pixels become background (0).

    Args:
        labels: (H, W) or (D, H, W) integer class indices; negative values (ROI ignore) are left
            alone and never count as foreground.
        pp: the steps.

    Returns:
        A new array of the same shape and dtype (a copy even when no step is chosen).

    >>> a = np.array([[1, 1, 2, 0], [0, 0, 0, 0], [0, 2, 0, -1]])
    >>> apply_postprocessing(a, Postprocessing(largest_foreground=True))
    array([[ 1,  1,  2,  0],
           [ 0,  0,  0,  0],
           [ 0,  0,  0, -1]])
    >>> apply_postprocessing(a, Postprocessing(min_sizes=((1, 3),)))
    array([[ 0,  0,  2,  0],
           [ 0,  0,  0,  0],
           [ 0,  2,  0, -1]])
    """
    labels = check_label_image(labels, "labels", kinds="iu")
    structure = _structure(labels.ndim, pp.connectivity)
    out = labels.copy()
    if pp.largest_foreground:
        _keep_largest(out, out > 0, structure)
    for c in pp.largest_classes:
        _keep_largest(out, out == c, structure)
    for c, n in pp.min_sizes:
        comp, count = ndimage.label(out == c, structure=structure)
        if count:
            small = np.bincount(comp.ravel()) < n
            small[0] = False  # the class's complement is not an object
            out[small[comp]] = 0
    return out


def object_sizes(masks: Iterable[np.ndarray], classes: Sequence[int],
                 connectivity: int | None = None) -> dict[int, np.ndarray]:
    """The sizes in voxels of every object (connected component) of each class, over all masks.

    Args:
        masks: (*S) integer class indices, 2D or 3D (the training masks).
        classes: the foreground classes to measure.
        connectivity: as :class:`Postprocessing` (None = full).

    Returns:
        class -> sorted int64 sizes (empty where the class never occurs).

    >>> m = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [2, 2, 2, 0]])
    >>> {c: s.tolist() for c, s in object_sizes([m], [1, 2]).items()}
    {1: [1, 2], 2: [3]}
    """
    found: dict[int, list[np.ndarray]] = {int(c): [] for c in classes}
    for m in masks:
        m = check_label_image(m, "mask", kinds="iu")
        structure = _structure(m.ndim, connectivity)
        for c in found:
            comp, n = ndimage.label(m == c, structure=structure)
            if n:
                found[c].append(np.bincount(comp.ravel())[1:])
    return {c: np.sort(np.concatenate(s)).astype(np.int64) if s else np.zeros(0, np.int64)
            for c, s in found.items()}


def min_sizes_from(sizes: Mapping[int, np.ndarray], percentile: float = PERCENTILE) -> dict[int, int]:
    """Candidate minimum sizes: per class, the ``percentile`` of its true object sizes (an actual size,
    numpy's "lower" method), so that objects smaller than nearly every true object are removed.

    Classes without objects, or whose threshold would remove nothing (1 voxel), get no candidate.

    >>> min_sizes_from({1: np.array([40, 50, 900]), 2: np.array([1, 3]), 3: np.array([], int)})
    {1: 40}
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    out = {}
    for c, s in sizes.items():
        if len(s):
            n = int(np.percentile(np.asarray(s), percentile, method="lower"))
            if n > 1:
                out[int(c)] = n
    return out


def mean_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> dict:
    """Per-class Dice averaged over the pairs, and their mean over the classes ("foreground").

    A class absent from both masks of a pair scores 1 there (:func:`useg.metrics.dice`); truth
    pixels with negative labels (ROI ignore) are not counted.

    Args:
        pairs: (prediction, truth) (*S) integer class indices.
        classes: the foreground classes scored.

    Returns:
        ``{"foreground": float, "classes": {class: float}}``.

    >>> t = np.array([[1, 1, 0, 0]])
    >>> mean_dice([(np.array([[1, 0, 0, 1]]), t)], [1])
    {'foreground': 0.5, 'classes': {1: 0.5}}
    """
    classes = [int(c) for c in classes]
    if not pairs or not classes:
        raise ValueError("mean_dice needs at least one pair and one class")
    k = max(classes) + 1
    per_case = []
    for pred, truth in pairs:
        pred, truth = check_label_pair(pred, truth, spatial=False, must="hold integer class indices")
        scored = truth >= 0
        counts = confusion(np.maximum(pred[scored], 0), truth[scored], k)
        per_case.append([dice(*counts[c]) for c in classes])
    means = np.mean(np.asarray(per_case, dtype=np.float64), axis=0)
    by_class = {c: float(v) for c, v in zip(classes, means, strict=True)}
    return {"foreground": float(np.mean(means)), "classes": by_class}


def choose_postprocessing(pairs: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[int],
                          min_sizes: Mapping[int, int] | None = None, tolerance: float = TOLERANCE,
                          connectivity: int | None = None) -> tuple[Postprocessing, dict]:
    """Try each step in turn on the pairs and keep those that help: nnU-Net's rule.

    The steps, each on top of those already kept: the largest foreground component (when there
    are several foreground classes, or one), then per class its largest component (only with
    several foreground classes: with one it is the same step), then per class the minimum size
    of ``min_sizes``. A step is kept when it raises the mean Dice over the classes it changes
    (all foreground for the first, its class for the others) by more than :data:`GAIN` and no
    class's Dice (nor the foreground mean) falls by more than ``tolerance``. Every kept step
    raises the foreground mean Dice, so the chosen post-processing never lowers it.

    Args:
        pairs: (prediction, truth) label images (*S), 2D or 3D: out-of-fold predictions.
        classes: the foreground classes (1..K-1).
        min_sizes: class -> candidate minimum object size in voxels (:func:`min_sizes_from`).
        tolerance: the Dice any class may lose to a kept step.
        connectivity: as :class:`Postprocessing`.

    Returns:
        (the chosen :class:`Postprocessing`, the figures: ``{"before": mean_dice of the raw
        predictions, "after": of the post-processed ones, "steps": [{"step", "class",
        "min_size", "before", "after", "kept"}, ...]}``).
    """
    classes = sorted(int(c) for c in classes)
    candidates = [("largest_foreground", None, None)]
    if len(classes) > 1:
        candidates += [("largest_class", c, None) for c in classes]
    candidates += [("min_size", int(c), int(n)) for c, n in sorted((min_sizes or {}).items()) if c in classes]
    current = [(np.asarray(p), np.asarray(t)) for p, t in pairs]
    score = start = mean_dice(current, classes)
    chosen = Postprocessing(connectivity=connectivity)
    steps = []
    for step, c, n in candidates:
        trial = _with_step(chosen, step, c, n)
        only = _with_step(Postprocessing(connectivity=connectivity), step, c, n)  # on top of ``current``
        tried = [(apply_postprocessing(p, only), t) for p, t in current]
        after = mean_dice(tried, classes)
        kept = _helps(score, after, c, tolerance)
        steps.append({"step": step, "class": c, "min_size": n, "before": score, "after": after, "kept": kept})
        if kept:
            chosen, current, score = trial, tried, after
    return chosen, {"before": start, "after": score, "steps": steps}


# ---------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    if ndim not in (2, 3):
        raise ValueError(f"labels must be 2D (H, W) or 3D (D, H, W), got {ndim} dimensions")
    if connectivity is not None and connectivity > ndim:
        raise ValueError(f"connectivity {connectivity} is more than the {ndim} dimensions of the labels")
    return ndimage.generate_binary_structure(ndim, ndim if connectivity is None else int(connectivity))


def _keep_largest(out: np.ndarray, mask: np.ndarray, structure: np.ndarray) -> None:
    """Set every component of ``mask`` but the largest (the first found on ties) to 0, in place."""
    comp, n = ndimage.label(mask, structure=structure)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[(comp > 0) & (comp != int(np.argmax(sizes)))] = 0


def _with_step(pp: Postprocessing, step: str, c: int | None, n: int | None) -> Postprocessing:
    if step == "largest_foreground":
        return dataclasses.replace(pp, largest_foreground=True)
    if step == "largest_class":
        return dataclasses.replace(pp, largest_classes=(*pp.largest_classes, c))
    return dataclasses.replace(pp, min_sizes=(*pp.min_sizes, (c, n)))


def _helps(before: dict, after: dict, c: int | None, tolerance: float) -> bool:
    """Whether a step's ``after`` Dice beats ``before``: its target up, nothing down beyond ``tolerance``."""
    target = "foreground" if c is None else c
    gain = (after["foreground"] - before["foreground"] if c is None
            else after["classes"][target] - before["classes"][target])
    worse = [before["classes"][k] - after["classes"][k] for k in before["classes"]]
    worse.append(before["foreground"] - after["foreground"])
    return gain > GAIN and max(worse) <= tolerance
