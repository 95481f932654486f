"""Tests for useg.tiling: tile placement, Gaussian map, sliding window and overlap-tile."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from useg.tiling import (
    gaussian_weights,
    mirror_indices,
    overlap_tile,
    overlap_tile_labels,
    sliding_window,
    sliding_window_labels,
    tile_starts,
)

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


# Outputs of tile_starts(size, tile, step) recorded before ``align`` existed: align=1 must keep them.
OLD_STARTS = [
    ((100, 7, 3), list(range(0, 94, 3))),
    ((37, 16, 8), [0, 7, 14, 21]),
    ((53, 24, 12), [0, 10, 19, 29]),
    ((97, 48, 48), [0, 25, 49]),
    ((200, 64, 32), [0, 27, 54, 82, 109, 136]),
    ((31, 12, 9), [0, 6, 13, 19]),
    ((130, 48, 24), [0, 21, 41, 62, 82]),
    ((1000, 48, 24), [0, 24, 48, 71, 95, 119, 143, 167, 190, 214, 238, 262, 286, 309, 333, 357, 381, 405,
                      428, 452, 476, 500, 524, 547, 571, 595, 619, 643, 666, 690, 714, 738, 762, 785, 809,
                      833, 857, 881, 904, 928, 952]),
]


@pytest.mark.parametrize("args,expected", OLD_STARTS)
def test_tile_starts_align_1_is_the_old_even_spread(args, expected):
    assert tile_starts(*args) == expected
    assert tile_starts(*args, align=1) == expected


@pytest.mark.parametrize("align", [2, 3, 4, 8, 16])
def test_tile_starts_aligned_properties(align):
    for size in range(1, 90, 3):
        for tile in range(align, 40, 5):
            for step in sorted({1, align, max(1, tile // 2), max(1, (3 * tile) // 4), tile}):
                starts = tile_starts(size, tile, step, align)
                assert starts[0] == 0 and starts[-1] == max(0, size - tile)
                assert all(s % align == 0 for s in starts[:-1]), (size, tile, step, starts)
                gaps = np.diff(starts)
                # step < align cannot be met by aligned starts: the densest aligned spacing is used
                assert np.all(gaps >= 1) and np.all(gaps <= max(step, align)), (size, tile, step, starts)
                covered = np.zeros(size, bool)
                for s in starts:
                    covered[s : s + tile] = True
                assert covered.all()
                if step >= align:  # no more windows than the aligned spacing requires
                    assert len(starts) <= len(tile_starts(size, tile, step // align * align)) + 1


@pytest.mark.parametrize(
    "args,expected",
    [
        ((130, 48, 24, 16), [0, 16, 32, 48, 64, 82]),  # step 24 -> aligned gaps of 16
        ((200, 64, 32, 16), [0, 32, 64, 80, 112, 136]),
        ((97, 48, 48, 16), [0, 32, 49]),
        ((60, 16, 8, 4), [0, 8, 16, 20, 28, 36, 44]),  # as many windows as unaligned
        ((100, 64, 6, 16), [0, 16, 32, 36]),  # step < align: gaps of align
        ((40, 64, 32, 16), [0]),  # tile >= size
        ((40, 8, 8, 8), [0, 8, 16, 24, 32]),  # the flush start happens to be aligned
    ],
)
def test_tile_starts_aligned_examples(args, expected):
    assert tile_starts(*args[:3], align=args[3]) == expected


@pytest.mark.parametrize("kwargs", [{"align": 0}, {"align": -4}, {"align": 2.5}, {"align": 32}])
def test_tile_starts_rejects_bad_align(kwargs):
    with pytest.raises(ValueError):
        tile_starts(100, 16, 8, **kwargs)  # align 32 > tile 16 would leave holes


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


@pytest.mark.parametrize("shape,tile,overlap", [((1, 37, 53), (16, 16), 0.5),
                                                ((2, 9, 20, 31), (8, 8, 8), 0.25),
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


# ----------------------------------------------------------------------------- aligned sliding window


def pool_net(factor: int):
    """Max-pool by ``factor`` then nearest upsampling: exact only on a grid aligned to ``factor``."""

    def fn(batch: torch.Tensor) -> torch.Tensor:
        pool = torch.nn.functional.max_pool2d if batch.dim() == 4 else torch.nn.functional.max_pool3d
        return torch.nn.functional.interpolate(pool(batch, factor), scale_factor=factor, mode="nearest")

    return fn


# (shape, tile, overlap): sizes are multiples of 4 and the flush last starts are aligned too, while the
# unaligned even spread is not (e.g. 60 px, tile 16, step 8: 0, 7, 15, ...)
CASES_ALIGN = [((60, 28), (16, 8), 0.5), ((20, 28, 12), (8, 8, 8), 0.25)]


@pytest.mark.parametrize("shape,tile,overlap", CASES_ALIGN)
def test_sliding_window_aligned_tiles_agree_with_whole_image(rng, shape, tile, overlap):
    fn = pool_net(4)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    with torch.no_grad():
        whole = fn(torch.from_numpy(image)[None])[0].numpy()
    aligned = sliding_window(fn, image, tile, 2, overlap=overlap, batch_size=4, align=4)
    np.testing.assert_allclose(aligned, whole, atol=1e-5)
    labels = sliding_window_labels(fn, image, tile, 2, overlap=overlap, batch_size=4, align=4)
    np.testing.assert_array_equal(labels, aligned.argmax(0))
    # align=1: the pooling grid moves
    plain = sliding_window(fn, image, tile, 2, overlap=overlap, batch_size=4)
    assert not np.allclose(plain, whole, atol=1e-3)


@pytest.mark.parametrize("shape,tile", CASES_SW)
def test_sliding_window_aligned_identity_and_labels(rng, shape, tile):
    """Any size, aligned or not at the flush end, and images smaller than the tile still work."""
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    out = sliding_window(identity, image, tile, 2, overlap=0.5, batch_size=3, align=4)
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-6)
    labels = sliding_window_labels(identity, image, tile, 2, overlap=0.5, batch_size=3, align=4)
    np.testing.assert_array_equal(labels, out.argmax(0))


def test_sliding_window_rejects_bad_align():
    with pytest.raises(ValueError):
        sliding_window(identity, np.zeros((2, 40, 40), np.float32), (8, 8), 2, align=0)
    with pytest.raises(ValueError):
        sliding_window_labels(identity, np.zeros((2, 40, 40), np.float32), (8, 8), 2, align=16)  # > tile


# ----------------------------------------------------------------------------- overlap_tile_labels


@pytest.mark.parametrize(
    "shape,in_tile,out_tile",
    CASES_OT + [((41, 23), (16, 16), (10, 10)), ((13, 11, 17), (10, 9, 8), (6, 5, 4))],
)
def test_overlap_tile_labels_equal_argmax_of_overlap_tile(shape, in_tile, out_tile):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    proj = torch.from_numpy(rng.normal(size=(5, 2)).astype(np.float32))
    crop = centre_crop(in_tile, out_tile)

    def fn(batch):  # a fixed random linear map of the centre plus a tile-wide term, so tiles differ
        scores = torch.einsum("kc,bc...->bk...", proj, crop(batch))
        return scores + batch.mean(dim=tuple(range(2, batch.dim())), keepdim=True)[:, :1]

    full = overlap_tile(fn, image, in_tile, out_tile, 5, batch_size=3)
    calls = []
    labels = overlap_tile_labels(fn, image, in_tile, out_tile, 5, batch_size=3,
                                 progress=lambda d, t: calls.append((d, t)))
    assert labels.shape == tuple(shape) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, full.argmax(0))
    assert calls[-1][0] == calls[-1][1]


def test_overlap_tile_labels_valid_unet_and_many_classes():
    from useg.model import UNet, output_size

    torch.manual_seed(0)
    net = UNet(1, 3, dims=2, width=2, depth=1, padding="valid").eval()
    in_tile = (36, 36)
    out_tile = output_size(in_tile, 1, "valid")  # (20, 20): 2 x 2 tiles, the last flush ones overlapping
    image = np.random.default_rng(2).normal(size=(1, 37, 29)).astype(np.float32)
    np.testing.assert_array_equal(overlap_tile_labels(net, image, in_tile, out_tile, 3, batch_size=4),
                                  overlap_tile(net, image, in_tile, out_tile, 3, batch_size=4).argmax(0))
    # more than 256 classes: int32 labels
    def many(batch):  # class c scores c * a positive input: the last class always wins
        return centre_crop(in_tile, out_tile)(batch).repeat(1, 300, 1, 1) * torch.arange(300.0)[:, None, None]

    labels = overlap_tile_labels(many, np.abs(image) + 1, in_tile, out_tile, 300)
    assert labels.dtype == np.int32 and (labels == 299).all()


def test_overlap_tile_labels_rejects_bad_arguments():
    with pytest.raises(ValueError):  # eagerly, before any tile is predicted
        overlap_tile_labels(identity, np.zeros((1, 20, 20), np.float32), (11, 10), (8, 10), 1)


def test_overlap_tile_labels_memory_is_labels_plus_a_batch():
    import tracemalloc

    image = np.random.default_rng(0).normal(size=(1, 512, 384)).astype(np.float32)
    in_tile, out_tile, k = (72, 72), (64, 64), 8
    def fn(batch):  # K copies of the centre
        return centre_crop(in_tile, out_tile)(batch).repeat(1, k, 1, 1)

    def peak(run):
        tracemalloc.start()
        run()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    streamed = peak(lambda: overlap_tile_labels(fn, image, in_tile, out_tile, k, batch_size=2))
    buffer = k * 512 * 384 * 4  # the (K, H, W) float32 result of overlap_tile
    full = peak(lambda: overlap_tile(fn, image, in_tile, out_tile, k, batch_size=2).argmax(0))
    assert full > buffer
    assert streamed < buffer / 3, (streamed, buffer)


# ------------------------------------------------------------------------- blending on the device (h11-gpu)


def host_blend(fn, image, tile, num_classes, overlap, batch_size, align):
    """The host stitching the device accumulator replaced: every tile into one padded numpy buffer."""
    from useg.tiling import _cut, _window_grid

    spatial, tile, padded, before, grid, weights = _window_grid(image, tile, num_classes, overlap, batch_size,
                                                                align=align)
    acc = np.zeros((num_classes, *padded), np.float32)
    wsum = np.zeros(padded, np.float32)
    for start in itertools.product(*grid):
        window = [s - b for s, b in zip(start, before)]
        pred = fn(torch.from_numpy(_cut(image, window, tile)[None]))[0].numpy()
        region = tuple(slice(s, s + t) for s, t in zip(start, tile))
        acc[(slice(None), *region)] += pred * weights
        wsum[region] += weights
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return (acc / wsum)[(slice(None), *crop)]


def mixing_net(channels: int, classes: int, seed: int = 0):
    """A position-dependent stand-in network: a 1x1 mix plus a tile-wide mean, then a softmax."""
    proj = torch.from_numpy(np.random.default_rng(seed).normal(size=(classes, channels)).astype(np.float32))

    def fn(batch):
        scores = torch.einsum("kc,bc...->bk...", proj, batch)
        return (scores + scores.mean(dim=tuple(range(2, scores.dim())), keepdim=True)).softmax(1)

    return fn


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shape,tile,overlap,align,batch", [
    ((2, 37, 53), (16, 24), 0.5, 1, 3),
    ((1, 5, 53), (16, 8), 0.5, 1, 2),  # smaller than the tile on axis 0
    ((1, 1, 7), (4, 4), 0.25, 1, 1),  # a single-voxel axis
    ((2, 45, 31), (16, 16), 0.5, 8, 4),  # aligned starts, unaligned flush last one
    ((1, 9, 20, 31), (8, 8, 12), 0.5, 1, 3),
    ((2, 3, 21, 17), (8, 8, 8), 0.25, 1, 5),
    ((1, 19, 23, 13), (8, 8, 8), 0.5, 4, 2),
])
def test_device_blend_equals_the_host_stitching(shape, tile, overlap, align, batch):
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    fn = mixing_net(shape[0], 3)
    ref = host_blend(fn, image, tile, 3, overlap, batch, align)
    probs = sliding_window(fn, image, tile, 3, overlap=overlap, batch_size=batch, align=align)
    np.testing.assert_allclose(probs, ref, rtol=1e-6, atol=1e-7)
    labels = sliding_window_labels(fn, image, tile, 3, overlap=overlap, batch_size=batch, align=align)
    np.testing.assert_array_equal(labels, ref.argmax(0))


@pytest.mark.usefixtures("one_thread")
@settings(max_examples=40, deadline=None)
@given(data=st.data(), dims=st.sampled_from([2, 3]))
def test_identity_model_returns_the_image(data, dims):
    """Property: blending an identity network's tiles gives the image back, whatever the layout."""
    shape = tuple(data.draw(st.integers(1, 29 if dims == 2 else 13), label="size") for _ in range(dims))
    tile = tuple(data.draw(st.integers(1, 12 if dims == 2 else 6), label="tile") for _ in range(dims))
    overlap = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]), label="overlap")
    align = data.draw(st.sampled_from([1, 2, 4]), label="align")
    align = min(align, *tile)
    batch = data.draw(st.integers(1, 5), label="batch")
    image = np.random.default_rng(sum(shape)).normal(size=(2, *shape)).astype(np.float32)
    out = sliding_window(identity, image, tile, 2, overlap=overlap, batch_size=batch, align=align)
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-6)
    labels = sliding_window_labels(identity, image, tile, 2, overlap=overlap, batch_size=batch, align=align)
    np.testing.assert_array_equal(labels, image.argmax(0))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [">f4", np.float64, np.int16])
def test_device_blend_takes_any_numeric_image_read_only(dtype, rng):
    image = (rng.normal(size=(2, 23, 19)) * 50).astype(dtype)
    image.flags.writeable = False  # a memory-mapped image: read, never written
    out = sliding_window(identity, image, (8, 8), 2, overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, image.astype(np.float32), rtol=1e-5, atol=1e-4)


def test_device_blend_hands_fn_batches_on_the_device_with_every_thread(rng):
    seen = []
    threads = torch.get_num_threads()

    def fn(batch):
        seen.append((batch.device.type, batch.dtype, batch.is_contiguous(), torch.get_num_threads()))
        return batch.numpy()  # a backend may answer in numpy

    image = rng.normal(size=(1, 30, 30)).astype(np.float32)
    out = sliding_window(fn, image, (16, 16), 1, overlap=0.5, batch_size=2, device="cpu")
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-6)
    assert set(seen) == {("cpu", torch.float32, True, threads)}  # the stitching alone runs on one thread

    def broken(batch):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        sliding_window_labels(broken, image, (16, 16), 1)
    assert torch.get_num_threads() == threads
