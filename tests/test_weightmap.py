from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from useg.weightmap import (
    border_margin,
    border_weight_map,
    class_balance_weights,
    instances_from_semantic,
    two_nearest_distances,
)


def brute_force(labels, w0=10.0, sigma=5.0, spacing=None, class_weights="balanced"):
    """Eq. 2 the slow, obvious way: one full-image EDT per object, sort, take the two smallest."""
    ids = [k for k in np.unique(labels) if k > 0]
    w = class_balance_weights(labels, class_weights).astype(np.float64)
    if len(ids) < 2:
        return w
    dist = np.stack([ndimage.distance_transform_edt(labels != k, sampling=spacing) for k in ids])
    dist.sort(axis=0)
    s = dist[0] + dist[1]
    bg = labels == 0
    w[bg] += w0 * np.exp(-s[bg] ** 2 / (2 * sigma**2))
    return w


def random_instances(shape, n, rng, max_side=6):
    """Random boxes with ids 1..n (later ones overwrite earlier ones, so some may vanish)."""
    labels = np.zeros(shape, dtype=np.int32)
    for k in range(1, n + 1):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [min(s, a + int(rng.integers(1, max_side + 1))) for a, s in zip(lo, shape)]
        labels[tuple(slice(a, b) for a, b in zip(lo, hi))] = k
    return labels


def two_blocks(ndim, shape):
    """Two blocks facing each other along the last axis across a 2-pixel gap (cols 9, 10)."""
    labels = np.zeros(shape, dtype=np.int32)
    body = (slice(3, shape[0] - 3),) * (ndim - 1)
    labels[body + (slice(3, 9),)] = 1
    labels[body + (slice(11, 17),)] = 2
    return labels


@pytest.mark.parametrize("ndim,shape", [(2, (15, 21)), (2, (14, 23)), (3, (9, 11, 21))])
def test_two_blocks_closed_form_and_peak_in_the_gap(ndim, shape):
    labels = two_blocks(ndim, shape)
    w = border_weight_map(labels, w0=10.0, sigma=5.0, class_weights="none")
    assert w.dtype == np.float32 and w.shape == labels.shape
    mid = tuple(s // 2 for s in shape[:-1])
    # hand-computed along the middle line: (d1, d2) by column
    expect = {9: (1, 2), 10: (1, 2), 0: (3, 11), 1: (2, 10), 2: (1, 9), 18: (2, 10), 20: (4, 12)}
    for col, (a, b) in expect.items():
        want = 1.0 + 10.0 * math.exp(-((a + b) ** 2) / 50.0)
        assert w[mid + (col,)] == pytest.approx(want, rel=1e-5), col
    # object pixels get the class weight only
    assert np.all(w[labels > 0] == 1.0)
    # the maximum over the image lies in the gap, and weights fall off away from it
    peak = np.unravel_index(np.argmax(w), w.shape)
    assert peak[-1] in (9, 10)
    line = w[mid]
    assert line[9] > line[1] > line[0] and line[10] > line[18] > line[20]
    np.testing.assert_allclose(w, brute_force(labels, class_weights="none"), atol=1e-4)


@pytest.mark.parametrize("shape,spacing,n", [
    ((17, 23), None, 6), ((19, 13), (1.0, 2.5), 7), ((7, 11, 9), (2.0, 1.0, 0.7), 5),
    ((8, 9, 13), None, 6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_matches_brute_force(shape, spacing, n, seed):
    rng = np.random.default_rng(seed)
    labels = random_instances(shape, n, rng)
    for sigma in (1.5, 4.0):
        ref = brute_force(labels, sigma=sigma, spacing=spacing)
        # a tiny tol makes the cropped computation exact to float precision
        fast = border_weight_map(labels, sigma=sigma, spacing=spacing, tol=1e-9)
        np.testing.assert_allclose(fast, ref, atol=1e-4)


@pytest.mark.parametrize("shape,spacing", [((41, 37), None), ((43, 31), (0.5, 1.0)),
                                           ((9, 30, 27), (2.0, 1.0, 0.6))])
def test_default_tolerance_bounds_the_error(shape, spacing):
    rng = np.random.default_rng(3)
    labels = random_instances(shape, 8, rng, max_side=4)
    sigma, w0 = 1.5, 10.0
    _d1, d2 = two_nearest_distances(labels, spacing, border_margin(sigma))
    assert np.isinf(d2).any()  # the crops really bit: some pixels saw fewer than two objects
    err = np.abs(border_weight_map(labels, w0, sigma, spacing) - brute_force(labels, w0, sigma, spacing))
    assert err.max() < 1e-3 * w0


def test_margin_bound():
    assert border_margin(5.0) == pytest.approx(5.0 * math.sqrt(2 * math.log(1000)))
    r = border_margin(2.0, 1e-4)
    assert math.exp(-r**2 / (2 * 2.0**2)) == pytest.approx(1e-4)


def test_two_nearest_distances_exact_without_bound():
    labels = np.zeros((5, 12), dtype=np.int32)
    labels[:, 0] = 1
    labels[:, 11] = 7
    d1, d2 = two_nearest_distances(labels, (1.0, 2.0))
    np.testing.assert_allclose(d1[2], [0, 2, 4, 6, 8, 10, 10, 8, 6, 4, 2, 0])
    np.testing.assert_allclose(d2[2], [22, 20, 18, 16, 14, 12, 12, 14, 16, 18, 20, 22])


@pytest.mark.parametrize("ndim,shape", [(2, (15, 21)), (3, (9, 11, 21))])
def test_spacing_scales_the_distances(ndim, shape):
    labels = two_blocks(ndim, shape)
    mid = tuple(s // 2 for s in shape[:-1])
    sigma = 5.0
    base = (1.0,) * ndim
    along = base[:-1] + (2.0,)  # the gap axis twice as long
    across = (2.0,) + base[1:]  # an axis the gap's nearest points do not move along
    for spacing, scale in ((base, 1.0), (along, 2.0), (across, 1.0)):
        w = border_weight_map(labels, sigma=sigma, spacing=spacing, class_weights="none")
        s = scale * 3.0  # d1 + d2 = 1 + 2 pixels across the gap
        assert w[mid + (9,)] == pytest.approx(1 + 10 * math.exp(-s * s / (2 * sigma**2)), rel=1e-5)
        np.testing.assert_allclose(w, brute_force(labels, sigma=sigma, spacing=spacing,
                                                  class_weights="none"), atol=1e-4)
    # the far side: 1 px to block 1 and 9 px to block 2 along the gap axis, 2 units each
    w = border_weight_map(labels, sigma=sigma, spacing=along, class_weights="none")
    assert w[mid + (2,)] == pytest.approx(1 + 10 * math.exp(-(20.0**2) / 50.0), rel=1e-6)


@pytest.mark.parametrize("shape", [(13, 17), (5, 7, 9)])
def test_class_balance(shape):
    rng = np.random.default_rng(0)
    labels = random_instances(shape, 4, rng)
    fg = labels > 0
    assert 0 < fg.sum() < fg.size
    wc = class_balance_weights(labels)
    assert wc.mean(dtype=np.float64) == pytest.approx(1.0, abs=1e-6)
    ratio = wc[~fg][0] / wc[fg][0]
    assert ratio == pytest.approx(fg.sum() / (~fg).sum(), rel=1e-5)
    assert len(np.unique(wc)) == 2
    # the full map with w0=0 is exactly w_c; with "none" it is 1
    np.testing.assert_array_equal(border_weight_map(labels, w0=0.0), wc)
    np.testing.assert_array_equal(border_weight_map(labels, w0=0.0, class_weights="none"),
                                  np.ones(shape, np.float32))


@pytest.mark.parametrize("shape", [(11, 9), (4, 7, 5)])
def test_fewer_than_two_objects_gives_class_weights_only(shape):
    empty = np.zeros(shape, dtype=np.int64)
    np.testing.assert_array_equal(border_weight_map(empty), np.ones(shape, np.float32))
    one = empty.copy()
    one[(slice(1, 3),) * len(shape)] = 5
    np.testing.assert_array_equal(border_weight_map(one), class_balance_weights(one))
    assert border_weight_map(one).std() > 0  # balance still applies
    full = np.full(shape, 3, dtype=np.uint8)
    np.testing.assert_array_equal(border_weight_map(full), np.ones(shape, np.float32))


def test_sparse_ids_match_compact_ids():
    rng = np.random.default_rng(5)
    labels = random_instances((21, 19), 6, rng)
    sparse = np.where(labels > 0, labels.astype(np.int64) * 1_000_003, 0)
    np.testing.assert_array_equal(border_weight_map(sparse, sigma=2.0),
                                  border_weight_map(labels, sigma=2.0))


@pytest.mark.parametrize("kwargs,match", [
    ({"labels": np.zeros((4, 4), np.float32)}, "integer"),
    ({"labels": np.zeros((4, 4), bool)}, "integer"),
    ({"labels": -np.ones((4, 4), np.int32)}, "non-negative"),
    ({"labels": np.zeros(4, np.int32)}, "2D"),
    ({"labels": np.zeros((4, 4), np.int32), "spacing": (1.0,)}, "one value per axis"),
    ({"labels": np.zeros((4, 4), np.int32), "spacing": (1.0, 0.0)}, "positive"),
    ({"labels": np.zeros((4, 4), np.int32), "sigma": 0.0}, "sigma"),
    ({"labels": np.zeros((4, 4), np.int32), "sigma": float("nan")}, "sigma"),
    ({"labels": np.zeros((4, 4), np.int32), "w0": -1.0}, "w0"),
    ({"labels": np.zeros((4, 4), np.int32), "class_weights": "inverse"}, "class_weights"),
    ({"labels": np.zeros((4, 4), np.int32), "tol": 0.0}, "tol"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        border_weight_map(**kwargs)


def test_instances_from_semantic_2d_connectivity():
    mask = np.array([[1, 0, 0, 2],
                     [0, 1, 0, 2],
                     [0, 0, 0, 0],
                     [3, 3, 0, 1]], dtype=np.uint8)
    four = instances_from_semantic(mask)
    assert four.dtype == np.int32 and four.max() == 5
    assert four[0, 0] != four[1, 1] and four[0, 3] == four[1, 3] and four[2].max() == 0
    eight = instances_from_semantic(mask, connectivity=2)
    assert eight.max() == 4 and eight[0, 0] == eight[1, 1]
    with pytest.raises(ValueError, match="connectivity"):
        instances_from_semantic(mask, connectivity=3)


def test_instances_from_semantic_3d_and_weights():
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch only at a corner
    assert instances_from_semantic(mask).max() == 2
    assert instances_from_semantic(mask, connectivity=2).max() == 2
    assert instances_from_semantic(mask, connectivity=3).max() == 1
    # components feed the weight map: the border term appears between the two
    w = border_weight_map(instances_from_semantic(mask), class_weights="none")
    assert w[1, 2, 2] > w[4, 5, 6] > 1.0
