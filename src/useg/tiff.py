"""TIFF through tifffile: images, stacks and masks, with their resolution, ImageJ and OME spacing.

The format's entries in :data:`useg.io.FORMATS`. Layout: (H, W) -> (1, H, W); (H, W, 3|4)
channels last -> (C, H, W) (alpha dropped); (C, H, W) with C <= 4 kept; other 3-D stacks,
multi-page files, or stacks the file marks as Z, -> (1, D, H, W); ImageJ hyperstacks ``ZCYX``
-> (C, D, H, W). Spacing is in millimetres when the file states inch or centimetre resolution,
an ImageJ unit (micron, nm, mm, ...) or OME physical sizes, in the file's own unit when it
states none (``meta["spacing_unit"] == ""``), 1.0 where it says nothing. Compressed files
(LZW, Deflate, PackBits, JPEG, zstd, ...) decode through imagecodecs, a dependency; masks
stored with a lossy codec (JPEG, WebP, JPEG XR) are refused like JPEG masks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsegError
from .files import MAX_PIXELS, Image, atomic_path, lossy_mask, unreadable

if TYPE_CHECKING:
    from .labels import LabelMap

_TO_MM = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit inch, centimetre
_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0, "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3,
               "\u03bcm": 1e-3, "\\u00b5m": 1e-3, "nm": 1e-6, "\u00e5": 1e-7, "inch": 25.4}
# TIFF Compression values of lossy codecs: a mask stored with one of them has changed labels
_LOSSY = {6: "JPEG", 7: "JPEG", 34892: "JPEG", 50001: "WebP", 34927: "WebP",
          22610: "JPEG XR", 34934: "JPEG XR"}


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple, dict]:
    """The first series as stored, its axes string, the extra samples, and the geometry metadata."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            arr, axes = _series_array(tif, path)
            page = tif.pages[0]
            meta = _resolution_meta(page.tags)
            meta["compression"] = int(page.compression)
            extra = tif.imagej_metadata or (tif.shaped_metadata or [{}])[0] or {}
            for key in ("unit", "spacing"):
                if key in extra:
                    meta[f"imagej_{key}"] = extra[key]
            if tif.is_ome and tif.ome_metadata:
                meta.update(_ome_sizes(tif.ome_metadata))
            return arr, axes, tuple(page.extrasamples or ()), meta
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except (UsegError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise _read_error(path, e) from None


def _series_array(tif, path: Path) -> tuple[np.ndarray, str]:
    """The first series, or every page stacked along "I" when each page is a series of its own.

    tifffile makes one series per page for files written page by page with its own metadata
    (``imwrite(..., append=True)``); a multi-page file of equal planes is one stack all the same.
    """
    series = tif.series
    first = series[0]
    stack = len(series) > 1 and all(s.shape == first.shape and s.dtype == first.dtype and s.axes == first.axes
                                    and s.axes in ("YX", "YXS") for s in series)
    total = math.prod(first.shape) * (len(series) if stack else 1)
    if total > 4 * MAX_PIXELS:
        raise UsegError(f"{path} holds {total} values, more than useg reads at once; crop or tile it first")
    if stack:
        return np.stack([s.asarray() for s in series]), "I" + first.axes
    return first.asarray(), first.axes


def _resolution_meta(tags) -> dict:
    meta: dict = {}
    if "XResolution" in tags and "YResolution" in tags:
        x, y = (tags[k].value for k in ("XResolution", "YResolution"))  # (numerator, denominator)
        meta["resolution"] = tuple(float(v[0] / v[1] if v[1] else 0.0) for v in (x, y))
        meta["resolution_unit"] = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    return meta


def _read_error(path: Path, e: BaseException) -> UsegError:
    """A missing codec says what to install; anything else is the shared unreadable-file sentence."""
    reason = str(e)
    if "imagecodecs" in reason:
        m = re.search(r"(COMPRESSION|PREDICTOR)\.(\w+)", reason)
        what = f"{m[2]} {'compression' if m[1] == 'COMPRESSION' else 'predictor'}" if m else "compression"
        return UsegError(f"cannot read {path}: its {what} needs the imagecodecs package; "
                         "pip install imagecodecs")
    return unreadable(path, e)


def _ome_sizes(xml: str) -> dict:
    """OME-XML's PhysicalSizeX/Y/Z of the first image, in mm, as ``{"ome_x": ..}``; {} where it has none."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}  # damaged OME-XML: the resolution tags still hold the in-plane size
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    sizes = {}
    for axis in "XYZ" if pixels is not None else "":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m")
        factor = _UNIT_TO_MM.get(unit.strip().lower())
        try:
            size = float(value) if value is not None else 0.0
        except ValueError:
            size = 0.0
        if factor and size > 0:
            sizes[f"ome_{axis.lower()}"] = size * factor
    return sizes


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
    """Spacing (z, y, x) or (y, x): mm when the unit is known, 1.0 where the file says nothing.

    OME-XML's physical sizes come first (they are what OME-TIFF writers mean), then the TIFF
    resolution tags with the ImageJ unit and z spacing.
    """
    if "ome_x" in meta or "ome_y" in meta:
        yx = (meta.get("ome_y", meta.get("ome_x")), meta.get("ome_x", meta.get("ome_y")))
        return ((meta.get("ome_z", 1.0), *yx) if dims == 3 else yx), "mm"
    factor, name = _mm_factor(meta)
    res = meta.get("resolution")
    yx = (factor / res[1], factor / res[0]) if res and res[0] > 0 and res[1] > 0 else (1.0, 1.0)
    if dims == 3:
        z = float(meta.get("imagej_spacing", 0) or 0)
        return (z * factor if z > 0 else 1.0, *yx), name
    return yx, name


def read_tiff_image(path: Path) -> Image:
    """A TIFF image (C, H, W) or stack (C, D, H, W), dtype as stored, with its spacing (module note).

    Multi-page files and ImageJ hyperstacks (``ZCYX``) are volumes, OME-TIFF's physical pixel sizes
    its spacing; any compression tifffile decodes with imagecodecs (LZW, Deflate, PackBits, JPEG,
    zstd, ...), tiled or striped, classic or BigTIFF.
    """
    arr, axes, extrasamples, meta = _read_tiff(path)
    arr = _tiff_layout(arr, axes, extrasamples, path)
    spacing, meta["spacing_unit"] = _tiff_spacing(meta, arr.ndim - 1)
    if "ome_x" in meta or "ome_y" in meta:  # written back as pixels per cm, so that masks keep the OME sizes
        meta.update(resolution=(10.0 / spacing[-1], 10.0 / spacing[-2]), resolution_unit=3)
        meta.pop("imagej_unit", None)
    return Image(np.ascontiguousarray(arr), spacing, None, path, "tiff", meta)


def tiff_channels(path: Path) -> int | None:
    """The channels :func:`read_tiff_image` gives, from the header only; None when the file cannot tell."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, extra = series.shape, series.axes, tuple(tif.pages[0].extrasamples or ())
        return int(_tiff_layout(np.broadcast_to(np.zeros((), np.uint8), shape), axes, extra, path).shape[0])
    except Exception:  # noqa: BLE001 - reading the file later names the problem
        return None


def read_tiff_mask(path: Path) -> tuple[np.ndarray, str, None]:
    """A TIFF mask's values: (H, W) or (D, H, W) "grey", or (H, W, 3) "rgb" colours.

    Raises:
        UsegError: masks with channels other than one or three (a colour), masks stored with a lossy
            compression (JPEG, WebP, JPEG XR), and unreadable files.
    """
    arr, axes, extrasamples, meta = _read_tiff(path)
    if meta["compression"] in _LOSSY:
        codec = _LOSSY[meta["compression"]]
        raise lossy_mask(path, f"{codec}-compressed TIFF", codec)
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
