"""Self-configuration: a dataset fingerprint and the plan it implies, each choice explained.

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

import logging
import math
import os
from typing import Any

import numpy as np

from .plan import Plan, make_plan

logger = logging.getLogger(__name__)

CPU_MAX_VOXELS_3D = 96 * 96 * 64  # 3D patch cap on a CPU (about 4 s per step of 2 at width 16 on 2 cores)
MIN_EDGE = 4  # pool until the smallest patch edge would drop below this (nnU-Net)
MAX_DEPTH = 5
BACKGROUND_SHARE_FOR_MASK = 0.25  # constant background above this share -> normalise inside the object


def fingerprint(report) -> dict[str, Any]:
    """The dataset's fingerprint from a :class:`useg.dataset.CheckReport`.

    Returns:
        JSON-able dict: cases, dims, channels, median shape, median and per-axis range of spacings,
        per-channel foreground intensity percentiles (0.5, 50, 99.5), mean and std, the share of
        each mask value, modality names and the layout.
    """
    shapes, spacings = np.asarray(report.shapes), np.asarray(report.spacings, dtype=np.float64)
    fp: dict[str, Any] = {
        "cases": len(report.cases), "dims": int(shapes.shape[1]) if shapes.size else 0,
        "channels": report.channels, "layout": report.info.get("layout", "plain"),
        "channel_names": list(report.info.get("channel_names", [])),
        "median_shape": [int(v) for v in np.median(shapes, axis=0)] if shapes.size else [],
        "median_spacing": [round(float(v), 4) for v in np.median(spacings, axis=0)] if spacings.size else [],
        "spacing_range": [[round(float(a), 4), round(float(b), 4)] for a, b in
                          zip(spacings.min(axis=0), spacings.max(axis=0))] if spacings.size else [],
        "class_share": report.stats.get("pixel share per mask value", {}),
        "background_share": round(float(report.info.get("background_share", 0.0)), 4),
        "intensity": [
            {"p00_5": float(np.percentile(v, 0.5)), "p50": float(np.percentile(v, 50)),
             "p99_5": float(np.percentile(v, 99.5)), "mean": float(v.mean()), "std": float(v.std())}
            for v in report.intensities
        ],
    }
    return fp


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


def _depth_for(patch: tuple[int, ...]) -> int:
    return max(1, min(MAX_DEPTH, int(math.floor(math.log2(min(patch) / MIN_EDGE)))))


def _fit(patch: list[int], limit) -> list[int]:
    """Shrink the edge that is largest relative to the others until ``limit(patch)`` holds."""
    while not limit(patch) and max(patch) > 8:
        i = int(np.argmax(patch))
        patch[i] = max(8, int(patch[i] * 0.875) // 8 * 8 or 8)
    return patch


def plan_dataset(report, preset: str = "default", memory_gb: float | None = None, device: str = "auto",
                 model: dict | None = None, train: dict | None = None, infer: dict | None = None,
                 patch_size: tuple[int, ...] | None = None,
                 regions: dict[str, tuple[int, ...]] | None = None) -> tuple[Plan, list[str]]:
    """Plan a training from a checked dataset, with one line of reasoning per choice.

    2D data keeps the preset's patch rules (:func:`useg.plan.make_plan`); 3D data gets the
    nnU-Net-style choices described in the module note.

    Args:
        report: a :class:`useg.dataset.CheckReport` without problems.
        preset: the named recipe.
        memory_gb: the training memory budget (default :func:`default_memory_gb`).
        device: where training will run ("auto", "cpu", "cuda"), for the default budget.
        model, train, infer: explicit overrides (they win over the planner).
        patch_size: an explicit patch.
        regions: nested regions in mask values, outer to inner (``{"WT": (1, 2, 3, 4), ...}``): the
            network gets one sigmoid output per region and a region loss (nnU-Net's BraTS setup).

    Returns:
        (plan, reasons).
    """
    import torch

    fp = fingerprint(report)
    dims, reasons = fp["dims"], []
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    budget = float(memory_gb) if memory_gb else default_memory_gb("cpu" if cpu else device)
    model, train, data = dict(model or {}), dict(train or {}), {}
    names = [n.lower() for n in fp["channel_names"]]
    if names and all(n == "ct" for n in names) and fp["intensity"]:
        data["normalization"] = "ct"
        data["intensity"] = tuple((i["p00_5"], i["p99_5"], i["mean"], i["std"]) for i in fp["intensity"])
        reasons.append("normalization: CT, so clipped to the foreground's 0.5/99.5 percentiles and scaled "
                       "by its global mean and std (Hounsfield units mean the same in every scan)")
    elif dims == 3 and fp["background_share"] > BACKGROUND_SHARE_FOR_MASK:
        data["normalization"] = "zscore_mask"
        reasons.append(f"normalization: z-score inside the object, since {fp['background_share']:.0%} of "
                       "voxels are a constant background that would skew the statistics")
    else:
        reasons.append("normalization: z-score per image and channel (no CT, little constant background)")
    if regions:
        from .errors import UsegError
        from .labels import region_classes

        values = report.label_map.values
        unknown = sorted({v for r in regions.values() for v in r} - set(values))
        if unknown:
            raise UsegError(f"--regions names mask values {unknown} that the masks do not use; use values of {list(values)}")
        data["regions"] = tuple(tuple(values.index(v) for v in r) for r in regions.values())
        try:
            writes = region_classes(data["regions"])
        except ValueError as e:
            raise UsegError(f"--regions: {e}") from None
        reasons.append(f"targets: {len(regions)} nested regions {', '.join(regions)} with a sigmoid each "
                       f"(binary cross-entropy + Dice), written back as mask values {[values[c] for c in writes]}")
    if report.info.get("layout") == "folders":
        data["channel_names"] = tuple(fp["channel_names"])
    spacings = report.spacings or [(1.0,) * dims]
    if dims == 3:
        from .plan import target_spacing

        target = target_spacing(spacings)
        if any(not np.allclose(s, target, rtol=1e-3) for s in spacings):
            data["resample"] = True
            reasons.append(f"spacing: cases differ, so every case is resampled to {_x(target)} (median; "
                           "10th percentile on a thick-slice axis)")
        else:
            reasons.append(f"spacing: every case is {_x(target)}, no resampling")
        shape = [int(round(m * s / t)) for m, s, t in
                 zip(fp["median_shape"], np.median(np.asarray(spacings), axis=0), target)]
        halved = cpu and "width" not in model
        width = model.get("width", 16 if cpu else 32)
        max_width = model.get("max_width", 320)
        model.setdefault("width", width)
        model.setdefault("max_width", max_width)
        model.setdefault("norm", "instance")  # batches of 2 make batch statistics noisy (nnU-Net)
        batch = train.get("batch_size", 2)
        train.setdefault("batch_size", batch)
        if patch_size is None:
            cap = CPU_MAX_VOXELS_3D if cpu else math.inf
            patch = _fit([min(s, 256) for s in shape], lambda p: math.prod(p) <= cap and training_gib(
                tuple(p), width, _depth_for(tuple(p)), fp["channels"] or 1, max_width, batch) <= budget)
            patch_size = tuple(patch)
        depth = model.setdefault("depth", _depth_for(tuple(patch_size)))
        reasons.append(f"patch: {_x(patch_size)} at batch {batch} (median case {_x(shape)} at the target spacing), "
                       f"about {training_gib(tuple(patch_size), width, depth, fp['channels'] or 1, max_width, batch):.1f} "
                       f"GiB of {budget:.1f} GiB" + (f"; capped at {CPU_MAX_VOXELS_3D:,} voxels on a CPU" if cpu else ""))
        reasons.append(f"network: depth {depth} (pool until the smallest edge is about {MIN_EDGE} voxels), width "
                       f"{width}{' (halved on a CPU)' if halved else ''}, capped at "
                       f"{max_width} channels, instance norm")
    else:
        reasons.append("2D: the preset's patch (median image size, capped) and width")
    plan = make_plan(report.label_map, report.channels, report.shapes, spacings=spacings, preset=preset,
                     model=model, train=train, infer=infer, patch_size=patch_size, data=data)
    return plan, reasons


def _x(values) -> str:
    return "x".join(f"{v:g}" for v in values)
