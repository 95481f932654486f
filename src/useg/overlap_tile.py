"""The U-Net paper's overlap-tile inference for valid-padding networks, memory bounded by the tile.

Ronneberger et al. 2015, Fig. 2: output tiles (smaller than the input tile) laid side by side,
each predicted from the larger input window centred on it, the context missing at the image
border extrapolated by mirroring the image (:func:`useg.tiling.mirror_indices`). Tiles are cut
with index arrays straight from the image, so the mirror-padded image is never materialised;
:func:`overlap_tile_labels` writes each tile's argmax straight into the labels, without a
(K, *S) float buffer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .tiling import Progress, TileFn, as_size, check_common, check_image, mirror_indices, tile_starts

logger = logging.getLogger(__name__)


def overlap_tile(
    fn: TileFn,
    image: np.ndarray,
    in_tile: Sequence[int],
    out_tile: Sequence[int],
    num_classes: int,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """The U-Net paper's overlap-tile prediction for valid-padding networks.

    Output tiles of ``out_tile`` are laid side by side (the last one per axis flush with the end,
    overlapping its neighbour, which it overwrites); each is predicted from the ``in_tile``
    window centred on it. Context beyond the image border is the image mirrored (numpy
    ``reflect``: the border voxel is not repeated), repeatedly when the margin
    ``(in_tile - out_tile) // 2`` exceeds the image, and by edge replication on single-voxel
    axes. Images smaller than one output tile work: the surplus is mirrored and cropped.

    Args:
        fn: maps a (B, C, *in_tile) float32 tensor to (B, num_classes, *out_tile).
        image: (C, *S) array, 2D or 3D spatial.
        in_tile: network input size per spatial axis.
        out_tile: network output size per axis; ``in_tile - out_tile`` must be even and >= 0.
        num_classes: K, channels returned by ``fn``.
        batch_size: tiles per call to ``fn``.
        device: where each batch is moved before calling ``fn``; results come back to the CPU.
        progress: optional callable(n_done, n_total) called after each batch.

    Returns:
        (K, *S) float32 assembled from what ``fn`` returned.
    """
    spatial, pieces = _overlap_tiles(fn, image, in_tile, out_tile, num_classes, batch_size, device, progress)
    result = np.zeros((num_classes, *spatial), dtype=np.float32)
    for dst, pred in pieces:
        result[(slice(None), *dst)] = pred
    return result


def overlap_tile_labels(
    fn: TileFn,
    image: np.ndarray,
    in_tile: Sequence[int],
    out_tile: Sequence[int],
    num_classes: int,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """:func:`overlap_tile` followed by argmax, without the (K, *S) float buffer.

    Each output pixel is written by one tile (the flush last tile per axis overwrites its
    neighbour's overlap, as in :func:`overlap_tile`), so each tile's argmax is final and is
    written straight into the labels: memory is the labels plus one batch of tiles, and the result
    equals ``overlap_tile(...).argmax(0)`` exactly.

    Args:
        fn, image, in_tile, out_tile, num_classes, batch_size, device, progress: as
            :func:`overlap_tile`.

    Returns:
        (*S) class indices: uint8 when ``num_classes`` <= 256, else int32.
    """
    spatial, pieces = _overlap_tiles(fn, image, in_tile, out_tile, num_classes, batch_size, device, progress)
    labels = np.zeros(spatial, dtype=np.uint8 if num_classes <= 256 else np.int32)
    for dst, pred in pieces:
        labels[dst] = pred.argmax(0)
    return labels


# ---------------------------------------------------------------------------------------------


def _overlap_tiles(
    fn: TileFn,
    image: np.ndarray,
    in_tile: Sequence[int],
    out_tile: Sequence[int],
    num_classes: int,
    batch_size: int,
    device: str | torch.device,
    progress: Progress | None,
) -> tuple[tuple[int, ...], Iterator[tuple[tuple[slice, ...], np.ndarray]]]:
    """Validate overlap-tile arguments (eagerly) and lay out its tiles.

    Returns:
        (spatial size, iterator of (destination slices in the image, (K, *kept) float32
        prediction) per output tile, in order; later tiles overwrite earlier ones where the flush
        last tile of an axis overlaps its neighbour).
    """
    spatial = check_image(image)
    in_tile = as_size(in_tile, "in_tile", len(spatial))
    out_tile = as_size(out_tile, "out_tile", len(spatial))
    check_common(num_classes, batch_size)
    for i, o in zip(in_tile, out_tile):
        if i < o or (i - o) % 2:
            raise ValueError(
                f"in_tile {in_tile} must be >= out_tile {out_tile} with an even difference per axis"
            )
    margin = tuple((i - o) // 2 for i, o in zip(in_tile, out_tile))
    grid = [tile_starts(s, o, o) for s, o in zip(spatial, out_tile)]
    starts = list(itertools.product(*grid))
    logger.debug("overlap-tile: %d tiles %s -> %s over %s", len(starts), in_tile, out_tile, spatial)
    windows = [[s - m for s, m in zip(start, margin)] for start in starts]

    def pieces() -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        batches = _run_batches(fn, image, windows, in_tile, out_tile, num_classes, batch_size, device,
                               progress)
        for chunk, out in batches:
            for window, pred in zip(chunk, out):
                start = [w + m for w, m in zip(window, margin)]
                # An output tile larger than the image sticks out past its end: keep the inside.
                keep = [min(o, s - st) for o, s, st in zip(out_tile, spatial, start)]
                dst = tuple(slice(st, st + k) for st, k in zip(start, keep))
                yield dst, pred[(slice(None), *(slice(0, k) for k in keep))]

    return spatial, pieces()


def _run_batches(
    fn: TileFn,
    image: np.ndarray,
    windows: list[list[int]],
    in_tile: tuple[int, ...],
    out_tile: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    device: str | torch.device,
    progress: Progress | None,
) -> Iterator[tuple[list[list[int]], np.ndarray]]:
    """Yield (windows of the batch, (B, K, *out_tile) float32 predictions) batch by batch."""
    total = len(windows)
    expected = (num_classes, *out_tile)
    done = 0
    with torch.no_grad():
        for first in range(0, total, batch_size):
            chunk = windows[first : first + batch_size]
            batch = np.stack([_cut(image, w, in_tile) for w in chunk])
            out = fn(torch.from_numpy(batch).to(device))
            if torch.is_tensor(out):
                out = out.detach().to("cpu", torch.float32).numpy()
            else:
                out = np.asarray(out, np.float32)
            if out.shape != (len(chunk), *expected):
                raise ValueError(
                    f"fn returned shape {tuple(out.shape)} for a batch of {len(chunk)} tiles of {in_tile}; "
                    f"expected {(len(chunk), *expected)}"
                )
            yield chunk, out
            done += len(chunk)
            if progress is not None:
                progress(done, total)


def _cut(image: np.ndarray, start: Sequence[int], tile: tuple[int, ...]) -> np.ndarray:
    """The (C, *tile) float32 window of ``image`` starting at ``start``, mirrored outside it."""
    spatial = image.shape[1:]
    if all(0 <= s and s + t <= n for s, t, n in zip(start, tile, spatial)):
        window = image[(slice(None), *(slice(s, s + t) for s, t in zip(start, tile)))]
    else:
        idx = [mirror_indices(s, t, n) for s, t, n in zip(start, tile, spatial)]
        window = image[(slice(None), *np.ix_(*idx))]
    return np.ascontiguousarray(window, dtype=np.float32)
