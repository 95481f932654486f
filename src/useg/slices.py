"""nnU-Net's ``2d`` configuration for volumes: a 2D U-Net trained and predicting on the slices of 3D volumes.

A slice plan (``DataConfig.slice_axis`` set) has a 2D network (``model.dims == 2``), a 2D patch and
tile, and the volumes' 3D target spacing: volumes are read, resampled and normalised as for a 3D run,
and only the network sees them one slice at a time. nnU-Net cuts across the lowest-resolution axis
(Isensee et al. 2021), so the in-plane voxels are the finest: :func:`slice_axis_of` picks the axis of
the coarsest target spacing, the last one on ties (Z, so isotropic RAS volumes give axial slices).

This module holds the slice rules the planner applies (:func:`slice_axis_of`, :func:`in_plane_shapes`,
:func:`sliced`), the 2D plan of the network alone (:func:`network_plan`) and prediction over slices
(:func:`predict_volume`), which :mod:`useg.predict` dispatches to: each slice goes through the 2D
tile path (:mod:`useg.sliding_window`, :mod:`useg.overlap_tile`) and the results are stacked back, so
a volume's probabilities are exactly the stack of its slices' 2D predictions. Training draws its 2D
patches in :mod:`useg.patches`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .model import output_size, valid_input_size
from .overlap_tile import overlap_tile, overlap_tile_labels
from .plan import Plan
from .sliding_window import sliding_window, sliding_window_labels
from .tiling import Progress, TileFn

AXIS_NAMES = ("sagittal", "coronal", "axial")  # slices across X, Y, Z of useg's RAS voxel order
TIE = 1e-3  # target spacings within this relative difference count as equal


def slice_axis_of(target: Sequence[float]) -> int:
    """The axis slices are cut across: the coarsest target spacing, the last of equal ones.

    >>> slice_axis_of((1.0, 1.0, 1.0)), slice_axis_of((0.8, 0.8, 5.0)), slice_axis_of((4.0, 1.0, 1.0))
    (2, 2, 0)
    """
    coarsest = max(target)
    return max(i for i, s in enumerate(target) if s >= coarsest * (1 - TIE))


def in_plane(values: Sequence, axis: int) -> tuple:
    """``values`` of the three axes without the slice axis.

    >>> in_plane((240, 240, 155), 2), in_plane((5.0, 1.0, 1.0), 0)
    ((240, 240), (1.0, 1.0))
    """
    return tuple(v for i, v in enumerate(values) if i != axis)


def in_plane_shapes(shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]],
                    target: Sequence[float], axis: int) -> list[tuple[int, ...]]:
    """Each volume's slice shape at the target spacing (what the 2D network sees of it).

    >>> in_plane_shapes([(100, 80, 20)], [(0.5, 1.0, 4.0)], (1.0, 1.0, 4.0), 2)
    [(50, 80)]
    """
    return [in_plane(tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spc, target)), axis)
            for shape, spc in zip(shapes, spacings)]


def sliced(plan: Plan, axis: int, spacing: Sequence[float]) -> Plan:
    """The 2D plan ``plan`` (made from the slices' shapes) as a plan on slices of volumes of ``spacing``."""
    data = dataclasses.replace(plan.data, slice_axis=int(axis), spacing=tuple(float(s) for s in spacing))
    return dataclasses.replace(plan, data=data)


def network_plan(plan: Plan) -> Plan:
    """The 2D plan of a slice plan's network alone (its in-plane spacing, no slice axis): what predicts
    one (C, H, W) slice. A plan that is not on slices is returned as it is."""
    axis = plan.data.slice_axis
    if axis is None:
        return plan
    data = dataclasses.replace(plan.data, slice_axis=None, spacing=in_plane(plan.data.spacing, axis))
    return dataclasses.replace(plan, data=data)


def describe(plan: Plan) -> str:
    """The network in words: "2D U-Net on axial slices" for a slice plan, else "3D U-Net" or "2D U-Net".

    >>> from useg.labels import LabelMap
    >>> from useg.plan import DataConfig, ModelConfig
    >>> data = DataConfig(LabelMap((0, 1)), spacing=(1.0, 1.0, 3.0), slice_axis=2)
    >>> describe(Plan(ModelConfig(dims=2), data))
    '2D U-Net on axial slices'
    """
    axis = plan.data.slice_axis
    return f"{plan.model.dims}D U-Net" + (f" on {AXIS_NAMES[axis]} slices" if axis is not None else "")


def reason(plan: Plan) -> str:
    """The planner's line for a slice plan: which slices and why."""
    axis, d = plan.data.slice_axis, plan.data
    return (f"configuration 2d: a 2D U-Net on the {AXIS_NAMES[axis]} slices (across axis {'XYZ'[axis]}, the "
            f"coarsest of the target spacing {'x'.join(f'{s:g}' for s in d.spacing)}, as nnU-Net's 2d), "
            f"in-plane patch {'x'.join(map(str, d.patch_size))}, the 2D batch and width; the volumes are "
            "normalised and resampled as for 3D")


def _flat(fn: TileFn) -> TileFn:
    """A tile function of (B, C, 1, h, w) tiles calling the 2D ``fn`` on (B, C, h, w): slices as a batch."""
    def call(batch: torch.Tensor) -> torch.Tensor:
        return fn(batch[:, :, 0]).unsqueeze(2)

    return call


def predict_volume(fn: TileFn, image: np.ndarray, plan: Plan, device: torch.device, labels: bool,
                   progress: Progress | None = None) -> np.ndarray:
    """A volume predicted slice by slice with a slice plan's 2D network, stacked back.

    Each slice across ``plan.data.slice_axis`` is predicted as :func:`useg.predict.predict_proba`
    predicts a 2D image with :func:`network_plan` (the same tile, overlap, alignment and TTA, inside
    ``fn``). Where a slice fits in one tile (same padding), the slices themselves are the batch:
    ``plan.infer.batch_size`` of them per network call, through the same sliding window with a tile one
    slice thick. Labels are streamed (a slab of slices at a time), never a (K, X, Y, Z) float buffer.

    Args:
        fn: the 2D tile function ((B, C, h, w) -> (B, K, h', w') probabilities, TTA applied).
        image: (C, X, Y, Z) float32, normalised.
        plan: a slice plan.
        device: where tiles are blended.
        labels: return class indices (X, Y, Z) (uint8, or int32 beyond 256 classes) instead of
            (K, X, Y, Z) float32 probabilities.
        progress: optional callable(done, total), over tiles or slices.
    """
    axis, m, inf = plan.data.slice_axis, plan.model, plan.infer
    stack = np.moveaxis(image, 1 + axis, 1)  # (C, N, h, w), a view
    plane = stack.shape[2:]
    if m.padding == "same":
        tile = tuple(min(t, v) for t, v in zip(inf.tile, valid_input_size(plane, m.depth, m.padding)))
        if all(t >= s for t, s in zip(tile, plane)):  # one tile a slice: batch the slices
            run = sliding_window_labels if labels else sliding_window
            out = run(_flat(fn), stack, (1, *tile), m.num_classes, overlap=inf.overlap,
                      batch_size=inf.batch_size, device=device, progress=progress)
            return np.ascontiguousarray(np.moveaxis(out, int(not labels), axis + int(not labels)))
    return _each_slice(fn, stack, plan, device, labels, progress)


def _each_slice(fn: TileFn, stack: np.ndarray, plan: Plan, device: torch.device, labels: bool,
                progress: Progress | None) -> np.ndarray:
    """:func:`predict_volume` one slice at a time (slices larger than a tile, or valid padding)."""
    axis, m, inf = plan.data.slice_axis, plan.model, plan.infer
    n, plane, k = stack.shape[1], stack.shape[2:], m.num_classes
    shape = (*plane[:axis], n, *plane[axis:])
    if labels:
        result = np.empty(shape, dtype=np.uint8 if k <= 256 else np.int32)
        view = np.moveaxis(result, axis, 0)
    else:
        result = np.empty((k, *shape), dtype=np.float32)
        view = np.moveaxis(result, 1 + axis, 1)
    for i in range(n):
        one = np.ascontiguousarray(stack[:, i])
        if m.padding == "same":
            tile = tuple(min(t, v) for t, v in zip(inf.tile, valid_input_size(plane, m.depth, m.padding)))
            run = sliding_window_labels if labels else sliding_window
            out = run(fn, one, tile, k, overlap=inf.overlap, batch_size=inf.batch_size, align=2**m.depth,
                      device=device)
        else:
            tile = tuple(inf.tile)
            run = overlap_tile_labels if labels else overlap_tile
            out = run(fn, one, tile, output_size(tile, m.depth, m.padding), k, batch_size=inf.batch_size)
        if labels:
            view[i] = out
        else:
            view[:, i] = out
        if progress is not None:
            progress(i + 1, n)
    return result


def tile_crop(image: np.ndarray, plan: Plan, tiles: int = 2) -> np.ndarray:
    """At most ``tiles`` tiles per axis of an image (C, *S) from its start: what the precision check
    predicts. A slice plan's crop is in-plane, ``tiles`` slices thick around the middle slice."""
    axis = plan.data.slice_axis
    if axis is None:
        return image[(slice(None), *(slice(0, tiles * t) for t in plan.infer.tile))]
    first = max(0, image.shape[1 + axis] // 2 - tiles // 2)
    sizes = iter(plan.infer.tile)
    index = [slice(first, first + tiles) if a == axis else slice(0, tiles * next(sizes)) for a in range(3)]
    return image[(slice(None), *index)]


def network_images(plan: Plan, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The images as the network sees them: for a slice plan the middle slice (C, h, w) of each volume,
    else the images themselves (the agreement tile of :mod:`useg.autotune` is cut from the first)."""
    axis = plan.data.slice_axis
    if axis is None:
        return list(images)
    return [np.take(im, im.shape[1 + axis] // 2, axis=1 + axis) for im in images]


__all__ = ["AXIS_NAMES", "describe", "in_plane", "in_plane_shapes", "network_images", "network_plan",
           "predict_volume", "reason", "slice_axis_of", "sliced", "tile_crop"]
