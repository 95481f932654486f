"""The built-in demo data: touching, textured cells in 2D and blobs in 3D, with instance labels.

Everything is reproducible from an explicit generator and vectorised (numpy, scipy.ndimage), so
a demo dataset of 24 images of 256x256 is made in about a second. Cells grow from random seeds as
an additively weighted Voronoi tessellation cut to a noisy per-cell radius: most cells touch their
neighbours, some background remains, and telling touching cells apart needs the thin dark
membrane between them, as in the EM and light-microscopy data the U-Net paper was made for.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .io import write_image

logger = logging.getLogger(__name__)

_NAME = re.compile(r"cell_\d{3,}\.png")


def _check_shape(shape: tuple[int, ...], ndim: int, minimum: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim or min(shape) < minimum:
        raise ValueError(f"shape must be {ndim} sizes of at least {minimum}, got {shape}")
    return shape


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit std, float32."""
    n = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _contacts(instances: np.ndarray) -> np.ndarray:
    """Pixels that touch a different non-zero instance, marked on one side of each contact only.

    Of every pair of differing instances that are neighbours under full connectivity (8 in 2D,
    26 in 3D) the pixel of the higher label is marked: removing the marks leaves no two different
    instances adjacent under any connectivity, and as each contact is cut on one consistent side,
    the gap is one pixel thick.
    """
    out = np.zeros(instances.shape, bool)
    nd = instances.ndim
    for offset in itertools.product((-1, 0, 1), repeat=nd):
        if offset <= (0,) * nd:  # the forward half of the neighbourhood covers every pair once
            continue
        here = tuple(slice(max(-o, 0), s - max(o, 0)) for o, s in zip(offset, instances.shape))
        there = tuple(slice(max(o, 0), s - max(-o, 0)) for o, s in zip(offset, instances.shape))
        a, b = instances[here], instances[there]
        both = (a > 0) & (b > 0)
        out[there] |= both & (b > a)
        out[here] |= both & (a > b)
    return out


def semantic_from_instances(instances: np.ndarray) -> np.ndarray:
    """Foreground mask with a 1-px gap wherever two different instances touch (ISBI-style).

    Args:
        instances: (H, W) or (D, H, W) int instance labels, 0 = background.

    Returns:
        uint8 array of the same shape: 1 for foreground, 0 for background and contact pixels,
        so that no two different instances stay connected, even diagonally.
    """
    instances = np.asarray(instances)
    if instances.ndim not in (2, 3) or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            f"instances must be a 2D or 3D integer array, got {instances.dtype} {instances.shape}")
    return ((instances > 0) & ~_contacts(instances)).astype(np.uint8)


def _keep_seed_pieces(instances: np.ndarray, seeds: tuple[np.ndarray, ...]) -> np.ndarray:
    """Drop every piece of a cell that is not connected to its seed; relabel cells 1..N."""
    out = np.zeros_like(instances)
    n = 0
    for i, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        pieces, count = ndi.label(instances[box] == i)
        seed = tuple(int(s[i - 1]) - b.start for s, b in zip(seeds, box))
        inside = all(0 <= c < p.stop - p.start for c, p in zip(seed, box))
        keep = pieces[seed] if inside else 0
        if keep == 0:  # a neighbour with more weight took the seed: the cell is gone
            continue
        n += 1
        out[box][pieces == keep] = n
    return out


def make_cells(shape: tuple[int, int] = (256, 256), n_cells: int | None = None, *,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A grey image of touching textured cells and its instance labels.

    Each cell has its own brightness, a smooth texture and a bright centre; a dark membrane of
    1-2 px lines cell contacts and cell borders; a smooth illumination gradient, blur and
    Gaussian noise make a global threshold imperfect.

    Args:
        shape: (H, W), each at least 16.
        n_cells: number of seeds (default: about one per 900 px^2); a few may vanish.
        rng: the generator; the same state gives the same image.

    Returns:
        (image uint8 (H, W), instances int32 (H, W)) with 0 = background and cells 1..N.
    """
    h, w = _check_shape(shape, 2, 16)
    rng = _check_rng(rng)
    n = max(2, round(h * w / 900)) if n_cells is None else int(n_cells)
    if n < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}")
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    # Additively weighted Voronoi (Apollonius) cells are star-shaped around their seeds, hence
    # connected; the weight makes cell sizes vary.
    weight = rng.uniform(0.0, 5.0, n).astype(np.float32)
    radius = rng.uniform(10.0, 22.0, n).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    dist = np.sqrt((yy - ys.astype(np.float32)) ** 2 + (xx - xs.astype(np.float32)) ** 2)  # (H, W, n)
    owner = np.argmin(dist - weight, axis=-1)
    d_own = np.take_along_axis(dist, owner[..., None], -1)[..., 0]
    wobble = 2.5 * _smooth_noise((h, w), 4.0, rng)
    inside = d_own + wobble < radius[owner]
    instances = _keep_seed_pieces(np.where(inside, owner + 1, 0).astype(np.int32), (ys, xs))
    count = int(instances.max())

    # per-cell brightness overlapping the background's range, so thresholding alone is not enough
    level = np.concatenate([[0.0], rng.uniform(105.0, 185.0, count)]).astype(np.float32)
    texture_amp = np.concatenate([[0.0], rng.uniform(6.0, 16.0, count)]).astype(np.float32)
    centre_boost = np.concatenate([[0.0], rng.uniform(0.0, 30.0, count)]).astype(np.float32)
    rel = np.clip(d_own / radius[owner], 0.0, 1.0)
    fine = _smooth_noise((h, w), 1.2, rng)
    coarse = _smooth_noise((h, w), 3.0, rng)
    cells = level[instances] + texture_amp[instances] * (0.6 * fine + 0.8 * coarse)
    cells += centre_boost[instances] * (1.0 - rel) ** 2
    background = 85.0 + 10.0 * _smooth_noise((h, w), 6.0, rng) + 5.0 * fine
    image = np.where(instances > 0, cells, background)

    # membrane: both sides of every face contact (2 px) and the inner rim of each cell (1 px)
    membrane = (instances > 0) & ndi.binary_dilation(instances == 0)
    for axis in (0, 1):
        a = np.moveaxis(instances, axis, 0)
        m = np.moveaxis(membrane, axis, 0)  # a view: writing it writes membrane
        touch = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        m[1:] |= touch
        m[:-1] |= touch
    image = np.where(membrane, rng.uniform(40.0, 60.0) + 8.0 * fine, image)

    gy, gx = rng.uniform(-30.0, 30.0, 2)
    image = image + gy * (yy[..., 0] / h - 0.5) + gx * (xx[..., 0] / w - 0.5)  # uneven illumination
    image = ndi.gaussian_filter(image, rng.uniform(0.6, 1.0))
    image = image + rng.normal(0.0, rng.uniform(8.0, 14.0), (h, w))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def make_blobs_3d(shape: tuple[int, int, int] = (32, 48, 48), n_blobs: int | None = None, *,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with a few ellipsoids and their instance labels.

    Args:
        shape: (D, H, W), each at least 8.
        n_blobs: number of ellipsoids (default: 2 to 4); overlaps go to the first one.
        rng: the generator; the same state gives the same volume.

    Returns:
        (image float32 (D, H, W), blobs near 1 and background near 0 plus noise,
        instances int32 (D, H, W) with 0 = background and blobs 1..N).
    """
    shape = _check_shape(shape, 3, 8)
    rng = _check_rng(rng)
    n = int(rng.integers(2, 5)) if n_blobs is None else int(n_blobs)
    if n < 1:
        raise ValueError(f"n_blobs must be at least 1, got {n_blobs}")
    size = np.array(shape, np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    instances = np.zeros(shape, np.int32)
    image = np.zeros(shape, np.float32)
    for i in range(1, n + 1):  # a loop over a handful of blobs, each step vectorised
        centre = rng.uniform(0.25, 0.75, 3).astype(np.float32) * size
        radii = rng.uniform(0.1, 0.22, 3).astype(np.float32) * size
        rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # a random orientation
        r2 = ((((grid - centre) @ rot.astype(np.float32)) / radii) ** 2).sum(-1)
        new = (r2 < 1.0) & (instances == 0)
        instances[new] = i
        image[new] = rng.uniform(0.7, 1.3)
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0.0, 0.25, shape).astype(np.float32)
    return image.astype(np.float32), instances


def write_cells_dataset(root: str | Path, n_images: int = 24, shape: tuple[int, int] = (256, 256),
                        seed: int = 0) -> Path:
    """Write a cells dataset under ``root``.

    Files: ``images/cell_000.png`` (grey uint8), ``masks/cell_000.png`` (0/255 semantic mask
    with 1-px gaps between touching cells) and ``instances/cell_000.png`` (uint16 instance
    labels). Image ``i`` depends only on ``(seed, i, shape)``. Re-running replaces the files and
    removes stale ``cell_*.png`` files beyond ``n_images``, so the folder ends up the same.

    Args:
        root: the dataset folder (created if missing).
        n_images: number of images, at least 1.
        shape: (H, W) of every image.
        seed: the data seed.

    Returns:
        ``root`` as a Path.
    """
    if int(n_images) < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    root = Path(root)
    names = {f"cell_{i:03d}.png" for i in range(int(n_images))}
    for i in range(int(n_images)):
        image, inst = make_cells(shape, rng=np.random.default_rng([int(seed), i]))
        name = f"cell_{i:03d}.png"
        write_image(root / "images" / name, image)
        write_image(root / "masks" / name, semantic_from_instances(inst) * np.uint8(255))
        write_image(root / "instances" / name, inst.astype(np.uint16))
    for sub in ("images", "masks", "instances"):
        for stale in (root / sub).iterdir():
            if _NAME.fullmatch(stale.name) and stale.name not in names:
                stale.unlink()
    logger.info("wrote %d synthetic cell images of %s to %s", n_images, "x".join(map(str, shape)), root)
    return root
