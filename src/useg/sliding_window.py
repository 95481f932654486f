"""Gaussian-blended sliding-window inference for same-padding networks, memory bounded by the tile.

Overlapping tiles blended with a Gaussian importance map, as in nnU-Net (Isensee et al. 2021),
because predictions near a tile's border see less context and deserve less weight.

``fn`` is a :data:`useg.tiling.TileFn`. Tiles are cut with index arrays straight from the image,
so the mirror-padded image is never materialised. The sliding window cuts, blends and (for
labels) arg-maxes on ``device``, one slab of tiles at a time: the image goes there a slab of rows
at a time, the Gaussian weights once, and each finished slab comes back to the host once (a GPU
never waits on host-side stitching). Its only full-size buffer is the (K, *S) result on the host;
:func:`sliding_window_labels` returns argmax labels without ever holding a (K, *S) float buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from .tiling import Progress, TileFn, as_size, check_common, check_image, mirror_indices, tile_starts

logger = logging.getLogger(__name__)


def gaussian_weights(tile: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """The nnU-Net importance map: a Gaussian centred on the tile, peak 1, no zeros.

    The Gaussian is evaluated analytically around the exact centre ``(t - 1) / 2`` of each axis,
    so the map is symmetric under flips (mirroring TTA sees the same weights).

    Args:
        tile: tile size per spatial axis, e.g. (H, W) or (D, H, W).
        sigma_scale: sigma as a fraction of the tile size on each axis (nnU-Net: 1/8).

    Returns:
        (*tile) float32 weights in (0, 1], max exactly 1; values that underflow to zero are
        replaced by the smallest non-zero value so every voxel contributes.
    """
    tile = as_size(tile, "tile")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    w = np.ones((), dtype=np.float64)
    for t in tile:
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2
        sigma = t * sigma_scale
        w = np.multiply.outer(w, np.exp(-(x**2) / (2 * sigma**2)))
    w = (w / w.max()).astype(np.float32)
    if (w == 0).any():
        w[w == 0] = w[w > 0].min()
    return w


def sliding_window(
    fn: TileFn,
    image: np.ndarray,
    tile: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    *,
    align: int = 1,
) -> np.ndarray:
    """Gaussian-blended sliding-window prediction for same-padding networks.

    Windows of ``tile`` are spaced by ``tile * (1 - overlap)`` (at least 1) and the last one on
    each axis is flush with the end (with ``align``, the others are multiples of it). An image
    smaller than the tile along an axis is mirrored (reflect; edge when the axis has a single
    voxel) up to the tile, centred, and the result is cropped back. Outputs are accumulated as a
    Gaussian-weighted sum divided by the weight sum, on ``device``, one slab of tiles at a time
    (:func:`sliding_window_labels`); each finished slab comes back to the host once.

    Args:
        fn: maps a (B, C, *tile) float32 tensor to (B, num_classes, *tile).
        image: (C, *S) array, 2D or 3D spatial.
        tile: tile size per spatial axis.
        num_classes: K, channels returned by ``fn``.
        overlap: fraction of the tile shared by neighbouring windows, in [0, 1).
        batch_size: tiles per call to ``fn``.
        device: where tiles are cut and blended: the image goes there one slab of rows at a time
            (pinned and asynchronous on CUDA), batches are handed to ``fn`` there and its
            outputs are accumulated there; the result comes back to the host.
        progress: optional callable(n_done, n_total) called after each batch.
        align: window starts (but the last, flush one per axis) are multiples of this; pass
            ``2**depth`` for a U-Net so every tile sees the same pooling grid (see
            :func:`tile_starts`). Ignored on an axis where the image is smaller than the tile.

    Returns:
        (K, *S) float32 blend of what ``fn`` returned.
    """
    slabs = _blend_slabs(fn, image, tile, num_classes, overlap, batch_size, device, progress, align)
    result = np.empty((num_classes, *image.shape[1:]), dtype=np.float32)
    for lo, hi, scores in slabs:
        result[:, lo:hi] = scores.cpu().numpy()
    return result


def sliding_window_labels(
    fn: TileFn,
    image: np.ndarray,
    tile: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    *,
    align: int = 1,
) -> np.ndarray:
    """:func:`sliding_window` followed by argmax, streamed so memory stays bounded.

    Tiles are processed in slabs along the first spatial axis; once no later tile can reach a
    row, its blended scores are final, so they are turned into labels (on ``device``) and only
    the labels come back to the host. The float buffers therefore hold ``(K, tile[0], *S[1:])``
    values at most instead of ``(K, *S)``: for a 16k x 16k slide and 256-px tiles that is 64
    times less.

    Args:
        fn, image, tile, num_classes, overlap, batch_size, device, progress, align: as
            :func:`sliding_window`.

    Returns:
        (*S) class indices: uint8 when ``num_classes`` <= 256, else int32.
    """
    slabs = _blend_slabs(fn, image, tile, num_classes, overlap, batch_size, device, progress, align)
    small = num_classes <= 256
    labels = np.empty(image.shape[1:], dtype=np.uint8 if small else np.int32)
    for lo, hi, scores in slabs:
        if scores.device.type == "cpu":  # numpy's argmax over the class axis is ~6x torch's on the CPU
            labels[lo:hi] = scores.numpy().argmax(0)
        else:  # on the device, so only the labels cross to the host
            labels[lo:hi] = scores.argmax(0).to(torch.uint8 if small else torch.int32).cpu().numpy()
    return labels


# ---------------------------------------------------------------------------------------------


def _window_grid(image: np.ndarray, tile: Sequence[int], num_classes: int, overlap: float, batch_size: int,
                 *, align: int = 1):
    """Validate sliding-window arguments and lay out its tiles.

    Returns:
        (spatial size, tile, padded size (at least one tile per axis), padding before the image,
        tile starts per axis in padded coordinates, Gaussian tile weights).
    """
    spatial = check_image(image)
    tile = as_size(tile, "tile", len(spatial))
    check_common(num_classes, batch_size)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    padded = tuple(max(s, t) for s, t in zip(spatial, tile))
    before = tuple((p - s) // 2 for p, s in zip(padded, spatial))
    steps = [max(1, int(t * (1 - overlap))) for t in tile]
    grid = [tile_starts(p, t, st, align) for p, t, st in zip(padded, tile, steps)]
    return spatial, tile, padded, before, grid, gaussian_weights(tile)


def _blend_slabs(fn: TileFn, image: np.ndarray, tile: Sequence[int], num_classes: int, overlap: float,
                 batch_size: int, device: str | torch.device, progress: Progress | None,
                 align: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Validate (eagerly) and run the sliding-window blend, one slab of tiles at a time.

    A slab is the tiles that share one start on the first axis. The accumulators (the weighted
    sum and the weight sum) hold the ``tile[0]`` padded rows the current slab covers, on
    ``device``; once a slab is done, the rows before the next slab's start are final and are
    yielded (the caller takes them to the host before asking for more), and the rest are copied
    to the top of a spare pair of accumulators, which the next slab uses. Every slab adds the same
    weights, so their sum over one slab is built once. The image goes to ``device`` one slab of
    rows at a time; the next slab's copy is queued before this one's rows are read back, so on
    CUDA the copy overlaps the network's work.

    Returns:
        An iterator of (first image row, end image row, (K, rows, *S[1:]) float32 blended scores
        on ``device``), covering the image's rows in order.
    """
    spatial, tile, padded, before, grid, weights = _window_grid(
        image, tile, num_classes, overlap, batch_size, align=align
    )
    dev = torch.device(device)
    rest = list(itertools.product(*grid[1:]))  # padded starts on the other axes, the same in every slab
    total = len(grid[0]) * len(rest)
    logger.debug("sliding window: %d tiles of %s over %s on %s", total, tile, spatial, dev)
    # a slab holds every image column: windows start at its row 0, and at start - before elsewhere
    windows = [(0, *(r - b for r, b in zip(start, before[1:]))) for start in rest]
    regions = [(slice(None), *(slice(r, r + t) for r, t in zip(start, tile[1:]))) for start in rest]
    crop = tuple(slice(b, b + n) for b, n in zip(before[1:], spatial[1:]))

    def slabs() -> Iterator[tuple[int, int, torch.Tensor]]:
        weight = torch.from_numpy(weights).to(dev)  # once, not per tile
        slab_weight = _zeros((tile[0], *padded[1:]), dev)  # what one slab adds to the weight sum
        with _serial(dev):
            for region in regions:
                slab_weight[region] += weight
        # two of each: the rows the next slab still adds to are copied into the spare, not shifted in place
        acc = [_zeros((num_classes, tile[0], *padded[1:]), dev) for _ in range(2)]
        wsum = [_zeros((tile[0], *padded[1:]), dev) for _ in range(2)]
        cut, done = _cutter(tile, dev), 0
        slab = _upload(image, grid[0][0] - before[0], tile[0], dev)
        for i, s0 in enumerate(grid[0]):
            for first in range(0, len(rest), batch_size):
                chunk = range(first, min(first + batch_size, len(rest)))
                with torch.no_grad():
                    with _serial(dev):
                        batch = torch.stack([cut(slab, windows[j]) for j in chunk])
                    out = _predict(fn, batch, (num_classes, *tile), dev)
                    with _serial(dev):
                        for j, pred in zip(chunk, out):
                            acc[0][(slice(None), *regions[j])] += pred * weight
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            nxt = grid[0][i + 1] if i + 1 < len(grid[0]) else padded[0]
            if i + 1 < len(grid[0]):
                slab = _upload(image, nxt - before[0], tile[0], dev)
            lo, hi = max(s0, before[0]), min(nxt, before[0] + spatial[0])  # padded rows no later slab reaches
            final = nxt - s0  # <= tile[0]: steps never exceed the tile
            keep = tile[0] - final
            with _serial(dev):
                wsum[0] += slab_weight
                scores = None
                if hi > lo:
                    rows = slice(lo - s0, hi - s0)
                    scores = acc[0][(slice(None), rows, *crop)] / wsum[0][(rows, *crop)]
                acc[1][:, :keep], wsum[1][:keep] = acc[0][:, final:], wsum[0][final:]
                acc[1][:, keep:], wsum[1][keep:] = 0, 0
            acc.reverse()
            wsum.reverse()
            if scores is not None:
                yield lo - before[0], hi - before[0], scores

    return slabs()


@contextlib.contextmanager
def _serial(dev: torch.device) -> Iterator[None]:
    """One CPU thread for the stitching's small element-wise ops (as numpy ran them) on the CPU.

    Measured on a loaded 2-core machine: an OpenMP-parallel ``acc[region] += pred * w`` of a 64^3
    tile took 100 ms with 2 threads waiting on each other and 2 ms with one. The network (``fn``)
    keeps every thread. Elsewhere nothing changes.
    """
    if dev.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _zeros(shape: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """A float32 zero accumulator on ``dev``; on the CPU numpy owns it (so tracemalloc sees it)."""
    if dev.type == "cpu":
        return torch.from_numpy(np.zeros(shape, np.float32))
    return torch.zeros(shape, dtype=torch.float32, device=dev)


def _upload(image: np.ndarray, start: int, length: int, dev: torch.device) -> torch.Tensor:
    """Rows ``start .. start + length - 1`` of ``image`` (C, *S), mirrored outside it, as float32 on ``dev``.

    On the CPU rows inside a float32 image are a view (no copy); on CUDA they are copied once into
    pinned memory and sent asynchronously.
    """
    n = image.shape[1]
    rows = image[:, start: start + length] if 0 <= start and start + length <= n else \
        image[:, mirror_indices(start, length, n)]
    if dev.type == "cuda":
        pinned = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
        pinned.numpy()[...] = rows  # the one host copy, converting the dtype on the way
        return pinned.to(dev, non_blocking=True)
    rows = rows.astype(np.float32, copy=False)
    if not rows.flags.writeable:  # torch warns on read-only memory (a memory-mapped image)
        rows = rows.copy()
    return torch.from_numpy(rows).to(dev)


def _cutter(tile: tuple[int, ...],
            dev: torch.device) -> Callable[[torch.Tensor, Sequence[int]], torch.Tensor]:
    """``cut(slab, start)``: the (C, *tile) window of a (C, *S) tensor at ``start``, mirrored outside
    it, on the tensor's device; the mirror indices of each (axis, start) are built once."""
    indices: dict[tuple[int, int, int], torch.Tensor] = {}

    def cut(slab: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        out = slab
        for axis, (s, t) in enumerate(zip(start, tile), start=1):
            n = slab.shape[axis]
            if 0 <= s and s + t <= n:
                out = out.narrow(axis, s, t)
            else:
                key = (axis, s, n)
                if key not in indices:
                    indices[key] = torch.from_numpy(mirror_indices(s, t, n)).to(dev)
                out = out.index_select(axis, indices[key])
        return out

    return cut


def _predict(fn: TileFn, batch: torch.Tensor, expected: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """``fn(batch)`` as float32 on ``dev``, checked to be (B, *expected)."""
    out = fn(batch)
    out = out.detach() if torch.is_tensor(out) else torch.from_numpy(np.asarray(out, np.float32))
    out = out.to(dev, torch.float32)
    if tuple(out.shape) != (len(batch), *expected):
        raise ValueError(f"fn returned shape {tuple(out.shape)} for a batch of {len(batch)} tiles of "
                         f"{tuple(batch.shape[2:])}; expected {(len(batch), *expected)}")
    return out
