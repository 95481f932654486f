"""Geometry changes for training and prediction: resampling to a target spacing and back.

All resampling is ``scipy.ndimage.zoom`` with ``grid_mode=True``: voxels are treated as cells,
so the first and last cells' outer edges stay aligned and the physical field of view is kept
(``new size * new spacing == old size * old spacing`` up to rounding), as with
``skimage.transform.resize`` used by nnU-Net. Outside the array the edge value is repeated.

Strongly anisotropic 3D data (thick slices) follow nnU-Net's rule (Isensee et al. 2021,
"nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
Nature Methods 18): when ``max(spacing) / min(spacing) > 3`` for the input spacing (else for the
target spacing), the single coarsest axis is resampled separately with nearest neighbour
(order 0) and the in-plane axes slice by slice with the requested order, because interpolating
across thick slices smears structures that do not continue from one slice to the next.

:func:`largest_component` is nnU-Net's optional post-processing: keep only the largest
connected component of each foreground class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .arrays import check_spacing

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD


def new_shape(shape: Sequence[int], spacing_in: Sequence[float],
              spacing_out: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling from spacing_in to spacing_out: round(S * spacing_in / spacing_out).

    Args:
        shape: (*S) spatial shape, positive sizes.
        spacing_in: voxel size per axis of the input.
        spacing_out: voxel size per axis wanted.

    Returns:
        The new spatial shape; every axis keeps at least one voxel.
    """
    shape = _check_shape(shape, "shape")
    s_in = check_spacing(spacing_in, len(shape))
    s_out = check_spacing(spacing_out, len(shape))
    return tuple(max(1, round(n * a / b)) for n, a, b in zip(shape, s_in, s_out))


def anisotropic_axis(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to resample separately, or None.

    Args:
        spacing: voxel size per axis (3 values; 2D data is never treated as anisotropic).
        threshold: nnU-Net's anisotropy ratio, 3.

    Returns:
        The index of the coarsest axis when ``max / min > threshold`` and that axis is the only
        one with the maximum spacing (two coarse axes leave no sensible "in-plane"), else None.
    """
    try:
        ndim = len(spacing)
    except TypeError:
        raise ValueError(f"spacing must be a sequence of positive numbers, got {spacing!r}") from None
    values = check_spacing(spacing, ndim)
    if len(values) != 3 or max(values) / min(values) <= threshold:
        return None
    coarse = [i for i, s in enumerate(values) if s == max(values)]
    return coarse[0] if len(coarse) == 1 else None


def resample_image(image: np.ndarray, spacing_in: Sequence[float], spacing_out: Sequence[float],
                   order: int = 3) -> np.ndarray:
    """Resample a channel-first image to a new spacing.

    Args:
        image: (C, *S) float array, S 2D or 3D.
        spacing_in: voxel size per spatial axis of image.
        spacing_out: voxel size per spatial axis wanted.
        order: spline order 0-5 (3: cubic). For anisotropic 3D data (module docstring) it applies
            in-plane only; the coarse axis uses order 0.

    Returns:
        (C, *S') float32 with S' = :func:`new_shape` (S, spacing_in, spacing_out); an unchanged
        shape returns an exact float32 copy.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be channel-first (C, H, W) or (C, D, H, W), got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise ValueError(f"image must hold numbers, got dtype {image.dtype}")
    spatial = image.shape[1:]
    shape_out = new_shape(spatial, spacing_in, spacing_out)
    axis = anisotropic_axis(spacing_in) if len(spatial) == 3 else None
    if axis is None and len(spatial) == 3:
        axis = anisotropic_axis(spacing_out)
    _check_order(order)
    out = np.empty((image.shape[0], *shape_out), dtype=np.float32)
    for c in range(image.shape[0]):  # one channel at a time bounds the spline's float64 buffers
        out[c] = _zoom_to(image[c], shape_out, order, axis)
    return out


def resample_labels(labels: np.ndarray, shape_out: Sequence[int], order: int = 0,
                    lowres_axis: int | None = None) -> np.ndarray:
    """Resample a label array to an exact shape; every output value is one of the input's labels.

    Args:
        labels: (*S) integer labels.
        shape_out: target spatial shape, same length as S.
        order: 0 for nearest neighbour; >= 1 interpolates each label's one-hot mask with that
            order and assigns the label where it reaches 0.5 (nnU-Net's resize_segmentation),
            giving smoother boundaries at one zoom per label.
        lowres_axis: an axis resampled with nearest neighbour regardless of order (see
            :func:`anisotropic_axis`); None for none.

    Returns:
        labels' dtype, shape shape_out.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer label array, got dtype {labels.dtype}")
    shape_out = _check_target(shape_out, labels.shape)
    _check_order(order)
    _check_axis(lowres_axis, labels.ndim)
    if order == 0:
        return _zoom_to(labels, shape_out, 0, None, dtype=labels.dtype)
    values = np.unique(labels)
    # The lowest label fills voxels no label reaches 0.5 in (background, in the usual case).
    out = np.full(shape_out, values[0], dtype=labels.dtype)
    for v in values[1:]:
        out[_zoom_to((labels == v).astype(np.float32), shape_out, order, lowres_axis) >= 0.5] = v
    return out


def resample_probs(probs: np.ndarray, shape_out: Sequence[int], order: int = 1,
                   dtype: np.dtype | type = np.float32, lowres_axis: int | None = None) -> np.ndarray:
    """Resample class probabilities (or logits) to an exact shape, e.g. back to the input geometry.

    Memory: classes are resampled one at a time into the preallocated output, so the peak is the
    output plus one class in float64 (zoom's working precision), not K float64 volumes.

    Args:
        probs: (K, *S) float scores.
        shape_out: target spatial shape, same length as S.
        order: spline order; 1 (linear) keeps probabilities in [0, 1] and summing to 1 per
            voxel, since it is a convex combination. Higher orders overshoot; their output is
            clipped to [0, 1] when the input lies in [0, 1].
        dtype: float32 or float16 (half the memory of a large volume).
        lowres_axis: an axis resampled with nearest neighbour (see :func:`anisotropic_axis`).

    Returns:
        (K, *shape_out) array of dtype.
    """
    probs = np.asarray(probs)
    if probs.ndim not in (3, 4) or not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be float (K, H, W) or (K, D, H, W), got {probs.dtype} {probs.shape}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    shape_out = _check_target(shape_out, probs.shape[1:])
    _check_order(order)
    _check_axis(lowres_axis, probs.ndim - 1)
    clip = order > 1 and probs.size and probs.min() >= 0 and probs.max() <= 1
    out = np.empty((probs.shape[0], *shape_out), dtype=dtype)
    for k in range(probs.shape[0]):
        one = _zoom_to(probs[k], shape_out, order, lowres_axis)
        out[k] = np.clip(one, 0, 1, out=one) if clip else one
    return out


def largest_component(labels: np.ndarray, classes: Sequence[int] | None = None,
                      connectivity: int | None = None) -> np.ndarray:
    """Keep only the largest connected component of each foreground class; the rest becomes 0.

    Args:
        labels: (H, W) or (D, H, W) integer labels, 0 = background.
        classes: the classes to clean (default: every nonzero label present).
        connectivity: 1 (faces) up to ndim (faces, edges, corners; the default, as the
            skimage labelling nnU-Net uses).

    Returns:
        A copy of labels with the smaller components of the given classes set to 0. Ties keep
        the component found first in C order.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer array, got {labels.dtype} {labels.shape}")
    connectivity = labels.ndim if connectivity is None else connectivity
    if not (isinstance(connectivity, (int, np.integer)) and 1 <= connectivity <= labels.ndim):
        raise ValueError(f"connectivity must be an int in [1, {labels.ndim}], got {connectivity!r}")
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c != 0]
    elif any(not isinstance(c, (int, np.integer)) or c == 0 for c in classes):
        raise ValueError(f"classes must be nonzero integer labels, got {classes!r}")
    structure = ndimage.generate_binary_structure(labels.ndim, int(connectivity))
    out = labels.copy()
    for c in classes:
        comp, n = ndimage.label(labels == c, structure=structure)
        if n < 2:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0  # the class's complement is not a component
        out[(comp > 0) & (comp != int(np.argmax(sizes)))] = 0
    return out


# ---------------------------------------------------------------------------------------------


def _zoom_to(a: np.ndarray, shape_out: tuple[int, ...], order: int, lowres_axis: int | None,
             dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Zoom a (*S) array to exactly shape_out; lowres_axis (if any) with order 0, separately."""
    if a.shape == tuple(shape_out):
        return a.astype(dtype, copy=True)  # exact: splines at the original points are not bitwise
    kw = {"mode": "nearest", "grid_mode": True, "output": dtype}
    if lowres_axis is None or order == 0:
        return ndimage.zoom(a, [t / n for t, n in zip(shape_out, a.shape)], order=order, **kw)
    # In-plane first, slice by slice, then nearest neighbour across slices.
    moved = np.moveaxis(a, lowres_axis, 0)
    plane_out = tuple(s for i, s in enumerate(shape_out) if i != lowres_axis)
    factors = [t / n for t, n in zip(plane_out, moved.shape[1:])]
    planes = np.empty((moved.shape[0], *plane_out), dtype=dtype)
    for z in range(moved.shape[0]):
        planes[z] = (moved[z] if moved.shape[1:] == plane_out
                     else ndimage.zoom(moved[z], factors, order=order, **kw))
    n_out = shape_out[lowres_axis]
    if n_out != moved.shape[0]:
        planes = ndimage.zoom(planes, [n_out / moved.shape[0], 1, 1], order=0, **kw)
    return np.moveaxis(planes, 0, lowres_axis)


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    if not values or any(v < 1 or v != s for v, s in zip(values, shape)):
        raise ValueError(f"{name} must be a sequence of positive integers, got {tuple(shape)}")
    return values


def _check_target(shape_out: Sequence[int], shape_in: tuple[int, ...]) -> tuple[int, ...]:
    shape_out = _check_shape(shape_out, "shape_out")
    if len(shape_out) != len(shape_in):
        raise ValueError(f"shape_out {shape_out} must have one size per spatial axis of {shape_in}")
    if 0 in shape_in:
        raise ValueError(f"cannot resample an empty array of shape {shape_in}")
    return shape_out


def _check_order(order: int) -> None:
    if not (isinstance(order, (int, np.integer)) and 0 <= order <= 5):
        raise ValueError(f"order must be an int spline order in [0, 5], got {order!r}")


def _check_axis(axis: int | None, ndim: int) -> None:
    if axis is not None and not (isinstance(axis, (int, np.integer)) and 0 <= axis < ndim):
        raise ValueError(f"lowres_axis must be None or an axis in [0, {ndim - 1}], got {axis!r}")
