"""Training patches: shapes, reproducibility, alignment, foreground oversampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from useg.patches import PatchDataset


def _volume(shape, rng, channels=2):
    images = [rng.normal(size=(channels, *shape)).astype(np.float32)]
    labels = [(rng.random(shape) > 0.7).astype(np.int64)]
    return images, labels


@pytest.mark.parametrize("shape,patch,out", [((30, 41), (16, 16), None), ((30, 41), (28, 28), (12, 12)),
                                             ((31, 17), (20, 15), (4, 7)), ((7, 9), (16, 16), None),
                                             ((5, 6), (24, 24), (8, 8)), ((9, 20, 17), (8, 8, 8), None),
                                             ((9, 20, 17), (12, 12, 12), (4, 4, 4)),
                                             ((3, 5, 4), (8, 8, 8), None)])
def test_patch_dataset_shapes_and_reproducibility(shape, patch, out):
    rng = np.random.default_rng(0)
    images, labels = _volume(shape, rng)
    ds = PatchDataset(images, labels, patch, out_size=out, length=5, seed=3,
                      weights=[np.ones(shape, np.float32)])
    item = ds[1]
    out = tuple(out or patch)
    assert item["image"].shape == (2, *patch) and item["image"].dtype == torch.float32
    assert item["label"].shape == out and item["label"].dtype == torch.int64
    assert item["weight"].shape == out and item["weight"].dtype == torch.float32
    assert torch.equal(ds[1]["image"], item["image"]) and torch.equal(ds[1]["label"], item["label"])
    again = PatchDataset(images, labels, patch, out_size=out, length=5, seed=3)
    assert torch.equal(again[1]["image"], item["image"])
    assert "weight" not in PatchDataset(images, labels, patch, out_size=out, length=5)[0]
    if all(s >= p for s, p in zip(shape, patch)):  # smaller images are always centred when not on foreground
        ds.set_epoch(1)
        assert not torch.equal(ds[1]["image"], item["image"])
        ds.set_epoch(0)
        assert not torch.equal(ds[2]["image"], item["image"])


@pytest.mark.parametrize("shape,patch,out", [((40, 50), (12, 12), (8, 8)),
                                             ((13, 16, 18), (10, 9, 8), (6, 5, 4))])
def test_patches_align_and_foreground_oversampling(shape, patch, out):
    label = np.zeros(shape, np.int64)
    label[tuple(slice(s - 6, s - 3) for s in shape)] = 1
    image = label[None].astype(np.float32) * 10  # the image equals its label
    weight = label.astype(np.float32) + 0.5
    ds = PatchDataset([image], [label], patch, out_size=out, length=20, fg_fraction=1.0, weights=[weight])
    margin = tuple(slice((p - o) // 2, (p - o) // 2 + o) for p, o in zip(patch, out))
    for i in range(20):
        item = ds[i]
        assert item["label"].sum() > 0
        np.testing.assert_array_equal(item["image"][0][margin].numpy() / 10, item["label"].numpy())
        np.testing.assert_array_equal(item["weight"].numpy(), item["label"].numpy() + 0.5)
    never = PatchDataset([image], [label], patch, out_size=out, length=30, fg_fraction=0.0)
    assert sum(int(never[i]["label"].sum() > 0) for i in range(30)) < 15


def test_rare_classes_are_centred_as_often_as_common_ones():
    label = np.zeros((60, 60), np.int64)
    label[:, 30:] = 1  # a common class
    label[5, 5] = 2  # one pixel of a rare class
    ds = PatchDataset([np.zeros((1, 60, 60), np.float32)], [label], (4, 4), length=200, fg_fraction=1.0)
    hits = sum(int((ds[i]["label"] == 2).any()) for i in range(200))
    assert 60 < hits < 140  # about half of the foreground patches


def test_augment_sees_full_patches_and_its_output_is_cropped():
    seen = []

    def augment(image, label, weight, rng):
        seen.append((image.shape, label.shape, None if weight is None else weight.shape))
        return image[:, ::-1], label[::-1], weight[::-1]

    label = np.zeros((20, 20), np.int64)
    label[:10] = 1
    ds = PatchDataset([label[None].astype(np.float32)], [label], (12, 12), out_size=(4, 4), augment=augment,
                      weights=[np.ones((20, 20), np.float32)])
    item = ds[0]
    assert seen == [((1, 12, 12), (12, 12), (12, 12))]
    np.testing.assert_array_equal(item["image"][0, 4:8, 4:8].numpy(), item["label"].numpy())


@pytest.mark.parametrize("kwargs", [{"patch_size": (8, 8), "out_size": (10, 10)}, {"patch_size": (8, 8, 8)},
                                    {"patch_size": (8, 8), "fg_fraction": 1.5},
                                    {"patch_size": (8, 8), "seed": -1}, {"patch_size": (8,)}])
def test_patch_dataset_validates_arguments(kwargs):
    with pytest.raises(ValueError):
        PatchDataset([np.zeros((1, 9, 9), np.float32)], [np.zeros((9, 9), np.int64)], **kwargs)


@pytest.mark.parametrize("axis, shape, patch, out", [(2, (15, 13, 9), (8, 8), None),
                                                     (0, (7, 17, 15), (12, 10), (4, 6)),
                                                     (1, (11, 5, 13), (16, 16), None)])
def test_slice_patches_lie_in_one_slice_centred_on_foreground_at_the_share(axis, shape, patch, out):
    index = np.indices(shape)[axis].astype(np.float32)  # each voxel holds its slice's index
    label = np.zeros(shape, np.int64)
    fg = [1, shape[axis] - 2]  # two slices hold a little foreground
    for s in fg:
        where = [slice(2, 4)] * 3
        where[axis] = slice(s, s + 1)
        label[tuple(where)] = 1
    out = tuple(out or patch)
    ds = PatchDataset([np.stack([index, -index])], [label], patch, out_size=out, length=400, fg_fraction=0.5,
                      slice_axis=axis, seed=1)
    centred = 0
    for i in range(400):
        item = ds[i]
        image, lab = item["image"].numpy(), item["label"].numpy()
        assert image.shape == (2, *patch) and lab.shape == out
        assert np.unique(image[0]).size == 1 and np.array_equal(image[1], -image[0])  # one slice, 2D
        centred += int(lab[out[0] // 2, out[1] // 2] > 0)
        if lab.any():
            assert image[0, 0, 0] in fg
    assert 0.4 < centred / 400 < 0.6  # the planned share, 0.5 (uniform patches almost never hit it)
    with pytest.raises(ValueError, match="2D patch"):
        PatchDataset([np.stack([index])], [label], (8, 8, 8), slice_axis=axis)
