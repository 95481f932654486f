"""The fold folders of a cross-validated run: ``splits.json`` beside ``fold_K/`` run folders.

:func:`fold_runs` lists the complete folds :meth:`useg.predict.Segmenter.load` ensembles and
``useg export`` exports (refusing folds that do not exist or are not trained yet);
:func:`fold_folder` and :func:`fold_complete` are how :mod:`useg.crossval` finds and skips them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .backends import WEIGHTS_FILE
from .errors import UsegError

SPLITS_FILE = "splits.json"  # in a cross-validated run: its folds, each trained in fold_K/
FOLD_DONE = "summary.json"  # written last by training: a fold folder holding it is complete


def fold_folder(run: str | Path, fold: int) -> Path:
    """Fold ``fold``'s run folder in a cross-validated run: ``run/fold_K``."""
    return Path(run) / f"fold_{fold}"


def fold_complete(folder: Path) -> bool:
    """Whether a fold's training finished (its summary.json, written last, and its weights exist)."""
    return (folder / FOLD_DONE).is_file() and (folder / WEIGHTS_FILE).is_file()


def fold_runs(run: str | Path, folds: Sequence[int] | None = None) -> list[Path]:
    """The complete fold folders of a cross-validated run (``splits.json``, ``fold_K/``); [] for one run.

    Args:
        run: a run folder.
        folds: the folds to take (default all).

    Raises:
        UsegError: ``folds`` given for a single run, a fold not in splits.json, or one not complete.
    """
    run = Path(run)
    splits = run / SPLITS_FILE
    if not splits.is_file() or (run / WEIGHTS_FILE).is_file():
        if folds:
            raise UsegError(f"{run} is not a cross-validated run (it has no {SPLITS_FILE}); drop --folds")
        return []
    try:
        k = len(json.loads(splits.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise UsegError(f"{splits} cannot be read ({e}); restore it or train the run again") from None
    chosen = list(range(k)) if folds is None else list(dict.fromkeys(folds))
    if not chosen or any(not 0 <= f < k for f in chosen):
        raise UsegError(f"--folds {','.join(map(str, chosen))} is not a choice of {run}'s folds 0 to "
                        f"{k - 1}; choose among those")
    unfinished = [fold_folder(run, f) for f in chosen if not fold_complete(fold_folder(run, f))]
    if unfinished:
        raise UsegError(f"{unfinished[0]} is not trained yet; finish it with 'useg train DATA --out {run} "
                        "--resume' or choose the trained folds with --folds")
    return [fold_folder(run, f) for f in chosen]
