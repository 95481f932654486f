"""Several configurations of one data folder (--configs 2d,3d) and the one chosen by validation."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import useg.configs
from useg.cli import main
from useg.configrun import ENSEMBLE, ConfigEnsemble
from useg.configs import choose_configuration, train_configurations
from useg.errors import UsegError
from useg.io import read_image
from useg.plan import Plan
from useg.predict import Segmenter
from useg.runlog import run_state
from useg.spec import Overrides
from useg.synthetic import make_blobs_3d

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(quiet=True, device="cpu")
TINY = ["--width", "4", "--depth", "2", "--epochs", "1", "--iters", "2", "--batch-size", "1",
        "--precision", "fp32", "--workers", "0", "--device", "cpu", "--quiet"]


def _overrides():
    return Overrides(model={"width": 4, "depth": 2}, train={
        "epochs": 1, "iters_per_epoch": 2, "batch_size": 1, "precision": "fp32", "workers": 0})


def write_volumes(root, n=4, shape=(12, 12, 12)):
    """``n`` NIfTI volumes of blobs with 0/1 masks in ``root/images`` and ``root/masks``."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, inst = make_blobs_3d(shape, rng=np.random.default_rng([5, i]))
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / f"v{i}.nii.gz"))
        mask = (inst > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "masks" / f"v{i}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return write_volumes(tmp_path_factory.mktemp("volumes"))


@pytest.fixture(scope="module")
def multi_run(volumes, tmp_path_factory):
    """A complete 2d,3d run on the volumes made by the command line, without folds (one case validates
    both), and what the command printed."""
    run = tmp_path_factory.mktemp("multi") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", str(volumes), "--out", str(run), "--configs", "2d,3d", "--val", "v3", *TINY])
    assert code == 0
    return run, printed.getvalue()


@pytest.mark.parametrize("scores, chosen", [
    ({"2d": 0.70, "3d": 0.80, ENSEMBLE: 0.79}, ["3d"]),  # the best single one
    ({"2d": 0.90, "3d": 0.80, ENSEMBLE: 0.85}, ["2d"]),
    ({"2d": 0.70, "3d": 0.80, ENSEMBLE: 0.81}, ["2d", "3d"]),  # the ensemble only when it beats it
    ({"2d": 0.80, "3d": 0.80, ENSEMBLE: 0.80}, ["2d"]),  # a tie: the single one, the first in order
    ({"2d": 0.70, "3d": 0.80, ENSEMBLE: 0.80}, ["3d"]),  # the ensemble must be strictly better
    ({"3d": 0.5, "2d": 0.5}, ["2d"]),  # no ensemble scored; the order of preference, not of the dict
])
def test_the_choice_rule(scores, chosen):
    assert choose_configuration(scores) == chosen
    assert choose_configuration({"3d": 0.5, "2d": 0.5}, order=("3d", "2d")) == ["3d"]
    with pytest.raises(ValueError):
        choose_configuration({ENSEMBLE: 0.9})


def test_a_two_configuration_run_writes_both_runs_and_the_choice(multi_run, volumes):
    run, printed = multi_run
    for name in ("2d", "3d"):
        assert json.loads((run / name / "split.json").read_text())["val"] == ["v3"]  # the same case
        assert run_state(run / name).kind == "complete"
        assert (run / "validation" / name / "v3.nii.gz").is_file()
        Segmenter.load(run / name, device="cpu")  # each configuration is a run of its own
    plans = {name: Plan.load(run / name / "plan.json") for name in ("2d", "3d")}
    assert plans["2d"].model.dims == 2 and plans["2d"].data.slice_axis is not None  # a 2D network on slices
    assert plans["3d"].model.dims == 3 and plans["3d"].data.slice_axis is None
    record = json.loads((run / "configuration.json").read_text())
    assert record["cases"] == ["v3"] and record["folds"] is None and record["rule"] == useg.configs.RULE
    assert set(record["candidates"]) == {"2d", "3d", ENSEMBLE}
    assert f"chosen: {'+'.join(record['chosen'])}; run in {run}" in printed
    assert f"{ENSEMBLE}: mean foreground dice {record['candidates'][ENSEMBLE]['dice']:.4f}" in printed
    scores = {n: c["dice"] for n, c in record["candidates"].items()}
    assert record["chosen"] == choose_configuration(scores)
    for c in record["candidates"].values():
        assert list(c["classes"]) == ["value 1"] and c["dice"] == pytest.approx(c["classes"]["value 1"])
    assert run_state(run).kind == "complete" and run_state(run).has_model


def _with_choice(run, tmp_path, chosen):
    copy = tmp_path / f"run_{'_'.join(chosen)}"
    shutil.copytree(run, copy)
    record = json.loads((copy / "configuration.json").read_text())
    (copy / "configuration.json").write_text(json.dumps({**record, "chosen": chosen}))
    return copy


def test_predict_uses_the_chosen_configuration_or_the_ensemble(multi_run, volumes, tmp_path):
    run, _ = multi_run
    image = read_image(volumes / "images" / "v0.nii.gz")
    for name in ("2d", "3d"):
        seg = Segmenter.load(_with_choice(run, tmp_path, [name]), device="cpu")
        alone = Segmenter.load(run / name, device="cpu")
        assert not isinstance(seg, ConfigEnsemble)
        np.testing.assert_array_equal(seg.predict_image(image), alone.predict_image(image))
    both = Segmenter.load(_with_choice(run, tmp_path, ["2d", "3d"]), device="cpu")
    assert isinstance(both, ConfigEnsemble)
    probs = [Segmenter.load(run / n, device="cpu").predict_image_proba(image) for n in ("2d", "3d")]
    mean = (probs[0] + probs[1]) / 2
    np.testing.assert_allclose(both.predict_image_proba(image), mean, atol=1e-6)
    np.testing.assert_array_equal(both.predict_image(image), mean.argmax(0))
    two = Segmenter.load(run, device="cpu", configuration="2d")
    np.testing.assert_array_equal(two.predict_image(image), Segmenter.load(run / "2d").predict_image(image))


def test_the_cli_predicts_and_shows_the_choice(multi_run, volumes, tmp_path, capsys, monkeypatch):
    run, _ = multi_run
    chosen = "+".join(json.loads((run / "configuration.json").read_text())["chosen"])
    image = str(volumes / "images" / "v1.nii.gz")
    kw = ["--backend", "torch", "--device", "cpu", "--quiet"]
    assert main(["predict", str(run), image, "--out", str(tmp_path / "a"), *kw]) == 0
    assert main(["predict", str(run), image, "--out", str(tmp_path / "b"), "--configs", "3d", *kw]) == 0
    alone = Segmenter.load(run / "3d", device="cpu").predict_image(read_image(image))
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "b" / "v1.nii.gz")).dataobj), alone)
    assert (tmp_path / "a" / "v1.nii.gz").is_file()
    monkeypatch.setattr("useg.autotune.info_table", lambda r: f"backends of {r}")
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "foreground dice" in out and "chosen" in out and f"rule: {useg.configs.RULE}" in out
    assert all(f"backends of {run / c}" in out for c in chosen.split("+"))


def test_resume_skips_a_complete_configuration(multi_run, volumes, tmp_path, monkeypatch):
    run, _ = multi_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "configuration.json").unlink()
    shutil.rmtree(copy / "3d")  # 3d not trained yet, 2d complete
    assert run_state(copy).kind == "resumable"
    with pytest.raises(UsegError, match="training is not complete"):
        Segmenter.load(copy, device="cpu")  # nothing half-made is read
    trained = []
    real = useg.configs.train_folder
    monkeypatch.setattr(useg.configs, "train_folder",
                        lambda data, sub, **kw: trained.append(sub.name) or real(data, sub, **kw))
    result = train_configurations(volumes, copy, resume=True, **KW)
    assert trained == ["3d"] and sorted(result.trained) == ["3d"]
    assert json.loads((copy / "3d" / "split.json").read_text())["val"] == ["v3"]
    assert (copy / "configuration.json").is_file() and run_state(copy).kind == "complete"


def test_the_time_budget_is_shared_by_the_configurations_left(volumes, tmp_path, monkeypatch):
    budgets = {}

    def fake(data, sub, time_budget_min=None, **kw):
        budgets[sub.name] = time_budget_min
        raise KeyboardInterrupt  # stop after recording: the rule, not the training, is tested

    monkeypatch.setattr(useg.configs, "train_folder", fake)
    with pytest.raises(KeyboardInterrupt):
        train_configurations(volumes, tmp_path / "run", overrides=_overrides(), time_budget_min=10.0, **KW)
    assert budgets["2d"] == pytest.approx(5.0, abs=0.1)  # 10 minutes for two configurations
    assert run_state(tmp_path / "run").kind == "started"  # configs.json only: nothing to predict with


def test_cross_validated_configurations_share_one_split(volumes, tmp_path):
    run = tmp_path / "cv"
    result = train_configurations(volumes, run, overrides=_overrides(), folds=2, exclude="v3", **KW)
    splits = [json.loads((run / c / "splits.json").read_text()) for c in ("2d", "3d")]
    assert splits[0] == splits[1] and len(splits[0]) == 2
    for c in ("2d", "3d"):
        assert (run / c / "cv.json").is_file() and (run / c / "postprocessing.json").is_file()
    record = result.record
    assert record["scored_on"] == "every case out-of-fold" and sorted(record["cases"]) == ["v0", "v1", "v2"]
    cv3 = json.loads((run / "3d" / "cv.json").read_text())["summary"]["foreground"]["dice"]
    assert record["candidates"]["3d"]["dice"] == pytest.approx(cv3)  # cv.json's out-of-fold figure
    assert sorted(p.name for p in (run / "validation" / ENSEMBLE).iterdir()) == [
        "v0.nii.gz", "v1.nii.gz", "v2.nii.gz"]
    Segmenter.load(run, device="cpu")


def test_the_cli_resumes_a_complete_run_and_plans_two_configurations(multi_run, volumes, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(multi_run[0], run)
    before = (run / "configuration.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in run.glob("*/model.safetensors")}
    assert main(["train", str(volumes), "--out", str(run), "--resume", "--device", "cpu", "--quiet"]) == 0
    assert "chosen:" in capsys.readouterr().out  # both complete: only the choice is made again
    assert (run / "configuration.json").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/model.safetensors")} == mtimes
    assert main(["plan", str(volumes), "--configs", "2d,3d", "--json", "--width", "4"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert sorted(plans) == ["2d", "3d"] and plans["3d"]["model"]["width"] == 4
    assert plans["2d"]["model"]["dims"] == 2 and plans["3d"]["model"]["dims"] == 3
