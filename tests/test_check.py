"""Tests for useg.check: every problem of a training folder listed with its file, the records kept."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.check import CaseRecord, check_dataset
from useg.dataset import discover
from useg.errors import UsegError
from useg.spec import DataSpec


def test_check_ok(tmp_path, png_pairs):
    report = check_dataset(png_pairs(tmp_path))
    assert report.ok, report.problems
    assert report.label_map.values == (0, 255) and report.num_channels == 1
    assert report.records[0] == CaseRecord(  # a constant image: all background
        "1", (12, 10), (1.0, 1.0), 1, 2, "uint8", 1.0, report.records[0].samples)
    assert [r.name for r in report.records] == ["1", "2", "10"] and len(report.records[0].samples[0]) == 16
    assert report.stats["cases"] == 3 and report.stats["labelled"] == 3
    assert report.stats["pixel share per mask value"]["255"] == pytest.approx(16 / 120, abs=1e-3)


def test_check_lists_every_problem_with_the_file(tmp_path, png_pairs, write_png):
    root = png_pairs(tmp_path, names=("a", "b", "c", "d", "e", "f", "g", "h"))
    (root / "masks" / "a.png").unlink()  # image without mask
    write_png(root / "masks" / "zz.png", np.zeros((12, 10), np.uint8))  # mask without image
    write_png(root / "masks" / "b.png", np.zeros((12, 11), np.uint8))  # size mismatch
    shutil.copy(root / "images" / "c.png", root / "images" / "c.tif")  # duplicate stem
    m = np.array(PILImage.open(root / "masks" / "d.png"))
    m[0, 0] = 7
    write_png(root / "masks" / "d.png", m)  # unknown value
    write_png(root / "images" / "e.png", np.zeros((12, 10, 3), np.uint8))  # channels differ
    (root / "masks" / "f.png").rename(root / "masks" / "f.jpg")  # JPEG mask
    (root / "images" / "g.png").write_bytes(b"\x89PNG broken")  # unreadable image
    (root / "masks" / "h.png").write_bytes(b"\x89PNG broken")  # unreadable mask
    report = check_dataset(root)
    expected = {"a.png has no mask", "zz.png has no image", "b.png is 12x11 but its image is 12x10",
                "c.tif and c.png share the name", "d.png has mask values {7}", "e.png has 3 channel(s)",
                "f.jpg is a JPEG mask", "g.png: it is not an image", "h.png: it is not an image"}
    for snippet in expected:
        assert sum(snippet in p for p in report.problems) == 1, (snippet, report.problems)
    assert len(report.problems) == len(expected), report.problems
    assert not report.ok and report.label_map.values == (0, 255)


def test_check_empty_missing_and_single_class(tmp_path, write_png):
    assert "holds no images" in check_dataset(tmp_path).problems[0]
    assert "not a folder" in check_dataset(tmp_path / "nope").problems[0]
    with pytest.raises(UsegError, match="holds no images"):
        discover(tmp_path)
    write_png(tmp_path / "noimg" / "images" / "a.png", np.zeros((5, 5), np.uint8))
    (tmp_path / "noimg" / "masks").mkdir()
    expected = (f"{tmp_path / 'noimg' / 'masks'} holds no masks; "
                "put one mask per image there, named like its image")
    assert check_dataset(tmp_path / "noimg").problems == [expected]
    shutil.rmtree(tmp_path / "noimg" / "masks")
    assert "has no masks/ folder" in check_dataset(tmp_path / "noimg").problems[0]
    root = tmp_path / "one"
    write_png(root / "images" / "a.png", np.zeros((5, 5), np.uint8))
    write_png(root / "masks" / "a.png", np.zeros((5, 5), np.uint8))
    assert any("at least two classes" in p for p in check_dataset(root).problems)


def test_check_mixed_dims_and_palettes(tmp_path, png_pairs, write_png):
    import tifffile

    root = png_pairs(tmp_path, names=("a", "b", "c"))
    tifffile.imwrite(root / "images" / "c.png.tif", np.zeros((6, 12, 10), np.uint8))  # a volume among images
    report = check_dataset(root)
    assert any("c.png.tif has 3 spatial dimensions" in p for p in report.problems)
    root = tmp_path / "pal"
    red, green = [0, 0, 0, 255, 0, 0], [0, 0, 0, 0, 255, 0]
    for name, colours in (("a", red), ("b", red), ("c", green)):
        write_png(root / "images" / f"{name}.png", np.zeros((4, 4), np.uint8))
        im = PILImage.fromarray(np.eye(4, dtype=np.uint8))
        im.putpalette(colours + [0] * 762)
        (root / "masks").mkdir(exist_ok=True)
        im.save(root / "masks" / f"{name}.png")
    report = check_dataset(root)
    assert report.label_map.mode == "palette" and report.label_map.values == (0, 1)
    assert len(report.problems) == 1 and "c.png gives palette indices [1]" in report.problems[0]


def test_explicit_mask_values(tmp_path, png_pairs):
    root = png_pairs(tmp_path, names=("a",))
    report = check_dataset(root, DataSpec(mask_values=[0, 1]))
    assert report.label_map.values == (0, 1) and "not in --labels" in report.problems[0]
