"""Tests for useg.tiling: tile placement, Gaussian map, sliding window and overlap-tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from useg.tiling import gaussian_weights, mirror_indices, overlap_tile, sliding_window, tile_starts

# (spatial shape, tile) pairs: odd sizes, tiles larger than the image along some axes.
CASES_SW = [
    ((37, 53), (16, 24)),
    ((5, 53), (16, 8)),  # smaller than the tile on axis 0
    ((1, 7), (4, 4)),  # a single-voxel axis: edge fallback
    ((9, 20, 31), (8, 8, 12)),
    ((3, 20, 6), (8, 8, 8)),
]
# (spatial shape, in_tile, out_tile)
CASES_OT = [
    ((37, 53), (12, 14), (10, 12)),
    ((5, 3), (12, 14), (10, 12)),  # image smaller than one output tile, margin > image on axis 1
    ((9, 20, 31), (8, 10, 12), (6, 8, 10)),
    ((2, 3, 4), (7, 7, 7), (5, 5, 5)),
]


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch.clone()


def centre_crop(in_tile, out_tile):
    m = [(i - o) // 2 for i, o in zip(in_tile, out_tile)]

    def fn(batch: torch.Tensor) -> torch.Tensor:
        return batch[(slice(None), slice(None), *(slice(a, a + o) for a, o in zip(m, out_tile)))].clone()

    return fn


# ----------------------------------------------------------------------------- tile_starts


@pytest.mark.parametrize(
    "size,tile,step,expected",
    [
        (10, 10, 5, [0]),
        (7, 10, 5, [0]),
        (1, 1, 1, [0]),
        (11, 10, 5, [0, 1]),
        (20, 10, 5, [0, 5, 10]),
        (20, 10, 10, [0, 10]),
        (21, 10, 10, [0, 6, 11]),
        (5, 1, 1, [0, 1, 2, 3, 4]),
        (100, 7, 3, None),
    ],
)
def test_tile_starts(size, tile, step, expected):
    starts = tile_starts(size, tile, step)
    if expected is not None:
        assert starts == expected
    assert starts[0] == 0
    assert starts[-1] == max(0, size - tile)
    gaps = np.diff(starts)
    assert np.all(gaps >= 1) and np.all(gaps <= step)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


@pytest.mark.parametrize("args", [(0, 4, 2), (10, 0, 2), (10, 4, 0), (10, 4.5, 2), (10, 4, 5)])
def test_tile_starts_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        tile_starts(*args)


# ----------------------------------------------------------------------------- gaussian_weights


@pytest.mark.parametrize("tile", [(16, 24), (7, 9), (5, 6, 9), (1, 4)])
def test_gaussian_weights(tile):
    w = gaussian_weights(tile)
    assert w.shape == tile and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    for axis in range(len(tile)):  # symmetric, so mirroring TTA sees the same map
        np.testing.assert_allclose(w, np.flip(w, axis), rtol=1e-6)
    centre = tuple(t // 2 for t in tile)
    assert w[centre] > w[(0,) * len(tile)] or min(tile) == 1


def test_gaussian_weights_no_zeros_when_underflowing():
    w = gaussian_weights((64, 64), sigma_scale=0.01)  # corners underflow to 0 in float32
    assert w.min() > 0
    assert w.min() == np.unique(w)[0] and (w == w.min()).sum() > 1


# ----------------------------------------------------------------------------- mirror_indices


@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("pad", [1, 4, 11])
def test_mirror_indices_match_numpy_reflect(size, pad):
    x = np.arange(size)
    expected = np.pad(x, pad, mode="reflect")
    np.testing.assert_array_equal(x[mirror_indices(-pad, size + 2 * pad, size)], expected)


def test_mirror_indices_single_voxel_is_edge():
    np.testing.assert_array_equal(mirror_indices(-3, 7, 1), np.zeros(7))


# ----------------------------------------------------------------------------- sliding_window


@pytest.mark.parametrize("shape,tile", CASES_SW)
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9])
def test_sliding_window_identity(rng, shape, tile, overlap):
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    out = sliding_window(identity, image, tile, num_classes=2, overlap=overlap, batch_size=3)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,tile", CASES_SW)
def test_sliding_window_constant_per_tile_stays_in_range(rng, shape, tile):
    values = iter(rng.uniform(2.0, 5.0, size=10_000).tolist())
    seen: list[float] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        out = torch.empty(batch.shape[0], 1, *batch.shape[2:])
        for i in range(batch.shape[0]):
            seen.append(next(values))
            out[i] = seen[-1]
        return out

    image = np.zeros((1, *shape), np.float32)
    out = sliding_window(fn, image, tile, num_classes=1, overlap=0.5, batch_size=2)
    assert out.shape == (1, *shape)
    assert out.min() >= min(seen) - 1e-5 and out.max() <= max(seen) + 1e-5
    if len(seen) > 1:  # a blend, not just one tile's value
        assert len(np.unique(out.round(4))) > 1


@pytest.mark.parametrize("shape,tile", [((37, 53), (16, 24)), ((9, 20, 31), (8, 8, 12)), ((5, 3), (8, 8))])
def test_sliding_window_pointwise_net_equals_whole_image(rng, shape, tile):
    conv = (nn.Conv2d if len(shape) == 2 else nn.Conv3d)(3, 4, kernel_size=1)
    image = rng.standard_normal((3, *shape)).astype(np.float32)
    with torch.no_grad():
        whole = conv(torch.from_numpy(image)[None])[0].numpy()
    out = sliding_window(conv, image, tile, num_classes=4, overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, whole, atol=1e-5)


def test_sliding_window_same_conv_matches_away_from_tile_borders(rng):
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    image = rng.standard_normal((2, 30, 30)).astype(np.float32)
    with torch.no_grad():
        whole = conv(torch.from_numpy(image)[None])[0].numpy()
    out = sliding_window(conv, image, (12, 12), num_classes=3, overlap=0.0)
    # Tiles start at 0, 9, 18: a pixel on no tile's border sees its true 3x3 context in every tile.
    starts = tile_starts(30, 12, 12)
    border = np.zeros(30, bool)
    for s in starts:
        border[[s, s + 11]] = True
    inner = ~border
    inner[[0, 29]] = True  # image borders are zero-padded in the whole-image forward too
    mask = np.outer(inner, inner)
    np.testing.assert_allclose(out[:, mask], whole[:, mask], atol=1e-5)
    assert not np.allclose(out, whole, atol=1e-5)  # the tile borders do differ


def test_sliding_window_progress_device_and_batches(rng):
    calls: list[tuple[int, int]] = []
    sizes: list[int] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.float32 and batch.device.type == "cpu"
        sizes.append(batch.shape[0])
        return batch.double()  # any float dtype comes back as float32

    image = rng.standard_normal((1, 20, 20)).astype(np.float64)
    out = sliding_window(fn, image, (8, 8), 1, overlap=0.5, batch_size=4, device=torch.device("cpu"),
                         progress=lambda d, t: calls.append((d, t)))
    assert out.dtype == np.float32
    n = len(tile_starts(20, 8, 4)) ** 2
    assert sum(sizes) == n and max(sizes) == 4
    assert calls[-1] == (n, n) and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile": (8,)},  # wrong number of axes
        {"tile": (8, 0)},
        {"overlap": 1.0},
        {"overlap": -0.1},
        {"num_classes": 0},
        {"batch_size": 0},
        {"num_classes": 3},  # fn returns 2 channels
    ],
)
def test_sliding_window_rejects_bad_arguments(kwargs):
    args = {"tile": (8, 8), "num_classes": 2, "overlap": 0.5, "batch_size": 1} | kwargs
    with pytest.raises(ValueError):
        sliding_window(identity, np.zeros((2, 10, 10), np.float32), **args)


def test_sliding_window_rejects_non_array():
    with pytest.raises(ValueError):
        sliding_window(identity, [[1.0, 2.0]], (1,), 1)


# ----------------------------------------------------------------------------- overlap_tile


@pytest.mark.parametrize("shape,in_tile,out_tile", CASES_OT)
def test_overlap_tile_identity_with_centre_crop(rng, shape, in_tile, out_tile):
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    out = overlap_tile(centre_crop(in_tile, out_tile), image, in_tile, out_tile, num_classes=2, batch_size=3)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("shape,in_tile,out_tile", CASES_OT)
def test_overlap_tile_sees_mirrored_context(rng, shape, in_tile, out_tile):
    """fn = the input's top-left corner: the first output tile is the mirrored image, shifted."""
    margin = [(i - o) // 2 for i, o in zip(in_tile, out_tile)]
    image = rng.standard_normal((1, *shape)).astype(np.float32)

    def corner(batch: torch.Tensor) -> torch.Tensor:
        return batch[(slice(None), slice(None), *(slice(0, o) for o in out_tile))].clone()

    out = overlap_tile(corner, image, in_tile, out_tile, num_classes=1)
    keep = [min(o, s) for o, s in zip(out_tile, shape)]
    idx = [mirror_indices(-m, k, s) for m, k, s in zip(margin, keep, shape)]
    expected = image[0][np.ix_(*idx)]
    np.testing.assert_array_equal(out[(0, *(slice(0, k) for k in keep))], expected)
    padded = np.pad(image[0], [(m, m) for m in margin], mode="reflect")  # numpy agrees
    np.testing.assert_array_equal(expected, padded[tuple(slice(0, k) for k in keep)])


@pytest.mark.parametrize(
    "shape,in_tile,out_tile", [((37, 53), (12, 14), (10, 12)), ((9, 20, 31), (8, 10, 12), (6, 8, 10))]
)
def test_overlap_tile_valid_conv_equals_mirror_padded_forward(rng, shape, in_tile, out_tile):
    conv = (nn.Conv2d if len(shape) == 2 else nn.Conv3d)(2, 3, kernel_size=3, padding=0)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    padded = np.pad(image, [(0, 0)] + [(1, 1)] * len(shape), mode="reflect")
    with torch.no_grad():
        whole = conv(torch.from_numpy(padded)[None])[0].numpy()
    out = overlap_tile(conv, image, in_tile, out_tile, num_classes=3, batch_size=2)
    assert out.shape == (3, *shape)
    np.testing.assert_allclose(out, whole, atol=1e-5)


def test_overlap_tile_progress_counts_tiles():
    calls = []
    image = np.zeros((1, 25, 9), np.float32)
    overlap_tile(centre_crop((14, 14), (10, 10)), image, (14, 14), (10, 10), 1, batch_size=2,
                 progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]  # 3 x 1 output tiles, batches of 2


@pytest.mark.parametrize(
    "in_tile,out_tile,num_classes",
    [((10, 10), (12, 10), 1), ((11, 10), (8, 10), 1), ((10,), (8,), 1), ((10, 10), (8, 8), 2)],
)
def test_overlap_tile_rejects_bad_arguments(in_tile, out_tile, num_classes):
    with pytest.raises(ValueError):
        overlap_tile(centre_crop(in_tile, out_tile), np.zeros((1, 20, 20), np.float32), in_tile, out_tile,
                     num_classes)


@pytest.mark.parametrize("shape,tile,overlap", [((1, 37, 53), (16, 16), 0.5), ((2, 9, 20, 31), (8, 8, 8), 0.25),
                                                ((1, 5, 7), (16, 16), 0.5), ((1, 64, 40), (16, 16), 0.0)])
def test_streamed_labels_equal_argmax_of_the_full_blend(shape, tile, overlap):
    from useg.tiling import sliding_window_labels

    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    proj = torch.from_numpy(rng.normal(size=(3, shape[0])).astype(np.float32))

    def fn(batch):  # a position-independent stand-in network: K=3 scores per voxel plus a tile-wide mean
        scores = torch.einsum("kc,bc...->bk...", proj, batch)
        return scores + scores.mean(dim=tuple(range(2, scores.dim())), keepdim=True)

    full = sliding_window(fn, image, tile, 3, overlap=overlap, batch_size=3)
    calls = []
    labels = sliding_window_labels(fn, image, tile, 3, overlap=overlap, batch_size=3,
                                   progress=lambda d, t: calls.append((d, t)))
    assert labels.shape == shape[1:] and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, full.argmax(0))
    assert calls[-1][0] == calls[-1][1]


def test_streamed_labels_memory_is_bounded_by_a_slab():
    import tracemalloc

    from useg.tiling import sliding_window_labels

    image = np.random.default_rng(0).normal(size=(1, 1024, 512)).astype(np.float32)
    fn = lambda b: b.repeat(1, 4, 1, 1)  # noqa: E731  K=4 copies of the input

    def peak(run):
        tracemalloc.start()
        run()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    streamed = peak(lambda: sliding_window_labels(fn, image, (64, 64), 4, overlap=0.5, batch_size=4))
    full = peak(lambda: sliding_window(fn, image, (64, 64), 4, overlap=0.5, batch_size=4).argmax(0))
    assert full > 4 * 1024 * 512 * 4  # the full path holds at least a (K, H, W) float32 buffer
    assert streamed < full / 4, (streamed, full)
