from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.cli import main

TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "2", "--iters", "3",
        "--batch-size", "2", "--precision", "fp32", "--quiet"]


def test_check_ok_and_problems(cells_dir, tmp_path, capsys):
    assert main(["check", str(cells_dir)]) == 0
    assert "no problems" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(cells_dir, bad)
    (bad / "masks" / "cell_001.png").unlink()
    arr = np.array(PILImage.open(bad / "masks" / "cell_002.png"))
    arr[0, 0] = 7
    PILImage.fromarray(arr).save(bad / "masks" / "cell_002.png")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cell_001" in err and "cell_002" in err


def test_train_refuses_bad_data_with_exit_2(tmp_path, capsys):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(tmp_path / "data") in err
    assert not (tmp_path / "run" / "plan.json").exists()


def test_train_predict_evaluate(cells_dir, tmp_path, capsys):
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(cells_dir), "--out", str(run), "--exclude", "cell_005", *TINY]) == 0
    assert (run / "model.safetensors").exists()
    assert main(["predict", str(run), str(cells_dir / "images" / "cell_005.png"),
                 "--out", str(pred), "--quiet"]) == 0
    assert (pred / "cell_005.png").exists()
    # predicting again into the same folder is refused without --overwrite
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(pred), "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["predict", str(run), str(cells_dir), "--out", str(pred), "--overwrite", "--quiet"]) == 0
    assert len(list(pred.glob("*.png"))) == 6
    assert main(["evaluate", str(pred), str(cells_dir / "masks"), "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "dice" in out.lower()
    assert (pred / "metrics.csv").exists() and (pred / "metrics.json").exists()


def test_predict_missing_input_exit_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path), str(tmp_path / "none.png"), "--out", str(tmp_path / "o")]) == 2
    assert "none.png" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "precision:" in out


def test_demo_small(tmp_path, capsys):
    from useg.demo import run_demo

    dice = run_demo(tmp_path / "demo", minutes=0.05, quiet=True, n_train=4, n_test=2, shape=(64, 64),
                    train={"epochs": 2, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32"},
                    model={"width": 4, "depth": 2})
    assert 0.0 <= dice <= 1.0
    for name in ("report.html", "run/curves.png", "pred/metrics.csv"):
        assert (tmp_path / "demo" / name).exists(), name
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 2


def test_paper_preset_trains_with_border_weights_and_predicts(cells_dir, tmp_path):
    import json

    run = tmp_path / "run"
    args = ["train", str(cells_dir), "--out", str(run), "--preset", "paper", "--width", "4", "--depth", "2",
            "--patch", "60,60", "--epochs", "1", "--iters", "2", "--precision", "fp32", "--quiet"]
    assert main(args) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["preset"] == "paper" and plan["data"]["border_weights"]
            and plan["model"]["padding"] == "valid")
    assert main(["predict", str(run), str(cells_dir / "images" / "cell_001.png"),
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert (tmp_path / "p" / "cell_001.png").exists()


@pytest.mark.parametrize("regions", [None, "WT=2,4;ET=4"])
def test_3d_case_folders_train_predict_evaluate_regions(tmp_path, rng, regions):
    """The 3D path end to end from the CLI: case folders in, NIfTI masks in the input's geometry out;
    with --regions the network learns nested regions (one sigmoid each) and writes mask values back."""
    import nibabel as nib

    affine = np.array([[-1.0, 0, 0, 5], [0, 1.0, 0, -3], [0, 0, 2.0, 1], [0, 0, 0, 1]])
    for k in range(3):
        lab = np.zeros((16, 16, 12), np.float32)
        lab[4:11, 3:10, 3:9] = 2
        lab[6:9, 5:8, 5:7] = 4
        img = (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
        d = tmp_path / "data" / f"case{k}"
        d.mkdir(parents=True)
        for name, arr in (("T1_x", img), ("T2_x", -img), ("seg", lab)):
            nib.save(nib.Nifti1Image(arr, affine), str(d / f"{name}.nii.gz"))
    data, run = tmp_path / "data", tmp_path / "run"
    layout = ["--channels", "T1,T2", "--label", "seg"]
    assert main(["plan", str(data), *layout, "--device", "cpu"]) == 0
    assert main(["train", str(data), *layout, "--out", str(run), "--width", "4", "--depth", "2",
                 "--patch", "16,16,8", "--epochs", "1", "--iters", "2", "--batch-size", "2",
                 "--precision", "fp32", "--workers", "0",
                 "--quiet", "--device", "cpu", *(["--regions", regions] if regions else [])]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["model"]["num_classes"] == (2 if regions else 3) and plan["model"]["dims"] == 3
    assert plan["data"]["regions"] == ([[1, 2], [2]] if regions else [])  # values 2,4 -> classes 1,2
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(data / "case0"), "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    pred = nib.load(str(out / "case0.nii.gz"))
    np.testing.assert_allclose(pred.affine, affine)  # overlays its input
    assert pred.shape == (16, 16, 12) and set(np.unique(np.asarray(pred.dataobj))) <= {0, 2, 4}
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "case0.nii.gz").write_bytes((data / "case0" / "seg.nii.gz").read_bytes())
    assert main(["evaluate", str(out), str(truth), "--regions", "WT=2,4;ET=4", "--quiet"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]["regions"]
    assert set(summary) == {"WT", "ET"} and 0 <= summary["WT"]["dice"] <= 1


def test_export_onnx_and_predict_with_onnxruntime_and_instances(tmp_path, cells_dir):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), "--width", "4", "--depth", "2",
                 "--patch", "32,32", "--epochs", "1", "--iters", "2", "--precision", "fp32",
                 "--workers", "0", "--quiet",
                 "--device", "cpu"]) == 0
    assert main(["export", str(run), "--quiet"]) == 0
    assert (run / "model.onnx").exists() and (run / "model.onnx.json").exists()
    image = cells_dir / "images" / "cell_000.png"
    a, b = tmp_path / "torch", tmp_path / "ort"
    assert main(["predict", str(run), str(image), "--out", str(a), "--quiet", "--device", "cpu"]) == 0
    assert main(["predict", str(run), str(image), "--out", str(b), "--backend", "onnxruntime",
                 "--quiet"]) == 0
    from useg.io import read_mask

    agree = (read_mask(a / "cell_000.png")[0] == read_mask(b / "cell_000.png")[0]).mean()
    assert agree > 0.99  # the torch path may run in bf16; onnxruntime in fp32
    c = tmp_path / "inst"
    assert main(["predict", str(run), str(image), "--out", str(c), "--instances", "--quiet",
                 "--device", "cpu"]) == 0
    inst = read_mask(c / "cell_000.png")[0]
    assert inst.max() == len(np.unique(inst)) - 1  # object ids 0..N without gaps
    d = tmp_path / "split"
    assert main(["predict", str(run), str(image), "--out", str(d), "--instances", "--watershed", "--quiet",
                 "--device", "cpu"]) == 0
    assert read_mask(d / "cell_000.png")[0].max() >= inst.max()  # a watershed only ever splits objects
    assert main(["evaluate", str(a), str(cells_dir), "--instances", "--quiet"]) == 0
    assert "instances" in json.loads((a / "metrics.json").read_text())["summary"]
