"""Segmentation overlap metrics: counts per class, ratios of counts, and per-case rows.

Inputs are class-index label arrays ``(*S)`` of integers (2D or 3D), prediction and truth of the
same shape. Counts per class come from one confusion matrix (:func:`confusion`); every overlap
metric is a ratio of those counts.

Empty-mask rule (used by every function here):

* a class absent from both truth and prediction scores 1.0 on every overlap metric (Dice, IoU,
  precision, recall): predicting nothing where there is nothing is perfect;
* a ratio that is 0/0 while only one side is empty scores 0.0, e.g. precision with an empty
  prediction but a non-empty truth (nothing found), or recall with an empty truth but a
  non-empty prediction (only false positives).

Dice and IoU are never 0/0 with one side non-empty, so only precision and recall use the second
case. Summaries (:func:`useg.evaluate_summary.summarize`) average per-case values (macro over cases), so a
case with an absent class that the model also left empty counts as a success for that class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .arrays import check_label_pair

METRICS = ("dice", "iou", "precision", "recall")


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """True positives, false positives and false negatives per class.

    Args:
        pred: (*S) integer class indices in [0, num_classes).
        truth: (*S) integer class indices in [0, num_classes), same shape.
        num_classes: K.

    Returns:
        (K, 3) int64: columns tp, fp, fn.
    """
    pred, truth = _check_pair(pred, truth)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    k = int(num_classes)
    for name, a in (("pred", pred), ("truth", truth)):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{name} has values in [{a.min()}, {a.max()}], outside [0, {k - 1}]")
    # One bincount over truth * K + pred gives the full K x K matrix (rows truth, columns pred).
    flat = truth.ravel().astype(np.int64) * k + pred.ravel().astype(np.int64)
    cm = np.bincount(flat, minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], axis=1).astype(np.int64)


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice = 2 tp / (2 tp + fp + fn); 1.0 when the class is absent from both sides.

    Every overlap metric here takes the same three counts of one class, as :func:`confusion`
    gives them per class.

    Args:
        tp: true positives, >= 0.
        fp: false positives, >= 0.
        fn: false negatives, >= 0.

    Returns:
        A float in [0, 1].

    >>> dice(3, 1, 2)
    0.6666666666666666
    >>> dice(0, 0, 0)  # absent from truth and prediction: perfect
    1.0
    >>> dice(0, 4, 0)  # only false positives
    0.0
    """
    tp, fp, fn = _check_counts(tp, fp, fn)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) = tp / (tp + fp + fn); 1.0 when the class is absent from both sides."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def precision(tp: int, fp: int, fn: int) -> float:
    """Precision = tp / (tp + fp); with an empty prediction 1.0 if the truth is empty too, else 0.0."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def recall(tp: int, fp: int, fn: int) -> float:
    """Recall = tp / (tp + fn); with an empty truth 1.0 if the prediction is empty too, else 0.0."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    if tp + fn == 0:
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


def pixel_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels (voxels) whose predicted class differs from the truth.

    Args:
        pred: (*S) class indices.
        truth: (*S) class indices, same shape, non-empty.

    Returns:
        A float in [0, 1].
    """
    pred, truth = _check_pair(pred, truth)
    if pred.size == 0:
        raise ValueError("pixel_error needs non-empty arrays")
    return float(np.count_nonzero(pred != truth) / pred.size)


def evaluate_case(
    pred: np.ndarray,
    truth: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    case: str = "",
) -> list[dict]:
    """All metrics of one case, one row per class.

    Args:
        pred: (*S) predicted class indices.
        truth: (*S) true class indices, same shape.
        num_classes: K.
        class_names: K names; default "background" for class 0 and "class c" for the others.
        case: the case's name, copied into every row.

    Returns:
        K dicts with keys case, class, name, dice, iou, precision, recall, tp, fp, fn,
        pixel_error (the case's, repeated on each row).
    """
    names = _class_names(num_classes, class_names)
    counts = confusion(pred, truth, num_classes)
    err = pixel_error(pred, truth)
    rows = []
    for c, (tp, fp, fn) in enumerate(counts.tolist()):
        row = {"case": str(case), "class": c, "name": names[c]}
        row.update({m: f(tp, fp, fn) for m, f in zip(METRICS, (dice, iou, precision, recall), strict=True)})
        row.update({"tp": tp, "fp": fp, "fn": fn, "pixel_error": err})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Any number of dimensions: the counts do not care about the layout.
    return check_label_pair(pred, truth, spatial=False, must="hold integer class indices")


def _check_counts(tp: int, fp: int, fn: int) -> tuple[int, int, int]:
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    return int(tp), int(fp), int(fn)


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if class_names is None:
        return ["background"] + [f"class {c}" for c in range(1, int(num_classes))]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]
