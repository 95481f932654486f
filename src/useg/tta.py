"""Test-time augmentation and the output activation: pure tensor functions, no model, no plan.

:func:`tta_average` averages a per-tile probability function over a symmetry group of the tile
(nnU-Net mirrors per tile too, which keeps tiling and its memory bound unchanged), and
:func:`output_activation` turns logits into the probabilities every prediction backend returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

Transform = tuple[bool, tuple[int, ...]]  # (transpose the last two axes?, flipped axes)


def symmetries(shape: Sequence[int], tta: bool, rotate: bool = False) -> list[Transform]:
    """The test-time transforms of a (B, C, *tile) batch: (transpose the last two axes?, flipped axes).

    Identity first. Without ``tta`` only the identity; with it every combination of mirrored
    axes (4 in 2D, 8 in 3D); with ``rotate`` and a square 2D tile also the transposed ones, so all
    8 symmetries of the square (the paper averaged rotated and mirrored versions). Each set is a
    group, so the average is exactly equivariant under it.

    Args:
        shape: the batch shape (B, C, *tile).
        tta: mirror the spatial axes.
        rotate: with ``tta``, also transpose square 2D tiles.
    """
    if not tta:
        return [(False, ())]
    axes = range(2, len(shape))
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    transpose = rotate and len(shape) == 4 and shape[-1] == shape[-2]
    return [(t, f) for t in ((False, True) if transpose else (False,)) for f in flips]


def tta_average(probs_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, tta: bool,
                rotate: bool = False) -> torch.Tensor:
    """Mean of ``probs_of`` over :func:`symmetries`, each mapped back to the input's frame.

    Args:
        probs_of: (B, C, *tile) -> (B, K, *out) probabilities; the output's spatial axes must
            transform like the input's (true of every U-Net, same or valid padding).
        batch: (B, C, *tile).
        tta, rotate: as in :func:`symmetries`.

    Returns:
        (B, K, *out); exactly ``probs_of(batch)`` without ``tta``.
    """
    out = None
    transforms = symmetries(tuple(batch.shape), tta, rotate)
    for transpose, axes in transforms:
        x = batch.transpose(-1, -2) if transpose else batch
        p = probs_of(x.flip(axes) if axes else x)
        p = p.flip(axes) if axes else p  # undo in reverse order: flip, then transpose
        p = p.transpose(-1, -2) if transpose else p
        out = p if out is None else out + p
    return out / len(transforms) if len(transforms) > 1 else out


def output_activation(regions: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, K, *S) -> probabilities: softmax over classes, or a sigmoid per region with ``regions``."""
    if regions:
        return torch.sigmoid
    return lambda logits: torch.softmax(logits, dim=1)
