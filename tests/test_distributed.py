"""DDP under torchrun: two CPU processes with gloo train one model and write one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.timeout(240)
def test_torchrun_two_cpu_processes(cells_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "useg", "train", str(cells_dir), "--out", str(run), "--width", "4", "--depth", "2",
           "--patch", "32,32", "--epochs", "2", "--iters", "3", "--batch-size", "2", "--precision", "fp32",
           "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["steps"] == 6 and summary["epochs"] == 2
    for name in ("plan.json", "split.json", "model.safetensors", "last.safetensors", "curves.png"):
        assert (run / name).exists(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote it
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert load_file(str(run / "model.safetensors"))


# ----------------------------------------------------------------------------- sharded predict (h11-gpu)


@pytest.mark.timeout(240)
def test_torchrun_predict_splits_the_files_and_writes_each_once(cells_dir, tmp_path, untrained_run):
    run, out = untrained_run, tmp_path / "out"
    images = sorted((cells_dir / "images").iterdir())
    out.mkdir()
    (out / images[3].name).write_bytes(b"old")  # rank 1's: refused on rank 1, so rank 0 writes nothing either
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "useg",
           "predict", str(run), str(cells_dir / "images"), "--out", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode != 0 and f"{images[3].name} already exists" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == [images[3].name]  # the agreement came before any write
    proc = subprocess.run([*cmd, "--continue"], env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 3 mask(s)" in proc.stdout and "(rank 0 of 2)" in proc.stdout, proc.stdout
    assert "wrote 2 mask(s)" in proc.stdout and "(rank 1 of 2)" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in images]  # each once, no temporaries
    assert (out / images[3].name).read_bytes() == b"old"  # kept by --continue
