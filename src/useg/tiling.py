"""The tile grid both inference strategies share: where tiles start, mirrored borders, the checks.

:func:`tile_starts` spreads windows over an axis (aligned to the network's pooling grid when
asked), :func:`mirror_indices` extends an axis by mirroring (the paper's border extrapolation),
and :func:`check_image`, :func:`as_size` and :func:`check_common` validate the arguments of
:func:`useg.sliding_window.sliding_window` (same padding, Gaussian blending) and
:func:`useg.overlap_tile.overlap_tile` (valid padding, the U-Net paper's overlap-tile).

A tile function (:data:`TileFn`) is any callable mapping a float32 batch ``(B, C, *tile)`` to
``(B, K, *out_tile)``; the caller handles device placement of the model and autocast inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

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


def check_image(image: np.ndarray) -> tuple[int, ...]:
    """The spatial size of ``image``, checked to be a non-empty numeric (C, *S) numpy array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (C, *S), got {type(image).__name__}")
    if image.ndim < 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty (C, *S) array, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise ValueError(f"image must be numeric, got dtype {image.dtype}")
    return tuple(image.shape[1:])


def as_size(size: Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    """``size`` as a tuple of positive ints (``ndim`` of them when given); ``name`` is for the message."""
    try:
        out = tuple(int(v) for v in size)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {size!r}") from None
    if not out or any(v < 1 or v != s for v, s in zip(out, size)):
        raise ValueError(f"{name} must be a sequence of positive integers, got {size!r}")
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"{name} {out} has {len(out)} axes but the image has {ndim} spatial axes")
    return out


def check_common(num_classes: int, batch_size: int) -> None:
    """Refuse a class count or batch size that is not a positive integer."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
