"""Tests for useg.evaluate: regions and folder evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.check import check_dataset
from useg.errors import UsegError
from useg.evaluate import evaluate_folders, parse_regions
from useg.evaluate_summary import format_table

# --- regions -----------------------------------------------------------------------------------


def test_parse_regions():
    assert parse_regions(" WT=1,2 ; ET=2 ;") == {"WT": (1, 2), "ET": (2,)}
    assert parse_regions("brats") == {"WT": (1, 2, 3, 4), "TC": (1, 3, 4), "ET": (4,)}
    assert parse_regions("") is None and parse_regions(None) is None
    for bad in ("WT", "WT=1;ET=a", "WT=1=2"):
        with pytest.raises(ValueError, match="cannot read regions"):
            parse_regions(bad)


# --- folders -----------------------------------------------------------------------------------


def _png(path, arr, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = PILImage.fromarray(arr)
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    im.save(path)


def _folder(root, n=4, shape=(12, 10)):
    """A data folder of n cases with 0/255 masks, and a prediction folder (masks shifted by one row)."""
    for k in range(n):
        m = np.zeros(shape, np.uint8)
        m[2:6, k + 1:k + 5] = 255
        _png(root / "data" / "images" / f"c{k}.png", np.full(shape, 100, np.uint8))
        _png(root / "data" / "masks" / f"c{k}.png", m)
        _png(root / "pred" / f"c{k}.png", np.roll(m, 1, axis=0))
    return root / "pred", root / "data"


def test_evaluate_folders_writes_rows_summary_regions_instances(tmp_path):
    pred, data = _folder(tmp_path)
    summary, (csv_path, json_path) = evaluate_folders(pred, data, regions="fg=255", instances=True)
    assert (csv_path, json_path) == (pred / "metrics.csv", pred / "metrics.json")
    assert summary["n_cases"] == 4 and [e["name"] for e in summary["classes"]] == ["value 0", "value 255"]
    assert summary["foreground"]["dice"] == pytest.approx(0.75)  # 12 of 16 pixels overlap in each case
    assert summary["regions"]["fg"]["dice"] == pytest.approx(0.75) and summary["regions"]["fg"]["hd95"] == 1.0
    assert summary["instances"]["object_f1"] == 1.0  # IoU 12/20 > 0.5: every object found
    data_json = json.loads(json_path.read_text())
    assert len(data_json["cases"]) == 8 and len(data_json["regions"]) == len(data_json["instances"]) == 4
    assert data_json["summary"] == json.loads(json.dumps(summary))
    assert "region fg: Dice 0.7500" in format_table(summary)


def test_evaluate_folders_bad_folders(tmp_path):
    pred, data = _folder(tmp_path)
    with pytest.raises(UsegError, match="not a folder"):
        evaluate_folders(tmp_path / "nothing", data)
    with pytest.raises(UsegError, match="holds no masks"):
        evaluate_folders(data / "images" / "..", tmp_path)  # a folder without masks of its own
    _png(pred / "extra.png", np.zeros((12, 10), np.uint8))
    with pytest.raises(UsegError, match="no true mask .* for extra.png"):
        evaluate_folders(pred, data)
    (pred / "extra.png").unlink()
    with pytest.raises(UsegError, match=r"regions name mask values \[7\]"):
        evaluate_folders(pred, data, regions="x=7")
    with pytest.raises(UsegError, match="cannot read regions"):
        evaluate_folders(pred, data, regions="x=")
    _png(pred / "c0.png", np.zeros((11, 10), np.uint8))
    with pytest.raises(UsegError, match="predict the matching images"):
        evaluate_folders(pred, data)


def _grey_and_palette(root):
    """One mask saved as a palette PNG among grey ones, indices 0/255 like the grey values."""
    m = np.array(PILImage.open(root / "masks" / "c3.png"))
    _png(root / "masks" / "c3.png", m, palette=[0, 0, 0] * 255 + [255, 255, 255])
    assert PILImage.open(root / "masks" / "c3.png").mode == "P"


def _antialiased(root):
    """One mask with the soft edge of a resized mask: values no label encoding explains."""
    m = np.array(PILImage.open(root / "masks" / "c2.png"))
    m[6, 1:8] = np.arange(20, 160, 20)
    _png(root / "masks" / "c2.png", m)


def _one_class(root):
    for p in (root / "masks").iterdir():
        _png(p, np.zeros((12, 10), np.uint8))


@pytest.mark.parametrize("spoil", [_grey_and_palette, _antialiased])
def test_evaluate_folders_refuses_what_the_check_flags(tmp_path, spoil):
    pred, data = _folder(tmp_path)
    spoil(data)
    problems = check_dataset(data).problems
    assert problems
    with pytest.raises(UsegError) as err:
        evaluate_folders(pred, data)
    for p in problems:  # the same sentences, each naming the file and the fix
        assert p in str(err.value)
    assert not (pred / "metrics.json").exists()


def test_evaluate_folders_scores_an_all_background_truth_set(tmp_path):
    pred, data = _folder(tmp_path)
    _one_class(data)  # training would refuse it (one class), but it is a fair test set
    assert any("holds only the value 0" in p for p in check_dataset(data).problems)
    for p in pred.iterdir():
        if p.suffix == ".png":
            _png(p, np.zeros((12, 10), np.uint8))
    summary, _ = evaluate_folders(pred, data)
    assert summary["pixel_error"] == 0.0


def test_evaluate_folders_lists_at_most_ten_problems(tmp_path):
    pred, data = _folder(tmp_path, n=14, shape=(12, 20))
    with pytest.raises(UsegError) as err:  # every 0/255 mask has a value outside --labels
        evaluate_folders(pred, data, labels=[0, 1])
    message = str(err.value)
    assert "(14 problem(s))" in message and "... and 4 more" in message
    assert "c0.png has mask values {255} that are not in --labels {0, 1}" in message


def test_evaluate_folders_with_labels_or_run_skips_inference(tmp_path):
    pred, data = _folder(tmp_path)
    _one_class(data)  # only 0 in the truth: explicit values say what 255 means
    summary, _ = evaluate_folders(pred, data, labels=[0, 255])
    assert summary["classes"][1]["recall"] == 0.0  # 255 is predicted where the truth has none
    assert summary["classes"][1]["precision"] == 0.0
