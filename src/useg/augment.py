"""Joint augmentation of image, labels and weights: pure functions driven by an explicit generator.

Shapes: image (C, *S) float32, label (*S) int, weight (*S) float32 or None, with S two or three
spatial sizes. Geometric transforms move all three together; intensity transforms touch the image
only. Every function returns new C-contiguous arrays and never writes into its inputs (the
dataset hands in views of its cached images). The elastic deformation follows the U-Net paper
(Ronneberger et al. 2015, sec. 3.1): Gaussian displacements on a coarse grid, interpolated cubically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe; saved in plan.json, so every field is a JSON-able scalar or pair."""

    flip: float = 0.5  # probability of mirroring each spatial axis
    rot90: bool = True  # random multiples of 90 degrees in one plane of two equal-length axes
    intensity: bool = True  # whether to apply the intensity changes below at all
    p_intensity: float = 0.5  # probability of each intensity change (brightness, contrast, gamma, noise)
    brightness: float = 0.1  # additive shift drawn from +-this many channel standard deviations
    contrast: tuple[float, float] = (0.75, 1.25)  # multiplicative range around the channel mean
    gamma: tuple[float, float] = (0.7, 1.5)  # gamma range on each channel rescaled to [0, 1]
    noise_std: float = 0.05  # largest Gaussian noise std, in channel standard deviations
    p_elastic: float = 0.0  # probability of one elastic deformation per sample; 0 never touches rng
    elastic_grid: int = 3  # coarse displacement lattice points per axis (the U-Net paper's 3 x 3)
    elastic_std: float = 10.0  # std of the coarse displacements in pixels (the U-Net paper's 10)

    def __post_init__(self) -> None:
        for name in ("flip", "p_intensity", "p_elastic"):
            _check_p(getattr(self, name), name)
        if int(self.elastic_grid) != self.elastic_grid or self.elastic_grid < 2:
            raise ValueError(f"elastic_grid must be an integer >= 2, got {self.elastic_grid}")
        if not self.elastic_std >= 0:
            raise ValueError(f"elastic_std must be >= 0, got {self.elastic_std}")
        _check_range(self.contrast, "contrast")
        _check_range(self.gamma, "gamma")
        if self.gamma[0] <= 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if self.brightness < 0 or self.noise_std < 0:
            raise ValueError(
                f"brightness and noise_std must be >= 0, got {self.brightness}, {self.noise_std}")


def _check_p(p: float, name: str = "p") -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_range(r: Sequence[float], name: str) -> None:
    if len(r) != 2 or r[0] > r[1]:
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {r}")


def _check_sample(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None) -> None:
    if label.ndim not in (2, 3):
        raise ValueError(f"label must have 2 or 3 spatial axes, got shape {label.shape}")
    if image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
        raise ValueError(f"image {image.shape} must be (C, *{label.shape}) to match the label")
    if weight is not None and weight.shape != label.shape:
        raise ValueError(f"weight {weight.shape} must have the label's shape {label.shape}")


def _spatial_axes(axes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """Spatial axis indices (0 = first spatial axis, not the channel axis), validated."""
    if axes is None:
        return tuple(range(ndim))
    out = tuple(int(a) for a in axes)
    if any(not 0 <= a < ndim for a in out) or len(set(out)) != len(out):
        raise ValueError(f"axes must be distinct spatial axes in 0..{ndim - 1}, got {axes}")
    return out


def _copy(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.array(a, order="C", copy=True)


def _flip_views(image, label, weight, rng, axes, p) -> Sample:
    chosen = tuple(a for a in axes if rng.random() < p)
    if not chosen:
        return image, label, weight
    return (np.flip(image, tuple(a + 1 for a in chosen)), np.flip(label, chosen),
            None if weight is None else np.flip(weight, chosen))


def _rot90_views(image, label, weight, rng, axes) -> Sample:
    planes = [(a, b) for i, a in enumerate(axes) for b in axes[i + 1:] if label.shape[a] == label.shape[b]]
    if not planes:
        return image, label, weight
    a, b = planes[int(rng.integers(len(planes)))]
    k = int(rng.integers(4))
    if k == 0:
        return image, label, weight
    return (np.rot90(image, k, axes=(a + 1, b + 1)), np.rot90(label, k, axes=(a, b)),
            None if weight is None else np.rot90(weight, k, axes=(a, b)))


def random_flip(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                axes: Sequence[int] | None = None, p: float = 0.5) -> Sample:
    """Mirror each spatial axis independently with probability ``p``, the same way for all three.

    Args:
        image: (C, *S) array.
        label: (*S) int array.
        weight: (*S) float array, or None.
        rng: the generator.
        axes: spatial axes that may flip (0 = first spatial axis); None means all.
        p: probability per axis.

    Returns:
        (image, label, weight) as new contiguous arrays of the input shapes and dtypes.
    """
    _check_sample(image, label, weight)
    _check_p(p)
    out = _flip_views(image, label, weight, rng, _spatial_axes(axes, label.ndim), p)
    return _copy(out[0]), _copy(out[1]), _copy(out[2])


def random_rot90(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                 axes: Sequence[int] | None = None) -> Sample:
    """Rotate by k * 90 degrees (k uniform in 0..3) in one random plane of two equal-length axes.

    Only planes whose two axes have the same length are used, so shapes are kept; with none,
    the sample comes back unchanged (as copies).

    Args:
        image: (C, *S) array.
        label: (*S) int array.
        weight: (*S) float array, or None.
        rng: the generator.
        axes: spatial axes the plane may use (0 = first spatial axis); None means all.

    Returns:
        (image, label, weight) as new contiguous arrays of the input shapes and dtypes.
    """
    _check_sample(image, label, weight)
    out = _rot90_views(image, label, weight, rng, _spatial_axes(axes, label.ndim))
    return _copy(out[0]), _copy(out[1]), _copy(out[2])


def random_intensity(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.1,
                     contrast: tuple[float, float] = (0.75, 1.25), gamma: tuple[float, float] = (0.7, 1.5),
                     noise_std: float = 0.05, p: float = 0.5) -> np.ndarray:
    """Brightness, contrast, gamma and noise, each applied with probability ``p`` (image only).

    One random draw per change is shared by all channels; each channel uses its own statistics
    (mean, std, min, max), so channels with different ranges are treated alike.

    Args:
        image: (C, *S) array.
        rng: the generator.
        brightness: additive shift uniform in +-brightness channel stds.
        contrast: factor range; values are scaled around the channel mean.
        gamma: exponent range, applied to each channel rescaled to [0, 1] and mapped back, so
            the channel's min and max are kept (as nnU-Net's gamma transform does).
        noise_std: Gaussian noise with std uniform in [0, noise_std] channel stds.
        p: probability of each of the four changes.

    Returns:
        A new float32 (C, *S) contiguous array.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, H, W) or (C, D, H, W), got shape {image.shape}")
    _check_p(p)
    _check_range(contrast, "contrast")
    _check_range(gamma, "gamma")
    if gamma[0] <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    out = np.array(image, dtype=np.float32, order="C", copy=True)
    spatial = tuple(range(1, out.ndim))
    shape = (-1,) + (1,) * (out.ndim - 1)
    if rng.random() < p:
        out += np.float32(rng.uniform(-brightness, brightness)) * out.std(axis=spatial).reshape(shape)
    if rng.random() < p:
        mean = out.mean(axis=spatial).reshape(shape)
        out = (out - mean) * np.float32(rng.uniform(*contrast)) + mean
    if rng.random() < p:
        lo, hi = out.min(axis=spatial).reshape(shape), out.max(axis=spatial).reshape(shape)
        span = hi - lo
        flat = span <= 0  # a constant channel has no range to reshape
        unit = (out - lo) / np.where(flat, 1.0, span)
        out = np.where(flat, out, unit ** np.float32(rng.uniform(*gamma)) * span + lo)
    if rng.random() < p and noise_std > 0:
        sigma = np.float32(rng.uniform(0.0, noise_std)) * out.std(axis=spatial).reshape(shape)
        out += rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.ascontiguousarray(out, dtype=np.float32)


def elastic_field(shape: Sequence[int], rng: np.random.Generator, grid: int = 3,
                  std: float = 10.0) -> np.ndarray:
    """A smooth random displacement field as in the U-Net paper (Ronneberger et al. 2015, sec. 3.1).

    Displacements are drawn from N(0, std^2) pixels on a coarse ``grid`` x ``grid`` [x ``grid``]
    lattice whose outer points sit on the image corners, then interpolated to every pixel with a
    cubic spline (scipy ``zoom``, order 3, ``grid_mode=False``). One draw of
    ``rng.normal(size=(ndim, grid, ..., grid))`` is the only use of ``rng``.

    Args:
        shape: the spatial shape S, two or three sizes >= 1.
        rng: the generator.
        grid: points of the coarse lattice per axis, >= 2.
        std: standard deviation of the coarse displacements in pixels, >= 0.

    Returns:
        (ndim, *S) float32 displacements; component d moves along spatial axis d.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be two or three sizes >= 1, got {shape}")
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid}")
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    ndim, grid = len(shape), int(grid)
    coarse = rng.normal(0.0, std, (ndim,) + (grid,) * ndim)
    field = np.empty((ndim,) + shape, np.float32)
    # zoom derives the true factor from the shapes, (grid - 1) / (n - 1) with grid_mode=False,
    # so the lattice corners land exactly on the pixel corners; n / grid only sets the output size
    factors = [n / grid for n in shape]
    for d in range(ndim):
        field[d] = ndimage.zoom(coarse[d], factors, order=3, mode="mirror", grid_mode=False)
    return field


def elastic_deform(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                   grid: int = 3, std: float = 10.0) -> Sample:
    """Warp image, label and weight with one field from :func:`elastic_field` (U-Net paper, sec. 3.1).

    Each output pixel x takes its value from x + field(x) (backward mapping), mirrored at the
    borders. The image is resampled with cubic splines (order 3, the paper's bicubic), the label
    with nearest neighbour (order 0, so no new label values appear) and the weight linearly
    (order 1). The only use of ``rng`` is ``elastic_field(S, rng, grid, std)``. A field that is
    zero everywhere (``std=0``) returns exact copies, since a spline round trip is not bit-exact.

    Args:
        image: (C, *S) array.
        label: (*S) int array.
        weight: (*S) float array, or None.
        rng: the generator.
        grid: coarse lattice points per axis, >= 2.
        std: coarse displacement standard deviation in pixels, >= 0.

    Returns:
        (image float32, label of the label's dtype, weight float32 or None) as new contiguous
        arrays of the input shapes.
    """
    _check_sample(image, label, weight)
    field = elastic_field(label.shape, rng, grid, std)
    if not field.any():
        return (np.array(image, dtype=np.float32, order="C", copy=True), _copy(label),
                None if weight is None else np.array(weight, dtype=np.float32, order="C", copy=True))
    coords = field
    coords += np.indices(label.shape, dtype=np.float32)  # field is ours alone: reuse its memory
    out_image = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        # map_coordinates runs the spline prefilter once per call, i.e. once per channel
        ndimage.map_coordinates(np.asarray(image[c], dtype=np.float64), coords, output=out_image[c],
                                order=3, mode="mirror")
    out_label = ndimage.map_coordinates(label, coords, output=label.dtype, order=0, mode="mirror")
    out_weight = None
    if weight is not None:
        out_weight = ndimage.map_coordinates(np.asarray(weight, dtype=np.float32), coords, output=np.float32,
                                             order=1, mode="mirror")
    return out_image, out_label, out_weight


def augment_sample(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                   config: AugmentConfig = AugmentConfig()) -> Sample:
    """Apply the configured transforms in a fixed order: elastic, flips, rot90, intensity.

    The elastic step draws from ``rng`` only when ``config.p_elastic > 0``, so recipes without
    it give the same results as before it existed.

    Args:
        image: (C, *S) array.
        label: (*S) int array.
        weight: (*S) float array, or None.
        rng: the generator; the same state gives the same result.
        config: the recipe.

    Returns:
        (image float32, label, weight) as new contiguous arrays of the input shapes.
    """
    _check_sample(image, label, weight)
    axes = tuple(range(label.ndim))
    sample = (image, label, weight)
    if config.p_elastic > 0 and rng.random() < config.p_elastic:
        sample = elastic_deform(*sample, rng, config.elastic_grid, config.elastic_std)
    if config.flip > 0:
        sample = _flip_views(*sample, rng, axes, config.flip)
    if config.rot90:
        sample = _rot90_views(*sample, rng, axes)
    image, label, weight = sample
    if config.intensity and config.p_intensity > 0:
        image = random_intensity(image, rng, config.brightness, config.contrast, config.gamma,
                                 config.noise_std, config.p_intensity)
    else:
        image = np.array(image, dtype=np.float32, order="C", copy=True)
    # the geometric steps returned views; one copy here makes them contiguous and independent
    return image, _copy(label), _copy(weight)


class Augmenter:
    """:func:`augment_sample` with a fixed config, picklable into DataLoader workers.

    Args:
        config: the recipe.

    Call with ``(image (C, *S), label (*S), weight (*S) or None, rng)``; returns the same triple.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()):
        self.config = config

    def __call__(self, image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
                 rng: np.random.Generator) -> Sample:
        return augment_sample(image, label, weight, rng, self.config)

    def __repr__(self) -> str:
        return f"Augmenter({self.config!r})"
