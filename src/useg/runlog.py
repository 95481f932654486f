"""What a run folder records while it trains: ``metrics.jsonl``, ``curves.png``, ``summary.json``, the bar.

The bookkeeping of :func:`useg.train.fit`'s epoch ends and its finish, kept apart from the loop the
way nnU-Net keeps its logger apart from its trainer. Only rank 0 calls the writers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_text


def append_record(run: Path, record: dict) -> None:
    """Append one epoch's record as a line of ``run/metrics.jsonl``."""
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def drop_records_after(path: Path, epoch: int) -> None:
    """Keep the metrics of epochs before ``epoch``: a crash may have logged one the checkpoint lacks."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("epoch", 0) < epoch]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_curves(run: Path) -> None:
    """Plot ``run/metrics.jsonl`` as ``run/curves.png`` (nothing without records)."""
    from .report import plot_curves

    path = run / "metrics.jsonl"
    if path.exists():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if records:
            plot_curves(records, run / "curves.png")


def write_summary(run: Path, summary: dict) -> None:
    """Write ``run/summary.json`` atomically (paths as strings)."""
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items()}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")


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


__all__ = ["ProgressBar", "append_record", "drop_records_after", "write_curves", "write_summary"]
