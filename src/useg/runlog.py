"""What a run folder records while it trains: ``metrics.jsonl``, ``curves.png``, ``summary.json``, the bar.

The bookkeeping of :func:`useg.train.fit`'s epoch ends and its finish, kept apart from the loop the
way nnU-Net keeps its logger apart from its trainer. Only rank 0 calls the writers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .files import atomic_write_text, strict_json

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


__all__ = [
    "ProgressBar", "append_record", "drop_records_after", "read_records", "write_curves", "write_summary",
]
