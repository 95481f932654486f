"""What the machine can do: device, threads and the fastest safe precision.

Measured on this project's 2-core AVX-512 CPU (benchmarks/precision.py): bf16 autocast +
channels_last runs a U-Net forward 2.5-2.8x and a training step 3.35x faster than fp32 NCHW, so it
is the CPU default wherever the processor has native bf16 instructions; elsewhere plain fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import UsegError

logger = logging.getLogger(__name__)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it still runs bf16 natively; any lower cap
# (AVX2, AVX512_CORE, ...) makes it emulate bf16, which is tens of times slower than fp32
ONEDNN_BF16_ISAS = frozenset({"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512",
                              "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
                              "AVX10_1_512_AMX_FP16"})


# the effective instruction-set levels of an x86 CPU, lowest first: what `useg info` shows and the
# name of the speed benchmark's results (benchmarks/results/speed-<level>.json)
ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512-bf16", "amx")
# the highest level each oneDNN cap (ONEDNN_MAX_CPU_ISA) lets oneDNN use; ALL and DEFAULT cap nothing
ONEDNN_ISA_LEVELS = {"SSE41": "baseline", "AVX": "baseline", "AVX2": "avx2", "AVX2_VNNI": "avx2",
                     "AVX2_VNNI_2": "avx2", "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512",
                     "AVX512_CORE_BF16": "avx512-bf16", "AVX512_CORE_FP16": "avx512-bf16",
                     "AVX10_1_512": "avx512-bf16", "AVX512_CORE_AMX": "amx", "AVX512_CORE_AMX_FP16": "amx",
                     "AVX10_1_512_AMX": "amx", "AVX10_1_512_AMX_FP16": "amx"}


def _bf16_forced(switch: str, cap: str) -> bool | None:
    """What the environment says about native bf16: ``USEG_CPU_BF16`` (``switch``) 0 or 1 decides, an
    ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 means no; None: ask the CPU.

    >>> _bf16_forced("0", ""), _bf16_forced("1", "AVX2"), _bf16_forced("", "avx2"), _bf16_forced("", "ALL")
    (False, True, False, None)
    """
    switch = switch.strip()
    if switch in ("0", "1"):
        return switch == "1"
    cap = cap.strip().upper()
    if cap and cap not in ONEDNN_BF16_ISAS:
        return False
    return None


def isa_of_flags(flags: str, cap: str = "", bf16_switch: str = "") -> str:
    """The effective ISA level (one of :data:`ISA_LEVELS`) of a CPU with these ``/proc/cpuinfo`` flags.

    The CPU's own level (AVX2 needs avx2 and fma; AVX-512 avx512f, avx512bw and avx512vl, oneDNN's
    AVX512_CORE; then avx512_bf16, then amx_bf16) is lowered to a oneDNN cap ``cap`` (the value of
    ``ONEDNN_MAX_CPU_ISA``; unknown values cap nothing here), and below the bf16 levels where the bf16
    rule of :func:`cpu_has_bf16` says no (``bf16_switch``, the value of ``USEG_CPU_BF16``, is 0, or the
    cap is below AVX512_CORE_BF16). Neither raises the level above what the flags say.

    >>> flags = "fma avx2 avx512f avx512bw avx512vl avx512_bf16"
    >>> isa_of_flags(flags), isa_of_flags(flags, cap="AVX2"), isa_of_flags(flags, bf16_switch="0")
    ('avx512-bf16', 'avx2', 'avx512')
    >>> isa_of_flags("sse4_2 avx fma avx2"), isa_of_flags("sse4_2 avx"), isa_of_flags("fma avx2", "ALL", "1")
    ('avx2', 'baseline', 'avx2')
    """
    have = set(flags.split())
    level = 0
    if {"avx2", "fma"} <= have:
        level = 1
        if {"avx512f", "avx512bw", "avx512vl"} <= have:
            level = 2 + ("avx512_bf16" in have) + ("avx512_bf16" in have and "amx_bf16" in have)
    capped = ONEDNN_ISA_LEVELS.get(cap.strip().upper())
    if capped is not None:
        level = min(level, ISA_LEVELS.index(capped))
    if _bf16_forced(bf16_switch, cap) is False:
        level = min(level, ISA_LEVELS.index("avx512"))
    return ISA_LEVELS[level]


def _cpu_flags() -> str | None:
    """The ``flags`` line of /proc/cpuinfo (x86 Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def isa_level() -> str:
    """This machine's effective ISA level for oneDNN and useg (:func:`isa_of_flags` of this CPU under
    this environment's ``ONEDNN_MAX_CPU_ISA`` and ``USEG_CPU_BF16``); a machine that is not x86 Linux
    is named by its architecture (``aarch64``, ``arm64``)."""
    import platform

    flags = _cpu_flags()
    if flags is None:
        return (platform.machine() or "unknown").lower()
    return isa_of_flags(flags, os.environ.get("ONEDNN_MAX_CPU_ISA", ""), os.environ.get("USEG_CPU_BF16", ""))


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU executes bf16 natively (AVX512-BF16 or AMX), where autocast pays off.

    ``USEG_CPU_BF16=0`` (or ``1``) overrides the answer, and an ``ONEDNN_MAX_CPU_ISA`` cap below
    AVX512_CORE_BF16 means no: both let one machine behave like a CPU without bf16. The answer is
    cached; tests that change the environment call ``cpu_has_bf16.cache_clear()``.
    """
    forced = _bf16_forced(os.environ.get("USEG_CPU_BF16", ""), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    if forced is not None:
        return forced
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return True
    except OSError:
        pass
    # Other platforms (e.g. Apple silicon under CPU): oneDNN knows best when it has a fast path.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and os.uname().machine == "arm64"
    except (AttributeError, RuntimeError):
        return False


def pick_device(name: str = "auto") -> torch.device:
    """The device to use: cuda, then mps, then cpu for ``"auto"``; otherwise the named one.

    Raises:
        UsegError: a name torch does not know (``--device bogus``), or a device that is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsegError(f"device {name!r} is unknown; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsegError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsegError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s); use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise UsegError(f"device {name!r} was asked for but MPS is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsegError(f"device {name!r} is not supported by useg; use auto, cpu, cuda or mps")
    return dev


@dataclass(frozen=True)
class Precision:
    """How to run the network: the autocast dtype (None = fp32) and the memory format."""

    dtype: torch.dtype | None  # autocast dtype; None runs in float32
    channels_last: bool  # NHWC / NDHWC tensors, faster for oneDNN and tensor cores
    scaler: bool  # fp16 on CUDA needs gradient scaling; bf16 does not

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def pick_precision(device: torch.device, mode: str = "auto") -> Precision:
    """The precision for ``device``: ``"auto"`` picks bf16 on bf16 CPUs and CUDA, else fp32.

    Args:
        device: where the model runs.
        mode: "auto", "fp32", "bf16" or "fp16".
    """
    if mode not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {mode!r}")
    if device.type == "cuda":
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        return Precision(dtype, channels_last=True, scaler=dtype is torch.float16)
    if device.type == "cpu":
        if mode == "auto":
            mode = "bf16" if cpu_has_bf16() else "fp32"
        if mode == "fp16":
            raise ValueError("fp16 is not supported on the CPU; use bf16 or fp32")
        # channels_last pays off with bf16 (oneDNN's fast path) but slows fp32 training here
        # (0.64x, benchmarks/precision.py), so fp32 stays NCHW.
        bf16 = mode == "bf16"
        return Precision(torch.bfloat16 if bf16 else None, channels_last=bf16, scaler=False)
    # mps and others: fp32 is the only path we have measured.
    return Precision(None, channels_last=False, scaler=False)


def autocast(device: torch.device, precision: Precision):
    """An autocast context for ``precision`` (a no-op for fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def memory_format(dims: int, precision: Precision) -> torch.memory_format:
    """channels_last (2D) / channels_last_3d (3D) when the precision asks for it."""
    if not precision.channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def cpu_count() -> int:
    """Cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Use all the machine's cores (or ``threads``) for intra-op parallelism; returns the count."""
    if threads is None:
        threads = cpu_count()
    n = max(1, int(threads or 1))
    torch.set_num_threads(n)
    return n


def package_version() -> str:
    """useg's version as installed (pyproject.toml is the one source); a source tree that was
    never installed says so instead of guessing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("useg")
    except PackageNotFoundError:
        return "0+unknown"


def info() -> dict[str, str]:
    """What `useg info` prints: versions, the device and precision useg would use, threads."""
    import platform

    import numpy as np


    dev = pick_device("auto")
    prec = pick_precision(dev)
    out = {
        "useg": package_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "precision": f"{prec.name}{' + channels_last' if prec.channels_last else ''}",
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "cpu isa": isa_level(),
        "cpu bf16": "yes" if cpu_has_bf16() else "no",
        "threads": str(torch.get_num_threads()),
        "cores": str(cpu_count()),
    }
    return out


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0  # global rank
    world: int = 1  # number of processes
    local_rank: int = 0  # rank on this node (picks the GPU)
    owner: bool = False  # whether useg started the process group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def main_process() -> bool:
    """Whether this is rank 0 of a torchrun job (or not under torchrun at all), before joining it."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL on CUDA, gloo on the CPU. Without WORLD_SIZE > 1 this is a single process.

    Returns:
        (the process's :class:`Dist`, the device it trains on: cuda:LOCAL_RANK on GPUs).
    """
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return Dist(), dev
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owner = not td.is_initialized()
    if owner:
        td.init_process_group(process_group_backend(dev))
    return Dist(rank, world, local, owner), dev


def process_group_backend(device: torch.device) -> str:
    """The process group's backends: gloo for CPU tensors, and NCCL for CUDA ones on a GPU.

    The small agreements (:func:`any_rank`, validation counts, the loss sums) are CPU tensors even
    when training on GPUs, and NCCL alone takes only CUDA tensors.

    >>> process_group_backend(torch.device("cuda", 1)), process_group_backend(torch.device("cpu"))
    ('cpu:gloo,cuda:nccl', 'gloo')
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def all_reduce_sum(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum a tensor over all processes (a no-op for a single process)."""
    if dist.world > 1:
        import torch.distributed as td

        td.all_reduce(values, op=td.ReduceOp.SUM)
    return values


def any_rank(flag: bool, dist: Dist) -> bool:
    """Whether ``flag`` is true on any process; ranks that must stop together (or hang) agree on it."""
    if dist.world == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), dist)[0] > 0)


def replicas_in_sync(model: torch.nn.Module, dist: Dist) -> bool:
    """DDP keeps replicas identical; check it once at the end (sum of weights, max minus min over ranks)."""
    if dist.world == 1:
        return True
    import torch.distributed as td

    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    hi, lo = total.clone(), total.clone()
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    same = bool(hi == lo)
    if not same:
        logger.error("DDP replicas differ at the end of training (weight sums %r vs %r)",
                     float(hi), float(lo))
    return same


@contextlib.contextmanager
def global_state(device: str = "auto", barrier: bool = True) -> Iterator[tuple[Dist, torch.device]]:
    """Join the torchrun job, set the thread count, and put both back afterwards, even on an error.

    On the CPU each process takes its share of the cores (all of them without torchrun); on other
    devices the threads feed the host side and take every core. On leaving, the thread count is the
    one before, and a process group this call started is ended: after a barrier when the body
    returned (rank 0's files are complete before any process exits), at once when it raised (the
    other ranks may never reach a barrier). Deterministic kernels are :func:`deterministic_mode`'s.

    Args:
        device: "auto", "cpu", "cuda", ... as for :func:`pick_device`.
        barrier: wait for every rank before leaving; ranks that share nothing at the end (each
            writes its own predictions) pass False, so a rank done early never waits out the
            process group's timeout for a slow one.

    Yields:
        (the process's :class:`Dist`, the device it uses), as :func:`init_distributed` returns them.
    """
    threads = torch.get_num_threads()
    dist = Dist()
    try:
        dist, dev = init_distributed(device)
        set_threads(max(1, cpu_count() // dist.world) if dev.type == "cpu" else None)
        yield dist, dev
        if dist.owner and barrier:
            import torch.distributed as td

            td.barrier()
    finally:
        torch.set_num_threads(threads)
        if dist.owner:
            import torch.distributed as td

            td.destroy_process_group()


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """cuDNN benchmarking inside the block on CUDA, the previous setting afterwards (a no-op elsewhere).

    Training patches and prediction tiles have fixed shapes, so cuDNN times its convolution
    algorithms once per shape and keeps the fastest. :func:`deterministic_mode` inside the block
    switches it off again (benchmarking picks algorithms by timing, which is not repeatable).
    """
    saved = torch.backends.cudnn.benchmark
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels inside the block when ``enabled``; the previous settings afterwards.

    Sets ``torch.use_deterministic_algorithms`` (only a warning for ops without a deterministic CPU
    kernel), cuDNN's deterministic flag without benchmarking, and on CUDA the cuBLAS workspace that
    deterministic matrix products need. Whatever was set before, warn-only and the environment
    variable included, is restored on leaving, also when the block raises. With ``enabled=False``
    nothing is set.

    Args:
        enabled: whether to switch deterministic kernels on.
        device: the device the block runs on (picks warn-only on the CPU and the cuBLAS setting).
    """
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cpu")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]
