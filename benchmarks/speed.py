"""useg's speed against plain PyTorch and MONAI, in one run, as ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/speed.py [--repeats N] [--quick] [--device cpu|cuda]
                                                        [--out benchmarks/results/speed.json]

Sections (every figure is the median of ``--repeats`` timed runs after one warm-up, except the
end-to-end and 3-D predictions: median of ``--heavy-repeats`` runs, default min(repeats, 2) so the
default run stays within ~12 minutes on 2 cores, 1 with --quick):

1. matmul GFLOP/s in fp32 and bf16 (2048^2 ``torch.mm``): the machine's capacity, so the model
   figures below read as a fraction of it.
2. U-Net forward at 512^2, batch 1, width 64 and 32, depth 4, same padding: useg's default path
   (``runtime.pick_precision(device, "auto")`` + its memory format + inference mode, what
   :class:`useg.predict.Segmenter` does) vs the same network in plain fp32 NCHW vs MONAI's
   ``BasicUNet`` with the same widths in fp32 (and under useg's autocast as an extra row).
   GFLOP/s come from counting conv FLOPs with forward hooks.
3. End-to-end prediction of a random 4096^2 uint8 PNG, file to file, each side in a fresh
   subprocess (its own peak RSS): ``Segmenter.load(run).predict_files`` vs PIL + z-score +
   ``monai.inferers.sliding_window_inference`` (gaussian, overlap 0.25, 4 tiles a batch) with the
   SAME network in fp32. The run is width 16, depth 4, tile 512, overlap 0.25: 121 tiles, about
   half a minute for useg on 2 cores (width 32 would take ~2.5 min a side and blow the budget).
4. Training images/s, batch 4 x 256^2, width 32, depth 4, Dice + CE, AdamW: useg's step (what
   :func:`useg.train.fit` runs per step: autocast, memory format, grad scaler, clipping) vs a plain
   fp32 NCHW loop.
5. 3-D: a 128x256x256 (D, H, W) volume, 3-D U-Net width 16 depth 3, tile 64x128x128, overlap
   0.25: :func:`useg.predict.predict_labels` vs MONAI's sliding window with the same model in fp32.

Writes ``benchmarks/results/speed.json`` (``speed_cuda.json`` with ``--device cuda``) atomically.
Only ratios between rows of one run are meant to be compared: the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# useg is imported from the checkout's src, so only after the sys.path line above
from useg import runtime  # noqa: E402
from useg.checkpoint import load_weights, save_model  # noqa: E402
from useg.labels import LabelMap  # noqa: E402
from useg.losses import SegLoss  # noqa: E402
from useg.model import UNet  # noqa: E402
from useg.planner import make_plan  # noqa: E402
from useg.spec import Overrides  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(fn, repeats: int, dev: torch.device, warmup: bool = True) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one untimed warm-up)."""
    if warmup:
        fn()
        sync(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of every Conv / ConvTranspose in one forward of ``x``.

    Conv: 2 * Cin/groups * Cout * prod(k) per output element. ConvTranspose: the same per *input*
    element (each input value is scattered over prod(k) outputs for every output channel).
    """
    total = [0]

    def hook(m, inputs, out):
        taps = 2 * (m.in_channels // m.groups) * m.out_channels * math.prod(m.kernel_size)
        if isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
            total[0] += taps * inputs[0].numel() // m.in_channels
        else:
            total[0] += taps * out.numel() // m.out_channels

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, torch.nn.modules.conv._ConvNd)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def monai_unet(dims: int, width: int) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    w = width
    return BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2,
                     features=(w, w, 2 * w, 4 * w, 8 * w, w))


# ------------------------------------------------------------------------------------------ sections


def bench_matmul(dev, n, repeats):
    rows, out = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=dev).to(dtype)
        t = median_time(lambda a=a: torch.mm(a, a), repeats, dev)
        out[name] = 2 * n**3 / t / 1e9
        rows.append({"section": "matmul", "name": f"torch.mm {n}^2 {name}", "seconds": t,
                     "gflops": out[name]})
    return rows, out


def bench_forward(dev, size, widths, repeats, bf16_mm):
    prec = runtime.pick_precision(dev, "auto")
    fmt = runtime.memory_format(2, prec)
    rows, ratios = [], {}
    for w in widths:
        torch.manual_seed(0)
        net = UNet(1, 2, width=w, depth=4, padding="same").eval()
        x = torch.randn(1, 1, size, size)
        flops = conv_flops(net, x)
        plain, plain_x = copy.deepcopy(net).to(dev), x.to(dev)
        useg_net = net.to(dev, memory_format=fmt)
        useg_x = x.to(dev).contiguous(memory_format=fmt)
        mon = monai_unet(2, w).eval().to(dev)
        mon_flops = conv_flops(mon, plain_x)

        def useg_fwd():
            with torch.inference_mode(), runtime.autocast(dev, prec):
                useg_net(useg_x)  # noqa: B023 - called within this iteration

        def plain_fwd():
            with torch.inference_mode():
                plain(plain_x)  # noqa: B023 - called within this iteration

        def monai_fwd():
            with torch.inference_mode():
                mon(plain_x)  # noqa: B023 - called within this iteration

        mon_fast = copy.deepcopy(mon).to(memory_format=fmt)

        def monai_amp():
            with torch.inference_mode(), runtime.autocast(dev, prec):
                mon_fast(useg_x)  # noqa: B023 - called within this iteration

        t_useg = median_time(useg_fwd, repeats, dev)
        t_plain = median_time(plain_fwd, repeats, dev)
        t_mon = median_time(monai_fwd, repeats, dev)
        label = f"{size}^2 w{w}"
        gf = flops / t_useg / 1e9
        rows += [
            {"section": "forward", "name": f"useg {prec.name}{'+CL' if prec.channels_last else ''} {label}",
             "seconds": t_useg, "gflops": gf, "vs_bf16_matmul": gf / bf16_mm},
            {"section": "forward", "name": f"plain fp32 NCHW {label}", "seconds": t_plain,
             "gflops": flops / t_plain / 1e9, "ratio": t_plain / t_useg},
            {"section": "forward", "name": f"MONAI BasicUNet fp32 {label}", "seconds": t_mon,
             "gflops": mon_flops / t_mon / 1e9, "ratio": t_mon / t_useg},
        ]
        if prec.dtype is not None:
            t_amp = median_time(monai_amp, repeats, dev)
            rows.append({"section": "forward", "name": f"MONAI BasicUNet {prec.name} {label}",
                         "seconds": t_amp, "gflops": mon_flops / t_amp / 1e9, "ratio": t_amp / t_useg})
        if not ratios:  # the widest network gives the headline figures
            ratios = {"forward_vs_fp32": t_plain / t_useg, "forward_vs_bf16_matmul": gf / bf16_mm,
                      "forward_vs_monai": t_mon / t_useg, "forward_gflops": gf}
    return rows, ratios


def make_run(folder: Path, shape, width, depth, tile, overlap, batch) -> Path:
    plan = make_plan(LabelMap((0, 255)), 1, [tuple(shape)], overrides=Overrides(
        model={"width": width, "depth": depth, "padding": "same"},
        infer={"overlap": overlap, "batch_size": batch}, patch_size=tuple(tile)))
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(folder / "plan.json")
    save_model(UNet.from_config(plan.model), folder / "model.safetensors")
    return folder


def child(spec: dict) -> dict:
    """One end-to-end prediction in this (fresh) process: seconds and this process's peak RSS."""
    dev = runtime.pick_device(spec["device"])
    runtime.set_threads()
    png, run, out = Path(spec["png"]), Path(spec["run"]), Path(spec["out"])
    t0 = time.perf_counter()
    if spec["side"] == "useg":
        from useg.predict import Segmenter

        Segmenter.load(run, device=spec["device"]).predict_files([png], out, overwrite=True)
    else:
        from monai.inferers import sliding_window_inference
        from PIL import Image as PILImage

        from useg.plan import Plan

        plan = Plan.load(run / "plan.json")
        model = UNet.from_config(plan.model)
        load_weights(model, run / "model.safetensors")
        model = model.to(dev).eval()
        img = np.asarray(PILImage.open(png)).astype(np.float32)
        img = (img - img.mean()) / max(float(img.std()), 1e-8)
        x = torch.from_numpy(img)[None, None].to(dev)
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=tuple(plan.infer.tile),
                                              sw_batch_size=plan.infer.batch_size, predictor=model,
                                              overlap=plan.infer.overlap, mode="gaussian")
            labels = logits.argmax(1)[0].to("cpu", torch.uint8).numpy()
        out.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(labels * 255).save(out / (png.stem + ".png"))
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ru_maxrss survives exec on Linux (a child started from
    a big parent reports the parent's size), so read the kernel's per-image high-water mark first."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(spec: dict) -> dict:
    # keep the caller's path (a wheel folder on a GPU machine, say) behind the checkout's src
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{spec['side']} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_predict(dev, work: Path, size, width, tile, repeats):
    from PIL import Image as PILImage

    png = work / "image.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)).save(png)
    run = make_run(work / "run2d", (size, size), width, 4, (tile, tile), 0.25, 4)
    res = {}
    for side in ("useg", "monai"):
        got = [run_child({"side": side, "device": str(dev), "png": str(png), "run": str(run),
                          "out": str(work / f"out_{side}")}) for _ in range(repeats)]
        res[side] = {"seconds": statistics.median(g["seconds"] for g in got),
                     "rss_mb": statistics.median(g["rss_mb"] for g in got)}
    a = np.asarray(PILImage.open(work / "out_useg" / "image.png"))
    b = np.asarray(PILImage.open(work / "out_monai" / "image.png"))
    agree = float((a == b).mean())
    cuda = dev.type == "cuda"
    rows = [{"section": "predict", "name": f"useg predict_files {size}^2 w{width} tile {tile}",
             "seconds": res["useg"]["seconds"], **({} if cuda else {"rss_mb": res["useg"]["rss_mb"]}),
             "label_agreement": agree},
            {"section": "predict", "name": f"MONAI sliding_window fp32 {size}^2",
             "seconds": res["monai"]["seconds"],
             **({} if cuda else {"rss_mb": res["monai"]["rss_mb"]}),
             "ratio": res["monai"]["seconds"] / res["useg"]["seconds"]}]
    ratios = {"predict_vs_monai": res["monai"]["seconds"] / res["useg"]["seconds"],
              "predict_rss_vs_monai": None if cuda else res["useg"]["rss_mb"] / res["monai"]["rss_mb"]}
    return rows, ratios


def bench_train(dev, batch, size, width, repeats):
    from useg.train import train_step

    prec = runtime.pick_precision(dev, "auto")
    fmt = runtime.memory_format(2, prec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g).to(dev)
    y = torch.randint(0, 2, (batch, size, size), generator=g).to(dev)
    loss_fn = SegLoss("dice_ce")
    torch.manual_seed(0)
    base = UNet(1, 2, width=width, depth=4)

    net = copy.deepcopy(base).to(dev, memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    xf = x.contiguous(memory_format=fmt)

    def useg_step():  # the step useg.train.fit takes
        train_step(net, xf, y, None, loss_fn, opt, scaler, dev, prec)

    plain = copy.deepcopy(base).to(dev).train()
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step():
        loss = loss_fn(plain(x), y)
        popt.zero_grad()
        loss.backward()
        popt.step()

    t_useg = median_time(useg_step, repeats, dev)
    t_plain = median_time(plain_step, repeats, dev)
    label = f"batch {batch} x {size}^2 w{width}"
    rows = [{"section": "train", "name": f"useg step {prec.name} {label}", "seconds": t_useg,
             "images_per_s": batch / t_useg},
            {"section": "train", "name": f"plain fp32 NCHW step {label}", "seconds": t_plain,
             "images_per_s": batch / t_plain, "ratio": t_plain / t_useg}]
    return rows, {"train_vs_fp32": t_plain / t_useg}


def bench_3d(dev, volume, tile, width, depth, repeats):
    from monai.inferers import sliding_window_inference

    from useg.backends import TorchBackend
    from useg.predict import predict_labels
    from useg.preprocess import normalize

    prec = runtime.pick_precision(dev, "auto")
    plan = make_plan(LabelMap((0, 1)), 1, [tuple(volume)], overrides=Overrides(
        model={"width": width, "depth": depth, "padding": "same"},
        infer={"overlap": 0.25, "batch_size": 2}, patch_size=tuple(tile)))
    torch.manual_seed(0)
    base = UNet.from_config(plan.model).eval()
    x = normalize(np.random.default_rng(0).standard_normal((1, *volume)).astype(np.float32))
    net = copy.deepcopy(base).to(dev, memory_format=runtime.memory_format(3, prec))
    plain = base.to(dev)

    def useg_pred():
        return predict_labels(TorchBackend(net, plan, dev, prec), x, plan)

    def monai_pred():
        with torch.inference_mode():
            xt = torch.from_numpy(x)[None].to(dev)
            out = sliding_window_inference(xt, roi_size=tuple(plan.infer.tile),
                                           sw_batch_size=plan.infer.batch_size, predictor=plain,
                                           overlap=plan.infer.overlap, mode="gaussian")
            return out.argmax(1)[0].cpu().numpy()

    t_useg = median_time(useg_pred, repeats, dev, warmup=False)
    t_mon = median_time(monai_pred, repeats, dev, warmup=False)
    label = f"{'x'.join(map(str, volume))} w{width} d{depth} tile {'x'.join(map(str, plan.infer.tile))}"
    rows = [{"section": "3d", "name": f"useg predict_labels {prec.name} {label}", "seconds": t_useg},
            {"section": "3d", "name": f"MONAI sliding_window fp32 {label}", "seconds": t_mon,
             "ratio": t_mon / t_useg}]
    return rows, {"predict3d_vs_monai": t_mon / t_useg}


# ---------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[dict]) -> None:
    extras = ("gflops", "vs_bf16_matmul", "images_per_s", "rss_mb", "label_agreement", "ratio")
    head = f"{'section':8} {'row':58} {'seconds':>9} " + " ".join(f"{e:>15}" for e in extras)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r[e]:>15.3g}" if isinstance(r.get(e), float) else f"{'':>15}" for e in extras)
        print(f"{r['section']:8} {r['name'][:58]:58} {r['seconds']:>9.3f} {cells}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median); default 5")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: checks the script runs, not a measurement")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/speed[_cuda].json")
    ap.add_argument("--heavy-repeats", type=int, default=None,
                    help="runs of the end-to-end and 3-D predictions (median); default min(repeats, 2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    dev = runtime.pick_device(args.device)
    threads = runtime.set_threads()
    q, reps = args.quick, max(1, args.repeats)
    heavy = max(1, args.heavy_repeats) if args.heavy_repeats else 1 if q else min(reps, 2)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "speed_cuda.json" if dev.type == "cuda" else "speed.json")
    rows: list[dict] = []
    t_start = time.perf_counter()

    def stage(name):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}", file=sys.stderr, flush=True)

    stage("matmul")
    r, mm = bench_matmul(dev, 1024 if q else 2048, reps)
    rows += r
    stage("forward")
    r, fwd = bench_forward(dev, 256 if q else 512, (32, 16) if q else (64, 32), reps, mm["bf16"])
    rows += r
    stage("end-to-end predict (subprocesses)")
    with tempfile.TemporaryDirectory(prefix="useg-speed-") as tmp:
        r, pred = bench_predict(dev, Path(tmp), 1024 if q else 4096, 16, 256 if q else 512, heavy)
    rows += r
    stage("training step")
    r, tr = bench_train(dev, 2 if q else 4, 128 if q else 256, 16 if q else 32, reps)
    rows += r
    stage("3-D predict")
    vol, tile = ((32, 64, 64), (16, 32, 32)) if q else ((128, 256, 256), (64, 128, 128))
    r, p3 = bench_3d(dev, vol, tile, 8 if q else 16, 3, heavy)
    rows += r
    stage("done")

    result = {
        "machine": {"cpu": cpu_name(), "cores": runtime.cpu_count(), "threads": threads,
                    "cpu_bf16": runtime.cpu_has_bf16(), "torch": torch.__version__, "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "precision": runtime.pick_precision(dev, "auto").name,
                    "python": platform.python_version()},
        "quick": q, "repeats": reps, "heavy_repeats": heavy, "total_seconds": time.perf_counter() - t_start,
        "fp32_matmul_gflops": mm["fp32"], "bf16_matmul_gflops": mm["bf16"],
        **fwd, **pred, **tr, **p3, "rows": rows,
    }
    print_table(rows)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    from useg.files import atomic_path

    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
