"""Validation of the arrays the metric, distance and weight-map functions take.

One family of checks for label images (class indices, instance ids, binary masks) and one for
voxel spacings, so every module words the same fault the same way. Each caller names its
argument and says what the array must hold; the checks only raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["check_label_image", "check_label_pair", "check_spacing"]


def check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Validated voxel spacing: ``ndim`` positive finite numbers, 1.0 each when None.

    Args:
        spacing: physical voxel size per axis, or None.
        ndim: the number of spatial axes.

    Returns:
        ``ndim`` floats.

    Raises:
        ValueError: not a sequence of ``ndim`` finite positive numbers.

    >>> check_spacing(None, 3)
    (1.0, 1.0, 1.0)
    >>> check_spacing([2, 0.5], 2)
    (2.0, 0.5)
    >>> check_spacing((1.0,), 2)
    Traceback (most recent call last):
    ...
    ValueError: spacing must hold one value per axis (2), got 1: (1.0,)
    """
    if spacing is None:
        return (1.0,) * ndim
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError:
        raise ValueError(f"spacing must be a sequence of {ndim} positive numbers, got {spacing!r}") from None
    if len(values) != ndim:
        raise ValueError(f"spacing must hold one value per axis ({ndim}), got {len(values)}: {values}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and positive, got {values}")
    return values


def check_label_image(a: np.ndarray, name: str = "labels", *, spatial: bool = True, kinds: str = "iub",
                      non_negative: bool = False, must: str = "hold integer labels",
                      hint: str = "") -> np.ndarray:
    """A label image as an array, after checking its dimensions, dtype and sign.

    Args:
        a: (*S) array-like: class indices, instance ids or a binary mask.
        name: the argument's name in the messages ("pred", "truth", "labels", ...).
        spatial: require 2D (H, W) or 3D (D, H, W).
        kinds: the allowed numpy dtype kinds: "i" signed and "u" unsigned integers, "b" bool;
            empty to allow any dtype.
        non_negative: reject negative values.
        must: what the array must do, completing "``name`` must ...", for the dtype message.
        hint: appended to the dtype message (a fix, starting with "; ").

    Returns:
        ``np.asarray(a)``, unchanged.

    Raises:
        ValueError: wrong number of dimensions, dtype, or a negative value.

    >>> check_label_image([[0, 1], [2, 0]]).shape
    (2, 2)
    >>> check_label_image(np.zeros((2, 2)), "pred")
    Traceback (most recent call last):
    ...
    ValueError: pred must hold integer labels, got dtype float64
    >>> check_label_image([[0, -1]], "truth", non_negative=True)
    Traceback (most recent call last):
    ...
    ValueError: truth must be non-negative, got minimum -1
    """
    a = np.asarray(a)
    if spatial and a.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (H, W) or 3D (D, H, W), got shape {a.shape}")
    if kinds and a.dtype.kind not in kinds:
        raise ValueError(f"{name} must {must}, got dtype {a.dtype}{hint}")
    if non_negative and a.size and a.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {a.min()}")
    return a


def check_label_pair(pred: np.ndarray, truth: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """A prediction and its truth: the same shape, then each as :func:`check_label_image` wants.

    Args:
        pred: (*S) predicted labels.
        truth: (*S) true labels.
        **kwargs: spatial, kinds, non_negative, must, hint of :func:`check_label_image`.

    Returns:
        (pred, truth) as arrays.

    Raises:
        ValueError: different shapes, or either array fails :func:`check_label_image`.

    >>> check_label_pair(np.zeros((2, 3), int), np.zeros((3, 2), int))
    Traceback (most recent call last):
    ...
    ValueError: pred shape (2, 3) differs from truth shape (3, 2)
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    return check_label_image(pred, "pred", **kwargs), check_label_image(truth, "truth", **kwargs)
