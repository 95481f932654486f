"""fp32 NCHW vs useg's CPU fast path (bf16 autocast + channels_last), in one run, as ratios.

    .venv/bin/python benchmarks/precision.py [--repeats 5]

Prints a table and writes benchmarks/results/precision.json. Times are medians of repeated runs;
only the ratios between rows of the same run are meant to be compared (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from useg import UNet
from useg.losses import SegLoss
from useg.runtime import cpu_has_bf16, set_threads


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels on the first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(width: int, size: int, batch: int, repeats: int, train: bool) -> dict[str, float]:
    out = {}
    for name, bf16, cl in (("fp32 NCHW", False, False), ("fp32 channels_last", False, True),
                           ("bf16 + channels_last", True, True)):
        torch.manual_seed(0)
        net = UNet(1, 2, width=width, depth=4)
        fmt = torch.channels_last if cl else torch.contiguous_format
        net = net.to(memory_format=fmt)
        x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, 2, (batch, size, size))
        loss_fn = SegLoss()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(net=net, x=x, y=y, loss_fn=loss_fn, opt=opt, bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def forward(net=net, x=x, bf16=bf16):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(x)

        if train:
            net.train()
            out[name] = _median_time(step, repeats)
        else:
            net.eval()
            out[name] = _median_time(forward, repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    threads = set_threads()
    cases = [("forward, width 64, 1x512x512", 64, 512, 1, False),
             ("forward, width 32, 1x512x512", 32, 512, 1, False),
             ("train step, width 32, 8x256x256 (the default plan)", 32, 256, 8, True)]
    results = []
    print(f"threads {threads}, cpu bf16: {cpu_has_bf16()}")
    print(f"{'case':<52} {'path':<22} {'seconds':>8} {'vs fp32':>8}")
    for label, width, size, batch, train in cases:
        times = bench(width, size, batch, a.repeats, train)
        base = times["fp32 NCHW"]
        for name, t in times.items():
            print(f"{label:<52} {name:<22} {t:>8.3f} {base / t:>7.2f}x")
            results.append({"case": label, "path": name, "seconds": round(t, 4),
                            "speedup_vs_fp32": round(base / t, 3)})
    out = Path(__file__).parent / "results" / "precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": threads, "cpu_bf16": cpu_has_bf16(), "results": results}, indent=1)
                   + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
