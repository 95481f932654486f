"""Segmentation losses as pure functions on tensors, with a thin module wrapper.

Shapes: logits (B, K, *S) with K >= 2 (any float dtype; always computed in float32), target
(B, *S) integer class indices, weight (B, *S) float. Pixels equal to ``ignore_index`` count in no
term. With valid padding the network's output is smaller than its input: centre-crop the target
(and weight map) to the logits with :func:`useg.model.center_crop` first.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("dice_ce", "ce", "dice")


def _check(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> None:
    if logits.dim() < 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor (B, K, *S), got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need K >= 2 classes (background included), got {logits.shape[1]}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: expected a target "
            f"of shape {(logits.shape[0], *logits.shape[2:])}; spatial shapes must be equal, so with valid "
            "padding centre-crop the target to the output with useg.model.center_crop"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if weight is not None and weight.shape != target.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must have the target's shape {tuple(target.shape)} "
                         "(centre-crop it like the target with valid padding)")


def _valid(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 mask of counted pixels, int64 target with ignored pixels set to class 0)."""
    target = target.long()
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.float32), target
    keep = target != ignore_index
    return keep.float(), torch.where(keep, target, torch.zeros_like(target))


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                           ignore_index: int | None = None) -> torch.Tensor:
    """Pixel-weighted softmax cross-entropy, the U-Net paper's eq. 1.

    ``E = sum_x w(x) * -log p_l(x)(x)`` with p the pixel-wise softmax, divided by the number of
    counted (non-ignored) pixels rather than by the weights' sum, so all-ones weights give exactly
    ``F.cross_entropy(logits, target, ignore_index=...)`` and a weight map only re-weights.

    Args:
        logits: (B, K, *S) float (bf16/fp16 are upcast to float32).
        target: (B, *S) integer class indices in [0, K), or ``ignore_index``.
        weight: (B, *S) per-pixel weights (e.g. from :mod:`useg.weightmap`), or None for ones.
        ignore_index: a target value excluded from the loss.

    Returns:
        A float32 scalar; 0 (with a gradient) when every pixel is ignored.
    """
    _check(logits, target, weight)
    keep, safe = _valid(target, ignore_index)
    nll = F.cross_entropy(logits.float(), safe, reduction="none")
    w = keep if weight is None else keep * weight.float()
    return (nll * w).sum() / keep.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None,
                   include_background: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the classes, each class's sums taken over the whole batch.

    Dice_k = (2 * sum p_k * y_k + smooth) / (sum p_k + sum y_k + smooth), p the softmax, y the
    one-hot target, the sums over batch and space together (nnU-Net's "batch Dice", which is
    stable when a patch holds no foreground).

    Args:
        logits: (B, K, *S) float.
        target: (B, *S) integer class indices, or ``ignore_index``.
        ignore_index: a target value excluded from both sums.
        include_background: count class 0; with False and K = 2 only class 1 is used.
        smooth: added to numerator and denominator so an empty class gives Dice 1, not 0/0.

    Returns:
        A float32 scalar in [0, 1].
    """
    _check(logits, target, None)
    keep, safe = _valid(target, ignore_index)
    k = logits.shape[1]
    keep = keep.unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1) * keep
    onehot = F.one_hot(safe, k).movedim(-1, 1).float() * keep
    dims = [0, *range(2, logits.dim())]
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False) -> torch.Tensor:
    """``ce_weight * weighted_cross_entropy + dice_weight * soft_dice_loss`` (nnU-Net's default loss).

    Args:
        logits: (B, K, *S) float.
        target: (B, *S) integer class indices.
        weight: (B, *S) per-pixel weights for the cross-entropy term (Dice is unweighted), or None.
        ignore_index: a target value excluded from both terms.
        dice_weight, ce_weight: the terms' factors.
        include_background: count class 0 in the Dice term.

    Returns:
        A float32 scalar.
    """
    return (ce_weight * weighted_cross_entropy(logits, target, weight, ignore_index)
            + dice_weight * soft_dice_loss(logits, target, ignore_index, include_background))


def region_targets(target: torch.Tensor, regions: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Class indices (B, *S) -> multi-hot region targets (B, R, *S) float: 1 where the class is in
    region r."""
    return torch.stack([torch.isin(target, torch.tensor(r, device=target.device)) for r in regions],
                       1).float()


def region_loss(logits: torch.Tensor, target: torch.Tensor, regions: tuple[tuple[int, ...], ...],
                weight: torch.Tensor | None = None, smooth: float = 1e-5,
                ignore_index: int | None = None) -> torch.Tensor:
    """nnU-Net's region-based loss: binary cross-entropy + soft Dice on sigmoid outputs, per region.

    Nested regions (BraTS: whole tumour contains tumour core contains enhancing tumour) are each a
    binary task, so the network optimises the evaluated regions directly (Isensee et al. 2021).

    Args:
        logits: (B, R, *S) float, one channel per region.
        target: (B, *S) integer class indices.
        regions: R tuples of the class indices each region unites.
        weight: (B, *S) per-pixel weights for the cross-entropy term, or None.
        ignore_index: a target value excluded from both terms.

    Returns:
        A float32 scalar.
    """
    if logits.shape[1] != len(regions):
        raise ValueError(f"logits have {logits.shape[1]} channels but there are {len(regions)} regions")
    y = region_targets(target, regions)
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
    p = torch.sigmoid(logits)
    if ignore_index is not None:  # ignored pixels weigh 0 in the cross-entropy and leave the Dice sums
        keep = (target != ignore_index).float()
        weight = keep if weight is None else weight * keep
        p = p * keep.unsqueeze(1)
    bce = (bce * weight).sum() / weight.sum().clamp_min(1e-8) if weight is not None else bce.mean()
    axes = (0, *range(2, logits.dim()))  # batch Dice, as for classes
    dice = (2 * (p * y).sum(axes) + smooth) / (p.sum(axes) + y.sum(axes) + smooth)
    return bce + 1.0 - dice.mean()


class SegLoss(nn.Module):
    """The training loss by name: "dice_ce", "ce" (the paper's weighted cross-entropy) or "dice".

    Args:
        kind: one of :data:`KINDS`.
        ignore_index: a target value excluded from the loss.
        include_background: count class 0 in the Dice term.
        regions: nested regions (tuples of class indices): the network has one sigmoid output per
            region and the loss is :func:`region_loss`, whatever ``kind`` says.

    Shapes:
        forward(logits (B, K, *S), target (B, *S), weight (B, *S) | None) -> float32 scalar.
    """

    def __init__(self, kind: str = "dice_ce", ignore_index: int | None = None,
                 include_background: bool = False, regions: tuple[tuple[int, ...], ...] = ()):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.ignore_index, self.include_background = kind, ignore_index, include_background
        self.regions = tuple(tuple(r) for r in regions)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss (float32 scalar); ``weight`` scales the cross-entropy term only."""
        if self.regions:
            return region_loss(logits, target, self.regions, weight, ignore_index=self.ignore_index)
        if self.kind == "ce":
            return weighted_cross_entropy(logits, target, weight, self.ignore_index)
        if self.kind == "dice":
            return soft_dice_loss(logits, target, self.ignore_index, self.include_background)
        return dice_ce_loss(logits, target, weight, self.ignore_index,
                            include_background=self.include_background)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, ignore_index={self.ignore_index}, "
                f"include_background={self.include_background}")
