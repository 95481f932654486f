"""Object instances from semantic masks, and object-level metrics.

A U-Net predicts a class per pixel; many tasks count objects (cells). This module turns a
class-index image ``(*S)`` (2D or 3D) into an instance image (0 = background, 1..N objects) and
scores instance images against the truth:

* :func:`label_instances`: connected components of one class, optionally split by a seeded
  watershed on the distance transform (touching cells joined by a thin neck become two objects);
* :func:`match_instances`: object precision / recall / F1, a predicted object matching a true one
  when their IoU exceeds the threshold (> 0.5 makes the matching unique);
* :func:`adapted_rand_error`: the ISBI 2012 challenge's adapted Rand error (Arganda-Carreras et
  al. 2015), over the pixels the truth labels;
* :func:`evaluate_instances`: both, from semantic class images, e.g. ISBI 2012 with cells as the
  4-connected components of the cell class.

Empty rules follow :mod:`useg.metrics`: nothing predicted where there is nothing scores 1.0
(error 0.0); a ratio that is 0/0 on one side only scores 0.0."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .arrays import check_label_image, check_label_pair
from .metrics import dice, precision, recall

QUANT = 16  # distance transform resolution of the watershed: 1/16 pixel, integer arithmetic


def _check_image(a: np.ndarray, name: str) -> np.ndarray:
    return check_label_image(a, name, non_negative=True)


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return check_label_pair(pred, truth, non_negative=True)


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not (isinstance(connectivity, (int, np.integer)) and 1 <= connectivity <= ndim):
        raise ValueError(f"connectivity must be an int in [1, {ndim}], got {connectivity!r}")
    return ndimage.generate_binary_structure(ndim, int(connectivity))


def _reconstruct(marker: np.ndarray, mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Grey reconstruction by dilation of ``marker`` under ``mask`` (marker <= mask), integers."""
    cur = np.minimum(marker, mask)
    while True:
        nxt = np.minimum(ndimage.grey_dilation(cur, footprint=structure), mask)
        if np.array_equal(nxt, cur):
            return cur
        cur = nxt


def _split_component(q: np.ndarray, inside: np.ndarray, h: int, structure: np.ndarray) -> np.ndarray:
    """Watershed labels 1..n of one component (crop ``inside``) seeded at its h-maxima; 0 outside."""
    q = np.where(inside, q, 0)
    # h-maxima: the regional maxima of R(q - h) keep only peaks at least h above their saddles;
    # two close peaks of one plateau of R form one seed, not two.
    g = _reconstruct(np.maximum(q - h, 0), q, structure)
    seeds = inside & (g - _reconstruct(g - 1, g, structure) >= 1)
    markers, n = ndimage.label(seeds, structure=np.ones_like(structure))
    if n <= 1:
        return inside.astype(np.int32)
    # Flood downhill half a pixel of distance at a time, breadth-first within a level, so tied
    # levels (every rim lies at distance 1, like a thin neck) go to the nearer seed; scipy's
    # watershed_ift lets one flood run round the other object's rim instead.
    level = q // (QUANT // 2)
    lab = markers.astype(np.int32)
    for value in np.unique(level[inside])[::-1]:
        wet = inside & (level >= value)
        while True:
            grown = ndimage.grey_dilation(lab, footprint=structure)
            new = wet & (lab == 0) & (grown > 0)
            if not new.any():
                break
            lab[new] = grown[new]
    return np.where(inside, lab, 0).astype(np.int32)


def relabel_sequential(instances: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Renumber an instance image to 1..N in order of first label, dropping objects below min_size.

    Args:
        instances: (*S) non-negative int instance image, 0 = background.
        min_size: objects with fewer pixels (voxels) are set to 0.

    Returns:
        int32 array of the input's shape.
    """
    instances = _check_image(instances, "instances")
    ids, inverse, counts = np.unique(instances.ravel(), return_inverse=True, return_counts=True)
    keep = (ids != 0) & (counts >= int(min_size))
    new = np.zeros(len(ids), dtype=np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[inverse].reshape(instances.shape)


def label_instances(labels: np.ndarray, object_class: int = 1, watershed: bool = False,
                    min_size: int = 0, connectivity: int = 1, h: float = 2.0) -> np.ndarray:
    """Instances of one class of a semantic image: connected components, optionally split.

    Args:
        labels: (H, W) or (D, H, W) integer class indices (or bool, with object_class 1).
        object_class: the class whose objects are counted (ISBI 2012: the cell class).
        watershed: split each component by a seeded watershed of its Euclidean distance
            transform. Seeds are the h-maxima (peaks at least ``h`` pixels of distance above the
            saddle that joins them to a higher peak); the flooding follows the distance downhill,
            inside the component only.
        min_size: objects with fewer pixels (voxels) than this are removed (after splitting).
        connectivity: neighbourhood of the components and the flooding: 1 (faces) to ndim.
        h: the seeds' minimal dynamic in pixels (watershed only), > 0. Smaller splits more.

    Returns:
        (*S) int32 instance image: 0 = background, objects 1..N (numbered in raster order of
        their first pixel).
    """
    labels = _check_image(labels, "labels")
    structure = _structure(labels.ndim, connectivity)
    if not h > 0:
        raise ValueError(f"h must be positive, got {h}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    mask = labels == object_class
    comps, n = ndimage.label(mask, structure=structure)
    if watershed and n:
        q = np.rint(ndimage.distance_transform_edt(mask) * QUANT).astype(np.int64)
        hq = max(1, round(h * QUANT))
        out = np.zeros(labels.shape, dtype=np.int64)
        offset = 0
        for k, box in enumerate(ndimage.find_objects(comps), start=1):
            inside = comps[box] == k
            part = _split_component(q[box], inside, hq, structure)
            out[box][inside] = part[inside] + offset
            offset += int(part.max())
        comps = out
    if not watershed and min_size <= 1:
        return comps.astype(np.int32)
    return relabel_sequential(comps, min_size)


def instances_from_probs(probs: np.ndarray, object_class: int = 1, **kwargs) -> np.ndarray:
    """:func:`label_instances` of the argmax of class probabilities.

    Args:
        probs: (K, *S) class probabilities or scores.
        object_class: the class index whose objects are counted.
        **kwargs: watershed, min_size, connectivity, h as for :func:`label_instances`.

    Returns:
        (*S) int32 instance image.
    """
    probs = np.asarray(probs)
    if probs.ndim not in (3, 4):
        raise ValueError(f"probs must be (K, H, W) or (K, D, H, W), got shape {probs.shape}")
    if not 0 <= object_class < probs.shape[0]:
        raise ValueError(f"object_class {object_class} is not in [0, {probs.shape[0] - 1}]")
    return label_instances(probs.argmax(0), object_class, **kwargs)


def _compact(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids renumbered 0..m (0 stays 0, objects 1..m in id order) and each object's size.

    Returns:
        (ids (a.size,) int64, sizes (m + 1,) int64 with sizes[0] the background's count).
    """
    ids, inverse, counts = np.unique(a.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.ravel().astype(np.int64)
    if ids.size and ids[0] == 0:
        return inverse, counts.astype(np.int64)
    return inverse + 1, np.concatenate([[0], counts]).astype(np.int64)


def _contingency(p: np.ndarray, t: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of compact ids over the kept pixels: (pred id, true id, count)."""
    p, t = p[keep], t[keep]
    if p.size == 0:
        return p, t, np.zeros(0, dtype=np.int64)
    base = int(p.max()) + 1
    pairs, counts = np.unique(t * base + p, return_counts=True)
    return pairs % base, pairs // base, counts.astype(np.int64)


def match_instances(pred_inst: np.ndarray, true_inst: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Object-level detection scores: a predicted object matches a true one when IoU > threshold.

    With a threshold >= 0.5 an object can overlap at most one other object by more than half of
    their union, so the matching is unique without an assignment step.

    Args:
        pred_inst: (*S) int instance image, 0 = background, any positive ids.
        true_inst: (*S) int instance image of the same shape.
        iou_threshold: in [0.5, 1).

    Returns:
        {"tp", "fp", "fn", "n_pred", "n_true", "precision", "recall", "f1"}: with both images
        empty precision = recall = f1 = 1.0; with one side empty they are 0.0.
    """
    pred_inst, true_inst = _check_pair(pred_inst, true_inst)
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must lie in [0.5, 1) for a unique matching, got {iou_threshold}")
    p, p_area = _compact(pred_inst)
    t, t_area = _compact(true_inst)
    pi, ti, inter = _contingency(p, t, (p != 0) & (t != 0))
    iou = inter / (p_area[pi] + t_area[ti] - inter)
    tp = int(np.count_nonzero(iou > iou_threshold))
    n_pred, n_true = len(p_area) - 1, len(t_area) - 1
    fp, fn = n_pred - tp, n_true - tp
    return {"tp": tp, "fp": fp, "fn": fn, "n_pred": n_pred, "n_true": n_true,
            "precision": precision(tp, fp, fn), "recall": recall(tp, fp, fn), "f1": dice(tp, fp, fn)}


def adapted_rand_error(pred_inst: np.ndarray, true_inst: np.ndarray) -> tuple[float, float, float]:
    """The ISBI 2012 challenge's adapted Rand error, over the pixels where the truth is non-zero.

    With p_ij the number of such pixels labelled i in the prediction and j in the truth,
    s_i = sum_j p_ij and t_j = sum_i p_ij (prediction label 0 counts as a label of its own):

        precision = sum p_ij^2 / sum s_i^2   (Rand split score: pairs together in the prediction
                                              that are together in the truth)
        recall    = sum p_ij^2 / sum t_j^2   (Rand merge score)
        error     = 1 - 2 precision recall / (precision + recall)

    computed over pairs of distinct pixels (each sum of squares minus its sum), as the
    challenge's script and scikit-image do. scikit-image's ``adapted_rand_error`` returns the
    same error with precision and recall swapped (scikit-image issue #6485).

    Rules: no non-zero truth pixel gives (0.0, 1.0, 1.0) when the prediction is empty too and
    (1.0, 0.0, 0.0) otherwise; a ratio 0/0 (no pair of pixels shares a label on that side, e.g.
    all true objects are single pixels) counts as 1.0.

    Args:
        pred_inst: (*S) int instance image.
        true_inst: (*S) int instance image of the same shape, 0 = unlabelled (ignored).

    Returns:
        (error, precision, recall), floats in [0, 1].
    """
    pred_inst, true_inst = _check_pair(pred_inst, true_inst)
    p, _ = _compact(pred_inst)
    t, _ = _compact(true_inst)
    p, t, counts = _contingency(p, t, t != 0)
    if counts.size == 0:
        return (0.0, 1.0, 1.0) if not pred_inst.any() else (1.0, 0.0, 0.0)
    c = counts.astype(np.float64)
    s = np.bincount(p, weights=c)
    tt = np.bincount(t, weights=c)
    n = c.sum()
    sum_p2 = c @ c - n
    sum_s2 = s @ s - n
    sum_t2 = tt @ tt - n
    prec = 1.0 if sum_s2 == 0 else sum_p2 / sum_s2
    rec = 1.0 if sum_t2 == 0 else sum_p2 / sum_t2
    f = 0.0 if prec + rec == 0 else 2.0 * prec * rec / (prec + rec)
    return float(1.0 - f), float(prec), float(rec)


def evaluate_instances(pred_labels: np.ndarray, true_labels: np.ndarray, object_class: int = 1,
                       watershed: bool = False, min_size: int = 0, connectivity: int = 1,
                       h: float = 2.0, iou_threshold: float = 0.5) -> dict:
    """Object and Rand scores of a predicted class image against the true class image.

    The truth's objects are the plain connected components of ``object_class``; the
    prediction's use ``watershed``, ``min_size`` and ``h`` as in :func:`label_instances`. For
    ISBI 2012 (mask 255 = cell, 0 = membrane, decoded to class 1 = cell) use object_class=1 and
    connectivity=1.

    Args:
        pred_labels: (*S) predicted class indices.
        true_labels: (*S) true class indices, same shape.
        object_class: the class whose objects are compared.
        watershed, min_size, connectivity, h: see :func:`label_instances`.
        iou_threshold: see :func:`match_instances`.

    Returns:
        {"object_precision", "object_recall", "object_f1", "rand_error", "rand_precision",
        "rand_recall", "n_pred", "n_true"}.
    """
    pred_labels, true_labels = _check_pair(pred_labels, true_labels)
    pred = label_instances(pred_labels, object_class, watershed=watershed, min_size=min_size,
                           connectivity=connectivity, h=h)
    truth = label_instances(true_labels, object_class, connectivity=connectivity)
    m = match_instances(pred, truth, iou_threshold)
    err, rp, rr = adapted_rand_error(pred, truth)
    return {"object_precision": m["precision"], "object_recall": m["recall"], "object_f1": m["f1"],
            "rand_error": err, "rand_precision": rp, "rand_recall": rr,
            "n_pred": m["n_pred"], "n_true": m["n_true"]}


__all__ = ["adapted_rand_error", "evaluate_instances", "instances_from_probs", "label_instances",
           "match_instances", "relabel_sequential"]
