"""Safe serialisation of runs: weights and resumable state in safetensors, never pickle.

``model.safetensors`` holds the weights alone; ``last.safetensors`` adds the optimizer state and
the RNG as tensors, and the loop's scalars as JSON in the file's metadata, so one atomic rename
replaces the whole resumable state at once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UsegError
from .files import atomic_path
from .model import UNet

HEADER_MAX = 100 * 2**20  # bytes of a safetensors JSON header beyond which the file is taken as damaged


def not_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return sorted(k for k, v in tensors.items()
                  if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def _refuse_not_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Never write diverged weights: a NaN model predicts background everywhere without a word."""
    bad = not_finite(tensors)
    if bad:
        raise UsegError(f"refusing to write {path}: {len(bad)} tensors ({', '.join(bad[:3])}) are not finite "
                        "(NaN or inf), so the training diverged; lower --lr and train again")


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write the model's weights (state dict) to ``path`` atomically.

    Raises:
        UsegError: a weight is NaN or infinite (nothing is written then).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _refuse_not_finite(tensors, path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
    """Model, optimizer and loop state in one safetensors file (scalars in its JSON metadata).

    Raises:
        UsegError: a weight is NaN or infinite (nothing is written then).
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _refuse_not_finite(tensors, path)
    osd = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"param_groups": osd["param_groups"], "optim_scalars": scalars, "state": state}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"useg": json.dumps(meta)})


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["useg"])
    except Exception as e:  # a damaged file must not become a traceback
        raise UsegError(f"cannot read checkpoint {path} ({e}); start again without --resume") from None
    if not_finite({k: v for k, v in tensors.items() if k.startswith("model.")}):
        raise UsegError(f"{path} holds weights that are not finite (NaN or inf): the training diverged; "
                        "start again without --resume and with a lower --lr")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["state"]


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone (no tensor is read).

    The format starts with an 8-byte little-endian header length and that many bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.

    Raises:
        UsegError: the file is missing, truncated or its header is not safetensors.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > HEADER_MAX:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        return {k: tuple(int(s) for s in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; train the run again or restore the file") from None
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError) as e:
        raise UsegError(f"cannot read {path} ({e}); the file is damaged, retrain or restore it") from None


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the state dict of ``UNet.from_config(cfg)``, built on the meta device.

    Nothing is allocated, so a plan.json edited to a huge width costs no memory before the weights
    are compared with it.
    """
    with torch.device("meta"):
        model = UNet.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against(path: Path, expected: dict[str, tuple[int, ...]], prefix: str = "") -> None:
    """Compare the tensors in ``path``'s header (names under ``prefix``) with ``expected`` shapes.

    Raises:
        UsegError: a missing, unexpected or differently shaped tensor, in one sentence naming the file.
    """
    stored = {k[len(prefix):]: v for k, v in header_shapes(path).items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or extra or wrong:
        detail = "; ".join(
            s for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shape mismatch {[(k, stored[k], expected[k]) for k in wrong[:3]]}" if wrong else "",
            ) if s
        )
        raise UsegError(f"{path} does not match its plan.json ({detail}); the run folder is inconsistent")


def load_model(cfg: Any, path: Path) -> torch.nn.Module:
    """``UNet.from_config(cfg)`` with the weights of ``path``, compared with the plan before it is built.

    Raises:
        UsegError: the file is damaged, does not match ``cfg`` or holds non-finite weights.
    """
    check_against(path, expected_shapes(cfg))
    model = UNet.from_config(cfg)
    load_weights(model, path)
    return model


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors state dict, naming any mismatch with the plan's network (from the header,
    before any tensor is read)."""
    check_against(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UsegError(f"cannot read {path} ({e}); the file is damaged, retrain or restore it") from None
    bad = not_finite(state)
    if bad:
        raise UsegError(f"{path} holds weights that are not finite (NaN or inf, e.g. {bad[0]}): the training "
                        "that wrote it diverged; train again with a lower --lr")
    model.load_state_dict(state)


def weights_digest(path: Path) -> str:
    """The sha256 (hex) of a weights file: ties an export to the exact weights it was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
