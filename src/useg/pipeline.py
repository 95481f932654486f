"""From a data folder to a trained run: check, plan, split, load, train (what ``useg train`` does).

:func:`train_folder` is the whole path; :mod:`useg.train` holds the loop it ends in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import runlog, runtime
from .check import CheckReport, check_dataset
from .dataset import Case
from .errors import UsegError
from .files import atomic_write_text
from .plan import Plan
from .preprocess import load_arrays
from .spec import DataSpec, Overrides
from .train import TrainResult, fit

if TYPE_CHECKING:
    from .crossval import CVResult

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"  # in a run folder: the train and validation case names
MAX_RANGE = 1_000_000  # case names one "lo-hi" range of --val or --exclude may expand to


def parse_names(given: str | Sequence[str] | None) -> list[str]:
    """Case names from "25,26" or "25-29" (numeric ranges) or a list; None gives []."""
    if given is None:
        return []
    parts = given.split(",") if isinstance(given, str) else list(given)
    names: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            if int(hi) - int(lo) >= MAX_RANGE:  # "0-99999999999" would expand for hours
                raise UsegError(f"the range {part} names {int(hi) - int(lo) + 1} cases, more than "
                                f"{MAX_RANGE}; give the case numbers of the data, like 25-29")
            names.extend(str(i) for i in range(int(lo), int(hi) + 1))
        else:
            names.append(part)
    return names


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0,
                val_names: Sequence[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split, both in the input order.

    Args:
        cases: all labelled cases.
        val_fraction: share for validation when ``val_names`` is None, in [0, 1); with two or
            more cases and a positive fraction each side gets at least one case.
        seed: the shuffle seed.
        val_names: explicit validation case names.

    Raises:
        UsegError: a name in ``val_names`` that is no case, or names that leave no training case.
    """
    cases = list(cases)
    if val_names:
        names = set(val_names)
        unknown = names - {c.name for c in cases}
        if unknown:
            raise UsegError(f"validation cases {sorted(unknown)[:5]} are not in the data; "
                            "use names of its images")
        train, val = [c for c in cases if c.name not in names], [c for c in cases if c.name in names]
        if not train:
            raise UsegError("every case is a validation case; leave at least one for training")
        return train, val
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if len(cases) < 2 or val_fraction == 0:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in chosen]
    return train, [c for i, c in enumerate(cases) if i in chosen]


def train_folder(
    data: str | Path,
    out: str | Path,
    *,
    spec: DataSpec | None = None,
    overrides: Overrides | None = None,
    val: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    time_budget_min: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    quiet: bool = False,
    folds: int | None = None,
    fold: int | None = None,
) -> TrainResult | CVResult:
    """Check a data folder, plan, split and train: what ``useg train`` does.

    Args:
        data: a folder with images/ and masks/ (or an nnU-Net raw folder, or case folders).
        out: the run folder.
        spec: how to read ``data``: its mask values when they should not be inferred (e.g.
            ``DataSpec(mask_values=(0, 255))``), the channel and label prefixes of case folders,
            the image and mask name patterns (a resumed run keeps its own unless others are given).
        overrides: the preset (see :data:`useg.planner.PRESETS`) and the plan's fields fixed by hand,
            the training patch, the memory budget and nested regions (see
            :func:`useg.planner.plan_dataset`); ``train["val_fraction"]`` and ``train["seed"]`` also
            drive the split.
        val: validation case names ("3,7" or "25-29"); default a seeded random share.
        exclude: case names kept out of training and validation (a held-out test set).
        time_budget_min: wall-clock budget in minutes.
        resume: continue the run in ``out`` with its own plan and split.
        overwrite: replace an existing run in ``out``.
        device: "auto", "cpu", "cuda", ...
        quiet: no progress bar.
        folds, fold: k-fold cross-validation, or its fold ``fold`` alone (:func:`useg.crossval.train_folds`).

    A new run is built in a hidden folder beside ``out`` (``.NAME.new-XXXX``) and takes ``out``'s place
    when training is complete, so a run it replaces stays whole and loadable until then, and a run
    that fails or is interrupted leaves nothing behind. ``resume`` writes in place.

    Raises:
        UsegError: the data has problems (every one is listed), or ``out`` holds another run.
    """
    overrides = overrides or Overrides()
    out = Path(out)
    if folds is not None or fold is not None:
        return _cross_validated(data, out, spec, overrides, folds, fold, val, exclude, time_budget_min,
                                resume, overwrite, device, quiet)
    spec = _prepared(out, data, spec, resume)
    report = check_dataset(data, spec)
    if not report.ok:
        raise UsegError("\n".join(report.problems))
    if resume:
        plan, train_cases, val_cases = _resumed(out, data, report)
    else:
        plan, train_cases, val_cases = _started(out, data, report, overrides, val, exclude, overwrite, device,
                                                  time_budget_min=time_budget_min)
    d = plan.data
    spacing = d.spacing if d.resample else None
    train_data = load_arrays(train_cases, d.label_map, d.normalization, d.intensity, spacing, d.ignore_value)
    val_data = load_arrays(val_cases, d.label_map, d.normalization, d.intensity, spacing, d.ignore_value)
    if resume:
        return fit(plan, train_data, val_data, out, time_budget_min=time_budget_min, resume=True,
                   device=device, quiet=quiet)
    split = {"train": [c.name for c in train_cases], "val": [c.name for c in val_cases]}
    return _built_beside(out, split, lambda staging: fit(plan, train_data, val_data, staging, device=device,
                                                         time_budget_min=time_budget_min, quiet=quiet))


def _built_beside(out: Path, split: dict, train) -> TrainResult:
    """A new run built beside ``out`` by ``train(staging)`` and swapped in only when training is complete:
    until then a run already at ``out`` stays whole and unchanged, and an error or Ctrl-C leaves nothing."""
    staging = _staging_folder(out)
    try:
        if runtime.main_process():  # under torchrun only rank 0 writes
            staging.mkdir()
            runlog.claim_staging(staging)  # so that a later train can tell it from a killed one's
            atomic_write_text(staging / SPLIT_FILE, json.dumps(split, indent=1))
        result = train(staging)
        if runtime.main_process():
            _swap_in(staging, out)
            runlog.write_summary(out, {**runlog.read_summary(out), "run": out})  # it named the staging folder
    except BaseException:
        if runtime.main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(result, run=out)


def _refuse_out_among_inputs(out: Path, data: str | Path, cases: Sequence[Case]) -> None:
    """Refuse an ``out`` that is the data folder, holds it, or is the folder of a case's files.

    The run's files would land among the inputs (its curves.png read as an image by the next check),
    and replacing a run at such an ``out`` (``--overwrite``) would remove the data with the old run.
    """
    full, top = Path(os.path.abspath(out)).resolve(), Path(os.path.abspath(data)).resolve()
    if full == top or full in top.parents:
        raise UsegError(f"--out {out} is or holds the data folder {data}; the run would be written among "
                        "its images: choose a folder outside it, e.g. --out runs/NAME")
    for case in cases:
        for f in (*case.files, case.mask, case.roi):
            if f is not None and Path(os.path.abspath(f)).resolve().parent == full:
                raise UsegError(f"--out {out} is the folder of {f}; the run would be written among the "
                                "training files: choose a folder outside them, e.g. --out runs/NAME")
def _cross_validated(data: str | Path, out: Path, spec: DataSpec | None, overrides: Overrides,
                     folds: int | None, fold: int | None, val: str | Sequence[str] | None,
                     exclude: str | Sequence[str] | None, time_budget_min: float | None, resume: bool,
                     overwrite: bool, device: str, quiet: bool) -> CVResult:
    """``train_folder`` with ``folds`` or ``fold``: :func:`useg.crossval.train_folds`.

    ``overwrite`` (of a run already at ``out``) builds the whole cross-validated run beside ``out`` and
    swaps it in when every fold and cv.json are complete, as for a single run; an interrupted overwrite
    leaves the old run and nothing else (its folds are not resumable: start it again).
    """
    from .crossval import train_folds

    if val:
        raise UsegError("--val names one validation set and --folds makes one per fold; drop --val "
                        f"(edit {out / 'splits.json'} to choose the folds)")
    if overwrite and fold is not None:
        raise UsegError(f"--overwrite replaces a whole cross-validated run, not one fold; drop --fold, or "
                        f"delete {out / f'fold_{fold}'} to train that fold again")
    replace = overwrite and not resume and (out / "plan.json").exists()
    if not replace and (out / "splits.json").is_file():  # continuing a cross-validated run: its patterns
        spec = _run_patterns(spec, out)
    report = check_dataset(data, spec)
    if not report.ok:
        raise UsegError("\n".join(report.problems))
    _refuse_out_among_inputs(out, data, report.cases)  # as for a single run: never among the inputs
    kw = dict(k=folds, fold=fold, exclude=parse_names(exclude), time_budget_min=time_budget_min,
              resume=resume, device=device, quiet=quiet, roi=spec.roi_dir if spec else None)
    if not replace:
        return train_folds(data, out, report, overrides, **kw)
    staging = _staging_folder(out)
    try:
        result = train_folds(data, staging, report, overrides, **kw)
        if runtime.main_process():
            _swap_in(staging, out)
            for fold in out.glob("fold_*"):  # their summaries named the staging folder
                runlog.write_summary(fold, {**runlog.read_summary(fold), "run": fold})
    except BaseException:
        if runtime.main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(result, run=out)


def _staging_folder(out: Path) -> Path:
    """A new, hidden folder name beside ``out`` (same parent, so the swap is a rename)."""
    full = Path(os.path.abspath(out))
    if full.exists() and not full.is_dir():
        raise UsegError(f"{out} is a file, not a run folder; choose another --out")
    full.parent.mkdir(parents=True, exist_ok=True)
    return full.with_name(f".{full.name}.new-{secrets.token_hex(4)}")


def _swap_in(staging: Path, out: Path) -> None:
    """Put the run built in ``staging`` at ``out``: a run already there is renamed aside, then removed.

    A folder at ``out`` that holds no run (no plan.json, not a multi-configuration run) keeps its other
    files; the run's are moved in.
    """
    full = Path(os.path.abspath(out))
    (staging / runlog.OWNER_FILE).unlink(missing_ok=True)
    if not full.exists() and not full.is_symlink():
        os.replace(staging, full)
    elif (full / "plan.json").exists() or runlog.is_multi_configuration(full):
        # the old run goes whole, so none of its files (an export, a multi-configuration run's choice) linger
        old = full.with_name(f".{full.name}.old-{secrets.token_hex(4)}")
        os.replace(full, old)
        try:
            os.replace(staging, full)
        except BaseException:
            os.replace(old, full)  # put the old run back rather than leave neither at ``out``
            raise
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        for entry in staging.iterdir():
            os.replace(entry, full / entry.name)
        staging.rmdir()
    logger.info("run written to %s", out)


def _prepared(out: Path, data: str | Path, spec: DataSpec | None, resume: bool) -> DataSpec | None:
    """Clear what killed trainings left beside ``out`` (a resume takes up its own); on resume, check
    there is a checkpoint and take the run's name patterns."""
    if runtime.main_process():
        runlog.clear_stale(out, resume=resume)
    if not resume:
        return spec
    runlog.refuse_unresumable(out, data)
    return _run_patterns(spec, out)


def _run_patterns(spec: DataSpec | None, out: Path) -> DataSpec:
    """On resume, the name patterns the run was trained with, unless ``spec`` gives its own."""
    spec = spec or DataSpec()
    if spec.image_pattern or spec.mask_pattern or not (out / "plan.json").is_file():
        return spec
    d = Plan.load(out / "plan.json").data
    return dataclasses.replace(spec, image_pattern=d.image_pattern, mask_pattern=d.mask_pattern)


def _resumed(out: Path, data: str | Path, report: CheckReport) -> tuple[Plan, list[Case], list[Case]]:
    """The plan and split of the run in ``out``, its cases found in ``data`` again."""
    by_name = {c.name: c for c in report.cases}
    plan = Plan.load(out / "plan.json")
    if plan.data.roi != ("roi" in report.info):
        given = "without" if plan.data.roi else "with"
        raise UsegError(f"{out / 'plan.json'} was trained {'with' if plan.data.roi else 'without'} --roi "
                        f"but is resumed {given} it; resume with the same --roi as the training")
    split_path = out / SPLIT_FILE
    try:
        split = json.loads(split_path.read_text(encoding="utf-8"))
        return plan, [by_name[n] for n in split["train"]], [by_name[n] for n in split["val"]]
    except (OSError, KeyError, ValueError) as e:
        raise UsegError(f"{split_path} does not match {data} ({e}); "
                        "resume with the same data folder") from None


def _started(out: Path, data: str | Path, report: CheckReport, overrides: Overrides,
             val: str | Sequence[str] | None, exclude: str | Sequence[str] | None, overwrite: bool,
             device: str, time_budget_min: float | None = None) -> tuple[Plan, list[Case], list[Case]]:
    """A new run's plan and split: held-out cases excluded from both, the fingerprint included; with a
    time budget the plan is sized to this machine's compute (:mod:`useg.sizing`)."""
    from .planner import plan_dataset
    from .sizing import size_for_budget

    if not overwrite:
        runlog.refuse_occupied(out, data)
    _refuse_out_among_inputs(out, data, report.cases)
    by_name = {c.name: c for c in report.cases}
    held = set(parse_names(exclude))
    both = sorted(held & set(parse_names(val)))
    if both:  # said first: "not in the data" would name the wrong cause
        raise UsegError(f"{both[:5]} are given to --exclude and to --val; an excluded case is kept out of "
                        "validation too: name each case in one of them")
    unknown = sorted((held | set(parse_names(val))) - set(by_name))
    if unknown:
        raise UsegError(f"case names {unknown} are not in {data}; "
                        f"use image file stems such as {next(iter(by_name))!r}")
    cases = [c for c in report.cases if c.name not in held]
    train_cases, val_cases = split_cases(
        cases, val_fraction=overrides.train.get("val_fraction", 0.2), seed=overrides.train.get("seed", 0),
        val_names=parse_names(val) or None,
    )
    kept = report.without(held)
    plan, reasons = plan_dataset(kept, overrides, device=device)
    for reason in reasons:
        logger.info("plan: %s", reason)
    plan = size_for_budget(plan, overrides, time_budget_min, device, plan_config=lambda c: plan_dataset(
        kept, dataclasses.replace(overrides, configuration=c), device=device)[0])  # volumes: 2D on slices too
    return plan, train_cases, val_cases


__all__ = ["parse_names", "split_cases", "train_folder"]
