"""The fp32 training step on a CPU: which memory format and optimizer implementation is fastest.

    .venv/bin/python benchmarks/train_step.py [--repeats 5] [--size 256] [--batch 4] [--width 32] [--compile]
    ONEDNN_MAX_CPU_ISA=AVX2 USEG_CPU_BF16=0 .venv/bin/python benchmarks/train_step.py   # as an AVX2-only CPU

Times useg's own ``train.train_step`` (the one step training runs) with the default network and
loss on random data, for each variant, interleaved (variant A, B, C, A, B, C, ...) so that the load
of a shared machine falls on all of them alike; prints medians and ratios against fp32 NCHW with
AdamW's default (foreach) implementation, and writes benchmarks/results/train_step.json. Only the
ratios of one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from useg import UNet, runtime
from useg.losses import SegLoss
from useg.train import train_step

VARIANTS = {  # name: (memory format, AdamW implementation)
    "fp32 NCHW, AdamW foreach": (torch.contiguous_format, {"foreach": True}),
    "fp32 NCHW, AdamW fused": (torch.contiguous_format, {"fused": True}),
    "fp32 NCHW, AdamW for-loop": (torch.contiguous_format, {"foreach": False}),
    "fp32 channels_last, AdamW foreach": (torch.channels_last, {"foreach": True}),
    "fp32 channels_last, AdamW fused": (torch.channels_last, {"fused": True}),
}


def _stepper(fmt, opt_kw, args, compiled: bool):
    torch.manual_seed(0)
    net = UNet(1, 2, width=args.width, depth=4).to(memory_format=fmt).train()
    if compiled:
        net = torch.compile(net)
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (args.batch, args.size, args.size))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4, **opt_kw)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    prec = runtime.Precision(None, fmt != torch.contiguous_format, False)
    loss_fn = SegLoss()
    dev = torch.device("cpu")
    return lambda: train_step(net, x, y, None, loss_fn, opt, scaler, dev, prec).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also torch.compile (its compile time is reported)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = p.parse_args()
    threads = runtime.set_threads()
    variants = dict(VARIANTS)
    steps, setup = {}, {}
    for name, (fmt, kw) in variants.items():
        t0 = time.perf_counter()
        steps[name] = _stepper(fmt, kw, args, compiled=False)
        steps[name]()  # warm-up: oneDNN picks its kernels on the first call
        setup[name] = time.perf_counter() - t0
    if args.compile:
        t0, name = time.perf_counter(), "fp32 NCHW compiled, AdamW foreach"
        steps[name] = _stepper(torch.contiguous_format, {"foreach": True}, args, True)
        steps[name]()
        setup[name] = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32 NCHW, AdamW foreach"])
    rows = []
    print(f"train_step, width {args.width}, {args.batch} x {args.size}^2, {threads} threads, "
          f"bf16 native: {runtime.cpu_has_bf16()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_s": round(med, 4), "speedup": round(base / med, 3),
                     "first_call_s": round(setup[name], 2)})
        print(f"  {name:40s} {med:7.3f} s  {base / med:5.2f}x  (first call {setup[name]:.1f} s)")
    result = {"machine": platform.processor() or platform.machine(), "threads": threads,
              "torch": torch.__version__, "size": args.size, "batch": args.batch, "width": args.width,
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
