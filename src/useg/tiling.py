"""Inference on images of any size, with memory bounded by the tile.

Two strategies, one per kind of network:

* :func:`sliding_window` for same-padding networks (output tile == input tile): overlapping
  tiles blended with a Gaussian importance map, as in nnU-Net (Isensee et al. 2021), because
  predictions near a tile's border see less context and deserve less weight.
* :func:`overlap_tile` for valid-padding networks (output tile smaller than the input tile): the
  U-Net paper's overlap-tile strategy (Ronneberger et al. 2015, Fig. 2): output tiles laid side by
  side, each predicted from the larger input window centred on it, the context missing at the
  image border extrapolated by mirroring the image.

``fn`` is any callable mapping a float32 batch ``(B, C, *tile)`` to ``(B, K, *out_tile)``; the
caller handles device placement of the model and autocast inside it. Tiles are cut with index
arrays straight from the image, so the mirror-padded image is never materialised. The sliding
window cuts, blends and (for labels) arg-maxes on ``device``, one slab of tiles at a time: the
image goes there a slab of rows at a time, the Gaussian weights once, and each finished slab
comes back to the host once (a GPU never waits on host-side stitching). Its only full-size
buffer is the (K, *S) result on the host; the ``*_labels`` variants return argmax labels
without ever holding a (K, *S) float buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


def tile_starts(size: int, tile: int, step: int, align: int = 1) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``[0, size)``.

    The starts are spread evenly (nnU-Net's choice) so consecutive ones are at most ``step``
    apart; the first is 0 and the last is flush with the end (``size - tile``).

    With ``align > 1`` every start but the last is a multiple of ``align``: a same-padding U-Net
    of depth ``d`` is translation-consistent only for shifts by multiples of ``2**d`` (its
    max-pooling grid moves otherwise), so ``align=2**d`` makes overlapping tiles agree with each
    other and with a whole-image forward. The last window stays flush with the end and may be
    unaligned; that only matters where it overlaps its neighbour. The aligned starts are spread
    as evenly as alignment allows with the fewest windows. When ``step < align`` the densest
    aligned spacing, ``align``, is used instead of ``step``.

    Args:
        size: length of the axis, >= 1.
        tile: window length, >= 1.
        step: largest allowed distance between consecutive starts, in [1, tile].
        align: starts (but the last) are multiples of this, in [1, tile] when ``tile < size``.

    Returns:
        Strictly increasing start offsets; ``[0]`` when ``tile >= size``. ``align=1`` gives the
        plain even spread.

    Examples:
        Half-overlapping windows of 48 on an axis of 100, the last one flush with the end:

        >>> tile_starts(100, 48, 24)
        [0, 17, 35, 52]

        A tile at least as long as the axis needs one window:

        >>> tile_starts(30, 48, 24)
        [0]

        Aligned to 16 (a depth-4 U-Net), all starts but the flush last one are multiples of 16:

        >>> tile_starts(100, 48, 24, align=16)
        [0, 16, 32, 52]

        A step longer than the tile would leave gaps:

        >>> tile_starts(100, 48, 64)
        Traceback (most recent call last):
            ...
        ValueError: step 64 > tile 48 would leave gaps between windows
    """
    for name, value in (("size", size), ("tile", tile), ("step", step), ("align", align)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    size, tile, step, align = int(size), int(tile), int(step), int(align)
    if step > tile:
        raise ValueError(f"step {step} > tile {tile} would leave gaps between windows")
    if tile >= size:
        return [0]
    if align > tile:
        raise ValueError(f"align {align} > tile {tile} would leave gaps between aligned windows")
    span = size - tile
    if align == 1:
        n_gaps = -(-span // step)  # ceil
        gap = span / n_gaps  # <= step, and >= 1 because span >= n_gaps
        # floor(x + 0.5) rather than round(): banker's rounding could make two starts equal.
        return [int(np.floor(gap * i + 0.5)) for i in range(n_gaps + 1)]
    # Aligned starts k * align for k = k_0 = 0 < k_1 < ... < k_m, then the flush one at span.
    step = max(step, align)
    units = step // align  # largest gap between aligned starts, in units of align
    lo = max(0, -(-(span - step) // align))  # k_m >= lo so the flush window is <= step away
    hi = -(-span // align) - 1  # k_m * align < span: strictly before the flush start
    m = -(-lo // units)  # fewest aligned gaps that reach lo
    if m == 0:
        return [0, span]
    # place k_m where an even spread of m + 1 gaps over span would put it, within its bounds
    k_m = min(max(round(m * span / ((m + 1) * align)), lo), hi, m * units)
    # k_m >= lo >= m, so the integer spread below is strictly increasing with gaps <= units
    return [(2 * i * k_m + m) // (2 * m) * align for i in range(m + 1)] + [span]


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
    tile = _as_size(tile, "tile")
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


def mirror_indices(start: int, length: int, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` for coordinates ``start .. start + length - 1``, mirrored.

    Coordinates outside ``[0, size)`` are reflected about the end voxels (numpy ``reflect``:
    ``-1 -> 1``, ``size -> size - 2``), repeatedly, i.e. periodically with period
    ``2 * (size - 1)``; a single-voxel axis maps everything to 0 (edge).

    Args:
        start: first coordinate (may be negative).
        length: number of coordinates, >= 0.
        size: axis length, >= 1.

    Returns:
        (length,) int64 indices in ``[0, size)``.
    """
    if size < 1 or length < 0:
        raise ValueError(f"need size >= 1 and length >= 0, got size={size}, length={length}")
    coords = np.arange(start, start + length, dtype=np.int64)
    if size == 1:
        return np.zeros(length, dtype=np.int64)
    period = 2 * (size - 1)
    j = np.mod(coords, period)
    return np.where(j >= size, period - j, j)


# ---------------------------------------------------------------------------------------------


def _window_grid(image: np.ndarray, tile: Sequence[int], num_classes: int, overlap: float, batch_size: int,
                 *, align: int = 1):
    """Validate sliding-window arguments and lay out its tiles.

    Returns:
        (spatial size, tile, padded size (at least one tile per axis), padding before the image,
        tile starts per axis in padded coordinates, Gaussian tile weights).
    """
    spatial = _check_image(image)
    tile = _as_size(tile, "tile", len(spatial))
    _check_common(num_classes, batch_size)
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
    spatial = _check_image(image)
    in_tile = _as_size(in_tile, "in_tile", len(spatial))
    out_tile = _as_size(out_tile, "out_tile", len(spatial))
    _check_common(num_classes, batch_size)
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


def _check_image(image: np.ndarray) -> tuple[int, ...]:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (C, *S), got {type(image).__name__}")
    if image.ndim < 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty (C, *S) array, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise ValueError(f"image must be numeric, got dtype {image.dtype}")
    return tuple(image.shape[1:])


def _as_size(size: Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in size)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {size!r}") from None
    if not out or any(v < 1 or v != s for v, s in zip(out, size)):
        raise ValueError(f"{name} must be a sequence of positive integers, got {size!r}")
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"{name} {out} has {len(out)} axes but the image has {ndim} spatial axes")
    return out


def _check_common(num_classes: int, batch_size: int) -> None:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
