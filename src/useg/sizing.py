"""Plans sized to the compute: with a time budget, a network that gets enough steps on this machine.

The planner (:mod:`useg.planner`) sizes the network to the data and the memory, as nnU-Net sizes
its patch to a GPU's memory. On a CPU, or a busy machine, compute is the limit instead: a plan
that takes 14 optimizer steps in a 2-minute budget cannot converge (held-out Dice 0.76 where 65
steps reach 0.95, BENCHMARKS.md). So, when training has a time budget, this module times a
training step of the planned network on this machine (the real :func:`useg.step.train_step`
on random data, a warm-up step first) and, when fewer than :data:`MIN_STEPS` steps would fit,
walks down a ladder of cheaper configurations: a smaller 2D batch, then a smaller width (2D and
3D), then a smaller 3D patch. Each rung's time is predicted from the measured one by its
compute (batch x voxels x width^2, the convolutions' share), and the rung chosen is measured too
before it is kept. The measurements, the rule and the reason are kept in ``plan.json``
(``Plan.sizing``) and printed by ``useg plan``.

For volumes the configuration is a candidate too (nnU-Net's ``2d`` against ``3d``, issue 11). With
the configuration left to useg (``Overrides.configuration`` None) the planned 3D network is measured
first; when it holds :data:`MIN_STEPS` steps it is kept. Otherwise the 3D ladder is not walked: the
2D configuration on slices (:mod:`useg.slices`, planned by the planner) and its cheaper rungs (batch,
then width) are the next candidates, measured as above, since a 2D network on slices makes many
times the steps of a 3D one and, in nnU-Net's results, does nearly as well on such data. With
``configuration="3d"`` the 3D ladder (width, then patch) is walked as before; with ``"2d"`` the 2D
ladder. Every rung of the record names its configuration.

What the user fixes (``--width``, ``--batch-size``, ``--patch``) is never changed; a
deterministic run and a run under ``torchrun`` are not sized (a timing would make the plan differ
between runs or ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from .dataset import format_axes
from .plan import Plan
from .spec import Overrides

logger = logging.getLogger(__name__)

MIN_STEPS = 100  # optimizer steps a budget should hold (the demo: 65 steps -> Dice 0.95, 14 -> 0.76)
TRAIN_SHARE = 0.75  # of the budget left for training steps: validation and checkpoints take the rest
MEASURE_SHARE = 0.05  # at most this share of the budget goes into measuring (at least MEASURE_MIN_S)
MEASURE_MIN_S = 4.0
MIN_WIDTH = 8  # narrower U-Nets lose more than the steps they gain
MIN_BATCH = 2
MIN_EDGE_3D = 32  # the smallest 3D patch edge the ladder goes down to


@dataclass(frozen=True)
class Candidate:
    """One configuration to train: the knobs that set a step's compute."""

    width: int  # channels at the first level
    batch: int  # patches per optimizer step
    patch: tuple[int, ...]  # the training patch
    depth: int  # poolings (kept unless the patch becomes too small for it)

    def describe(self) -> str:
        return f"width {self.width}, batch {self.batch}, patch {format_axes(self.patch)}"

    def work(self) -> float:
        """Relative compute of a step: batch x voxels x width^2 (a U-Net's convolutions, whose
        cost at every level is about proportional to the first level's in 2D and 3D alike)."""
        return float(self.batch) * math.prod(self.patch) * self.width ** 2


def candidate_of(plan: Plan) -> Candidate:
    """The planned configuration as a :class:`Candidate`."""
    return Candidate(plan.model.width, plan.train.batch_size, tuple(plan.data.patch_size), plan.model.depth)


def ladder(plan: Plan, fixed: Collection[str] = ()) -> list[Candidate]:
    """The planned configuration, then cheaper ones in the order they are preferred.

    2D: halve the batch (down to :data:`MIN_BATCH`), then halve the width (down to
    :data:`MIN_WIDTH`). 3D (whose batch is already 2): halve the width, then halve the patch's
    voxels (down to :data:`MIN_EDGE_3D` a side), the depth lowered where the patch needs it.
    ``fixed`` names what the user chose ("width", "batch_size", "patch"): it stays.

    Args:
        plan: the planned plan.
        fixed: knobs that must not change.

    Returns:
        Candidates, ``[0]`` the plan's own, each cheaper than the one before.
    """
    first = candidate_of(plan)
    rungs = [first]

    def add(c: Candidate) -> None:
        if c.work() < rungs[-1].work():
            rungs.append(c)

    c = first
    if plan.model.dims == 2 and "batch_size" not in fixed:
        while c.batch // 2 >= MIN_BATCH:
            c = dataclasses.replace(c, batch=c.batch // 2)
            add(c)
    if "width" not in fixed:
        while c.width // 2 >= MIN_WIDTH:
            c = dataclasses.replace(c, width=c.width // 2)
            add(c)
    if plan.model.dims == 3 and "patch" not in fixed and plan.model.padding == "same":
        while True:
            smaller = _halved_patch(c.patch, c.depth, "depth" not in fixed)
            if smaller is None:
                break
            c = dataclasses.replace(c, patch=smaller[0], depth=smaller[1])
            add(c)
    return rungs


def _halved_patch(patch: tuple[int, ...], depth: int, may_lower_depth: bool
                  ) -> tuple[tuple[int, ...], int] | None:
    """About half the voxels (the largest edge shrunk first, multiples of 2^depth), or None at the floor."""
    edges, target = list(patch), math.prod(patch) / 2
    while math.prod(edges) > target:
        i = max(range(len(edges)), key=lambda k: edges[k])
        if edges[i] <= MIN_EDGE_3D:
            return None
        edges[i] = max(MIN_EDGE_3D, edges[i] - 16)
    while may_lower_depth and depth > 1 and min(edges) < 4 * 2 ** depth:
        depth -= 1  # keep the deepest level at about 4 voxels, as the planner does
    step = 2 ** depth
    edges = [max(step, e // step * step) for e in edges]
    return tuple(edges), depth


def steps_in(budget_s: float, step_s: float) -> int:
    """Optimizer steps a budget holds at ``step_s`` a step, validation's share set aside.

    >>> steps_in(120.0, 0.9)
    100
    """
    return int(budget_s * TRAIN_SHARE / max(step_s, 1e-9))


def choose(rungs: Sequence[Candidate], seconds: dict[int, float], budget_s: float,
           min_steps: int = MIN_STEPS) -> int:
    """The first rung expected to hold ``min_steps`` steps, else the cheapest.

    Args:
        rungs: from :func:`ladder`.
        seconds: measured seconds per step by rung index; ``0`` must be there. A rung without a
            measurement is predicted from the nearest measured rung above it, scaled by compute.
        budget_s: the time budget in seconds.
        min_steps: the steps a budget should hold.

    >>> r = [Candidate(32, b, (256, 256), 4) for b in (8, 4, 2)]
    >>> choose(r, {0: 2.0}, 120.0)   # 45 steps at batch 8, 90 at 4, 180 at 2
    2
    >>> choose(r, {0: 0.5}, 120.0)   # the plan itself holds 180
    0
    """
    for i in range(len(rungs)):
        if steps_in(budget_s, predicted(rungs, seconds, i)) >= min_steps:
            return i
    return len(rungs) - 1


def predicted(rungs: Sequence[Candidate], seconds: dict[int, float], i: int) -> float:
    """Seconds per step of rung ``i``: measured, or scaled from the nearest measured rung above."""
    if i in seconds:
        return seconds[i]
    above = max(k for k in seconds if k < i)
    return seconds[above] * rungs[i].work() / rungs[above].work()


def apply(plan: Plan, c: Candidate) -> Plan:
    """``plan`` with the candidate's width, batch, patch (and inference tile) and depth."""
    return dataclasses.replace(
        plan,
        model=dataclasses.replace(plan.model, width=c.width, depth=c.depth),
        train=dataclasses.replace(plan.train, batch_size=c.batch),
        data=dataclasses.replace(plan.data, patch_size=c.patch),
        infer=dataclasses.replace(plan.infer, tile=c.patch),
    )


def size_plan(plan: Plan, budget_min: float, fixed: Collection[str] = (), device: str = "auto",
              measure: Callable[[Plan, str], float] | None = None) -> Plan:
    """The plan, or a cheaper one that holds :data:`MIN_STEPS` steps in the budget on this machine.

    Args:
        plan: the planner's plan.
        budget_min: the training budget in minutes.
        fixed: knobs the user chose ("width", "batch_size", "patch", "depth"): never changed.
        device: where training runs.
        measure: ``(plan, device) -> seconds per step``; default :func:`measure_step`.

    Returns:
        A plan whose ``sizing`` records the budget, the rule, every measurement and the reason.
    """
    measure = measure or measure_step
    budget_s = budget_min * 60.0
    limit = max(MEASURE_MIN_S, MEASURE_SHARE * budget_s)
    rungs, started = ladder(plan, fixed), time.perf_counter()
    seconds, chosen = _walk(plan, rungs, budget_s, measure, device, started + limit)
    record = _record(rungs, seconds, chosen, budget_s, time.perf_counter() - started, _configuration(plan))
    logger.info("sizing: %s", record["reason"])
    return dataclasses.replace(apply(plan, rungs[chosen]), sizing=record)


def _walk(plan: Plan, rungs: Sequence[Candidate], budget_s: float, measure: Callable[[Plan, str], float],
          device: str, deadline: float) -> tuple[dict[int, float], int]:
    """Measure the plan, choose a rung, and verify the choice by measuring it (a slower than predicted
    rung moves the choice down) until ``deadline`` (a ``perf_counter`` time); (seconds, chosen)."""
    seconds = {0: measure(plan, device)}
    chosen = choose(rungs, seconds, budget_s)
    while chosen not in seconds and time.perf_counter() < deadline:
        seconds[chosen] = measure(apply(plan, rungs[chosen]), device)
        chosen = choose(rungs, seconds, budget_s)
    return seconds, chosen


def _configuration(plan: Plan) -> str:
    """The plan's configuration name (:data:`useg.spec.CONFIGURATIONS`): "2d" for a 2D network."""
    return f"{plan.model.dims}d"


def size_configuration(plan: Plan, plan_config: Callable[[str], Plan], budget_min: float,
                       fixed: Collection[str] = (), device: str = "auto",
                       measure: Callable[[Plan, str], float] | None = None) -> Plan:
    """A planned 3D plan if it holds :data:`MIN_STEPS` steps in the budget, else the sized 2D configuration.

    Args:
        plan: the planner's 3D plan of volumes.
        plan_config: ``configuration -> plan`` (the planner's), called with "2d" only if 3D is too slow.
        budget_min, fixed, device, measure: as :func:`size_plan`.

    Returns:
        The 3D plan, or the 2D plan on slices at its chosen rung; ``sizing`` records every rung with its
        configuration and the reason ("3D would make N steps in the budget; 2D on axial slices makes M").
        Where the chosen 2D rung would make no more steps than the planned 3D network (slices far larger
        than the 3D patch), the 3D ladder of :func:`size_plan` is walked instead.
    """
    from .slices import describe

    measure = measure or measure_step
    budget_s, started = budget_min * 60.0, time.perf_counter()
    deep = [candidate_of(plan)]
    first = {0: measure(plan, device)}
    steps = steps_in(budget_s, first[0])
    if steps >= MIN_STEPS:
        record = _record(deep, first, 0, budget_s, time.perf_counter() - started, "3d")
        record["reason"] = (f"3D makes about {steps} steps in the {budget_min:g}-minute budget "
                            f"({deep[0].describe()}, {first[0]:.2f} s a step), at least {MIN_STEPS}: 3D kept")
        logger.info("sizing: %s", record["reason"])
        return dataclasses.replace(plan, sizing=record)
    flat = plan_config("2d")
    rungs = ladder(flat, fixed)
    limit = max(MEASURE_MIN_S, MEASURE_SHARE * budget_s)
    seconds, chosen = _walk(flat, rungs, budget_s, measure, device, started + limit)
    record = _record(rungs, seconds, chosen, budget_s, time.perf_counter() - started, "2d")
    rows = _record(deep, first, 0, budget_s, 0.0, "3d")["candidates"] + record["candidates"]
    got = rows[1 + chosen]["steps_in_budget"]
    if got <= steps:  # slices too large to gain anything here: the 3D ladder (width, patch) instead
        sized = size_plan(plan, budget_min, fixed, device, measure)
        kept = dict(sized.sizing or {})
        kept["reason"] = (f"2D on slices would make {got} steps, no more than 3D's {steps}, so the 3D "
                          f"network is sized instead: {kept.get('reason', '')}")
        logger.info("sizing: %s", kept["reason"])
        return dataclasses.replace(sized, sizing=kept)
    record.update(candidates=rows, chosen=1 + chosen, reason=(
        f"3D would make {steps} steps in the {budget_min:g}-minute budget ({deep[0].describe()}, "
        f"{first[0]:.2f} s a step; wanted {MIN_STEPS}); {describe(flat).replace('2D U-Net ', '2D ')} makes "
        f"{got}: training the {describe(flat)}, {rungs[chosen].describe()}, "
        f"{rows[1 + chosen]['seconds_per_step']:.2f} s a step"))
    logger.info("sizing: %s", record["reason"])
    return dataclasses.replace(apply(flat, rungs[chosen]), sizing=record)


def size_for_budget(plan: Plan, overrides: Overrides, budget_min: float | None, device: str = "auto",
                    plan_config: Callable[[str], Plan] | None = None) -> Plan:
    """:func:`size_plan` where it applies: a time budget, the default preset, not deterministic, one process.

    The paper's preset keeps its recipe; the knobs the user fixed in ``overrides`` stay. A 3D plan whose
    configuration the user left open (and whose patch they did not fix) is sized by
    :func:`size_configuration` when ``plan_config`` (``configuration -> plan``, the planner's) is given.
    """
    if not budget_min:
        return plan
    if plan.train.deterministic or overrides.preset != "default" or os.environ.get("WORLD_SIZE", "1") != "1":
        logger.info("sizing: the plan is kept as planned (deterministic, a preset with its own recipe, "
                    "or under torchrun)")
        return plan
    fixed = ({k for k in ("width", "depth") if k in overrides.model}
             | ({"batch_size"} if "batch_size" in overrides.train else set())
             | ({"patch"} if overrides.patch_size else set()))
    if overrides.configuration is None and plan_config is not None and plan.model.dims == 3 \
            and "patch" not in fixed:
        return size_configuration(plan, plan_config, budget_min, fixed, device)
    return size_plan(plan, budget_min, fixed, device)


def _record(rungs: Sequence[Candidate], seconds: dict[int, float], chosen: int, budget_s: float,
            spent_s: float, configuration: str) -> dict[str, Any]:
    """What ``plan.json`` keeps of the sizing: the rule, the rungs with their times, the reason."""
    rows = [{"configuration": configuration, "config": r.describe(),
             "seconds_per_step": round(predicted(rungs, seconds, i), 4),
             "measured": i in seconds, "steps_in_budget": steps_in(budget_s, predicted(rungs, seconds, i))}
            for i, r in enumerate(rungs)]
    steps, minutes = rows[chosen]["steps_in_budget"], f"{budget_s / 60:g}-minute budget"
    first = rows[0]["seconds_per_step"]
    planned = f"the planned network ({rungs[0].describe()}) takes {first:.2f} s a step here"
    if chosen == 0:
        reason = f"{planned}: about {steps} steps in the {minutes}, at least {MIN_STEPS}"
    else:
        enough = "enough" if steps >= MIN_STEPS else "the most this machine allows"
        reason = (f"{planned}, only about {rows[0]['steps_in_budget']} steps in the {minutes} "
                  f"(wanted {MIN_STEPS}): training {rungs[chosen].describe()} instead, "
                  f"{rows[chosen]['seconds_per_step']:.2f} s a step, about {steps} steps ({enough})")
    return {"budget_min": round(budget_s / 60, 4), "min_steps": MIN_STEPS, "train_share": TRAIN_SHARE,
            "measure_seconds": round(spent_s, 2), "candidates": rows, "chosen": chosen, "reason": reason}


def measure_step(plan: Plan, device: str = "auto", repeats: int = 2) -> float:
    """Median seconds of :func:`useg.step.train_step` for ``plan`` on this machine, after a warm-up.

    Random images and labels of the plan's batch and patch, the plan's loss, optimizer,
    precision and memory format: what training will run, minus the data loading.
    """
    import torch

    from . import runtime
    from .losses import SegLoss
    from .model import UNet
    from .step import make_optimizer, train_step

    dev = runtime.pick_device(device)
    prec = runtime.pick_precision(dev, plan.train.precision)
    model = UNet.from_config(plan.model)
    fmt = runtime.memory_format(plan.model.dims, prec)
    model = model.to(dev, memory_format=fmt).train()
    optimizer = make_optimizer(model, plan)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    loss_fn = SegLoss(plan.train.loss, regions=plan.data.regions)
    gen = torch.Generator().manual_seed(0)
    shape = (plan.train.batch_size, plan.model.in_channels, *plan.data.patch_size)
    x = torch.randn(shape, generator=gen).to(dev, memory_format=fmt)
    out = model.output_size(plan.data.patch_size)
    # class indices of the label map, also for region outputs (the loss builds the regions)
    k = plan.data.label_map.num_classes
    y = torch.randint(0, k, (plan.train.batch_size, *out), generator=gen).to(dev)
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        train_step(model, x, y, None, loss_fn, optimizer, scaler, dev, prec).item()  # .item(): wait for it
        times.append(time.perf_counter() - begin)
    return float(sorted(times[1:])[len(times[1:]) // 2])


def explain_sizing(sizing: dict[str, Any] | None) -> list[str]:
    """Lines for ``useg plan``: the reason, then one line per rung."""
    if not sizing:
        return []
    lines = [f"compute: {sizing['reason']}"]
    for i, row in enumerate(sizing["candidates"]):
        mark = "*" if i == sizing["chosen"] else " "
        how = "measured" if row["measured"] else "predicted"
        config = f"{row['configuration']} {row['config']}" if "configuration" in row else row["config"]
        lines.append(f"  {mark} {config}: {row['seconds_per_step']:.3f} s/step ({how}), "
                     f"{row['steps_in_budget']} steps")
    return lines


__all__ = ["MIN_STEPS", "Candidate", "apply", "candidate_of", "choose", "explain_sizing", "ladder",
           "measure_step", "size_configuration", "size_for_budget", "size_plan", "steps_in"]
