"""Peak memory and time of one end-to-end prediction per backend and tiles-a-call setting (issue 11).

    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py [--repeats 2] [--note TEXT]
    ONEDNN_MAX_CPU_ISA=AVX2 USEG_CPU_BF16=0 PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py

Why the end-to-end predict of ``speed.py`` (a random 4096^2 PNG, width 16, depth 4, 512^2 tiles,
overlap 0.25, 121 tiles, the plan's batch of 4 tiles) held more memory under ONNX Runtime than
MONAI's: each variant predicts the file once in a fresh subprocess and reports its kernel high-water
mark (``VmHWM``) and seconds, the variants interleaved ``--repeats`` times. Variants: a backend
(``torch-fp32``, ``onnxruntime``, ``openvino``) with the plan's batch of 4 tiles a call or one tile a
call (``/1``), ONNX Runtime with its CPU memory arena or memory pattern off (``ort-noarena``,
``ort-nopattern``), ``auto`` (``useg.autotune.load_segmenter``, the CLI's default, which times the
batch and picks the tiles a call; its measurement read from the cache, as every prediction after a
machine's first reads it; ``auto-fresh`` measures in the run, as the first does), and MONAI's
``sliding_window_inference`` fp32 (``speed.py``'s own child). Also the peak of the imports alone.
Writes ``benchmarks/results/predict_memory-<isa>.json`` atomically; backend timings go to a temporary
cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

VARIANTS = ("monai", "auto-fresh", "auto", "torch-fp32", "torch-fp32/1", "onnxruntime", "onnxruntime/1",
            "ort-noarena", "ort-nopattern", "openvino", "openvino/1")
IMPORTS = ("torch", "torch, onnxruntime", "torch, openvino", "torch, monai.inferers")


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _session_without(option: str):
    """useg's ONNX Runtime session with one memory ``option`` off (the arena or the memory pattern)."""
    import onnxruntime as ort

    from useg import runtime

    def session(path, providers=None, threads=None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads or runtime.cpu_count(), 1
        opts.log_severity_level = 3
        setattr(opts, option, False)
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    return session


def child(variant: str, run: Path, png: Path, out: Path) -> dict:
    """One prediction of ``png`` in this fresh process: seconds, peak RSS, backend, tiles a call."""
    import dataclasses

    from useg import backends, runtime
    from useg.autotune import load_segmenter
    from useg.predict import Segmenter

    runtime.set_threads()
    name, _, per = variant.partition("/")
    if name == "auto-fresh":  # a first prediction on this machine: measured (and exported) now
        os.environ["USEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="useg-cache-", dir=out.parent)
        name = "auto"
    if name.startswith("ort-"):
        backends.onnx_session = _session_without({"ort-noarena": "enable_cpu_mem_arena",
                                                  "ort-nopattern": "enable_mem_pattern"}[name])
        name = "onnxruntime"
    t0 = time.perf_counter()
    seg = load_segmenter(run, device="cpu") if name == "auto" else Segmenter.load(run, "cpu", backend=name)
    if per:
        infer = dataclasses.replace(seg.plan.infer, batch_size=int(per))
        seg.plan = dataclasses.replace(seg.plan, infer=infer)
    seg.predict_files([png], out, overwrite=True)
    return {"variant": variant, "backend": seg.backend.name, "tiles_a_call": seg.plan.infer.batch_size,
            "seconds": time.perf_counter() - t0, "rss_mb": _hwm_mb()}


def _run(cmd: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE.parent / "src"),
                                                                   os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{cmd[2:4]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every variant; default 2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; default all")
    ap.add_argument("--note", action="append", default=[], help="a note for the JSON (the machine's load)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], *map(Path, args.child[1:]))))
        return {}
    import numpy as np
    import speed
    import torch
    from PIL import Image

    from useg import runtime

    load_before = os.getloadavg()
    peak = ("from pathlib import Path; import json; print(json.dumps(int([l for l in Path('/proc/self/"
            "status').read_text().splitlines() if l.startswith('VmHWM')][0].split()[1]) // 1024))")
    imports = {m: _run([sys.executable, "-c", f"import {m}; {peak}"]) for m in IMPORTS}
    got: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    with tempfile.TemporaryDirectory(prefix="useg-predict-memory-") as tmp:
        work = Path(tmp)
        os.environ["USEG_CACHE_DIR"] = str(work / "cache")
        png = work / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (4096, 4096), dtype=np.uint8)).save(png)
        run = speed.make_run(work / "run2d", (4096, 4096), 16, 4, (512, 512), 0.25, 4)
        from useg.export import export_run

        export_run(run)  # the named ONNX Runtime and OpenVINO variants read the run's own export
        for _ in range(args.repeats):
            for v in got:
                if v == "monai":
                    r = speed.run_child({"side": "monai", "precision": "fp32", "device": "cpu",
                                         "png": str(png), "run": str(run), "out": str(work / "out_monai")})
                    r = {"variant": v, "backend": "monai-fp32", "tiles_a_call": 4, **r}
                else:
                    r = _run([sys.executable, __file__, "--child", v, str(run), str(png), str(work / "out")])
                got[v].append(r)
                print(f"{v:<16} {r['seconds']:7.2f} s {r['rss_mb']:7.0f} MB  ({r['backend']}, "
                      f"{r['tiles_a_call']} a call)", flush=True)
    rows = [{"variant": v, "backend": rs[-1]["backend"], "tiles_a_call": rs[-1]["tiles_a_call"],
             "seconds": statistics.median(r["seconds"] for r in rs),
             "rss_mb": statistics.median(r["rss_mb"] for r in rs), "runs": rs} for v, rs in got.items()]
    monai = next((r for r in rows if r["variant"] == "monai"), None)
    for r in rows:
        if monai:
            r["rss_vs_monai"] = r["rss_mb"] / monai["rss_mb"]
            r["monai_s_over_s"] = monai["seconds"] / r["seconds"]
    result = {"machine": speed.machine_record(torch.device("cpu"), runtime.set_threads(), args.note),
              "load_average": speed.load_average(load_before), "import_peak_mb": imports,
              "repeats": args.repeats, "rows": rows}
    speed.write_json(args.out or HERE / "results" / f"predict_memory-{runtime.isa_level()}.json", result)
    return result


if __name__ == "__main__":
    main()
