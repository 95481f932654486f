"""Test-time augmentation: the symmetry groups, averaging over them, and the Segmenter with TTA on."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from useg.checkpoint import save_model
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import Segmenter
from useg.spec import Overrides
from useg.tta import output_activation, symmetries, tta_average


def _run(tmp_path):
    plan = make_plan(LabelMap((0, 255), "grey"), 1, [(40, 40)],
                     overrides=Overrides(model={"width": 4, "depth": 2, "padding": "same"}))
    plan.save(tmp_path / "plan.json")
    model = UNet.from_config(plan.model)
    save_model(model, tmp_path / "model.safetensors")
    return plan, model


def _apply(transform, x):
    """A symmetry of :func:`symmetries` applied forward: transpose first, then flip."""
    transpose, axes = transform
    x = x.transpose(-1, -2) if transpose else x
    return x.flip(axes) if axes else x


def test_symmetries_are_the_identity_without_tta_and_the_groups_with_it():
    assert symmetries((2, 1, 8, 8), tta=False, rotate=True) == [(False, ())]
    assert symmetries((2, 1, 8, 8), tta=True)[0] == (False, ())  # identity first
    assert len(symmetries((2, 1, 8, 8), tta=True)) == 4
    assert len(symmetries((2, 1, 4, 8, 8), tta=True)) == 8
    assert len(symmetries((2, 1, 4, 8, 8), tta=True, rotate=True)) == 8  # no transposes in 3D
    assert len(symmetries((2, 1, 8, 8), tta=True, rotate=True)) == 8
    assert len(symmetries((2, 1, 8, 6), tta=True, rotate=True)) == 4  # a non-square tile has no rotations


def test_without_tta_the_average_is_one_call_of_the_function():
    calls = []

    def probs_of(x):
        calls.append(x.shape)
        return x * 2

    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(tta_average(probs_of, x, tta=False), x * 2) and len(calls) == 1


shapes = st.sampled_from([(1, 2, 6, 6), (2, 1, 4, 6), (1, 1, 3, 4, 4), (1, 2, 2, 3, 5)])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rotate=st.booleans(), seed=st.integers(0, 2**16))
def test_averaging_an_equivariant_function_over_its_group_returns_the_function(shape, rotate, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, shape[1], generator=gen)

    def pointwise(x):  # a 1x1 convolution and a softmax: equivariant under every flip and transpose
        return torch.softmax(torch.einsum("kc,bc...->bk...", w, x), dim=1)

    x = torch.randn(*shape, generator=gen)
    np.testing.assert_allclose(tta_average(pointwise, x, tta=True, rotate=rotate), pointwise(x), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rotate=st.booleans(), seed=st.integers(0, 2**16))
def test_the_average_of_any_function_is_equivariant_under_the_group(shape, rotate, seed):
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.rand(shape[2:], generator=gen)  # position dependent: no symmetry of its own

    def biased(x):
        return torch.sigmoid(x * ramp + ramp.roll(1, -1))

    x = torch.randn(*shape, generator=gen)
    assert not torch.allclose(biased(x.flip(-1)), biased(x).flip(-1), atol=1e-4)
    averaged = tta_average(biased, x, tta=True, rotate=rotate)
    for t in symmetries(shape, tta=True, rotate=rotate):
        np.testing.assert_allclose(tta_average(biased, _apply(t, x), tta=True, rotate=rotate),
                                   _apply(t, averaged), atol=1e-6)


def test_output_activation_is_a_softmax_over_classes_or_a_sigmoid_per_region():
    logits = torch.randn(2, 3, 4, 4)
    np.testing.assert_allclose(output_activation(False)(logits).sum(1), 1.0, atol=1e-6)
    assert torch.equal(output_activation(True)(logits), torch.sigmoid(logits))


def test_mirroring_tta_makes_the_prediction_flip_equivariant(tmp_path):
    import dataclasses

    plan, _ = _run(tmp_path)
    seg = Segmenter.load(tmp_path, precision="fp32")
    x = np.random.default_rng(2).normal(size=(1, 32, 32)).astype(np.float32)  # one tile

    def flip_gap():
        a = seg.predict_proba(np.flip(x, 2).copy())
        b = np.flip(seg.predict_proba(x), 2)
        return float(np.abs(a - b).max())

    assert flip_gap() > 1e-4  # a random network is not mirror-symmetric by itself
    seg.plan = dataclasses.replace(seg.plan, infer=dataclasses.replace(seg.plan.infer, tta=True))
    assert flip_gap() < 1e-5
    np.testing.assert_allclose(seg.predict_proba(x).sum(0), 1.0, atol=1e-5)
    assert np.array_equal(seg.predict(x), seg.predict_proba(x).argmax(0))


def test_rotation_tta_averages_all_eight_symmetries_of_a_square_tile(tmp_path):
    import dataclasses

    _run(tmp_path)
    seg = Segmenter.load(tmp_path, precision="fp32")
    x = np.random.default_rng(3).normal(size=(1, 32, 32)).astype(np.float32)

    def transpose_gap():
        a = seg.predict_proba(np.swapaxes(x, 1, 2).copy())
        return float(np.abs(a - np.swapaxes(seg.predict_proba(x), 1, 2)).max())

    seg.plan = dataclasses.replace(seg.plan, infer=dataclasses.replace(seg.plan.infer, tta=True))
    assert transpose_gap() > 1e-4  # flips alone are not transpose-equivariant
    seg.plan = dataclasses.replace(seg.plan,
                                   infer=dataclasses.replace(seg.plan.infer, tta=True, tta_rotate=True))
    assert len(symmetries((1, 1, 32, 32), tta=True, rotate=True)) == 8
    assert len(symmetries((1, 1, 32, 16), tta=True, rotate=True)) == 4
    assert transpose_gap() < 1e-5
    np.testing.assert_allclose(seg.predict_proba(x).sum(0), 1.0, atol=1e-5)
