"""ONNX / TorchScript export: round trips against PyTorch, the sidecar, refusals, tiling sanity."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from useg import export
from useg.backends import OnnxBackend, TorchBackend, exported_backend, load_exported, sidecar_path
from useg.checkpoint import save_model
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import Segmenter, tile_fn
from useg.runtime import pick_precision
from useg.sliding_window import sliding_window
from useg.spec import Overrides

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
FP32 = pick_precision(CPU, "fp32")


def make_run(path, dims=2, padding="same", tile=None, tta=False, norm="batch", seed=0):
    """A run folder with a tiny random network (width 4, depth 2) and non-trivial BatchNorm statistics."""
    shape = (32, 32) if dims == 2 else (16, 16, 16)
    plan = make_plan(LabelMap((0, 255)), 1, [shape], overrides=Overrides(
        model={"width": 4, "depth": 2, "padding": padding, "norm": norm},
        infer={"tta": tta, "overlap": 0.5, "batch_size": 2}, patch_size=tile or shape))
    torch.manual_seed(seed)
    net = UNet.from_config(plan.model)
    for mod in net.modules():  # eval-mode BatchNorm that is not the identity
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    path.mkdir(parents=True, exist_ok=True)
    plan.save(path / "plan.json")
    save_model(net, path / "model.safetensors")
    return path


def torch_probs(run, x):
    seg = Segmenter.load(run, device="cpu", precision="fp32")
    with torch.inference_mode():
        return torch.softmax(seg.backend.model(torch.from_numpy(x)), dim=1).numpy()


@pytest.mark.parametrize("dims,padding,size",
                         [(2, "same", (48, 64)), (2, "valid", (68, 76)), (3, "same", (8, 16, 24))])
def test_onnx_round_trip_matches_pytorch(tmp_path, dims, padding, size):
    tile = {(2, "valid"): (60, 60)}.get((dims, padding))
    run = make_run(tmp_path / "run", dims=dims, padding=padding, tile=tile)
    path = export.export_run(run, dynamo=False)  # the legacy exporter: 0.1 s instead of 2-6 s
    assert path == run / "model.onnx" and path.exists()
    plan, session = load_exported(path)
    x = np.random.default_rng(1).standard_normal((3, 1, *size)).astype(np.float32)  # not the tile size
    got = tile_fn(OnnxBackend(session, plan), plan)(torch.from_numpy(x)).numpy()
    want = torch_probs(run, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_dynamo_exporter_gives_dynamic_axes(tmp_path):
    run = make_run(tmp_path / "run")
    path = export.export_run(run, out=tmp_path / "net.onnx", dynamo=True)
    side = json.loads(sidecar_path(path).read_text())
    assert side["exporter"] == "torch.onnx.export(dynamo=True)"
    plan, session = load_exported(path)
    x = np.random.default_rng(2).standard_normal((1, 1, 64, 96)).astype(np.float32)
    np.testing.assert_allclose(tile_fn(OnnxBackend(session, plan), plan)(torch.from_numpy(x)).numpy(),
                               torch_probs(run, x), atol=1e-4)


def test_torchscript_round_trip(tmp_path):
    run = make_run(tmp_path / "run", padding="valid", tile=(60, 60))
    path = export.export_run(run, format="torchscript")
    assert path.suffix == ".pt"
    _, module = load_exported(path)
    x = np.random.default_rng(3).standard_normal((2, 1, 76, 68)).astype(np.float32)
    with torch.inference_mode():
        got = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(got, torch_probs(run, x), atol=1e-5)
    image = np.random.default_rng(4).integers(0, 255, (45, 61)).astype(np.uint8)
    np.testing.assert_array_equal(export.predict_exported(path, image),
                                  Segmenter.load(run, device="cpu", precision="fp32").predict(image))


def test_sidecar_holds_everything_prediction_needs(tmp_path):
    run = make_run(tmp_path / "run", tta=True)
    export.export_run(run, dynamo=False)
    side = json.loads((run / "model.onnx.json").read_text())
    assert side["plan"] == json.loads((run / "plan.json").read_text())
    assert side["format"] == "onnx" and side["model_file"] == "model.onnx"
    assert (side["input_name"], side["output_name"]) == ("image", "logits")
    assert side["tile"] == [32, 32] and side["output_tile"] == [32, 32] and side["tta"] is True
    assert side["overlap"] == 0.5 and side["padding"] == "same" and isinstance(side["opset"], int)
    assert 0 <= side["verified_max_abs_diff"] <= 1e-3
    # prediction needs the two files only: move them away from the run folder
    moved = tmp_path / "deploy"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.json"):
        (run / name).rename(moved / name)
    plan, _ = load_exported(moved / "model.onnx")
    assert plan.infer.tta


@pytest.mark.parametrize("damage", ["no_weights", "bad_weights", "bad_plan", "wrong_suffix", "bad_format"])
def test_export_refuses_a_broken_run(tmp_path, damage):
    run = make_run(tmp_path / "run")
    kw = {}
    if damage == "no_weights":
        (run / "model.safetensors").unlink()
    elif damage == "bad_weights":
        (run / "model.safetensors").write_bytes(b"\x00garbage")
    elif damage == "bad_plan":
        (run / "plan.json").write_text("{not json")
    elif damage == "wrong_suffix":
        kw["out"] = tmp_path / "model.bin"
    else:
        kw["format"] = "tflite"
    with pytest.raises(UsegError):
        export.export_run(run, dynamo=False, **kw)
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_export_refuses_and_deletes_a_wrong_export(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    real = export._softmax
    monkeypatch.setattr(export, "_softmax", lambda logits: real(logits) * 0.9)  # a broken runtime
    with pytest.raises(UsegError, match="away from PyTorch"):
        export.export_run(run, dynamo=False)
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors", "plan.json"]


def test_onnx_and_torchscript_exports_keep_their_own_sidecars(tmp_path):
    run = make_run(tmp_path / "run")
    onnx_path = export.export_run(run, dynamo=False)
    pt_path = export.export_run(run, format="torchscript")
    assert json.loads(sidecar_path(onnx_path).read_text())["format"] == "onnx"
    assert json.loads(sidecar_path(pt_path).read_text())["format"] == "torchscript"
    assert not isinstance(load_exported(onnx_path)[1], torch.nn.Module)
    assert isinstance(load_exported(pt_path)[1], torch.nn.Module)
    assert isinstance(exported_backend(onnx_path)[1], OnnxBackend)
    assert isinstance(exported_backend(pt_path)[1], TorchBackend)


def test_load_exported_without_sidecar(tmp_path):
    run = make_run(tmp_path / "run")
    path = export.export_run(run, dynamo=False)
    sidecar_path(path).unlink()
    with pytest.raises(UsegError, match="sidecar"):
        load_exported(path)


@pytest.mark.parametrize("padding,tta", [("same", False), ("same", True), ("valid", False)])
def test_predict_exported_equals_segmenter(tmp_path, padding, tta):
    run = make_run(tmp_path / "run", padding=padding, tile=(60, 60) if padding == "valid" else None, tta=tta)
    path = export.export_run(run, dynamo=False)
    # odd size, not a tile multiple
    image = np.random.default_rng(5).integers(0, 255, (45, 61)).astype(np.uint8)
    seg = Segmenter.load(run, device="cpu", precision="fp32")
    runner = Segmenter(*exported_backend(path))
    p_onnx, p_torch = runner.predict_proba(image), seg.predict_proba(image)
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    got, want = export.predict_exported(path, image), seg.predict(image)
    assert got.shape == (45, 61) and got.dtype == np.int64
    decided = np.abs(p_torch[1] - p_torch[0]) > 1e-3  # ties may flip between runtimes, nothing else
    np.testing.assert_array_equal(got[decided], want[decided])


def test_sliding_window_matches_a_whole_image_forward():
    """Tiling approximates one forward over the whole image: exactly with one tile, closely with many.

    With many tiles it cannot be exact: zero padding at tile borders changes the outputs near tile
    edges (the Gaussian blend down-weights them). Tile starts that are not multiples of 2**depth
    also move the pooling grid; a random He-initialised net is far from shift-equivariant then
    (62 % agreement for 48-px tiles at overlap 0.25 here), so this test keeps the starts aligned.
    """
    torch.manual_seed(0)
    plan = make_plan(LabelMap((0, 1)), 1, [(32, 32)], overrides=Overrides(
        model={"width": 8, "depth": 2, "norm": None}))
    net = UNet.from_config(plan.model).eval()
    fn = tile_fn(TorchBackend(net, plan, CPU, FP32), plan)
    yy, xx = np.mgrid[:128, :128]
    image = (np.sin(yy / 7.0) * np.cos(xx / 11.0)
             + 0.3 * np.random.default_rng(0).standard_normal((128, 128)))
    image = image[None].astype(np.float32)
    with torch.inference_mode():
        whole = torch.softmax(net(torch.from_numpy(image[None])), dim=1)[0].numpy()

    one = sliding_window(fn, image, (128, 128), 2, overlap=0.5)
    np.testing.assert_allclose(one, whole, atol=1e-5)

    # 3 x 3 tiles starting at multiples of 2**depth (0, 32, 64), so every tile pools on the image's grid
    tiled = sliding_window(fn, image, (64, 64), 2, overlap=0.5, batch_size=9)
    agree = (tiled.argmax(0) == whole.argmax(0)).mean()
    assert agree >= 0.99, agree
    assert np.abs(tiled - whole).mean() < 0.005
    # the assertion has teeth: the same result misplaced by 2 px agrees far less
    shifted = np.roll(tiled, 2, axis=(1, 2))
    assert (shifted.argmax(0) == whole.argmax(0)).mean() < 0.9


# ------------------------------------------------------------------ stale exports (issue 14)


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_an_export_of_other_weights_is_refused(tmp_path, format):
    """`train --overwrite` after `export`: the old model.onnx must not run silently."""
    run = make_run(tmp_path / "run")
    path = export.export_run(run, format=format, dynamo=False)
    assert len(json.loads(sidecar_path(path).read_text())["weights_sha256"]) == 64
    exported_backend(path)  # the weights it was made from: accepted
    make_run(run, seed=1)  # retrained in place: same plan, other weights
    msg = f"{path} was exported from other weights than {run / 'model.safetensors'}; run 'useg export {run}'"
    with pytest.raises(UsegError, match=re.escape(msg)):
        exported_backend(path)
    if format == "onnx":
        with pytest.raises(UsegError, match=re.escape(msg)):
            OnnxBackend.load(run)
    export.export_run(run, format=format, dynamo=False)  # exporting again is the fix
    exported_backend(path)


def test_an_export_moved_away_from_its_run_is_not_compared(tmp_path):
    run = make_run(tmp_path / "run")
    path = export.export_run(run, out=tmp_path / "deploy" / "net.onnx", dynamo=False)
    make_run(run, seed=1)
    exported_backend(path)  # no model.safetensors beside it: nothing to compare with


def test_an_old_sidecar_without_a_hash(tmp_path, caplog):
    """Accepted with a warning while its plan is the run's; refused once the plans differ."""
    run = make_run(tmp_path / "run")
    path = export.export_run(run, dynamo=False)
    side = json.loads(sidecar_path(path).read_text())
    del side["weights_sha256"]
    sidecar_path(path).write_text(json.dumps(side))
    with caplog.at_level("WARNING", logger="useg.backends"):
        OnnxBackend.load(run)
    assert "has no record of the weights it was exported from" in caplog.text
    plan = json.loads((run / "plan.json").read_text())
    plan["model"]["width"] = 8  # the case: sidecar width 4, plan width 8
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UsegError, match="was exported from other weights than"):
        OnnxBackend.load(run)
