from __future__ import annotations

import numpy as np
import pytest
import torch

from useg.backends import TorchBackend
from useg.checkpoint import save_model
from useg.errors import UsegError
from useg.io import read_image, read_mask
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import Segmenter
from useg.spec import Overrides


def _run(tmp_path, padding="same", dims=2, channels=1, values=(0, 255)):
    shape = (40, 40) if dims == 2 else (16, 24, 24)
    plan = make_plan(LabelMap(values, "grey"), channels, [shape], overrides=Overrides(
        model={"width": 4, "depth": 2, "padding": padding},
        patch_size=(20,) * dims if padding == "valid" else None))
    plan.save(tmp_path / "plan.json")
    model = UNet.from_config(plan.model)
    save_model(model, tmp_path / "model.safetensors")
    return plan, model


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("dims", [2, 3])
def test_predict_any_size_matches_probabilities(tmp_path, padding, dims):
    _run(tmp_path, padding, dims)
    seg = Segmenter.load(tmp_path, precision="fp32")
    shape = (37, 53) if dims == 2 else (11, 19, 23)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    probs = seg.predict_proba(x)
    assert probs.shape == (2, *shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    labels = seg.predict(x[None])
    assert labels.shape == shape and labels.dtype == np.int64
    assert np.array_equal(labels, probs.argmax(0))


def test_same_padding_tiled_equals_whole_image_forward(tmp_path):
    plan, model = _run(tmp_path)
    seg = Segmenter.load(tmp_path, precision="fp32")
    x = np.random.default_rng(1).normal(size=(1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        whole = torch.softmax(model.eval()(torch.from_numpy((x - x.mean()) / x.std())[None]), 1)[0].numpy()
    np.testing.assert_allclose(seg.predict_proba(x), whole, atol=1e-4)


def test_bad_arrays_are_refused(tmp_path):
    _run(tmp_path, channels=1)
    seg = Segmenter.load(tmp_path, precision="fp32")
    with pytest.raises(UsegError, match="channels"):
        seg.predict(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(UsegError, match="shape"):
        seg.predict(np.zeros((32,), np.float32))
    bad = np.zeros((32, 32), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(UsegError, match="NaN"):
        seg.predict(bad)


def test_load_refuses_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(UsegError, match="not a run folder"):
        Segmenter.load(tmp_path / "nope")
    plan, _ = _run(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UsegError, match="missing"):
        Segmenter.load(tmp_path)
    import dataclasses

    other = dataclasses.replace(plan, model=dataclasses.replace(plan.model, width=8))
    save_model(UNet.from_config(other.model), tmp_path / "model.safetensors")
    with pytest.raises(UsegError, match="does not match"):
        Segmenter.load(tmp_path)


def test_predict_files_writes_training_encoding(tmp_path, cells_dir):
    _run(tmp_path, values=(0, 255))
    seg = Segmenter.load(tmp_path, precision="fp32")
    inputs = sorted((cells_dir / "images").iterdir())[:2]
    out = tmp_path / "pred"
    written = seg.predict_files(inputs, out)
    assert [p.name for p in written] == [p.name for p in inputs]
    raw, mode, _ = read_mask(written[0])
    assert set(np.unique(raw)) <= {0, 255} and mode == "grey"
    assert raw.shape == read_image(inputs[0]).spatial_shape
    with pytest.raises(UsegError, match="already exists"):
        seg.predict_files(inputs, out)
    calls = []
    seg.predict_files(inputs, out, overwrite=True, progress=lambda done, total: calls.append((done, total)))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs)
    assert calls == [(1, 2), (2, 2)]  # progress(done, total), as over tiles


def test_output_names_stay_inside_the_output_folder(tmp_path, cells_dir):
    import shutil

    _run(tmp_path, values=(0, 255))
    seg = Segmenter.load(tmp_path, precision="fp32")
    odd = tmp_path / "in"
    odd.mkdir()
    src = cells_dir / "images" / "cell_000.png"
    names = ["..png", "a b.png", "..weird..tif.png", "x.jpeg"]
    for n in names:
        shutil.copy(src, odd / n)
    out = tmp_path / "out"
    written = seg.predict_files([odd / n for n in names], out)
    assert all(p.resolve().parent == out.resolve() for p in written)
    from pathlib import Path

    assert [p.name for p in written] == [Path(n).stem + ".png" for n in names]  # JPEG inputs get PNG masks
    assert len(list(out.iterdir())) == 4


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_probabilities_are_written_in_the_asked_precision(tmp_path, cells_dir, dtype):
    import tifffile

    _run(tmp_path)
    seg = Segmenter.load(tmp_path, precision="fp32")
    src = cells_dir / "images" / "cell_000.png"
    (path,) = seg.predict_files([src], tmp_path / "out", probabilities=dtype)
    assert path.name == "cell_000_probs.tif"
    probs = tifffile.imread(path)
    assert probs.dtype == np.dtype(dtype) and probs.shape == (2, 64, 64)
    from useg.io import read_image

    exact = seg.predict_image_proba(read_image(src))
    scale = 255.0 if dtype == "uint8" else 1.0
    np.testing.assert_allclose(probs.astype(np.float32) / scale, exact,
                               atol=1 / 255 if dtype == "uint8" else 1e-3)


def test_a_plan_at_another_spacing_predicts_in_the_images_own_grid(tmp_path):
    import dataclasses

    from useg.files import Image

    plan, model = _run(tmp_path, dims=3)
    plan = dataclasses.replace(plan, data=dataclasses.replace(plan.data, resample=True,
                                                              spacing=(2.0, 1.0, 1.0)))
    seg = Segmenter(plan, TorchBackend.place(model, plan, device="cpu", precision="fp32"))
    x = np.random.default_rng(5).normal(size=(1, 13, 19, 23)).astype(np.float32)
    image = Image(x, spacing=(1.0, 1.0, 1.0))
    labels, probs = seg.predict_image(image), seg.predict_image_proba(image)
    assert labels.shape == (13, 19, 23) and probs.shape == (2, 13, 19, 23)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    # the network saw the image at its training spacing: half as many slices
    from useg.resample import new_shape

    seen = []
    orig = seg.prepare
    seg.prepare = lambda a, name="": (seen.append(a.shape), orig(a, name))[1]
    seg.predict_image(image)
    assert seen[-1][1:] == new_shape((13, 19, 23), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)) == (6, 19, 23)
