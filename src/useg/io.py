"""Reading and writing images and masks: one image = a channels-first array + its geometry.

The contract every format keeps: :func:`read_image` returns an :class:`Image` (array
``(C, *spatial)`` as stored, spacing, affine, what writing back needs), and :func:`write_mask`
writes class labels with that image's geometry, to a temporary name renamed when complete.
Files that cannot be read raise :class:`UsegError` naming the file.

Spacing is in millimetres per pixel when the file states a physical unit (PNG/JPEG dpi, TIFF
inch or centimetre resolution, ImageJ's micron/nm/mm unit) and in the file's own unit when it
states none (``meta["spacing_unit"] == ""``); it is 1.0 where the file says nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from . import volumes
from .errors import UsegError
from .labels import LabelMap, pack_rgb

logger = logging.getLogger(__name__)

PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES | NIFTI_SUFFIXES
MASK_SUFFIXES = IMAGE_SUFFIXES  # JPEG is listed so that JPEG masks are found and refused clearly
MAX_PIXELS = 1 << 30  # 1 Gpx: above a whole-slide tile, still stops a decompression bomb
_PIL_DEFAULT_LIMIT = 89_478_485
if PILImage.MAX_IMAGE_PIXELS == _PIL_DEFAULT_LIMIT:  # raise Pillow's 89 Mpx default, keep a user's own choice
    PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS
_TO_MM = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit inch, centimetre
_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0, "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3,
               "\\u00b5m": 1e-3, "nm": 1e-6, "inch": 25.4}


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
        spacing: pixel size per spatial axis (see the module note for the unit); 1.0 when unknown.
        affine: 4x4 voxel-to-world matrix (NIfTI); None for 2D formats.
        path: where it was read from.
        format: "png", "tiff", "jpeg", "bmp", "nifti" or "dicom".
        meta: what writing back needs (TIFF resolution and unit, PNG dpi, spacing unit, NIfTI header).
    """

    array: np.ndarray
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    path: Path | None = None
    format: str = "png"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.array.ndim < 3:
            raise ValueError(f"Image.array must be channels first (C, H, W) or (C, D, H, W), got {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing) or (1.0,) * self.dims
        if len(self.spacing) != self.dims:
            raise ValueError(f"spacing {self.spacing} needs one value per spatial axis of {self.spatial_shape}")

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

    Readers never see a half-written file and a crash leaves the previous version intact. The
    temporary name is hidden (leading dot) and ends in ``path``'s suffix, so writers that pick a
    format by suffix still work. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{stem_of(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix_of(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename and Path(e.filename) == tmp:  # name the file the user asked for, not our temp
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unreadable(path: Path, err: BaseException) -> UsegError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "truncated" in reason.lower() or isinstance(err, EOFError):
        return UsegError(f"cannot read {path}: the file is truncated; copy or export it again")
    if isinstance(err, (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning)):
        return UsegError(f"cannot read {path}: it has more pixels than the limit of {PILImage.MAX_IMAGE_PIXELS} "
                         "that guards against decompression bombs; tile or downscale it first")
    if isinstance(err, PILImage.UnidentifiedImageError):
        return UsegError(f"cannot read {path}: it is not an image Pillow recognises (damaged or another "
                         "format behind the suffix); re-export it as PNG or TIFF")
    return UsegError(f"cannot read {path}: {reason}; check that it is a valid image file or re-export it")


def _read_pil(path: Path) -> PILImage.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise _unreadable(path, e) from None


def _pil_array(im: PILImage.Image) -> np.ndarray:
    """A Pillow image -> (H, W) or (H, W, 3) array, dtype as stored; alpha dropped, palette as RGB."""
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    if im.mode in ("L", "I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im)
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)  # I;16B is big-endian
    if im.mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))
    if im.mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return np.asarray(im)[..., :3]
    return np.asarray(im.convert("RGB"))  # P, PA, CMYK, YCbCr, LAB, HSV


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if math.prod(series.shape) > 4 * MAX_PIXELS:
                raise UsegError(f"{path} holds {math.prod(series.shape)} values, more than useg reads at once; "
                                "crop or tile it first")
            arr = series.asarray()
            page = tif.pages[0]
            tags = page.tags
            meta: dict = {}
            if "XResolution" in tags and "YResolution" in tags:
                x, y = (tags[k].value for k in ("XResolution", "YResolution"))  # (numerator, denominator)
                meta["resolution"] = tuple(float(v[0] / v[1] if v[1] else 0.0) for v in (x, y))
                meta["resolution_unit"] = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            extra = tif.imagej_metadata or (tif.shaped_metadata or [{}])[0] or {}
            for key in ("unit", "spacing"):
                if key in extra:
                    meta[f"imagej_{key}"] = extra[key]
            return arr, series.axes, tuple(page.extrasamples or ()), meta
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except (UsegError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise _unreadable(path, e) from None


def _tiff_layout(arr: np.ndarray, axes: str, extrasamples: tuple, path: Path) -> np.ndarray:
    """TIFF array -> (C, *spatial): the file's axes decide where known, the shape otherwise."""
    alpha = len(extrasamples) > 0 and int(extrasamples[-1]) in (1, 2)  # associated / unassociated alpha
    if arr.ndim == 2:
        return arr[None]
    if axes.endswith("S"):  # channels last (RGB, RGBA)
        if alpha:
            arr = arr[..., :-1]
        return np.moveaxis(arr, -1, 0)
    if arr.ndim == 3:
        if axes[0] in "CS":
            return arr
        if axes[0] in "ZIT":
            return arr[None]
        if arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            return np.moveaxis(arr, -1, 0)
        return arr if arr.shape[0] <= 4 else arr[None]
    if arr.ndim == 4 and axes[:2] in ("ZC", "IC", "TC"):
        return np.swapaxes(arr, 0, 1)
    if arr.ndim == 4 and axes[0] in "CS":
        return arr
    raise UsegError(f"{path} has shape {arr.shape} (axes {axes}), which is not one image or volume; "
                    "save one (C, D, H, W) image per file")


def _mm_factor(meta: dict) -> tuple[float, str]:
    """Millimetres per unit of a TIFF's resolution (and ImageJ z spacing), and the unit's name."""
    if meta.get("resolution_unit") in _TO_MM:
        return _TO_MM[meta["resolution_unit"]], "mm"
    unit = str(meta.get("imagej_unit", "")).strip().lower()
    if unit in _UNIT_TO_MM:
        return _UNIT_TO_MM[unit], "mm"
    return 1.0, ""


def _tiff_spacing(meta: dict, dims: int) -> tuple[tuple[float, ...], str]:
    """Spacing (z, y, x) or (y, x): mm when the unit is known, 1.0 where the file says nothing."""
    factor, name = _mm_factor(meta)
    res = meta.get("resolution")
    yx = (factor / res[1], factor / res[0]) if res and res[0] > 0 and res[1] > 0 else (1.0, 1.0)
    if dims == 3:
        z = float(meta.get("imagej_spacing", 0) or 0)
        return (z * factor if z > 0 else 1.0, *yx), name
    return yx, name


def read_image(path: str | Path) -> Image:
    """Read an image as a channels-first array with its geometry.

    PNG/JPEG/BMP through Pillow: grey (L, I;16, I, F) -> 1 channel keeping the dtype, RGB -> 3,
    RGBA -> 3 (alpha dropped), LA -> 1, palette -> RGB. TIFF through tifffile: (H, W) -> (1, H, W);
    (H, W, 3|4) channels last -> (C, H, W) (alpha dropped); (C, H, W) with C <= 4 kept; other
    3-D stacks, or stacks the file marks as Z, -> (1, D, H, W). NIfTI (.nii, .nii.gz) and DICOM
    series folders through :mod:`useg.volumes` (voxel order as stored, affine kept). Spacing: see
    the module note.

    Raises:
        UsegError: missing, unreadable, truncated, too large or unsupported files, naming the file.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return volumes.read_nifti(path)
    if volumes.is_dicom_dir(path):
        return volumes.read_dicom_series(path)
    if suffix in TIFF_SUFFIXES:
        arr, axes, extrasamples, meta = _read_tiff(path)
        arr = _tiff_layout(arr, axes, extrasamples, path)
        spacing, meta["spacing_unit"] = _tiff_spacing(meta, arr.ndim - 1)
        return Image(np.ascontiguousarray(arr), spacing, None, path, "tiff", meta)
    if suffix in PIL_SUFFIXES:
        im = _read_pil(path)
        arr = _pil_array(im)
        arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
        meta, spacing = {}, ()
        dpi = im.info.get("dpi")
        if dpi and float(dpi[0]) > 0 and float(dpi[1]) > 0:
            meta["dpi"] = (float(dpi[0]), float(dpi[1]))
            spacing = (25.4 / float(dpi[1]), 25.4 / float(dpi[0]))
            meta["spacing_unit"] = "mm"
        fmt = "jpeg" if suffix in JPEG_SUFFIXES else suffix[1:]
        return Image(np.ascontiguousarray(arr), spacing, None, path, fmt, meta)
    if not path.exists():
        raise UsegError(f"{path} does not exist; check the path")
    raise UsegError(f"{path} has an unsupported format {suffix or '(no suffix)'}; convert it to one of "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}")


def read_mask(path: str | Path) -> tuple[np.ndarray, str, tuple[int, ...] | None]:
    """Read a mask's stored values.

    Returns:
        (raw, mode, palette): raw (H, W) (or (D, H, W) from TIFF stacks) integer values; mode
        "grey"; "palette" for palette PNGs (raw = palette indices, the flat 768-entry palette
        returned); "rgb" for colour masks, packed into int32 ``r << 16 | g << 8 | b`` (a colour
        mask whose three channels are equal is "grey").

    Raises:
        UsegError: JPEG masks (lossy compression changes label values), non-integer values,
            several channels that are not a colour, and unreadable files.
    """
    path = Path(path)
    suffix = suffix_of(path)
    palette, colour = None, False
    if suffix in NIFTI_SUFFIXES:
        return volumes.read_nifti_labels(path), "grey", None
    if suffix in JPEG_SUFFIXES:
        raise UsegError(f"{path} is a JPEG mask; lossy JPEG compression changes label values, "
                        "save masks as PNG or TIFF")
    if suffix in TIFF_SUFFIXES:
        arr, axes, extrasamples, _ = _read_tiff(path)
        arr = _tiff_layout(arr, axes, extrasamples, path)
        if arr.shape[0] == 1:
            arr = arr[0]
        elif arr.shape[0] == 3 and arr.ndim == 3:
            arr, colour = np.moveaxis(arr, 0, -1), True
        else:
            raise UsegError(f"{path} has {arr.shape[0]} channels; save masks with one channel (or as RGB colours)")
    elif suffix in PIL_SUFFIXES:
        im = _read_pil(path)
        if im.mode in ("P", "PA"):
            arr = np.asarray(im.getchannel(0) if im.mode == "PA" else im)
            pal = list(im.getpalette() or [])[:768]
            palette = tuple(pal + [0] * (768 - len(pal)))
        else:
            arr = _pil_array(im)
            colour = arr.ndim == 3
    elif not path.exists():
        raise UsegError(f"{path} does not exist; check the path")
    else:
        raise UsegError(f"{path} has an unsupported mask format {suffix or '(no suffix)'}; save masks as PNG or TIFF")
    if palette is not None:
        return arr, "palette", palette
    if colour:
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            return pack_rgb(arr), "rgb", None
    if not np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        elif not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UsegError(f"{path} holds non-integer mask values; save whole class values (no interpolation)")
        else:
            arr = arr.astype(np.int64)
    return arr, "grey", None


def _tiff_geometry(like: Image) -> dict:
    """tifffile keyword arguments that keep ``like``'s in-plane resolution."""
    meta = like.meta
    if "resolution" in meta:
        return {"resolution": tuple(meta["resolution"]), "resolutionunit": meta.get("resolution_unit", 2)}
    if "dpi" in meta:
        return {"resolution": tuple(meta["dpi"]), "resolutionunit": 2}
    if any(s != 1.0 for s in like.spacing[-2:]):  # spacing set by hand: write it in mm -> pixels per cm
        return {"resolution": (10.0 / like.spacing[-1], 10.0 / like.spacing[-2]), "resolutionunit": 3}
    return {}


def _write_tiff(tmp: Path, arr: np.ndarray, like: Image | None, rgb: bool) -> None:
    """Write (H, W), (H, W, 3) (rgb), (C, H, W) or (D, H, W)/(C, D, H, W) volumes to ``tmp``."""
    import tifffile

    kw = _tiff_geometry(like) if like is not None else {}
    if rgb:
        tifffile.imwrite(tmp, arr, photometric="rgb", **kw)
    elif arr.ndim == 2:
        tifffile.imwrite(tmp, arr, photometric="minisblack", **kw)
    elif like is not None and like.dims == 3 or arr.ndim == 4:
        md: dict = {"axes": "ZYX" if arr.ndim == 3 else "CZYX"}
        if like is not None:
            unit = like.meta.get("imagej_unit")
            factor, _ = _mm_factor({"resolution_unit": kw.get("resolutionunit"), "imagej_unit": unit})
            if unit:
                md["unit"] = unit
            if like.spacing[0] != 1.0:  # the reader multiplies z by the same factor as y and x
                md["spacing"] = like.spacing[0] / factor
        tifffile.imwrite(tmp, arr, photometric="minisblack", metadata=md, **kw)
    else:  # (C, H, W) channels: one page, C samples
        tifffile.imwrite(tmp, arr, photometric="minisblack", planarconfig="separate", metadata={"axes": "SYX"}, **kw)


def write_mask(path: str | Path, labels: np.ndarray, like: Image, label_map: LabelMap | None = None) -> Path:
    """Write class labels with ``like``'s geometry, encoded through ``label_map``, atomically.

    Args:
        path: destination; the suffix picks the format (.png, .tif/.tiff, .nii.gz/.nii). Palette PNG when
            ``label_map.mode == "palette"``, 16-bit when values exceed 255.
        labels: (*spatial) integer class indices, shape equal to ``like.spatial_shape``.
        like: the image the labels belong to (resolution and spacing are copied).
        label_map: the training masks' encoding; None writes the labels as they are.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: shape mismatch, non-integer labels, an unsupported suffix, or values the
            format cannot hold.
    """
    path = Path(path)
    suffix = suffix_of(path)
    labels = np.asarray(labels)
    if suffix not in TIFF_SUFFIXES and suffix not in NIFTI_SUFFIXES and suffix != ".png":
        raise ValueError(f"cannot write a mask as {suffix or 'a file without suffix'!r}; use .png, .tif or .nii.gz")
    if labels.shape != like.spatial_shape:
        raise ValueError(f"labels {labels.shape} do not match the image's shape {like.spatial_shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if label_map is not None:
        stored = label_map.encode(labels)
    else:
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0:
            raise ValueError(f"labels must be non-negative, got {lo}")
        stored = labels.astype(np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.int32)
    if suffix in NIFTI_SUFFIXES:
        return volumes.write_nifti_labels(path, stored, like)
    palette = label_map is not None and label_map.mode == "palette"
    rgb = label_map is not None and label_map.mode == "rgb"
    if suffix == ".png":
        if labels.ndim != 2:
            raise ValueError(f"PNG holds 2D masks; write the {labels.ndim}D labels as .tif")
        if stored.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"PNG holds values up to 65535; write masks with larger values as .tif ({path})")
    with atomic_path(path) as tmp:
        if suffix in TIFF_SUFFIXES:
            _write_tiff(tmp, stored, like, rgb)
        else:
            im = PILImage.fromarray(stored)
            if palette:
                im.putpalette(list(label_map.palette or _grey_palette()))  # an L image becomes P
            kw = {"dpi": like.meta["dpi"]} if "dpi" in like.meta else {}
            im.save(tmp, format="PNG", **kw)
    return path


def _grey_palette() -> list[int]:
    return [v for i in range(256) for v in (i, i, i)]


def write_image(path: str | Path, image: Image | np.ndarray) -> Path:
    """Write an image atomically: PNG/JPEG (1 or 3 channels, 4 as RGBA; uint8, or uint16 grey) or TIFF (any).

    Args:
        path: destination; the suffix picks the format.
        image: an :class:`Image` (its resolution is kept) or an array (H, W), (C, H, W) or
            (C, D, H, W) (TIFF only).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    like = image if isinstance(image, Image) else None
    arr = np.asarray(image.array if isinstance(image, Image) else image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim not in (3, 4):
        raise ValueError(f"write_image needs (H, W), (C, H, W) or (C, D, H, W), got {arr.shape}")
    if like is None:
        like = Image(arr)
    if suffix in TIFF_SUFFIXES:
        c = arr.shape[0]
        out = arr[0] if c == 1 else np.moveaxis(arr, 0, -1) if c == 3 and arr.ndim == 3 else arr
        with atomic_path(path) as tmp:
            _write_tiff(tmp, out, like, rgb=c == 3 and arr.ndim == 3)
        return path
    if suffix not in PIL_SUFFIXES:
        raise ValueError(f"cannot write an image as {suffix!r}; use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
        raise ValueError(f"{suffix} holds 2D images with 1, 3 or 4 channels, got {arr.shape}; write it as .tif")
    if arr.dtype != np.uint8 and not (arr.dtype == np.uint16 and arr.shape[0] == 1 and suffix == ".png"):
        raise ValueError(f"{suffix} holds uint8 (or 16-bit grey PNG) images, got {arr.dtype}; write it as .tif")
    out = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(suffix, "JPEG")
    kw = {"dpi": like.meta["dpi"]} if "dpi" in like.meta else {}
    if fmt == "JPEG":
        kw["quality"] = 95
    with atomic_path(path) as tmp:
        PILImage.fromarray(np.ascontiguousarray(out)).save(tmp, format=fmt, **kw)
    return path
