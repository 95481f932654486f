"""The planning rules: presets, patch, batch, spacing, and the fingerprint's plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from useg.check import CaseRecord, CheckReport
from useg.dataset import Case
from useg.labels import LabelMap
from useg.model import output_size
from useg.plan import Plan
from useg.planner import (
    batch_size,
    explain,
    fingerprint,
    make_plan,
    plan_dataset,
    pooled_intensities,
    target_spacing,
    training_gib,
)
from useg.spec import Overrides

LM = LabelMap(values=(0, 255), mode="grey")


def _report(shapes, spacings, channels=1, background=0.0, names=(), rng=None):
    rng = rng or np.random.default_rng(0)
    samples = tuple(rng.normal(40, 10, 1000) for _ in range(channels))
    records = tuple(CaseRecord(f"c{i}", shape, spacing, channels, len(shape), "float32", background,
                               samples if i == 0 else None)
                    for i, (shape, spacing) in enumerate(zip(shapes, spacings, strict=True)))
    cases = [Case(r.name, Path(f"{r.name}.nii.gz")) for r in records]
    return CheckReport(cases=cases, problems=[], label_map=LabelMap((0, 1, 2)), num_channels=channels,
                       stats={"pixel share per mask value": {"0": 0.9, "1": 0.07, "2": 0.03}},
                       info={"channel_names": list(names)}, records=records)


@pytest.mark.parametrize("shapes,padding", [([(512, 512)] * 3, "same"), ([(100, 75)], "same"),
                                           ([(300, 301)], "valid"), ([(20, 40, 40)], "same")])
def test_patch_is_valid_and_capped(shapes, padding):
    plan = make_plan(LM, 1, shapes, overrides=Overrides(model={"padding": padding}))
    assert len(plan.data.patch_size) == len(shapes[0])
    assert all(p <= 256 + 2 ** plan.model.depth * 8 for p in plan.data.patch_size)
    output_size(plan.data.patch_size, plan.model.depth, padding)  # raises if not valid
    assert plan.infer.tile == plan.data.patch_size
    assert plan.model.dims == len(shapes[0])


def test_small_patches_get_bigger_batches():
    big = make_plan(LM, 1, [(256, 256)])
    small = make_plan(LM, 1, [(64, 64)])
    assert small.train.batch_size > big.train.batch_size
    fixed = make_plan(LM, 1, [(64, 64)], overrides=Overrides(train={"batch_size": 3}))
    assert fixed.train.batch_size == 3


def test_the_batch_is_decided_in_one_place():
    assert batch_size("default", 2, (256, 256), {}) == 8  # about 8 x 256^2 pixels per step
    assert batch_size("default", 2, (64, 64), {}) == 32 and batch_size("default", 2, (512, 512), {}) == 2
    assert batch_size("paper", 2, (572, 572), {}) == 1  # the paper's single large tiles
    assert batch_size("default", 3, None, {}) == batch_size("paper", 3, None, {}) == 2
    assert batch_size("paper", 3, None, {"batch_size": 5}) == 5
    assert make_plan(LM, 1, [(20, 40, 40)]).train.batch_size == 2  # 3D is 2 however it is planned
    cpu, _ = plan_dataset(_report([(64, 64, 64)] * 2, [(1.0, 1.0, 1.0)] * 2), device="cpu")
    assert cpu.train.batch_size == 2


def test_unknown_preset_and_bad_patch():
    with pytest.raises(ValueError, match="preset"):
        make_plan(LM, 1, [(64, 64)], overrides=Overrides(preset="nope"))
    with pytest.raises(ValueError, match="axes"):
        make_plan(LM, 1, [(64, 64)], overrides=Overrides(patch_size=(64, 64, 64)))


def test_paper_preset_is_the_papers_recipe_and_round_trips(tmp_path):
    plan = make_plan(LM, 1, [(512, 512)] * 3, overrides=Overrides(preset="paper"))
    m, t, d = plan.model, plan.train, plan.data
    assert (m.width, m.depth, m.padding, m.up, m.norm, m.dropout) == (64, 4, "valid", "transpose", None, 0.5)
    assert (t.optimizer, t.momentum, t.loss, t.batch_size) == ("sgd", 0.99, "ce", 1)
    assert d.border_weights and (d.w0, d.sigma) == (10.0, 5.0) and d.augment.p_elastic > 0
    assert plan.infer.tta and output_size(d.patch_size, 4, "valid")[0] >= 300
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and "border map" in explain(again)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["data"]["augment"]["p_elastic"] == 0.5 and saved["preset"] == "paper"


def test_target_spacing_is_the_median_except_on_a_thick_slice_axis():
    assert target_spacing([(1, 1, 1), (1, 1, 2), (1, 1, 3)]) == (1, 1, 2)
    thick = [(0.7, 0.7, 5.0), (0.8, 0.8, 5.0), (0.7, 0.7, 1.5), (0.7, 0.7, 5.0)] * 3
    assert target_spacing(thick)[2] == pytest.approx(np.percentile([s[2] for s in thick], 10))


def test_3d_plan_fits_the_memory_budget_and_pools_to_about_4_voxels():
    report = _report([(240, 240, 155)] * 4, [(1.0, 1.0, 1.0)] * 4, channels=2, background=0.8)
    for gib in (0.5, 4.0):
        # GPU rules: memory is the limit
        plan, reasons = plan_dataset(report, Overrides(memory_gb=gib), device="cuda")
        m, patch = plan.model, plan.data.patch_size
        assert m.dims == 3 and m.width == 32 and m.max_width == 320 and m.norm == "instance"
        assert training_gib(patch, m.width, m.depth, 2, m.max_width, plan.train.batch_size) <= gib * 1.05
        assert 4 <= min(patch) / 2**m.depth < 8 or m.depth == 5
        assert plan.data.normalization == "zscore_mask" and any("z-score inside" in r for r in reasons)
    small, _ = plan_dataset(report, Overrides(memory_gb=0.5), device="cuda")
    assert np.prod(small.data.patch_size) < np.prod(plan.data.patch_size)  # a bigger budget, a bigger patch
    cpu, reasons = plan_dataset(report, device="cpu")
    assert cpu.model.width == 16 and np.prod(cpu.data.patch_size) <= 96 * 96 * 64
    assert Plan.from_dict(cpu.to_dict()) == cpu  # every choice lands in plan.json


def test_ct_is_clipped_to_foreground_percentiles_and_varying_spacing_resampled():
    report = _report([(64, 64, 40), (70, 60, 30)], [(0.8, 0.8, 2.5), (0.7, 0.7, 3.0)], names=["CT"])
    plan, reasons = plan_dataset(report, device="cpu")
    lo, hi, mean, std = plan.data.intensity[0]
    fp = fingerprint(report)
    assert plan.data.normalization == "ct" and lo == fp["intensity"][0]["p00_5"] and hi > mean > lo
    assert plan.data.resample and plan.data.spacing == target_spacing([r.spacing for r in report.records])


def test_2d_keeps_the_preset_rules():
    report = _report([(512, 512)] * 3, [(1.0, 1.0)] * 3)
    plan, _ = plan_dataset(report, device="cpu")
    assert plan.model.dims == 2 and plan.data.patch_size == (256, 256) and plan.data.normalization == "zscore"


def test_fingerprint_comes_from_the_per_case_records():
    report = _report([(10, 20, 30), (12, 22, 32)], [(1.0, 1.0, 2.0), (1.0, 1.0, 3.0)],
                     channels=2, background=0.5)
    fp = fingerprint(report)
    assert fp["median_shape"] == [11, 21, 31] and fp["spacing_range"][2] == [2.0, 3.0]
    assert fp["channels"] == 2 and fp["background_share"] == 0.5 and len(fp["intensity"]) == 2
    assert [len(v) for v in pooled_intensities(report.records)] == [1000, 1000]
    assert fingerprint(report.without({"c0"}))["intensity"] == []  # c0 held the only samples
