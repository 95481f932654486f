"""Tests for useg.sliding_window: Gaussian map, blended and streamed sliding window, on the device."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from useg.sliding_window import gaussian_weights, sliding_window, sliding_window_labels
from useg.tiling import tile_starts

# (spatial shape, tile) pairs: odd sizes, tiles larger than the image along some axes.
CASES_SW = [
    ((37, 53), (16, 24)),
    ((5, 53), (16, 8)),  # smaller than the tile on axis 0
    ((1, 7), (4, 4)),  # a single-voxel axis: edge fallback
    ((9, 20, 31), (8, 8, 12)),
    ((3, 20, 6), (8, 8, 8)),
]


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch.clone()


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


@pytest.mark.parametrize("shape,tile,overlap", [((1, 37, 53), (16, 16), 0.5),
                                                ((2, 9, 20, 31), (8, 8, 8), 0.25),
                                                ((1, 5, 7), (16, 16), 0.5), ((1, 64, 40), (16, 16), 0.0)])
def test_streamed_labels_equal_argmax_of_the_full_blend(shape, tile, overlap):
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


def test_streamed_labels_memory_is_bounded_by_a_slab(traced_peak):
    image = np.random.default_rng(0).normal(size=(1, 1024, 512)).astype(np.float32)
    fn = lambda b: b.repeat(1, 4, 1, 1)  # noqa: E731  K=4 copies of the input

    streamed = traced_peak(lambda: sliding_window_labels(fn, image, (64, 64), 4, overlap=0.5, batch_size=4))
    full = traced_peak(lambda: sliding_window(fn, image, (64, 64), 4, overlap=0.5, batch_size=4).argmax(0))
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


# ------------------------------------------------------------------------- blending on the device (h11-gpu)


def host_blend(fn, image, tile, num_classes, overlap, batch_size, align):
    """The host stitching the device accumulator replaced: every tile into one padded numpy buffer."""
    from useg.overlap_tile import _cut
    from useg.sliding_window import _window_grid

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
