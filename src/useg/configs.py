"""Several configurations of one data folder, and the one (or the ensemble) chosen by validation.

nnU-Net trains its 2d and 3d_fullres configurations and ``nnUNetv2_find_best_configuration`` picks
the best one, or the ensemble of two, by the cross-validated Dice. ``useg train DATA --out RUN
--configs 2d,3d`` (:func:`train_configurations`) does the same:

1. ``RUN/configs.json`` records what was asked (the configurations, the folds, the shared split);
2. each configuration trains as a complete run in ``RUN/2d`` and ``RUN/3d``
   (:func:`useg.pipeline.train_folder` with :attr:`useg.spec.Overrides.configuration`): with ``folds``
   each is a cross-validated run on the SAME ``splits.json``, without them an ordinary run with the
   SAME validation cases;
3. each configuration and the ensemble of the two (the mean of their probabilities per case,
   :class:`useg.configrun.ConfigEnsemble`) are scored on the validation cases (with folds every case
   out-of-fold, predicted by the fold that did not train on it) by the mean foreground Dice
   (:func:`useg.crossval.score_case`, :func:`useg.evaluate_summary.summarize`), and
   :func:`choose_configuration` picks; ``RUN/configuration.json`` is written last, atomically.

The time budget: each configuration still to train gets the budget left divided by the
configurations left (and shares it among its folds as :func:`useg.crossval.train_folds` does);
the scoring after training is outside it, as cross-validation's out-of-fold prediction is.
Until ``configuration.json`` exists nothing at ``RUN`` is read by predict (it refuses, naming
``--resume``), and each sub-run is built as ``useg train`` builds a run (beside its folder, or fold by
fold), so an interrupted multi-configuration run resumes with ``--resume``: complete configurations
are skipped, an interrupted one continues.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import runlog
from .check import check_dataset
from .configrun import ENSEMBLE, ConfigEnsemble, refuse_unfit, report_dims
from .crossval import CV_FILE, kfold_splits, score_case, share_of_budget
from .dataset import Case
from .errors import UsegError
from .evaluate_summary import summarize
from .files import atomic_write_text, strict_json
from .pipeline import parse_names, split_cases, train_folder
from .plan import Plan
from .predict import Segmenter
from .runlog import CHOICE_FILE, CONFIGS_FILE
from .spec import CONFIGURATIONS, DataSpec, Overrides

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"  # in a multi-configuration run: RUN/validation/<candidate>/ predictions
RULE = ("the candidate with the highest mean foreground Dice on the validation cases (nnU-Net's "
        "find_best_configuration); the ensemble only when it beats the best single configuration, a tie "
        "between single ones goes to the first in the order given")


@dataclass(frozen=True)
class ConfigsResult:
    """What :func:`train_configurations` did."""

    run: Path  # the multi-configuration run folder
    trained: dict  # configuration -> the TrainResult or CVResult of the ones this call trained
    record: dict  # configuration.json: candidates, scores, the chosen configuration(s)


def choose_configuration(scores: Mapping[str, float], order: Sequence[str] = CONFIGURATIONS) -> list[str]:
    """nnU-Net's rule: the best single configuration, or the ensemble only when it is strictly better.

    Args:
        scores: candidate -> mean foreground Dice; the single configurations by name, the ensemble
            under :data:`useg.configrun.ENSEMBLE` (absent when there is only one configuration).
        order: the configurations in order of preference on a tie.

    Returns:
        The chosen configuration(s): one name, or every name of the ensemble.

    >>> choose_configuration({"2d": 0.8, "3d": 0.85, "2d+3d": 0.84})
    ['3d']
    >>> choose_configuration({"2d": 0.8, "3d": 0.8, "2d+3d": 0.8})
    ['2d']
    >>> choose_configuration({"2d": 0.8, "3d": 0.85, "2d+3d": 0.86})
    ['2d', '3d']
    """
    singles = [c for c in order if c in scores]
    if not singles:
        raise ValueError(f"no configuration among the scores {sorted(scores)}")
    best = max(singles, key=lambda c: scores[c])  # max keeps the first of equal scores
    if ENSEMBLE in scores and scores[ENSEMBLE] > scores[best]:
        return [c for c in order if c in ENSEMBLE.split("+")]
    return [best]


def train_configurations(
    data: str | Path,
    out: str | Path,
    *,
    configurations: Sequence[str] = CONFIGURATIONS,
    spec: DataSpec | None = None,
    overrides: Overrides | None = None,
    val: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    folds: int | None = None,
    time_budget_min: float | None = None,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
) -> ConfigsResult:
    """Train every configuration of a multi-configuration run not complete yet, then choose.

    Args:
        data: the data folder.
        out: the multi-configuration run folder.
        configurations: the configurations to train (two of :data:`useg.spec.CONFIGURATIONS`); on
            ``resume`` those of ``out/configs.json``.
        spec, overrides, val, exclude, device, quiet: as for :func:`useg.pipeline.train_folder`
            (``overrides.configuration`` is set per configuration).
        folds: k-fold cross-validation of every configuration on one ``splits.json``.
        time_budget_min: minutes of training for this call, shared by the configurations left.
        resume: continue ``out`` (complete configurations are skipped).

    Raises:
        UsegError: names that are no configuration, "3d" for 2D images, ``out`` holding another run,
            an existing multi-configuration run without ``resume``, no validation case.
    """
    t0 = time.perf_counter()
    out = Path(out)
    asked = _asked(out, data, spec, overrides or Overrides(), configurations, val, exclude, folds, resume)
    # a configuration not started before an interruption is planned as the run was asked for
    overrides = Overrides(**asked["overrides"])
    if asked.get("mask_values") is not None and (spec is None or spec.mask_values is None):
        spec = dataclasses.replace(spec or DataSpec(), mask_values=asked["mask_values"])
    trained = {}
    pending = [c for c in asked["configurations"] if not _complete(out / c, asked["folds"])]
    for n, name in enumerate(pending):
        budget = share_of_budget(time_budget_min, t0, len(pending) - n)
        trained[name] = _train_one(data, out, name, asked, spec, overrides, budget, device, quiet)
    record = _choose(out, data, spec, asked, device)
    return ConfigsResult(out, trained, record)


def _asked(out: Path, data, spec, overrides, configurations, val, exclude, folds, resume) -> dict:
    """``out/configs.json``: read back on resume, or decided now (the shared split) and written first."""
    path = out / CONFIGS_FILE
    if resume:
        if not path.is_file():
            raise UsegError(f"{out} holds no multi-configuration run to resume (no {CONFIGS_FILE}); train it "
                            f"without --resume: 'useg train {data} --out {out} --configs 2d,3d'")
        try:
            asked = json.loads(path.read_text(encoding="utf-8"))
            names = asked["configurations"]
            ok = (len(names) >= 2 and all(c in CONFIGURATIONS for c in names)
                  and ("splits" in asked or "val" in asked) and isinstance(asked["overrides"], dict))
            Overrides(**asked["overrides"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise UsegError(f"{path} is not the record of 'useg train --configs'; delete {out} and train it "
                            "again")
        return asked
    _refuse_names(configurations)
    if path.exists():
        raise UsegError(f"{out} already holds a multi-configuration run; pass --resume to continue it, or "
                        "choose another --out")
    if (out / "plan.json").exists():
        runlog.refuse_occupied(out, data)  # the sentence of the run that is there
        raise UsegError(f"{out} already holds a run; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsegError(f"{out} is not empty; choose another --out (a multi-configuration run needs a folder "
                        "of its own)")
    report = check_dataset(data, spec)
    if not report.ok:
        raise UsegError("\n".join(report.problems))
    refuse_unfit(report_dims(report), configurations, data)
    held = parse_names(exclude)
    cases = [c for c in report.cases if c.name not in set(held)]
    seed = overrides.train.get("seed", 0)
    asked = {"configurations": list(configurations), "folds": folds, "exclude": held,
             "overrides": _plain(overrides), "mask_values": spec.mask_values if spec else None}
    if folds is not None:
        asked["splits"] = kfold_splits([c.name for c in cases], folds, seed)
    else:
        fraction = overrides.train.get("val_fraction", 0.2)
        _, val_cases = split_cases(cases, fraction, seed, parse_names(val) or None)
        if not val_cases:
            raise UsegError(f"{data} leaves no validation case to choose a configuration on; give --val or "
                            "more cases")
        asked["val"] = [c.name for c in val_cases]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asked, indent=1) + "\n")
    return asked


def _plain(overrides: Overrides) -> dict:
    """The fields of ``overrides`` as JSON values (``Overrides(**_plain(o)) == o``), for configs.json."""
    fields = dataclasses.asdict(overrides)
    fields.pop("configuration")  # set per configuration
    return json.loads(json.dumps(fields))


def _refuse_names(configurations: Sequence[str]) -> None:
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown or len(set(configurations)) != len(configurations) or len(configurations) < 2:
        raise UsegError(f"--configs {','.join(configurations)} is not a choice of two different "
                        f"configurations among {', '.join(CONFIGURATIONS)}; give --configs 2d,3d")


def _complete(sub: Path, folds: int | None) -> bool:
    """A configuration is complete when its run is: its cv.json (cross-validated) or summary.json."""
    if folds is not None:
        return (sub / CV_FILE).is_file()
    return (sub / "summary.json").is_file() and (sub / "model.safetensors").is_file()


def _train_one(data, out: Path, name: str, asked: dict, spec, overrides: Overrides, budget: float | None,
               device: str, quiet: bool):
    """Train (or continue) configuration ``name`` in ``out/name`` with the shared split."""
    sub = out / name
    configured = dataclasses.replace(overrides, configuration=name)
    kw = dict(spec=spec, overrides=configured, exclude=asked["exclude"], device=device, quiet=quiet)
    if asked["folds"] is not None:  # the same splits.json for every configuration, written before it trains
        sub.mkdir(parents=True, exist_ok=True)
        if not (sub / "splits.json").is_file():
            atomic_write_text(sub / "splits.json", json.dumps(asked["splits"], indent=1) + "\n")
        logger.info("configuration %s: %d-fold cross-validation in %s", name, asked["folds"], sub)
        # resume: an interrupted fold continues, folds not started train (the whole run was asked for)
        return train_folder(data, sub, folds=asked["folds"], time_budget_min=budget, resume=True, **kw)
    runlog.clear_stale(sub, resume=True)  # a training of it that was killed is taken up
    state = runlog.run_state(sub)
    resume = state.kind in ("resumable", "complete")
    if resume and budget is not None:  # fit counts the run's earlier seconds against its budget
        records = runlog.read_records(sub / "metrics.jsonl")
        budget += (records[-1].get("seconds", 0.0) if records else 0.0) / 60.0
    logger.info("configuration %s: %s in %s", name, "resumed" if resume else "a run", sub)
    return train_folder(data, sub, val=None if resume else asked["val"], time_budget_min=budget,
                        resume=resume, overwrite=state.kind == "started", **kw)


def _choose(out: Path, data, spec, asked: dict, device: str) -> dict:
    """Score every candidate on the validation cases, choose, write ``out/configuration.json``."""
    configurations = asked["configurations"]
    plan = Plan.load(out / configurations[-1] / "plan.json")
    if spec is None or not (spec.image_pattern or spec.mask_pattern):  # as a resume does: the run's patterns
        d = plan.data
        spec = dataclasses.replace(spec or DataSpec(), image_pattern=d.image_pattern,
                                   mask_pattern=d.mask_pattern)
    report = check_dataset(data, spec)
    if not report.ok:
        raise UsegError("\n".join(report.problems))
    by_name = {c.name: c for c in report.cases}
    if asked["folds"] is not None:
        groups = [(f"fold_{i}", [by_name[n] for n in f["val"]]) for i, f in enumerate(asked["splits"])]
    else:
        groups = [("", [by_name[n] for n in asked["val"]])]
    roi = spec.roi_dir
    rows = {name: _single_rows(out, name, asked, groups, plan, roi, device) for name in configurations}
    rows[ENSEMBLE] = _ensemble_rows(out, configurations, groups, plan, roi, device)
    summaries = {name: summarize(r) for name, r in rows.items()}
    chosen = choose_configuration({n: s["foreground"]["dice"] for n, s in summaries.items()}, configurations)
    record = {
        "configurations": configurations, "folds": asked["folds"],
        "scored_on": "every case out-of-fold" if asked["folds"] is not None else "the validation cases",
        "cases": [c.name for _, cases in groups for c in cases],
        "candidates": {n: {"dice": s["foreground"]["dice"],
                           "classes": {e["name"]: e["dice"] for e in s["classes"] if e["class"] >= 1}}
                       for n, s in summaries.items()},
        "chosen": chosen, "rule": RULE,
        "postprocessing": ("the chosen configuration's own postprocessing.json (a cross-validated run "
                           "chooses one)" if len(chosen) == 1 else "none: the ensemble's labels are the "
                           "argmax of the mean probabilities, as scored"),
        "predictions_dir": VALIDATION_DIR,
    }
    atomic_write_text(out / CHOICE_FILE, strict_json(record) + "\n")
    logger.info("configuration chosen: %s (mean foreground dice %s)", "+".join(chosen),
                ", ".join(f"{n} {s['foreground']['dice']:.4f}" for n, s in summaries.items()))
    return record


def _members(out: Path, name: str, group: str) -> Path:
    return out / name / group if group else out / name


def _single_rows(out: Path, name: str, asked: dict, groups, plan: Plan, roi, device: str) -> list[dict]:
    """One configuration's rows: cross-validated, cv.json's out-of-fold rows; else its validation cases
    predicted (raw, as cv.json's are) into ``out/validation/NAME``."""
    if asked["folds"] is not None:
        return json.loads((out / name / CV_FILE).read_text(encoding="utf-8"))["rows"]
    seg = Segmenter.load(out / name, device=device, postprocessing=False)
    return _scored(seg, groups[0][1], out / VALIDATION_DIR / name, plan, roi)


def _ensemble_rows(out: Path, configurations: Sequence[str], groups, plan: Plan, roi,
                   device: str) -> list[dict]:
    """The ensemble's rows: each group of cases predicted by the mean of the configurations' models that
    did not train on it (fold by fold with folds), into ``out/validation/2d+3d``."""
    rows = []
    for group, cases in groups:
        members = [Segmenter.load(_members(out, c, group), device=device, postprocessing=False)
                   for c in configurations]
        rows.extend(_scored(ConfigEnsemble(members), cases, out / VALIDATION_DIR / ENSEMBLE, plan, roi))
    return rows


def _scored(predictor, cases: Sequence[Case], folder: Path, plan: Plan, roi) -> list[dict]:
    written = predictor.predict_files(cases, folder, overwrite=True, roi=roi)
    return [row for case, path in zip(cases, written, strict=True) for row in score_case(case, path, plan)]


__all__ = ["RULE", "VALIDATION_DIR", "ConfigsResult", "choose_configuration", "train_configurations"]
