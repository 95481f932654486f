"""Segmentation losses as pure functions on tensors, with a thin module wrapper.

Shapes: logits (B, K, *S) (any float dtype; computed in float32), target (B, *S) int64 class
indices, weight (B, *S) float. Pixels equal to ``ignore_index`` count in no term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("dice_ce", "ce", "dice")


def _check(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> None:
    if logits.dim() < 3 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: expected target "
            "(B, *S) for logits (B, K, *S); with valid padding centre-crop the target with useg.model.center_crop"
        )
    if weight is not None and weight.shape != target.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must have the target's shape {tuple(target.shape)}")


def _valid(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of counted pixels as float, target with ignored pixels set to class 0)."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.float32), target
    keep = target != ignore_index
    return keep.float(), torch.where(keep, target, torch.zeros_like(target))


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                           ignore_index: int | None = None) -> torch.Tensor:
    """Pixel-weighted softmax cross-entropy, the U-Net paper's eq. 1: E = sum w(x) log p_l(x)(x).

    Averaged over the counted pixels (not over the weights' sum), so all-ones weights give
    exactly ``F.cross_entropy(logits, target)``.

    Args:
        logits: (B, K, *S).
        target: (B, *S) int64.
        weight: (B, *S) per-pixel weights, or None for ones.
        ignore_index: a target value excluded from the loss.

    Returns:
        A scalar tensor.
    """
    _check(logits, target, weight)
    keep, safe = _valid(target, ignore_index)
    nll = F.cross_entropy(logits.float(), safe, reduction="none")
    w = keep if weight is None else keep * weight.float()
    return (nll * w).sum() / keep.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None,
                   include_background: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes, the sums taken over the whole batch (nnU-Net's batch Dice).

    Args:
        logits: (B, K, *S).
        target: (B, *S) int64.
        ignore_index: a target value excluded from both sums.
        include_background: count class 0 (always counted when K == 1).
        smooth: added to numerator and denominator so empty classes do not divide by zero.

    Returns:
        A scalar tensor in [0, 1].
    """
    _check(logits, target, None)
    keep, safe = _valid(target, ignore_index)
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1) * keep.unsqueeze(1)
    onehot = F.one_hot(safe, k).movedim(-1, 1).float() * keep.unsqueeze(1)
    dims = [0, *range(2, logits.dim())]
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background and k > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """``ce_weight * weighted_cross_entropy + dice_weight * soft_dice_loss`` (nnU-Net's default loss)."""
    return (ce_weight * weighted_cross_entropy(logits, target, weight, ignore_index)
            + dice_weight * soft_dice_loss(logits, target, ignore_index))


class SegLoss(nn.Module):
    """The training loss by name: "dice_ce", "ce" (weighted cross-entropy) or "dice".

    Args:
        kind: one of :data:`KINDS`.
        ignore_index: a target value excluded from the loss.
        include_background: count class 0 in the Dice term.
    """

    def __init__(self, kind: str = "dice_ce", ignore_index: int | None = None, include_background: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.ignore_index, self.include_background = kind, ignore_index, include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.kind in ("dice_ce", "ce"):
            loss = loss + weighted_cross_entropy(logits, target, weight, self.ignore_index)
        if self.kind in ("dice_ce", "dice"):
            loss = loss + soft_dice_loss(logits, target, self.ignore_index, self.include_background)
        return loss
