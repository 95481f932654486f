"""The value rules of plan fields live once (useg.spec.BOUNDS): the parser and every plan apply them."""

from __future__ import annotations

import dataclasses

import pytest

from useg.cli_parser import build_parser
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.plan import DataConfig, ModelConfig, Plan, TrainConfig
from useg.spec import BOUNDS

FLAGS = {"width": ("--width", "model"), "depth": ("--depth", "model"), "dropout": ("--dropout", "model"),
         "lr": ("--lr", "train"), "seed": ("--seed", "train"), "workers": ("--workers", "train"),
         "epochs": ("--epochs", "train"), "iters_per_epoch": ("--iters", "train"),
         "batch_size": ("--batch-size", "train")}
EDGES = ["-2", "-1", "0", "0.5", "1", "1.5", "3", "1e30", "inf", "nan"]


def _plan(part: str, name: str, value) -> Plan:
    model, data = ModelConfig(width=4, depth=2), DataConfig(LabelMap((0, 1)), patch_size=(32, 32))
    if part == "model":
        return Plan(dataclasses.replace(model, **{name: value}), data)
    return Plan(model, data, dataclasses.replace(TrainConfig(), **{name: value}))


def test_every_bounded_field_has_its_flag():
    assert set(BOUNDS) == set(FLAGS)


@pytest.mark.parametrize("name", sorted(FLAGS))
@pytest.mark.parametrize("text", EDGES)
def test_the_parser_and_the_plan_apply_one_rule(name, text, tmp_path):
    flag, part = FLAGS[name]
    bound = BOUNDS[name]
    kind = int if bound.whole else float
    try:
        value = kind(text)
    except ValueError:
        value = None  # "0.5" for a whole number: the parser's type check
    argv = ["train", str(tmp_path), "--out", str(tmp_path / "r"), f"{flag}={text}"]
    try:
        parsed = getattr(build_parser().parse_args(argv), flag[2:].replace("-", "_"))
    except SystemExit:
        parsed = None
    # what the parser lets through, the plan judges; what the plan accepts, the parser lets through
    if value is not None and bound.holds(value):
        assert parsed == value
        _plan(part, name, value)
    elif parsed is not None:
        with pytest.raises(UsegError, match=flag):
            _plan(part, name, parsed)
