"""From a case on disk to network-ready arrays: read, resample to the plan's spacing, normalise.

Training (:func:`load_arrays`) and prediction (:func:`normalize`, applied by :mod:`useg.predict`)
share these steps, so a run sees at predict time exactly the intensities it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import layouts
from .dataset import Case, format_axes
from .errors import UsegError
from .io import read_mask
from .labels import LabelMap
from .memory import check_resample
from .roi import ignore_outside, read_roi

NORMALIZATIONS = ("zscore", "zscore_mask", "ct", "none")


def load_case(case: Case, label_map: LabelMap | None, spacing: Sequence[float] | None = None,
              ignore_value: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one case, resampled to ``spacing`` when given and different from the file's.

    Pixels outside the case's ROI (``case.roi``) and pixels whose stored mask value is
    ``ignore_value`` get the label :data:`useg.roi.IGNORE`.

    Returns:
        (image (C, *S) float32, labels (*S) int64 class indices or IGNORE, or None without a mask
        or map).

    Raises:
        UsegError: unreadable files, unknown mask values, a mask or ROI of another size than its image.
    """
    image = layouts.read_case_image(case.files)
    labels = None
    if case.mask is not None and label_map is not None:
        labels = _labels(case, label_map, image.spatial_shape, ignore_value)
    array = image.array.astype(np.float32)
    if spacing is not None and not np.allclose(image.spacing, spacing, rtol=1e-3):
        from .resample import resample_image, resample_labels

        check_resample(str(case.image), image.spatial_shape, image.spacing, spacing, image.array.shape[0])
        array = resample_image(array, image.spacing, tuple(spacing))
        if labels is not None:
            labels = resample_labels(labels, array.shape[1:])
    return array, labels


def _labels(case: Case, label_map: LabelMap, shape: tuple[int, ...], ignore_value: int | None) -> np.ndarray:
    """The case's class indices (*S) int64, IGNORE outside its ROI and at ``ignore_value``."""
    raw = read_mask(case.mask)[0]
    if raw.shape != shape:
        raise UsegError(f"{case.mask} is {format_axes(raw.shape)} but {case.image} is "
                        f"{format_axes(shape)}; masks must match their images pixel for pixel")
    inside = None
    if ignore_value is not None:
        inside = raw != ignore_value
        raw = np.where(inside, raw, label_map.values[0])  # any valid value: overwritten below
    if case.roi is not None:
        roi = read_roi(case.roi, shape, case.image)
        inside = roi if inside is None else inside & roi
    labels = label_map.decode(raw, path=case.mask)
    return labels if inside is None else ignore_outside(labels, inside)


def load_arrays(cases: Sequence[Case], label_map: LabelMap | None, normalization: str = "zscore",
                intensity: Sequence[Sequence[float]] | None = None, spacing: Sequence[float] | None = None,
                ignore_value: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Read and normalise every case: images (C, *S) float32 and labels (*S) int64.

    Args:
        cases: the cases to read.
        label_map: decodes the masks.
        normalization, intensity: see :func:`normalize`.
        spacing: resample every case to this spacing first (None keeps the files' grids).
        ignore_value: the stored mask value of unlabelled pixels (see :func:`load_case`).
    """
    images, labels = [], []
    for case in cases:
        image, label = load_case(case, label_map, spacing, ignore_value)
        images.append(normalize(image, normalization, intensity))
        labels.append(label)
    return images, labels


def normalize(array: np.ndarray, method: str = "zscore",
              intensity: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Intensity normalisation per channel, nnU-Net's three schemes (Isensee et al. 2021).

    * ``"zscore"``: per image and channel ``(x - mean) / max(std, 1e-8)`` (the non-CT default).
    * ``"zscore_mask"``: the same statistics taken inside the object (voxels where some channel is
      above its minimum, i.e. not the constant background of a skull-stripped MRI); the
      background is set to 0. nnU-Net does this when cropping to the non-zero region pays.
    * ``"ct"``: clip to the dataset's foreground 0.5/99.5 percentiles, then subtract the dataset's
      foreground mean and divide by its std: one global scale, since CT units are physical.
    * ``"none"``: cast to float32 only.

    Args:
        array: (C, *S) image.
        method: one of :data:`NORMALIZATIONS`.
        intensity: for "ct", per channel (lo, hi, mean, std) from the dataset fingerprint.

    Returns:
        (C, *S) float32.
    """
    x = np.asarray(array, dtype=np.float32)
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if method == "none":
        return x
    if x.ndim < 2:
        raise ValueError(f"normalize needs a channels-first array (C, *S), got shape {x.shape}")
    if method == "ct":
        if intensity is None or len(intensity) != x.shape[0]:
            raise ValueError("ct normalization needs (lo, hi, mean, std) "
                             f"for each of the {x.shape[0]} channels")
        out = np.empty_like(x)
        for c, (lo, hi, mean, std) in enumerate(intensity):
            out[c] = (np.clip(x[c], lo, hi) - mean) / max(std, 1e-8)
        return out
    axes = tuple(range(1, x.ndim))
    if method == "zscore_mask":
        inside = (x > x.min(axis=axes, keepdims=True)).any(axis=0)
        if inside.any():
            out = np.zeros_like(x)
            for c in range(x.shape[0]):
                v = x[c][inside]
                out[c][inside] = (v - v.mean(dtype=np.float64)) / max(float(v.std(dtype=np.float64)), 1e-8)
            return out
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, 1e-8)).astype(np.float32)
