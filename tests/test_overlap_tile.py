"""Tests for useg.overlap_tile: the U-Net paper's overlap-tile with mirrored borders, and its labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from useg.overlap_tile import overlap_tile, overlap_tile_labels
from useg.tiling import mirror_indices

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


def test_overlap_tile_labels_memory_is_labels_plus_a_batch(traced_peak):
    image = np.random.default_rng(0).normal(size=(1, 512, 384)).astype(np.float32)
    in_tile, out_tile, k = (72, 72), (64, 64), 8
    def fn(batch):  # K copies of the centre
        return centre_crop(in_tile, out_tile)(batch).repeat(1, k, 1, 1)

    streamed = traced_peak(lambda: overlap_tile_labels(fn, image, in_tile, out_tile, k, batch_size=2))
    buffer = k * 512 * 384 * 4  # the (K, H, W) float32 result of overlap_tile
    full = traced_peak(lambda: overlap_tile(fn, image, in_tile, out_tile, k, batch_size=2).argmax(0))
    assert full > buffer
    assert streamed < buffer / 3, (streamed, buffer)
