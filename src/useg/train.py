"""The training loop: patches -> U-Net -> loss -> optimizer, with validation, checkpoints and resume.

A run folder holds ``plan.json`` (written first), ``model.safetensors`` (best validation Dice),
``last.safetensors`` (everything needed to resume: model, optimizer, step, RNG, best metric),
``metrics.jsonl`` (one record per epoch) and ``curves.png``. Every file is written to a temporary
name and renamed, so a crash at any moment leaves the previous version intact. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .augment import Augmenter
from .backends import TorchBackend
from .checkpoint import load_checkpoint, save_checkpoint, save_model
from .errors import UsegError
from .io import atomic_path
from .labels import regions_to_labels
from .losses import SegLoss
from .metrics import confusion, dice
from .model import UNet
from .patches import PatchDataset
from .plan import Plan
from .predict import check_low_precision, predict_proba

logger = logging.getLogger(__name__)

GRAD_CLIP = 12.0  # nnU-Net clips the gradient norm at 12; it tames early AdamW spikes too


@dataclass(frozen=True)
class TrainResult:
    run: Path  # the run folder
    best_dice: float  # best validation foreground Dice (nan without validation)
    best_epoch: int  # epoch of the saved model
    epochs: int  # epochs completed
    steps: int  # optimizer steps taken
    minutes: float  # wall-clock training time, resumed parts included


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


def validate(model, images, labels, plan: Plan, device, precision, dist: runtime.Dist = runtime.Dist()) -> dict:
    """Foreground Dice (classes pooled over all validation images) and mean cross-entropy.

    Under DDP each process validates its share of the images and the counts are summed, so
    every process gets the same numbers (sum the counts, then compute Dice).
    """
    images, labels = images[dist.rank::dist.world], labels[dist.rank::dist.world]
    regions = plan.data.regions
    k = plan.data.label_map.num_classes
    counts = np.zeros((k, 3), dtype=np.int64)
    ce, n = 0.0, 0
    model.eval()
    for image, label in zip(images, labels):
        probs = predict_proba(TorchBackend(model, plan, device, precision), image, plan)
        if regions:  # binary cross-entropy per region, classes from the nested-region rule
            y = np.stack([np.isin(label, r) for r in regions])
            p_true = np.where(y, probs, 1.0 - probs)
            counts += confusion(regions_to_labels(probs, regions), label, k)
        else:
            counts += confusion(probs.argmax(0), label, k)
            p_true = np.take_along_axis(probs, label[None], 0)
        ce += float(-np.log(np.clip(p_true, 1e-8, 1.0)).sum()) / len(p_true)
        n += label.size
    model.train()
    totals = runtime.all_reduce_sum(torch.tensor([*counts.ravel().tolist(), ce, n], dtype=torch.float64), dist)
    counts = totals[:-2].numpy().reshape(k, 3).round().astype(np.int64)
    ce, n = float(totals[-2]), float(totals[-1])
    per_class = [dice(*counts[c]) for c in range(k)]
    fg = per_class[1:] if k > 1 else per_class
    return {"val_dice": float(np.mean(fg)), "val_dice_per_class": per_class, "val_loss": ce / max(n, 1)}


def border_weights(labels: Sequence[np.ndarray], plan: Plan) -> list[np.ndarray]:
    """The paper's eq. 2 weight map of every training image, computed once before training.

    Objects are the connected components of the foreground (all classes > 0), which for
    membrane data such as ISBI 2012 are the cells between the membranes.
    """
    from .weightmap import border_weight_map, instances_from_semantic

    d = plan.data
    t0 = time.perf_counter()
    maps = [border_weight_map(instances_from_semantic(lab), w0=d.w0, sigma=d.sigma, spacing=d.spacing)
            for lab in labels]
    logger.info("border weight maps of %d images in %.1f s", len(maps), time.perf_counter() - t0)
    return maps


def train_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, loss_fn,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               precision: runtime.Precision) -> torch.Tensor:
    """One optimizer step: forward under autocast, loss in fp32, scaled backward, gradient norm
    clipped at :data:`GRAD_CLIP`. Returns the detached loss without a host sync.

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


def _workers(setting: int, device: torch.device) -> int:
    if setting >= 0:
        return setting
    cpus = runtime.cpu_count()
    # On a small CPU the workers would steal cores from the network; patches are cheap to cut.
    return 0 if device.type == "cpu" and cpus <= 4 else min(4, cpus // 2)


def fit(
    plan: Plan,
    train_data: tuple[list[np.ndarray], list[np.ndarray]],
    val_data: tuple[list[np.ndarray], list[np.ndarray]],
    run: str | Path,
    time_budget_min: float | None = None,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
) -> TrainResult:
    """Train the plan's U-Net on in-memory arrays and write the run folder.

    Args:
        plan: what to train (saved as run/plan.json).
        train_data: (images (C, *S) float32 normalised, labels (*S) int64) lists.
        val_data: the same for validation (may be empty: the last model is kept then).
        run: the run folder.
        time_budget_min: stop (after validating) once this many minutes have passed.
        resume: continue from run/last.safetensors.
        device: "auto", "cpu", "cuda", ...
        quiet: no progress bar.

    Returns:
        A :class:`TrainResult`.
    """
    run = Path(run)
    dist, dev = runtime.init_distributed(device)
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
    quiet = quiet or not dist.main  # only rank 0 logs and writes
    t = plan.train
    prec = runtime.pick_precision(dev, "fp32" if t.deterministic else t.precision)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=dev.type == "cpu")
        if dev.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    runtime.set_threads(max(1, runtime.cpu_count() // dist.world) if dev.type == "cpu" else None)
    torch.manual_seed(plan.train.seed)  # the same initial weights on every rank
    model = UNet.from_config(plan.model)
    fmt = runtime.memory_format(plan.model.dims, prec)
    model = model.to(dev, memory_format=fmt)
    torch.manual_seed(plan.train.seed + dist.rank)  # then per-rank randomness (dropout) differs
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = make_optimizer(model, plan)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    loss_fn = SegLoss(plan.train.loss, regions=plan.data.regions)
    out_size = model.output_size(plan.data.patch_size)
    images, labels = train_data
    weights = border_weights(labels, plan) if plan.data.border_weights else None
    ds = PatchDataset(
        images, labels, plan.data.patch_size, out_size=out_size, weights=weights,
        length=t.iters_per_epoch * t.batch_size * dist.world, seed=t.seed,
        augment=Augmenter(plan.data.augment), fg_fraction=plan.data.fg_fraction,
    )
    # Under DDP each rank takes its own share of the epoch's (already random) patches.
    sampler = (torch.utils.data.DistributedSampler(ds, dist.world, dist.rank, shuffle=True, seed=t.seed,
                                                   drop_last=True) if dist.world > 1 else None)
    workers = _workers(t.workers, dev)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=t.batch_size, shuffle=False, sampler=sampler, drop_last=True, num_workers=workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )
    state = {"epoch": 0, "step": 0, "seconds": 0.0, "best_dice": -1.0, "best_epoch": -1}
    last = run / "last.safetensors"
    if resume:
        if not last.exists():
            raise UsegError(f"{last} does not exist; there is nothing to resume, train without --resume")
        state = load_checkpoint(last, model, optimizer)
        logger.info("resuming %s at epoch %d (step %d)", run, state["epoch"], state["step"])
        if dist.main:
            _drop_records_after(run / "metrics.jsonl", state["epoch"])
    elif dist.main:
        plan.save(run / "plan.json")
        (run / "metrics.jsonl").unlink(missing_ok=True)
    budget_s = time_budget_min * 60.0 if time_budget_min else None
    total_steps = t.epochs * t.iters_per_epoch
    if dist.main:
        logger.info("training on %s%s, %s, %d workers, %d train / %d val images", dev,
                    f" x {dist.world} processes" if dist.world > 1 else "", prec.name, workers,
                    len(images), len(val_data[0]))

    progress = _progress(quiet)
    task = progress.add_task("train", total=total_steps, completed=state["step"], loss=float("nan"),
                             dice=max(state["best_dice"], 0.0))
    start = time.perf_counter() - state["seconds"]
    val_seconds = 0.0
    model.train()
    with progress:
        while state["epoch"] < t.epochs:
            epoch = state["epoch"]
            ds.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            running, count, stop = torch.zeros((), device=dev), 0, False
            for batch in loader:
                elapsed = time.perf_counter() - start
                frac = state["step"] / total_steps
                if budget_s and not t.deterministic:  # wall time would make the schedule unrepeatable
                    frac = max(frac, elapsed / budget_s)
                for g in optimizer.param_groups:
                    g["lr"] = t.lr * lr_factor(frac, t.schedule, t.warmup)
                x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=fmt)
                y = batch["label"].to(dev, non_blocking=True)
                w = batch["weight"].to(dev, non_blocking=True) if "weight" in batch else None
                loss = train_step(net, x, y, w, loss_fn, optimizer, scaler, dev, prec)
                running += loss
                count += 1
                state["step"] += 1
                if count % 5 == 0:  # .item() syncs with the device: only now and then
                    progress.update(task, completed=state["step"], loss=float(running) / count)
                else:
                    progress.update(task, completed=state["step"])
                if budget_s and _out_of_time(time.perf_counter() - start + val_seconds > budget_s, dist):
                    stop = True
                    break
            sums = runtime.all_reduce_sum(torch.stack([running.double().cpu(), torch.tensor(float(count))]), dist)
            train_loss = float(sums[0]) / max(float(sums[1]), 1.0)
            record = {"epoch": epoch, "step": state["step"], "train_loss": train_loss,
                      "lr": optimizer.param_groups[0]["lr"]}
            if val_data[0]:
                v0 = time.perf_counter()
                record.update(validate(model, *val_data, plan, dev, prec, dist))
                val_seconds = time.perf_counter() - v0
                if record["val_dice"] > state["best_dice"]:
                    state["best_dice"], state["best_epoch"] = record["val_dice"], epoch
                    if dist.main:
                        save_model(model, run / "model.safetensors")
            else:
                state["best_epoch"] = epoch
                if dist.main:
                    save_model(model, run / "model.safetensors")
            state["epoch"] = epoch + 1
            state["seconds"] = time.perf_counter() - start
            record["seconds"] = round(state["seconds"], 2)
            if dist.main:
                with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                save_checkpoint(last, model, optimizer, state)
            if budget_s and state["seconds"] > 0 and state["epoch"] < t.epochs:
                # Re-estimate how many steps fit in the budget so the bar's ETA is honest.
                per_step = state["seconds"] / max(state["step"], 1)
                fits = int(budget_s / per_step)
                progress.update(task, total=max(state["step"], min(total_steps, fits)))
            progress.update(task, loss=train_loss, dice=max(state["best_dice"], 0.0))
            logger.info("epoch %d: loss %.4f%s", epoch, train_loss,
                        f", val dice {record['val_dice']:.4f}" if "val_dice" in record else "")
            if stop:
                break
    torch.use_deterministic_algorithms(was_deterministic)
    in_sync = _ranks_in_sync(model, dist)
    result = TrainResult(run, state["best_dice"] if val_data[0] else float("nan"), state["best_epoch"],
                         state["epoch"], state["step"], state["seconds"] / 60.0)
    if dist.main:
        _plot(run)
        check_low_precision(plan, run, val_data[0] or images, dev)
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        summary.update(world_size=dist.world, ranks_in_sync=in_sync)
        with atomic_path(run / "summary.json") as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if dist.owner:
        import torch.distributed as td

        td.barrier()  # rank 0's files are complete before any process exits
        td.destroy_process_group()
    return result


def _drop_records_after(path: Path, epoch: int) -> None:
    """Keep the metrics of epochs before ``epoch``: a crash may have logged one the checkpoint lacks."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("epoch", 0) < epoch]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _out_of_time(local: bool, dist: runtime.Dist) -> bool:
    """Whether to stop for the time budget; under DDP all ranks stop at the same step or they hang."""
    if dist.world == 1:
        return local
    return bool(runtime.all_reduce_sum(torch.tensor([float(local)]), dist)[0] > 0)


def _ranks_in_sync(model: torch.nn.Module, dist: runtime.Dist) -> bool:
    """DDP keeps replicas identical; check it once at the end (sum of weights, max minus min over ranks)."""
    if dist.world == 1:
        return True
    import torch.distributed as td

    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    hi, lo = total.clone(), total.clone()
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    same = bool(hi == lo)
    if not same:
        logger.error("DDP replicas differ at the end of training (weight sums %r vs %r)", float(hi), float(lo))
    return same


def _plot(run: Path) -> None:
    from .report import plot_curves

    path = run / "metrics.jsonl"
    if path.exists():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if records:
            plot_curves(records, run / "curves.png")


def _progress(quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("val dice {task.fields[dice]:.3f}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        disable=quiet, transient=False,
    )


__all__ = ["TrainResult", "fit", "lr_factor", "make_optimizer", "train_step", "validate"]
