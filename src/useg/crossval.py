"""k-fold cross-validation: one run per fold on one shared plan, out-of-fold predictions, ``cv.json``.

``useg train DATA --out RUN --folds 5`` (:func:`useg.pipeline.train_folder` with ``folds=5``) calls
:func:`train_folds`, which writes::

    RUN/plan.json          the one plan every fold trains with (planned once)
    RUN/splits.json        [{"train": [...], "val": [...]}, ...]: seeded, editable (as splits_final.json)
    RUN/fold_K/            a complete run folder per fold (Segmenter.load(RUN/fold_K) alone works)
    RUN/cv/predictions/    every case predicted by the fold that did not train on it, named like
                           ``useg predict`` names its output
    RUN/cv.json            the cross-validated metrics: per case and class, the summary, and where the
                           predictions and the true masks are

A fold is complete when its ``summary.json`` is written (the last step of :func:`useg.train.fit`);
complete folds are never trained again, an interrupted one is continued with ``resume``. The
out-of-fold step runs once every fold is complete, by whichever call completes the last one.
Each fold validates (and keeps its best checkpoint) on its own held-out cases, as nnU-Net's
folds do, so ``cv.json`` includes that choice of checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runlog, runtime
from .check import CheckReport
from .dataset import Case
from .errors import UsegError
from .evaluate_summary import summarize
from .files import atomic_path, atomic_write_text, strict_json
from .folds import SPLITS_FILE, fold_complete, fold_folder
from .io import read_mask
from .metrics import evaluate_case
from .plan import Plan
from .preprocess import load_arrays
from .roi import ignore_outside, read_roi
from .spec import Overrides
from .train import TrainResult, fit

logger = logging.getLogger(__name__)

CV_FILE = "cv.json"  # in a cross-validated run: the out-of-fold metrics
PREDICTIONS_DIR = "cv/predictions"  # in a cross-validated run: the out-of-fold predictions
FOLD_SPLIT_FILE = "split.json"  # in a fold folder: its train and validation cases, as a single run's
DEFAULT_FOLDS = 5  # nnU-Net's default, used by --fold K when neither --folds nor splits.json says


@dataclass(frozen=True)
class CVResult:
    """What :func:`train_folds` did."""

    run: Path  # the cross-validated run folder
    folds: int  # k
    trained: dict[int, TrainResult]  # the folds this call trained (complete ones are skipped)
    summary: dict | None  # cv.json's summary; None while some fold is not complete


def kfold_splits(names: Sequence[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """A seeded k-fold split by case: every name in exactly one fold's ``val``, the rest in its ``train``.

    Both lists keep the order of ``names``; fold sizes differ by at most one.

    >>> kfold_splits(["a", "b", "c"], 3, seed=0)[0]["val"] + kfold_splits(["a", "b", "c"], 3)[1]["val"]
    ['c', 'a']
    >>> sorted(len(f["val"]) for f in kfold_splits([str(i) for i in range(7)], 3))
    [2, 2, 3]
    """
    if not 2 <= k <= len(names):
        raise UsegError(f"--folds {k} needs between 2 and {len(names)} folds for {len(names)} cases; "
                        "choose another --folds")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(names)), k)
    splits = []
    for part in parts:
        held = set(part.tolist())
        splits.append({"train": [n for i, n in enumerate(names) if i not in held],
                       "val": [n for i, n in enumerate(names) if i in held]})
    return splits


def check_splits(splits: object, names: Sequence[str], path: Path) -> list[dict[str, list[str]]]:
    """Validate a splits.json: a list of {"train", "val"} name lists, every case in exactly one ``val``.

    Raises:
        UsegError: one sentence naming ``path`` and the fix.
    """
    shape_ok = isinstance(splits, list) and len(splits) >= 2 and all(
        isinstance(f, dict) and all(isinstance(f.get(key), list) and all(isinstance(n, str) for n in f[key])
                                    for key in ("train", "val")) for f in splits)
    if not shape_ok:
        raise UsegError(f"{path} is not a list of at least two {{\"train\": [...], \"val\": [...]}} folds of "
                        "case names; fix it or delete it to split again")
    known, seen = set(names), {}
    for i, fold in enumerate(splits):
        unknown = sorted(set(fold["train"] + fold["val"]) - known)
        if unknown:
            raise UsegError(f"{path}: fold {i} names {unknown[:5]}, which are not cases of the data (or are "
                            "excluded); use the data's case names or delete it to split again")
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both or not fold["train"] or not fold["val"]:
            raise UsegError(f"{path}: fold {i} " + (f"trains and validates on {both[:5]}" if both else
                            "has an empty train or val list") + "; give each fold disjoint, non-empty lists")
        for name in fold["val"]:
            if name in seen:
                raise UsegError(f"{path}: {name!r} is in the val of folds {seen[name]} and {i}; "
                                "put each case in exactly one fold's val")
            seen[name] = i
    missing = [n for n in names if n not in seen]
    if missing:
        raise UsegError(f"{path}: {missing[:5]} are in no fold's val; add each case to one fold's val "
                        "(or keep it out with --exclude)")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]


def folds_of(run: Path, names: Sequence[str], k: int | None, seed: int) -> list[dict[str, list[str]]]:
    """``run/splits.json`` checked against ``names``, or a new seeded split written there (rank 0).

    A splits.json already there (an earlier call's, or one the user wrote or edited) is used as it is.
    """
    path = run / SPLITS_FILE
    if not path.is_file():
        splits = kfold_splits(names, k or DEFAULT_FOLDS, seed)
        if not runtime.main_process():
            return splits
        try:
            with atomic_path(path, exclusive=True) as tmp:  # another process of a parallel fold may win
                Path(tmp).write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
            return splits
        except FileExistsError:
            pass
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsegError(f"{path} cannot be read as JSON ({e}); fix it or delete it to split again") from None
    splits = check_splits(given, names, path)
    if k is not None and k != len(splits):
        raise UsegError(f"{path} holds {len(splits)} folds but --folds {k} was given; pass --folds "
                        f"{len(splits)} or delete {path.name} to split again")
    return splits


def train_folds(
    data: str | Path,
    out: str | Path,
    report: CheckReport,
    overrides: Overrides,
    *,
    k: int | None = None,
    fold: int | None = None,
    exclude: Sequence[str] = (),
    time_budget_min: float | None = None,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
    roi: str | Path | None = None,
) -> CVResult:
    """Train the folds of a cross-validated run that are not complete, then (all complete) cross-validate.

    Args:
        data: the data folder (named in messages).
        out: the cross-validated run folder, new or holding earlier folds.
        report: the checked data.
        overrides: the plan's overrides (used only when ``out`` has no plan.json yet); ``train["seed"]``
            also seeds the split.
        k: the number of folds; None takes splits.json's (or :data:`DEFAULT_FOLDS` for a new run).
        fold: train only this fold (others may train elsewhere at the same time).
        exclude: case names kept out of every fold (a test set).
        time_budget_min: minutes for this call's training, shared by the folds it trains: each gets the
            budget left divided by the folds left.
        resume: continue an interrupted fold (without it one is refused).
        device, quiet: as for :func:`useg.train.fit`.
        roi: the ROI folder the data was checked with, applied to the out-of-fold predictions.

    Raises:
        UsegError: ``out`` holds a single run, splits.json is invalid, ``fold`` is out of range, a fold is
            unfinished without ``resume``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if (out / "plan.json").is_file() and not (out / SPLITS_FILE).is_file():
        raise UsegError(f"{out} holds a single run, not a cross-validated one; pass --overwrite to replace "
                        "it or choose another --out")
    held = set(exclude)
    unknown = sorted(held - {c.name for c in report.cases})
    if unknown:
        raise UsegError(f"case names {unknown[:5]} are not in {data}; use image file stems")
    by_name = {c.name: c for c in report.cases}
    names = [c.name for c in report.cases if c.name not in held]
    planned = k or DEFAULT_FOLDS
    if fold is not None and not (out / SPLITS_FILE).is_file() and fold >= planned:  # before any write
        raise UsegError(f"--fold {fold} is not a fold of a {planned}-fold run (0 to {planned - 1}); "
                        "choose one of those")
    if runtime.main_process():
        out.mkdir(parents=True, exist_ok=True)
    splits = folds_of(out, names, k, overrides.train.get("seed", 0))
    if fold is not None and not 0 <= fold < len(splits):
        raise UsegError(f"--fold {fold} is not a fold of {out / SPLITS_FILE} (0 to {len(splits) - 1}); "
                        "choose one of those")
    _check_trained_splits(out, splits)
    plan = _shared_plan(out, report.without(held), overrides, device)
    pending = [i for i in ([fold] if fold is not None else range(len(splits)))
               if not fold_complete(fold_folder(out, i))]
    if pending and runtime.main_process():  # a cv.json of other fold models would be stale
        (out / CV_FILE).unlink(missing_ok=True)
    trained = {}
    for n, i in enumerate(pending):
        budget = share_of_budget(time_budget_min, t0, len(pending) - n)
        trained[i] = _train_fold(out, i, splits, by_name, plan, budget, resume, device, quiet)
    summary = None
    if all(fold_complete(fold_folder(out, i)) for i in range(len(splits))) and runtime.main_process():
        summary = _read_cv(out)
        if summary is None:
            summary = cross_validate(out, splits, by_name, plan, roi=roi, device=device)
            _choose_postprocessing(out, json.loads((out / CV_FILE).read_text(encoding="utf-8")), roi)
    elif runtime.main_process():
        waiting = [i for i in range(len(splits)) if not fold_complete(fold_folder(out, i))]
        logger.info("%s waits for fold(s) %s; it is written when they are complete", out / CV_FILE, waiting)
    return CVResult(out, len(splits), trained, summary)


def share_of_budget(budget_min: float | None, started: float, parts_left: int) -> float | None:
    """Minutes for the next of ``parts_left`` parts (folds, configurations): what is left of
    ``budget_min`` since ``started`` (a ``time.perf_counter()`` time), shared evenly; None without a budget.

    >>> round(share_of_budget(30.0, time.perf_counter(), 3), 1)
    10.0
    >>> share_of_budget(None, 0.0, 2) is None
    True
    """
    if not budget_min:
        return None
    left = budget_min - (time.perf_counter() - started) / 60.0
    return max(left, 1e-3) / parts_left


def _choose_postprocessing(out: Path, cv: Mapping, roi: str | Path | None) -> None:
    """nnU-Net's last step of cross-validation: post-processing chosen on the out-of-fold predictions
    (``RUN/postprocessing.json``, applied by predict); skipped when the truth masks lie in several folders."""
    from .postprocess_run import determine_postprocessing

    truth = cv.get("truth_dir")
    if truth is None:
        logger.info("post-processing not chosen: the truth masks lie in several folders; "
                    "run 'useg postprocess %s --predictions %s --truth DIR'", out, out / PREDICTIONS_DIR)
        return
    pp, _ = determine_postprocessing(out, out / cv.get("predictions_dir", PREDICTIONS_DIR), truth, roi=roi)
    logger.info("post-processing chosen on the out-of-fold predictions: %s",
                "; ".join(pp.describe()) if not pp.is_identity else "none improves the cross-validated Dice")


def _check_trained_splits(out: Path, splits: Sequence[Mapping[str, list[str]]]) -> None:
    """Refuse a splits.json edited after a fold was trained on it (its out-of-fold cases would be wrong)."""
    for i, split in enumerate(splits):
        path = fold_folder(out, i) / FOLD_SPLIT_FILE
        try:
            trained_on = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not started (or not by this module): nothing to compare
        if trained_on != dict(split):
            raise UsegError(f"{path.parent} was trained on another split than fold {i} of "
                            f"{out / SPLITS_FILE}; restore that fold in {SPLITS_FILE} or delete "
                            f"{path.parent} to train it again")


def _shared_plan(out: Path, report: CheckReport, overrides: Overrides, device: str) -> Plan:
    """``out/plan.json``, or a new plan written there first (by one process only)."""
    path = out / "plan.json"
    if path.is_file():
        logger.info("folds train with %s (planned once; this call's plan options are not applied)", path)
        return Plan.load(path)
    from .planner import plan_dataset

    plan, reasons = plan_dataset(report, overrides, device=device)
    for reason in reasons:
        logger.info("plan: %s", reason)
    if runtime.main_process():
        try:
            with atomic_path(path, exclusive=True) as tmp:
                plan.save(tmp)
        except FileExistsError:  # a parallel fold planned first: every fold trains with that plan
            return Plan.load(path)
    return plan


def _train_fold(out: Path, i: int, splits: Sequence[Mapping[str, list[str]]], by_name: Mapping[str, Case],
                plan: Plan, budget: float | None, resume: bool, device: str, quiet: bool) -> TrainResult:
    """Train (or, interrupted, continue) fold ``i`` in ``out/fold_i``: a normal run folder."""
    folder = fold_folder(out, i)
    started = (folder / "last.safetensors").is_file()
    if started and not resume:
        raise UsegError(f"{folder} holds an unfinished fold (interrupted, or training elsewhere); pass "
                        "--resume to continue it")
    split = splits[i]
    d = plan.data
    spacing = d.spacing if d.resample else None
    train_data, val_data = (load_arrays([by_name[n] for n in split[key]], d.label_map, d.normalization,
                                        d.intensity, spacing, d.ignore_value) for key in ("train", "val"))
    if started and budget is not None:  # fit counts the fold's earlier seconds against its budget
        records = runlog.read_records(folder / "metrics.jsonl")
        budget += (records[-1].get("seconds", 0.0) if records else 0.0) / 60.0
    if not started and runtime.main_process():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / FOLD_SPLIT_FILE, json.dumps(dict(split), indent=1))
    logger.info("fold %d of %d: %d train / %d val cases%s", i, len(splits), len(split["train"]),
                len(split["val"]), " (resumed)" if started else "")
    return fit(plan, train_data, val_data, folder, time_budget_min=budget, resume=started, device=device,
               quiet=quiet)


def _read_cv(out: Path) -> dict | None:
    """The summary of an existing ``out/cv.json`` (None when there is none or it is unreadable)."""
    try:
        return json.loads((out / CV_FILE).read_text(encoding="utf-8"))["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cross_validate(run: str | Path, splits: Sequence[Mapping[str, list[str]]], cases: Mapping[str, Case],
                   plan: Plan, roi: str | Path | None = None, device: str = "auto") -> dict:
    """Predict every case with the fold that held it out, score the predictions, write ``run/cv.json``.

    Args:
        run: a cross-validated run whose folds are all complete.
        splits: its folds.
        cases: the cases by name (their masks are the truth).
        plan: the shared plan (its label map decodes the masks).
        roi: the data's ROI folder: predictions are background outside, only pixels inside count.
        device: where to predict.

    Returns:
        The summary (:func:`useg.evaluate_summary.summarize` of every case's rows).
    """
    from .predict import Segmenter

    run = Path(run)
    pred_dir = run / PREDICTIONS_DIR
    rows, records = [], []
    for i, split in enumerate(splits):
        held = [cases[n] for n in split["val"]]
        seg = Segmenter.load(fold_folder(run, i), device=device)
        written = seg.predict_files(held, pred_dir, overwrite=True, roi=roi)
        for case, path in zip(held, written):
            rows.extend(score_case(case, path, plan))
            records.append({"case": case.name, "fold": i, "prediction": path.relative_to(run).as_posix(),
                            "truth": str(Path(case.mask).resolve())})
    summary = summarize(rows)
    truth_dirs = {str(Path(r["truth"]).parent) for r in records}
    cv = {"folds": len(splits), "predictions_dir": PREDICTIONS_DIR,  # relative to the run folder
          "truth_dir": truth_dirs.pop() if len(truth_dirs) == 1 else None,  # None: masks in several folders
          "cases": records, "rows": rows, "summary": summary}
    atomic_write_text(run / CV_FILE, strict_json(cv) + "\n")
    logger.info("cross-validated foreground dice %.4f over %d cases: %s", summary["foreground"]["dice"],
                summary["n_cases"], run / CV_FILE)
    return summary


def score_case(case: Case, prediction: Path, plan: Plan) -> list[dict]:
    """The rows of :func:`useg.metrics.evaluate_case` of one out-of-fold prediction against its mask.

    Pixels at the plan's ignore value and outside the case's ROI are not counted, as in training.
    """
    lm = plan.data.label_map
    pred = lm.decode(read_mask(prediction)[0], path=prediction)
    raw = read_mask(case.mask)[0]
    ignore = plan.data.ignore_value
    known = np.where(raw == ignore, lm.values[0], raw) if ignore is not None else raw
    labels = lm.decode(known, path=case.mask)
    inside = np.ones(labels.shape, bool) if ignore is None else raw != ignore
    if case.roi is not None:
        inside &= read_roi(case.roi, labels.shape, case.mask)
    labels = ignore_outside(labels, inside)
    names = [f"value {v}" if lm.mode != "rgb" else f"#{v:06x}" for v in lm.values]
    keep = labels >= 0
    return evaluate_case(pred[keep], labels[keep], lm.num_classes, names, case=case.name)


__all__ = ["CV_FILE", "PREDICTIONS_DIR", "CVResult", "check_splits", "cross_validate", "folds_of",
           "kfold_splits", "score_case", "share_of_budget", "train_folds"]
