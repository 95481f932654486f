"""Plans sized to the compute (useg.sizing): the ladder, the rule, the record, where it applies."""

import dataclasses
import json
import math

import numpy as np
import pytest

from useg import sizing
from useg.labels import LabelMap
from useg.plan import Plan
from useg.planner import make_plan
from useg.spec import Overrides

LM = LabelMap(values=(0, 255), mode="grey")


def _plan_2d(**train):
    return make_plan(LM, 1, [(256, 256)], overrides=Overrides(train=train))


def _plan_3d():
    return make_plan(LabelMap((0, 1, 2)), 2, [(96, 96, 96)],
                     overrides=Overrides(model={"width": 16, "norm": "instance"}, patch_size=(96, 96, 64)))


def _by_work(seconds_per_unit):
    """A fake measurement: seconds proportional to the candidate's compute, and a call log."""
    calls = []

    def measure(plan, device):
        calls.append(sizing.candidate_of(plan))
        return seconds_per_unit * sizing.candidate_of(plan).work()
    return measure, calls


def test_ladder_2d_halves_batch_then_width_each_rung_cheaper():
    plan = _plan_2d()
    rungs = sizing.ladder(plan)
    assert rungs[0] == sizing.candidate_of(plan)
    assert [r.batch for r in rungs[:3]] == [8, 4, 2]
    assert [r.width for r in rungs[2:]] == [32, 16, 8]
    assert all(b.work() < a.work() for a, b in zip(rungs, rungs[1:]))
    assert all(r.patch == (256, 256) for r in rungs)  # 2D keeps its patch: context matters more


@pytest.mark.parametrize("fixed, kept", [({"batch_size"}, "batch"), ({"width"}, "width")])
def test_ladder_never_changes_what_the_user_fixed(fixed, kept):
    plan = _plan_2d()
    rungs = sizing.ladder(plan, fixed)
    assert {getattr(r, kept) for r in rungs} == {getattr(rungs[0], kept)}
    assert len(rungs) > 1


def test_ladder_3d_shrinks_width_then_patch_in_valid_sizes():
    plan = _plan_3d()
    rungs = sizing.ladder(plan)
    assert rungs[1].width == 8 and rungs[1].patch == rungs[0].patch
    smaller = [r for r in rungs if r.patch != rungs[0].patch]
    assert smaller, "the 3D ladder goes on to smaller patches"
    for r in smaller:
        assert all(e % 2 ** r.depth == 0 and e >= sizing.MIN_EDGE_3D for e in r.patch)
        assert math.prod(r.patch) < math.prod(rungs[0].patch)
    assert all(b.work() < a.work() for a, b in zip(rungs, rungs[1:]))


def test_a_fast_machine_keeps_the_plan_and_records_why():
    plan = _plan_2d()
    measure, calls = _by_work(1e-9)  # ~0.5 s a step: 180 steps in 2 minutes
    sized = sizing.size_plan(plan, 2.0, measure=measure)
    assert sizing.candidate_of(sized) == sizing.candidate_of(plan)
    assert len(calls) == 1
    assert sized.sizing["chosen"] == 0 and "at least" in sized.sizing["reason"]


def test_a_slow_machine_gets_a_cheaper_plan_that_holds_enough_steps():
    plan = _plan_2d()
    measure, calls = _by_work(4e-9)  # the plan: ~2.1 s a step, 43 steps in 2 minutes
    sized = sizing.size_plan(plan, 2.0, measure=measure)
    chosen = sizing.candidate_of(sized)
    assert chosen.work() < sizing.candidate_of(plan).work()
    assert sizing.steps_in(120.0, 4e-9 * chosen.work()) >= sizing.MIN_STEPS
    assert calls[-1] == chosen, "the chosen rung is measured before it is kept"
    rows = sized.sizing["candidates"]
    assert rows[sized.sizing["chosen"]]["measured"] and rows[0]["measured"]
    assert sized.infer.tile == sized.data.patch_size and sized.train.batch_size == chosen.batch


def test_slower_than_predicted_moves_the_choice_down():
    plan = _plan_2d()

    def measure(p, device):  # the planned rung as predicted; every other twice as slow as its compute says
        c = sizing.candidate_of(p)
        return 4e-9 * c.work() * (1 if c == sizing.candidate_of(plan) else 2)
    sized = sizing.size_plan(plan, 2.0, measure=measure)
    naive = sizing.choose(sizing.ladder(plan), {0: 4e-9 * sizing.candidate_of(plan).work()}, 120.0)
    assert sized.sizing["chosen"] > naive


def test_a_machine_too_slow_for_any_rung_takes_the_cheapest():
    plan = _plan_2d()
    measure, _ = _by_work(1e-5)
    sized = sizing.size_plan(plan, 2.0, measure=measure)
    assert sized.sizing["chosen"] == len(sizing.ladder(plan)) - 1
    assert "the most this machine allows" in sized.sizing["reason"]


def test_the_record_survives_plan_json(tmp_path):
    measure, _ = _by_work(4e-9)
    sized = sizing.size_plan(_plan_2d(), 2.0, measure=measure)
    back = Plan.load(sized.save(tmp_path / "plan.json"))
    assert back == sized
    assert json.loads((tmp_path / "plan.json").read_text())["sizing"]["min_steps"] == sizing.MIN_STEPS
    lines = sizing.explain_sizing(back.sizing)
    assert lines[0].startswith("compute: ") and sum("*" in line for line in lines[1:]) == 1


def test_old_plans_without_sizing_still_load(tmp_path):
    d = _plan_2d().to_dict()
    del d["sizing"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    assert Plan.load(path).sizing is None


@pytest.mark.parametrize("case", ["no budget", "deterministic", "paper", "torchrun"])
def test_sizing_applies_only_where_a_timing_cannot_change_the_result(case, monkeypatch):
    calls = []
    monkeypatch.setattr(sizing, "size_plan", lambda *a, **k: calls.append(a) or a[0])
    plan, ov, budget = _plan_2d(), Overrides(), 2.0
    if case == "no budget":
        budget = None
    elif case == "deterministic":
        plan = _plan_2d(deterministic=True)
    elif case == "paper":
        ov = Overrides(preset="paper")
    else:
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert sizing.size_for_budget(plan, ov, budget) is plan and not calls


def test_what_the_user_fixed_reaches_the_ladder(monkeypatch):
    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sizing, "size_plan", lambda plan, b, fixed, device: seen.setdefault("f", set(fixed)))
    ov = Overrides(model={"width": 8}, train={"batch_size": 2}, patch_size=(64, 64))
    sizing.size_for_budget(_plan_2d(), ov, 2.0)
    assert seen["f"] == {"width", "batch_size", "patch"}


@pytest.mark.parametrize("shape, regions", [((40, 40), ()), ((20, 24, 16), ()), ((40, 40), ((1, 2), (2,)))])
def test_measure_step_times_the_real_step(shape, regions):
    plan = make_plan(LabelMap((0, 1, 2)), 1, [shape],
                     overrides=Overrides(model={"width": 4, "depth": 2}, train={"batch_size": 2},
                                         data={"regions": regions}))
    seconds = sizing.measure_step(plan, "cpu", repeats=1)
    assert np.isfinite(seconds) and seconds > 0


def test_apply_keeps_every_other_field():
    plan = _plan_2d()
    c = dataclasses.replace(sizing.candidate_of(plan), width=16, batch=2)
    out = sizing.apply(plan, c)
    assert (out.model.width, out.train.batch_size) == (16, 2)
    assert dataclasses.replace(out.model, width=plan.model.width) == plan.model
    assert out.data == plan.data and out.train.lr == plan.train.lr


# --- slices: the 2D configuration on slices as a candidate for volumes ----------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, write_blob_volumes):
    from useg.check import check_dataset

    return check_dataset(write_blob_volumes(tmp_path_factory.mktemp("vol"), shape=(24, 20, 12), n=3))


def _configured(report, calls=None):
    from useg.planner import plan_dataset

    def plan_config(configuration):
        if calls is not None:
            calls.append(configuration)
        return plan_dataset(report, Overrides(configuration=configuration), device="cpu")[0]
    return plan_config


def _slow_3d(monkeypatch, seconds_3d):
    """measure_step replaced: a 3D step takes ``seconds_3d`` (scaled by compute), a 2D one 0.05 s."""
    first = {}

    def measure(plan, device):
        c = sizing.candidate_of(plan)
        if plan.model.dims == 2:
            return 0.05
        first.setdefault("work", c.work())
        return seconds_3d * c.work() / first["work"]
    monkeypatch.setattr(sizing, "measure_step", measure)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_a_slow_3d_step_makes_the_2d_configuration_on_slices_the_choice(volumes, monkeypatch, tmp_path):
    _slow_3d(monkeypatch, 5.0)  # 18 steps in 2 minutes
    plan_config = _configured(volumes)
    deep = plan_config(None)
    sized = sizing.size_for_budget(deep, Overrides(), 2.0, "cpu", plan_config=plan_config)
    assert sized.model.dims == 2 and sized.data.slice_axis == 2
    rows, chosen = sized.sizing["candidates"], sized.sizing["chosen"]
    assert rows[0]["configuration"] == "3d" and rows[0]["steps_in_budget"] == 18
    assert chosen >= 1 and rows[chosen]["configuration"] == "2d" and rows[chosen]["measured"]
    assert "3D would make 18 steps" in sized.sizing["reason"] and "2D on axial slices makes 1800" in \
        sized.sizing["reason"]
    assert any(" 2d " in line for line in sizing.explain_sizing(sized.sizing))
    assert Plan.load(sized.save(tmp_path / "plan.json")) == sized


def test_a_fast_3d_step_keeps_3d_without_planning_2d(volumes, monkeypatch):
    _slow_3d(monkeypatch, 0.1)  # 900 steps
    calls = []
    deep = _configured(volumes)(None)
    sized = sizing.size_for_budget(deep, Overrides(), 2.0, "cpu", plan_config=_configured(volumes, calls))
    assert not calls and sized.model == deep.model and sized.data == deep.data
    assert [r["configuration"] for r in sized.sizing["candidates"]] == ["3d"]
    assert "3D kept" in sized.sizing["reason"]


@pytest.mark.parametrize("configuration", ["3d", "2d"])
def test_a_fixed_configuration_walks_its_own_ladder(configuration, volumes, monkeypatch):
    _slow_3d(monkeypatch, 5.0)
    calls = []
    plan = _configured(volumes)(configuration)
    sized = sizing.size_for_budget(plan, Overrides(configuration=configuration), 2.0, "cpu",
                                   plan_config=_configured(volumes, calls))
    assert not calls and sized.model.dims == int(configuration[0])
    assert {r["configuration"] for r in sized.sizing["candidates"]} == {configuration}
    if configuration == "3d":  # the 3D ladder: a narrower network or a smaller patch
        assert sizing.candidate_of(sized).work() < sizing.candidate_of(plan).work()


def test_2d_slices_that_gain_no_steps_leave_the_3d_ladder_the_choice(volumes, monkeypatch):
    """Slices far larger than the 3D patch: 2D at its cheapest still makes fewer steps than 3D, so the
    3D network is sized (narrower or a smaller patch), not swapped for a slower 2D one."""
    first = {}

    def measure(plan, device):
        c = sizing.candidate_of(plan)
        first.setdefault(plan.model.dims, c.work())
        base = 5.0 if plan.model.dims == 3 else 2000.0  # 18 steps of 3D; 2D even at its cheapest: 1-2
        return base * c.work() / first[plan.model.dims]
    monkeypatch.setattr(sizing, "measure_step", measure)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    deep = _configured(volumes)(None)
    sized = sizing.size_for_budget(deep, Overrides(), 2.0, "cpu", plan_config=_configured(volumes))
    assert sized.model.dims == 3 and sized.data.slice_axis is None
    assert sizing.candidate_of(sized).work() < sizing.candidate_of(deep).work()
    assert sized.sizing["reason"].startswith("2D on slices would make")
