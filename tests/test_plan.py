from __future__ import annotations

import json

import pytest

from useg.errors import UsegError
from useg.labels import LabelMap
from useg.plan import Plan, explain, make_plan
from useg.model import output_size

LM = LabelMap(values=(0, 255), mode="grey")


@pytest.mark.parametrize("shapes,padding", [([(512, 512)] * 3, "same"), ([(100, 75)], "same"),
                                           ([(300, 301)], "valid"), ([(20, 40, 40)], "same")])
def test_patch_is_valid_and_capped(shapes, padding):
    plan = make_plan(LM, 1, shapes, model={"padding": padding})
    assert len(plan.data.patch_size) == len(shapes[0])
    assert all(p <= 256 + 2 ** plan.model.depth * 8 for p in plan.data.patch_size)
    output_size(plan.data.patch_size, plan.model.depth, padding)  # raises if not valid
    assert plan.infer.tile == plan.data.patch_size
    assert plan.model.dims == len(shapes[0])


def test_small_patches_get_bigger_batches():
    big = make_plan(LM, 1, [(256, 256)])
    small = make_plan(LM, 1, [(64, 64)])
    assert small.train.batch_size > big.train.batch_size
    fixed = make_plan(LM, 1, [(64, 64)], train={"batch_size": 3})
    assert fixed.train.batch_size == 3


def test_round_trip_through_json(tmp_path):
    lm = LabelMap(values=(0, 1, 2), mode="palette", palette=tuple(range(768)))
    plan = make_plan(lm, 3, [(128, 96)], model={"width": 8, "norm": None}, train={"lr": 0.01})
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


def test_unknown_preset_and_bad_patch():
    with pytest.raises(ValueError, match="preset"):
        make_plan(LM, 1, [(64, 64)], preset="nope")
    with pytest.raises(ValueError, match="axes"):
        make_plan(LM, 1, [(64, 64)], patch_size=(64, 64, 64))


def test_paper_preset_is_the_papers_recipe_and_round_trips(tmp_path):
    plan = make_plan(LM, 1, [(512, 512)] * 3, preset="paper")
    m, t, d = plan.model, plan.train, plan.data
    assert (m.width, m.depth, m.padding, m.up, m.norm, m.dropout) == (64, 4, "valid", "transpose", None, 0.5)
    assert (t.optimizer, t.momentum, t.loss, t.batch_size) == ("sgd", 0.99, "ce", 1)
    assert d.border_weights and (d.w0, d.sigma) == (10.0, 5.0) and d.augment.p_elastic > 0
    assert plan.infer.tta and output_size(d.patch_size, 4, "valid")[0] >= 300
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and "border map" in explain(again)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["data"]["augment"]["p_elastic"] == 0.5 and saved["preset"] == "paper"
