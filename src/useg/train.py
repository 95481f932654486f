"""The training loop: patches -> U-Net -> loss -> optimizer, with validation, checkpoints and resume.

A run folder holds ``plan.json`` (written first), ``model.safetensors`` (best validation Dice),
``last.safetensors`` (everything needed to resume: model, optimizer, step, RNG, best metric),
``metrics.jsonl`` (one record per epoch) and ``curves.png``. Every file is written to a temporary
name and renamed, so a crash at any moment leaves the previous version intact. Nothing is pickled.
A loss that turns NaN or infinite stops the loop (:class:`UsegError`); weights that are not finite
are never written.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import runlog, runtime
from .augment import Augmenter
from .autotune_cache import save_agreement_tile
from .backends import TorchBackend
from .checkpoint import check_against, expected_shapes, load_checkpoint, save_checkpoint, save_model
from .errors import UsegError
from .labels import regions_to_labels
from .losses import SegLoss
from .metrics import confusion, dice
from .model import UNet
from .patches import PatchDataset
from .plan import Plan
from .predict import check_low_precision, predict_proba
from .roi import IGNORE
from .slices import network_images
from .step import lr_factor, make_optimizer, train_step

logger = logging.getLogger(__name__)

# Steps between the host's reads of the running loss (for the bar and the NaN check): on CUDA a
# read waits for the queued kernels, so the step itself never reads anything back.
SYNC_EVERY = 5


@dataclass(frozen=True)
class TrainResult:
    run: Path  # the run folder
    best_dice: float  # best validation foreground Dice (nan without validation)
    best_epoch: int  # epoch of the saved model
    epochs: int  # epochs completed
    steps: int  # optimizer steps taken
    minutes: float  # wall-clock training time, resumed parts included


_ONE_PROCESS = runtime.Dist()  # not under torchrun


def validate(model, images, labels, plan: Plan, device, precision, dist: runtime.Dist = _ONE_PROCESS) -> dict:
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
    backend = TorchBackend(model, plan, device, precision)
    for image, label in zip(images, labels):
        probs = predict_proba(backend, image, plan)
        keep = label != IGNORE  # pixels outside an ROI (or nnU-Net's ignore label) count nowhere
        label, probs = label[keep], probs[:, keep]
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
    totals = torch.tensor([*counts.ravel().tolist(), ce, n], dtype=torch.float64)
    totals = runtime.all_reduce_sum(totals, dist)
    counts = totals[:-2].numpy().reshape(k, 3).round().astype(np.int64)
    ce, n = float(totals[-2]), float(totals[-1])
    per_class = [dice(*counts[c]) for c in range(k)]
    fg = per_class[1:] if k > 1 else per_class
    return {"val_dice": float(np.mean(fg)), "val_dice_per_class": per_class, "val_loss": ce / max(n, 1)}


def border_weights(labels: Sequence[np.ndarray], plan: Plan) -> list[np.ndarray]:
    """The paper's eq. 2 weight map of every training image, computed once before training.

    Objects are the connected components of the foreground (all classes > 0), which for
    membrane data such as ISBI 2012 are the cells between the membranes. Ignored pixels (outside
    an ROI) count in no class and weigh 0.
    """
    from .weightmap import border_weight_map, instances_from_semantic

    d = plan.data
    t0 = time.perf_counter()
    maps = []
    for lab in labels:
        inside = lab != IGNORE
        valid = None if inside.all() else inside
        objects = instances_from_semantic(np.where(inside, lab, 0))
        maps.append(border_weight_map(objects, w0=d.w0, sigma=d.sigma, spacing=d.spacing, valid=valid))
    logger.info("border weight maps of %d images in %.1f s", len(maps), time.perf_counter() - t0)
    return maps


def _workers(setting: int, device: torch.device) -> int:
    if setting >= 0:
        return setting
    cpus = runtime.cpu_count()
    # On a small CPU the workers would steal cores from the network; patches are cheap to cut.
    return 0 if device.type == "cpu" and cpus <= 4 else min(4, cpus // 2)


@dataclass
class LoopState:
    """Where training stands; ``last.safetensors`` stores it as a dict with these keys."""

    epoch: int = 0  # epochs completed, so the next one to run
    step: int = 0  # optimizer steps taken
    seconds: float = 0.0  # training wall time, resumed parts included
    best_dice: float = -1.0  # best validation foreground Dice so far (-1 before any)
    best_epoch: int = -1  # epoch of model.safetensors

    def to_dict(self) -> dict:
        """The checkpoint's ``state`` record (keys in this order, as run folders have always held)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> LoopState:
        """The state a checkpoint holds; keys it lacks keep their starting values."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass(frozen=True)
class _Setup:
    """What one call of :func:`fit` trains with, built once by :func:`_setup`."""

    plan: Plan
    run: Path
    dist: runtime.Dist
    dev: torch.device
    prec: runtime.Precision
    fmt: torch.memory_format  # the network's memory format; batches are converted to it
    model: torch.nn.Module  # the network itself: saved, validated
    net: torch.nn.Module  # what takes the steps: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: SegLoss
    patches: PatchDataset
    sampler: torch.utils.data.DistributedSampler | None  # this rank's share under DDP
    loader: torch.utils.data.DataLoader
    workers: int
    images: list[np.ndarray]  # the training images


@dataclass
class _Clock:
    """This call's wall time, time budget and progress bar (none of it is checkpointed)."""

    start: float  # perf_counter() at the start, moved back by the seconds of resumed parts
    budget_s: float | None
    total_steps: int  # the plan's epochs x steps per epoch
    bar: runlog.ProgressBar
    val_seconds: float = 0.0  # the last validation's duration: the next one has to fit in the budget too

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


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

    The steps: :func:`_setup`, :func:`_restore_or_start`, then per epoch :func:`_run_epoch` and
    :func:`_end_epoch`, and :func:`_finish`. Threads, the process group and deterministic kernels are
    put back as they were when fit returns or raises.

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

    Raises:
        UsegError: the training loss became NaN or infinite (nothing diverged is saved).
    """
    run = Path(run)
    with runtime.global_state(device) as (dist, dev):
        if dist.main:
            run.mkdir(parents=True, exist_ok=True)
        with runtime.cudnn_autotune(dev), runtime.deterministic_mode(plan.train.deterministic, dev):
            if resume and (run / "last.safetensors").exists():  # before the network is built
                check_against(run / "last.safetensors", expected_shapes(plan.model), prefix="model.")
            s = _setup(plan, train_data, run, dist, dev)
            state = _restore_or_start(s, resume)
            # only rank 0 logs and writes
            s = _train(s, state, val_data, time_budget_min, quiet or not dist.main)
        return _finish(s, state, val_data)


def _setup(plan: Plan, train_data: tuple[list[np.ndarray], list[np.ndarray]], run: Path, dist: runtime.Dist,
           dev: torch.device) -> _Setup:
    """Precision, model (DDP-wrapped under torchrun), optimizer, loss, border weights and data loader."""
    t = plan.train
    prec = runtime.pick_precision(dev, "fp32" if t.deterministic else t.precision)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = UNet.from_config(plan.model)
    fmt = runtime.memory_format(plan.model.dims, prec)
    model = model.to(dev, memory_format=fmt)
    torch.manual_seed(t.seed + dist.rank)  # then per-rank randomness (dropout) differs
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = make_optimizer(model, plan)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    ignores = plan.data.roi or plan.data.ignore_value is not None
    loss_fn = SegLoss(t.loss, ignore_index=IGNORE if ignores else None, regions=plan.data.regions)
    images, labels = train_data
    weights = border_weights(labels, plan) if plan.data.border_weights else None
    patches = PatchDataset(
        images, labels, plan.data.patch_size, out_size=model.output_size(plan.data.patch_size),
        weights=weights, length=t.iters_per_epoch * t.batch_size * dist.world, seed=t.seed,
        augment=Augmenter(plan.data.augment), fg_fraction=plan.data.fg_fraction,
        slice_axis=plan.data.slice_axis,  # a 2D network on volumes: patches one slice thick
    )
    # Under DDP each rank takes its own share of the epoch's (already random) patches.
    sampler = (torch.utils.data.DistributedSampler(patches, dist.world, dist.rank, shuffle=True, seed=t.seed,
                                                   drop_last=True) if dist.world > 1 else None)
    workers = _workers(t.workers, dev)
    loader = torch.utils.data.DataLoader(
        patches, batch_size=t.batch_size, shuffle=False, sampler=sampler, drop_last=True, num_workers=workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )
    return _Setup(plan, run, dist, dev, prec, fmt, model, net, optimizer, scaler, loss_fn, patches, sampler,
                  loader, workers, images)


def _restore_or_start(s: _Setup, resume: bool) -> LoopState:
    """Resume from ``last.safetensors`` (model, optimizer, RNG, loop state) or start a fresh run folder.

    Raises:
        UsegError: resume was asked for but there is no checkpoint, or it cannot be read.
    """
    if not resume:
        if s.dist.main:
            s.plan.save(s.run / "plan.json")
            (s.run / "metrics.jsonl").unlink(missing_ok=True)
        return LoopState()
    last = s.run / "last.safetensors"
    if not last.exists():
        raise UsegError(f"{last} does not exist; there is nothing to resume, train without --resume")
    state = LoopState.from_dict(load_checkpoint(last, s.model, s.optimizer))
    logger.info("resuming %s at epoch %d (step %d)", s.run, state.epoch, state.step)
    if s.dist.main:
        runlog.drop_records_after(s.run / "metrics.jsonl", state.epoch)
    return state


def _train(s: _Setup, state: LoopState, val_data: tuple[list, list], time_budget_min: float | None,
           quiet: bool) -> _Setup:
    """The epochs from ``state.epoch`` to the plan's last, or until the time budget is spent."""
    t = s.plan.train
    if s.dist.main:
        logger.info("training on %s%s, %s, %d workers, %d train / %d val images", s.dev,
                    f" x {s.dist.world} processes" if s.dist.world > 1 else "", s.prec.name, s.workers,
                    len(s.images), len(val_data[0]))
    total_steps = t.epochs * t.iters_per_epoch
    bar = runlog.ProgressBar(quiet, total_steps, state.step, max(state.best_dice, 0.0))
    clock = _Clock(time.perf_counter() - state.seconds, time_budget_min * 60.0 if time_budget_min else None,
                   total_steps, bar)
    s.model.train()
    with bar:
        while state.epoch < t.epochs:
            train_loss, stop = _run_epoch(s, state, clock)
            _end_epoch(s, state, clock, train_loss, val_data)
            if stop:
                break
    return s


def _run_epoch(s: _Setup, state: LoopState, clock: _Clock) -> tuple[float, bool]:
    """The optimizer steps of epoch ``state.epoch``.

    Returns:
        (the mean training loss over all ranks, whether the time budget ran out).
    """
    t = s.plan.train
    s.patches.set_epoch(state.epoch)
    if s.sampler is not None:
        s.sampler.set_epoch(state.epoch)
    running, count, stop = torch.zeros((), device=s.dev), 0, False
    for batch in s.loader:
        frac = state.step / clock.total_steps
        if clock.budget_s and not t.deterministic:  # wall time would make the schedule unrepeatable
            frac = max(frac, clock.elapsed() / clock.budget_s)
        for g in s.optimizer.param_groups:
            g["lr"] = t.lr * lr_factor(frac, t.schedule, t.warmup)
        x = batch["image"].to(s.dev, non_blocking=True).contiguous(memory_format=s.fmt)
        y = batch["label"].to(s.dev, non_blocking=True)
        w = batch["weight"].to(s.dev, non_blocking=True) if "weight" in batch else None
        running += train_step(s.net, x, y, w, s.loss_fn, s.optimizer, s.scaler, s.dev, s.prec)
        count += 1
        state.step += 1
        if count % SYNC_EVERY == 0:  # reading the loss waits for the device: only now and then
            loss = float(running) / count
            _stop_if_diverged(s, state, loss)
            clock.bar.update(completed=state.step, loss=loss)
        else:
            clock.bar.update(completed=state.step)
        if clock.budget_s and runtime.any_rank(clock.elapsed() + clock.val_seconds > clock.budget_s, s.dist):
            stop = True
            break
    sums = runtime.all_reduce_sum(torch.stack([running.double().cpu(), torch.tensor(float(count))]), s.dist)
    loss = float(sums[0]) / max(float(sums[1]), 1.0)
    _stop_if_diverged(s, state, loss, agreed=True)  # the same sums on every rank: no collective needed
    return loss, stop


def _stop_if_diverged(s: _Setup, state: LoopState, loss: float, agreed: bool = False) -> None:
    """Stop at a NaN or infinite loss, checked where the loss is read anyway: every
    :data:`SYNC_EVERY` steps and at the epoch's end (so at most ``SYNC_EVERY - 1`` steps run on a
    diverged model, and nothing diverged is ever saved: saving comes after the epoch's check).

    ``agreed``: every rank holds the same ``loss`` (summed over ranks), so no collective is needed
    for all of them to stop together.

    Raises:
        UsegError: the loss is not finite on some rank (every rank raises, so none waits for the others).
    """
    diverged = not math.isfinite(loss)
    if not agreed:
        diverged = runtime.any_rank(diverged, s.dist)
    if diverged:
        raise UsegError(f"the training loss became {loss} by step {state.step} (epoch {state.epoch}): the "
                        f"learning rate {s.plan.train.lr:g} is likely too high for this data; lower --lr "
                        "and train again (nothing diverged was saved)")


def _end_epoch(s: _Setup, state: LoopState, clock: _Clock, train_loss: float,
               val_data: tuple[list, list]) -> None:
    """Validate, keep the best model, append the metrics record, checkpoint, and update the bar."""
    epoch = state.epoch
    record = {"epoch": epoch, "step": state.step, "train_loss": train_loss,
              "lr": s.optimizer.param_groups[0]["lr"]}
    if val_data[0]:
        v0 = time.perf_counter()
        record.update(validate(s.model, *val_data, s.plan, s.dev, s.prec, s.dist))
        clock.val_seconds = time.perf_counter() - v0
        best = record["val_dice"] > state.best_dice
        if best:
            state.best_dice, state.best_epoch = record["val_dice"], epoch
    else:  # without validation the last model is the one kept
        best, state.best_epoch = True, epoch
    if best and s.dist.main:
        save_model(s.model, s.run / "model.safetensors")
    state.epoch = epoch + 1
    state.seconds = clock.elapsed()
    record["seconds"] = round(state.seconds, 2)
    if s.dist.main:
        runlog.append_record(s.run, record)
        save_checkpoint(s.run / "last.safetensors", s.model, s.optimizer, state.to_dict())
    if clock.budget_s and state.seconds > 0 and state.epoch < s.plan.train.epochs:
        # Re-estimate how many steps fit in the budget so the bar's ETA is honest.
        fits = int(clock.budget_s / (state.seconds / max(state.step, 1)))
        clock.bar.update(total=max(state.step, min(clock.total_steps, fits)))
    clock.bar.update(loss=train_loss, dice=max(state.best_dice, 0.0))
    logger.info("epoch %d: loss %.4f%s", epoch, train_loss,
                f", val dice {record['val_dice']:.4f}" if "val_dice" in record else "")


def _finish(s: _Setup, state: LoopState, val_data: tuple[list, list]) -> TrainResult:
    """Check the DDP replicas agree; rank 0 plots the curves, checks bf16 inference, writes summary.json."""
    in_sync = runtime.replicas_in_sync(s.model, s.dist)
    result = TrainResult(s.run, state.best_dice if val_data[0] else float("nan"), state.best_epoch,
                         state.epoch, state.step, state.seconds / 60.0)
    if s.dist.main:
        runlog.write_curves(s.run)
        check_low_precision(s.plan, s.run, val_data[0] or s.images, s.dev)
        # for predict --backend auto: a tile the network reads (a slice plan's: of a middle slice)
        save_agreement_tile(s.run, s.plan, network_images(s.plan, (val_data[0] or s.images)[:1]))
        runlog.write_summary(s.run, {**result.__dict__, "world_size": s.dist.world, "ranks_in_sync": in_sync})
    return result


__all__ = ["LoopState", "TrainResult", "fit", "lr_factor", "make_optimizer", "train_step", "validate"]
