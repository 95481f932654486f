"""Measured backend choice: time each prediction backend on this machine, keep the fastest that agrees.

``useg predict --backend auto`` (the default) follows no fixed rule: the fastest path depends on
the CPU (AVX2, AVX-512, AVX512-BF16, AMX), its threads and the installed runtimes (on an AVX2-only
EPYC ONNX Runtime ran the default network 2.0x faster than fp32 PyTorch, issue 11; benchmarks/backends.py).
So, once per machine and run:

1. the candidates (:func:`candidates`): torch fp32 NCHW (the reference), torch fp32 channels_last,
   bf16 autocast (only where the CPU runs it natively, :func:`useg.runtime.cpu_has_bf16`), ONNX
   Runtime and OpenVINO (exported on the fly into a cache, :func:`useg.autotune_cache.onnx_file`),
   and OpenVINO in bf16 where native (2.0x its fp32 on a 512^2 tile of an AVX512-BF16 EPYC);
   on CUDA fp32, bf16 and fp16 autocast with channels_last;
2. each runs one tile of the plan's shape (the validation tile training left in the run, else a
   seeded random one); its labels must agree with fp32's on :data:`useg.predict.AGREEMENT_MIN` of
   the pixels, or it is ineligible (:func:`measure`);
3. the eligible ones are timed for a bounded time (:data:`BUDGET_S` seconds in all, at most
   :data:`MAX_REPS` passes each, the median kept) and the fastest wins (:func:`decide`);
   the winner is timed once more on the plan's batch of tiles (on the CPU only where the batch holds
   at most :data:`BATCH_VOXELS_CPU` voxels), which prediction then uses only where it is at least
   :data:`BATCH_GAIN` faster a tile than one tile a call (:func:`tiles_per_call`):
   a CPU runtime's memory grows with the batch, its speed often not (a 4096^2 predict at 512^2 tiles,
   batch 4 against 1: ONNX Runtime 10.2 s / 1530 MB against 10.2 s / 910 MB, OpenVINO 9.4 / 1150
   against 9.4 / 800, torch fp32 32 / 1120 against 23 / 790, though the forward alone took 6-11%
   less time a tile in the batch; at 128^2 tiles the batch took 29-37% less, BENCHMARKS.md);
4. the measurement is cached in the user's cache folder (:mod:`useg.autotune_cache`, one file per weights
   hash; never in the run folder, which predict leaves unchanged) under a key of the machine
   (:func:`machine_key`: CPU model, ISA flags, threads, torch and runtime versions, device) with
   the tile shape; another machine, other weights or another tile measure again. An unwritable
   cache folder only means measuring again next time.

``useg info RUN`` shows the table (:func:`format_table`); ``--backend NAME`` skips all of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import runlog, runtime
from .autotune_cache import agreement_tile, onnx_file, read_cached, write_cached
from .backends import (
    BACKENDS,
    WEIGHTS_FILE,
    Backend,
    OnnxBackend,
    OpenVinoBackend,
    onnx_session,
    read_sidecar,
)
from .checkpoint import weights_digest
from .configrun import chosen_runs
from .folds import fold_runs
from .plan import Plan
from .postprocess_run import read_postprocessing
from .predict import AGREEMENT_MIN, Segmenter, label_agreement

logger = logging.getLogger(__name__)

AUTO = "auto"  # the --backend value that measures
REFERENCE = "torch-fp32"  # plain fp32 PyTorch (NCHW on the CPU): what every candidate must agree with
REFERENCE_ENSEMBLE = "torch"  # a fold ensemble's members: each in the precision its training checked
BUDGET_S = 3.0  # seconds of timed passes for all candidates together (first passes and exports not counted)
MAX_REPS = 5  # timed passes per candidate at most; the median is kept
BATCH_GAIN = 0.25  # a batch of tiles per call must be this much faster a tile to be used (it costs memory)
# On the CPU a batch is timed only up to this many voxels a call (one 512^2 tile): timing a bigger one
# costs a first prediction the batch's memory, to save 6-11% of the forward's time a tile
BATCH_VOXELS_CPU = 512 * 512
EXPORTED = ("onnxruntime", "openvino")  # the candidates that run the ONNX export, not the PyTorch model
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")  # from cpuinfo


@dataclasses.dataclass(frozen=True)
class Timing:
    """One candidate's measurement."""

    name: str  # a useg.backends.BACKENDS name
    ms: float | None  # median milliseconds per tile of the plan's shape; None: not timed
    agreement: float | None  # share of the tile's pixels labelled as fp32 labels them; None: did not run
    note: str = ""  # why it was not timed: not available, disagrees with fp32


def decide(timings: Sequence[Timing], threshold: float = AGREEMENT_MIN) -> str:
    """The fastest candidate that agrees with fp32 on at least ``threshold`` of the pixels.

    Candidates never timed or below the threshold are never chosen; when none is left, the
    reference (:data:`REFERENCE`). Equal times keep the earlier (simpler) candidate.

    >>> decide([Timing("torch-fp32", 10.0, 1.0), Timing("onnxruntime", 5.0, 0.9999),
    ...         Timing("torch-bf16", 2.0, 0.99)])
    'onnxruntime'
    >>> decide([Timing("torch-bf16", 2.0, 0.5)])
    'torch-fp32'
    """
    eligible = [t for t in timings if t.ms is not None and (t.agreement or 0.0) >= threshold]
    return min(eligible, key=lambda t: t.ms).name if eligible else REFERENCE


def tiles_per_call(ms_one: float | None, ms_batch: float | None, batch: int,
                   gain: float = BATCH_GAIN) -> int:
    """Tiles per network call: the plan's ``batch`` where it is ``gain`` faster a tile than one, else 1.

    >>> tiles_per_call(100.0, 60.0, 4), tiles_per_call(100.0, 90.0, 4), tiles_per_call(100.0, None, 4)
    (4, 1, 1)
    """
    if batch <= 1 or ms_one is None or ms_batch is None:
        return 1
    return batch if ms_batch * (1.0 + gain) <= ms_one else 1


def machine_key(facts: Mapping[str, str]) -> str:
    """A short stable hash of what makes timings differ between machines (:func:`machine_facts`).

    >>> machine_key({"cpu": "EPYC", "threads": "2"}) == machine_key({"threads": "2", "cpu": "EPYC"})
    True
    >>> len(machine_key({})), machine_key({"threads": "2"}) != machine_key({"threads": "4"})
    (16, True)
    """
    return hashlib.sha256(json.dumps(dict(facts), sort_keys=True).encode()).hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and its ISA flags of :data:`ISA_FLAGS` (Linux; elsewhere the platform's name)."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), []
    lines = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    flags = set(lines.get("flags", "").split())
    return lines.get("model name", platform.machine()), [f for f in ISA_FLAGS if f in flags]


def machine_facts(device: torch.device) -> dict[str, str]:
    """What :func:`machine_key` hashes: CPU model, ISA flags and caps, threads, versions, device."""
    model, flags = _cpuinfo()
    facts = {"cpu": model, "isa": " ".join(flags), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
             "cpu_bf16": "yes" if runtime.cpu_has_bf16() else "no", "threads": str(torch.get_num_threads()),
             "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
             "openvino": _version("openvino"), "device": str(device)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def candidates(device: torch.device) -> list[str]:
    """The backends worth timing on ``device``, the reference first.

    bf16 (torch's autocast, OpenVINO's) only where it is native (emulated bf16 is tens of times slower
    than fp32 on AVX2); ONNX Runtime and OpenVINO where installed; on CUDA the autocast precisions
    with channels_last.
    """
    if device.type == "cuda":
        return [REFERENCE, *(["torch-bf16"] if torch.cuda.is_bf16_supported() else []), "torch-fp16"]
    if device.type != "cpu":
        return [REFERENCE]
    bf16 = runtime.cpu_has_bf16()
    names = [REFERENCE, "torch-channels-last", *(["torch-bf16"] if bf16 else [])]
    names += [n for n in EXPORTED if importlib.util.find_spec(n) is not None]
    return names + (["openvino-bf16"] if bf16 and "openvino" in names else [])


def _labels(probs: torch.Tensor, regions: bool) -> np.ndarray:
    p = probs.detach().float().cpu()
    return (p > 0.5).numpy() if regions else p.argmax(1).numpy()


def _median_ms(backend: Backend, tile: torch.Tensor, budget_s: float, reps: int, timer: Callable[[], float]):
    """Median ms per tile of up to ``reps`` passes, stopping after ``budget_s`` (one pass at least)."""
    times: list[float] = []
    start = timer()
    while len(times) < reps and (not times or timer() - start < budget_s):
        t0 = timer()
        out = backend(tile)
        if out.is_cuda:  # CUDA runs asynchronously: the pass ends when its result is there
            torch.cuda.synchronize(out.device)
        times.append(timer() - t0)
    return round(1000.0 * statistics.median(times) / tile.shape[0], 3)


def measure(builders: Mapping[str, Callable[[], Backend]], tile: torch.Tensor, regions: bool = False,
            budget_s: float = BUDGET_S, reps: int = MAX_REPS, timer: Callable[[], float] = time.perf_counter,
            threshold: float = AGREEMENT_MIN, keep: dict | None = None) -> list[Timing]:
    """Check and time each candidate on ``tile``.

    The first pass of a candidate (its warm-up: oneDNN primitives, sessions) gives its labels,
    compared with the first candidate's (the reference); an agreeing candidate then runs timed
    passes for its share of ``budget_s``.

    Args:
        builders: name -> a function building the backend; the first is the reference, and its
            errors (a broken run folder) are raised, the others' recorded as "unavailable".
        tile: (B, C, *tile) float32 input.
        regions: sigmoid outputs (labels are each region's mask) instead of softmax (argmax).
        budget_s: seconds of timed passes in all; reps: timed passes per candidate at most.
        timer: the clock (tests pass a fake one); threshold: the agreement needed.
        keep: if given, filled with name -> the built backend of the fastest agreeing candidate (the
            others are let go as soon as a faster one is timed: each holds its runtime's memory).

    Returns:
        One :class:`Timing` per candidate, in order.
    """
    share = budget_s / max(len(builders), 1)
    reference, out = None, []
    for name, build in builders.items():
        backend = None  # the previous candidate, unless kept, is freed before the next is built
        try:
            backend = build()
            labels = _labels(backend(tile), regions)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is only not chosen
            if reference is None:
                raise
            logger.info("backend %s is unavailable here: %s", name, e)
            why = (str(e).splitlines() or [type(e).__name__])[0][:80]
            out.append(Timing(name, None, None, f"unavailable: {why}"))
            continue
        reference = labels if reference is None else reference
        agree = round(label_agreement([reference], [labels]), 6)
        if agree < threshold:
            out.append(Timing(name, None, agree, "disagrees with fp32"))
            continue
        out.append(Timing(name, _median_ms(backend, tile, share, reps, timer), agree))
        if keep is not None and decide(out, threshold) == name:
            keep.clear()
            keep[name] = backend
    return out


def builders(run: Path, plan: Plan, device: torch.device, digest: str,
             reference: Backend | None = None) -> dict[str, Callable[[], Backend]]:
    """name -> a function building that candidate (:func:`candidates`) for ``run`` on ``device``."""
    onnx: list[Path] = []

    def onnx_path() -> Path:  # exported once, shared by ONNX Runtime and OpenVINO
        if not onnx:
            onnx.append(onnx_file(run, digest))
        return onnx[0]

    def build(name: str) -> Callable[[], Backend]:
        if name == REFERENCE and reference is not None:
            return lambda: reference
        if name == "onnxruntime":
            return lambda: OnnxBackend(onnx_session(onnx_path()), plan)
        if name.startswith("openvino"):
            precision = name.partition("-")[2] or "fp32"
            return lambda: OpenVinoBackend.compile(onnx_path(), plan, precision=precision)
        return lambda: BACKENDS[name](run, str(device), "auto")[1]

    return {name: build(name) for name in candidates(device)}


def _batch_ms(backend: Backend, tile: torch.Tensor, batch: int, budget_s: float) -> float:
    """Median ms a tile of ``backend`` on ``batch`` copies of ``tile`` in one call (after a warm-up call)."""
    tiles = tile.expand(batch, *tile.shape[1:]).contiguous()
    backend(tiles)  # a new shape: sessions and oneDNN primitives are prepared on the first call
    return _median_ms(backend, tiles, budget_s / 2, MAX_REPS, time.perf_counter)


def choose(run: Path, plan: Plan, reference: Backend, budget_s: float = BUDGET_S,
           refresh: bool = False, keep: dict | None = None) -> dict:
    """The measurement of ``run`` on this machine: cached, or measured now and cached.

    Args:
        run: the run folder; plan: its plan; reference: its :data:`REFERENCE` backend (built by the
            caller, which also checks the folder).
        budget_s: seconds of timed passes; refresh: measure even when a cached record fits.
        keep: filled with the backends built while measuring (name -> backend).

    Returns:
        The record: ``machine`` facts, ``weights_sha256``, ``tile`` (the timed input's shape),
        ``timings`` (one :class:`Timing` dict per candidate), ``chosen`` (a BACKENDS name),
        ``batch`` (the plan's tiles per call) and ``batch_ms`` (the chosen backend's ms a tile at
        it), ``tiles_per_call`` (:func:`tiles_per_call`), ``cached`` (whether it was read rather
        than measured).
    """
    device = reference.device
    facts = machine_facts(device)
    key, digest = machine_key(facts), weights_digest(run / WEIGHTS_FILE)
    tile = agreement_tile(run, plan)
    cached = None if refresh else read_cached(key, digest, list(tile.shape))
    if cached is not None and "tiles_per_call" in cached:  # records before the batch timing: measure
        return {**cached, "cached": True}
    t0 = time.perf_counter()
    kept = {} if keep is None else keep
    timings = measure(builders(run, plan, device, digest, reference), tile, bool(plan.data.regions),
                      budget_s, keep=kept)
    chosen = decide(timings)
    ms_one = next(t.ms for t in timings if t.name == chosen) if chosen in kept else None
    batch = plan.infer.batch_size
    timed = ms_one is not None and batch > 1 and (
        device.type != "cpu" or batch * math.prod(tile.shape[2:]) <= BATCH_VOXELS_CPU)
    ms_batch = _batch_ms(kept[chosen], tile, batch, budget_s) if timed else None
    record = {"machine": facts, "weights_sha256": digest, "tile": list(tile.shape),
              "timings": [dataclasses.asdict(t) for t in timings], "chosen": chosen,
              "batch": batch, "batch_ms": ms_batch, "tiles_per_call": tiles_per_call(ms_one, ms_batch, batch),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_cached(key, record)
    logger.info("backend %s, measured on this machine in %.1f s:\n%s", record["chosen"], record["seconds"],
                format_table(record))
    return {**record, "cached": False}


def load_segmenter(run: str | Path, device: str = "auto", backend: str = AUTO,
                   budget_s: float = BUDGET_S, postprocessing: bool = True,
                   folds: Sequence[int] | None = None, configuration: str | None = None) -> Segmenter:
    """:meth:`useg.predict.Segmenter.load` with ``backend="auto"``: the fastest agreeing backend here.

    Any other ``backend`` name (and ``postprocessing``) is passed through unchanged. A cross-validated
    run's fold ensemble (or ``folds``) runs on the run's PyTorch models: ``auto`` times single networks.
    A multi-configuration run's one chosen configuration (or ``configuration``) is loaded as its own run;
    the ensemble of two runs on PyTorch models too.
    """
    chosen = chosen_runs(run, configuration)
    if chosen is not None and len(chosen) > 1:
        return Segmenter.load(run, device=device, backend=REFERENCE_ENSEMBLE if backend == AUTO else backend,
                              postprocessing=postprocessing, folds=folds, configuration=configuration)
    run = chosen[0] if chosen else run
    if backend != AUTO or fold_runs(run, folds):
        return Segmenter.load(run, device=device, backend=REFERENCE_ENSEMBLE if backend == AUTO else backend,
                              postprocessing=postprocessing, folds=folds)
    fast = _from_cache(Path(run), device, postprocessing)
    if fast is not None:
        return fast
    # checks the folder; the reference
    seg = Segmenter.load(run, device=device, backend=REFERENCE, postprocessing=postprocessing)
    kept: dict[str, Backend] = {}
    record = choose(Path(run), seg.plan, seg.backend, budget_s, keep=kept)
    name, n = record["chosen"], int(record["tiles_per_call"])
    plan = dataclasses.replace(seg.plan, infer=dataclasses.replace(seg.plan.infer, batch_size=n))
    chosen = seg.backend if name == REFERENCE else (
        kept.get(name) or builders(Path(run), seg.plan, seg.backend.device, record["weights_sha256"])[name]())
    logger.info("prediction backend: %s, %d tile(s) a call (%s)", name, n,
                "cached measurement" if record["cached"] else "measured")
    return Segmenter(plan, chosen, seg.postprocessing)


def _from_cache(run: Path, device: str, postprocessing: bool) -> Segmenter | None:
    """The cached choice of an exported runtime, built without the reference PyTorch model.

    Building that model only to learn the plan and the device cost 1.5 s of a 10 s predict (torch's
    first parameter initialisation imports much of torch), and its memory; the record is keyed by the
    weights' hash, so its export is of these weights, and the export's sidecar must hold this very
    plan. None where anything does not fit (no export yet, an edited plan.json): the full load.
    """
    runlog.refuse_unloadable(run)
    plan = Plan.load(run / "plan.json")
    dev = runtime.pick_device(device)
    digest = weights_digest(run / WEIGHTS_FILE)
    record = read_cached(machine_key(machine_facts(dev)), digest, list(agreement_tile(run, plan).shape))
    if record is None or "tiles_per_call" not in record or not record["chosen"].startswith(EXPORTED):
        return None
    export = onnx_file(run, digest, export=False)
    if export is None or read_sidecar(export)[0] != plan:  # an edited plan.json: the full load refuses it
        return None
    name, n = record["chosen"], int(record["tiles_per_call"])
    backend = builders(run, plan, dev, digest)[name]()
    logger.info("prediction backend: %s, %d tile(s) a call (cached measurement)", name, n)
    pp = read_postprocessing(run, plan.data.label_map.num_classes) if postprocessing else None
    return Segmenter(dataclasses.replace(plan, infer=dataclasses.replace(plan.infer, batch_size=n)),
                     backend, pp)


def format_table(record: Mapping) -> str:
    """The timings of a :func:`choose` record as a text table: backend, ms per tile, agreement, chosen.

    >>> print(format_table({"chosen": "onnxruntime", "tile": [1, 1, 64, 64], "timings": [
    ...     {"name": "torch-fp32", "ms": 10.0, "agreement": 1.0, "note": ""},
    ...     {"name": "onnxruntime", "ms": 5.0, "agreement": 0.9999, "note": ""},
    ...     {"name": "openvino", "ms": None, "agreement": None, "note": "unavailable: not installed"}]}))
    backend              ms/tile   vs fp32  agreement  chosen
    torch-fp32              10.0     1.00x   1.000000
    onnxruntime              5.0     2.00x   0.999900  *
    openvino                   -         -          -  unavailable: not installed
    """
    rows = list(record.get("timings", []))
    base = next((r["ms"] for r in rows if r["name"] == REFERENCE and r["ms"]), None)
    lines = [f"{'backend':<20}{'ms/tile':>8}{'vs fp32':>10}{'agreement':>11}  chosen"]
    for r in rows:
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "-"
        ratio = f"{base / r['ms']:.2f}x" if base and r["ms"] else "-"
        agree = f"{r['agreement']:.6f}" if r["agreement"] is not None else "-"
        mark = "*" if r["name"] == record.get("chosen") else r.get("note", "")
        lines.append(f"{r['name']:<20}{ms:>8}{ratio:>10}{agree:>11}  {mark}".rstrip())
    if record.get("batch_ms") is not None:
        lines.append(f"tiles a call: {record['tiles_per_call']} (the plan's batch of {record['batch']}: "
                     f"{record['batch_ms']:.1f} ms a tile)")
    elif record.get("batch", 1) > 1 and "tiles_per_call" in record:
        lines.append(f"tiles a call: {record['tiles_per_call']} (the plan's batch of {record['batch']} is "
                     f"not timed: over {BATCH_VOXELS_CPU} voxels a call, a CPU batch costs memory, "
                     "not time)")
    return "\n".join(lines)


def info_table(run: str | Path, device: str = "auto") -> str:
    """What ``useg info RUN`` prints: this machine's measurement of the run (measured now if not cached)."""
    seg = Segmenter.load(run, device=device, backend=REFERENCE)
    record = choose(Path(run), seg.plan, seg.backend)
    shape = "x".join(str(s) for s in record["tile"][2:])
    how = "cached" if record["cached"] else f"measured now in {record['seconds']} s"
    return f"backends for {run} on this machine ({shape} tile, {how}):\n{format_table(record)}"
