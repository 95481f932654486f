"""Post-processing at the run level: chosen from predictions on disk, recorded, applied by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from useg.cli import main
from useg.io import read_mask
from useg.postprocess import Postprocessing, apply_postprocessing
from useg.postprocess_run import RECORD, determine_postprocessing, format_decision, read_postprocessing
from useg.predict import Segmenter

SHAPE = (48, 52)


def _disc(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr.astype(np.uint8)).save(path)


def _write_cases(root, n=3, spurious=True):
    """images/ (a bright disc, and a small bright blob far from it), masks/ (the disc, 0/255) and
    pred/ (a slightly larger disc, with the blob when ``spurious``), as PNG."""
    for k in range(n):
        disc = _disc(SHAPE, (20 + 2 * k, 26), 9)
        blob = np.zeros(SHAPE, bool)
        blob[40:43, 3:6] = True
        _png(root / "images" / f"c{k}.png", np.where(disc | blob, 200, 30))
        _png(root / "masks" / f"c{k}.png", disc * 255)
        _png(root / "pred" / f"c{k}.png", (_disc(SHAPE, (20 + 2 * k, 26), 10) | (blob & spurious)) * 255)
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cells_dir, one_thread):
    """A tiny trained run (width 4, one epoch of one step) on the cells, masks 0/255."""
    from useg.pipeline import train_folder
    from useg.spec import Overrides

    run = tmp_path_factory.mktemp("pp") / "run"
    train_folder(cells_dir, run, quiet=True, device="cpu", overrides=Overrides(
        model={"width": 4, "depth": 2}, patch_size=(32, 32),
        train={"epochs": 1, "iters_per_epoch": 1, "batch_size": 1, "precision": "fp32", "workers": 0}))
    return run


class _Threshold:
    """A backend that segments what is bright: class 1 where the normalised image is above 0."""

    name, device = "threshold", torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        fg = (batch[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], 1)


def test_the_chosen_step_removes_the_blob_and_predict_applies_it(trained_run, tmp_path):
    data = _write_cases(tmp_path / "data")
    pp, record = determine_postprocessing(trained_run, data / "pred", data)
    assert pp == Postprocessing(largest_foreground=True)
    saved = json.loads((trained_run / RECORD).read_text())
    assert saved == record and saved["n_cases"] == 3 and saved["cases"] == ["c0", "c1", "c2"]
    assert saved["min_size_candidates"] == {"1": int(_disc(SHAPE, (20, 26), 9).sum())}  # the true discs' size
    steps = saved["figures"]["steps"]
    assert steps[0]["kept"] and steps[0]["after"]["foreground"] > steps[0]["before"]["foreground"]
    assert "largest foreground component" in format_decision(saved)
    assert read_postprocessing(trained_run, 2) == pp

    seg = Segmenter.load(trained_run, device="cpu", precision="fp32")
    assert seg.postprocessing == pp
    assert Segmenter.load(trained_run, device="cpu", postprocessing=False).postprocessing is None
    stub = Segmenter(seg.plan, _Threshold(), seg.postprocessing)
    raw = Segmenter(seg.plan, _Threshold())
    image = np.asarray(PILImage.open(data / "images" / "c0.png"), np.float32)
    assert raw.predict(image)[41, 4] == 1  # the network sees the blob ...
    assert stub.predict(image)[41, 4] == 0  # ... and the post-processing removes it
    assert np.array_equal(stub.predict(image), apply_postprocessing(raw.predict(image), pp))
    (written,) = stub.predict_files([data / "images" / "c1.png"], tmp_path / "out")
    mask = read_mask(written)[0]
    assert set(np.unique(mask)) == {0, 255} and mask[41, 4] == 0 and mask[22, 26] == 255
    (probs,) = stub.predict_files([data / "images" / "c1.png"], tmp_path / "probs", probabilities="float16")
    import tifffile

    assert tifffile.imread(probs)[1, 41, 4] == 1.0  # probabilities are written as predicted


def test_a_step_that_hurts_is_recorded_and_not_applied(trained_run, tmp_path):
    data = tmp_path / "data"
    for k in range(2):  # two true objects per case, predicted exactly: keeping one would hurt
        truth = _disc(SHAPE, (12, 12), 6) | _disc(SHAPE, (35, 38), 4 + k)
        _png(data / "masks" / f"c{k}.png", truth * 255)
        _png(data / "pred" / f"c{k}.png", truth * 255)
    pp, record = determine_postprocessing(trained_run, data / "pred", data / "masks")
    assert pp.is_identity and record["description"] == ["none"]
    assert not any(s["kept"] for s in record["figures"]["steps"])
    assert Segmenter.load(trained_run, device="cpu").postprocessing == Postprocessing()


def test_cli_postprocess_info_and_predict(trained_run, tmp_path, capsys):
    data = _write_cases(tmp_path / "data")
    run = str(trained_run)
    assert main(["postprocess", run, "--predictions", str(data / "pred"), "--truth", str(data)]) == 0
    out = capsys.readouterr().out
    assert "largest foreground component" in out and "yes" in out and str(trained_run / RECORD) in out
    assert main(["info", run]) == 0
    assert "keep the largest foreground component" in capsys.readouterr().out
    common = [run, str(data / "images"), "--device", "cpu", "--quiet"]
    assert main(["predict", *common, "--out", str(tmp_path / "pp")]) == 0
    assert main(["predict", *common, "--out", str(tmp_path / "raw"), "--no-postprocessing"]) == 0
    pp = read_postprocessing(trained_run)
    for k in range(3):
        with_pp = read_mask(tmp_path / "pp" / f"c{k}.png")[0] // 255
        without = read_mask(tmp_path / "raw" / f"c{k}.png")[0] // 255
        assert np.array_equal(with_pp, apply_postprocessing(without.astype(np.int64), pp))


@pytest.mark.parametrize("dims", [2, 3])
def test_three_classes_in_png_and_nifti(tmp_path, dims):
    """A run with three classes (NIfTI volumes, PNG images), planned not trained: per-class steps."""
    import nibabel as nib

    from useg.labels import LabelMap
    from useg.planner import make_plan

    shape = (20, 22) if dims == 2 else (12, 14, 16)
    (tmp_path / "run").mkdir()
    make_plan(LabelMap((0, 1, 2), "grey"), 1, [shape]).save(tmp_path / "run" / "plan.json")
    for k in range(2):
        truth = np.zeros(shape, np.uint8)
        truth[(slice(2, 7),) * dims] = 1
        truth[(slice(9, 12),) * dims] = 2
        pred = truth.copy()
        pred[(slice(0, 1),) * dims] = 2  # a stray voxel of class 2
        for folder, arr in (("truth", truth), ("pred", pred)):
            (tmp_path / folder).mkdir(exist_ok=True)
            if dims == 3:
                nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / folder / f"v{k}.nii.gz"))
            else:
                _png(tmp_path / folder / f"v{k}.png", arr)
    pp, record = determine_postprocessing(tmp_path / "run", tmp_path / "pred", tmp_path / "truth")
    assert pp == Postprocessing(largest_classes=(2,))  # the foreground step would keep class 1 only
    assert record["min_size_candidates"] == {"1": 5**dims, "2": 3**dims}
    assert record["class_values"] == [0, 1, 2]
    assert record["figures"]["after"]["classes"]["2"] == 1.0


def test_pixels_outside_the_roi_are_not_scored(tmp_path):
    from useg.labels import LabelMap
    from useg.planner import make_plan

    data = _write_cases(tmp_path / "data", n=2)
    (tmp_path / "run").mkdir()
    make_plan(LabelMap((0, 255), "grey"), 1, [SHAPE]).save(tmp_path / "run" / "plan.json")
    for k in range(2):
        inside = np.ones(SHAPE, bool)
        inside[36:, :10] = False  # the blob lies outside
        _png(data / "roi" / f"c{k}.png", inside * 255)
    pp, _ = determine_postprocessing(tmp_path / "run", data / "pred", data / "masks")
    assert pp.largest_foreground  # scored everywhere, the blob is a false positive
    pp, record = determine_postprocessing(tmp_path / "run", data / "pred", data / "masks", roi=data / "roi")
    assert pp.is_identity  # outside the ROI it costs nothing, so removing it gains nothing
    assert record["figures"]["steps"][0]["after"] == record["figures"]["steps"][0]["before"]
