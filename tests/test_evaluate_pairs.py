"""Tests for useg.evaluate_pairs: predictions paired with their true masks and decoded with one label map."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from useg.errors import UsegError
from useg.evaluate_pairs import case_stem, decoded_pairs, prediction_pairs
from useg.roi import IGNORE


def _mask(path, arr):
    """A grey TIFF: (H, W), or a (D, H, W) stack of pages (ImageJ-style, as useg writes volumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack", metadata={"axes": "ZYX"} if arr.ndim == 3 else None)


def _folders(root, shape, n=3):
    """Predictions ``pred/cK.tif`` and truths ``truth/cK_mask.tif`` (0/255, the prediction shifted)."""
    rng = np.random.default_rng(0)
    for k in range(n):
        truth = np.where(rng.random(shape) < 0.4, 255, 0).astype(np.uint8)
        _mask(root / "truth" / f"c{k}_mask.tif", truth)
        _mask(root / "pred" / f"c{k}.tif", np.roll(truth, 1, axis=-1))
    return root / "pred", root / "truth"


@pytest.mark.parametrize("shape", [(12, 9), (3, 7, 5)])
def test_decoded_pairs_pairs_by_stem_and_decodes_both(tmp_path, shape):
    pred_dir, truth_dir = _folders(tmp_path, shape)
    label_map, cases = decoded_pairs(pred_dir, truth_dir)
    assert label_map.values == (0, 255)
    got = list(cases)
    assert [name for name, _, _ in got] == ["c0", "c1", "c2"]  # the prediction's stem, in name order
    for name, pred, truth in got:
        raw_truth = tifffile.imread(truth_dir / f"{name}_mask.tif")
        np.testing.assert_array_equal(truth, raw_truth // 255)
        np.testing.assert_array_equal(pred, np.roll(raw_truth, 1, axis=-1) // 255)
        assert pred.shape == truth.shape == shape


@pytest.mark.parametrize("shape", [(12, 9), (3, 7, 5)])
def test_decoded_pairs_truth_is_ignore_outside_the_roi(tmp_path, shape):
    pred_dir, truth_dir = _folders(tmp_path, shape, n=2)
    inside = np.zeros(shape, np.uint8)
    inside[..., 1:4] = 1
    for k in range(2):
        _mask(tmp_path / "roi" / f"c{k}.tif", inside)
    _, cases = decoded_pairs(pred_dir, truth_dir, roi=tmp_path / "roi")
    for name, _, truth in cases:
        raw_truth = tifffile.imread(truth_dir / f"{name}_mask.tif") // 255
        assert (truth[inside == 0] == IGNORE).all()
        np.testing.assert_array_equal(truth[inside == 1], raw_truth[inside == 1])


def test_prediction_pairs_refuses_a_prediction_without_truth(tmp_path):
    pred_dir, truth_dir = _folders(tmp_path, (6, 6), n=2)
    _mask(pred_dir / "lonely.tif", np.zeros((6, 6), np.uint8))
    with pytest.raises(UsegError, match=f"no true mask in {truth_dir} for lonely.tif"):
        prediction_pairs(pred_dir, truth_dir)
    with pytest.raises(UsegError, match="is not a folder"):
        prediction_pairs(tmp_path / "nothing", truth_dir)


def test_prediction_pairs_keeps_probability_maps_apart(tmp_path):
    pred_dir, truth_dir = _folders(tmp_path, (6, 6), n=2)
    _mask(pred_dir / "c0_probs.tif", np.zeros((2, 6, 6), np.uint8))
    masks = prediction_pairs(pred_dir, truth_dir)
    assert [(p.name, t.name) for p, t in masks] == [("c0.tif", "c0_mask.tif"), ("c1.tif", "c1_mask.tif")]
    maps = prediction_pairs(pred_dir, truth_dir, probabilities=True)
    assert [(p.name, t.name) for p, t in maps] == [("c0_probs.tif", "c0_mask.tif")]
    assert case_stem(pred_dir / "c0_probs.tif") == "c0" and case_stem(pred_dir / "c0.tif") == "c0"
    assert case_stem(pred_dir / "_probs.tif") == "_probs"  # nothing before the suffix: no map
