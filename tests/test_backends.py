"""Prediction backends: the seam between the Segmenter and a runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from useg import runtime
from useg.backends import BACKENDS, Backend, OnnxBackend, TorchBackend, exported_backend
from useg.checkpoint import save_model
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import Segmenter, tile_fn
from useg.preprocess import normalize
from useg.runtime import pick_precision
from useg.spec import Overrides

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _plan(padding="same", tta=False):
    return make_plan(LabelMap((0, 255)), 1, [(32, 32)], overrides=Overrides(
        model={"width": 4, "depth": 2, "padding": padding},
        infer={"tta": tta, "overlap": 0.5, "batch_size": 2},
        patch_size=(60, 60) if padding == "valid" else (32, 32)))


def _run(path, padding="same"):
    plan = _plan(padding)
    path.mkdir(parents=True, exist_ok=True)
    plan.save(path / "plan.json")
    save_model(UNet.from_config(plan.model), path / "model.safetensors")
    return path


class Fake:
    """A backend without a network: class 1 wherever the normalised input is positive, counting its calls."""

    name = "fake"
    device = CPU

    def __init__(self):
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        p = torch.sigmoid(8 * batch[:, :1])
        return torch.cat([1 - p, p], dim=1)


def test_a_fake_backend_plugs_into_the_segmenter():
    plan = _plan()
    fake = Fake()
    assert isinstance(fake, Backend)
    seg = Segmenter(plan, fake)
    x = np.random.default_rng(0).normal(size=(45, 61)).astype(np.float32)
    want = 1 / (1 + np.exp(-8 * normalize(x[None], plan.data.normalization)[0]))
    probs = seg.predict_proba(x)
    assert probs.shape == (2, 45, 61)
    np.testing.assert_allclose(probs[1], want, atol=1e-5)  # blending equal tiles changes nothing
    np.testing.assert_array_equal(seg.predict(x), probs.argmax(0))
    plain = fake.calls
    seg.plan = dataclasses.replace(plan, infer=dataclasses.replace(plan.infer, tta=True))
    # a pointwise backend: flip-equivariant
    np.testing.assert_allclose(seg.predict_proba(x), probs, atol=1e-5)
    # 4 mirrorings per tile batch; plain ran predict_proba and predict
    assert fake.calls - plain == 4 * (plain // 2)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_torch_and_onnx_backends_agree(tmp_path, padding):
    pytest.importorskip("onnxruntime")
    from useg.export import export_run

    run = _run(tmp_path / "run", padding)
    plan, torch_backend = TorchBackend.load(run, device="cpu", precision="fp32")
    path = export_run(run, dynamo=False)
    plan_onnx, onnx_backend = exported_backend(path)
    assert plan_onnx == plan and isinstance(onnx_backend, OnnxBackend)
    assert (torch_backend.name, onnx_backend.name) == ("torch", "onnxruntime")
    assert torch_backend.device == onnx_backend.device == CPU
    tile = plan.infer.tile
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 1, *tile)).astype(np.float32))
    a, b = torch_backend(x), onnx_backend(x)
    assert a.shape == b.shape == (3, 2, *UNet.from_config(plan.model).output_size(tuple(tile)))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    np.testing.assert_allclose(a.sum(1).numpy(), 1.0, atol=1e-5)  # probabilities, not logits
    # and through the tiling with TTA, as the Segmenter runs them
    tta = dataclasses.replace(plan, infer=dataclasses.replace(plan.infer, tta=True))
    np.testing.assert_allclose(tile_fn(torch_backend, tta)(x).numpy(), tile_fn(onnx_backend, tta)(x).numpy(),
                               atol=1e-4)
    image = np.random.default_rng(2).integers(0, 255, (45, 61)).astype(np.uint8)
    by_onnx = Segmenter.load(run, backend="onnxruntime").predict_proba(image)
    by_torch = Segmenter.load(run, device="cpu", precision="fp32").predict_proba(image)
    np.testing.assert_allclose(by_onnx, by_torch, atol=1e-4)


def test_torch_backend_place_picks_device_precision_and_eval_mode():
    plan = _plan()
    model = UNet.from_config(plan.model)
    assert model.training
    backend = TorchBackend.place(model, plan, device="cpu", precision="fp32")
    assert backend.model is model and not model.training
    assert backend.device == CPU and backend.precision == pick_precision(CPU, "fp32")


def test_region_plans_get_a_sigmoid_per_region():
    plan = _plan()
    regions = dataclasses.replace(plan, data=dataclasses.replace(plan.data, regions=((1,),)))
    torch.manual_seed(0)
    model = UNet.from_config(plan.model).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        logits = model(x)
    fp32 = pick_precision(CPU, "fp32")
    np.testing.assert_allclose(TorchBackend(model, regions, CPU, fp32)(x), torch.sigmoid(logits), atol=1e-6)
    np.testing.assert_allclose(TorchBackend(model, plan, CPU, fp32)(x), torch.softmax(logits, 1), atol=1e-6)


def test_the_backend_table_names_every_backend(tmp_path):
    assert set(BACKENDS) == {"torch", "torch-fp32", "torch-channels-last", "torch-bf16", "torch-fp16",
                             "onnxruntime", "openvino", "openvino-bf16"}
    run = _run(tmp_path / "run")
    with pytest.raises(ValueError, match="backend must be one of torch, torch-fp32, .*openvino"):
        Segmenter.load(run, backend="tflite")
    with pytest.raises(UsegError, match="useg export"):
        Segmenter.load(run, backend="onnxruntime")


@pytest.mark.parametrize("name", ["torch-fp32", "torch-channels-last", "torch-bf16", "onnxruntime",
                                  "openvino", "openvino-bf16"])
def test_every_backend_agrees_with_fp32_torch(tmp_path, name):
    exported = name.split("-")[0] in ("onnxruntime", "openvino")
    if exported:
        pytest.importorskip(name.split("-")[0])
    if name == "openvino-bf16" and not runtime.cpu_has_bf16():
        pytest.skip("openvino-bf16 needs a CPU with native bf16")
    run = _run(tmp_path / "run")
    if exported:
        from useg.export import export_run

        export_run(run, dynamo=False)
    image = np.random.default_rng(2).integers(0, 255, (45, 61)).astype(np.uint8)
    fp32 = Segmenter.load(run, device="cpu", precision="fp32")
    seg = Segmenter.load(run, device="cpu", backend=name)
    assert seg.backend.name == name and seg.backend.device == CPU and seg.plan == fp32.plan
    want, got = fp32.predict_proba(image), seg.predict_proba(image)
    bf16 = name.endswith("bf16")
    np.testing.assert_allclose(got, want, atol=3e-2 if bf16 else 1e-4)
    assert (got.argmax(0) == want.argmax(0)).mean() >= (0.99 if bf16 else 0.999)


def test_fixed_precision_variants_have_their_memory_format(tmp_path, monkeypatch):
    run = _run(tmp_path / "run")
    cl = BACKENDS["torch-channels-last"](run, "cpu", "auto")[1]
    nchw = BACKENDS["torch-fp32"](run, "cpu", "auto")[1]
    assert (cl.precision.dtype, cl.precision.channels_last) == (None, True)
    assert (nchw.precision.dtype, nchw.precision.channels_last) == (None, False)
    w = next(p for p in cl.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert BACKENDS["torch-bf16"](run, "cpu", "auto")[1].precision.dtype is torch.bfloat16
    with pytest.raises(UsegError, match="torch-fp16 runs .* on a CUDA GPU only"):
        BACKENDS["torch-fp16"](run, "cpu", "auto")
    with pytest.raises(UsegError, match="useg export"):
        BACKENDS["openvino"](run, "cpu", "auto")
    monkeypatch.setenv("USEG_CPU_BF16", "0")  # an AVX2-like CPU: OpenVINO could not compile bf16
    runtime.cpu_has_bf16.cache_clear()
    try:
        with pytest.raises(UsegError, match="openvino-bf16 needs a CPU with native bf16"):
            BACKENDS["openvino-bf16"](run, "cpu", "auto")
    finally:
        runtime.cpu_has_bf16.cache_clear()
# --- fold ensembles (issue 13) ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 45), (9, 21, 18)])
def test_an_ensemble_of_copies_is_the_model_and_of_two_is_their_mean(shape):
    from useg.backends import EnsembleBackend

    dims = len(shape)
    plan = make_plan(LabelMap((0, 1)), 1, [shape], overrides=Overrides(
        model={"width": 4, "depth": 2}, infer={"tta": True, "batch_size": 2},
        patch_size=(16,) * dims))
    prec = pick_precision(CPU, "fp32")
    nets = [UNet.from_config(plan.model).eval() for _ in range(2)]
    a, b = (TorchBackend(net, plan, CPU, prec) for net in nets)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    pa, pb = Segmenter(plan, a).predict_proba(x), Segmenter(plan, b).predict_proba(x)
    copies = EnsembleBackend([a, a, a])
    assert isinstance(copies, Backend) and copies.name == "torch" and copies.device == CPU
    np.testing.assert_allclose(Segmenter(plan, copies).predict_proba(x), pa, atol=1e-6)
    counted = Fake()
    both = Segmenter(plan, EnsembleBackend([a, b, counted])).predict_proba(x)
    pf = Segmenter(plan, Fake()).predict_proba(x)
    assert not np.allclose(pa, pb, atol=1e-3)
    np.testing.assert_allclose(both, (pa + pb + pf) / 3, atol=1e-5)
    # one pass over the tiles: each member is called once per tile batch and symmetry, no more
    plain = Fake()
    Segmenter(plan, plain).predict_proba(x)
    assert counted.calls == plain.calls
    with pytest.raises(ValueError):
        EnsembleBackend([])
