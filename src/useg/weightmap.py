"""The U-Net paper's pixel weight map (Ronneberger, Fischer, Brox 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

w_c balances the foreground/background frequencies; d1 and d2 are the distances from a
background pixel to the nearest and the second-nearest object. The border term is large in the
thin background gaps between touching cells, which teaches the network to keep them apart.

Each object's distance transform is computed only inside its bounding box grown by a margin
beyond which the border term is negligible, so the cost grows with the objects' total area,
not with (number of objects) x (image size).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .arrays import check_label_image, check_spacing

logger = logging.getLogger(__name__)

CLASS_WEIGHTS = ("balanced", "none")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    return check_label_image(labels, "labels", kinds="iu", non_negative=True,
                             must="be an integer instance image (0 = background, 1..N objects)",
                             hint="; use instances_from_semantic for a binary mask")


def class_balance_weights(labels: np.ndarray, mode: str = "balanced", valid: np.ndarray | None = None
                          ) -> np.ndarray:
    """The class-frequency term w_c of eq. 2, for the semantic classes background / foreground.

    Args:
        labels: (H, W) or (D, H, W) int; 0 = background, anything else = foreground.
        mode: "balanced" (w_c = total / (n_classes * count_c), mean 1 over the image) or "none"
            (1 everywhere).
        valid: (*S) bool, the pixels that count (inside a region of interest); the others count
            in no class and weigh 0. None: every pixel.

    Returns:
        float32 array of labels' shape.
    """
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, got {mode!r}")
    every = valid is None
    valid = np.ones(labels.shape, dtype=bool) if every else np.asarray(valid, dtype=bool)
    if valid.shape != labels.shape:
        raise ValueError(f"valid {valid.shape} must have the labels' shape {labels.shape}")
    out = valid.astype(np.float32)
    if mode == "none" or not valid.any():
        return out
    fg = (labels > 0) & valid
    n_fg = int(fg.sum())
    n_bg = int(valid.sum()) - n_fg
    present = [c for c in (n_bg, n_fg) if c > 0]
    if len(present) < 2:
        return out  # one class only: nothing to balance
    total = float(n_bg + n_fg)
    out[valid & ~fg] = total / (2 * n_bg)
    out[fg] = total / (2 * n_fg)
    # Analytically the mean over the valid pixels is exactly 1; renormalising removes float32 drift.
    return out / np.float32((out if every else out[valid]).mean(dtype=np.float64))


def border_margin(sigma: float, tol: float = 1e-3) -> float:
    """Distance r beyond which the border term is below tol * w0, i.e. exp(-r^2 / (2 sigma^2)) = tol.

    Args:
        sigma: the border term's width (spacing units), > 0.
        tol: relative size of the neglected term, in (0, 1).

    Returns:
        r = sigma * sqrt(2 ln(1 / tol)) (3.72 sigma for tol = 1e-3).
    """
    return sigma * math.sqrt(2.0 * math.log(1.0 / tol))


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..N when ids are sparse, so find_objects does not allocate max(labels) slots."""
    top = int(labels.max()) if labels.size else 0
    if top <= 8192:
        return labels
    ids, inverse = np.unique(labels, return_inverse=True)
    if top <= 2 * len(ids) + 8192:
        return labels
    # ids[0] is 0 when there is background; shift so object ids start at 1 either way
    inverse = inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)
    return inverse.astype(np.int64)


def two_nearest_distances(labels: np.ndarray, spacing: Sequence[float] | None = None,
                          max_distance: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every pixel to the nearest (d1) and second-nearest (d2) object.

    An object's distance is computed only within max_distance (per-axis margin around its bounding
    box); where fewer than two objects lie that close, d1 and/or d2 is +inf. Inside an object, d1
    is 0 (its own distance) and d2 the distance to the nearest other object.

    Args:
        labels: (H, W) or (D, H, W) int instance image, 0 = background.
        spacing: physical size of a pixel per axis (None: 1 each).
        max_distance: work bound in spacing units; math.inf gives exact distances everywhere.

    Returns:
        (d1, d2), float64 arrays of labels' shape.
    """
    labels = _compact(_check_labels(labels))
    spacing = check_spacing(spacing, labels.ndim)
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    if math.isinf(max_distance):
        pad = labels.shape  # whole image
    else:
        pad = tuple(math.ceil(max_distance / s) for s in spacing)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(sl.start - p, 0), min(sl.stop + p, n))
                      for sl, p, n in zip(box, pad, labels.shape))
        # The object lies wholly inside its box, so the cropped transform is exact in the crop.
        d = ndimage.distance_transform_edt(labels[grown] != k, sampling=spacing)
        a, b = d1[grown], d2[grown]
        # Running two-smallest update: the new second is the smaller of the old second and
        # whichever of (old first, new) lost the comparison for first place.
        np.minimum(b, np.maximum(a, d), out=b)
        np.minimum(a, d, out=a)
    return d1, d2


def border_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      spacing: Sequence[float] | None = None, class_weights: str = "balanced",
                      *, tol: float = 1e-3, valid: np.ndarray | None = None) -> np.ndarray:
    """Pixel weights of the U-Net paper, eq. 2: class balance plus a border term.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)) on background pixels and
    w(x) = w_c(x) on object pixels; with fewer than two objects the border term is 0.

    Args:
        labels: (H, W) or (D, H, W) int instance image: 0 = background, 1..N objects.
        w0: height of the border term (paper: 10), >= 0.
        sigma: width of the border term in spacing units (paper: 5 px), > 0.
        spacing: physical pixel size per axis (None: 1 per axis).
        class_weights: "balanced" (inverse class frequency, mean 1) or "none" (1).
        tol: each object's distances are computed only within
            r = sigma * sqrt(2 ln(1/tol)) of its bounding box. A pixel is misjudged only if its
            true d2 >= r, where both the true and the computed border term lie in
            [0, w0 * exp(-r^2 / (2 sigma^2))] = [0, tol * w0]: the absolute error is < tol * w0.
        valid: (*S) bool, the pixels that count (inside a region of interest); the others weigh 0
            and count in no class. None: every pixel.

    Returns:
        float32 array of labels' shape.

    Examples:
        Two objects one pixel apart: the gap pixel is 1 away from each, so it weighs
        1 + 10 * exp(-(1 + 1)^2 / (2 * 5^2)):

        >>> labels = np.array([[1, 1, 1, 0, 2, 2, 2]])
        >>> w = border_weight_map(labels, class_weights="none")
        >>> round(float(w[0, 3]), 3), w[0, :3].tolist()
        (10.231, [1.0, 1.0, 1.0])
    """
    labels = _check_labels(labels)
    spacing = check_spacing(spacing, labels.ndim)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite positive number, got {sigma}")
    if not (math.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0 must be a finite non-negative number, got {w0}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    weights = class_balance_weights(labels, class_weights, valid)
    if w0 == 0 or labels.size == 0:
        return weights
    n_objects = len(np.unique(labels[labels > 0]))
    if n_objects < 2:
        return weights
    d1, d2 = two_nearest_distances(labels, spacing, border_margin(sigma, tol))
    bg = labels == 0
    s = d1[bg] + d2[bg]  # inf where fewer than two objects lie within r: exp gives exactly 0
    weights[bg] += (w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))).astype(np.float32)
    if valid is not None:
        weights[~np.asarray(valid, dtype=bool)] = 0.0
    return weights


def instances_from_semantic(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Instances as the connected components of a semantic mask's foreground (mask > 0).

    For masks like ISBI 2012's, where cells are the components of the non-membrane class.

    Args:
        mask: (H, W) or (D, H, W) array, foreground where > 0.
        connectivity: 1 (faces only) up to mask.ndim (faces, edges and corners).

    Returns:
        int32 instance image of mask's shape: 0 = background, components 1..N.
    """
    mask = check_label_image(mask, "mask", kinds="")  # any dtype: foreground is mask > 0
    if not (isinstance(connectivity, (int, np.integer)) and 1 <= connectivity <= mask.ndim):
        raise ValueError(f"connectivity must be an int in [1, {mask.ndim}], got {connectivity!r}")
    structure = ndimage.generate_binary_structure(mask.ndim, int(connectivity))
    out = np.zeros(mask.shape, dtype=np.int32)
    ndimage.label(mask > 0, structure=structure, output=out)
    return out
