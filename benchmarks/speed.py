"""useg's speed against plain PyTorch and MONAI on the machine at hand, in one run, as ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/speed.py [--quick] [--repeats N] [--device cpu|cuda]
                                                        [--note TEXT] [--out FILE]
    ONEDNN_MAX_CPU_ISA=AVX2 USEG_CPU_BF16=0 PYTHONPATH=src .venv/bin/python benchmarks/speed.py --quick

The JSON says which machine: CPU model, its effective ISA level (``useg.runtime.isa_level``: AVX2,
AVX-512, AVX512-BF16 or AMX from /proc/cpuinfo, capped by ``ONEDNN_MAX_CPU_ISA`` and
``USEG_CPU_BF16=0``, so the second line measures this CPU as an AVX2-only one), threads, torch and
runtime versions, the load average before and after, and caveats; every useg row names its backend.
It goes to ``benchmarks/results/speed-<isa>.json`` (``speed-avx2.json``, ``speed-avx512-bf16.json``,
...) on the CPU and ``speed_cuda.json`` with ``--device cuda``. Only ratios between rows of one run
are meant to be compared: the machine may be shared.

Sections (every figure is the median of ``--repeats`` timed runs after one warm-up, except the
end-to-end and 3-D predictions: median of ``--heavy-repeats`` runs, default min(repeats, 2)):

1. matmul GFLOP/s in fp32 and (where native) bf16 (2048^2 ``torch.mm``): the machine's capacity, so
   the model figures below read as a fraction of it.
2. backends: the default plan's network (width 32, depth 4, same padding, batch norm) on a
   ``--size``^2 image (512), batch 1, through every candidate of ``--backend auto``
   (``useg.autotune.candidates``: torch fp32 NCHW, channels_last, bf16 where native, ONNX Runtime,
   OpenVINO) and MONAI's ``BasicUNet`` of the same widths in fp32 and, where native, under bf16
   autocast with channels_last (MONAI's best precision here), all timed interleaved (A, B, C, A, B, C,
   ...) so a shared machine's load falls on all alike; then ``useg.autotune.choose``'s own bounded
   measurement on the plan's tile names the backend ``auto`` picks. ``forward_vs_fp32`` is the torch
   fp32 NCHW time over the picked backend's, ``backend`` its name. ``--quick`` runs sections 1 and 2
   alone (under 3 minutes on 2 cores).
3. torch forward at 512^2, width 64 and 32: useg's torch path (``runtime.pick_precision(device,
   "auto")`` + its memory format + inference mode) vs the same network in plain fp32 NCHW vs MONAI's
   ``BasicUNet`` in fp32 and under the same autocast (the table of earlier runs).
4. End-to-end prediction of a 4096^2 uint8 PNG of synthetic cells, file to file, by a network
   trained :data:`TRAIN_STEPS` steps on such cells first (:func:`trained_run`), each side in a fresh
   subprocess (its own peak RSS), the sides interleaved: ``useg.autotune.load_segmenter(run,
   backend="auto").predict_files`` (the CLI's default; the one-off measurement is done before and
   timed apart, as a user's later predictions read it from the cache) vs PIL + z-score +
   ``monai.inferers.sliding_window_inference`` (gaussian, overlap 0.25, 4 tiles a batch) with the
   SAME network in fp32 and, where native, under bf16 autocast with channels_last. The run is width
   16, depth 4, tile 512, overlap 0.25: 121 tiles. Where bf16 is native, useg also runs with its
   bf16 backend named (``openvino-bf16`` where installed, else ``torch-bf16``): the pipeline against
   MONAI's at equal precision (``predict_low_vs_monai_low``), whatever ``auto``'s agreement gate
   decided.
5. Training images/s, batch 4 x 256^2, width 32, depth 4, Dice + CE, AdamW: useg's step (what
   :func:`useg.train.fit` runs per step: autocast, memory format, grad scaler, clipping, its
   optimizer) vs a plain fp32 NCHW loop.
6. 3-D: a 128x256x256 (D, H, W) volume, 3-D U-Net width 16 depth 3, tile 64x128x128, overlap
   0.25: :func:`useg.predict.predict_labels` with the backend ``--backend auto`` picks (measured
   before the timing; ``predict3d_auto_vs_monai``) and with the torch backend in useg's precision
   (``predict3d_vs_monai``, the GPU goal's row: the device accumulator) vs MONAI's sliding window
   with the same model in fp32.

Backend timings and the on-the-fly ONNX export go to a temporary cache (``USEG_CACHE_DIR``), so every
run measures afresh and the user's cache is left alone. ONNX Runtime's own kernels (MLAS) do not read
``ONEDNN_MAX_CPU_ISA``: under a cap its rows are the real CPU's, which the JSON's ``caveats`` say.
The file is written atomically.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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


def interleaved_medians(fns: dict, repeats: int, dev: torch.device) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, the calls interleaved (A, B, C, A, B, C, ...) so that
    the load of a shared machine falls on every one alike; each has had its warm-up already."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def best_precision(dev: torch.device) -> runtime.Precision | None:
    """The low precision a peer gets too where this device runs it natively (bf16 autocast with
    channels_last on a bf16 CPU, useg's pick on CUDA); None where fp32 is the best there is."""
    prec = runtime.pick_precision(dev, "auto")
    return prec if prec.dtype is not None else None


def torch_backend_name(prec: runtime.Precision) -> str:
    """The ``useg.backends.BACKENDS`` name of a torch precision path."""
    if prec.dtype is None:
        return "torch-channels-last" if prec.channels_last else "torch-fp32"
    return f"torch-{prec.name}"


# ------------------------------------------------------------------------------------------ sections


def bench_matmul(dev, n, repeats):
    rows, out = [], {"fp32": None, "bf16": None}
    native_bf16 = dev.type == "cuda" or runtime.cpu_has_bf16()  # emulated bf16 would only measure emulation
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and not native_bf16:
            continue
        a = torch.randn(n, n, device=dev).to(dtype)
        t = median_time(lambda a=a: torch.mm(a, a), repeats, dev)
        out[name] = 2 * n**3 / t / 1e9
        rows.append({"section": "matmul", "name": f"torch.mm {n}^2 {name}", "seconds": t,
                     "gflops": out[name]})
    return rows, out


def default_run(folder: Path, size: int) -> Path:
    """The default plan for ``size``^2 single-channel images, seeded random weights."""
    plan = make_plan(LabelMap((0, 255)), 1, [(size, size)])
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(folder / "plan.json")
    torch.manual_seed(0)
    save_model(UNet.from_config(plan.model), folder / "model.safetensors")
    return folder


def _candidate_forwards(run: Path, dev: torch.device, x: torch.Tensor) -> tuple[dict, dict, list[dict], dict]:
    """Each ``--backend auto`` candidate built, warmed up and its labels taken: (name -> call,
    name -> labels, rows of the ones that could not run, name -> seconds to build and run once,
    the ONNX export included in the first that needs it)."""
    from useg import autotune
    from useg.checkpoint import weights_digest
    from useg.predict import Segmenter

    ref = Segmenter.load(run, device=str(dev), backend=autotune.REFERENCE)
    calls, labels, failed, builds = {}, {}, [], {}
    builders = autotune.builders(run, ref.plan, dev, weights_digest(run / "model.safetensors"), ref.backend)
    for name, build in builders.items():
        t0 = time.perf_counter()
        try:
            backend = build()
            labels[name] = backend(x).argmax(1).cpu().numpy()  # warm-up: oneDNN primitives, sessions
        except Exception as e:  # noqa: BLE001 - a runtime that is missing is a row that says so
            failed.append({"section": "backends", "name": name, "backend": name, "seconds": float("nan"),
                           "error": (str(e).splitlines() or [type(e).__name__])[0][:120]})
            continue
        calls[name] = (lambda b=backend: b(x))
        builds[name] = time.perf_counter() - t0
        logger_line(f"  {name}: built and first pass in {builds[name]:.1f} s")
    return calls, labels, failed, builds


def _monai_forwards(dev: torch.device, width: int, x: torch.Tensor) -> tuple[dict, dict]:
    """MONAI BasicUNet in fp32 NCHW and, where native, under bf16 autocast with channels_last."""
    torch.manual_seed(0)
    mon = monai_unet(2, width).eval().to(dev)
    xd = x.to(dev)
    calls, labels = {}, {}

    def fp32():
        with torch.inference_mode():
            return mon(xd)

    calls["MONAI BasicUNet fp32"] = fp32
    prec = best_precision(dev)
    if prec is not None:
        fmt = runtime.memory_format(2, prec)
        fast, xf = copy.deepcopy(mon).to(memory_format=fmt), xd.contiguous(memory_format=fmt)

        def low():
            with torch.inference_mode(), runtime.autocast(dev, prec):
                return fast(xf)

        calls[f"MONAI BasicUNet {prec.name}"] = low
    for name, fn in calls.items():
        labels[name] = fn().float().argmax(1).cpu().numpy()  # the warm-up
    return calls, labels


def bench_backends(dev, work: Path, size: int, repeats: int, mm: dict):
    """Every backend candidate and MONAI on the default network's ``size``^2 forward, interleaved;
    then autotune's own choice on the plan's tile."""
    from useg import autotune
    from useg.plan import Plan
    from useg.predict import Segmenter, label_agreement

    run = default_run(work / "default", size)
    plan = Plan.load(run / "plan.json")
    width = plan.model.width
    x = torch.randn(1, plan.model.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    calls, labels, failed, builds = _candidate_forwards(run, dev, x)
    mon_calls, mon_labels = _monai_forwards(dev, width, x)
    t = interleaved_medians({**calls, **mon_calls}, repeats, dev)
    flops = conv_flops(UNet.from_config(plan.model).eval(), x)
    mon_flops = conv_flops(monai_unet(2, width).eval(), x)
    t0 = time.perf_counter()
    ref = Segmenter.load(run, device=str(dev), backend=autotune.REFERENCE)
    record = autotune.choose(run, ref.plan, ref.backend, refresh=True)
    auto_s = time.perf_counter() - t0
    chosen, base = record["chosen"], t.get(autotune.REFERENCE)
    label = f"{size}^2 w{width}"
    rows = []
    for name in calls:
        gf = flops / t[name] / 1e9
        rows.append({"section": "backends", "name": f"{name} {label}", "backend": name, "seconds": t[name],
                     "gflops": gf, "vs_fp32": base / t[name],
                     "agreement": label_agreement([labels[autotune.REFERENCE]], [labels[name]]),
                     "first_pass_s": round(builds[name], 2), "chosen": name == chosen})
    rows += failed
    chosen_t = t.get(chosen)
    for name in mon_calls:
        rows.append({"section": "backends", "name": f"{name} {label}", "seconds": t[name],
                     "gflops": mon_flops / t[name] / 1e9, "ratio": t[name] / chosen_t if chosen_t else None,
                     "agreement": label_agreement([mon_labels["MONAI BasicUNet fp32"]], [mon_labels[name]])})
    gf = flops / chosen_t / 1e9 if chosen_t else None
    best_mm = mm["bf16"] or mm["fp32"]
    mon_best = min(t[n] for n in mon_calls)
    ratios = {"backend": chosen, "forward_vs_fp32": base / chosen_t if chosen_t else None,
              "fastest_backend_at_size": min(calls, key=t.get),
              "forward_gflops": gf, "forward_vs_fp32_matmul": gf / mm["fp32"] if gf else None,
              "forward_vs_best_matmul": gf / best_mm if gf else None,
              "forward_vs_monai": t["MONAI BasicUNet fp32"] / chosen_t if chosen_t else None,
              "forward_vs_monai_best": mon_best / chosen_t if chosen_t else None,
              "auto": {"tile": record["tile"], "timings": record["timings"], "chosen": chosen,
                       "seconds": round(auto_s, 2)}}
    return rows, ratios


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
        share = gf / bf16_mm if bf16_mm else None
        rows += [
            {"section": "forward", "name": f"useg {prec.name}{'+CL' if prec.channels_last else ''} {label}",
             "backend": torch_backend_name(prec), "seconds": t_useg, "gflops": gf, "vs_bf16_matmul": share},
            {"section": "forward", "name": f"plain fp32 NCHW {label}", "seconds": t_plain,
             "gflops": flops / t_plain / 1e9, "ratio": t_plain / t_useg},
            {"section": "forward", "name": f"MONAI BasicUNet fp32 {label}", "seconds": t_mon,
             "gflops": mon_flops / t_mon / 1e9, "ratio": t_mon / t_useg},
        ]
        if prec.dtype is not None:
            t_amp = median_time(monai_amp, repeats, dev)
            rows.append({"section": "forward", "name": f"MONAI BasicUNet {prec.name} {label}",
                         "seconds": t_amp, "gflops": mon_flops / t_amp / 1e9, "ratio": t_amp / t_useg})
        if not ratios:  # the widest network gives the headline figures of earlier runs
            ratios = {"torch_forward_vs_fp32": t_plain / t_useg, "torch_forward_vs_bf16_matmul": share,
                      "torch_forward_vs_monai": t_mon / t_useg, "torch_forward_gflops": gf}
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


TRAIN_STEPS = 40  # of the end-to-end run's network: enough for bf16 to agree with fp32 as in use


def trained_run(folder: Path, dev, size: int, width: int, tile: int, steps: int) -> tuple[Path, np.ndarray]:
    """The end-to-end run: width ``width``, depth 4, ``tile``^2 tiles (overlap 0.25, 4 a batch), its
    network trained ``steps`` steps (batch 2, 256^2 patches at most) on four ``tile``^2 synthetic-cell
    images; and a ``size``^2 uint8 image of those cells tiled. A trained network is as confident as
    a user's, so the agreement gate of ``--backend auto`` sees what it sees in use (random weights
    leave near-tied logits, on which no bf16 path agrees with fp32 on 99.9% of pixels)."""
    from useg.preprocess import normalize
    from useg.synthetic import make_cells
    from useg.train import fit

    rng = np.random.default_rng(0)
    cells = [make_cells((tile, tile), rng=rng) for _ in range(4)]
    images = [normalize(img[None].astype(np.float32)) for img, _ in cells]
    labels = [(inst > 0).astype(np.int64) for _, inst in cells]
    plan = make_plan(LabelMap((0, 255)), 1, [(size, size)], overrides=Overrides(
        model={"width": width, "depth": 4, "padding": "same"},
        infer={"overlap": 0.25, "batch_size": 4}, patch_size=(min(256, tile),) * 2,
        train={"epochs": 1, "iters_per_epoch": steps, "batch_size": 2}))
    # trained on smaller patches (4x cheaper a step), predicted with the benchmark's tile
    plan = dataclasses.replace(plan, infer=dataclasses.replace(plan.infer, tile=(tile, tile)))
    torch.manual_seed(0)
    fit(plan, (images, labels), (images[:1], labels[:1]), folder, device=str(dev), quiet=True)
    reps = -(-size // tile)
    image = np.tile(np.stack([img for img, _ in cells[:2]]).reshape(2 * tile, tile), (reps // 2 + 1, reps))
    return folder, np.ascontiguousarray(image[:size, :size])


def _monai_predict(spec: dict, dev: torch.device, png: Path, run: Path, out: Path) -> None:
    """PIL + z-score + MONAI's sliding window with the run's network, in fp32 or (``spec["precision"]``
    bf16 / fp16) under autocast with channels_last, as a user would give MONAI its fast path."""
    from monai.inferers import sliding_window_inference
    from PIL import Image as PILImage

    from useg.plan import Plan

    plan = Plan.load(run / "plan.json")
    model = UNet.from_config(plan.model)
    load_weights(model, run / "model.safetensors")
    mode = spec.get("precision", "fp32")  # fp32: plain NCHW, as MONAI runs by default (on CUDA too)
    prec = runtime.Precision(None, False, False) if mode == "fp32" else runtime.pick_precision(dev, mode)
    fmt = runtime.memory_format(2, prec)
    model = model.to(dev, memory_format=fmt).eval()
    img = np.asarray(PILImage.open(png)).astype(np.float32)
    img = (img - img.mean()) / max(float(img.std()), 1e-8)
    x = torch.from_numpy(img)[None, None].to(dev)

    def predictor(tiles):
        return model(tiles.contiguous(memory_format=fmt))

    with torch.inference_mode(), runtime.autocast(dev, prec):
        logits = sliding_window_inference(x, roi_size=tuple(plan.infer.tile),
                                          sw_batch_size=plan.infer.batch_size, predictor=predictor,
                                          overlap=plan.infer.overlap, mode="gaussian")
    labels = logits.float().argmax(1)[0].to("cpu", torch.uint8).numpy()
    out.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(labels * 255).save(out / (png.stem + ".png"))


def child(spec: dict) -> dict:
    """One end-to-end prediction in this (fresh) process: seconds, this process's peak RSS, backend."""
    dev = runtime.pick_device(spec["device"])
    runtime.set_threads()
    png, run, out = Path(spec["png"]), Path(spec["run"]), Path(spec["out"])
    t0 = time.perf_counter()
    if spec["side"] == "useg":
        from useg.autotune import load_segmenter

        # auto: the CLI's default
        seg = load_segmenter(run, device=spec["device"], backend=spec.get("backend", "auto"))
        seg.predict_files([png], out, overwrite=True)
        backend = seg.backend.name
    else:
        _monai_predict(spec, dev, png, run, out)
        backend = spec.get("precision", "fp32")
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mb": _peak_rss_mb(), "backend": backend}


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

    from useg import autotune
    from useg.predict import Segmenter

    png = work / "image.png"
    t0 = time.perf_counter()
    run, image = trained_run(work / "run2d", dev, size, width, tile, TRAIN_STEPS)
    train_s = time.perf_counter() - t0
    PILImage.fromarray(image).save(png)
    # auto's one-off measurement (ONNX export included), cached for the timed children as for a user
    t0 = time.perf_counter()
    ref = Segmenter.load(run, device=str(dev), backend=autotune.REFERENCE)
    record = autotune.choose(run, ref.plan, ref.backend, refresh=True)
    auto_s = time.perf_counter() - t0
    low = best_precision(dev)
    sides = {"useg": {}, "monai": {"precision": "fp32"}}
    if low:
        sides["monai-low"] = {"precision": low.name}
        # the same precision named for useg: auto refuses a bf16 path that disagrees with fp32, so
        # this row is the pipeline against MONAI's at equal precision whatever the gate decided
        sides["useg-low"] = {"backend": _low_backend(dev, low.name)}
        if sides["useg-low"]["backend"].startswith("openvino"):
            from useg.export import export_run

            export_run(run)  # a named backend reads the run's own export
    got: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):  # interleaved, each in a fresh process
        for side, extra in sides.items():
            got[side].append(run_child({"side": "useg" if side.startswith("useg") else "monai", **extra,
                                        "device": str(dev), "png": str(png), "run": str(run),
                                        "out": str(work / f"out_{side}")}))
    res = {side: {"seconds": statistics.median(g["seconds"] for g in gs),
                  "rss_mb": statistics.median(g["rss_mb"] for g in gs), "backend": gs[-1]["backend"]}
           for side, gs in got.items()}
    a = np.asarray(PILImage.open(work / "out_useg" / "image.png"))
    b = np.asarray(PILImage.open(work / "out_monai" / "image.png"))
    cuda = dev.type == "cuda"

    def rss(side):
        return {} if cuda else {"rss_mb": res[side]["rss_mb"]}

    u = res["useg"]["seconds"]
    rows = [{"section": "predict", "name": f"useg predict_files {size}^2 w{width} tile {tile}",
             "backend": res["useg"]["backend"], "seconds": u, **rss("useg"),
             "label_agreement": float((a == b).mean())},
            {"section": "predict", "name": f"useg --backend auto's one-off measurement (w{width})",
             "backend": record["chosen"], "seconds": auto_s},
            {"section": "predict", "name": f"MONAI sliding_window fp32 {size}^2",
             "seconds": res["monai"]["seconds"], **rss("monai"), "ratio": res["monai"]["seconds"] / u}]
    ratios = {"predict_backend": res["useg"]["backend"], "predict_vs_monai": res["monai"]["seconds"] / u,
              "predict_rss_vs_monai": None if cuda else res["useg"]["rss_mb"] / res["monai"]["rss_mb"],
              "predict_auto_seconds": round(auto_s, 2), "predict_train_seconds": round(train_s, 1),
              "predict_train_steps": TRAIN_STEPS}
    if low:
        m = res["monai-low"]["seconds"]
        c = np.asarray(PILImage.open(work / "out_monai-low" / "image.png"))
        rows.append({"section": "predict", "name": f"MONAI sliding_window {low.name} autocast+CL {size}^2",
                     "seconds": m, **rss("monai-low"), "ratio": m / u,
                     "label_agreement": float((c == b).mean())})
        ratios["predict_vs_monai_best"] = m / u
        ul = res["useg-low"]["seconds"]
        d = np.asarray(PILImage.open(work / "out_useg-low" / "image.png"))
        rows.append({"section": "predict", "name": f"useg predict_files {size}^2, backend of {low.name}",
                     "backend": res["useg-low"]["backend"], "seconds": ul, **rss("useg-low"), "ratio": m / ul,
                     "label_agreement": float((d == b).mean())})
        ratios["predict_low_vs_monai_low"] = m / ul
    return rows, ratios


def _low_backend(dev, mode: str) -> str:
    """useg's backend of precision ``mode``: OpenVINO's bf16 on the CPU where installed, else torch's."""
    from useg import autotune

    name = f"openvino-{mode}"
    return name if dev.type == "cpu" and name in autotune.candidates(dev) else f"torch-{mode}"


def bench_train(dev, batch, size, width, repeats):
    from useg import step

    prec = runtime.pick_precision(dev, "auto")
    fmt = runtime.memory_format(2, prec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g).to(dev)
    y = torch.randint(0, 2, (batch, size, size), generator=g).to(dev)
    loss_fn = SegLoss("dice_ce")
    torch.manual_seed(0)
    base = UNet(1, 2, width=width, depth=4)

    net = copy.deepcopy(base).to(dev, memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)  # as step.make_optimizer: torch's default, foreach
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    xf = x.contiguous(memory_format=fmt)

    def useg_step():  # the step useg.train.fit takes
        step.train_step(net, xf, y, None, loss_fn, opt, scaler, dev, prec)

    plain = copy.deepcopy(base).to(dev).train()
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step():
        loss = loss_fn(plain(x), y)
        popt.zero_grad()
        loss.backward()
        popt.step()

    useg_step()
    plain_step()  # the warm-ups; then interleaved
    t = interleaved_medians({"useg": useg_step, "plain": plain_step}, repeats, dev)
    label = f"batch {batch} x {size}^2 w{width}"
    impl = "fused" if opt.defaults.get("fused") else "foreach"
    rows = [{"section": "train", "name": f"useg step {prec.name} AdamW {impl} {label}",
             "backend": torch_backend_name(prec), "seconds": t["useg"], "images_per_s": batch / t["useg"]},
            {"section": "train", "name": f"plain fp32 NCHW step {label}", "seconds": t["plain"],
             "images_per_s": batch / t["plain"], "ratio": t["plain"] / t["useg"]}]
    return rows, {"train_vs_fp32": t["plain"] / t["useg"]}


def bench_3d(dev, work: Path, volume, tile, width, depth, repeats):
    from monai.inferers import sliding_window_inference

    from useg.autotune import load_segmenter
    from useg.backends import TorchBackend
    from useg.predict import predict_labels
    from useg.preprocess import normalize

    prec = runtime.pick_precision(dev, "auto")
    plan = make_plan(LabelMap((0, 1)), 1, [tuple(volume)], overrides=Overrides(
        model={"width": width, "depth": depth, "padding": "same"},
        infer={"overlap": 0.25, "batch_size": 2}, patch_size=tuple(tile)))
    torch.manual_seed(0)
    base = UNet.from_config(plan.model).eval()
    run = work / "run3d"
    run.mkdir(parents=True, exist_ok=True)
    plan.save(run / "plan.json")
    save_model(base, run / "model.safetensors")
    x = normalize(np.random.default_rng(0).standard_normal((1, *volume)).astype(np.float32))
    net = copy.deepcopy(base).to(dev, memory_format=runtime.memory_format(3, prec))
    plain = base.to(dev)
    auto = load_segmenter(run, device=str(dev))  # measured now, before the timing, as a cache would hold it

    def useg_pred():
        return predict_labels(TorchBackend(net, plan, dev, prec), x, plan)

    def auto_pred():
        return predict_labels(auto.backend, x, auto.plan)

    def monai_pred():
        with torch.inference_mode():
            xt = torch.from_numpy(x)[None].to(dev)
            out = sliding_window_inference(xt, roi_size=tuple(plan.infer.tile),
                                           sw_batch_size=plan.infer.batch_size, predictor=plain,
                                           overlap=plan.infer.overlap, mode="gaussian")
            return out.argmax(1)[0].cpu().numpy()

    t_auto = median_time(auto_pred, repeats, dev, warmup=False)
    t_useg = median_time(useg_pred, repeats, dev, warmup=False)
    t_mon = median_time(monai_pred, repeats, dev, warmup=False)
    label = f"{'x'.join(map(str, volume))} w{width} d{depth} tile {'x'.join(map(str, plan.infer.tile))}"
    rows = [{"section": "3d", "name": f"useg predict_labels, --backend auto, {label}",
             "backend": auto.backend.name, "tiles_a_call": auto.plan.infer.batch_size, "seconds": t_auto,
             "ratio_monai": t_mon / t_auto},
            {"section": "3d", "name": f"useg predict_labels, torch backend {prec.name}, {label}",
             "backend": torch_backend_name(prec), "seconds": t_useg},
            {"section": "3d", "name": f"MONAI sliding_window fp32 {label}", "seconds": t_mon,
             "ratio": t_mon / t_useg}]
    return rows, {"predict3d_vs_monai": t_mon / t_useg, "predict3d_auto_vs_monai": t_mon / t_auto,
                  "predict3d_auto_backend": auto.backend.name}


# ---------------------------------------------------------------------------------------------- main


def logger_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine_record(dev: torch.device, threads: int, notes: list[str]) -> dict:
    """Which machine this is: :func:`useg.autotune.machine_facts` (CPU model, ISA flags, the oneDNN
    cap, native bf16, threads, versions) plus the effective ISA level, cores and caveats."""
    from useg import autotune

    facts = autotune.machine_facts(dev)
    cap = facts["onednn_max_cpu_isa"]
    caveats = ["only ratios between rows of one run are meant to be compared: the machine may be shared "
               "(see load_average)"]
    if cap:
        caveats.append(f"ONEDNN_MAX_CPU_ISA={cap} caps oneDNN (torch, OpenVINO's CPU plugin) only: ONNX "
                       f"Runtime's own MLAS kernels ignore it, so its rows are this CPU's real ISA "
                       f"({facts['isa']}), not the cap's; torch's ATen kernels report capability "
                       f"{facts['cpu_capability']} (ATEN_CPU_CAPABILITY would cap them)")
    return {**facts, "isa_level": runtime.isa_level(), "useg_cpu_bf16": os.environ.get("USEG_CPU_BF16", ""),
            "cores": runtime.cpu_count(), "threads": threads, "precision": runtime.pick_precision(dev).name,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "python": platform.python_version(), "caveats": caveats, "notes": notes}


def print_table(rows: list[dict]) -> None:
    extras = ("gflops", "vs_bf16_matmul", "vs_fp32", "images_per_s", "rss_mb", "label_agreement", "ratio")
    head = f"{'section':8} {'row':58} {'seconds':>9} " + " ".join(f"{e[:12]:>12}" for e in extras)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r[e]:>12.4g}" if isinstance(r.get(e), float) else f"{'':>12}" for e in extras)
        mark = " *" if r.get("chosen") else ""
        print(f"{r['section']:8} {r['name'][:58]:58} {r['seconds']:>9.3f} {cells}{mark}")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median); default 5")
    ap.add_argument("--quick", action="store_true",
                    help="the matmul and the backends' forward rows alone (under 3 minutes on 2 cores)")
    ap.add_argument("--tiny", action="store_true",
                    help="toy sizes in every section: checks the script runs, not a measurement")
    ap.add_argument("--size", type=int, default=512, help="image side of the backends' forward; default 512")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/speed-<isa>.json (speed_cuda.json on CUDA)")
    ap.add_argument("--heavy-repeats", type=int, default=None,
                    help="runs of the end-to-end and 3-D predictions (median); default min(repeats, 2)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the machine record (e.g. what else ran); may be repeated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_sections(dev, args, work: Path) -> tuple[list[dict], dict]:
    reps = max(1, args.repeats)
    heavy = max(1, args.heavy_repeats) if args.heavy_repeats else min(reps, 2)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def stage(name):
        logger_line(f"[{time.perf_counter() - t_start:6.1f}s] {name}")

    tiny = args.tiny  # every section at toy sizes: checks the script runs, measures nothing
    stage("matmul")
    r, mm = bench_matmul(dev, 256 if tiny else 2048, reps)
    rows += r
    stage("backends (every --backend auto candidate, MONAI; interleaved)")
    r, figures = bench_backends(dev, work, 64 if tiny else args.size, reps, mm)
    rows += r
    if not args.quick:
        stage("torch forward")
        r, fwd = bench_forward(dev, 64 if tiny else 512, (16, 8) if tiny else (64, 32), reps, mm["bf16"])
        rows += r
        stage("end-to-end predict (subprocesses)")
        size, width, tile = (256, 8, 64) if tiny else (4096, 16, 512)
        r, pred = bench_predict(dev, work, size, width, tile, heavy)
        rows += r
        stage("training step")
        r, tr = bench_train(dev, 2 if tiny else 4, 64 if tiny else 256, 8 if tiny else 32, reps)
        rows += r
        stage("3-D predict")
        vol, tile = ((16, 32, 32), (16, 16, 16)) if tiny else ((128, 256, 256), (64, 128, 128))
        r, p3 = bench_3d(dev, work, vol, tile, 4 if tiny else 16, 3 if not tiny else 2, heavy)
        rows += r
        figures = {**figures, **fwd, **pred, **tr, **p3}
    stage("done")
    return rows, {"fp32_matmul_gflops": mm["fp32"], "bf16_matmul_gflops": mm["bf16"], **figures,
                  "repeats": reps, "heavy_repeats": None if args.quick else heavy,
                  "total_seconds": time.perf_counter() - t_start}


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    dev = runtime.pick_device(args.device)
    threads = runtime.set_threads()
    out = args.out or ROOT / "benchmarks" / "results" / (
        "speed_cuda.json" if dev.type == "cuda" else f"speed-{runtime.isa_level()}.json")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="useg-speed-") as tmp:
        # a fresh cache: every run measures and exports anew, the user's cache is neither read nor written
        os.environ["USEG_CACHE_DIR"] = str(Path(tmp) / "cache")
        rows, figures = run_sections(dev, args, Path(tmp))
    machine = machine_record(dev, threads, args.note)
    machine["load_average"] = load_average(load_before)
    result = {"machine": machine, "quick": args.quick, "tiny": args.tiny, **figures, "rows": rows}
    print_table(rows)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "auto")}, indent=1))
    write_json(out, result)
    return result


def load_average(before: tuple[float, ...]) -> dict:
    """The 1, 5 and 15-minute load averages before a run (given) and now: how shared the machine was."""
    return {"before": [round(v, 2) for v in before], "after": [round(v, 2) for v in os.getloadavg()]}


def write_json(out: Path, result: dict) -> None:
    """``result`` as indented JSON in ``out``, atomically (a temporary name, renamed when complete)."""
    from useg.files import atomic_path

    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
