from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest

from useg.augment import AugmentConfig, Augmenter, augment_sample, random_flip, random_intensity, random_rot90

OFF = AugmentConfig(flip=0.0, rot90=False, intensity=False, p_intensity=0.0)
GEOMETRY = AugmentConfig(flip=0.5, rot90=True, intensity=False)

SHAPES = [(13, 17), (9, 9), (5, 9, 9), (7, 7, 7), (5, 7, 9)]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def sample(request):
    """An image whose channels are the label (so geometry can be checked pixel by pixel)."""
    label = np.random.default_rng(0).integers(0, 4, request.param)
    image = np.stack([label, -2 * label]).astype(np.float32)
    return image, label, (label + 1).astype(np.float32)


def _check_together(i, lab, w):
    np.testing.assert_array_equal(i[0], lab)
    np.testing.assert_array_equal(i[1], -2 * lab)
    np.testing.assert_array_equal(w, lab + 1)


def _fresh(out, inputs):
    for a, b in zip(out, inputs):
        if a is None:
            continue
        assert a.flags.c_contiguous and all(s > 0 for s in a.strides)
        assert not np.shares_memory(a, b)


def test_identity_when_everything_is_off(sample):
    out = augment_sample(*sample, np.random.default_rng(1), OFF)
    for a, b in zip(out, sample):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype or a.dtype == np.float32
    _fresh(out, sample)


def test_zero_probabilities_are_identity_even_when_enabled(sample):
    cfg = AugmentConfig(flip=0.0, rot90=False, intensity=True, p_intensity=0.0)
    for a, b in zip(augment_sample(*sample, np.random.default_rng(2), cfg), sample):
        np.testing.assert_array_equal(a, b)


def test_geometry_moves_image_label_and_weight_together(sample):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out = random_rot90(*random_flip(*sample, rng), rng)
        _check_together(*out)
        assert out[0].shape == sample[0].shape and out[1].shape == sample[1].shape
        _fresh(out, sample)
        _check_together(*augment_sample(*sample, np.random.default_rng(seed), GEOMETRY))


def test_full_augmentation_keeps_labels_shapes_and_is_seeded(sample):
    image, label, weight = sample
    a = Augmenter()(image, label, weight, np.random.default_rng(5))
    b = Augmenter()(image, label, weight, np.random.default_rng(5))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert set(np.unique(a[1])) <= set(np.unique(label))
    assert a[0].shape == image.shape and a[0].dtype == np.float32
    assert a[1].shape == label.shape and a[1].dtype == label.dtype
    assert a[2].shape == weight.shape and a[2].dtype == np.float32
    _fresh(a, sample)
    outs = [Augmenter()(image, label, weight, np.random.default_rng(s))[0] for s in range(6)]
    assert any(not np.array_equal(o, image) for o in outs)
    assert any(not np.array_equal(o, outs[0]) for o in outs[1:])  # different seeds, different samples


def test_inputs_are_never_written(sample):
    copies = [a.copy() for a in sample]
    augment_sample(*sample, np.random.default_rng(0), AugmentConfig(flip=1.0, p_intensity=1.0))
    random_intensity(sample[0], np.random.default_rng(0), p=1.0)
    for a, b in zip(sample, copies):
        np.testing.assert_array_equal(a, b)


def test_flip_with_p1_mirrors_exactly_the_given_axes():
    label = np.arange(3 * 5 * 7).reshape(3, 5, 7)
    image = label[None].astype(np.float32)
    _, lab, w = random_flip(image, label, None, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(lab, label[::-1, ::-1, ::-1])
    assert w is None
    _, lab, _ = random_flip(image, label, None, np.random.default_rng(0), axes=(1,), p=1.0)
    np.testing.assert_array_equal(lab, label[:, ::-1])
    _, lab, _ = random_flip(image, label, None, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(lab, label)


def test_rot90_reaches_all_four_rotations():
    label = np.arange(25).reshape(5, 5)
    seen = set()
    for seed in range(40):
        _, lab, _ = random_rot90(label[None].astype(np.float32), label, None, np.random.default_rng(seed))
        seen.add(next(k for k in range(4) if np.array_equal(lab, np.rot90(label, k))))
    assert seen == {0, 1, 2, 3}


def test_rot90_skips_unequal_planes_and_respects_axes():
    label = np.arange(6).reshape(2, 3)
    for seed in range(5):
        _, lab, _ = random_rot90(label[None].astype(np.float32), label, None, np.random.default_rng(seed))
        np.testing.assert_array_equal(lab, label)
    # in (5, 7, 7) only the last two axes are equal; restricted to axes (0, 1) nothing may turn
    label3 = np.arange(5 * 7 * 7).reshape(5, 7, 7)
    for seed in range(5):
        _, lab, _ = random_rot90(label3[None], label3, None, np.random.default_rng(seed), axes=(0, 1))
        np.testing.assert_array_equal(lab, label3)


def test_gamma_keeps_each_channel_min_and_max():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(0, 1, (11, 13)), rng.uniform(5, 9, (11, 13))]).astype(np.float32)
    out = random_intensity(image, np.random.default_rng(3), brightness=0.0, contrast=(1.0, 1.0),
                           gamma=(0.5, 0.5), noise_std=0.0, p=1.0)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out.min(axis=(1, 2)), image.min(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.max(axis=(1, 2)), image.max(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, image)  # gamma 0.5 brightens the middle of the range
    assert (out >= image - 1e-5).all()


def test_intensity_p0_is_identity_and_p1_changes_3d():
    image = np.random.default_rng(0).normal(0, 1, (1, 5, 7, 9)).astype(np.float32)
    np.testing.assert_array_equal(random_intensity(image, np.random.default_rng(0), p=0.0), image)
    out = random_intensity(image, np.random.default_rng(0), p=1.0)
    assert out.shape == image.shape and not np.allclose(out, image)


def test_constant_image_survives_intensity():
    image = np.full((1, 6, 6), 3.0, np.float32)
    out = random_intensity(image, np.random.default_rng(0), p=1.0)
    assert np.isfinite(out).all()


def test_augmenter_pickles_and_config_is_json_able(sample):
    aug = pickle.loads(pickle.dumps(Augmenter(GEOMETRY)))
    assert aug.config == GEOMETRY
    a = aug(*sample, np.random.default_rng(4))
    b = augment_sample(*sample, np.random.default_rng(4), GEOMETRY)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert json.loads(json.dumps(dataclasses.asdict(AugmentConfig())))["gamma"] == [0.7, 1.5]


def test_bad_arguments_are_refused():
    image, label = np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image"):
        random_flip(np.zeros((1, 4, 5), np.float32), label, None, rng)
    with pytest.raises(ValueError, match="weight"):
        augment_sample(image, label, np.zeros((3, 3), np.float32), rng)
    with pytest.raises(ValueError, match="axes"):
        random_flip(image, label, None, rng, axes=(2,))
    with pytest.raises(ValueError, match="probability"):
        random_flip(image, label, None, rng, p=1.5)
    with pytest.raises(ValueError, match="contrast"):
        AugmentConfig(contrast=(1.2, 0.8))
    with pytest.raises(ValueError, match="flip"):
        AugmentConfig(flip=-0.1)


# ---- elastic deformation (U-Net paper, sec. 3.1) ----


from useg.augment import elastic_deform, elastic_field  # noqa: E402

ELASTIC_SHAPES = [(13, 17), (21, 23), (5, 7, 9), (11, 13, 15)]
ELASTIC_IDS = ["x".join(map(str, s)) for s in ELASTIC_SHAPES]


def _labelled(shape, seed=0):
    label = np.random.default_rng(seed).integers(0, 4, shape)
    return np.stack([label, -2 * label]).astype(np.float32), label, (label + 1).astype(np.float32)


@pytest.mark.parametrize("shape", ELASTIC_SHAPES, ids=ELASTIC_IDS)
def test_elastic_field_shape_corners_and_smoothness(shape):
    field = elastic_field(shape, np.random.default_rng(3), grid=3, std=10.0)
    assert field.shape == (len(shape),) + shape and field.dtype == np.float32
    coarse = np.random.default_rng(3).normal(0.0, 10.0, (len(shape),) + (3,) * len(shape))
    # the lattice corners sit on the image corners, so the field there is the drawn value
    for corner in np.ndindex(*(2,) * len(shape)):
        pix = tuple(-1 if c else 0 for c in corner)
        np.testing.assert_allclose(field[(slice(None),) + pix], coarse[(slice(None),) + pix],
                                   rtol=1e-5, atol=1e-4)
    # smooth: along each axis the per-pixel change is about a lattice step spread over its pixels
    for a in range(1, field.ndim):
        lattice_step = np.abs(np.diff(coarse, axis=a)).max()
        assert np.abs(np.diff(field, axis=a)).max() <= 2.0 * lattice_step * 2 / (shape[a - 1] - 1)


@pytest.mark.parametrize("shape", ELASTIC_SHAPES, ids=ELASTIC_IDS)
def test_elastic_std0_is_exact_identity(shape):
    sample = _labelled(shape)
    out = elastic_deform(*sample, np.random.default_rng(0), std=0.0)
    for a, b in zip(out, sample):
        np.testing.assert_array_equal(a, b)
        assert a.shape == b.shape and a.flags.c_contiguous and not np.shares_memory(a, b)
    assert not elastic_field(shape, np.random.default_rng(0), std=0.0).any()


@pytest.mark.parametrize("shape", ELASTIC_SHAPES, ids=ELASTIC_IDS)
def test_elastic_keeps_labels_shapes_dtypes_and_inputs(shape):
    sample = _labelled(shape)
    copies = [a.copy() for a in sample]
    for seed in range(3):
        image, label, weight = elastic_deform(*sample, np.random.default_rng(seed), std=4.0)
        assert image.shape == sample[0].shape and image.dtype == np.float32 and image.flags.c_contiguous
        assert label.shape == shape and label.dtype == sample[1].dtype and label.flags.c_contiguous
        assert weight.shape == shape and weight.dtype == np.float32 and weight.flags.c_contiguous
        assert set(np.unique(label)) <= set(np.unique(sample[1]))
        assert not np.array_equal(label, sample[1]) and not np.allclose(image, sample[0])
        # order 1 never leaves the input's range
        assert weight.min() >= sample[2].min() - 1e-5 and weight.max() <= sample[2].max() + 1e-5
    for a, b in zip(sample, copies):
        np.testing.assert_array_equal(a, b)
    assert elastic_deform(sample[0], sample[1], None, np.random.default_rng(0), std=4.0)[2] is None


@pytest.mark.parametrize("shape", [(31, 33), (15, 17, 19)], ids=["31x33", "15x17x19"])
def test_elastic_moves_image_label_and_weight_together(shape):
    """Ramps record where each pixel was read from: channel d of the image holds index d, the
    label encodes all indices, the weight their weighted sum; all three must agree."""
    ndim = len(shape)
    idx = np.indices(shape)
    base = np.array([100 ** (ndim - 1 - d) for d in range(ndim)]).reshape((ndim,) + (1,) * ndim)
    label = (idx * base).sum(0)
    image, weight = idx.astype(np.float32), label.astype(np.float32)
    std = 2.0
    out_i, out_l, out_w = elastic_deform(image, label, weight, np.random.default_rng(7), grid=3, std=std)
    src = elastic_field(shape, np.random.default_rng(7), grid=3, std=std) + idx  # where pixels are read
    assert np.abs(src - idx).max() > 1.0  # the test is not vacuous: pixels really moved
    decoded = np.stack([(out_l // base[d]) % 100 for d in range(ndim)])
    # a linear ramp is reproduced exactly by order 1 and, away from the mirrored borders, by order 3
    inside = np.all([(src[d] >= 4) & (src[d] <= shape[d] - 5) for d in range(ndim)], axis=0)
    assert inside.sum() > 0.05 * inside.size
    np.testing.assert_allclose(out_w[inside], (src * base).sum(0)[inside], atol=1e-2)
    for d in range(ndim):
        np.testing.assert_allclose(out_i[d][inside], src[d][inside], atol=0.05)
        assert np.abs(decoded[d][inside] - src[d][inside]).max() <= 0.5 + 1e-3  # nearest pixel


@pytest.mark.parametrize("shape", [(13, 17), (5, 7, 9)], ids=["13x17", "5x7x9"])
def test_elastic_is_seeded(shape):
    sample = _labelled(shape)
    a = elastic_deform(*sample, np.random.default_rng(11))
    b = elastic_deform(*sample, np.random.default_rng(11))
    c = elastic_deform(*sample, np.random.default_rng(12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_elastic_off_draws_nothing_from_the_generator(sample):
    """Default recipe == the same public steps chained on one generator, so p_elastic=0 adds no draw."""
    cfg = AugmentConfig(p_intensity=1.0)
    assert cfg.p_elastic == 0.0
    got = augment_sample(*sample, np.random.default_rng(9), cfg)
    rng = np.random.default_rng(9)
    i, lab, w = random_rot90(*random_flip(*sample, rng, p=cfg.flip), rng)
    want = (random_intensity(i, rng, cfg.brightness, cfg.contrast, cfg.gamma, cfg.noise_std, 1.0), lab, w)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_augment_sample_applies_elastic_first():
    sample = _labelled((21, 23))
    cfg = AugmentConfig(flip=0.0, rot90=False, intensity=False, p_elastic=1.0, elastic_std=3.0)
    got = augment_sample(*sample, np.random.default_rng(4), cfg)
    rng = np.random.default_rng(4)
    assert rng.random() < 1.0
    want = elastic_deform(*sample, rng, grid=3, std=3.0)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(got[1], sample[1])
    # with flips on, the elastic output is what gets flipped (elastic first, same draws after it)
    cfg = dataclasses.replace(cfg, flip=1.0)
    got = augment_sample(*sample, np.random.default_rng(4), cfg)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y[..., ::-1, ::-1])


def test_augment_config_round_trips_with_elastic_fields():
    cfg = AugmentConfig(p_elastic=0.3, elastic_grid=4, elastic_std=6.5)
    d = dataclasses.asdict(cfg)
    assert (d["p_elastic"], d["elastic_grid"], d["elastic_std"]) == (0.3, 4, 6.5)
    assert AugmentConfig(**d) == cfg
    assert AugmentConfig(**json.loads(json.dumps(d))).elastic_std == 6.5
    default = AugmentConfig()
    assert (default.p_elastic, default.elastic_grid, default.elastic_std) == (0.0, 3, 10.0)


def test_elastic_bad_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="p_elastic"):
        AugmentConfig(p_elastic=1.5)
    with pytest.raises(ValueError, match="elastic_grid"):
        AugmentConfig(elastic_grid=1)
    with pytest.raises(ValueError, match="elastic_std"):
        AugmentConfig(elastic_std=-1.0)
    with pytest.raises(ValueError, match="grid"):
        elastic_field((8, 8), rng, grid=1)
    with pytest.raises(ValueError, match="std"):
        elastic_field((8, 8), rng, std=-2.0)
    with pytest.raises(ValueError, match="shape"):
        elastic_field((8,), rng)
    with pytest.raises(ValueError, match="image"):
        elastic_deform(np.zeros((1, 4, 5), np.float32), np.zeros((4, 4), np.int64), None, rng)
