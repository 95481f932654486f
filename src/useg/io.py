"""Reading and writing images and masks: one image = a channels-first array + its geometry.

The contract every format keeps: :func:`read_image` returns an :class:`Image` (array
``(C, *spatial)`` as stored, spacing, affine, format details needed to write back), and
:func:`write_mask` writes class labels with that image's geometry, to a temporary name that is
renamed when complete. Files that cannot be read raise :class:`UsegError` naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from .errors import UsegError
from .labels import LabelMap

logger = logging.getLogger(__name__)

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES
MASK_SUFFIXES = {".png", ".bmp"} | TIFF_SUFFIXES | {".jpg", ".jpeg"}  # JPEG listed to be refused clearly
JPEG_SUFFIXES = {".jpg", ".jpeg"}
# Pillow's default bomb limit (~89 Mpx) is below a large histology tile; 1 Gpx still stops a bomb.
PILImage.MAX_IMAGE_PIXELS = 1 << 30


@dataclass
class Image:
    array: np.ndarray  # (C, *spatial), dtype as stored
    spacing: tuple[float, ...] = ()  # physical size of a pixel per spatial axis; 1.0 when unknown
    affine: np.ndarray | None = None  # 4x4 voxel-to-world matrix (NIfTI); None for 2D formats
    path: Path | None = None  # where it was read from
    format: str = "png"  # "png", "tiff", "jpeg", "bmp"
    meta: dict = field(default_factory=dict)  # what writing back needs (e.g. TIFF resolution)

    def __post_init__(self):
        if not self.spacing:
            self.spacing = (1.0,) * (self.array.ndim - 1)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def dims(self) -> int:
        return self.array.ndim - 1


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on failure.

    Readers never see a half-written file, and a crash leaves the previous version intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unreadable(path: Path, err: Exception) -> UsegError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "truncated" in reason.lower() or isinstance(err, (EOFError,)):
        fix = "the file is truncated; copy or export it again"
    elif isinstance(err, PILImage.DecompressionBombError):
        fix = "it is larger than useg's limit of 1 Gpx; tile it first"
    else:
        fix = "check that it is a valid image file"
    return UsegError(f"cannot read {path} ({reason}); {fix}")


def _read_pil(path: Path) -> tuple[np.ndarray, PILImage.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            im = PILImage.open(path)
            im.load()
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except (OSError, SyntaxError, ValueError, EOFError, PILImage.DecompressionBombError,
            PILImage.DecompressionBombWarning) as e:
        raise _unreadable(path, e) from None
    return np.asarray(im), im


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            arr = tif.asarray()
            meta = {}
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" in tags and "YResolution" in tags:
                meta["resolution"] = (tags["XResolution"].value, tags["YResolution"].value)
                meta["resolution_unit"] = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 1
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except Exception as e:  # tifffile raises many types for damaged files
        raise _unreadable(path, e) from None
    return arr, meta


def _tiff_spacing(meta: dict) -> tuple[float, float] | None:
    res = meta.get("resolution")
    if not res:
        return None
    try:
        xr = res[0][0] / res[0][1] if isinstance(res[0], tuple) else float(res[0])
        yr = res[1][0] / res[1][1] if isinstance(res[1], tuple) else float(res[1])
        if xr > 0 and yr > 0:
            return (1.0 / yr, 1.0 / xr)  # pixels per unit -> unit per pixel, (row, column) order
    except (TypeError, ZeroDivisionError):
        pass
    return None


def read_image(path: str | Path) -> Image:
    """Read an image as channels-first array + geometry.

    PNG/JPEG/BMP through Pillow: grey (L, I;16, I) -> 1 channel, RGB -> 3, RGBA -> 3 (alpha
    dropped), LA -> 1, palette -> RGB. TIFF through tifffile: (H, W) -> (1, H, W); (H, W, 3|4)
    -> (C, H, W); (C, H, W) with C <= 4 kept; other 3-D stacks -> (1, D, H, W). Spacing comes
    from TIFF resolution tags (unit per pixel, in the file's resolution unit) and is 1.0 otherwise.

    Raises:
        UsegError: missing, unreadable, truncated or unsupported files, naming the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        arr, meta = _read_tiff(path)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            arr = np.moveaxis(arr[..., :3], -1, 0)
        elif arr.ndim == 3 and arr.shape[0] <= 4:
            pass
        elif arr.ndim == 3:
            arr = arr[None]
        else:
            raise UsegError(f"{path} has shape {arr.shape}, which is not an image or a volume; save one image per file")
        spacing = _tiff_spacing(meta) if arr.ndim == 3 else None
        return Image(np.ascontiguousarray(arr), spacing or (), None, path, "tiff", meta)
    if suffix in PIL_SUFFIXES:
        arr, im = _read_pil(path)
        mode = im.mode
        if mode == "P":
            arr = np.asarray(im.convert("RGB"))
        elif mode in ("RGBA", "LA"):
            arr = arr[..., :-1]
        elif mode in ("CMYK", "YCbCr", "HSV"):
            arr = np.asarray(im.convert("RGB"))
        elif mode == "1":
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3:
            arr = np.moveaxis(arr, -1, 0)
        fmt = {".jpg": "jpeg", ".jpeg": "jpeg"}.get(suffix, suffix[1:])
        return Image(np.ascontiguousarray(arr), (), None, path, fmt, {})
    raise UsegError(f"{path} has an unsupported format {suffix or '(no suffix)'}; use one of "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}")


def read_mask(path: str | Path) -> tuple[np.ndarray, str, tuple[int, ...] | None]:
    """Read a mask's stored values.

    Returns:
        (raw values (H, W) int, mode, palette): mode "grey"; "palette" for palette PNGs (raw =
        palette indices, the flat 768-value palette returned); "rgb" for colour masks, packed as
        r<<16 | g<<8 | b (an RGB mask whose channels are equal is "grey").

    Raises:
        UsegError: JPEG masks (lossy compression changes label values) and unreadable files.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JPEG_SUFFIXES:
        raise UsegError(f"{path} is a JPEG mask; lossy compression changes label values, save masks as PNG or TIFF")
    if suffix in TIFF_SUFFIXES:
        arr, _ = _read_tiff(path)
        palette = None
        mode = "grey"
    elif suffix in PIL_SUFFIXES:
        arr, im = _read_pil(path)
        mode, palette = "grey", None
        if im.mode == "P":
            mode = "palette"
            pal = im.getpalette() or []
            palette = tuple(pal + [0] * (768 - len(pal)))
        elif im.mode in ("RGBA", "LA"):
            arr = arr[..., :-1]
            if arr.shape[-1] == 1:
                arr = arr[..., 0]
        elif im.mode == "1":
            arr = arr.astype(np.uint8)
    else:
        raise UsegError(f"{path} has an unsupported mask format {suffix or '(no suffix)'}; save masks as PNG or TIFF")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.int32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            arr = rgb[..., 0]
        else:
            return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], "rgb", None
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UsegError(f"{path} holds non-integer mask values; masks must store whole class labels")
        arr = arr.astype(np.int64)
    return arr, mode, palette


def write_mask(path: str | Path, labels: np.ndarray, like: Image, label_map: LabelMap | None = None) -> Path:
    """Write class labels with ``like``'s geometry, encoded through ``label_map``, atomically.

    Args:
        path: destination; the suffix picks the format (.png, .tif/.tiff).
        labels: (*spatial) class indices, shape equal to ``like.spatial_shape``.
        like: the image the labels belong to (geometry and resolution are copied).
        label_map: the training masks' encoding; None writes the labels as they are.

    Returns:
        ``path``.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.spatial_shape:
        raise ValueError(f"labels {labels.shape} do not match the image's shape {like.spatial_shape}")
    if label_map is not None:
        stored = label_map.encode(labels)
    else:
        top = int(labels.max()) if labels.size else 0
        stored = labels.astype(np.uint8 if top <= 255 else np.uint16)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            kw = {}
            if "resolution" in like.meta:
                kw["resolution"] = like.meta["resolution"]
                kw["resolutionunit"] = like.meta.get("resolution_unit", 1)
            tifffile.imwrite(tmp, stored, photometric="rgb" if stored.ndim == 3 else "minisblack", **kw)
        elif suffix in (".png", ".bmp"):
            if label_map is not None and label_map.mode == "palette":
                im = PILImage.frombytes("P", stored.shape[::-1], stored.astype(np.uint8).tobytes())
                im.putpalette(list(label_map.palette or _grey_palette()))
            else:
                im = PILImage.fromarray(stored)
            im.save(tmp, format="PNG" if suffix == ".png" else "BMP")
        else:
            raise ValueError(f"cannot write a mask as {suffix!r}; use .png or .tif")
    return path


def _grey_palette() -> list[int]:
    return [v for i in range(256) for v in (i, i, i)]


def write_image(path: str | Path, image: Image | np.ndarray) -> Path:
    """Write an image ((C, H, W) or (H, W) array, or an :class:`Image`) as PNG or TIFF, atomically."""
    path = Path(path)
    arr = image.array if isinstance(image, Image) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, arr)
        else:
            PILImage.fromarray(arr).save(tmp, format="PNG")
    return path
