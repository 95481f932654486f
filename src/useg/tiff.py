"""TIFF through tifffile: images, stacks and masks, with their resolution and ImageJ spacing.

The format's entries in :data:`useg.io.FORMATS`. Layout: (H, W) -> (1, H, W); (H, W, 3|4)
channels last -> (C, H, W) (alpha dropped); (C, H, W) with C <= 4 kept; other 3-D stacks, or
stacks the file marks as Z, -> (1, D, H, W). Spacing is in millimetres when the file states
inch or centimetre resolution or an ImageJ unit (micron, nm, mm, ...), in the file's own unit
when it states none (``meta["spacing_unit"] == ""``), 1.0 where it says nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsegError
from .files import MAX_PIXELS, Image, atomic_path, unreadable

if TYPE_CHECKING:
    from .labels import LabelMap

_TO_MM = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit inch, centimetre
_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0, "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3,
               "\\u00b5m": 1e-3, "nm": 1e-6, "inch": 25.4}


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple, dict]:
    """The first series as stored, its axes string, the extra samples, and the resolution metadata."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if math.prod(series.shape) > 4 * MAX_PIXELS:
                raise UsegError(f"{path} holds {math.prod(series.shape)} values, more than useg reads "
                                "at once; crop or tile it first")
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
        raise unreadable(path, e) from None


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


def read_tiff_image(path: Path) -> Image:
    """A TIFF image (C, H, W) or stack (C, D, H, W), dtype as stored, with its spacing (module note)."""
    arr, axes, extrasamples, meta = _read_tiff(path)
    arr = _tiff_layout(arr, axes, extrasamples, path)
    spacing, meta["spacing_unit"] = _tiff_spacing(meta, arr.ndim - 1)
    return Image(np.ascontiguousarray(arr), spacing, None, path, "tiff", meta)


def read_tiff_mask(path: Path) -> tuple[np.ndarray, str, None]:
    """A TIFF mask's values: (H, W) or (D, H, W) "grey", or (H, W, 3) "rgb" colours.

    Raises:
        UsegError: masks with channels other than one or three (a colour), and unreadable files.
    """
    arr, axes, extrasamples, _ = _read_tiff(path)
    arr = _tiff_layout(arr, axes, extrasamples, path)
    if arr.shape[0] == 1:
        return arr[0], "grey", None
    if arr.shape[0] == 3 and arr.ndim == 3:
        return np.moveaxis(arr, 0, -1), "rgb", None
    raise UsegError(f"{path} has {arr.shape[0]} channels; save masks with one channel (or as RGB colours)")


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


def write_tiff(path: str | Path, array: np.ndarray, like: Image | None = None, rgb: bool = False) -> Path:
    """Write an array as TIFF atomically, with ``like``'s resolution (and ImageJ z spacing for volumes).

    Args:
        path: destination (.tif or .tiff).
        array: (H, W); (H, W, 3) colour when ``rgb``; (C, H, W) channels (one page, C samples);
            (D, H, W) when ``like`` is a volume, or (C, D, H, W), written as an ImageJ-style stack.
        like: the image whose geometry the file keeps; None writes no resolution.
        rgb: store (H, W, 3) as an RGB colour image.

    Returns:
        ``path`` as a Path.
    """
    import tifffile

    path = Path(path)
    kw = _tiff_geometry(like) if like is not None else {}
    with atomic_path(path) as tmp:
        if rgb:
            tifffile.imwrite(tmp, array, photometric="rgb", **kw)
        elif array.ndim == 2:
            tifffile.imwrite(tmp, array, photometric="minisblack", **kw)
        elif like is not None and like.dims == 3 or array.ndim == 4:
            md: dict = {"axes": "ZYX" if array.ndim == 3 else "CZYX"}
            if like is not None:
                unit = like.meta.get("imagej_unit")
                factor, _ = _mm_factor({"resolution_unit": kw.get("resolutionunit"), "imagej_unit": unit})
                if unit:
                    md["unit"] = unit
                if like.spacing[0] != 1.0:  # the reader multiplies z by the same factor as y and x
                    md["spacing"] = like.spacing[0] / factor
            tifffile.imwrite(tmp, array, photometric="minisblack", metadata=md, **kw)
        else:  # (C, H, W) channels: one page, C samples
            tifffile.imwrite(tmp, array, photometric="minisblack", planarconfig="separate",
                             metadata={"axes": "SYX"}, **kw)
    return path


def write_tiff_mask(path: Path, stored: np.ndarray, like: Image, label_map: LabelMap | None) -> Path:
    """Write encoded mask values (*S) (or (H, W, 3) colours in rgb mode) with ``like``'s geometry."""
    return write_tiff(path, stored, like, rgb=label_map is not None and label_map.mode == "rgb")


def write_tiff_image(path: Path, array: np.ndarray, like: Image) -> Path:
    """Write (C, H, W) or (C, D, H, W), any dtype: one channel as grey, three 2D channels as RGB."""
    c = array.shape[0]
    out = array[0] if c == 1 else np.moveaxis(array, 0, -1) if c == 3 and array.ndim == 3 else array
    return write_tiff(path, out, like, rgb=c == 3 and array.ndim == 3)
