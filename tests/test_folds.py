"""Tests for useg.folds: the complete fold folders of a cross-validated run, and the refusals."""

from __future__ import annotations

import json

import pytest

from useg.errors import UsegError
from useg.folds import FOLD_DONE, SPLITS_FILE, fold_complete, fold_folder, fold_runs


def _cv_run(root, k=3, done=(0, 1, 2)):
    """A cross-validated run folder of ``k`` folds, those in ``done`` trained (summary and weights)."""
    root.mkdir(parents=True)
    (root / SPLITS_FILE).write_text(json.dumps([{"train": [], "val": [f"c{i}"]} for i in range(k)]))
    for i in range(k):
        folder = fold_folder(root, i)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if i in done:
            (folder / FOLD_DONE).write_text("{}")
    return root


def test_fold_runs_lists_the_complete_folds(tmp_path):
    run = _cv_run(tmp_path / "run")
    assert fold_folder(run, 2) == run / "fold_2"
    assert fold_runs(run) == [run / "fold_0", run / "fold_1", run / "fold_2"]
    assert fold_runs(run, [2, 0, 2]) == [run / "fold_2", run / "fold_0"]  # in the order asked, once each


def test_a_single_run_has_no_folds(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"weights")
    assert fold_runs(single) == []
    with pytest.raises(UsegError, match="is not a cross-validated run"):
        fold_runs(single, [0])


def test_fold_runs_refuses_unknown_unfinished_folds_and_a_damaged_splits_file(tmp_path):
    run = _cv_run(tmp_path / "run", done=(0, 2))
    assert fold_complete(run / "fold_0") and not fold_complete(run / "fold_1")
    with pytest.raises(UsegError, match="fold_1 is not trained yet"):
        fold_runs(run)
    assert fold_runs(run, [0, 2]) == [run / "fold_0", run / "fold_2"]
    with pytest.raises(UsegError, match="--folds 3 is not a choice of .* folds 0 to 2"):
        fold_runs(run, [3])
    (run / SPLITS_FILE).write_text("[{")
    with pytest.raises(UsegError, match="splits.json cannot be read"):
        fold_runs(run)
