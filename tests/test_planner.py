"""The fingerprint and the plan it implies."""

import numpy as np
import pytest

from useg.dataset import CheckReport
from useg.labels import LabelMap
from useg.plan import Plan, target_spacing
from useg.planner import fingerprint, plan_dataset, training_gib


def _report(shapes, spacings, channels=1, background=0.0, names=(), rng=None):
    rng = rng or np.random.default_rng(0)
    return CheckReport(cases=[None] * len(shapes), problems=[], label_map=LabelMap((0, 1, 2)), channels=channels,
                       stats={"pixel share per mask value": {"0": 0.9, "1": 0.07, "2": 0.03}}, shapes=shapes,
                       spacings=spacings, intensities=[rng.normal(40, 10, 1000) for _ in range(channels)],
                       info={"background_share": background, "channel_names": list(names)})


def test_target_spacing_is_the_median_except_on_a_thick_slice_axis():
    assert target_spacing([(1, 1, 1), (1, 1, 2), (1, 1, 3)]) == (1, 1, 2)
    thick = [(0.7, 0.7, 5.0), (0.8, 0.8, 5.0), (0.7, 0.7, 1.5), (0.7, 0.7, 5.0)] * 3
    assert target_spacing(thick)[2] == pytest.approx(np.percentile([s[2] for s in thick], 10))


def test_3d_plan_fits_the_memory_budget_and_pools_to_about_4_voxels():
    report = _report([(240, 240, 155)] * 4, [(1.0, 1.0, 1.0)] * 4, channels=2, background=0.8)
    for gib in (0.5, 4.0):
        plan, reasons = plan_dataset(report, memory_gb=gib, device="cuda")  # GPU rules: memory is the limit
        m, patch = plan.model, plan.data.patch_size
        assert m.dims == 3 and m.width == 32 and m.max_width == 320 and m.norm == "instance"
        assert training_gib(patch, m.width, m.depth, 2, m.max_width, plan.train.batch_size) <= gib * 1.05
        assert 4 <= min(patch) / 2**m.depth < 8 or m.depth == 5
        assert plan.data.normalization == "zscore_mask" and any("z-score inside" in r for r in reasons)
    small, _ = plan_dataset(report, memory_gb=0.5, device="cuda")
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
    assert plan.data.resample and plan.data.spacing == target_spacing(report.spacings)


def test_2d_keeps_the_preset_rules():
    report = _report([(512, 512)] * 3, [(1.0, 1.0)] * 3)
    plan, _ = plan_dataset(report, device="cpu")
    assert plan.model.dims == 2 and plan.data.patch_size == (256, 256) and plan.data.normalization == "zscore"
