"""Prediction backends: the network on one runtime, behind one seam.

A backend is a tile function ``(B, C, *tile) float32 -> (B, K, *out) float32 probabilities``
with a ``name`` and the ``device`` its inputs go to (like the ``predictor`` callable of MONAI's
``sliding_window_inference``). Tiling, test-time augmentation and pre-processing sit on top of it
(:mod:`useg.predict`), so they are written once for every runtime. :data:`BACKENDS` maps the
``--backend`` names to loaders of a run folder: a new runtime is one class and one entry there.

This module also reads what ``useg export`` writes (:func:`load_exported`): the exported model
and its JSON sidecar, which holds the whole plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from . import runtime
from .checkpoint import load_model, weights_digest
from .errors import UsegError
from .plan import Plan
from .tta import output_activation

logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}  # export format -> model file suffix
WEIGHTS_FILE = "model.safetensors"  # a run's weights, beside plan.json (and beside its exports)
CPU = torch.device("cpu")


@runtime_checkable
class Backend(Protocol):
    """What :class:`useg.predict.Segmenter` needs of a runtime.

    Attributes:
        name: the runtime, e.g. "torch" or "onnxruntime".
        device: where batches are moved before :meth:`__call__` (test-time flips happen there).
    """

    name: str
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, *tile) float32, normalised -> (B, K, *out) float32 probabilities."""
        ...


class TorchBackend:
    """A PyTorch module (a :class:`useg.model.UNet`, or a TorchScript export) on a device and precision.

    Args:
        model: the network in eval mode, already on ``device`` in ``precision``'s memory format
            (:meth:`place` does that); it is not moved here, so a training loop can validate
            its live model.
        plan: the run's plan (dims for the memory format, regions for the activation).
        device: where the model is.
        precision: autocast dtype and memory format.
    """

    name = "torch"

    def __init__(self, model: torch.nn.Module, plan: Plan, device: torch.device,
                 precision: runtime.Precision, name: str = "torch"):
        self.model, self.device, self.precision, self.name = model, device, precision, name
        self._format = runtime.memory_format(plan.model.dims, precision)
        self._activate = output_activation(bool(plan.data.regions))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device).contiguous(memory_format=self._format)
        with torch.inference_mode(), runtime.autocast(self.device, self.precision):
            return self._activate(self.model(batch).float())

    @classmethod
    def place(cls, model: torch.nn.Module, plan: Plan, device: str = "auto",
              precision: str = "auto") -> TorchBackend:
        """Pick the device and precision ("auto": the fastest measured); move ``model`` there, eval mode."""
        dev = runtime.pick_device(device)
        prec = runtime.pick_precision(dev, precision)
        model = model.to(dev, memory_format=runtime.memory_format(plan.model.dims, prec)).eval()
        return cls(model, plan, dev, prec)

    @classmethod
    def load(cls, run: Path, device: str = "auto", precision: str = "auto") -> tuple[Plan, TorchBackend]:
        """``run/plan.json`` and ``run/model.safetensors`` (no pickle is ever read)."""
        plan = Plan.load(run / "plan.json")
        weights = run / "model.safetensors"
        if not weights.exists():
            raise UsegError(f"{weights} is missing; the training did not finish, "
                            "resume it with 'useg train --resume'")
        model = load_model(plan.model, weights)  # compared with the plan before it is built
        return plan, cls.place(model, plan, device, precision)


class OnnxBackend:
    """An ``onnxruntime.InferenceSession`` of a ``useg export`` model, on the CPU in fp32.

    Args:
        session: the session; its first input takes (B, C, *S) float32, its first output is the logits.
        plan: the run's plan (regions for the activation).
    """

    name = "onnxruntime"
    device = CPU

    def __init__(self, session: Any, plan: Plan):
        self.session = session
        self._names = session.get_inputs()[0].name, session.get_outputs()[0].name
        self._activate = output_activation(bool(plan.data.regions))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to(CPU, torch.float32).numpy())
        in_name, out_name = self._names
        return self._activate(torch.from_numpy(self.session.run([out_name], {in_name: x})[0]))

    @classmethod
    def load(cls, run: Path, device: str = "auto", precision: str = "auto") -> tuple[Plan, Backend]:
        """``run/model.onnx`` and its sidecar from ``useg export``; ``device``, ``precision`` unused."""
        path = run / "model.onnx"
        if not path.exists():
            raise UsegError(f"{path} is missing; run 'useg export {run}' first")
        return exported_backend(path)


class OpenVinoBackend:
    """An OpenVINO model compiled from a ``useg export`` ONNX file, on the CPU (extra ``useg[openvino]``).

    Args:
        compiled: an ``openvino.CompiledModel``; its first input takes (B, C, *S) float32, its
            first output is the logits.
        plan: the run's plan (regions for the activation).
        name: "openvino" (fp32) or "openvino-bf16" (bf16 inside, fp32 in and out).
    """

    device = CPU

    def __init__(self, compiled: Any, plan: Plan, name: str = "openvino"):
        self.compiled, self.name = compiled, name
        self._activate = output_activation(bool(plan.data.regions))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to(CPU, torch.float32).numpy())
        out = self.compiled(x)[self.compiled.output(0)]
        return self._activate(torch.from_numpy(np.array(out, np.float32)))

    @classmethod
    def compile(cls, path: Path, plan: Plan, threads: int | None = None,
                precision: str = "fp32") -> OpenVinoBackend:
        """Compile the ONNX file ``path`` for OpenVINO's CPU plugin, latency hint, in ``precision``.

        ``precision`` is "fp32" (set explicitly: the plugin would silently pick bf16 on a bf16 CPU)
        or "bf16", which useg offers only where the CPU runs it natively.
        """
        try:
            import openvino
        except ImportError:
            raise UsegError(f"{path} needs openvino, which is not installed; "
                            "pip install 'useg[openvino]'") from None
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or runtime.cpu_count())}
        name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        try:
            return cls(openvino.Core().compile_model(str(path), "CPU", config), plan, name)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own types for damaged files
            raise UsegError(f"cannot load {path} with openvino ({str(e).splitlines()[0]}); "
                            "export it again") from None


def openvino_variant(precision: str) -> Loader:
    """A loader of ``run/model.onnx`` (and its sidecar, from ``useg export``) on OpenVINO in ``precision``."""

    def load(run: Path, device: str = "auto", prec: str = "auto") -> tuple[Plan, Backend]:
        if precision == "bf16" and not runtime.cpu_has_bf16():  # OpenVINO cannot compile it then
            raise UsegError(f"--backend openvino-bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX) to "
                            f"run {run}, and this one has none; use --backend openvino or auto")
        path = run / "model.onnx"
        if not path.exists():
            raise UsegError(f"{path} is missing; run 'useg export {run}' first")
        plan, side = read_sidecar(path)  # the sidecar and the weights hash, as for onnxruntime
        if side["format"] != "onnx":
            raise UsegError(f"{path} is not an ONNX export; run 'useg export {run}' again")
        return plan, OpenVinoBackend.compile(path, plan, precision=precision)

    return load


def torch_variant(mode: str, channels_last: bool | None = None) -> Loader:
    """A loader of the run's PyTorch model in one fixed precision ("fp32", "bf16", "fp16").

    ``channels_last`` None keeps :func:`useg.runtime.pick_precision`'s memory format; True or
    False forces it (fp32 channels_last is a CPU candidate of its own). The backend is named
    ``torch-<mode>`` (``torch-channels-last`` for fp32 channels_last on the CPU).
    """

    def load(run: Path, device: str = "auto", precision: str = "auto") -> tuple[Plan, Backend]:
        dev = runtime.pick_device(device)
        if mode == "fp16" and dev.type != "cuda":
            raise UsegError(f"--backend torch-fp16 runs {run} on a CUDA GPU only, and {dev} is none; "
                            "use --backend auto or torch-fp32")
        if mode == "bf16" and dev.type == "cpu" and not runtime.cpu_has_bf16():
            logger.warning("this CPU has no native bf16: torch-bf16 is emulated and much slower than fp32")
        plan, backend = TorchBackend.load(run, str(dev), mode)
        prec = backend.precision
        if channels_last is not None and channels_last != prec.channels_last:
            prec = dataclasses.replace(prec, channels_last=channels_last)
            backend.model.to(memory_format=runtime.memory_format(plan.model.dims, prec))
        name = "torch-channels-last" if mode == "fp32" and channels_last else f"torch-{mode}"
        return plan, TorchBackend(backend.model, plan, backend.device, prec, name=name)

    return load
class EnsembleBackend:
    """The mean of several backends' probabilities: a fold ensemble behind the one backend seam.

    Each tile goes through every member in turn and their probabilities are summed into one
    tensor, so tiling keeps one accumulator and the memory bound of a single model; k members
    cost k network calls per tile. TTA (:func:`useg.predict.tile_fn`) averages over the ensemble's
    calls, which is the same mean.

    Args:
        members: backends of networks with the same plan; the first one's device is the ensemble's.
    """

    def __init__(self, members: Sequence[Backend]):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.name, self.device = self.members[0].name, self.members[0].device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            probs = member(batch.to(member.device)).to(self.device, torch.float32)
            total = probs if total is None else total.add_(probs)
        return total / len(self.members)


def ensemble(loaded: Sequence[tuple[Plan, Backend]], where: str | Path) -> tuple[Plan, Backend]:
    """(plan, backend) pairs of the same plan as one (plan, :class:`EnsembleBackend`).

    Raises:
        UsegError: the members were planned differently (``where`` is named).
    """
    plan = loaded[0][0]
    if any(p != plan for p, _ in loaded[1:]):
        raise UsegError(f"the members of {where} have different plans; train (or export) them from one run")
    return plan, EnsembleBackend([b for _, b in loaded])


Loader = Callable[[Path, str, str], tuple[Plan, Backend]]
BACKENDS: dict[str, Loader] = {
    "torch": TorchBackend.load,  # the run's recorded precision: bf16 where native and agreeing, else fp32
    "torch-fp32": torch_variant("fp32", channels_last=False),  # NCHW: the reference of every agreement
    "torch-channels-last": torch_variant("fp32", channels_last=True),
    "torch-bf16": torch_variant("bf16", channels_last=True),
    "torch-fp16": torch_variant("fp16", channels_last=True),  # CUDA only
    "onnxruntime": OnnxBackend.load,
    "openvino": openvino_variant("fp32"),
    "openvino-bf16": openvino_variant("bf16"),  # offered by auto only where bf16 is native
}
"""``--backend`` name -> loader(run folder, device, precision) -> (the run's plan, the backend).
``useg predict --backend auto`` (:mod:`useg.autotune`) measures these on the machine and picks one."""


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an exported model: ``model.onnx`` -> ``model.onnx.json`` (one per export)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def import_onnxruntime(path: Path):
    """The ``onnxruntime`` module, or a UsegError saying how to install it (``path`` names what needs it)."""
    try:
        import onnxruntime
    except ImportError:
        raise UsegError(f"{path} needs onnxruntime, which is not installed; "
                        "pip install 'useg[onnx]'") from None
    return onnxruntime


def onnx_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of ``path`` (default: CPU, the cores this process may use)."""
    ort = import_onnxruntime(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or runtime.cpu_count()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        raise UsegError(f"cannot load {path} with onnxruntime ({str(e).splitlines()[0]}); "
                        "export it again") from None


def load_exported(path: str | Path, providers: Sequence[str] | None = None,
                  threads: int | None = None) -> tuple[Plan, Any]:
    """Read an export and its sidecar.

    Args:
        path: the .onnx or .pt file written by :func:`useg.export.export_run`.
        providers: onnxruntime execution providers (default CPU only).
        threads: intra-op threads (default: the cores this process may use).

    Returns:
        (the run's plan, an ``onnxruntime.InferenceSession`` for ONNX or a
        ``torch.jit.ScriptModule`` in eval mode for TorchScript).
    """
    path = Path(path)
    plan, side = read_sidecar(path)
    if side["format"] == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return plan, torch.jit.load(str(path), map_location="cpu").eval()
    return plan, onnx_session(path, providers, threads)


def read_sidecar(path: Path) -> tuple[Plan, dict]:
    """The plan and sidecar record of the export ``path``, checked against the file and the run's weights."""
    side_file = sidecar_path(path)
    try:
        side = json.loads(side_file.read_text(encoding="utf-8"))
        plan = Plan.from_dict(side["plan"])
    except FileNotFoundError:
        raise UsegError(f"{side_file} is missing; keep the sidecar beside {path.name} "
                        "or export again") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsegError(f"{side_file} is not a useg export sidecar ({e}); export the run again") from None
    if not path.exists():
        raise UsegError(f"{path} does not exist; check the path or export the run again")
    if side.get("model_file") != path.name or side.get("format") not in FORMATS:
        raise UsegError(f"{side_file} describes {side.get('model_file')!r}, not {path.name}; "
                        "export the run again")
    _check_weights(path, side)
    return plan, side


def _check_weights(path: Path, side: dict) -> None:
    """Refuse an export whose run folder now holds other weights than those it was exported from.

    An export beside no ``model.safetensors`` (a deployment of the two files alone) has nothing to
    be compared with. A sidecar written before the hash was recorded is accepted with a warning when
    its plan equals the folder's plan.json (refusing it would break every older export that is still
    right), and refused when the plans differ: that export is certainly stale.
    """
    weights = path.parent / WEIGHTS_FILE
    if not weights.is_file():
        return
    stale = UsegError(f"{path} was exported from other weights than {weights}; "
                      f"run 'useg export {path.parent}' again")
    recorded = side.get("weights_sha256")
    if recorded is not None:
        if recorded != weights_digest(weights):
            raise stale
        return
    plan_file = path.parent / "plan.json"
    try:
        same_plan = json.loads(plan_file.read_text(encoding="utf-8")) == side["plan"]
    except (OSError, ValueError):
        same_plan = True  # no readable plan.json to compare with: the weights alone cannot tell
    if not same_plan:
        raise stale
    logger.warning("%s has no record of the weights it was exported from (an older useg); if %s was "
                   "trained again since, run 'useg export %s' again", sidecar_path(path), weights,
                   path.parent)


def exported_backend(path: str | Path, providers: Sequence[str] | None = None,
                     threads: int | None = None) -> tuple[Plan, Backend]:
    """An export as a backend: ONNX as :class:`OnnxBackend`, TorchScript as :class:`TorchBackend` (CPU, fp32).

    Arguments as in :func:`load_exported`. ``Segmenter(*exported_backend(path))`` predicts from
    the export alone.
    """
    if Path(path).suffix.lower() == ".json":
        return _exported_ensemble(Path(path), providers, threads)
    plan, runner = load_exported(path, providers, threads)
    if isinstance(runner, torch.nn.Module):
        return plan, TorchBackend(runner, plan, CPU, runtime.pick_precision(CPU, "fp32"))
    return plan, OnnxBackend(runner, plan)


def _exported_ensemble(path: Path, providers: Sequence[str] | None, threads: int | None
                       ) -> tuple[Plan, Backend]:
    """The ensemble a ``useg export`` of a cross-validated run describes (``ensemble.onnx.json``)."""
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
        members = [path.parent / m for m in side["members"]]
        combine = side["combine"]
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path or export the run again") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsegError(f"{path} is not a useg ensemble sidecar ({e}); export the run again") from None
    if combine != "mean" or not members:
        raise UsegError(f"{path} combines {len(members)} member(s) by {combine!r}, which this useg cannot; "
                        "export the run again")
    return ensemble([exported_backend(m, providers, threads) for m in members], path)
