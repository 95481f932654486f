"""Self-configuration: every rule that fills in a :class:`useg.plan.Plan`, each choice explained.

The schema (:mod:`useg.plan`) holds values; this module decides them: the named presets, the
target spacing, the patch, the batch (:func:`batch_size`, the one place it is chosen), and for a
checked dataset its fingerprint and the plan it implies (:func:`plan_dataset`).

Follows nnU-Net's rules (Isensee et al. 2021) where they carry over to one network family:
target spacing is the median (10th percentile on a thick-slice axis), CT is clipped to the
foreground's 0.5/99.5 percentiles and scaled by its global mean and std while other modalities
are z-scored per image (inside the object when a constant background dominates), the network is
as deep as the patch allows (pool until the smallest edge is about 4 voxels, at most 5 times, 3D
widths capped at 320), and the patch is the largest that fits the memory budget. On a CPU
compute, not memory, is the limit, so 3D patches are also capped in voxels and the 3D width
halved: a step then takes seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .augment import AugmentConfig
from .check import CaseRecord, CheckReport
from .dataset import format_axes
from .errors import UsegError
from .labels import LabelMap, region_classes
from .memory import check_cases
from .model import input_size_for_output, valid_input_size
from .plan import DataConfig, InferConfig, ModelConfig, Plan, TrainConfig, check_model, sizes_problem
from .slices import describe, in_plane_shapes, reason, slice_axis_of, sliced
from .spec import Overrides

logger = logging.getLogger(__name__)

CPU_MAX_VOXELS_3D = 96 * 96 * 64  # 3D patch cap on a CPU (about 4 s per step of 2 at width 16 on 2 cores)
MIN_EDGE = 4  # pool until the smallest patch edge would drop below this (nnU-Net)
MAX_DEPTH = 5
BACKGROUND_SHARE_FOR_MASK = 0.25  # constant background above this share -> normalise inside the object
BATCH_3D = 2  # nnU-Net: patches as large as memory allows, two per step


@dataclass(frozen=True)
class _Preset:
    model: ModelConfig  # the network (in/out channels and dims come from the data)
    train: TrainConfig  # optimizer, loss, schedule
    infer: InferConfig  # tiling (the tile comes from the patch)
    data: dict = field(default_factory=dict)  # DataConfig fields: augmentation, border weights
    max_edge: int = 256  # largest training patch edge
    auto_batch: bool = True  # 2D: scale the batch to about 8 x 256^2 pixels per step; False keeps train's


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


def target_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """nnU-Net's target spacing: the median per axis; for anisotropic data (one axis over 3x
    coarser than the finest) that axis takes the 10th percentile instead, so thick slices are not
    interpolated into many thin ones (Isensee et al. 2021)."""
    arr = np.asarray(spacings, dtype=np.float64)
    target = np.median(arr, axis=0)
    worst = int(np.argmax(target))
    if arr.shape[1] == 3 and target[worst] > 3 * target.min():
        target[worst] = np.percentile(arr[:, worst], 10)
    return tuple(float(v) for v in target)


def default_patch_size(image_shapes: Sequence[tuple[int, ...]], model: ModelConfig, max_edge: int = 256
                       ) -> tuple[int, ...]:
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


def batch_size(preset: str, dims: int, patch: Sequence[int] | None, train: Mapping[str, Any]) -> int:
    """Patches per optimizer step; the only place the batch is chosen.

    The user's ``train["batch_size"]`` wins; 3D takes :data:`BATCH_3D`; a preset without
    ``auto_batch`` keeps its own (the paper: 1 large tile); otherwise 2D keeps about 8 x 256^2
    pixels per step, since smaller patches than 256^2 leave compute on the table: between 2 and 32.

    Args:
        preset: the named recipe (a key of :data:`PRESETS`).
        dims: spatial dimensions of the data.
        patch: the training patch; only the 2D automatic batch reads it.
        train: the user's TrainConfig overrides.
    """
    if "batch_size" in train:
        return int(train["batch_size"])
    if dims == 3:
        return BATCH_3D
    base = PRESETS[preset]
    if not base.auto_batch:
        return base.train.batch_size
    if patch is None:
        raise ValueError("the automatic 2D batch needs the patch size")
    return int(max(2, min(32, round(8 * 256 * 256 / math.prod(patch)))))


def make_plan(label_map: LabelMap, num_channels: int, image_shapes: Sequence[tuple[int, ...]],
              spacings: Sequence[tuple[float, ...]] | None = None,
              overrides: Overrides | None = None) -> Plan:
    """Plan a training from the preset's rules and what a dataset check found.

    Args:
        label_map: the masks' encoding (from :func:`useg.check.check_dataset`).
        num_channels: image channels.
        image_shapes: spatial shape of every training image.
        spacings: spacing of every image (the target spacing is kept in the plan).
        overrides: the preset and the fields fixed by hand (they win over the preset); its
            ``patch_size`` is rounded up to a valid size. ``memory_gb`` and ``regions`` are
            :func:`plan_dataset`'s (``data["regions"]`` holds class indices here).

    Returns:
        The plan.

    Raises:
        ValueError: an unknown preset, or a patch with another number of axes than the images.
    """
    ov = overrides or Overrides()
    if ov.preset not in PRESETS:
        raise ValueError(f"unknown preset {ov.preset!r}; choose one of {', '.join(PRESETS)}")
    dims = len(image_shapes[0])
    base = PRESETS[ov.preset]
    regions = ov.data.get("regions", ())
    num_classes = len(regions) or label_map.num_classes
    fixed = {"in_channels": num_channels, "num_classes": num_classes, "dims": dims}  # from the data
    mcfg = dataclasses.replace(base.model, **{**fixed, **ov.model})
    check_model(mcfg)
    spacing = target_spacing(spacings) if spacings else tuple(1.0 for _ in range(dims))
    largest = _largest_shape(image_shapes, spacings, spacing, bool(ov.data.get("resample")))
    mcfg = _possible_depth(mcfg, largest, "depth" in ov.model)
    if ov.patch_size is None:
        patch = default_patch_size(image_shapes, mcfg, base.max_edge)
    else:
        check_patch(ov.patch_size, dims)
        problem = sizes_problem("patch", tuple(ov.patch_size), dims, flag="--patch")  # plan.json's rule
        if problem:
            raise UsegError(problem)
        patch = valid_input_size(tuple(ov.patch_size), mcfg.depth, mcfg.padding)
    patch = _capped_patch(patch, largest, mcfg)
    batch = batch_size(ov.preset, dims, patch, ov.train)
    _refuse_single_value_norm(mcfg, patch, batch)
    tcfg = dataclasses.replace(base.train, **{**ov.train, "batch_size": batch})
    icfg = dataclasses.replace(base.infer, tile=patch, **ov.infer)
    data = DataConfig(label_map=label_map, patch_size=patch, spacing=spacing, **{**base.data, **ov.data})
    plan = Plan(model=mcfg, data=data, train=tcfg, infer=icfg, preset=ov.preset)
    logger.info("plan: %s", explain(plan))
    return plan


def _largest_shape(image_shapes: Sequence[tuple[int, ...]], spacings: Sequence[tuple[float, ...]] | None,
                   target: tuple[float, ...], resample: bool) -> tuple[int, ...]:
    """The largest image edge on each axis, in the voxels training sees (after resampling, if any)."""
    shapes = [tuple(s) for s in image_shapes]
    if resample and spacings:
        shapes = [tuple(max(1, round(n * sp / t)) for n, sp, t in zip(shape, spc, target))
                  for shape, spc in zip(shapes, spacings)]
    return tuple(int(max(axis)) for axis in zip(*shapes))


def _possible_depth(m: ModelConfig, largest: tuple[int, ...], chosen: bool) -> ModelConfig:
    """``m``, or a refusal when its poolings shrink even the largest image edge below one pixel.

    A preset's depth (not the user's) is lowered instead, with a log line, so tiny images still train.
    """
    if 2 ** m.depth <= max(largest):
        return m
    most = int(math.floor(math.log2(max(largest))))
    if chosen or most < 1:
        hint = f"use --depth {most} or less" if most >= 1 else "the images are too small for a U-Net"
        raise UsegError(f"--depth {m.depth} pools {2 ** m.depth} pixels into one, but the largest image is "
                        f"{format_axes(largest)}; {hint}")
    logger.warning("depth %d needs images of at least %d pixels, the largest is %s: using depth %d",
                   m.depth, 2 ** m.depth, format_axes(largest), most)
    return dataclasses.replace(m, depth=most)


def check_patch(patch: Sequence[int], dims: int) -> None:
    """Refuse a ``--patch`` with another number of axes than the images, or a size below 1."""
    given, example = ",".join(map(str, patch)), ",".join(["64"] * dims)
    if len(patch) != dims:
        raise UsegError(f"--patch {given} has {len(patch)} axes but the images have {dims}; "
                        f"give {dims} sizes like --patch {example}")
    if min(patch) < 1:
        raise UsegError(f"--patch {given} holds a size below 1; give sizes like --patch {example}")


def _refuse_single_value_norm(m: ModelConfig, patch: tuple[int, ...], batch: int) -> None:
    """Refuse a same-padding network whose deepest level sees one value per channel: instance norm
    (one voxel) and batch norm (one voxel and a batch of one) cannot normalise it and training fails."""
    bottom = math.prod(max(1, p // 2**m.depth) for p in patch)
    values = {"instance": bottom, "batch": bottom * batch}.get(m.norm)
    if m.padding != "same" or values is None or values > 1 or batch < 1:  # a batch < 1: TrainConfig's
        return
    smallest = 2 ** (m.depth + 1)
    raise UsegError(f"--patch {format_axes(patch)} pools to a single voxel at depth {m.depth}, where "
                    f"{m.norm} norm has one value to normalise; use a patch of at least {smallest} per axis"
                    f"{' or a larger --batch-size' if m.norm == 'batch' else ''}, or a smaller --depth")


def _capped_patch(patch: tuple[int, ...], largest: tuple[int, ...], m: ModelConfig) -> tuple[int, ...]:
    """The patch, each edge at most the smallest valid input that covers the largest image's edge.

    A larger patch would be mostly padding: minutes of training on nothing (``--patch 4096,4096``
    on 48x48 images).
    """
    limit = input_size_for_output(largest, m.depth, m.padding)
    capped = tuple(min(p, c) for p, c in zip(patch, limit))
    if capped != patch:
        logger.warning("patch %s is larger than the images allow (the largest is %s): using %s",
                       format_axes(patch), format_axes(largest), format_axes(capped))
    return capped


def explain(plan: Plan) -> str:
    """One line per choice, for `useg plan` and the logs."""
    m, d, t = plan.model, plan.data, plan.train
    return "\n".join(
        [
            f"network: {describe(plan)}, width {m.width}, depth {m.depth}, {m.padding} padding, "
            f"{m.up} up-sampling, norm {m.norm}, dropout {m.dropout} (preset {plan.preset})",
            f"classes: {m.num_classes} (mask values {list(d.label_map.values)} as {d.label_map.mode})",
            f"patch: {format_axes(d.patch_size)} (median image size capped for speed), "
            f"batch {t.batch_size}, foreground oversampling {d.fg_fraction:.2f}",
            f"optimizer: {t.optimizer} lr {t.lr:g} with {t.schedule} schedule, loss {t.loss}, "
            f"up to {t.epochs} epochs x {t.iters_per_epoch} steps",
            f"normalization: {d.normalization}; inference tile {format_axes(plan.infer.tile)}, "
            f"overlap {plan.infer.overlap}{', mirroring TTA' if plan.infer.tta else ''}",
        ]
        + ([f"loss weights: the paper's border map, w0 {d.w0:g}, sigma {d.sigma:g} px"]
           if d.border_weights else [])
    )


def pooled_intensities(records: Sequence[CaseRecord]) -> list[np.ndarray]:
    """Per channel, the foreground intensity samples of every case that has them, concatenated."""
    samples = [r.samples for r in records if r.samples is not None]
    return [np.concatenate(c) for c in zip(*samples, strict=True)] if samples else []


def fingerprint(report: CheckReport) -> dict[str, Any]:
    """The dataset's fingerprint, computed from a check's per-case records.

    Returns:
        JSON-able dict: cases, dims, channels (a count), median shape, median and per-axis range of
        spacings, per-channel foreground intensity percentiles (0.5, 50, 99.5), mean and std, the
        share of each mask value, of constant background, modality names and the layout.
    """
    records = report.records
    shapes = np.asarray([r.shape for r in records])
    spacings = np.asarray([r.spacing for r in records], dtype=np.float64)
    return {
        "cases": len(report.cases), "dims": int(shapes.shape[1]) if shapes.size else 0,
        "channels": report.num_channels, "layout": report.info.get("layout", "plain"),
        "channel_names": list(report.info.get("channel_names", [])),
        "median_shape": [int(v) for v in np.median(shapes, axis=0)] if shapes.size else [],
        "median_spacing": [round(float(v), 4) for v in np.median(spacings, axis=0)] if spacings.size else [],
        "spacing_range": [[round(float(a), 4), round(float(b), 4)]
                          for a, b in zip(spacings.min(axis=0), spacings.max(axis=0), strict=True)]
                         if spacings.size else [],
        "class_share": report.stats.get("pixel share per mask value", {}),
        "background_share": round(float(np.mean([r.background for r in records])) if records else 0.0, 4),
        "intensity": [
            {"p00_5": float(np.percentile(v, 0.5)), "p50": float(np.percentile(v, 50)),
             "p99_5": float(np.percentile(v, 99.5)), "mean": float(v.mean()), "std": float(v.std())}
            for v in pooled_intensities(records)
        ],
    }


def default_memory_gb(device: str = "auto") -> float:
    """Half the machine's RAM (at most 16 GiB) on a CPU, 80% of the GPU's memory on CUDA."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = 8.0
    return min(16.0, 0.5 * ram)


def training_gib(patch: tuple[int, ...], width: int, depth: int, channels: int, max_width: int | None,
                 batch: int) -> float:
    """Estimated training memory: about 14 fp32 activations per channel and voxel at every level
    (convs, norms, ReLUs on both paths, the concatenation), kept for the backward pass, x1.5 for
    gradients and workspace. An estimate for planning, within a factor of about 2 of the real peak."""
    voxels, total = math.prod(patch), 0.0
    for level in range(depth + 1):
        c = min(width * 2**level, max_width or width * 2**level)
        total += 14 * c * voxels / 2 ** (len(patch) * level)
    total += 2 * channels * voxels
    return 1.5 * 4 * batch * total / 2**30


def parameter_gib(width: int, depth: int, dims: int, channels: int, max_width: int | None) -> float:
    """Estimated memory of the network's weights while training: fp32 weights, gradients and the two
    AdamW moments (16 bytes per weight); the 3^dims convolutions of both paths, biases and norms left out.

    >>> round(parameter_gib(32, 4, 2, 1, None), 3)  # the default 2D network: about 7.8 M weights
    0.116
    """
    widths = [min(width * 2**i, max_width or width * 2**i) for i in range(depth + 1)]
    taps = 3**dims
    weights = taps * (channels * widths[0] + widths[0] ** 2)  # the first double convolution
    for low, high in zip(widths, widths[1:]):  # a level down (2 convs), and back up (2^dims + 2 convs)
        weights += taps * (low * high + high**2) + 2**dims * high * low + taps * 3 * low**2
    return 16 * weights / 2**30


def machine_gib(device: str = "auto") -> float:
    """The memory training can use at most: the GPU's on CUDA, else the machine's RAM (GiB)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")  # unknown: nothing is refused on a guess


def refuse_beyond_machine(plan: Plan, have_gib: float) -> None:
    """Refuse a plan whose training cannot fit in ``have_gib`` (``--width 100000`` would ask the
    allocator for terabytes, or train for days on swap), with the numbers and the flags to lower.

    The estimate (activations of :func:`training_gib` and weights of :func:`parameter_gib`) is within
    a factor of about 2, so only plans beyond the whole machine are refused, never a plan that might fit.
    """
    m, t = plan.model, plan.train
    need = (training_gib(plan.data.patch_size, m.width, m.depth, m.in_channels, m.max_width, t.batch_size)
            + parameter_gib(m.width, m.depth, m.dims, m.in_channels, m.max_width))
    if need > have_gib:
        patch = format_axes(plan.data.patch_size)
        raise UsegError(f"training width {m.width}, depth {m.depth}, patch {patch} "
                        f"and batch {t.batch_size} needs about {need:.3g} GiB but this machine has "
                        f"{have_gib:.3g} GiB; lower --width, --depth, --patch or --batch-size")


def _depth_for(patch: tuple[int, ...]) -> int:
    return max(1, min(MAX_DEPTH, int(math.floor(math.log2(min(patch) / MIN_EDGE)))))


def _fit(patch: list[int], limit) -> list[int]:
    """Shrink the edge that is largest relative to the others until ``limit(patch)`` holds."""
    while not limit(patch) and max(patch) > 8:
        i = int(np.argmax(patch))
        patch[i] = max(8, int(patch[i] * 0.875) // 8 * 8 or 8)
    return patch


def plan_dataset(report: CheckReport, overrides: Overrides | None = None, device: str = "auto"
                 ) -> tuple[Plan, list[str]]:
    """Plan a training from a checked dataset, with one line of reasoning per choice.

    2D data keeps the preset's patch rules (:func:`make_plan`); 3D data gets the nnU-Net-style
    choices described in the module note.

    Args:
        report: a :class:`useg.check.CheckReport` without problems.
        overrides: the preset and the choices fixed by hand (they win over the planner), the
            memory budget (default :func:`default_memory_gb`) and nested ``regions`` in mask values,
            outer to inner (``{"WT": (1, 2, 3, 4), ...}``): the network then gets one sigmoid output
            per region and a region loss (nnU-Net's BraTS setup).
        device: where training will run ("auto", "cpu", "cuda"), for the CPU rules and the budget.

    Returns:
        (plan, reasons).

    Raises:
        UsegError: regions naming mask values the masks do not use, or regions that do not nest.
    """
    import torch

    ov = overrides or Overrides()
    if ov.preset in PRESETS:  # the user's network fields, before the 3D rules compute with them
        check_model(dataclasses.replace(PRESETS[ov.preset].model, **ov.model))
    fp = fingerprint(report)
    dims = fp["dims"]
    if ov.configuration == "3d" and dims == 2:
        raise UsegError("configuration 3d asks for a 3D network, but 2D images have no 3D configuration; "
                        "drop it, or give 3D volumes")
    slicing = dims == 3 and ov.configuration == "2d"  # nnU-Net's 2d: a 2D network on the volumes' slices
    if slicing and ov.patch_size is not None and len(ov.patch_size) != 2:
        raise UsegError(f"--patch {','.join(map(str, ov.patch_size))} has {len(ov.patch_size)} axes but "
                        "configuration 2d trains on 2D slices of volumes; give 2 sizes like --patch 64,64")
    if ov.patch_size is not None:  # before the 3D rules take its logarithm
        check_patch(ov.patch_size, 2 if slicing else dims)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    data, reasons = _normalization(fp)
    if ov.regions:
        data["regions"] = _region_classes(report.label_map.values, ov.regions, reasons)
    if report.info.get("layout") == "folders":
        data["channel_names"] = tuple(fp["channel_names"])
    data.update(_ignored(report.info, reasons))
    data.update({k: report.info[k] for k in ("pairing", "image_pattern", "mask_pattern") if k in report.info})
    spacings = [r.spacing for r in report.records] or [(1.0,) * dims]
    model, patch_size = dict(ov.model), ov.patch_size
    if slicing:
        plan = _plan_slices(report, spacings, dataclasses.replace(ov, data={**data, **ov.data}), reasons)
    elif dims == 3:
        budget = float(ov.memory_gb) if ov.memory_gb else default_memory_gb("cpu" if cpu else device)
        model, patch_size, resample = _plan_3d(fp, spacings, ov, cpu, budget, reasons)
        data.update(resample)
    else:
        reasons.append("2D: the preset's patch (median image size, capped) and width")
    if not slicing:
        chosen = dataclasses.replace(ov, model=model, data={**data, **ov.data}, patch_size=patch_size)
        plan = make_plan(report.label_map, report.num_channels, [r.shape for r in report.records],
                         spacings=spacings, overrides=chosen)
    if plan.data.resample:  # a case whose header says absurd voxels would not fit once resampled
        check_cases(report.records, plan.data.spacing)
    refuse_beyond_machine(plan, machine_gib("cpu" if cpu else device))
    return plan, reasons


def _ignored(info: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """DataConfig fields of the pixels training skips: outside an ROI, nnU-Net's ignore label."""
    data: dict[str, Any] = {}
    if info.get("roi"):
        data["roi"] = True
        reasons.append(f"ROI masks in {info['roi']}: pixels outside them are ignored, patches centred inside")
    if info.get("ignore") is not None:
        data["ignore_value"] = int(info["ignore"])
        reasons.append(f"dataset.json's ignore label {info['ignore']}: its pixels are ignored")
    return data


def _normalization(fp: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(DataConfig fields, reasons): CT's global clip and scale, z-score inside the object, or per image."""
    names = [n.lower() for n in fp["channel_names"]]
    if names and all(n == "ct" for n in names) and fp["intensity"]:
        intensity = tuple((i["p00_5"], i["p99_5"], i["mean"], i["std"]) for i in fp["intensity"])
        return {"normalization": "ct", "intensity": intensity}, [
            "normalization: CT, so clipped to the foreground's 0.5/99.5 percentiles and scaled "
            "by its global mean and std (Hounsfield units mean the same in every scan)"]
    if fp["dims"] == 3 and fp["background_share"] > BACKGROUND_SHARE_FOR_MASK:
        return {"normalization": "zscore_mask"}, [
            f"normalization: z-score inside the object, since {fp['background_share']:.0%} of "
            "voxels are a constant background that would skew the statistics"]
    return {}, ["normalization: z-score per image and channel (no CT, little constant background)"]


def _region_classes(values: Sequence[int], regions: Mapping[str, tuple[int, ...]], reasons: list[str]
                    ) -> tuple[tuple[int, ...], ...]:
    """Nested regions in mask values as class indices (DataConfig.regions)."""
    values = tuple(values)
    unknown = sorted({v for r in regions.values() for v in r} - set(values))
    if unknown:
        raise UsegError(f"--regions names mask values {unknown} that the masks do not use; "
                        f"use values of {list(values)}")
    classes = tuple(tuple(values.index(v) for v in r) for r in regions.values())
    try:
        writes = region_classes(classes)
    except ValueError as e:
        raise UsegError(f"--regions: {e}") from None
    reasons.append(f"targets: {len(regions)} nested regions {', '.join(regions)} with a sigmoid each "
                   "(binary cross-entropy + Dice), written back as mask values "
                   f"{[values[c] for c in writes]}")
    return classes


def _plan_3d(fp: dict[str, Any], spacings: Sequence[tuple[float, ...]], ov: Overrides, cpu: bool,
             budget: float, reasons: list[str]) -> tuple[dict[str, Any], tuple[int, ...], dict[str, Any]]:
    """3D choices: resampling, the patch that fits the budget, depth and width.

    Returns:
        (ModelConfig fields, the patch, DataConfig fields); the user's fields are kept.
    """
    target, data = _resampling(spacings, reasons)
    shape = [int(round(m * s / t)) for m, s, t in
             zip(fp["median_shape"], np.median(np.asarray(spacings), axis=0), target, strict=True)]
    halved = cpu and "width" not in ov.model
    # batches of 2 make batch statistics noisy, hence instance norm (nnU-Net)
    model = {"width": 16 if cpu else 32, "max_width": 320, "norm": "instance", **ov.model}
    width, max_width, channels = model["width"], model["max_width"], fp["channels"] or 1
    batch = batch_size(ov.preset, 3, None, ov.train)
    patch_size = ov.patch_size
    if patch_size is None:
        cap = CPU_MAX_VOXELS_3D if cpu else math.inf
        patch_size = tuple(_fit([min(s, 256) for s in shape], lambda p: math.prod(p) <= cap and training_gib(
            tuple(p), width, _depth_for(tuple(p)), channels, max_width, batch) <= budget))
    depth = model.setdefault("depth", _depth_for(tuple(patch_size)))
    gib = training_gib(tuple(patch_size), width, depth, channels, max_width, batch)
    reasons.append(f"patch: {format_axes(patch_size)} at batch {batch} (median case {format_axes(shape)} "
                   f"at the target spacing), about {gib:.1f} GiB of {budget:.1f} GiB"
                   + (f"; capped at {CPU_MAX_VOXELS_3D:,} voxels on a CPU" if cpu else ""))
    reasons.append(f"network: depth {depth} (pool until the smallest edge is about {MIN_EDGE} voxels), width "
                   f"{width}{' (halved on a CPU)' if halved else ''}, capped at "
                   f"{max_width} channels, instance norm")
    return model, patch_size, data


def _resampling(spacings: Sequence[tuple[float, ...]], reasons: list[str]) -> tuple[tuple[float, ...], dict]:
    """The volumes' target spacing and the DataConfig fields of resampling to it (when cases differ)."""
    target = target_spacing(spacings)
    if any(not np.allclose(s, target, rtol=1e-3) for s in spacings):
        reasons.append(f"spacing: cases differ, so every case is resampled to {format_axes(target)} (median; "
                       "10th percentile on a thick-slice axis)")
        return target, {"resample": True}
    reasons.append(f"spacing: every case is {format_axes(target)}, no resampling")
    return target, {}


def _plan_slices(report: CheckReport, spacings: Sequence[tuple[float, ...]], ov: Overrides,
                 reasons: list[str]) -> Plan:
    """nnU-Net's 2d configuration of volumes (:mod:`useg.slices`): the 2D rules (patch from the slices'
    median shape at the target spacing, capped; the 2D batch and width) on the slices across the
    coarsest axis, the 3D normalisation (in ``ov.data``) and resampling kept."""
    target, resample = _resampling(spacings, reasons)
    axis = slice_axis_of(target)
    shapes = in_plane_shapes([r.shape for r in report.records], spacings, target, axis)
    flat = [tuple(s for i, s in enumerate(target) if i != axis)] * len(shapes)  # shapes are at the target
    chosen = dataclasses.replace(ov, data={**resample, **ov.data})
    plan = sliced(make_plan(report.label_map, report.num_channels, shapes, spacings=flat, overrides=chosen),
                  axis, target)
    reasons.append(reason(plan))
    return plan
