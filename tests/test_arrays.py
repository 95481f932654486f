"""Tests for useg.arrays: the shared label-image and spacing checks, and the messages each caller words."""

from __future__ import annotations

import re

import numpy as np
import pytest

from useg.arrays import check_label_image, check_label_pair, check_spacing
from useg.distances import hd95, region_masks, surface
from useg.instances import label_instances, match_instances
from useg.metrics import confusion
from useg.resample import new_shape
from useg.weightmap import border_weight_map, instances_from_semantic


def test_check_spacing():
    assert check_spacing(None, 2) == (1.0, 1.0)
    assert check_spacing(np.array([3, 0.5, 0.5]), 3) == (3.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="sequence of 2 positive numbers"):
        check_spacing(1.0, 2)
    with pytest.raises(ValueError, match=re.escape("one value per axis (3), got 2")):
        check_spacing((1, 1), 3)
    for bad in ((1.0, 0.0), (1.0, -2.0), (1.0, float("nan")), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="finite and positive"):
            check_spacing(bad, 2)


def test_check_label_image_options():
    a = np.zeros((3, 4), np.int16)
    assert check_label_image(a) is a  # no copy
    assert check_label_image(np.zeros(5, int), spatial=False).shape == (5,)
    assert check_label_image(np.zeros((2, 2), bool)).dtype == bool
    assert check_label_image(np.zeros((2, 2), np.float32), kinds="").dtype == np.float32
    with pytest.raises(ValueError, match=re.escape("x must be 2D (H, W) or 3D (D, H, W), got shape (5,)")):
        check_label_image(np.zeros(5, int), "x")
    with pytest.raises(ValueError, match="^x must hold integer labels, got dtype bool$"):
        check_label_image(np.zeros((2, 2), bool), "x", kinds="iu")
    with pytest.raises(ValueError, match="^x must be sure, got dtype float64; do this$"):
        check_label_image(np.zeros((2, 2)), "x", must="be sure", hint="; do this")
    assert check_label_image(-np.ones((2, 2), int)).min() == -1  # sign unchecked by default
    with pytest.raises(ValueError, match="^x must be non-negative, got minimum -1$"):
        check_label_image(-np.ones((2, 2), int), "x", non_negative=True)
    assert check_label_image(np.zeros((0, 3), int), non_negative=True).size == 0


def test_check_label_pair():
    p, t = check_label_pair([[0, 1]], np.array([[1, 1]], np.uint8))
    assert isinstance(p, np.ndarray) and t.dtype == np.uint8
    with pytest.raises(ValueError, match=re.escape("pred shape (1, 2) differs from truth shape (2, 1)")):
        check_label_pair(np.zeros((1, 2), int), np.zeros((2, 1), int))
    with pytest.raises(ValueError, match="^truth must hold integer labels"):
        check_label_pair(np.zeros((2, 2), int), np.zeros((2, 2)))


@pytest.mark.parametrize("call, message", [
    (lambda: confusion(np.zeros((2, 2)), np.zeros((2, 2), int), 2),
     "pred must hold integer class indices, got dtype float64"),
    (lambda: confusion(np.zeros(3, int), np.zeros(4, int), 2),
     "pred shape (3,) differs from truth shape (4,)"),
    (lambda: label_instances(np.zeros((2, 2), np.float32)),
     "labels must hold integer labels, got dtype float32"),
    (lambda: label_instances(np.zeros(4, int)),
     "labels must be 2D (H, W) or 3D (D, H, W), got shape (4,)"),
    (lambda: match_instances(np.zeros((2, 2), int), -np.ones((2, 2), int)),
     "truth must be non-negative, got minimum -1"),
    (lambda: surface(np.zeros((2, 2))),
     "mask must be a bool or integer mask, got dtype float64; threshold probabilities first"),
    (lambda: hd95(np.zeros((2, 2), bool), np.zeros(4, bool)),
     "truth must be 2D (H, W) or 3D (D, H, W), got shape (4,)"),
    (lambda: region_masks(np.zeros((2, 2), bool), {"a": [1]}),
     "labels must be an integer label array, got dtype bool"),
    (lambda: border_weight_map(np.zeros((2, 2), bool)),
     "labels must be an integer instance image (0 = background, 1..N objects), got dtype bool; "
     "use instances_from_semantic for a binary mask"),
    (lambda: border_weight_map(-np.ones((2, 2), int)), "labels must be non-negative, got minimum -1"),
    (lambda: instances_from_semantic(np.zeros(3)), "mask must be 2D (H, W) or 3D (D, H, W), got shape (3,)"),
    (lambda: new_shape((4, 4), (1, 1), (1, 0)), "spacing values must be finite and positive, got (1.0, 0.0)"),
])
def test_callers_keep_their_messages(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
