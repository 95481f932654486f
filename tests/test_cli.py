from __future__ import annotations

import shutil

import numpy as np
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
    assert main(["predict", str(run), str(cells_dir / "images" / "cell_005.png"), "--out", str(pred), "--quiet"]) == 0
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
    assert plan["preset"] == "paper" and plan["data"]["border_weights"] and plan["model"]["padding"] == "valid"
    assert main(["predict", str(run), str(cells_dir / "images" / "cell_001.png"), "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    assert (tmp_path / "p" / "cell_001.png").exists()
