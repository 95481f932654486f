"""Export a trained run to ONNX or TorchScript, and predict with the export alone.

``export_run(run)`` writes ``run/model.onnx`` (or ``model.pt``) and beside it a JSON sidecar
``model.onnx.json`` (``model.pt.json``) holding the whole plan, the tensor names and the tile
settings, so a deployment needs the two files and nothing else. Every export is checked at export
time: PyTorch and the exported model must give the same softmax probabilities (max abs difference
<= 1e-3) on a seeded random batch of the plan's tile size, or the export is refused and nothing is
written.

ONNX inputs are ``image`` (B, C, *S) float32, normalised like the training images, with dynamic
batch and spatial axes; the output ``logits`` is (B, K, *S) for same padding and (B, K, *S')
with ``S' = output_size(S)`` for valid padding. Softmax is applied by
:class:`useg.backends.OnnxBackend` and mirroring TTA on top of it by :mod:`useg.predict`, exactly
as for the PyTorch model; :mod:`useg.backends` reads an export back (:func:`useg.backends.load_exported`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import (
    FORMATS,
    WEIGHTS_FILE,
    exported_backend,
    import_onnxruntime,
    onnx_session,
    sidecar_path,
)
from .checkpoint import weights_digest
from .errors import UsegError
from .files import atomic_path, atomic_write_text
from .folds import fold_runs
from .model import output_size
from .plan import Plan
from .predict import Segmenter
from .runlog import is_multi_configuration

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
SIDECAR_VERSION = 1
TOLERANCE = 1e-3  # largest accepted |p_torch - p_export| of the softmax probabilities


def export_run(run: str | Path, out: str | Path | None = None, format: str = "onnx",
               opset: int | None = None, dynamo: bool | None = None) -> Path:
    """Export a run folder's network (fp32, eval mode) and write its sidecar.

    Args:
        run: a run folder (plan.json + model.safetensors) made by ``useg train``.
        out: the model file; default ``run/model.onnx`` or ``run/model.pt``.
        format: "onnx" or "torchscript".
        opset: ONNX opset; None takes the exporter's default.
        dynamo: ONNX exporter: True = ``torch.export`` based, False = the legacy TorchScript
            based one, None = try the first and fall back to the second if it fails.

    Returns:
        The written model path (the sidecar is ``sidecar_path(path)``).

    Raises:
        UsegError: unknown format, a broken run folder, a missing onnxruntime, or an export whose
            outputs differ from PyTorch's by more than 1e-3 (nothing is written then).
    """
    if format not in FORMATS:
        raise UsegError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    if is_multi_configuration(run):  # two networks with different tiles: no one export combines them
        raise UsegError(f"{run} is a multi-configuration run (useg train --configs); export one of its "
                        f"configurations instead: 'useg export {run / '2d'}' or 'useg export {run / '3d'}'")
    members = fold_runs(run)
    if members:
        return _export_folds(run, members, out, format, opset, dynamo)
    suffix = FORMATS[format]
    out = Path(out) if out is not None else run / f"model{suffix}"
    if out.suffix.lower() != suffix:
        raise UsegError(f"{out} does not end in {suffix}; name the {format} export like model{suffix}")
    if format == "onnx":
        import_onnxruntime(out)  # fail before the (slow) export, not after it
    seg = Segmenter.load(run, device="cpu", precision="fp32")  # refuses a run without its weights
    digest = weights_digest(run / WEIGHTS_FILE)
    plan, model = seg.plan, seg.backend.model.float().eval()
    m = plan.model
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, m.in_channels, *plan.infer.tile, generator=gen)
    with torch.inference_mode():
        expected = torch.softmax(model(sample), dim=1).numpy()

    with atomic_path(out) as tmp:
        if format == "onnx":
            exporter = _export_onnx(model, sample, tmp, opset, dynamo)
            got = _softmax(onnx_session(tmp).run([OUTPUT_NAME], {INPUT_NAME: sample.numpy()})[0])
        else:
            exporter = "torch.jit.trace"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", DeprecationWarning)  # jit is deprecated, still works
                torch.jit.save(torch.jit.trace(model, sample), str(tmp))
                got = torch.softmax(torch.jit.load(str(tmp))(sample), dim=1).numpy()
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        logger.info("export %s (%s): max |p_torch - p_export| = %.2e on a %s batch",
                    out, exporter, diff, tuple(sample.shape))
        if not diff <= TOLERANCE:
            raise UsegError(f"the {format} export of {run} gives probabilities {diff:.2e} away from "
                            f"PyTorch's (limit {TOLERANCE:g}); try another --opset or --format")
    side = _sidecar(plan, format, out, exporter, diff)
    side["weights_sha256"] = digest  # a later 'train --overwrite' makes this export stale: refused at load
    try:
        atomic_write_text(sidecar_path(out), json.dumps(side, indent=2) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    logger.info("wrote %s and %s", out, sidecar_path(out))
    return out


def _export_folds(run: Path, members: list[Path], out: str | Path | None, format: str, opset: int | None,
                  dynamo: bool | None) -> Path:
    """A cross-validated run: every fold exported into its folder, and ``run/ensemble<suffix>.json``
    naming them and how to combine them (the mean of their probabilities); returns that sidecar."""
    if out is not None:
        raise UsegError(f"{run} is cross-validated: its folds are exported to {run}/fold_K/ beside an "
                        "ensemble sidecar; drop --out")
    paths = [export_run(m, None, format, opset, dynamo) for m in members]
    side = {"useg_export": SIDECAR_VERSION, "format": format, "combine": "mean",
            "combine_doc": "the mean of the members' probabilities (softmax, or a sigmoid per region) at "
                           "each network call: test-time augmentation and tiling run on top of it",
            "members": [p.relative_to(run).as_posix() for p in paths],
            "plan": Plan.load(run / "plan.json").to_dict()}
    path = atomic_write_text(run / f"ensemble{FORMATS[format]}.json", json.dumps(side, indent=2) + "\n")
    logger.info("wrote %s combining %d fold exports", path, len(paths))
    return path


def _sidecar(plan: Plan, format: str, out: Path, exporter: str, diff: float) -> dict:
    """The sidecar record of an export: the whole plan, tensor names and tile settings, the check's result."""
    m = plan.model
    return {
        "useg_export": SIDECAR_VERSION,
        "format": format,
        "model_file": out.name,
        "exporter": exporter,
        "opset": _opset_of(out) if format == "onnx" else None,
        "torch_version": torch.__version__,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input": f"(B, {m.in_channels}, {'D, ' if m.dims == 3 else ''}H, W) float32, normalised: "
                 f"{plan.data.normalization}",
        "output": f"(B, {m.num_classes}, *S') logits; "
                  + ("a sigmoid per region" if plan.data.regions else "softmax over axis 1"),
        "tile": list(plan.infer.tile),
        "output_tile": list(output_size(tuple(plan.infer.tile), m.depth, m.padding)),
        "padding": m.padding,
        "overlap": plan.infer.overlap,
        "batch_size": plan.infer.batch_size,
        "tta": plan.infer.tta,
        "verified_max_abs_diff": diff,
        "plan": plan.to_dict(),
    }


def _export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int | None,
                 dynamo: bool | None) -> str:
    """Write ``model`` to ``path`` as ONNX with dynamic batch and spatial axes; returns the exporter used."""
    dims = sample.dim() - 2
    kw: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if opset is not None:
        kw["opset_version"] = int(opset)
    if dynamo is not False:
        try:
            from torch.export import Dim

            shapes = {"x": {0: Dim("batch"), **{2 + i: Dim.AUTO for i in range(dims)}}}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(model, (sample,), str(path), dynamo=True, dynamic_shapes=shapes,
                                  external_data=False, verbose=False, **kw)
            if _dynamic_axes_ok(path, dims):
                return "torch.onnx.export(dynamo=True)"
            logger.warning("the dynamo ONNX export fixed some axes; retrying with the legacy exporter")
        except Exception as e:  # noqa: BLE001 - any exporter failure falls back to the legacy path
            if dynamo:
                raise UsegError(f"cannot export {path.name} with the dynamo exporter "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                "retry without --dynamo") from None
            logger.warning("dynamo ONNX export failed (%s: %s); using the legacy exporter",
                           type(e).__name__, e)
    axes = {INPUT_NAME: {0: "batch", **{2 + i: f"in_{i}" for i in range(dims)}},
            OUTPUT_NAME: {0: "batch", **{2 + i: f"out_{i}" for i in range(dims)}}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (sample,), str(path), dynamo=False, dynamic_axes=axes, **kw)
    return "torch.onnx.export(dynamo=False)"


def _dynamic_axes_ok(path: Path, dims: int) -> bool:
    """Whether the ONNX input's batch and spatial axes are all symbolic."""
    import onnx

    shape = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return len(shape) == dims + 2 and all(shape[i].dim_param for i in [0, *range(2, dims + 2)])


def _opset_of(path: Path) -> int | None:
    import onnx

    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return next((int(o.version) for o in opsets if o.domain in ("", "ai.onnx")), None)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=1).numpy()


def predict_exported(path: str | Path, array: np.ndarray) -> np.ndarray:
    """Class indices (*S) int64 of an image (C, *S) (or (*S), one channel) from an export alone."""
    return Segmenter(*exported_backend(path)).predict(array)
