"""From a data folder to a run: names, checks, splits."""

from __future__ import annotations

import json

import pytest

from useg.errors import UsegError
from useg.pipeline import parse_names, train_folder


def test_parse_names():
    assert parse_names("25-27,a") == ["25", "26", "27", "a"]
    assert parse_names(None) == []


def test_train_folder_refuses_bad_data_and_existing_runs(tmp_path, cells_dir):
    with pytest.raises(UsegError):
        train_folder(tmp_path / "nothing", tmp_path / "run", quiet=True)
    kw = dict(quiet=True, model={"width": 4, "depth": 2}, patch_size=(32, 32),
              train={"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32"})
    train_folder(cells_dir, tmp_path / "run", val="cell_000", exclude="cell_005", **kw)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["val"] == ["cell_000"]
    assert "cell_005" not in split["train"] and len(split["train"]) == 4
    with pytest.raises(UsegError, match="already holds a run"):
        train_folder(cells_dir, tmp_path / "run", **kw)
    with pytest.raises(UsegError, match="not in"):
        train_folder(cells_dir, tmp_path / "run2", exclude="nope", **kw)
