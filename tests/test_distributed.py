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
