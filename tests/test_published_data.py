"""A dataset as public 2D releases publish it, through the CLI: RGB LZW TIFF images, GIF masks,
names that share only their number, a field-of-view mask per image.

check -> train (a few steps) -> predict --roi (masks and probabilities) -> evaluate --roi
--probabilities, with the pairing, the ROI and the AUC checked against scikit-learn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from useg.cli import main
from useg.synthetic import make_cells

sklearn_metrics = pytest.importorskip("sklearn.metrics")

N, SHAPE = 6, (48, 56)
TINY = ["--epochs", "1", "--iters", "2", "--batch-size", "2", "--patch", "32,32", "--width", "4",
        "--depth", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def _fov(shape=SHAPE) -> np.ndarray:
    """A disc, the field of view of a fundus camera: outside it nothing is labelled."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (0.45 * min(shape)) ** 2


def _published(root):
    """``images/07_scan.tif`` (RGB, LZW), ``masks/07_truth.gif`` (palette 0/1), ``fov/07_fov.gif``."""
    rng = np.random.default_rng(5)
    for d in ("images", "masks", "fov"):
        (root / d).mkdir(parents=True)
    for k in range(1, N + 1):
        grey, inst = make_cells(SHAPE, rng=rng)
        rgb = np.stack([grey * 0.9, grey, grey * 0.7], axis=-1)
        rgb = np.clip(rgb * 255, 0, 255).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"{k:02d}_scan.tif", rgb, photometric="rgb", compression="lzw")
        mask = PILImage.fromarray((inst > 0).astype(np.uint8), mode="L").convert("P")
        mask.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
        mask.save(root / "masks" / f"{k}_truth.gif")  # no leading zero: only the number matches
        PILImage.fromarray(_fov().astype(np.uint8) * 255).save(root / "fov" / f"{k:02d}_fov.gif")
    assert tifffile.TiffFile(root / "images" / "01_scan.tif").pages[0].compression == 5  # LZW
    return root


def test_published_rgb_tiff_gif_dataset_end_to_end(tmp_path, capsys):
    data = _published(tmp_path / "data")
    fov = str(data / "fov")

    assert main(["check", str(data), "--roi", fov]) == 0
    out = capsys.readouterr().out
    assert f"{N} cases, 3 channel(s)" in out
    assert "paired by number" in out

    run = tmp_path / "run"
    held_out = "05_scan,06_scan"
    assert main(["train", str(data), "--out", str(run), "--roi", fov, "--exclude", held_out, *TINY]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["data"]["pairing"] == "number" and plan["data"]["roi"] is True
    assert plan["model"]["in_channels"] == 3

    images = [str(p) for p in sorted((data / "images").iterdir())]
    masks, probs = tmp_path / "masks", tmp_path / "probs"
    assert main(["predict", str(run), *images, "--out", str(masks), "--roi", fov, "--quiet"]) == 0
    assert main(["predict", str(run), *images, "--out", str(probs), "--roi", fov, "--probabilities", "uint8",
                 "--quiet"]) == 0
    capsys.readouterr()
    # written under the image's own name and format, background outside the ROI
    assert sorted(p.name for p in masks.iterdir()) == [f"{k:02d}_scan.tif" for k in range(1, N + 1)]
    outside = ~_fov()
    for p in masks.iterdir():
        assert not tifffile.imread(p)[outside].any()

    assert main(["evaluate", str(masks), str(data), "--run", str(run), "--roi", fov, "--quiet"]) == 0
    inside_only = json.loads((masks / "metrics.json").read_text())["summary"]
    _spoil_outside(masks)  # predictions outside the ROI must not count
    assert main(["evaluate", str(masks), str(data), "--run", str(run), "--roi", fov, "--quiet"]) == 0
    assert json.loads((masks / "metrics.json").read_text())["summary"] == inside_only
    assert main(["evaluate", str(masks), str(data), "--run", str(run), "--quiet"]) == 0  # without the ROI
    assert json.loads((masks / "metrics.json").read_text())["summary"] != inside_only  # they would

    assert main(["evaluate", str(probs), str(data), "--run", str(run), "--roi", fov, "--probabilities",
                 "--quiet"]) == 0
    (entry,) = json.loads((probs / "metrics.json").read_text())["summary"]["probabilities"]
    scores, truth = _pooled_inside(probs, data)
    assert entry["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(truth, scores), abs=1e-12)
    assert entry["ap"] == pytest.approx(sklearn_metrics.average_precision_score(truth, scores), abs=1e-12)


def _spoil_outside(folder):
    """Turn every predicted pixel outside the ROI into foreground (stored value 1, as the GIF masks)."""
    outside = ~_fov()
    for p in folder.glob("*_scan.tif"):
        with tifffile.TiffFile(p) as f:
            arr, colormap = f.asarray(), f.pages[0].colormap
        arr[outside] = 1
        tifffile.imwrite(p, arr, colormap=colormap, photometric="palette" if colormap is not None else None)


def _pooled_inside(folder, data):
    """Foreground scores (uint8 codes) and truth of every pixel inside the ROI, over all cases."""
    inside = _fov()
    scores, truth = [], []
    for p in sorted(folder.glob("*_probs.tif")):
        number = int(p.name.split("_")[0])
        t = np.asarray(PILImage.open(data / "masks" / f"{number}_truth.gif")) > 0
        scores.append(tifffile.imread(p)[1][inside])
        truth.append(t[inside])
    return np.concatenate(scores), np.concatenate(truth)
