from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from useg.report import plot_curves, save_overlay, write_report


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, np.asarray(im.convert("RGB"))


def _no_temp_files(folder):
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_plot_curves_full_records(tmp_path):
    records = [{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.2 / (i + 1), "val_dice": 0.5 + i / 20,
                "lr": 1e-3 * (1 - i / 5), "seconds": 2.0} for i in range(5)]
    (w, h), _ = _png(plot_curves(records, tmp_path / "sub" / "curves.png"))
    assert w > 500 and 200 < h < w
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("records", [
    [],
    [{"train_loss": 0.5}, {"train_loss": 0.4}],  # no epoch, no validation
    [{"epoch": 0, "train_loss": -0.2, "val_dice": float("nan")}, {"epoch": 1, "val_loss": None}],
], ids=["empty", "train-only", "odd-values"])
def test_plot_curves_tolerates_missing_and_odd_values(tmp_path, records):
    path = plot_curves(records, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert _png(path)[0][0] > 500


@pytest.mark.parametrize("image_shape", [(21, 33), (1, 21, 33), (2, 21, 33), (3, 21, 33)])
def test_save_overlay_shapes(tmp_path, image_shape):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, image_shape).astype(np.float32)
    pred = rng.integers(0, 3, (21, 33))
    (w2, h2), _ = _png(save_overlay(image, pred, None, tmp_path / "two.png"))
    (w3, h3), _ = _png(save_overlay(image, pred, pred, tmp_path / "three.png", title="<case>"))
    assert w3 > w2 > h2 > 100  # panels side by side; the truth panel adds width


def test_save_overlay_paints_the_prediction(tmp_path):
    image = np.full((32, 32), 0.5, np.float32)
    _, none = _png(save_overlay(image, np.zeros((32, 32), int), None, tmp_path / "none.png"))
    _, some = _png(save_overlay(image, np.ones((32, 32), int), None, tmp_path / "some.png"))
    assert none.shape == some.shape
    # a flat grey image stays grey; class 1 tints it, so some pixels get unequal R, G, B
    spread = lambda a: (a.max(-1).astype(int) - a.min(-1)).max()  # noqa: E731
    assert spread(none) < 10 < spread(some)


def test_save_overlay_refuses_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="pred"):
        save_overlay(np.zeros((10, 12)), np.zeros((12, 10), int), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="truth"):
        save_overlay(np.zeros((10, 12)), np.zeros((10, 12), int), np.zeros((10, 11), int), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_write_report_links_relative_and_escapes(tmp_path):
    curves = plot_curves([{"epoch": 0, "train_loss": 1.0}], tmp_path / "run" / "curves.png")
    overlay = save_overlay(np.zeros((8, 8)), np.zeros((8, 8), int), None, tmp_path / "overlays" / "a b.png")
    page = write_report(tmp_path, "run <b>1</b>", "dice <0.9> & more",
                        [curves, overlay, tmp_path / "gone.png"], {"epochs<": 5, "note": "x & y"})
    assert page == tmp_path / "report.html"
    text = page.read_text(encoding="utf-8")
    assert 'src="run/curves.png"' in text and 'src="overlays/a%20b.png"' in text
    assert str(tmp_path) not in text  # nothing absolute
    assert "gone" not in text
    assert "&lt;b&gt;1&lt;/b&gt;" in text and "<b>1</b>" not in text
    assert "<pre>dice &lt;0.9&gt; &amp; more</pre>" in text
    assert "<th>epochs&lt;</th><td>5</td>" in text and "x &amp; y" in text
    _no_temp_files(tmp_path)


def test_write_report_overwrites_and_handles_no_extra(tmp_path):
    write_report(tmp_path, "first", "a", [])
    page = write_report(tmp_path, "second", "b", [], None)
    text = page.read_text(encoding="utf-8")
    assert "second" in text and "first" not in text and "<table>" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
