"""Threshold-free metrics of probability maps, exact, from histograms of scores.

A class's scores (its probability at every pixel) and the truth (is the pixel of that class)
reduce to a :class:`ScoreCounts`: every distinct score value with the number of positive and of
negative pixels holding it. uint8 maps have at most 256 values and float16 maps at most 65536, so
the counts of any number of images stay that small (:func:`score_counts` per image, :func:`merge`
over images) while every curve computed from them is exactly the one of the pooled pixels:

* ROC AUC (:func:`roc_auc`): the trapezoid over the ROC points of the distinct thresholds, so
  tied scores count one half, as in scikit-learn's ``roc_auc_score``;
* average precision (:func:`average_precision`): scikit-learn's step-wise
  ``sum_n (R_n - R_{n-1}) P_n`` over the thresholds, high to low;
* F1 at every threshold (:func:`f1_curve`), and the counts at one threshold (:func:`counts_at`).

A pixel is predicted positive when its score is ``>= threshold`` (scikit-learn's convention).
Ratios follow the empty-mask rule of :mod:`useg.metrics` (nothing to find and nothing found
scores 1.0); AUC and AP are nan when the truth holds only positives or only negatives
(scikit-learn refuses those). This module imports nothing from useg: scikit-learn is needed
only by the tests that cross-check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_METRICS = ("auc", "ap", "f1_best", "threshold_best", "f1_05", "sensitivity", "specificity", "accuracy")


@dataclass(frozen=True)
class ScoreCounts:
    """How many positive and negative pixels hold each distinct score.

    Attributes:
        values: (N,) float64 distinct scores, ascending.
        pos: (N,) int64 positives (truth of the class) with that score.
        neg: (N,) int64 negatives with that score; ``pos + neg > 0`` everywhere.
    """

    values: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg.sum())


def empty_counts() -> ScoreCounts:
    """Counts of no pixels: the start of a streamed accumulation."""
    return ScoreCounts(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))


def score_counts(scores: np.ndarray, truth: np.ndarray, scale: float = 1.0) -> ScoreCounts:
    """The histogram of one image's scores, split by the truth.

    uint8 scores are binned by their 256 codes and float16 scores by their 65536 bit patterns
    (both O(pixels), no sort); other floats by ``np.unique`` over the stored values. Every way is
    exact: each distinct stored value is its own bin.

    Args:
        scores: (*S) uint8, float16 or other float scores.
        truth: (*S) bool, True where the pixel belongs to the class.
        scale: multiplies the stored values, e.g. 1 / 255 for uint8 maps of round(p * 255).

    Returns:
        The :class:`ScoreCounts` of the image.

    Raises:
        ValueError: shapes differ, truth not boolean, integer scores other than uint8, NaN.

    >>> c = score_counts(np.array([0.1, 0.4, 0.4, 0.8]), np.array([False, True, False, True]))
    >>> c.values.tolist(), c.pos.tolist(), c.neg.tolist()
    ([0.1, 0.4, 0.8], [0, 1, 1], [1, 1, 0])
    """
    scores, truth = np.asarray(scores), np.asarray(truth)
    if scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} differ in shape")
    if truth.dtype != bool:
        raise ValueError(f"truth must be boolean, got {truth.dtype}")
    flat, hit = scores.ravel(), truth.ravel()
    if scores.dtype == np.uint8:
        values, codes = np.arange(256, dtype=np.float64), flat.astype(np.intp)
    elif scores.dtype == np.float16:
        values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
        codes = flat.view(np.uint16).astype(np.intp)
    elif np.issubdtype(scores.dtype, np.floating):
        values, codes = np.unique(flat, return_inverse=True)
        values, codes = values.astype(np.float64), codes.ravel()
    else:
        raise ValueError(f"scores must be uint8 or floating point, got {scores.dtype}")
    total = np.bincount(codes, minlength=len(values))
    pos = np.bincount(codes[hit], minlength=len(values))
    keep = total > 0
    values = values[keep] * scale
    if np.isnan(values).any():
        raise ValueError("scores hold NaN")
    return _canonical(values, pos[keep], (total - pos)[keep])


def merge(*counts: ScoreCounts) -> ScoreCounts:
    """The counts of all the pixels behind ``counts`` together (images streamed one by one).

    >>> a = score_counts(np.array([0.2, 0.6]), np.array([False, True]))
    >>> b = score_counts(np.array([0.6, 0.9]), np.array([False, True]))
    >>> m = merge(a, b)
    >>> m.values.tolist(), m.pos.tolist(), m.neg.tolist()
    ([0.2, 0.6, 0.9], [0, 1, 1], [1, 1, 0])
    """
    if not counts:
        return empty_counts()
    return _canonical(np.concatenate([c.values for c in counts]), np.concatenate([c.pos for c in counts]),
                      np.concatenate([c.neg for c in counts]))


def roc_curve(counts: ScoreCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC points, from (0, 0) (threshold +inf) through each distinct score, high to low.

    Returns:
        (fpr, tpr, thresholds), each (N + 1,); nan rates when a side has no pixels.
    """
    tps, fps, thresholds = _cumulative(counts)
    p, n = counts.positives, counts.negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.r_[0.0, fps / n] if n else np.full(len(tps) + 1, np.nan)
        tpr = np.r_[0.0, tps / p] if p else np.full(len(tps) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(counts: ScoreCounts) -> float:
    """Area under the ROC curve; tied scores count one half; nan without positives or negatives.

    The trapezoid over the ROC points equals the Mann-Whitney form
    ``sum_n neg_n * (tps_{n-1} + pos_n / 2) / (P * N)``, computed here from the counts.

    >>> roc_auc(score_counts(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])))
    0.75
    >>> roc_auc(score_counts(np.array([0.5, 0.5]), np.array([False, True])))  # a tie: one half
    0.5
    """
    p, n = counts.positives, counts.negatives
    if p == 0 or n == 0:
        return float("nan")
    pos, neg = counts.pos[::-1].astype(np.float64), counts.neg[::-1].astype(np.float64)
    above = np.cumsum(pos) - pos  # positives scored strictly higher than each threshold
    return float(np.sum(neg * (above + pos / 2)) / (float(p) * float(n)))


def average_precision(counts: ScoreCounts) -> float:
    """scikit-learn's average precision: ``sum_n (R_n - R_{n-1}) P_n``, thresholds high to low.

    Recall only grows where a threshold adds positives, so this is ``sum_n pos_n * P_n / P``.
    nan without positives or negatives.

    >>> average_precision(score_counts(np.array([0.1, 0.4, 0.35, 0.8]),
    ...                                np.array([False, False, True, True])))
    0.8333333333333333
    """
    p, n = counts.positives, counts.negatives
    if p == 0 or n == 0:
        return float("nan")
    tps, fps, _ = _cumulative(counts)
    precision = tps / (tps + fps)
    return float(np.sum(counts.pos[::-1] * precision) / p)


def f1_curve(counts: ScoreCounts) -> tuple[np.ndarray, np.ndarray]:
    """F1 (Dice) at each distinct score taken as the threshold, high to low.

    Returns:
        (thresholds, f1), each (N,).

    >>> t, f = f1_curve(score_counts(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])))
    >>> t.tolist(), [round(v, 4) for v in f.tolist()]
    ([0.8, 0.4, 0.35, 0.1], [0.6667, 0.5, 0.8, 0.6667])
    """
    tps, fps, thresholds = _cumulative(counts)
    # 2 tp / (2 tp + fp + fn) with fn = P - tp; tp + fp >= 1 at every threshold, never 0/0
    return thresholds, 2 * tps / (tps + fps + counts.positives)


def counts_at(counts: ScoreCounts, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) when pixels with ``score >= threshold`` are predicted positive."""
    on = counts.values >= threshold
    tp, fp = int(counts.pos[on].sum()), int(counts.neg[on].sum())
    return tp, fp, counts.positives - tp, counts.negatives - fp


def score_metrics(counts: ScoreCounts, threshold: float = 0.5) -> dict[str, float]:
    """The table of vessel and lesion papers from one class's counts.

    Args:
        counts: the class's :class:`ScoreCounts` (of one image or pooled over many).
        threshold: the fixed threshold of F1, sensitivity, specificity and accuracy.

    Returns:
        {"auc", "ap", "f1_best" (the best F1 over all thresholds), "threshold_best" (its
        threshold, the highest of ties), "f1_05", "sensitivity", "specificity", "accuracy" (at
        ``threshold``), "positives", "negatives"}.

    Raises:
        ValueError: counts of no pixels.

    >>> m = score_metrics(score_counts(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])))
    >>> m["auc"], m["f1_best"], m["threshold_best"], m["f1_05"], m["specificity"], m["accuracy"]
    (0.75, 0.8, 0.35, 0.6666666666666666, 1.0, 0.75)
    """
    if counts.values.size == 0:
        raise ValueError("score_metrics needs the counts of at least one pixel")
    thresholds, f1 = f1_curve(counts)
    best = int(np.argmax(f1))
    tp, fp, fn, tn = counts_at(counts, threshold)
    return {
        "auc": roc_auc(counts),
        "ap": average_precision(counts),
        "f1_best": float(f1[best]),
        "threshold_best": float(thresholds[best]),
        "f1_05": _ratio(2 * tp, 2 * tp + fp + fn, fp + fn),
        "sensitivity": _ratio(tp, tp + fn, fp),
        "specificity": _ratio(tn, tn + fp, fn),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        "positives": counts.positives,
        "negatives": counts.negatives,
    }


# ---------------------------------------------------------------------------------------------


def _canonical(values: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> ScoreCounts:
    """Sorted distinct values with the counts of equal values summed (-0.0 and 0.0 are one)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    p, n = np.zeros(len(distinct), np.int64), np.zeros(len(distinct), np.int64)
    np.add.at(p, inverse.ravel(), pos)
    np.add.at(n, inverse.ravel(), neg)
    return ScoreCounts(distinct.astype(np.float64), p, n)


def _cumulative(counts: ScoreCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives (float64) at each distinct threshold, high to low, and the thresholds."""
    return (np.cumsum(counts.pos[::-1]).astype(np.float64), np.cumsum(counts.neg[::-1]).astype(np.float64),
            counts.values[::-1].copy())


def _ratio(num: int, denom: int, wrong: int) -> float:
    """num / denom; when denom is 0: 1.0 if nothing was predicted wrongly, else 0.0 (useg.metrics' rule)."""
    if denom == 0:
        return 1.0 if wrong == 0 else 0.0
    return num / denom
