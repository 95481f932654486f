"""The dataset fingerprint: computed from the check's per-case records, never from the files again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from useg.check import CaseRecord, CheckReport
from useg.dataset import Case
from useg.fingerprint import fingerprint, pooled_intensities
from useg.labels import LabelMap


def _report(shapes, spacings, channels=1, background=0.0, sampled=(0,)):
    rng = np.random.default_rng(0)
    records = tuple(CaseRecord(f"c{i}", shape, spacing, channels, len(shape), "float32", background,
                               tuple(rng.normal(40, 10, 100 * (i + 1)) for _ in range(channels))
                               if i in sampled else None)
                    for i, (shape, spacing) in enumerate(zip(shapes, spacings, strict=True)))
    cases = [Case(r.name, Path(f"{r.name}.nii.gz")) for r in records]
    return CheckReport(cases=cases, problems=[], label_map=LabelMap((0, 1, 2)), num_channels=channels,
                       stats={"pixel share per mask value": {"0": 0.9, "1": 0.07, "2": 0.03}},
                       info={"layout": "folders", "channel_names": ["T1", "T2"][:channels]}, records=records)


@pytest.mark.parametrize("shapes,spacings", [
    ([(10, 20, 30), (12, 22, 32)], [(1.0, 1.0, 2.0), (1.0, 1.0, 3.0)]),
    ([(17, 9), (19, 11), (21, 13)], [(0.5, 0.5), (0.5, 0.7), (0.5, 0.9)]),
])
def test_fingerprint_comes_from_the_per_case_records(shapes, spacings):
    report = _report(shapes, spacings, channels=2, background=0.5)
    fp = fingerprint(report)
    assert fp["dims"] == len(shapes[0]) and fp["cases"] == len(shapes)
    assert fp["median_shape"] == [int(v) for v in np.median(shapes, axis=0)]
    assert fp["spacing_range"][-1] == [spacings[0][-1], spacings[-1][-1]]
    assert fp["channels"] == 2 and fp["background_share"] == 0.5 and len(fp["intensity"]) == 2
    assert fp["layout"] == "folders" and fp["channel_names"] == ["T1", "T2"]
    assert fp["class_share"] == {"0": 0.9, "1": 0.07, "2": 0.03}
    lo, mid, hi = (fp["intensity"][0][k] for k in ("p00_5", "p50", "p99_5"))
    assert lo < mid < hi and abs(fp["intensity"][0]["mean"] - 40) < 3


def test_pooled_intensities_concatenate_the_sampled_cases_only():
    report = _report([(8, 8)] * 3, [(1.0, 1.0)] * 3, channels=2, sampled=(0, 2))
    assert [len(v) for v in pooled_intensities(report.records)] == [100 + 300, 100 + 300]
    assert fingerprint(report.without({"c0", "c2"}))["intensity"] == []  # only unsampled cases left
