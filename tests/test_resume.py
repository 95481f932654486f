"""Crash safety: a training killed with SIGKILL resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    last = run / "last.safetensors"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("training finished before it could be killed")
    assert last.exists(), "no checkpoint was written before the kill"
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=200)
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
