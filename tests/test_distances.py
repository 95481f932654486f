"""Surface distances: golden cases, empty rules, bad input, and a cross-check against MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from useg.distances import (
    BRATS_REGIONS,
    assd,
    evaluate_regions,
    hausdorff,
    hd95,
    region_masks,
    surface,
    surface_distances,
)


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _blobs(rng, shape, sigma=2.0, level=0.6) -> np.ndarray:
    """Smooth random blobs: thresholded Gaussian-filtered noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


def _brute(pred, truth, spacing):
    """Directed surface distances by all pairs, independent of distance transforms."""
    sp = np.asarray(spacing, dtype=float)
    a, b = np.argwhere(surface(pred)) * sp, np.argwhere(surface(truth)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


# --- surface -----------------------------------------------------------------------------------


def test_surface_of_square_and_cube_is_their_outer_layer():
    sq = _box((9, 11), (2, 3), (7, 8))  # 5 x 5
    s = surface(sq)
    assert s.sum() == 25 - 9 and not s[3:6, 4:7].any() and (s <= sq).all()
    cube = _box((9, 10, 11), (1, 2, 3), (6, 7, 8))  # 5 x 5 x 5
    assert surface(cube).sum() == 125 - 27
    # touching the border closes the surface there: outside the array counts as background
    assert surface(np.ones((5, 7), dtype=bool)).sum() == 35 - 15
    assert not surface(np.zeros((4, 5), dtype=np.uint8)).any()


def test_surface_uses_face_connectivity():
    # A diagonal-only neighbour of background stays inside with the cross element.
    m = _box((7, 7), (1, 1), (6, 6))
    m[1, 1] = False  # the corner voxel goes; (2, 2) now touches background only diagonally
    assert not surface(m)[2, 2]
    assert surface(m)[1, 2] and surface(m)[2, 1]


# --- golden distances --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_squares_offset_by_k_have_hausdorff_k(k):
    a = _box((19, 23), (5, 5), (12, 12))
    b = _box((19, 23), (5, 5 + k), (12, 12 + k))
    assert hausdorff(a, b) == k
    assert hausdorff(b, a) == k
    assert hd95(a, b) == k  # every edge voxel facing the shift is k away: far more than 5 %


@pytest.mark.parametrize("k", [1, 2])
def test_cubes_offset_by_k_have_hausdorff_k(k):
    a = _box((15, 13, 11), (3, 3, 2), (10, 10, 9))
    b = _box((15, 13, 11), (3 + k, 3, 2), (10 + k, 10, 9))
    assert hausdorff(a, b) == k and hd95(a, b) == k


def test_anisotropic_spacing_scales_distances():
    a = _box((19, 23), (5, 5), (12, 12))
    b = _box((19, 23), (5, 7), (12, 14))  # shifted 2 along axis 1
    assert hausdorff(a, b, spacing=(0.5, 2.0)) == pytest.approx(4.0)
    assert hausdorff(a, b, spacing=(0.25, 0.5)) == pytest.approx(1.0)
    a3 = _box((17, 13, 11), (3, 3, 2), (10, 10, 9))
    b3 = _box((17, 13, 11), (5, 3, 2), (12, 10, 9))  # shifted 2 slices
    assert hausdorff(a3, b3, spacing=(3.0, 0.8, 0.8)) == pytest.approx(6.0)
    d_pt, d_tp = surface_distances(a3, b3, spacing=(3.0, 0.8, 0.8))
    e_pt, e_tp = _brute(a3, b3, (3.0, 0.8, 0.8))
    np.testing.assert_allclose(d_pt, e_pt)
    np.testing.assert_allclose(d_tp, e_tp)


def test_single_voxel_differences():
    truth = _box((19, 21), (5, 5), (12, 12))  # 7 x 7: 24 surface voxels
    bump = truth.copy()
    bump[4, 8] = True  # one voxel on the top edge's middle
    assert hausdorff(bump, truth) == 1.0
    assert hd95(bump, truth) == 0.0  # 1 of 24 distances is non-zero: below the 95th percentile
    assert assd(bump, truth) == pytest.approx(2 / 48)  # (4,8)->(5,8) and (5,8)->(5,7)
    stray = truth.copy()
    stray[15, 8] = True  # isolated voxel 4 below the bottom edge
    assert hausdorff(stray, truth) == 4.0
    assert hd95(stray, truth) == 0.0
    assert assd(stray, truth) == pytest.approx(4 / 49)


@pytest.mark.parametrize("shape", [(13, 17), (7, 9, 11)])
def test_identical_masks_score_zero(shape, rng):
    m = _blobs(rng, shape, sigma=1.5)
    assert m.any()
    assert hausdorff(m, m) == hd95(m, m) == assd(m, m) == 0.0


def test_surface_distances_match_brute_force(rng):
    p, t = _blobs(rng, (21, 19)), _blobs(rng, (21, 19))
    for got, want in zip(surface_distances(p, t, (1.3, 0.6)), _brute(p, t, (1.3, 0.6))):
        np.testing.assert_allclose(got, want)


# --- empty rules -------------------------------------------------------------------------------


def test_both_empty_is_zero_and_one_empty_is_nan():
    empty = np.zeros((9, 11), dtype=bool)
    full = _box((9, 11), (2, 2), (5, 6))
    for f in (hausdorff, hd95, assd):
        assert f(empty, empty) == 0.0
        assert math.isnan(f(full, empty)) and math.isnan(f(empty, full))
    d_pt, d_tp = surface_distances(full, empty)
    assert d_pt.size == surface(full).sum() and np.isinf(d_pt).all() and d_tp.size == 0
    assert all(d.size == 0 for d in surface_distances(empty, empty))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hd95(np.zeros((4, 5), bool), np.zeros((5, 4), bool)), "differs"),
        (lambda: hd95(np.zeros((4, 5), bool), np.zeros((4, 5), bool), spacing=(1.0,)), "one value per axis"),
        (lambda: assd(np.zeros((2, 4, 5), bool), np.zeros((2, 4, 5), bool), spacing=(1, 1)),
         "one value per axis"),
        (lambda: hd95(np.zeros((4, 5), bool), np.zeros((4, 5), bool), spacing=(1.0, 0.0)), "positive"),
        (lambda: hd95(np.zeros((4, 5)), np.zeros((4, 5), bool)), "bool or integer"),
        (lambda: surface(np.zeros(5, bool)), "2D"),
        (lambda: hausdorff(np.zeros((4, 5), bool), np.zeros((4, 5), bool), percentile=101), "percentile"),
        (lambda: region_masks(np.zeros((3, 3), int), {"WT": []}), "one or more"),
        (lambda: region_masks(np.zeros((3, 3), int), {}), "non-empty"),
        (lambda: region_masks(np.zeros((3, 3)), BRATS_REGIONS), "integer"),
        (lambda: evaluate_regions(np.zeros((3, 3), int), np.zeros((3, 4), int)), "differs"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- regions -----------------------------------------------------------------------------------


def test_brats_regions_and_evaluation():
    truth = np.zeros((11, 13, 9), dtype=np.int16)
    truth[2:9, 2:11, 2:7] = 2  # oedema
    truth[4:7, 4:9, 3:6] = 1  # necrosis inside
    truth[5, 5:8, 4] = 4  # enhancing inside that
    masks = region_masks(truth, BRATS_REGIONS)
    assert set(masks) == {"WT", "TC", "ET"}
    assert masks["WT"].sum() == (truth > 0).sum() and masks["ET"].sum() == 3
    assert (masks["ET"] <= masks["TC"]).all() and (masks["TC"] <= masks["WT"]).all()

    pred = truth.copy()
    pred[pred == 4] = 1  # enhancing missed entirely: ET empty in the prediction
    rows = {r["region"]: r for r in evaluate_regions(pred, truth, spacing=(2.0, 1.0, 1.0))}
    assert rows["WT"]["dice"] == rows["TC"]["dice"] == 1.0
    assert rows["WT"]["hd95"] == rows["WT"]["assd"] == 0.0
    assert rows["ET"]["dice"] == 0.0 and rows["ET"]["fn"] == 3 and rows["ET"]["tp"] == 0
    assert math.isnan(rows["ET"]["hd95"]) and math.isnan(rows["ET"]["assd"])
    # a region absent from both sides is perfect
    none = evaluate_regions(np.zeros((5, 6), int), np.zeros((5, 6), int), {"ET": [4]})[0]
    assert none["dice"] == none["iou"] == 1.0 and none["hd95"] == none["assd"] == 0.0


def test_evaluate_regions_agrees_with_the_functions(rng):
    truth = _blobs(rng, (23, 21)).astype(np.int64) * 2
    pred = _blobs(rng, (23, 21)).astype(np.int64) * 2
    row = evaluate_regions(pred, truth, {"fg": [2]}, spacing=(1.5, 0.5))[0]
    assert row["hd95"] == hd95(pred, truth, (1.5, 0.5))
    assert row["assd"] == assd(pred, truth, (1.5, 0.5))


# --- MONAI cross-check -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monai_metrics():
    """MONAI's metrics, imported (and warmed up) once: its lazy imports take seconds."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    one = torch.ones((1, 1, 3, 3))
    metrics.compute_hausdorff_distance(one, one, include_background=True)
    return metrics


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
@pytest.mark.parametrize(
    "shape, spacing, seed",
    [((41, 37), (1.0, 1.0), 1), ((41, 37), (1.0, 0.7), 2), ((33, 29), (2.0, 0.5), 3),
     ((17, 19, 15), (1.0, 1.0, 1.0), 4), ((17, 19, 15), (2.5, 0.8, 0.8), 5)],
)
def test_matches_monai(shape, spacing, seed, monai_metrics):
    import torch
    rng = np.random.default_rng(seed)
    pred, truth = _blobs(rng, shape), _blobs(rng, shape)
    assert pred.any() and truth.any()

    def onehot(m):  # MONAI wants binarised one-hot (B, C, *S); one channel, kept as "background"
        return torch.from_numpy(m[None, None].astype(np.float32))

    kw = {"include_background": True, "spacing": list(spacing)}
    want_hd95 = monai_metrics.compute_hausdorff_distance(onehot(pred), onehot(truth), percentile=95, **kw)
    want_hd = monai_metrics.compute_hausdorff_distance(onehot(pred), onehot(truth), **kw)
    want_assd = monai_metrics.compute_average_surface_distance(onehot(pred), onehot(truth), symmetric=True,
                                                               **kw)
    # MONAI computes in float32
    assert hd95(pred, truth, spacing) == pytest.approx(float(want_hd95), rel=1e-5, abs=1e-5)
    assert hausdorff(pred, truth, spacing) == pytest.approx(float(want_hd), rel=1e-5, abs=1e-5)
    assert assd(pred, truth, spacing) == pytest.approx(float(want_assd), rel=1e-5, abs=1e-5)
