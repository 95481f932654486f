"""Sliding-window stitching on the model's device vs the host stitching it replaced, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/stitch_speed.py [--ref d7a7f08] [--repeats 7]
                                                               [--device cpu|cuda] [--threads N]

The old ``useg/tiling.py`` is read from git at ``--ref`` (the last commit with host-side numpy
accumulation) and imported beside the current ``useg/sliding_window.py``. Both blend the same
tiles of a cheap tile function (a fixed 1x1 convolution to K=3 classes and a softmax, so
stitching is a large share of the time, as it is with a fast network on a GPU) over a 96^3
volume (tile 64^3) and a 1024^2 image (tile 256^2), overlap 0.5, 4 tiles a batch:
``sliding_window`` (probabilities) and ``sliding_window_labels`` (streamed argmax). Prints the
median seconds of each and the ratio new / old (< 1 is faster), and checks that both agree
(allclose, labels identical).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from useg import sliding_window  # noqa: E402


def old_tiling(ref: str):
    """The module ``src/useg/tiling.py`` as it was at ``ref``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/useg/tiling.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_tiling.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_tiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tile_fn(channels: int, classes: int, dims: int, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(classes, channels, generator=g).to(dev)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(dev)
        return torch.einsum("kc,bc...->bk...", proj, batch).softmax(1)

    return fn


def paired(old, new, repeats: int, dev: torch.device) -> tuple[float, float]:
    """Median seconds of ``old()`` and ``new()``, timed alternately (after one warm-up each) so a
    shared machine's load drifts over both alike."""
    def once(run) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    old(), new()
    times = [(once(old), once(new)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="d7a7f08", help="git commit of the host-stitching tiling.py")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    old = old_tiling(a.ref)
    rng = np.random.default_rng(0)
    rows = []
    for label, shape, tile in (("3d 96^3", (1, 96, 96, 96), (64, 64, 64)),
                               ("2d 1024^2", (3, 1024, 1024), (256, 256))):
        image = rng.standard_normal(shape).astype(np.float32)
        fn = tile_fn(shape[0], 3, len(tile), dev)
        for kind in ("sliding_window", "sliding_window_labels"):
            args = (fn, image, tile, 3)
            kw = {"overlap": 0.5, "batch_size": 4, "device": dev}
            new_out = getattr(sliding_window, kind)(*args, **kw)
            old_out = getattr(old, kind)(*args, **kw)
            same = (np.array_equal(new_out, old_out) if kind.endswith("labels")
                    else bool(np.allclose(new_out, old_out, atol=1e-6)))
            t_old, t_new = paired(partial(getattr(old, kind), *args, **kw),
                                  partial(getattr(sliding_window, kind), *args, **kw), a.repeats, dev)
            rows.append({"case": label, "function": kind, "old_s": round(t_old, 4), "new_s": round(t_new, 4),
                         "new_over_old": round(t_new / t_old, 3), "agree": same})
            print(f"{label:10s} {kind:22s} old {t_old:7.3f} s  new {t_new:7.3f} s  new/old "
                  f"{t_new / t_old:5.2f}  agree {same}", flush=True)
    return rows


if __name__ == "__main__":
    main()
