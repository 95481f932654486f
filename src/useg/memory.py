"""Memory that is checked before it is asked for: what a resampled case needs, what the machine has.

A volume's header decides how large it becomes at the plan's spacing: a 16^3 NIfTI whose header
says 300 mm voxels is 4800^3 voxels at 1 mm (over a TiB with its probabilities), which numpy would
only refuse after minutes, with a traceback. :func:`check_resample` estimates the bytes first and
refuses with the numbers and the fix; :func:`available_bytes` is what the machine has now. The
estimate is a pure function of shapes and counts (the limit an argument), so tests need no large
machine. The planner's training estimates live here too (:func:`training_gib`, :func:`parameter_gib`,
the budgets :func:`default_memory_gb` and :func:`machine_gib`), and :func:`refuse_beyond_machine`
refuses a plan that could not fit in the whole machine before anything is allocated.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .dataset import format_axes
from .errors import UsegError
from .plan import Plan

logger = logging.getLogger(__name__)

# bytes per voxel besides the image's channels and the probabilities: the spline's float64 buffer of
# one channel (scipy.ndimage.zoom) and the int64 labels
FIXED_BYTES_PER_VOXEL = 16
SUSPICIOUS_RATIO = 10.0  # a case's voxels this many times finer or coarser than the target: a header to check


def available_bytes() -> int:
    """The memory this process can still take: Linux's ``MemAvailable``, else free physical pages.

    Returns:
        Bytes; a very large number where the machine does not say (no check is better than a
        wrong refusal).
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**62


def resampled_shape(shape: Sequence[int], spacing_in: Sequence[float],
                    spacing_out: Sequence[float]) -> tuple[int, ...]:
    """The spatial shape at ``spacing_out``: round(S * spacing_in / spacing_out), at least 1 per axis
    (the rule of :func:`useg.resample.new_shape`, without its checks: sizes may be astronomic here).

    >>> resampled_shape((16, 16, 16), (300.0, 300.0, 300.0), (1.0, 1.0, 1.0))
    (4800, 4800, 4800)
    """
    return tuple(max(1, round(n * a / b)) for n, a, b in zip(shape, spacing_in, spacing_out, strict=True))


def resample_bytes(shape_out: Sequence[int], channels: int, classes: int = 0) -> int:
    """Bytes a case needs at its resampled shape: the float32 image (C channels), the float32
    probabilities (K classes, 0 for training) and :data:`FIXED_BYTES_PER_VOXEL`.

    >>> resample_bytes((100, 100, 100), channels=1, classes=2)
    28000000
    """
    return math.prod(int(s) for s in shape_out) * (4 * channels + 4 * classes + FIXED_BYTES_PER_VOXEL)


def gib(n: float) -> str:
    """Bytes as a short human number: "3.2 GiB", "1.2 TiB".

    >>> gib(3 * 2**30)
    '3.0 GiB'
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**20:.2f} MiB"


def _axes(values: Iterable[Any]) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def check_resample(name: str, shape: Sequence[int], spacing_in: Sequence[float], spacing_out: Sequence[float],
                   channels: int, classes: int = 0, limit: int | None = None, fix: str | None = None) -> int:
    """Refuse to resample ``name`` when the result would need more memory than ``limit``.

    Args:
        name: the file or case, for the message.
        shape: (*S) spatial shape as read; spacing_in: its voxel size (mm); spacing_out: the plan's.
        channels: image channels; classes: probability maps kept at that size (0 for training).
        limit: bytes allowed; None: :func:`available_bytes` now.
        fix: the advice closing the sentence; None: check the header's voxel size.

    Returns:
        The estimated bytes.

    Raises:
        UsegError: the estimate exceeds the limit, with the shapes, spacings, numbers and the fix.

    >>> check_resample("a.nii.gz", (16, 16, 16), (2.0,) * 3, (1.0,) * 3, channels=1, limit=2**30)
    655360
    """
    out = resampled_shape(shape, spacing_in, spacing_out)
    need = resample_bytes(out, channels, classes)
    limit = available_bytes() if limit is None else limit
    if need > limit:
        ratio = max(a / b for a, b in zip(spacing_in, spacing_out, strict=True))
        raise UsegError(
            f"{name} would be resampled from {_axes(shape)} voxels of {_axes(spacing_in)} mm to {_axes(out)} "
            f"voxels of {_axes(spacing_out)} mm ({ratio:g} times finer), about {gib(need)}, more than the "
            f"{gib(limit)} of memory available; "
            + (fix or "check the voxel size in its header (a wrong unit or a typo makes it absurd)"))
    return need


def check_cases(records: Sequence[Any], spacing_out: Sequence[float], limit: int | None = None) -> None:
    """Refuse the first case that the target spacing makes too large (planning, before any is read).

    Args:
        records: :class:`useg.check.CaseRecord` values (name, shape, spacing, num_channels).
        spacing_out: the plan's target spacing (the median of the cases').
        limit: bytes allowed per case; None: :func:`available_bytes`.
    """
    limit = available_bytes() if limit is None else limit
    for r in records:
        ratio = max(max(a / b, b / a) for a, b in zip(r.spacing, spacing_out, strict=True))
        if ratio > SUSPICIOUS_RATIO:  # fits, but a unit mix-up (mm vs m, um) is likelier than such a scan
            logger.warning("case %r has voxels of %s mm, %.3g times the target spacing %s mm on an axis; "
                           "check its header", r.name, _axes(r.spacing), ratio, _axes(spacing_out))
        check_resample(f"case {r.name!r}", r.shape, r.spacing, spacing_out, r.num_channels, 0, limit,
                       fix=f"check the voxel size in its header (the other cases' median is "
                           f"{_axes(spacing_out)} mm) or leave it out with --exclude {r.name}")


def default_memory_gb(device: str = "auto") -> float:
    """Half the machine's RAM (at most 16 GiB) on a CPU, 80% of the GPU's memory on CUDA."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = 8.0
    return min(16.0, 0.5 * ram)


def training_gib(patch: tuple[int, ...], width: int, depth: int, channels: int, max_width: int | None,
                 batch: int) -> float:
    """Estimated training memory: about 14 fp32 activations per channel and voxel at every level
    (convs, norms, ReLUs on both paths, the concatenation), kept for the backward pass, x1.5 for
    gradients and workspace. An estimate for planning, within a factor of about 2 of the real peak."""
    voxels, total = math.prod(patch), 0.0
    for level in range(depth + 1):
        c = min(width * 2**level, max_width or width * 2**level)
        total += 14 * c * voxels / 2 ** (len(patch) * level)
    total += 2 * channels * voxels
    return 1.5 * 4 * batch * total / 2**30


def parameter_gib(width: int, depth: int, dims: int, channels: int, max_width: int | None) -> float:
    """Estimated memory of the network's weights while training: fp32 weights, gradients and the two
    AdamW moments (16 bytes per weight); the 3^dims convolutions of both paths, biases and norms left out.

    >>> round(parameter_gib(32, 4, 2, 1, None), 3)  # the default 2D network: about 7.8 M weights
    0.116
    """
    widths = [min(width * 2**i, max_width or width * 2**i) for i in range(depth + 1)]
    taps = 3**dims
    weights = taps * (channels * widths[0] + widths[0] ** 2)  # the first double convolution
    for low, high in zip(widths, widths[1:]):  # a level down (2 convs), and back up (2^dims + 2 convs)
        weights += taps * (low * high + high**2) + 2**dims * high * low + taps * 3 * low**2
    return 16 * weights / 2**30


def machine_gib(device: str = "auto") -> float:
    """The memory training can use at most: the GPU's on CUDA, else the machine's RAM (GiB)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")  # unknown: nothing is refused on a guess


def refuse_beyond_machine(plan: Plan, have_gib: float) -> None:
    """Refuse a plan whose training cannot fit in ``have_gib`` (``--width 100000`` would ask the
    allocator for terabytes, or train for days on swap), with the numbers and the flags to lower.

    The estimate (activations of :func:`training_gib` and weights of :func:`parameter_gib`) is within
    a factor of about 2, so only plans beyond the whole machine are refused, never a plan that might fit.
    """
    m, t = plan.model, plan.train
    need = (training_gib(plan.data.patch_size, m.width, m.depth, m.in_channels, m.max_width, t.batch_size)
            + parameter_gib(m.width, m.depth, m.dims, m.in_channels, m.max_width))
    if need > have_gib:
        patch = format_axes(plan.data.patch_size)
        raise UsegError(f"training width {m.width}, depth {m.depth}, patch {patch} "
                        f"and batch {t.batch_size} needs about {need:.3g} GiB but this machine has "
                        f"{have_gib:.3g} GiB; lower --width, --depth, --patch or --batch-size")
