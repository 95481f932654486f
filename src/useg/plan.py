"""The plan's schema: every choice needed to rebuild the model and its pre-processing, as plan.json.

A plan is a few frozen dataclasses (one per concern) and their JSON round trip, nothing else: the
rules that fill them in (presets, patch, batch, spacing) are :mod:`useg.planner`'s. A variant (a
preset, a user override) is a different value, never a subclass. Field names are the plan.json
keys, so run folders written before stay loadable.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .augment import AugmentConfig
from .errors import UsegError
from .files import atomic_path, refuse_special
from .labels import LabelMap
from .spec import BOUNDS, COUNT

PLAN_VERSION = 1
MAX_DEPTH = 30  # poolings: 2^30 pixels pool into one, beyond any image (files.MAX_PIXELS is 2^30 in all)


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 1  # image channels the network reads
    num_classes: int = 2  # output classes, background included
    dims: int = 2  # 2 for images, 3 for volumes
    width: int = 32  # channels at the first level (the paper: 64)
    depth: int = 4  # number of 2x poolings (the paper: 4)
    padding: str = "same"  # "same" or "valid" (the paper)
    up: str = "transpose"  # "transpose" (the paper's up-convolution) or "interp"
    norm: str | None = "batch"  # None (the paper), "batch" or "instance"
    dropout: float = 0.0  # dropout at the end of the contracting path (the paper: 0.5)
    max_width: int | None = None  # channel cap of the deep levels (nnU-Net 3D: 320); None doubles each level


@dataclass(frozen=True)
class DataConfig:
    label_map: LabelMap  # stored mask value of each class, to decode and encode masks
    patch_size: tuple[int, ...] = (256, 256)  # network input during training (and inference tile)
    # "zscore" per image, "zscore_mask" inside the object, "ct" global clip + scale
    normalization: str = "zscore"
    intensity: tuple[tuple[float, ...], ...] = ()  # per channel (lo, hi, mean, std) of the foreground, "ct"
    resample: bool = False  # resample every case to ``spacing`` (3D data of varying spacing)
    channel_names: tuple[str, ...] = ()  # channel file prefixes of case-folder data (found at predict time)
    # nested regions (class indices, outer to inner): one sigmoid output each
    regions: tuple[tuple[int, ...], ...] = ()
    fg_fraction: float = 0.33  # share of patches centred on a foreground pixel (nnU-Net: 1/3)
    spacing: tuple[float, ...] = (1.0, 1.0)  # target spacing: median of the training images (nnU-Net's rule)
    slice_axis: int | None = None  # the axis of (X, Y, Z) across which volumes are cut into 2D slices
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # joint image/label transforms
    border_weights: bool = False  # weight the loss by the paper's eq. 2 map (separates touching objects)
    w0: float = 10.0  # eq. 2 border weight (the paper: 10)
    sigma: float = 5.0  # eq. 2 border width in pixels (the paper: 5)
    roi: bool = False  # trained with a region-of-interest mask per image (--roi): labels outside ignored
    ignore_value: int | None = None  # mask value of unlabelled pixels (nnU-Net's "ignore"): not trained on
    pairing: str = "same stem"  # the rule that paired images with masks (useg.pairing's names)
    image_pattern: str | None = None  # the --image-pattern the run was trained with
    mask_pattern: str | None = None  # the --mask-pattern the run was trained with


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"  # "adamw" or "sgd" (the paper: SGD, momentum 0.99)
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW) / L2 (SGD)
    momentum: float = 0.99  # SGD momentum (unused by AdamW)
    schedule: str = "poly"  # "poly" (nnU-Net: (1 - t)^0.9), "cosine" or "constant"
    warmup: float = 0.02  # fraction of training with a linear learning-rate warm-up
    loss: str = "dice_ce"  # "dice_ce", "ce" or "dice"
    epochs: int = 100  # upper bound on epochs (a time budget may stop earlier)
    iters_per_epoch: int = 50  # optimizer steps per epoch
    # patches per step: decided by useg.planner.batch_size (2D: about 8 x 256^2 pixels, 3D: 2, or the
    # preset's); 8 is here only because a dataclass field needs a default, plan.json always holds it
    batch_size: int = 8
    val_fraction: float = 0.2  # share of cases held out for validation when no --val is given
    seed: int = 0  # seeds model init, sampling and augmentation
    precision: str = "auto"  # "auto" (bf16 on bf16 CPUs and CUDA), "fp32", "bf16", "fp16"
    workers: int = -1  # DataLoader workers; -1 picks from the machine
    deterministic: bool = False  # fp32, deterministic kernels, step-based schedule: exact replays

    def __post_init__(self) -> None:
        # Every plan passes here (the planner, plan.json, the API): a run of no step would exit 0 without
        # a model, so the counts are refused where they enter, named by their command-line flags.
        counts = (("epochs", "--epochs"), ("iters_per_epoch", "--iters"), ("batch_size", "--batch-size"))
        for name, flag in counts:
            value = getattr(self, name)
            if not BOUNDS[name].holds(value):
                raise UsegError(f"{flag} (the plan's train.{name}) must be {BOUNDS[name].what}, "
                                f"got {value!r}; give a positive value")


@dataclass(frozen=True)
class InferConfig:
    tile: tuple[int, ...] = (256, 256)  # network input size of one tile
    overlap: float = 0.5  # sliding-window overlap for same padding (nnU-Net: 0.5)
    batch_size: int = 4  # tiles per forward
    tta: bool = False  # average over flips at test time
    tta_rotate: bool = False  # with tta, also the transposed versions (2D square tiles): all 8 symmetries
    largest_component: bool = False  # keep only each class's largest connected component (nnU-Net's option)


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    preset: str = "default"  # the named recipe this plan started from
    version: int = PLAN_VERSION  # plan.json format version
    # how the network was sized to this machine's compute for a time budget (useg.sizing): the
    # rule, the measured seconds per step of each candidate and the reason; None when not sized
    sizing: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        problem = _problem(self)  # every plan is valid: made by the planner or read from plan.json
        if problem:
            raise UsegError(problem)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists, the label map its own dict)."""
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict`'s output; unknown keys are refused."""
        return _from_jsonable(cls, d)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan.json written by :meth:`save`."""
        path = Path(path)
        refuse_special(path, "the plan.json 'useg train' wrote")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsegError(f"{path} does not exist; point at a run folder made by 'useg train'") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsegError(f"{path} is not valid JSON ({e}); re-run 'useg train' to recreate it") from None
        if d.get("version", 0) > PLAN_VERSION:
            raise UsegError(f"{path} was written by a newer useg (plan version {d['version']}); upgrade useg")
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError, ValueError) as e:
            raise UsegError(f"{path} is not a useg plan ({e}); re-run 'useg train' to recreate it") from None


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _model_problem(m: ModelConfig) -> str | None:
    """The first impossible value of the network's fields (the CLI flag in brackets), or None."""
    for name, flag in (("width", "--width"), ("depth", "--depth"), ("in_channels", ""), ("num_classes", "")):
        value = getattr(m, name)
        if not BOUNDS.get(name, COUNT).holds(value):
            return f"the {name} must be {COUNT.what}{f' ({flag})' if flag else ''}, not {value!r}"
    if m.depth > MAX_DEPTH:  # 2^depth pixels pool into one: beyond any image, and 2**depth itself would hang
        return f"the depth must be at most {MAX_DEPTH} (--depth), not {m.depth!r}"
    if m.max_width is not None and not _whole(m.max_width, 1):
        return f"max_width must be a whole number >= 1 or null, not {m.max_width!r}"
    if m.dims not in (2, 3):
        return f"dims must be 2 or 3, not {m.dims!r}"
    choices = {"padding": ("same", "valid"), "up": ("transpose", "interp"),
               "norm": (None, "batch", "instance")}
    for name, allowed in choices.items():
        if getattr(m, name) not in allowed:
            return f"the {name} must be one of {', '.join(map(str, allowed))}, not {getattr(m, name)!r}"
    if not BOUNDS["dropout"].holds(m.dropout):
        return f"the dropout must lie in [0, 1) (--dropout), not {m.dropout!r}"
    return None


def check_model(m: ModelConfig) -> None:
    """Raise a UsegError naming the first impossible network field (``--width 0``, ``--dropout 1.5``)."""
    problem = _model_problem(m)
    if problem:
        raise UsegError(problem)


def sizes_problem(what: str, size: Any, dims: int, flag: str | None = None) -> str | None:
    """Why ``size`` is no patch or tile of ``dims`` axes, as a sentence; None when it is one.

    The one rule for a patch given on the command line (``flag``, e.g. "--patch", named as typed)
    and one read from plan.json (``what``, with the field's value).

    >>> sizes_problem("patch", (32,), 2, flag="--patch")
    '--patch 32 has 1 axes but the images have 2; give 2 sizes like --patch 64,64'
    """
    example = ",".join(["64"] * dims)
    if flag:
        name, like = f"{flag} {','.join(map(str, size))}", f"{flag} {example}"
    else:
        name, like = f"the {what} {size!r}", example
    if not isinstance(size, tuple) or len(size) != dims:
        n = len(size) if isinstance(size, tuple) else "no"
        return f"{name} has {n} axes but the images have {dims}; give {dims} sizes like {like}"
    if not all(_whole(s, 1) for s in size):
        return f"{name} holds a size below 1 (or no whole number); it must hold whole numbers >= 1, {like}"
    return None


def data_dims(plan: Plan) -> int:
    """The spatial dimensions of the data the plan reads: 3 for a plan on 2D slices of volumes
    (``data.slice_axis`` set, a 2D network), else the network's (``model.dims``)."""
    return 3 if plan.data.slice_axis is not None else plan.model.dims


def _slices_problem(plan: Plan) -> str | None:
    """Why ``slice_axis`` is impossible (a slice plan has a 2D network on 3D data); None if it is fine."""
    axis = plan.data.slice_axis
    if axis is None:
        return None
    if not (_whole(axis, 0) and axis <= 2):
        return f"slice_axis must be 0, 1 or 2 (an axis of X, Y, Z) or null, not {axis!r}"
    if plan.model.dims != 2:
        return f"a plan on slices (slice_axis {axis}) has a 2D network, not a {plan.model.dims}D one"
    return None


def _problem(plan: Plan) -> str | None:
    """The first value of ``plan`` that no training or prediction could use, as a sentence; None if none.

    Checked at construction, so the planner's output and a plan.json read back pass the same rules.
    The epochs, steps per epoch and batch size are checked where the run starts (useg.pipeline).
    """
    m, d, i = plan.model, plan.data, plan.infer
    found = (_model_problem(m) or _slices_problem(plan)
             or sizes_problem("patch size (--patch)", d.patch_size, m.dims)
             or sizes_problem("tile", i.tile, m.dims))
    if found:
        return found
    dims = data_dims(plan)  # a slice plan keeps the volumes' 3D spacing: resampling stays 3D
    if len(d.spacing) != dims or not all(isinstance(s, (int, float)) and 0 < s < float("inf")
                                         for s in d.spacing):
        return f"the spacing {d.spacing!r} must hold {dims} positive finite numbers"
    if not (isinstance(i.overlap, (int, float)) and 0 <= i.overlap < 1):
        return f"the tile overlap must lie in [0, 1), not {i.overlap!r}"
    if not _whole(i.batch_size, 1):
        return f"the inference batch size must be a whole number >= 1, not {i.batch_size!r}"
    if not (isinstance(d.fg_fraction, (int, float)) and 0 <= d.fg_fraction <= 1):
        return f"fg_fraction must lie in [0, 1], not {d.fg_fraction!r}"
    if plan.sizing is not None and not isinstance(plan.sizing, dict):
        return f"sizing must be an object or null, not {plan.sizing!r}"
    return _train_problem(plan.train)


def _train_problem(t: TrainConfig) -> str | None:
    """The first impossible training field but epochs, steps and batch (checked where a run starts)."""
    if not BOUNDS["lr"].holds(t.lr):
        return f"the learning rate must be a positive finite number (--lr), not {t.lr!r}"
    choices = {"optimizer": ("adamw", "sgd"), "loss": ("dice_ce", "ce", "dice"),
               "schedule": ("poly", "cosine", "constant"), "precision": ("auto", "fp32", "bf16", "fp16")}
    for name, allowed in choices.items():
        if getattr(t, name) not in allowed:
            return f"the {name} must be one of {', '.join(allowed)}, not {getattr(t, name)!r}"
    bounds = (("weight_decay", float("inf")), ("momentum", 1.0), ("warmup", 1.0), ("val_fraction", 1.0))
    for name, high in bounds:
        value = getattr(t, name)
        if not (isinstance(value, (int, float)) and 0 <= value < high):
            return f"{name} must lie in [0, {high:g}), not {value!r}"
    if not BOUNDS["seed"].holds(t.seed):
        return f"the seed must be {BOUNDS['seed'].what} (--seed), not {t.seed!r}"
    if not BOUNDS["workers"].holds(t.workers):
        return f"workers must be a whole number >= 0, or -1 for automatic (--workers), not {t.workers!r}"
    return None


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, LabelMap):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_jsonable(v) for v in obj]
    return obj


def _from_jsonable(tp: Any, value: Any) -> Any:
    """Convert JSON values back into the annotated dataclass / tuple types."""
    origin = typing.get_origin(tp)
    if tp is LabelMap:
        return LabelMap.from_dict(value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"unknown {tp.__name__} fields {sorted(unknown)}")
        return tp(**{k: _from_jsonable(hints[k], v) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_jsonable(args[0], value)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_from_jsonable(inner, v) for v in value)
    return value
