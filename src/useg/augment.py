"""Joint augmentation of image, labels and weights: pure functions driven by an explicit generator.

Shapes: image (C, *S) float32, label (*S) int, weight (*S) float32 or None; 2D or 3D. Geometric
transforms move all three together; intensity transforms touch the image only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Sample = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5  # probability of mirroring each spatial axis
    rot90: bool = True  # random multiples of 90 degrees in planes of equal-length axes
    p_intensity: float = 0.5  # probability of each intensity change below
    brightness: float = 0.1  # additive shift, up to this many standard deviations
    contrast: tuple[float, float] = (0.75, 1.25)  # multiplicative range around the mean
    gamma: tuple[float, float] = (0.7, 1.5)  # gamma range on the image rescaled to [0, 1]
    noise_std: float = 0.05  # Gaussian noise std, in units of the (normalised) image


def random_flip(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                p: float = 0.5) -> Sample:
    """Mirror each spatial axis with probability ``p``."""
    for axis in range(label.ndim):
        if rng.random() < p:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis)
            weight = np.flip(weight, axis) if weight is not None else None
    return image, label, weight


def random_rot90(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
                 rng: np.random.Generator) -> Sample:
    """Rotate by k * 90 degrees in one random plane whose two axes have equal length (shape kept)."""
    planes = [(a, b) for a in range(label.ndim) for b in range(a + 1, label.ndim) if label.shape[a] == label.shape[b]]
    if not planes:
        return image, label, weight
    a, b = planes[int(rng.integers(len(planes)))]
    k = int(rng.integers(4))
    image = np.rot90(image, k, axes=(a + 1, b + 1))
    label = np.rot90(label, k, axes=(a, b))
    weight = np.rot90(weight, k, axes=(a, b)) if weight is not None else None
    return image, label, weight


def random_intensity(image: np.ndarray, rng: np.random.Generator, p: float = 0.5, brightness: float = 0.1,
                     contrast: tuple[float, float] = (0.75, 1.25), gamma: tuple[float, float] = (0.7, 1.5),
                     noise_std: float = 0.05) -> np.ndarray:
    """Brightness, contrast, gamma and noise, each applied with probability ``p`` (image only)."""
    image = image.astype(np.float32, copy=True)
    if rng.random() < p:
        image += np.float32(rng.uniform(-brightness, brightness) * (image.std() + 1e-8))
    if rng.random() < p:
        mean = image.mean()
        image = (image - mean) * np.float32(rng.uniform(*contrast)) + mean
    if rng.random() < p:
        # gamma on [0, 1] then back to the original range, so the range is kept (nnU-Net does the same)
        lo, hi = float(image.min()), float(image.max())
        if hi > lo:
            image = ((image - lo) / (hi - lo)) ** np.float32(rng.uniform(*gamma)) * (hi - lo) + lo
    if rng.random() < p and noise_std > 0:
        image += rng.normal(0.0, noise_std, image.shape).astype(np.float32)
    return image.astype(np.float32, copy=False)


def augment_sample(image: np.ndarray, label: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                   config: AugmentConfig = AugmentConfig()) -> Sample:
    """All of the configured transforms, in a fixed order; returns contiguous arrays."""
    if config.flip > 0:
        image, label, weight = random_flip(image, label, weight, rng, config.flip)
    if config.rot90:
        image, label, weight = random_rot90(image, label, weight, rng)
    if config.p_intensity > 0:
        image = random_intensity(image, rng, config.p_intensity, config.brightness, config.contrast,
                                 config.gamma, config.noise_std)
    weight = np.ascontiguousarray(weight) if weight is not None else None
    return np.ascontiguousarray(image), np.ascontiguousarray(label), weight


class Augmenter:
    """:func:`augment_sample` with a fixed config, picklable into DataLoader workers."""

    def __init__(self, config: AugmentConfig = AugmentConfig()):
        self.config = config

    def __call__(self, image, label, weight, rng):
        return augment_sample(image, label, weight, rng, self.config)
