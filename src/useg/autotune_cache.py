"""What the measured backend choice keeps: the user's cache of measurements and exports, the agreement tile.

:func:`useg.autotune.choose` measures once per machine and weights; :func:`read_cached` /
:func:`write_cached` keep the record in the user's cache folder (:func:`cache_dir`, one file per
weights hash, keyed by machine; never the run folder, which predict leaves unchanged, and an
unwritable cache only means measuring again), :func:`onnx_file` the on-the-fly ONNX export that
ONNX Runtime and OpenVINO run. :func:`save_agreement_tile` is what training leaves in a run for
the agreement check, :func:`agreement_tile` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, read_sidecar, sidecar_path
from .errors import UsegError
from .files import atomic_path, atomic_write_text
from .plan import Plan

logger = logging.getLogger(__name__)

CACHE_KEY = "backends"  # in inference.json: machine key -> measurement
TILE_FILE = "agreement_tile.safetensors"  # in a run folder: a validation tile training leaves for the check


def cache_dir() -> Path:
    """The user's cache folder for backend timings and on-the-fly exports: ``$USEG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/useg`` (``~/.cache/useg``). Never the run folder: predict changes no input."""
    given = os.environ.get("USEG_CACHE_DIR")
    return Path(given) if given else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "useg"


def _record_files(digest: str) -> list[Path]:
    """Where the measurements of these weights are kept: one file per weights hash in the user cache."""
    return [cache_dir() / f"inference-{digest[:16]}.json"]


def read_cached(key: str, digest: str, tile: Sequence[int]) -> dict | None:
    """The cached measurement of machine ``key`` for these weights and tile; None if stale or absent."""
    for path in _record_files(digest):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))[CACHE_KEY][key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (isinstance(entry, dict) and entry.get("weights_sha256") == digest
                and entry.get("tile") == list(tile) and entry.get("chosen") in BACKENDS):
            return entry
    return None


def write_cached(key: str, entry: dict) -> Path | None:
    """Store ``entry`` under ``key`` in the user cache's record of these weights (other machines kept)."""
    for path in _record_files(entry["weights_sha256"]):
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        table = data.get(CACHE_KEY) if isinstance(data.get(CACHE_KEY), dict) else {}
        # entries of other weights can never be used again: keep only this run's current ones
        table = {k: v for k, v in table.items() if isinstance(v, dict)
                 and v.get("weights_sha256") == entry["weights_sha256"]}
        data[CACHE_KEY] = {**table, key: entry}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=2) + "\n")
            return path
        except OSError as e:
            logger.info("cannot cache the backend choice in %s (%s)", path, e)
    return None


def onnx_file(run: Path, digest: str, export: bool = True) -> Path | None:
    """An ONNX export of the run's current weights: ``RUN/model.onnx`` when it is one, else one
    exported now (legacy exporter, verified by :func:`useg.export.export_run`) into a cache folder;
    without ``export``, None where none exists yet.

    Raises:
        UsegError: no cache folder is writable.
    """
    exported = run / "model.onnx"
    if exported.exists():
        try:
            if read_sidecar(exported)[1]["format"] == "onnx":
                return exported
        except UsegError:
            pass  # stale or foreign: export our own
    name = f"model-{digest[:16]}.onnx"
    folders = [cache_dir() / "onnx"]
    for path in (f / name for f in folders):
        if path.exists() and sidecar_path(path).exists():
            return path
    if not export:
        return None
    from .export import export_run  # imports onnx and the exporter: only when an export is needed

    for path in (f / name for f in folders):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return export_run(run, path, "onnx", dynamo=False)
        except OSError as e:
            logger.info("cannot write %s (%s)", path, e)
    raise UsegError(f"cannot write an ONNX export of {run} into {folders[0]}; "
                    "make it writable (or set USEG_CACHE_DIR) or pass --backend torch")


def agreement_tile(run: Path, plan: Plan) -> torch.Tensor:
    """(1, C, *tile) float32: the validation tile training saved (:func:`save_agreement_tile`), or, for
    an older run, a seeded standard-normal tile (a harder test: no image structure to be sure about)."""
    shape = (plan.model.in_channels, *plan.infer.tile)
    try:
        from safetensors.torch import load_file

        tile = load_file(str(run / TILE_FILE))["tile"].float()
        if tuple(tile.shape) == shape and bool(torch.isfinite(tile).all()):
            return tile[None].contiguous()
    except Exception:  # noqa: BLE001 - absent or damaged (safetensors' own error): the random tile will do
        pass
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def save_agreement_tile(run: Path, plan: Plan, images: Sequence[np.ndarray]) -> None:
    """Keep a tile of the plan's shape from the first image (its centre, mirrored where smaller) for
    the agreement check of later predictions (float16, ``RUN/agreement_tile.safetensors``)."""
    if not images:
        return
    from safetensors.torch import save_file

    image, tile = np.asarray(images[0], np.float32), plan.infer.tile
    pads = [(0, 0)] + [(0, max(0, t - s)) for s, t in zip(image.shape[1:], tile)]
    image = np.pad(image, pads, mode="symmetric")
    starts = [(s - t) // 2 for s, t in zip(image.shape[1:], tile)]
    crop = image[(slice(None), *(slice(a, a + t) for a, t in zip(starts, tile)))]
    with atomic_path(run / TILE_FILE) as tmp:
        save_file({"tile": torch.from_numpy(np.ascontiguousarray(crop)).half()}, str(tmp))
