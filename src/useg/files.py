"""What every file format shares: the :class:`Image` it reads into, names, atomic writes, read errors.

A leaf module (it imports only :mod:`useg.errors`), so the format modules (:mod:`useg.io`,
:mod:`useg.tiff`, :mod:`useg.volumes`) and every writer of run files (checkpoints, plans,
metrics, reports) can use it without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsegError

NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
MAX_PIXELS = 1 << 30  # 1 Gpx: above a whole-slide tile, still stops a decompression bomb


def refuse_special(path: str | Path, what: str = "a regular file") -> None:
    """Refuse a path that is neither a regular file nor a folder: a named pipe (FIFO), a socket, a device.

    Opening a FIFO to read it waits for a writer, forever; so the kind is told from ``os.stat``
    (which never opens the file) before anything reads it. A missing path passes: its reader says so.

    Raises:
        UsegError: naming the path, what it is and what to give instead.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise UsegError(f"{path} is {kind}, not a regular file, and reading it could wait forever; "
                    f"give {what} instead")


def is_special(path: str | Path) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a folder (see :func:`refuse_special`)."""
    try:
        refuse_special(path)
    except UsegError:
        return True
    return False
@dataclass(frozen=True)
class MaskHolds:
    """What a format's mask writer can hold, so that an output is chosen before anything is computed."""

    name: str  # the format as the user names it, "PNG"
    dims: tuple[int, ...]  # spatial dimensions of the masks it writes
    low: int  # smallest stored value
    high: int  # largest stored value
    modes: tuple[str, ...] = ("grey", "palette", "rgb")  # label-map encodings it writes back

    def problem(self, dims: int, low: int, high: int, mode: str = "grey") -> str | None:
        """Why ``dims``-D masks of stored values ``low`` .. ``high`` in ``mode`` do not fit; None if they do.

        >>> MaskHolds("PNG", (2,), 0, 65535).problem(2, 0, 70000)
        'PNG holds mask values 0 .. 65535, not 0 .. 70000'
        """
        if dims not in self.dims:
            return f"{self.name} holds {' or '.join(f'{d}D' for d in self.dims)} masks, not {dims}D ones"
        if mode not in self.modes:
            return f"{self.name} holds no {mode} masks (it holds {', '.join(self.modes)})"
        if low < self.low or high > self.high:
            return f"{self.name} holds mask values {self.low} .. {self.high}, not {low} .. {high}"
        return None


def suffix_of(path: str | Path) -> str:
    """The lower-case format suffix, ``.nii.gz`` counted as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | Path) -> str:
    """The name without its format suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(name))] if suffix_of(name) else name


@dataclass
class Image:
    """An image and its geometry.

    Attributes:
        array: (C, H, W) or (C, D, H, W), dtype as stored.
        spacing: pixel size per spatial axis (see :mod:`useg.io` for the unit); 1.0 when unknown.
        affine: 4x4 voxel-to-world matrix (NIfTI, DICOM, ITK formats: RAS); None for raster formats.
        path: where it was read from.
        format: "png", "tiff", "jpeg", "bmp", "gif", "webp", "nifti", "nrrd", "metaimage" or "dicom".
        meta: what writing back needs (TIFF resolution and unit, PNG dpi, spacing unit, NIfTI header,
            ITK origin/spacing/direction).
    """

    array: np.ndarray
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    path: Path | None = None
    format: str = "png"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.array.ndim < 3:
            raise ValueError("Image.array must be channels first (C, H, W) or (C, D, H, W), "
                             f"got {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing) or (1.0,) * self.dims
        if len(self.spacing) != self.dims:
            raise ValueError(f"spacing {self.spacing} needs one value per spatial axis "
                             f"of {self.spatial_shape}")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def dims(self) -> int:
        return self.array.ndim - 1


NAME_MAX = 255  # bytes in one file name on ext4, XFS, APFS, NTFS (UTF-16 units there)


def temporary_name(path: Path) -> Path:
    """A hidden, random name beside ``path`` ending in its suffix, within the file-name limit.

    The stem is cut (by UTF-8 bytes, never inside a character) so that a name already near the
    255-byte limit still gets a temporary name: the random part, not the stem, makes it unique.
    """
    suffix = suffix_of(path)
    tail = f".{secrets.token_hex(6)}.tmp{suffix}"
    room = NAME_MAX - 1 - len(tail.encode())
    stem = stem_of(path).encode()[: max(room, 0)].decode("utf-8", "ignore")
    return path.with_name(f".{stem}{tail}")


def _claim(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link fails on an existing name).

    Raises:
        FileExistsError: ``path`` exists (another process wrote it since we looked).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FUSE file systems): claim the name itself
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on failure.

    Readers never see a half-written file and a crash leaves the previous version intact. The
    temporary name is hidden (leading dot), created exclusively (no two writers share it), within
    the file-name limit (:func:`temporary_name`) and ends in ``path``'s suffix, so writers that
    pick a format by suffix still work. Parent folders are created.

    Args:
        path: the file to write.
        exclusive: refuse to replace ``path`` if it exists when the file is complete (another
            process claimed it meanwhile): ``FileExistsError`` naming ``path``, the temporary file
            removed. Checking before writing is not enough when two writers share a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # 48 random bits collided: draw again
            continue
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        yield tmp
        if exclusive:
            _claim(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename and Path(e.filename) == tmp:  # name the file the user asked for, not our temp
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON text any parser reads: NaN and infinities become ``null`` (``json.dumps`` would write
    ``NaN``, which is not JSON), numpy scalars become Python numbers.

    >>> strict_json({"dice": float("nan"), "n": np.int64(3)}, indent=None)
    '{"dice": null, "n": 3}'
    """
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`), line endings as given.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")  # no newline translation: ``text`` on any OS
    return path


def lossy_mask(path: Path, kind: str, codec: str) -> UsegError:
    """The error for a mask in a lossy format (JPEG, WebP, JPEG-compressed TIFF): the fix, naming the file."""
    return UsegError(f"{path} is a {kind} mask; lossy {codec} compression changes label values, "
                     "save masks as PNG or TIFF (uncompressed, LZW or Deflate)")


def unreadable(path: Path, err: BaseException) -> UsegError:
    """The error for an image file Pillow or tifffile failed on: the cause and the fix, naming the file."""
    from PIL import Image as PILImage  # here, not at the top: most users of this module never read an image

    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "truncated" in reason.lower() or isinstance(err, EOFError):
        return UsegError(f"cannot read {path}: the file is truncated; copy or export it again")
    if isinstance(err, (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning)):
        return UsegError(f"cannot read {path}: it has more pixels than the limit of "
                         f"{PILImage.MAX_IMAGE_PIXELS} that guards against decompression bombs; "
                         "tile or downscale it first")
    if isinstance(err, PILImage.UnidentifiedImageError):
        return UsegError(f"cannot read {path}: it is not an image Pillow recognises (damaged or another "
                         "format behind the suffix); re-export it as PNG or TIFF")
    return UsegError(f"cannot read {path}: {reason}; check that it is a valid image file or re-export it")
