"""Every prediction backend candidate on this machine, in one run, as ratios against torch fp32 NCHW.

    PYTHONPATH=src .venv/bin/python benchmarks/backends.py [--size 512] [--repeats 5] [--run RUN]
    ONEDNN_MAX_CPU_ISA=AVX2 USEG_CPU_BF16=0 PYTHONPATH=src .venv/bin/python benchmarks/backends.py

The second line makes oneDNN (PyTorch's CPU kernels) run as on an AVX2-only CPU and useg treat
the CPU as having no native bf16. ONNX Runtime's MLAS kernels do not read that cap: its rows
stay those of the real CPU. The network is the default plan's (width 32, depth 4, same padding,
batch norm) with seeded random weights, or a trained ``--run``. Each candidate runs one
``size`` x ``size`` forward (batch 1) to warm up and check its labels against fp32, then
``--repeats`` timed ones; the median is printed. Then ``useg predict --backend auto``'s own
bounded measurement on the plan's tile says which one it picks. Only ratios within one run are
meant to be compared: the machine may be shared. ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from useg import autotune, runtime
from useg.checkpoint import save_model, weights_digest
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import Segmenter, label_agreement


def _default_run(folder: Path, size: int) -> Path:
    plan = make_plan(LabelMap((0, 255)), 1, [(size, size)])
    plan.save(folder / "plan.json")
    torch.manual_seed(0)
    save_model(UNet.from_config(plan.model), folder / "model.safetensors")
    return folder


def _forward(backend, x: torch.Tensor, repeats: int) -> tuple[list[float], torch.Tensor]:
    first = backend(x)  # warm-up: oneDNN primitives, ONNX Runtime / OpenVINO sessions
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - t0)
    return times, first.argmax(1).numpy()


def bench(run: Path, size: int, repeats: int) -> dict:
    """One forward of a (1, C, size, size) input per candidate; then autotune's own choice."""
    ref = Segmenter.load(run, device="cpu", backend=autotune.REFERENCE)
    plan, cpu = ref.plan, torch.device("cpu")
    x = torch.randn(1, plan.model.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    rows, labels = [], None
    for name, build in autotune.builders(run, plan, cpu, weights_digest(run / "model.safetensors"),
                                         ref.backend).items():
        t0 = time.perf_counter()
        try:
            backend = build()
        except Exception as e:  # noqa: BLE001 - a runtime that is missing is a row that says so
            rows.append({"backend": name, "error": str(e).splitlines()[0]})
            continue
        build_s = time.perf_counter() - t0
        times, got = _forward(backend, x, repeats)
        labels = got if labels is None else labels
        rows.append({"backend": name, "median_s": statistics.median(times), "min_s": min(times),
                     "build_s": round(build_s, 2), "agreement": label_agreement([labels], [got])})
    base = rows[0]["median_s"]
    for r in rows:
        if "median_s" in r:
            r["vs_torch_fp32"] = round(base / r["median_s"], 3)
    t0 = time.perf_counter()
    record = autotune.choose(run, plan, ref.backend, refresh=True)
    return {"rows": rows, "auto": record, "auto_seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="image side of the timed forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--run", type=Path, help="a trained run (default: the default plan, random weights)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    threads = runtime.set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        run = a.run or _default_run(Path(tmp), a.size)
        result = bench(run, a.size, a.repeats)
    facts = result["auto"]["machine"]
    print(f"{facts['cpu']} | {facts['isa']} | torch capability {facts['cpu_capability']} | "
          f"ONEDNN_MAX_CPU_ISA={facts['onednn_max_cpu_isa'] or '-'} | native bf16 {facts['cpu_bf16']} | "
          f"{threads} threads | torch {facts['torch']}, onnxruntime {facts['onnxruntime'] or '-'}, "
          f"openvino {facts['openvino'] or '-'}")
    print(f"\n{a.size}x{a.size} forward, batch 1, median of {a.repeats}:")
    print(f"{'backend':<22}{'median s':>10}{'min s':>8}{'vs fp32':>9}{'agreement':>11}{'build s':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['backend']:<22}{'-':>10}  {r['error']}")
            continue
        print(f"{r['backend']:<22}{r['median_s']:>10.3f}{r['min_s']:>8.3f}{r['vs_torch_fp32']:>8.2f}x"
              f"{r['agreement']:>11.6f}{r['build_s']:>9.2f}")
    tile = "x".join(map(str, result["auto"]["tile"][2:]))
    print(f"\n--backend auto on the plan's {tile} tile (measured in {result['auto_seconds']} s, "
          f"ONNX export included): {result['auto']['chosen']}")
    print(autotune.format_table(result["auto"]))
    if a.out:
        a.out.write_text(json.dumps({"size": a.size, "repeats": a.repeats, "threads": threads, **result},
                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
