"""Crash safety: a training killed with SIGKILL resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "8", "--iters", "4",
        "--batch-size", "2", "--deterministic", "--device", "cpu", "--quiet"]


@pytest.mark.timeout(240)
def test_sigkill_then_resume_finishes(cells_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "useg", "train", str(cells_dir), "--out", str(run), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a new run is built in .run.new-XXXX beside --out and put in place when complete
    deadline = time.time() + 120
    while not list(tmp_path.glob(".run.new-*/last.safetensors")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("training finished before it could be killed")
    assert list(tmp_path.glob(".run.new-*/last.safetensors")), "no checkpoint was written before the kill"
    # --resume takes up the killed run's folder (its options come from its plan.json)
    resume = [sys.executable, "-m", "useg", "train", str(cells_dir), "--out", str(run), "--resume",
              "--device", "cpu", "--quiet"]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 8 and summary["steps"] == 32
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(8))  # each epoch logged once, none lost or repeated
    # Patches come from (seed, epoch, index) and the RNG state is checkpointed, so with
    # --deterministic the interrupted run ends with exactly the weights of an uninterrupted one.
    again = tmp_path / "again"
    cmd_again = [sys.executable, "-m", "useg", "train", str(cells_dir), "--out", str(again), *ARGS]
    assert subprocess.run(cmd_again, env=env, capture_output=True, timeout=200).returncode == 0
    a, b = load_file(str(run / "last.safetensors")), load_file(str(again / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_resume_without_checkpoint_is_refused(cells_dir, tmp_path, capsys):
    from useg.cli import main

    assert main(["train", str(cells_dir), "--out", str(tmp_path / "none"), "--resume", *ARGS]) == 2
    assert "plan.json" in capsys.readouterr().err


# --- train --overwrite never wrecks the run it replaces (issue 14) --------------------------------------

TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2",
        "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def _files(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _predicted(run, cells_dir, out):
    from useg.cli import main

    # --backend torch: auto would cache its timings in the run folder, which these tests compare byte for byte
    assert main(["predict", str(run), str(cells_dir / "images" / "cell_005.png"), "--out", str(out),
                 "--device", "cpu", "--quiet", "--backend", "torch"]) == 0
    return _files(out)


@pytest.fixture
def old_run(cells_dir, tmp_path):
    """A trained run, its files and its prediction of one image."""
    from useg.cli import main

    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY]) == 0
    return run, _files(run), _predicted(run, cells_dir, tmp_path / "pred0")


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


MOMENTS = {  # where a crash or a Ctrl-C lands in the new training: (module attribute, exception, exit)
    "setup": ("useg.train._setup", RuntimeError("injected"), None),  # None: the exception escapes main
    "first step": ("useg.train.train_step", KeyboardInterrupt(), 130),
    "best model": ("useg.train.save_model", RuntimeError("injected"), None),
    "checkpoint": ("useg.train.save_checkpoint", KeyboardInterrupt(), 130),
    "metrics": ("useg.runlog.append_record", OSError(28, "No space left on device"), 2),
}


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_a_crashed_overwrite_leaves_the_old_run_whole(moment, old_run, cells_dir, tmp_path, monkeypatch):
    from useg.cli import main

    run, files, predicted = old_run
    target, exc, code = MOMENTS[moment]
    monkeypatch.setattr(target, _raise(exc))
    argv = ["train", str(cells_dir), "--out", str(run), "--overwrite", *TINY, "--width", "8"]
    if code is None:
        with pytest.raises(type(exc)):
            main(argv)
    else:
        assert main(argv) == code
    monkeypatch.undo()
    assert _files(run) == files  # not one byte of the old run changed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it
    assert _predicted(run, cells_dir, tmp_path / "pred1") == predicted
    assert main(["train", str(cells_dir), "--out", str(run), "--resume", "--quiet"]) == 0


def test_an_argument_error_leaves_the_old_split(old_run, cells_dir, tmp_path, capsys):
    from useg.cli import main

    run, files, _ = old_run
    for bad in (["--iters", "0"], ["--epochs", "-1"], ["--batch-size", "0"]):
        assert main(["train", str(cells_dir), "--out", str(run), "--overwrite", "--val", "cell_003,cell_004",
                     *TINY, *bad]) == 2
        assert "must be a whole number of at least 1" in capsys.readouterr().err
    assert _files(run) == files
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_finished_overwrite_replaces_the_whole_run(old_run, cells_dir, tmp_path):
    from useg.cli import main
    from useg.plan import Plan

    run, files, _ = old_run
    (run / "model.onnx").write_bytes(b"an export of the old weights")
    assert main(["train", str(cells_dir), "--out", str(run), "--overwrite", *TINY, "--width", "8"]) == 0
    assert Plan.load(run / "plan.json").model.width == 8
    assert not (run / "model.onnx").exists()  # nothing of the old run lingers beside the new weights
    written = {"plan.json", "split.json", "model.safetensors", "last.safetensors", "summary.json"}
    assert written <= set(_files(run))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.timeout(240)
def test_sigkill_during_an_overwrite_keeps_the_old_run(old_run, cells_dir, tmp_path):
    run, files, predicted = old_run
    cmd = [sys.executable, "-m", "useg", "train", str(cells_dir), "--out", str(run), "--overwrite",
           *ARGS, "--width", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (not list(tmp_path.glob(".run.new-*/plan.json")) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list(tmp_path.glob(".run.new-*/plan.json")):
        pytest.skip("the new run was not started before the kill")
    assert _files(run) == files
    assert _predicted(run, cells_dir, tmp_path / "pred1") == predicted


# --- a torn metrics.jsonl record does not stop a resume (issue 14) ---------------------------------------

@pytest.mark.parametrize("torn", ['{"epoch": 2, "step": 6, "train_lo', '{"epoch": 1, "st\x00\x00', "\ufffd"])
def test_resume_survives_a_torn_last_record(torn, tmp_path, caplog):
    import dataclasses

    from useg.labels import LabelMap
    from useg.planner import make_plan
    from useg.runlog import read_records
    from useg.spec import Overrides
    from useg.train import fit

    rng = np.random.default_rng(0)
    labels = [np.zeros((32, 32), np.int64) for _ in range(2)]
    for lab in labels:
        lab[8:20, 6:18] = 1
    images = [(lab * 2.0 + rng.normal(0, 0.3, lab.shape)).astype(np.float32)[None] for lab in labels]
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)], overrides=Overrides(
        model={"width": 4, "depth": 2},
        train={"epochs": 2, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32"}))
    run = tmp_path / "run"
    fit(plan, (images, labels), ([], []), run, quiet=True)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(torn)  # a crash in the middle of writing a record: no newline, half a line
    longer = dataclasses.replace(plan, train=dataclasses.replace(plan.train, epochs=3))
    with caplog.at_level("WARNING"):
        result = fit(longer, (images, labels), ([], []), run, resume=True, quiet=True)
    assert result.epochs == 3
    assert "not whole records" in caplog.text
    assert [r["epoch"] for r in read_records(run / "metrics.jsonl")] == [0, 1, 2]
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (run / "curves.png").exists()
