"""What a run folder records while it trains: ``metrics.jsonl``, ``curves.png``, ``summary.json``, the bar.

The bookkeeping of :func:`useg.train.fit`'s epoch ends and its finish, kept apart from the loop the
way nnU-Net keeps its logger apart from its trainer. Only rank 0 calls the writers.

Also the one place that says what a folder holds (:func:`run_state`: empty, started without a
checkpoint, resumable, complete), so that predict, ``train`` and ``train --resume`` tell the same
truth about it (:func:`refuse_unloadable`, :func:`refuse_unresumable`, :func:`refuse_occupied`), and
what a killed training leaves beside ``--out`` (:func:`stale_staging`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsegError
from .files import atomic_write_text, refuse_special, strict_json
from .spec import CONFIGURATIONS

logger = logging.getLogger(__name__)


def append_record(run: Path, record: dict) -> None:
    """Append one epoch's record as a line of ``run/metrics.jsonl``."""
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; lines that are not whole records are dropped with a warning.

    The file is appended in place, so a crash mid-write leaves a torn last line; it must not stop a
    resume or a plot. A missing file has no records.
    """
    if not path.exists():
        return []
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    if torn:
        logger.warning("%s: dropped %d line(s) that are not whole records (a crash while writing)",
                       path, torn)
    return records


def drop_records_after(path: Path, epoch: int) -> None:
    """Keep the metrics of epochs before ``epoch``: a crash may have logged one the checkpoint lacks.

    Torn lines (see :func:`read_records`) go too, so the file is whole again before appending.
    """
    if not path.exists():
        return
    kept = [r for r in read_records(path) if r.get("epoch", 0) < epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_curves(run: Path) -> None:
    """Plot ``run/metrics.jsonl`` as ``run/curves.png`` (nothing without records)."""
    from .report import plot_curves

    records = read_records(run / "metrics.jsonl")
    if records:
        plot_curves(records, run / "curves.png")


def read_summary(run: Path) -> dict:
    """``run/summary.json`` as written by :func:`write_summary` (empty when there is none)."""
    path = run / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_summary(run: Path, summary: dict) -> None:
    """Write ``run/summary.json`` atomically (paths as strings)."""
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items()}
    atomic_write_text(run / "summary.json", strict_json(summary) + "\n")  # best_dice null without validation


class ProgressBar:
    """The training bar (rich): steps done of planned, loss, best validation Dice, elapsed, ETA.

    A context manager like rich's ``Progress``; ``quiet`` draws nothing.
    """

    def __init__(self, quiet: bool, total: int, completed: int, dice: float):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("val dice {task.fields[dice]:.3f}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            disable=quiet, transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=completed, loss=float("nan"),
                                             dice=dice)

    def update(self, **fields) -> None:
        """Set the task's ``completed``, ``total``, ``loss`` or ``dice``."""
        self._progress.update(self._task, **fields)

    def __enter__(self) -> ProgressBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


STAGING = ".new-"  # a new run is built in .NAME.new-XXXX beside NAME (useg.pipeline)
ASIDE = ".old-"  # the run it replaces is renamed .NAME.old-XXXX for the moment of the swap
OWNER_FILE = ".owner"  # in a staging folder: "pid host" of the training building it
YOUNG_S = 60.0  # a staging folder without an owner yet is this young while its training starts


@dataclass(frozen=True)
class RunState:
    """What a folder holds, from its file names and the last checkpoint's header (nothing is loaded)."""

    kind: str  # "empty" (no plan.json: no run), "started" (a plan, no checkpoint: stopped before its first
    # epoch ended), "resumable" (a checkpoint with epochs left), "complete" (every planned epoch, or
    # a model without a checkpoint)
    epochs_done: int  # epochs the last checkpoint holds (0 without one)
    epochs_planned: int | None  # plan.json's train.epochs (None where unreadable)
    has_model: bool  # model.safetensors is there: predict can load the run


def run_state(run: str | Path) -> RunState:
    """The state of a run folder (a missing folder is "empty").

    >>> run_state("/no/such/folder").kind
    'empty'
    """
    run = Path(run)
    has_model = (run / "model.safetensors").is_file()
    if is_multi_configuration(run):  # useg.configs: complete once configuration.json is written
        subs = [run_state(run / c) for c in CONFIGURATIONS if (run / c).is_dir()]
        chosen = (run / CHOICE_FILE).is_file()
        trained = any(s.kind in ("resumable", "complete") for s in subs)
        kind = "complete" if chosen else "resumable" if trained else "started"
        return RunState(kind, 0, None, chosen)
    if not (run / "plan.json").is_file():
        return RunState("empty", 0, None, has_model)
    planned = _planned_epochs(run / "plan.json")
    if (run / "splits.json").is_file() and not has_model:  # cross-validated (useg.crossval): its folds decide
        folds = [run_state(f) for f in sorted(run.glob("fold_*")) if f.is_dir()]
        kind = ("complete" if any(f.has_model for f in folds)
                else "resumable" if any(f.kind == "resumable" for f in folds) else "started")
        return RunState(kind, 0, planned, any(f.has_model for f in folds))
    last = run / "last.safetensors"
    if not last.is_file():
        return RunState("complete" if has_model else "started", 0, planned, has_model)
    done = _checkpoint_epochs(last)
    complete = planned is not None and done is not None and done >= planned
    return RunState("complete" if complete else "resumable", done or 0, planned, has_model)


CONFIGS_FILE = "configs.json"  # in a multi-configuration run (useg.configs): the configurations asked for
CHOICE_FILE = "configuration.json"  # in a multi-configuration run: the scores and the chosen configuration(s)


def is_multi_configuration(run: str | Path) -> bool:
    """Whether ``run`` is a multi-configuration run (``useg train --configs 2d,3d``): RUN/configs.json and
    no plan of its own (its configurations' runs are in RUN/2d and RUN/3d)."""
    run = Path(run)
    return (run / CONFIGS_FILE).is_file() and not (run / "plan.json").exists()


def _planned_epochs(path: Path) -> int | None:
    try:
        epochs = json.loads(path.read_text(encoding="utf-8"))["train"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epochs if isinstance(epochs, int) else None


def _checkpoint_epochs(path: Path) -> int | None:
    """The epochs a ``last.safetensors`` holds, from its JSON header (8-byte length, then the header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:  # no header of ours is near this: a damaged file
                return None
            header = json.loads(f.read(n))
        return int(json.loads(header["__metadata__"]["useg"])["state"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _refuse_special_files(run: Path) -> None:
    """A FIFO in a run folder (plan.json, the weights, ...) is refused before anything opens it."""
    if run.is_dir():
        for p in sorted(run.iterdir()):
            refuse_special(p, "the files 'useg train' wrote")


def _started_sentence(run: Path, data: str) -> str:
    return (f"{run} holds no trained model: training was interrupted before its first checkpoint; "
            f"run 'useg train {data} --out {run} --overwrite'")


def refuse_unloadable(run: str | Path) -> None:
    """Predict and export need a trained model: say what the folder holds instead and the fix.

    Raises:
        UsegError: no folder, no run in it, or a run stopped before its first checkpoint.
    """
    run = Path(run)
    _refuse_special_files(run)
    left = _killed_training(run)
    if not run.is_dir() and left:
        raise UsegError(f"{run} does not exist: {left.name} beside it holds a training into it that was "
                        f"killed before it completed; resume it with 'useg train DATA --out {run} --resume'")
    if not run.is_dir():
        raise UsegError(f"{run} is not a run folder; pass the --out folder of 'useg train'")
    state = run_state(run)
    if state.kind == "empty":
        raise UsegError(f"{run} holds no run (no plan.json); pass the --out folder of 'useg train'")
    if state.kind == "started" and not is_multi_configuration(run):  # that one names --resume (configrun)
        raise UsegError(_started_sentence(run, "DATA"))


def refuse_unresumable(run: str | Path, data: str | Path) -> None:
    """``train --resume`` needs a checkpoint: say what the folder holds instead and the fix.

    Raises:
        UsegError: no run, or a run stopped before its first checkpoint.
    """
    run = Path(run)
    _refuse_special_files(run)
    state = run_state(run)
    if state.kind == "empty":
        raise UsegError(f"{run} holds no run to resume (no plan.json); train without --resume: "
                        f"'useg train {data} --out {run}'")
    if state.kind == "started":
        raise UsegError(f"{run} holds no checkpoint to resume: training was interrupted before its first "
                        f"checkpoint; start it again with 'useg train {data} --out {run} --overwrite'")
    if not (run / "last.safetensors").is_file():  # a model alone (a copied run): nothing to resume from
        raise UsegError(f"{run} holds a trained model but no last.safetensors to resume from; train a new "
                        f"run with 'useg train {data} --out {run} --overwrite'")


def refuse_occupied(run: str | Path, data: str | Path) -> None:
    """A new run (no --overwrite) never lands on a folder that holds one, or the start of one.

    Raises:
        UsegError: naming what the folder holds and the flag that fits it.
    """
    run = Path(run)
    if is_multi_configuration(run):
        raise UsegError(f"{run} holds a multi-configuration run (useg train --configs); pass --resume to "
                        "continue it, or choose another --out")
    state = run_state(run)
    if state.kind == "started":
        raise UsegError(f"{run} holds no trained model, only the plan of a training interrupted before its "
                        "first checkpoint; pass --overwrite to train it again")
    if state.kind == "resumable":
        raise UsegError(f"{run} already holds a run trained for {state.epochs_done} of "
                        f"{state.epochs_planned} epochs; pass --resume to continue it or --overwrite to "
                        "replace it")
    if state.kind == "complete":
        raise UsegError(f"{run} already holds a run, trained to its end; pass --overwrite to replace it "
                        "or choose another --out")


def stale_staging(out: str | Path) -> list[Path]:
    """The folders a killed training left beside ``out`` (``.NAME.new-XXXX``, ``.NAME.old-XXXX``).

    A staging folder is stale when the process that builds it is gone (its ``.owner`` names a pid of
    this host that no longer runs), or when it has no owner and is older than :data:`YOUNG_S`.
    """
    full = Path(os.path.abspath(out))
    if not full.parent.is_dir():
        return []
    found = []
    for p in full.parent.iterdir():
        if not p.name.startswith(f".{full.name}.") or not p.is_dir() or p.is_symlink():
            continue
        rest = p.name[len(full.name) + 2:]
        if rest.startswith(ASIDE[1:]) or (rest.startswith(STAGING[1:]) and _abandoned(p)):
            found.append(p)
    return sorted(found)


def _abandoned(staging: Path) -> bool:
    try:
        pid, host = (staging / OWNER_FILE).read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return time.time() - staging.stat().st_mtime > YOUNG_S
    if host != _host():
        return False  # another machine's training (a shared disk): its processes cannot be seen from here
    if os.name != "posix":
        return time.time() - staging.stat().st_mtime > 24 * 3600
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):  # another user's process, or a damaged file
        return False
    return False


def _host() -> str:
    import socket

    return "".join(socket.gethostname().split()) or "-"


def claim_staging(staging: Path) -> None:
    """Mark ``staging`` as this process's (see :func:`stale_staging`)."""
    atomic_write_text(staging / OWNER_FILE, f"{os.getpid()} {_host()}\n")


def _killed_training(out: Path) -> Path | None:
    """A stale staging folder beside ``out`` holding a checkpoint (a training killed mid-way), if any."""
    return next((p for p in stale_staging(out) if p.name.startswith(f".{out.name}{STAGING}")
                 and run_state(p).kind in ("resumable", "complete")), None)


def clear_stale(out: str | Path, resume: bool = False) -> None:
    """Remove what killed trainings left beside ``out``, each with a log line, so nothing piles up.

    A run renamed aside for a swap that was killed goes back to ``out`` when ``out`` is missing; with
    ``resume`` a killed training's staging folder takes ``out``'s place when ``out`` holds no run, so
    ``train --resume`` continues it.
    """
    out = Path(os.path.abspath(out))
    for p in stale_staging(out):
        if not out.exists() and p.name.startswith(f".{out.name}{ASIDE}"):
            os.replace(p, out)
            logger.info("put %s back at %s (a swap into it was killed)", p.name, out)
            continue
        if (resume and run_state(out).kind == "empty" and p == _killed_training(out)
                and (not out.exists() or (out.is_dir() and not any(out.iterdir())))):
            if out.exists():
                out.rmdir()
            os.replace(p, out)
            (out / OWNER_FILE).unlink(missing_ok=True)
            logger.info("taking up %s, left by a training into %s that was killed before it completed",
                        p.name, out.name)
            continue
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed %s, left beside %s by a training that was killed before it completed", p.name,
                    out.name)


__all__ = [
    "CHOICE_FILE", "CONFIGS_FILE", "ProgressBar", "RunState", "append_record", "claim_staging", "clear_stale",
    "drop_records_after", "is_multi_configuration", "read_records", "refuse_occupied", "refuse_unloadable",
    "refuse_unresumable", "run_state", "stale_staging", "write_curves", "write_summary",
]
