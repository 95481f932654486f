"""Memory that is checked before it is asked for: what a resampled case needs, what the machine has.

A volume's header decides how large it becomes at the plan's spacing: a 16^3 NIfTI whose header
says 300 mm voxels is 4800^3 voxels at 1 mm (over a TiB with its probabilities), which numpy would
only refuse after minutes, with a traceback. :func:`check_resample` estimates the bytes first and
refuses with the numbers and the fix; :func:`available_bytes` is what the machine has now. The
estimate is a pure function of shapes and counts (the limit an argument), so tests need no large
machine.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import UsegError

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
