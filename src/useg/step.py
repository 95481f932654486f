"""One optimizer step and what shapes it: the optimizer, the learning-rate schedule, gradient clipping.

:func:`train_step` is the step :func:`useg.train.fit` runs and :func:`useg.sizing` times on this
machine; it reads nothing back from the device.
"""

from __future__ import annotations

import math

import torch

from . import runtime
from .plan import Plan

GRAD_CLIP = 12.0  # nnU-Net clips the gradient norm at 12; it tames early AdamW spikes too


def lr_factor(t: float, schedule: str, warmup: float) -> float:
    """Learning-rate multiplier at training progress ``t`` in [0, 1].

    Progress is the larger of steps done / steps planned and time spent / time budget, so a
    time-budgeted run still anneals fully before its budget ends.
    """
    t = min(max(t, 0.0), 1.0)
    if warmup > 0 and t < warmup:
        return (t + 1e-3) / warmup
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose poly, cosine or constant")


def make_optimizer(model: torch.nn.Module, plan: Plan) -> torch.optim.Optimizer:
    t = plan.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {t.optimizer!r}; choose adamw or sgd")


def train_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, loss_fn,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               precision: runtime.Precision) -> torch.Tensor:
    """One optimizer step: forward under autocast, loss in fp32, scaled backward, gradient norm
    clipped at :data:`GRAD_CLIP`. Returns the detached loss without a host sync: nothing is read back
    from the device (only fp16's gradient scaler must read whether a gradient overflowed; bf16 and
    fp32 need no scaler).

    Args:
        net: the network (or its DDP wrapper), in train mode.
        x: (B, C, *S) images in the network's memory format; y: (B, *S') labels; w: weights or None.
    """
    with runtime.autocast(device, precision):
        logits = net(x)
    loss = loss_fn(logits.float(), y, w)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
