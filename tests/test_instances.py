"""Instances from semantic masks and object-level metrics, on tiny hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from useg.instances import (
    adapted_rand_error,
    evaluate_instances,
    instances_from_probs,
    label_instances,
    match_instances,
    relabel_sequential,
)


def two_squares(ndim: int = 2) -> np.ndarray:
    """Two 7-wide squares (cubes) joined by a one-pixel neck, class 1 on background 0; odd size."""
    if ndim == 2:
        a = np.zeros((11, 19), dtype=np.int64)
        a[2:9, 1:8] = 1
        a[2:9, 11:18] = 1
        a[5, 8:11] = 1  # neck, one pixel thick
    else:
        a = np.zeros((9, 9, 19), dtype=np.int64)
        a[1:8, 1:8, 1:8] = 1
        a[1:8, 1:8, 11:18] = 1
        a[4, 4, 8:11] = 1
    return a


@pytest.mark.parametrize("ndim", [2, 3])
def test_watershed_splits_touching_squares_but_components_do_not(ndim):
    a = two_squares(ndim)
    plain = label_instances(a)
    assert plain.dtype == np.int32 and plain.max() == 1
    split = label_instances(a, watershed=True)
    assert split.max() == 2
    assert ((split > 0) == (a == 1)).all()  # flooding stays inside the object mask
    left, right = (slice(None),) * (ndim - 1) + (slice(1, 8),), (slice(None),) * (ndim - 1) + (slice(11, 18),)
    assert len(np.unique(split[left][a[left] == 1])) == 1
    assert len(np.unique(split[right][a[right] == 1])) == 1
    assert split[left].max() != split[right].max()


def test_components_connectivity_class_and_min_size():
    a = np.zeros((5, 7), dtype=np.uint8)
    a[0, 0] = a[1, 1] = 2  # diagonal neighbours
    a[3:5, 4:7] = 2
    a[0, 6] = 1  # another class
    assert label_instances(a, object_class=2).max() == 3
    assert label_instances(a, object_class=2, connectivity=2).max() == 2
    kept = label_instances(a, object_class=2, min_size=2)
    assert kept.max() == 1 and (kept > 0).sum() == 6
    assert label_instances(a, object_class=5).max() == 0


def test_single_blob_is_not_oversplit_and_relabel():
    a = np.zeros((21, 23), dtype=np.int64)
    yy, xx = np.mgrid[:21, :23]
    a[(yy - 10) ** 2 + (xx - 11) ** 2 <= 64] = 1
    a[3:18, 2:21][::2] *= 1  # keep the disc
    assert label_instances(a, watershed=True).max() == 1
    r = relabel_sequential(np.array([[0, 7, 7], [3, 0, 9]]), min_size=2)
    assert r.tolist() == [[0, 1, 1], [0, 0, 0]]


def test_instances_from_probs():
    a = two_squares()
    probs = np.stack([(a == 0), (a == 1)]).astype(np.float32)
    assert instances_from_probs(probs, 1, watershed=True).max() == 2
    with pytest.raises(ValueError):
        instances_from_probs(probs, 2)


def test_identity_scores_perfect():
    inst = label_instances(two_squares(), watershed=True)
    m = match_instances(inst, inst)
    assert (m["tp"], m["fp"], m["fn"], m["f1"]) == (2, 0, 0, 1.0)
    assert adapted_rand_error(inst, inst) == (0.0, 1.0, 1.0)
    # ids need not match, only the partition
    assert adapted_rand_error(inst * 5 + 1 * (inst > 0), inst)[0] == 0.0


def test_merge_and_split_hand_computed():
    # truth: two objects of 2 pixels each
    truth = np.array([[1, 1, 2, 2]])
    merged = np.array([[1, 1, 1, 1]])
    # pairs of distinct pixels (ordered): sum p^2 - n = (4 + 4) - 4 = 4; truth 4; pred 16 - 4 = 12
    err, prec, rec = adapted_rand_error(merged, truth)
    assert prec == pytest.approx(4 / 12) and rec == 1.0
    assert err == pytest.approx(1 - 2 * (1 / 3) / (1 + 1 / 3))  # 0.5
    m = match_instances(merged, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 2)  # IoU 0.5 each: not > 0.5
    # split: one true object of 4 pixels predicted as two halves
    err, prec, rec = adapted_rand_error(truth, merged)
    assert (prec, rec) == (1.0, pytest.approx(1 / 3)) and err == pytest.approx(0.5)
    # a 3-pixel object against truth 1,1,1,2 matches (IoU 3/4), the other is missed
    m = match_instances(np.array([[1, 1, 1, 0]]), np.array([[1, 1, 1, 2]]))
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))


def test_pixels_outside_truth_are_ignored_by_rand():
    truth = np.array([[1, 1, 0, 0]])
    assert adapted_rand_error(np.array([[3, 3, 4, 5]]), truth)[0] == 0.0


def test_empty_rules():
    z = np.zeros((3, 5), dtype=np.int64)
    one = z.copy()
    one[1, 1:3] = 1
    m = match_instances(z, z)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    m = match_instances(one, z)
    assert (m["fp"], m["precision"], m["recall"], m["f1"]) == (1, 0.0, 0.0, 0.0)
    m = match_instances(z, one)
    assert (m["fn"], m["precision"], m["recall"], m["f1"]) == (1, 0.0, 0.0, 0.0)
    assert adapted_rand_error(z, z) == (0.0, 1.0, 1.0)
    assert adapted_rand_error(one, z) == (1.0, 0.0, 0.0)
    assert adapted_rand_error(z, one)[0] == 0.0  # background 0 is one label: nothing split


def test_evaluate_instances_isbi_like():
    truth = two_squares()
    truth[5, 8:11] = 0  # in the truth the neck is membrane: two cells
    pred = two_squares()
    plain = evaluate_instances(pred, truth, object_class=1)
    assert (plain["n_pred"], plain["n_true"]) == (1, 2)
    assert plain["rand_error"] > 0.3 and plain["object_f1"] == 0.0
    ws = evaluate_instances(pred, truth, object_class=1, watershed=True)
    assert (ws["n_pred"], ws["object_f1"]) == (2, 1.0)
    assert ws["rand_error"] == pytest.approx(0.0)
    assert set(ws) == {"object_precision", "object_recall", "object_f1", "rand_error",
                       "rand_precision", "rand_recall", "n_pred", "n_true"}


def test_bad_inputs():
    a = np.zeros((4, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        match_instances(a, np.zeros((5, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        adapted_rand_error(a, np.zeros((4, 6), dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        evaluate_instances(a, a[:3])
    with pytest.raises(ValueError, match="integer"):
        label_instances(a.astype(np.float32))
    with pytest.raises(ValueError):
        label_instances(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="connectivity"):
        label_instances(a, connectivity=3)
    with pytest.raises(ValueError, match="negative"):
        adapted_rand_error(a - 1, a)
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(a, a, iou_threshold=0.3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(13, 17), (5, 7, 9)])
def test_rand_error_matches_skimage(seed, shape):
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, size=shape)
    pred = rng.integers(0, 4, size=shape) * 1000  # sparse ids
    err, prec, rec = adapted_rand_error(pred, truth)
    ref_err, ref_a, ref_b = metrics.adapted_rand_error(truth, pred)
    assert err == pytest.approx(ref_err, abs=1e-12)
    # scikit-image returns them swapped (scikit-image issue #6485)
    assert (prec, rec) == (pytest.approx(ref_b, abs=1e-12), pytest.approx(ref_a, abs=1e-12))


def test_object_matching_against_brute_force():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(6, 8)).repeat(2, 0)
    truth = label_instances(pred > 0) * (rng.random(pred.shape) > 0.1)
    m = match_instances(pred, truth)
    tp = 0
    for i in np.unique(pred[pred > 0]):
        for j in np.unique(truth[truth > 0]):
            a, b = pred == i, truth == j
            tp += (a & b).sum() / (a | b).sum() > 0.5
    assert m["tp"] == tp and m["fp"] == len(np.unique(pred[pred > 0])) - tp
