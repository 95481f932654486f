"""Resampling to a spacing and back, exact target shapes, anisotropy, largest component."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from useg.resample import (
    anisotropic_axis,
    largest_component,
    new_shape,
    resample_image,
    resample_labels,
    resample_probs,
)

SHAPES = [(17, 23), (9, 13, 11)]  # odd sizes, 2D and 3D


def _smooth(rng, shape, channels=2) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 3.0, mode="wrap") * 10
                     for _ in range(channels)]).astype(np.float32)


# --- new_shape ---------------------------------------------------------------------------------


def test_new_shape_rounds_per_axis():
    assert new_shape((17, 23), (1.0, 1.0), (2.0, 0.5)) == (8, 46)  # 8.5 rounds to even
    assert new_shape((9, 13, 11), (3.0, 0.7, 0.7), (1.0, 1.0, 1.0)) == (27, 9, 8)
    assert new_shape((5, 5), (1, 1), (100, 100)) == (1, 1)  # never below one voxel
    with pytest.raises(ValueError, match="one value per axis"):
        new_shape((5, 5), (1, 1, 1), (1, 1))
    with pytest.raises(ValueError, match="positive"):
        new_shape((5, 5), (1, 1), (1, -1))
    with pytest.raises(ValueError, match="positive integers"):
        new_shape((5, 0), (1, 1), (1, 1))


def test_anisotropic_axis_follows_nnunet_rule():
    assert anisotropic_axis((5.0, 0.8, 0.8)) == 0
    assert anisotropic_axis((0.8, 0.8, 3.0)) == 2  # ratio 3.75 > 3
    assert anisotropic_axis((1.0, 2.4, 1.0)) is None  # ratio 2.4
    assert anisotropic_axis((3.0, 1.0, 1.0)) is None  # exactly 3 is not "> 3"
    assert anisotropic_axis((5.0, 5.0, 1.0)) is None  # two coarse axes: no single one
    assert anisotropic_axis((5.0, 1.0)) is None  # 2D is never split
    with pytest.raises(ValueError, match="positive"):
        anisotropic_axis(3.0)


# --- resample_image ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_equal_spacing_is_exact_identity(shape, rng):
    image = _smooth(rng, shape)
    spacing = (0.7,) * len(shape)
    out = resample_image(image, spacing, spacing)
    assert out.dtype == np.float32 and np.array_equal(out, image) and out is not image


@pytest.mark.parametrize("shape", SHAPES)
def test_there_and_back_restores_a_smooth_image(shape, rng):
    image = _smooth(rng, shape)
    s_in = (1.0,) * len(shape)
    s_mid = (0.6,) * len(shape)  # upsample: nothing is lost
    mid = resample_image(image, s_in, s_mid)
    assert mid.shape == (2, *new_shape(shape, s_in, s_mid))
    back = resample_image(mid, s_mid, s_in)
    assert back.shape == image.shape
    inner = (slice(None),) + (slice(2, -2),) * len(shape)  # edges see the replicated border
    err = np.abs(back[inner] - image[inner]).max()
    assert err < 0.05 * np.abs(image).max()


def test_anisotropic_axis_uses_nearest_neighbour(rng):
    image = _smooth(rng, (5, 12, 13), channels=1)
    out = resample_image(image, (4.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert out.shape == (1, 20, 12, 13)
    # each thick slice is copied four times, not blended with its neighbours
    np.testing.assert_array_equal(out[0], np.repeat(image[0], 4, axis=0))
    # isotropic data of the same shape does interpolate across slices
    iso = resample_image(image, (4.0, 3.0, 3.0), (1.0, 3.0, 3.0))
    assert not np.array_equal(iso[0], np.repeat(image[0], 4, axis=0))


def test_anisotropic_target_is_split_too(rng):
    image = _smooth(rng, (20, 12, 13), channels=1)
    out = resample_image(image, (1.0, 1.0, 1.0), (4.0, 1.0, 1.0))
    assert out.shape == (1, 5, 12, 13)
    np.testing.assert_array_equal(out[0], image[0, 2::4])  # nearest slices, in-plane unchanged


def test_resample_image_rejects_bad_input():
    with pytest.raises(ValueError, match="channel-first"):
        resample_image(np.zeros((4, 5)), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="order"):
        resample_image(np.zeros((1, 4, 5)), (1, 1), (2, 2), order=7)
    with pytest.raises(ValueError, match="one value per axis"):
        resample_image(np.zeros((1, 4, 5)), (1, 1, 1), (2, 2, 2))


# --- resample_labels / resample_probs ----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
def test_labels_hit_the_exact_shape_and_stay_in_the_label_set(shape, order, rng):
    labels = rng.choice(np.array([0, 2, 5], dtype=np.int16), size=shape)
    target = tuple(s * 2 - 3 for s in shape)
    out = resample_labels(labels, target, order=order)
    assert out.shape == target and out.dtype == labels.dtype
    assert set(np.unique(out)) <= {0, 2, 5}
    assert np.array_equal(resample_labels(labels, shape, order=order), labels)


def test_labels_nearest_neighbour_keeps_blocks():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    out = resample_labels(labels, (4, 6))
    np.testing.assert_array_equal(out, np.repeat(np.repeat(labels, 2, 0), 3, 1))
    with pytest.raises(ValueError, match="integer"):
        resample_labels(labels.astype(float), (4, 6))
    with pytest.raises(ValueError, match="one size per spatial axis"):
        resample_labels(labels, (4, 6, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_probs_hit_the_exact_shape_and_stay_probabilities(shape, rng):
    logits = _smooth(rng, shape, channels=3)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    target = tuple(s + 4 for s in shape)
    out = resample_probs(probs, target)
    assert out.shape == (3, *target) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)  # linear keeps the partition of unity
    half = resample_probs(probs, target, order=3, dtype=np.float16)
    assert half.dtype == np.float16 and half.min() >= 0 and half.max() <= 1
    np.testing.assert_array_equal(resample_probs(probs, shape), probs.astype(np.float32))


def test_probs_lowres_axis_and_bad_input(rng):
    probs = rng.random((2, 3, 6, 7))
    out = resample_probs(probs, (9, 6, 7), lowres_axis=0)
    np.testing.assert_array_equal(out, np.repeat(probs, 3, axis=1).astype(np.float32))
    with pytest.raises(ValueError, match="float32 or float16"):
        resample_probs(probs, (9, 6, 7), dtype=np.float64)
    with pytest.raises(ValueError, match="lowres_axis"):
        resample_probs(probs, (9, 6, 7), lowres_axis=3)
    with pytest.raises(ValueError, match="float"):
        resample_probs(probs.astype(int), (9, 6, 7))


# --- largest_component -------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_largest_component_removes_small_blobs_per_class(ndim):
    shape = (15, 17) if ndim == 2 else (9, 15, 17)
    labels = np.zeros(shape, dtype=np.uint8)
    pad = (slice(2, 7),) * (ndim - 2)
    labels[pad + (slice(1, 6), slice(1, 6))] = 1  # big blob of class 1
    labels[pad + (slice(9, 11), slice(1, 3))] = 1  # small blob of class 1
    labels[pad + (slice(1, 4), slice(9, 12))] = 2  # small blob of class 2
    labels[pad + (slice(7, 14), slice(9, 16))] = 2  # big blob of class 2
    out = largest_component(labels)
    assert out.dtype == labels.dtype and out is not labels
    assert not out[pad + (slice(9, 11), slice(1, 3))].any()
    assert not out[pad + (slice(1, 4), slice(9, 12))].any()
    assert (out[pad + (slice(1, 6), slice(1, 6))] == 1).all()
    assert (out[pad + (slice(7, 14), slice(9, 16))] == 2).all()
    # only the listed classes are cleaned
    only2 = largest_component(labels, classes=[2])
    assert (only2[pad + (slice(9, 11), slice(1, 3))] == 1).all()
    assert not only2[pad + (slice(1, 4), slice(9, 12))].any()


def test_largest_component_connectivity_and_bad_input():
    labels = np.zeros((6, 6), dtype=np.int32)
    labels[1, 1] = labels[2, 2] = labels[3, 3] = 1  # a diagonal chain
    labels[5, 0] = 1
    assert (largest_component(labels) == labels * (np.arange(6)[:, None] < 4)).all()
    assert largest_component(labels, connectivity=1).sum() == 1  # all single voxels: first kept
    with pytest.raises(ValueError, match="connectivity"):
        largest_component(labels, connectivity=3)
    with pytest.raises(ValueError, match="nonzero"):
        largest_component(labels, classes=[0])
    with pytest.raises(ValueError, match="integer"):
        largest_component(labels.astype(float))
