"""Tests for useg.dataset: finding the cases of a folder, natural order, folders to predict."""

from __future__ import annotations

import numpy as np
import pytest

from useg.check import check_dataset
from useg.dataset import discover, format_axes, natural_key
from useg.spec import DataSpec


def test_pairing_natural_order_suffixes_and_missing_partners(tmp_path, png_pairs, write_png):
    root = png_pairs(tmp_path, names=("2", "10", "1", "img3"))
    (root / "masks" / "10.png").rename(root / "masks" / "10_mask.png")
    (root / "masks" / "img3.png").rename(root / "masks" / "img3_label.png")
    (root / "masks" / "2.png").unlink()
    write_png(root / "masks" / "7.png", np.zeros((4, 4), np.uint8))
    (root / "images" / "notes.txt").write_text("not an image")
    cases = discover(root)
    assert [c.name for c in cases] == ["1", "2", "10", "img3"]
    assert cases[2].mask.name == "10_mask.png" and cases[3].mask.name == "img3_label.png"
    assert cases[1].mask is None and cases[0].image.name == "1.png"
    problems = check_dataset(root).problems
    assert any("2.png has no mask" in p for p in problems)
    assert any("7.png has no image" in p for p in problems)
    assert sorted(["a10", "a2", "a1", "B3"], key=natural_key) == ["a1", "a2", "a10", "B3"]


def test_folder_without_images_subfolder_is_for_prediction(tmp_path, write_png):
    write_png(tmp_path / "x10.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "x9.tif", np.zeros((4, 4), np.uint8))
    cases = discover(tmp_path)
    assert [(c.name, c.mask) for c in cases] == [("x9", None), ("x10", None)]


def test_data_spec_and_format_axes():
    spec = DataSpec(mask_values=[0, 255], channel_names=["Flair", "T1c"])
    assert spec == DataSpec((0, 255), ("Flair", "T1c")) and spec.label_name is None
    assert DataSpec(channel_names=[]).channel_names is None  # no prefixes: read the folder as found
    with pytest.raises(ValueError, match="sequence"):
        DataSpec(channel_names="Flair")
    assert format_axes((240, 240, 155)) == "240x240x155" and format_axes((0.8, 1.0, 2.5)) == "0.8x1x2.5"
