"""The built-in demo data: touching, textured cells in 2D and blobs in 3D, with instance labels.

Everything is reproducible from a seed and vectorised (scipy.ndimage), so a demo dataset is
made in about a second. Cells grow from random seeds as a Voronoi tessellation cut to a noisy
radius, so most cells touch their neighbours and the task needs the thin dark boundary between
them, as in the EM and light-microscopy data the U-Net paper was made for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .io import atomic_path


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit std."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-8)


def boundaries(instances: np.ndarray) -> np.ndarray:
    """Pixels of an instance next (face neighbours) to a different non-zero instance."""
    out = np.zeros(instances.shape, bool)
    for axis in range(instances.ndim):
        a = np.moveaxis(instances, axis, 0)
        o = np.moveaxis(out, axis, 0)
        diff = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        o[1:] |= diff
    return out


def semantic_from_instances(instances: np.ndarray) -> np.ndarray:
    """Foreground 1 except a 1-px gap where two instances touch (so touching objects stay apart)."""
    return ((instances > 0) & ~boundaries(instances)).astype(np.uint8)


def make_cells(shape: tuple[int, int] = (256, 256), n_cells: int | None = None,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A grey image of touching textured cells and its instance labels.

    Args:
        shape: (H, W).
        n_cells: number of cells (default: about one per 900 px^2).
        rng: the generator (default: seed 0).

    Returns:
        (image uint8 (H, W), instances int32 (H, W), 0 = background).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = shape
    n = n_cells or max(2, int(h * w / 900))
    seeds = np.zeros(shape, np.int32)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    seeds[ys, xs] = np.arange(1, n + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix]
    radius = rng.uniform(10, 22, n + 1).astype(np.float32)
    wobble = 3.0 * _smooth_noise(shape, 4, rng)
    instances = np.where(dist + wobble < radius[nearest], nearest, 0).astype(np.int32)
    # drop specks left by the wobble: keep each instance's component that holds its seed
    cc, _ = ndi.label(instances > 0)
    keep_cc = np.unique(cc[ys, xs])
    instances[~np.isin(cc, keep_cc[keep_cc > 0])] = 0

    level = rng.uniform(110, 190, n + 1).astype(np.float32)
    texture = 14.0 * _smooth_noise(shape, 1.5, rng)
    image = np.where(instances > 0, level[instances] + texture, 70.0 + 6.0 * _smooth_noise(shape, 3, rng))
    edge = boundaries(instances) | (ndi.binary_dilation(instances > 0) & (instances == 0))
    edge = ndi.binary_dilation(edge)
    image = np.where(edge, 45.0, image)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-25, 25, 2)
    image = image + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)  # uneven illumination
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 14, shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances


def make_blobs_3d(shape: tuple[int, int, int] = (32, 48, 48), n_blobs: int | None = None,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with a few ellipsoids and their instance labels.

    Returns:
        (image float32 (D, H, W), instances int32 (D, H, W)).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    n = n_blobs or int(rng.integers(2, 5))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    instances = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        centre = np.array([rng.uniform(0.25 * s, 0.75 * s) for s in shape], np.float32)
        radii = np.array([rng.uniform(0.1, 0.22) * s for s in shape], np.float32)
        r2 = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
        instances[(r2 < 1) & (instances == 0)] = i
    image = np.where(instances > 0, 1.0, 0.0).astype(np.float32)
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 0.3, shape).astype(np.float32)
    return image.astype(np.float32), instances


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image as PILImage

    with atomic_path(path) as tmp:
        PILImage.fromarray(array).save(tmp, format="PNG")


def write_cells_dataset(root: str | Path, n_images: int = 24, shape: tuple[int, int] = (256, 256),
                        seed: int = 0) -> Path:
    """Write a cells dataset: ``images/cell_000.png`` (grey), ``masks/`` (0/255), ``instances/`` (16-bit).

    Deterministic for a seed; existing files are replaced.

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        image, inst = make_cells(shape, rng=rng)
        name = f"cell_{i:03d}.png"
        _save_png(root / "images" / name, image)
        _save_png(root / "masks" / name, semantic_from_instances(inst) * np.uint8(255))
        _save_png(root / "instances" / name, inst.astype(np.uint16))
    return root
