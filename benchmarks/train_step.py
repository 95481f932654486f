"""The fp32 training step on a CPU: which memory format and optimizer implementation is fastest.

    .venv/bin/python benchmarks/train_step.py [--repeats 5] [--size 256] [--batch 4] [--width 32] [--compile]
                                              [--variants foreach,fused] [--out FILE]
    ONEDNN_MAX_CPU_ISA=AVX2 USEG_CPU_BF16=0 .venv/bin/python benchmarks/train_step.py   # as an AVX2-only CPU

Times useg's own ``step.train_step`` (the one step training runs) with the default network and
loss on random data, for each variant, interleaved (variant A, B, C, A, B, C, ...) so that the load
of a shared machine falls on all of them alike; prints medians and ratios against fp32 NCHW with
AdamW's default (foreach) implementation, and writes benchmarks/results/train_step.json. Only the
ratios of one run are meant to be compared. ``--variants`` picks some (their short names:
foreach, fused, forloop, cl-foreach, cl-fused; bf16-foreach, bf16-fused where bf16 is native: useg's
own step there, bf16 autocast + channels_last). The optimizer step alone (AdamW foreach and fused on
the network's parameters with random gradients) is timed too, to show its share of a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from useg import UNet, runtime
from useg.losses import SegLoss
from useg.step import train_step

BASE = "fp32 NCHW, AdamW foreach"
VARIANTS = {  # name: (memory format, AdamW implementation, bf16 autocast)
    BASE: (torch.contiguous_format, {"foreach": True}, False),
    "fp32 NCHW, AdamW fused": (torch.contiguous_format, {"fused": True}, False),
    "fp32 NCHW, AdamW for-loop": (torch.contiguous_format, {"foreach": False}, False),
    "fp32 channels_last, AdamW foreach": (torch.channels_last, {"foreach": True}, False),
    "fp32 channels_last, AdamW fused": (torch.channels_last, {"fused": True}, False),
    "bf16 channels_last, AdamW foreach": (torch.channels_last, {"foreach": True}, True),
    "bf16 channels_last, AdamW fused": (torch.channels_last, {"fused": True}, True),
}
SHORT = dict(zip(("foreach", "fused", "forloop", "cl-foreach", "cl-fused", "bf16-foreach", "bf16-fused"),
                 VARIANTS))


def _stepper(fmt, opt_kw, args, compiled: bool, bf16: bool = False):
    torch.manual_seed(0)
    net = UNet(1, 2, width=args.width, depth=4).to(memory_format=fmt).train()
    if compiled:
        net = torch.compile(net)
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (args.batch, args.size, args.size))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4, **opt_kw)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    prec = runtime.Precision(torch.bfloat16 if bf16 else None, fmt != torch.contiguous_format, False)
    loss_fn = SegLoss()
    dev = torch.device("cpu")
    return lambda: train_step(net, x, y, None, loss_fn, opt, scaler, dev, prec).item()


def _optimizer_alone(args, repeats: int) -> dict[str, float]:
    """Median seconds of one AdamW step alone, foreach and fused interleaved, on the network's parameters."""
    torch.manual_seed(0)
    params = [p.detach().clone().requires_grad_() for p in UNet(1, 2, width=args.width, depth=4).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {impl: torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-4,
                                    weight_decay=1e-4, **{impl: True}) for impl in ("foreach", "fused")}
    for opt in opts.values():
        for p, q in zip(opt.param_groups[0]["params"], params):
            p.grad = q.grad.clone()
        opt.step()  # the warm-up allocates the moments
    times = {impl: [] for impl in opts}
    for _ in range(repeats):
        for impl, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also torch.compile (its compile time is reported)")
    p.add_argument("--variants", default=",".join(list(SHORT)[:5]),
                   help=f"comma-separated short names of {', '.join(SHORT)}; default the fp32 ones")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    return p.parse_args()


def main() -> None:
    args = _parse()
    threads = runtime.set_threads()
    load_before = os.getloadavg()
    picked = [SHORT[v.strip()] for v in args.variants.split(",") if v.strip()]
    if not runtime.cpu_has_bf16():  # emulated bf16 is tens of times slower: not a variant worth timing
        picked = [name for name in picked if not VARIANTS[name][2]]
    variants = {name: VARIANTS[name] for name in [BASE, *picked]}
    steps, setup = {}, {}
    for name, (fmt, kw, bf16) in variants.items():
        t0 = time.perf_counter()
        steps[name] = _stepper(fmt, kw, args, compiled=False, bf16=bf16)
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
    alone = _optimizer_alone(args, max(20, args.repeats))
    base = statistics.median(times[BASE])
    rows = []
    print(f"train_step, width {args.width}, {args.batch} x {args.size}^2, {threads} threads, "
          f"isa {runtime.isa_level()}, bf16 native: {runtime.cpu_has_bf16()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"variant": name, "median_s": round(med, 4), "speedup": round(base / med, 3),
               "first_call_s": round(setup[name], 2), "times_s": [round(t, 4) for t in ts]}
        pair = name.replace("fused", "foreach")
        if pair != name and pair in times:  # round by round against its foreach twin: robust to load swings
            row["paired_vs_foreach"] = round(statistics.median(a / b for a, b in zip(times[pair], ts)), 3)
        rows.append(row)
        paired = f", paired vs foreach {row['paired_vs_foreach']:.2f}x" if "paired_vs_foreach" in row else ""
        print(f"  {name:40s} {med:7.3f} s  {base / med:5.2f}x  (first call {setup[name]:.1f} s{paired})")
    print(f"  AdamW step alone: foreach {alone['foreach'] * 1e3:.1f} ms, fused {alone['fused'] * 1e3:.1f} ms "
          f"({alone['foreach'] / alone['fused']:.2f}x)")
    result = {"machine": platform.processor() or platform.machine(), "isa_level": runtime.isa_level(),
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
              "cpu_bf16": runtime.cpu_has_bf16(), "threads": threads,
              "torch": torch.__version__, "size": args.size, "batch": args.batch, "width": args.width,
              "repeats": args.repeats, "rows": rows,
              "adamw_step_alone_s": {k: round(v, 5) for k, v in alone.items()},
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
