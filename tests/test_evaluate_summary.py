"""Tests for useg.evaluate_summary: summaries, metric files and tables."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from useg.evaluate_summary import format_table, summarize, write_metrics
from useg.metrics import evaluate_case

PRED = np.array([[0, 1, 1], [2, 2, 0]])
TRUTH = np.array([[0, 1, 0], [2, 1, 1]])


def _two_cases():
    rows = evaluate_case(PRED, TRUTH, 3, case="a")
    rows += evaluate_case(TRUTH, TRUTH, 3, case="b")
    return rows


def test_summarize_means_over_cases_and_foreground():
    s = summarize(_two_cases())
    assert s["n_cases"] == 2
    by = {e["class"]: e for e in s["classes"]}
    assert by[1]["dice"] == pytest.approx((2 / 5 + 1) / 2)
    assert by[2]["recall"] == pytest.approx((1 + 1) / 2)
    assert by[0]["n_cases"] == 2
    fg_dice = (by[1]["dice"] + by[2]["dice"]) / 2
    assert s["foreground"]["dice"] == pytest.approx(fg_dice)
    assert s["foreground"]["dice"] != pytest.approx((by[0]["dice"] + by[1]["dice"] + by[2]["dice"]) / 3)
    assert s["pixel_error"] == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_single_class_uses_class_zero():
    s = summarize(evaluate_case(np.zeros((3, 3), int), np.zeros((3, 3), int), 1))
    assert s["foreground"]["dice"] == 1.0


def test_write_metrics_csv_json_atomic(tmp_path):
    rows = _two_cases()
    out = tmp_path / "new" / "dir"
    csv_path, json_path = write_metrics(rows, out)
    assert (csv_path.name, json_path.name) == ("metrics.csv", "metrics.json")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp left
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    assert list(table[0]) == ["case", "class", "name", "dice", "iou", "precision", "recall",
                              "tp", "fp", "fn", "pixel_error"]
    assert table[1]["case"] == "a" and int(table[1]["fn"]) == 2
    assert float(table[1]["dice"]) == pytest.approx(0.4)
    data = json.loads(json_path.read_text())
    assert data["cases"] == json.loads(json.dumps(rows))
    assert data["summary"]["foreground"]["dice"] == pytest.approx(summarize(rows)["foreground"]["dice"])
    # rewriting replaces the files in place, still without leftovers
    write_metrics(rows[:3], out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]
    assert json.loads(json_path.read_text())["summary"]["n_cases"] == 1


def test_write_metrics_failure_leaves_nothing(tmp_path):
    rows = _two_cases()
    rows[0]["note"] = object()  # the CSV ignores extra keys, JSON cannot encode this one
    with pytest.raises(TypeError):
        write_metrics(rows, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither file, nor a temp file


def test_format_table():
    text = format_table(summarize(_two_cases()))
    lines = text.splitlines()
    assert "Dice" in lines[0] and "precision" in lines[0]
    assert any(line.startswith("class 1") and "0.7000" in line for line in lines)
    assert any(line.startswith("foreground mean") for line in lines)
    assert "pixel error 0.2500" in lines[-1] and "2 case(s)" in lines[-1]


def test_metrics_json_is_strict_json_with_null_for_undefined_metrics(tmp_path):
    import json

    import numpy as np

    from useg.evaluate_summary import write_metrics

    rows = [{"case": "a", "class": 1, "name": "fg", "dice": float("nan"), "iou": np.float64("inf"),
             "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0, "pixel_error": 0.0}]
    _, json_path = write_metrics(rows, tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    doc = json.loads(json_path.read_text(), parse_constant=refuse)  # NaN / Infinity would raise here
    assert doc["cases"][0]["dice"] is None and doc["cases"][0]["iou"] is None
    assert doc["summary"]["classes"][0]["precision"] == 1.0
