"""The plan's schema: its JSON round trip and the plan.json files it refuses."""

from __future__ import annotations

import json

import pytest

from useg.errors import UsegError
from useg.labels import LabelMap
from useg.plan import DataConfig, ModelConfig, Plan
from useg.planner import explain, make_plan
from useg.spec import Overrides


def test_round_trip_through_json(tmp_path):
    lm = LabelMap(values=(0, 1, 2), mode="palette", palette=tuple(range(768)))
    overrides = Overrides(model={"width": 8, "norm": None}, train={"lr": 0.01})
    plan = make_plan(lm, 3, [(128, 96)], overrides=overrides)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan
    assert isinstance(again.data.patch_size, tuple)
    assert again.model.norm is None and again.train.lr == 0.01
    assert again.data.label_map.palette == lm.palette
    assert json.loads(path.read_text())["model"]["width"] == 8
    assert "width 8" in explain(again)


def test_load_refuses_garbage(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(UsegError, match="plan.json"):
        Plan.load(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text(json.dumps({"model": {"bogus": 1}}))
    with pytest.raises(UsegError, match="not a useg plan"):
        Plan.load(tmp_path / "plan.json")
    with pytest.raises(UsegError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_a_plan_json_written_before_the_planner_split_still_loads(tmp_path):
    """The field names are plan.json's keys: a file of the earlier layout (every field written,
    tuples as lists) loads into the same values."""
    old = {
        "model": {"in_channels": 1, "num_classes": 2, "dims": 2, "width": 32, "depth": 4, "padding": "same",
                  "up": "transpose", "norm": "batch", "dropout": 0.0, "max_width": None},
        "data": {"label_map": {"values": [0, 255], "mode": "grey", "palette": None}, "patch_size": [64, 64],
                 "normalization": "zscore", "intensity": [], "resample": False, "channel_names": [],
                 "regions": [], "fg_fraction": 0.33, "spacing": [1.0, 1.0], "border_weights": False,
                 "w0": 10.0, "sigma": 5.0},
        "train": {"optimizer": "adamw", "lr": 0.002, "batch_size": 16, "epochs": 100},
        "infer": {"tile": [64, 64], "overlap": 0.5, "batch_size": 4, "tta": False},
        "preset": "default", "version": 1,
    }
    (tmp_path / "plan.json").write_text(json.dumps(old))
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.model == ModelConfig()
    assert isinstance(plan.data, DataConfig) and plan.data.label_map == LabelMap((0, 255), "grey")
    assert plan.data.patch_size == (64, 64) and plan.infer.tile == (64, 64) and plan.train.batch_size == 16
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_py_holds_no_rules():
    import useg.plan as schema

    rules = ("make_plan", "explain", "PRESETS", "target_spacing", "default_patch_size", "valid_input_size")
    for name in rules:
        assert not hasattr(schema, name), name
