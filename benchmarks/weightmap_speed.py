"""The paper's border weight map (eq. 2): cropped per-object EDTs vs one full-image EDT per object.

    PYTHONPATH=src .venv/bin/python benchmarks/weightmap_speed.py [--repeats 5] [--cells 200]

Builds a 512x512 image of ~200 touching cells (useg.synthetic.make_cells), times
border_weight_map (median of --repeats) and the brute-force reference once, checks they agree,
prints a table and writes benchmarks/results/weightmap_speed.json. scipy runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from useg.synthetic import make_cells
from useg.weightmap import border_weight_map, class_balance_weights

RESULTS = Path(__file__).resolve().parent / "results" / "weightmap_speed.json"


def brute_force(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Eq. 2 with one full-image distance transform per object and a sort over objects."""
    ids = [k for k in np.unique(labels) if k > 0]
    w = class_balance_weights(labels).astype(np.float64)
    dist = np.stack([ndimage.distance_transform_edt(labels != k) for k in ids])
    dist.sort(axis=0)
    s = dist[0] + dist[1]
    bg = labels == 0
    w[bg] += w0 * np.exp(-s[bg] ** 2 / (2 * sigma**2))
    return w.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    _, instances = make_cells((args.size, args.size), n_cells=args.cells, rng=np.random.default_rng(0))
    n = len(np.unique(instances[instances > 0]))

    border_weight_map(instances)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast = border_weight_map(instances)
        times.append(time.perf_counter() - t0)
    fast_s = statistics.median(times)

    t0 = time.perf_counter()
    ref = brute_force(instances)
    brute_s = time.perf_counter() - t0
    max_err = float(np.abs(fast - ref).max())

    result = {"fast_s": round(fast_s, 4), "brute_s": round(brute_s, 4),
              "speedup": round(brute_s / fast_s, 1), "instances": n,
              "shape": [args.size, args.size], "max_abs_diff": max_err}
    print(f"{'method':<34}{'seconds':>10}")
    print(f"{'cropped EDTs (median of ' + str(args.repeats) + ')':<34}{fast_s:>10.4f}")
    print(f"{'full EDT per instance (once)':<34}{brute_s:>10.4f}")
    print(f"{'speedup':<34}{brute_s / fast_s:>10.1f}")
    print(f"instances: {n}, max |fast - brute|: {max_err:.2e} (bound: 1e-3 * w0 = 1e-2)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
