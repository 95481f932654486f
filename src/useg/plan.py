"""The plan: every choice needed to rebuild the model and its pre-processing, saved as plan.json.

A plan is a few frozen dataclasses (one per concern) made from a dataset check by
:func:`make_plan`. A variant (a preset, a user override) is a different value, never a subclass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .augment import AugmentConfig
from .files import atomic_path
from .labels import LabelMap
from .model import valid_input_size

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


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
    normalization: str = "zscore"  # "zscore" per image, "zscore_mask" inside the object, "ct" global clip + scale
    intensity: tuple[tuple[float, ...], ...] = ()  # per channel (lo, hi, mean, std) of the foreground, for "ct"
    resample: bool = False  # resample every case to ``spacing`` (3D data of varying spacing)
    channel_names: tuple[str, ...] = ()  # channel file prefixes of case-folder data (to find them at predict time)
    regions: tuple[tuple[int, ...], ...] = ()  # nested regions (class indices, outer to inner): one sigmoid output each
    fg_fraction: float = 0.33  # share of patches centred on a foreground pixel (nnU-Net: 1/3)
    spacing: tuple[float, ...] = (1.0, 1.0)  # target spacing: median of the training images (nnU-Net's rule)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # joint image/label transforms
    border_weights: bool = False  # weight the loss by the paper's eq. 2 map (separates touching objects)
    w0: float = 10.0  # eq. 2 border weight (the paper: 10)
    sigma: float = 5.0  # eq. 2 border width in pixels (the paper: 5)


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
    batch_size: int = 8  # patches per step
    val_fraction: float = 0.2  # share of cases held out for validation when no --val is given
    seed: int = 0  # seeds model init, sampling and augmentation
    precision: str = "auto"  # "auto" (bf16 on bf16 CPUs and CUDA), "fp32", "bf16", "fp16"
    workers: int = -1  # DataLoader workers; -1 picks from the machine
    deterministic: bool = False  # fp32, deterministic kernels, step-based schedule: exact replays


@dataclass(frozen=True)
class InferConfig:
    tile: tuple[int, ...] = (256, 256)  # network input size of one tile
    overlap: float = 0.5  # sliding-window overlap for same padding (nnU-Net: 0.5)
    batch_size: int = 4  # tiles per forward
    tta: bool = False  # average over flips at test time
    tta_rotate: bool = False  # with tta, also the transposed versions (2D square tiles): all 8 symmetries
    largest_component: bool = False  # keep only the largest connected component of each class (nnU-Net's option)


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    preset: str = "default"  # the named recipe this plan started from
    version: int = PLAN_VERSION  # plan.json format version

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
        from .errors import UsegError

        path = Path(path)
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


def target_spacing(spacings: list[tuple[float, ...]]) -> tuple[float, ...]:
    """nnU-Net's target spacing: the median per axis; for anisotropic data (one axis over 3x
    coarser than the finest) that axis takes the 10th percentile instead, so thick slices are not
    interpolated into many thin ones (Isensee et al. 2021)."""
    arr = np.asarray(spacings, dtype=np.float64)
    target = np.median(arr, axis=0)
    worst = int(np.argmax(target))
    if arr.shape[1] == 3 and target[worst] > 3 * target.min():
        target[worst] = np.percentile(arr[:, worst], 10)
    return tuple(float(v) for v in target)


def default_patch_size(image_shapes: list[tuple[int, ...]], model: ModelConfig, max_edge: int = 256) -> tuple[int, ...]:
    """A training patch: the median image size capped at ``max_edge``, rounded up to a valid size.

    Args:
        image_shapes: spatial shapes of the training images.
        model: the network, whose depth and padding decide which sizes are valid.
        max_edge: the largest patch edge (memory and speed on a CPU).
    """
    if not image_shapes:
        raise ValueError("image_shapes is empty")
    dims = len(image_shapes[0])
    med = [sorted(s[i] for s in image_shapes)[len(image_shapes) // 2] for i in range(dims)]
    want = tuple(min(m, max_edge) for m in med)
    return valid_input_size(want, model.depth, model.padding)


def make_plan(
    label_map: LabelMap,
    channels: int,
    image_shapes: list[tuple[int, ...]],
    spacings: list[tuple[float, ...]] | None = None,
    preset: str = "default",
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    infer: dict[str, Any] | None = None,
    patch_size: tuple[int, ...] | None = None,
    data: dict[str, Any] | None = None,
) -> Plan:
    """Plan a training from what a dataset check found.

    Args:
        label_map: the masks' encoding (from :func:`useg.dataset.check_dataset`).
        channels: image channels.
        image_shapes: spatial shape of every training image.
        spacings: spacing of every image (median is kept in the plan).
        preset: the named recipe; only "default" for now.
        model, train, infer, data: field overrides for the matching config.
        patch_size: an explicit training patch (rounded up to a valid size).

    Returns:
        The plan.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    dims = len(image_shapes[0])
    base = PRESETS[preset]
    regions = (data or {}).get("regions", ())
    mcfg = dataclasses.replace(base.model, **{
        "in_channels": channels, "num_classes": len(regions) or label_map.num_classes, "dims": dims, **(model or {})})
    if patch_size is None:
        patch = default_patch_size(image_shapes, mcfg, base.max_edge)
    else:
        if len(patch_size) != dims:
            raise ValueError(f"patch size {patch_size} has {len(patch_size)} axes but the images have {dims}")
        patch = valid_input_size(tuple(patch_size), mcfg.depth, mcfg.padding)
    spacing = tuple(1.0 for _ in range(dims))
    if spacings:
        spacing = target_spacing(spacings)
    tcfg = dataclasses.replace(base.train, **(train or {}))
    # Smaller patches than 256^2 leave compute on the table: keep about 8 x 256^2 pixels per step.
    if base.auto_batch and (not train or "batch_size" not in train):
        area = 1
        for p in patch:
            area *= p
        tcfg = dataclasses.replace(tcfg, batch_size=int(max(2, min(32, round(8 * 256 * 256 / area)))))
    icfg = dataclasses.replace(base.infer, tile=patch, **(infer or {}))
    data = DataConfig(label_map=label_map, patch_size=patch, spacing=spacing, **{**base.data, **(data or {})})
    plan = Plan(model=mcfg, data=data, train=tcfg, infer=icfg, preset=preset)
    logger.info("plan: %s", explain(plan))
    return plan


def explain(plan: Plan) -> str:
    """One line per choice, for `useg plan` and the logs."""
    m, d, t = plan.model, plan.data, plan.train
    return "\n".join(
        [
            f"network: {m.dims}D U-Net, width {m.width}, depth {m.depth}, {m.padding} padding, "
            f"{m.up} up-sampling, norm {m.norm}, dropout {m.dropout} (preset {plan.preset})",
            f"classes: {m.num_classes} (mask values {list(d.label_map.values)} as {d.label_map.mode})",
            f"patch: {'x'.join(map(str, d.patch_size))} (median image size capped for speed), "
            f"batch {t.batch_size}, foreground oversampling {d.fg_fraction:.2f}",
            f"optimizer: {t.optimizer} lr {t.lr:g} with {t.schedule} schedule, loss {t.loss}, "
            f"up to {t.epochs} epochs x {t.iters_per_epoch} steps",
            f"normalization: {d.normalization}; inference tile {'x'.join(map(str, plan.infer.tile))}, "
            f"overlap {plan.infer.overlap}{', mirroring TTA' if plan.infer.tta else ''}",
        ]
        + ([f"loss weights: the paper's border map, w0 {d.w0:g}, sigma {d.sigma:g} px"] if d.border_weights else [])
    )


@dataclass(frozen=True)
class _Preset:
    model: ModelConfig  # the network (in/out channels and dims come from the data)
    train: TrainConfig  # optimizer, loss, schedule
    infer: InferConfig  # tiling (the tile comes from the patch)
    data: dict = field(default_factory=dict)  # DataConfig fields: augmentation, border weights
    max_edge: int = 256  # largest training patch edge
    auto_batch: bool = True  # scale the batch to about 8 x 256^2 pixels per step


PRESETS: dict[str, _Preset] = {
    "default": _Preset(ModelConfig(), TrainConfig(), InferConfig()),
    # Ronneberger et al. 2015: unpadded convs, up-convolutions, no normalisation, dropout at the
    # end of the contracting path, pixel-weighted cross-entropy with the eq. 2 border map, SGD with
    # momentum 0.99 on single large tiles, elastic deformation, overlap-tile prediction averaged
    # over mirrored versions (the paper averaged 7 rotated/flipped ones).
    "paper": _Preset(
        ModelConfig(width=64, depth=4, padding="valid", up="transpose", norm=None, dropout=0.5),
        TrainConfig(optimizer="sgd", lr=0.01, momentum=0.99, weight_decay=0.0, loss="ce", batch_size=1,
                    schedule="constant", warmup=0.0),
        InferConfig(tta=True, tta_rotate=True, batch_size=1),
        data={"border_weights": True, "w0": 10.0, "sigma": 5.0,
              "augment": AugmentConfig(p_elastic=0.5, elastic_grid=3, elastic_std=10.0)},
        max_edge=572,
        auto_batch=False,
    ),
}
