"""Tests for useg.metrics: counts, the empty-mask rule and per-case rows."""

from __future__ import annotations

import numpy as np
import pytest

from useg.metrics import (
    confusion,
    dice,
    evaluate_case,
    iou,
    pixel_error,
    precision,
    recall,
)

PRED = np.array([[0, 1, 1], [2, 2, 0]])
TRUTH = np.array([[0, 1, 0], [2, 1, 1]])
# class 0: tp (0,0); fp (1,2); fn (0,2).   class 1: tp (0,1); fp (0,2); fn (1,1), (1,2).
# class 2: tp (1,0); fp (1,1); no fn.       3 of 6 pixels differ.
COUNTS = [[1, 1, 1], [1, 1, 2], [1, 1, 0]]


def test_confusion_hand_computed():
    np.testing.assert_array_equal(confusion(PRED, TRUTH, 3), COUNTS)
    assert confusion(PRED, TRUTH, 3).dtype == np.int64


def test_confusion_absent_class_and_3d():
    pred = np.zeros((2, 3, 4), np.uint8)
    truth = np.zeros((2, 3, 4), np.int32)
    truth[1, 2, 3] = 1
    c = confusion(pred, truth, 4)
    np.testing.assert_array_equal(c, [[23, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "pred,truth,k",
    [
        (np.zeros((3, 3), int), np.zeros((3, 4), int), 2),  # shape mismatch
        (np.full((3, 3), 2), np.zeros((3, 3), int), 2),  # value out of range
        (np.full((3, 3), -1), np.zeros((3, 3), int), 2),
        (np.zeros((3, 3)), np.zeros((3, 3), int), 2),  # float labels
        (np.zeros((3, 3), int), np.zeros((3, 3), int), 0),
    ],
)
def test_confusion_rejects(pred, truth, k):
    with pytest.raises(ValueError):
        confusion(pred, truth, k)


def test_ratios_hand_computed():
    assert dice(1, 1, 2) == pytest.approx(2 / 5)
    assert iou(1, 1, 2) == pytest.approx(1 / 4)
    assert precision(1, 1, 2) == pytest.approx(1 / 2)
    assert recall(1, 1, 2) == pytest.approx(1 / 3)
    assert dice(5, 0, 0) == iou(5, 0, 0) == precision(5, 0, 0) == recall(5, 0, 0) == 1.0
    assert dice(0, 3, 4) == iou(0, 3, 4) == precision(0, 3, 4) == recall(0, 3, 4) == 0.0


def test_empty_rule():
    for f in (dice, iou, precision, recall):
        assert f(0, 0, 0) == 1.0  # absent from both
    # one side empty: empty prediction, non-empty truth
    assert precision(0, 0, 5) == 0.0 and recall(0, 0, 5) == 0.0
    assert dice(0, 0, 5) == 0.0 and iou(0, 0, 5) == 0.0
    # empty truth, non-empty prediction
    assert recall(0, 5, 0) == 0.0 and precision(0, 5, 0) == 0.0
    assert dice(0, 5, 0) == 0.0 and iou(0, 5, 0) == 0.0
    with pytest.raises(ValueError):
        dice(-1, 0, 0)


def test_pixel_error():
    assert pixel_error(PRED, TRUTH) == pytest.approx(3 / 6)
    assert pixel_error(TRUTH, TRUTH) == 0.0
    with pytest.raises(ValueError):
        pixel_error(PRED, TRUTH[:1])


@pytest.mark.parametrize("shape", [(17, 23), (5, 9, 11)])
def test_dice_matches_set_formula_on_random_masks(rng, shape):
    for _ in range(5):
        a = rng.random(shape) < rng.uniform(0.05, 0.6)
        b = rng.random(shape) < rng.uniform(0.05, 0.6)
        tp, fp, fn = confusion(a.astype(np.uint8), b.astype(np.uint8), 2)[1]
        expected = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert dice(tp, fp, fn) == pytest.approx(expected)
        assert iou(tp, fp, fn) == pytest.approx(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def test_evaluate_case_rows_3d():
    truth = np.zeros((3, 4, 5), np.int64)
    truth[1, 1:3, 1:4] = 1  # 6 voxels
    pred = np.zeros_like(truth)
    pred[1, 1:3, 2:4] = 1  # 4 voxels, all inside
    rows = evaluate_case(pred, truth, 3, class_names=["bg", "cell", "nucleus"], case="vol1")
    assert [r["class"] for r in rows] == [0, 1, 2]
    assert [r["name"] for r in rows] == ["bg", "cell", "nucleus"]
    cell = rows[1]
    assert (cell["tp"], cell["fp"], cell["fn"]) == (4, 0, 2)
    assert cell["dice"] == pytest.approx(8 / 10) and cell["recall"] == pytest.approx(4 / 6)
    assert cell["precision"] == 1.0
    nucleus = rows[2]  # absent from both
    assert all(nucleus[m] == 1.0 for m in ("dice", "iou", "precision", "recall"))
    assert all(r["pixel_error"] == pytest.approx(2 / 60) and r["case"] == "vol1" for r in rows)
    with pytest.raises(ValueError):
        evaluate_case(pred, truth, 3, class_names=["bg"])


def test_evaluate_case_default_names():
    rows = evaluate_case(PRED, TRUTH, 3)
    assert [r["name"] for r in rows] == ["background", "class 1", "class 2"]
