"""k-fold cross-validation: folds on one plan, splits.json, out-of-fold cv.json, fold ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest

import useg.train
from useg.backends import exported_backend
from useg.crossval import check_splits, kfold_splits
from useg.errors import UsegError
from useg.io import read_image
from useg.pipeline import train_folder
from useg.predict import Segmenter
from useg.spec import Overrides
from useg.synthetic import write_cells_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(epochs=1):
    return Overrides(model={"width": 4, "depth": 2}, patch_size=(32, 32), train={
        "epochs": epochs, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32", "workers": 0})


KW = dict(quiet=True, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cells_dataset(tmp_path_factory.mktemp("cv_data"), n_images=5, shape=(48, 40), seed=3)


@pytest.fixture(scope="module")
def cv_run(data, tmp_path_factory):
    """A complete 2-fold run of the five cases (one of them excluded as a test case)."""
    run = tmp_path_factory.mktemp("cv") / "run"
    result = train_folder(data, run, overrides=_overrides(), folds=2, exclude="cell_004", **KW)
    return run, result


@pytest.mark.parametrize("n, k", [(2, 2), (5, 3), (7, 7), (10, 5)])
def test_kfold_splits_hold_every_case_out_once(n, k):
    names = [f"c{i}" for i in range(n)]
    splits = kfold_splits(names, k, seed=1)
    assert len(splits) == k and check_splits(splits, names, "x") == splits
    vals = [name for f in splits for name in f["val"]]
    assert sorted(vals) == sorted(names)
    assert all(sorted(f["train"] + f["val"]) == sorted(names) for f in splits)
    assert max(len(f["val"]) for f in splits) - min(len(f["val"]) for f in splits) <= 1
    assert kfold_splits(names, k, seed=1) == splits
    if n > k:
        assert kfold_splits(names, k, seed=2) != splits
    with pytest.raises(UsegError, match="folds"):
        kfold_splits(names, n + 1)


def test_folds_splits_and_cv_json(cv_run, data):
    run, result = cv_run
    splits = json.loads((run / "splits.json").read_text())
    names = [f"cell_00{i}" for i in range(4)]
    assert check_splits(splits, names, run / "splits.json") == splits  # cell_004 excluded from every fold
    assert result.folds == 2 and sorted(result.trained) == [0, 1] and result.summary is not None
    plan = (run / "plan.json").read_text()
    image = read_image(data / "images" / "cell_004.png").array
    for k in range(2):
        fold = run / f"fold_{k}"
        assert (fold / "plan.json").read_text() == plan  # one plan for every fold
        assert json.loads((fold / "split.json").read_text()) == splits[k]
        assert Segmenter.load(fold, device="cpu").predict(image).shape == image.shape[-2:]
    cv = json.loads((run / "cv.json").read_text())
    assert sorted(c["case"] for c in cv["cases"]) == names
    assert sorted(r["case"] for r in cv["rows"]) == sorted(names * 2)  # a row per case and class
    assert cv["summary"]["n_cases"] == 4 and cv["summary"] == result.summary
    assert cv["truth_dir"] == str((data / "masks").resolve())
    for c in cv["cases"]:
        assert c["case"] in splits[c["fold"]]["val"]  # predicted by the fold that held it out
        assert (run / c["prediction"]).is_file() and c["prediction"].startswith(cv["predictions_dir"])
        assert read_image(run / c["prediction"]).array.shape == read_image(c["truth"]).array.shape


def test_the_ensemble_is_the_mean_of_its_folds(cv_run, data):
    run, _ = cv_run
    image = read_image(data / "images" / "cell_004.png").array
    folds = [Segmenter.load(run / f"fold_{k}", device="cpu").predict_proba(image) for k in range(2)]
    ens = Segmenter.load(run, device="cpu")
    assert ens.backend.name == "torch" and len(ens.backend.members) == 2
    assert np.allclose(ens.predict_proba(image), (folds[0] + folds[1]) / 2, atol=1e-6)
    assert not np.allclose(folds[0], folds[1], atol=1e-3)  # else the mean would prove nothing
    one = Segmenter.load(run, device="cpu", folds=[1])
    assert np.array_equal(one.predict_proba(image), folds[1])
    with pytest.raises(UsegError, match="folds 0 to 1"):
        Segmenter.load(run, folds=[2])


def test_the_exported_ensemble_predicts_like_the_run(cv_run, data):
    from useg.export import export_run

    run, _ = cv_run
    image = read_image(data / "images" / "cell_004.png").array
    side = export_run(run, format="onnx", dynamo=False)
    assert side.name == "ensemble.onnx.json"
    assert json.loads(side.read_text())["members"] == ["fold_0/model.onnx", "fold_1/model.onnx"]
    expected = Segmenter.load(run, device="cpu", precision="fp32").predict_proba(image)
    exported = Segmenter(*exported_backend(side)).predict_proba(image)
    onnx = Segmenter.load(run, backend="onnxruntime").predict_proba(image)
    assert np.allclose(exported, expected, atol=1e-4) and np.allclose(onnx, expected, atol=1e-4)
    with pytest.raises(UsegError, match="drop --out"):
        export_run(run, run / "x.onnx")


def test_complete_folds_are_never_trained_again(cv_run, data):
    run, _ = cv_run
    files = [run / "fold_0" / "model.safetensors", run / "fold_1" / "last.safetensors", run / "cv.json"]
    before = [p.stat().st_mtime_ns for p in files]
    again = train_folder(data, run, overrides=_overrides(), folds=2, exclude="cell_004", **KW)
    assert again.trained == {} and again.summary is not None
    assert [p.stat().st_mtime_ns for p in files] == before
    assert train_folder(data, run, fold=1, exclude="cell_004", resume=True, **KW).trained == {}
    with pytest.raises(UsegError, match="already holds a run"):  # the single-run path is unchanged
        train_folder(data, run, overrides=_overrides(), **KW)


def test_edited_splits_and_an_interrupted_fold_resume(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    edited = [{"train": ["cell_000", "cell_001", "cell_002"], "val": ["cell_003", "cell_004"]},
              {"train": ["cell_003", "cell_004"], "val": ["cell_000", "cell_001", "cell_002"]}]
    (run / "splits.json").write_text(json.dumps(edited))
    first = train_folder(data, run, overrides=_overrides(epochs=2), fold=0, **KW)
    assert first.trained.keys() == {0} and first.summary is None and not (run / "cv.json").exists()
    assert json.loads((run / "fold_0" / "split.json").read_text()) == edited[0]
    done = (run / "fold_0" / "model.safetensors").stat().st_mtime_ns
    (run / "splits.json").write_text(json.dumps(edited[::-1]))  # edited after fold 0 trained on it
    with pytest.raises(UsegError, match="trained on another split"):
        train_folder(data, run, folds=2, **KW)
    (run / "splits.json").write_text(json.dumps(edited))

    end_epoch = useg.train._end_epoch

    def interrupted(s, state, *args):
        end_epoch(s, state, *args)
        raise KeyboardInterrupt  # after the first epoch's checkpoint

    monkeypatch.setattr(useg.train, "_end_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_folder(data, run, folds=2, **KW)
    monkeypatch.setattr(useg.train, "_end_epoch", end_epoch)
    assert (run / "fold_1" / "last.safetensors").exists() and not (run / "fold_1" / "summary.json").exists()
    with pytest.raises(UsegError, match="unfinished fold"):
        train_folder(data, run, folds=2, **KW)
    resumed = train_folder(data, run, resume=True, fold=1, **KW)
    assert resumed.trained[1].epochs == 2 and resumed.summary["n_cases"] == 5
    lines = (run / "fold_1" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == [0, 1]  # continued, not restarted
    assert (run / "fold_0" / "model.safetensors").stat().st_mtime_ns == done
    # --overwrite: a whole new run (a new split) built beside and swapped in, nothing left behind
    new = train_folder(data, run, overrides=_overrides(), folds=2, overwrite=True, **KW)
    assert new.run == run and new.summary["n_cases"] == 5 and sorted(new.trained) == [0, 1]
    assert json.loads((run / "splits.json").read_text()) == kfold_splits([f"cell_00{i}" for i in range(5)], 2)
    assert json.loads((run / "fold_1" / "summary.json").read_text())["run"] == str(run / "fold_1")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_time_budget_is_shared_by_the_folds_left(data, tmp_path, monkeypatch):
    budgets = []

    def fake_fit(plan, train_data, val_data, run, time_budget_min=None, **_):
        budgets.append(time_budget_min)
        raise KeyboardInterrupt

    import useg.crossval

    monkeypatch.setattr(useg.crossval, "fit", fake_fit)
    with pytest.raises(KeyboardInterrupt):
        train_folder(data, tmp_path / "run", overrides=_overrides(), folds=3, time_budget_min=6.0, **KW)
    assert len(budgets) == 1 and 1.9 < budgets[0] <= 2.0  # 6 minutes, 3 folds left


def test_the_cli_continues_a_cv_run_and_predicts_with_its_ensemble(cv_run, data, tmp_path, capsys):
    from useg.cli import main

    run, _ = cv_run
    tiny = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2", "--device",
            "cpu", "--quiet"]
    assert main(["train", str(data), "--out", str(run), "--folds", "2", "--exclude", "cell_004", *tiny]) == 0
    said = capsys.readouterr().out
    assert "cross-validated foreground dice" in said and "fold 0:" not in said  # nothing trained again
    image = data / "images" / "cell_004.png"
    for folds, out in (([], "all"), (["--folds", "0"], "one")):
        assert main(["predict", str(run), str(image), "--out", str(tmp_path / out), "--device", "cpu",
                     "--quiet", *folds]) == 0
    expected = Segmenter.load(run / "fold_0", device="cpu").predict(read_image(image).array)
    lm_values = json.loads((run / "plan.json").read_text())["data"]["label_map"]["values"]
    one = read_image(tmp_path / "one" / "cell_004.png").array[0]
    assert np.array_equal(one, np.asarray(lm_values)[expected])
    assert (tmp_path / "all" / "cell_004.png").is_file()


def test_cross_validation_chooses_post_processing_that_predict_applies(cv_run, data, tmp_path):
    from useg.postprocess import apply_postprocessing
    from useg.postprocess_run import read_postprocessing

    run, _ = cv_run
    record = json.loads((run / "postprocessing.json").read_text())
    # chosen on the four out-of-fold predictions (cell_004 is held out of the folds), with its figures
    assert {"postprocessing", "figures"} <= set(record) and record["n_cases"] == 4
    assert record["predictions"] == str(run / "cv" / "predictions")
    seg = Segmenter.load(run, device="cpu")
    pp = read_postprocessing(run, seg.plan.data.label_map.num_classes)
    assert seg.postprocessing == pp
    image = read_image(data / "images" / "cell_004.png").array
    raw = Segmenter.load(run, device="cpu", postprocessing=False).predict(image)
    np.testing.assert_array_equal(seg.predict(image), apply_postprocessing(raw, pp))
