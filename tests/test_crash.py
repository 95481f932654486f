"""Processes killed or racing: an interrupted ``train --overwrite`` and two ``predict`` into one folder.

Real ``python -m useg`` subprocesses. A ``train --overwrite`` killed (SIGKILL, which nothing can catch,
and SIGINT, Ctrl-C) at deterministic points of its progress (its staging folder appears, its plan.json
is written, its first checkpoint is written) must leave the run it was to replace byte for byte as it
was, still predicting the same masks; a later ``train --overwrite`` run to completion replaces it. Two
``predict`` of two different runs into one ``--out`` at the same time: one refuses with the usual
sentence, every file left there comes whole from the other, and no temporary file is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import useg
from useg.cli import main

TINY = ["--depth", "2", "--patch", "16,16", "--iters", "2", "--batch-size", "2", "--precision", "fp32",
        "--device", "cpu", "--workers", "0", "--quiet"]


def _env() -> dict[str, str]:
    src = str(Path(useg.__file__).resolve().parents[1])  # this checkout's useg, installed or not
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _one_core() -> None:
    """In the child: one core, as training takes every core it may use (spin-waits on a shared CPU), and
    SIGINT as a terminal gives it: a test run before this one may have left it ignored or blocked in
    pytest's process, and a child inherits both (an ignored SIGINT let the training run to its end)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _useg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "useg", *map(str, args)], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_one_core)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative name."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_squares) -> Path:
    return write_squares(tmp_path_factory.mktemp("crash") / "data")


def _train(data: Path, run: Path, *flags: str) -> None:
    assert main(["train", str(data), "--out", str(run), *TINY, *flags]) == 0


def _predict(run: Path, data: Path, out: Path, *flags: str) -> dict[str, bytes]:
    assert main(["predict", str(run), str(data / "images"), "--out", str(out), "--quiet", *flags]) == 0
    return _files(out)


def _staging(run: Path) -> set[Path]:
    return set(run.parent.glob(f".{run.name}.new-*"))


def _staged(run: Path, name: str | None, old: set[Path]) -> bool:
    """Whether a new staging folder beside ``run`` exists (and holds ``name``, when given); ``old``: the
    folders that SIGKILLed trainings left (nothing can clean up after SIGKILL)."""
    return any((p / name).exists() if name else True for p in _staging(run) - old)


# (signal, the staging folder's file to wait for; None: the folder itself)
MOMENTS = [(signal.SIGKILL, None), (signal.SIGKILL, "plan.json"), (signal.SIGKILL, "last.safetensors"),
           (signal.SIGINT, "plan.json"), (signal.SIGINT, "last.safetensors")]


@pytest.mark.timeout(300)
def test_an_interrupted_overwrite_leaves_the_old_run_as_it_was(data, tmp_path):
    run = tmp_path / "run"
    _train(data, run, "--width", "4", "--epochs", "1")
    masks = _predict(run, data, tmp_path / "alone")
    before = _files(run)
    for sig, wait_for in MOMENTS:
        # a wider network and many epochs: whenever it is killed, the new run is not complete
        old = _staging(run)
        proc = _useg("train", data, "--out", run, "--overwrite", *TINY, "--width", "8", "--epochs", "200")
        deadline = time.monotonic() + 120
        while not _staged(run, wait_for, old) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"train ended before {wait_for or 'staging'}: {proc.communicate()}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        what = f"{sig.name} once {wait_for or 'the staging folder'} appeared"
        # Ctrl-C exits 130; a second SIGINT-raised interrupt while Python shuts down ends it by the signal
        ended = (-signal.SIGKILL, 130, -signal.SIGINT)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert proc.returncode in ended, (f"{what}: exit {proc.returncode}\n{err}\n(pytest: SIGINT handler "
                                          f"{signal.getsignal(signal.SIGINT)}, blocked {sorted(mask)})")
        if sig == signal.SIGINT:  # Ctrl-C: said in one word, the staging folder removed
            assert "Traceback" not in err and "interrupted" in err, err
            assert not _staged(run, None, old), f"{what}: the staging folder was left behind"
        assert _files(run) == before, f"{what}: the old run changed"
        out = tmp_path / f"after-{sig.name}-{wait_for}"
        assert _predict(run, data, out) == masks, f"{what}: the old run predicts otherwise"
    _train(data, run, "--overwrite", "--width", "8", "--epochs", "1")  # a complete overwrite replaces it
    assert '"width": 8' in (run / "plan.json").read_text()
    assert main(["predict", str(run), str(data / "images"), "--out", str(tmp_path / "new"), "--quiet"]) == 0
    assert not list(tmp_path.glob(".run.old-*"))


@pytest.mark.timeout(300)
def test_two_predicts_of_two_runs_into_one_folder(data, tmp_path):
    """Each run alone first, then both at once into one folder: one refuses, the other's files are whole."""
    runs, alone = {}, {}
    for seed in (0, 1):  # two trainings of other seeds: other weights, so other probability maps
        runs[seed] = tmp_path / f"run{seed}"
        _train(data, runs[seed], "--width", "4", "--epochs", "1", "--seed", str(seed))
        alone[seed] = _predict(runs[seed], data, tmp_path / f"alone{seed}", "--probabilities", "uint8")
    assert alone[0] != alone[1] and alone[0].keys() == alone[1].keys()
    out = tmp_path / "both"
    procs = {seed: _useg("predict", runs[seed], data / "images", "--out", out, "--quiet",
                         "--probabilities", "uint8") for seed in runs}
    done = {seed: (p.wait(200), p.stderr.read()) for seed, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _ in done.values()) == [0, 2], done
    winner = next(seed for seed, (rc, _) in done.items() if rc == 0)
    refusal = done[1 - winner][1]
    assert "already exists" in refusal and "Traceback" not in refusal, refusal
    assert _files(out) == alone[winner]  # every file whole, all from the one that won, no temporary left
