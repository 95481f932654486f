"""Pillow's raster formats: PNG (8/16-bit, palettes), JPEG, BMP, GIF (first frame), WebP.

Their readers and writers for the format table :data:`useg.io.FORMATS` (the contract is
:class:`useg.io.Format`'s): grey (L, I;16, I, F) -> 1 channel keeping the dtype, RGB -> 3, RGBA
-> 3 (alpha dropped), LA -> 1, palette -> RGB; masks as grey values, palette indices with their
palette, or colours; dpi kept as spacing in mm. JPEG and WebP masks are refused (lossy
compression changes label values). Importing this module raises Pillow's 89 Mpx decompression
bomb limit to :data:`useg.files.MAX_PIXELS` unless the user set their own.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from .errors import UsegError
from .files import MAX_PIXELS, Image, atomic_path, lossy_mask, unreadable
from .labels import LabelMap

logger = logging.getLogger(__name__)

_PIL_DEFAULT_LIMIT = 89_478_485
if PILImage.MAX_IMAGE_PIXELS == _PIL_DEFAULT_LIMIT:  # raise Pillow's 89 Mpx default, keep a user's own choice
    PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS

PIL_FORMATS = frozenset({"png", "jpeg", "bmp", "gif", "webp"})
# the channels read_image gives each Pillow mode (palettes as RGB); other modes are colour
_PIL_CHANNELS = {"1": 1, "L": 1, "LA": 1, "La": 1, "I": 1, "F": 1, "P": 3, "PA": 3}


def _read_pil(path: Path) -> PILImage.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                im.load()  # the first frame of an animated GIF or WebP
                if getattr(im, "n_frames", 1) > 1:
                    logger.info("%s has %d frames; reading the first", path, im.n_frames)
                return im.copy()
    except FileNotFoundError:
        raise UsegError(f"{path} does not exist; check the path") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise unreadable(path, e) from None


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


def read_pil_image(path: Path, name: str) -> Image:
    """Grey (L, I;16, I, F) -> 1 channel keeping the dtype, RGB -> 3, RGBA -> 3, LA -> 1, palette -> RGB."""
    im = _read_pil(path)
    arr = _pil_array(im)
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    meta, spacing = {}, ()
    dpi = im.info.get("dpi")
    if dpi and float(dpi[0]) > 0 and float(dpi[1]) > 0:
        meta["dpi"] = (float(dpi[0]), float(dpi[1]))
        spacing = (25.4 / float(dpi[1]), 25.4 / float(dpi[0]))
        meta["spacing_unit"] = "mm"
    return Image(np.ascontiguousarray(arr), spacing, None, path, name, meta)


def read_pil_mask(path: Path) -> tuple[np.ndarray, str, tuple[int, ...] | None]:
    """A mask's values: palette indices with the 768-entry palette, grey values, or (H, W, 3) colours."""
    im = _read_pil(path)
    if im.mode in ("P", "PA"):
        arr = np.asarray(im.getchannel(0) if im.mode == "PA" else im)
        pal = list(im.getpalette() or [])[:768]
        return arr, "palette", tuple(pal + [0] * (768 - len(pal)))
    arr = _pil_array(im)
    return arr, "rgb" if arr.ndim == 3 else "grey", None


def refuse_lossy_mask(path: Path, codec: str) -> tuple[np.ndarray, str, tuple[int, ...] | None]:
    """The mask reader of a lossy format: always refuses (``codec`` names the compression)."""
    raise lossy_mask(path, codec, codec)


def write_png_mask(path: Path, stored: np.ndarray, like: Image, label_map: LabelMap | None) -> Path:
    """Encoded 2D mask values as PNG (8 or 16-bit; a palette in palette mode), with ``like``'s dpi."""
    if like.dims != 2:
        raise ValueError(f"PNG holds 2D masks; write the {like.dims}D labels as .tif")
    if stored.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG holds values up to 65535; write masks with larger values as .tif ({path})")
    with atomic_path(path) as tmp:
        im = PILImage.fromarray(stored)
        if label_map is not None and label_map.mode == "palette":
            im.putpalette(list(label_map.palette or _grey_palette()))  # an L image becomes P
        kw = {"dpi": like.meta["dpi"]} if "dpi" in like.meta else {}
        im.save(tmp, format="PNG", **kw)
    return path


def _grey_palette() -> list[int]:
    return [v for i in range(256) for v in (i, i, i)]


def write_pil_image(path: Path, arr: np.ndarray, like: Image, pil_format: str) -> Path:
    """2D, 1 or 3 channels (4 as RGBA), uint8 (or uint16 grey PNG); JPEG at quality 95."""
    suffix = path.suffix.lower()
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
        raise ValueError(f"{suffix} holds 2D images with 1, 3 or 4 channels, got {arr.shape}; "
                         "write it as .tif")
    if arr.dtype != np.uint8 and not (arr.dtype == np.uint16 and arr.shape[0] == 1 and pil_format == "PNG"):
        raise ValueError(f"{suffix} holds uint8 (or 16-bit grey PNG) images, got {arr.dtype}; "
                         "write it as .tif")
    out = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    kw = {"dpi": like.meta["dpi"]} if "dpi" in like.meta else {}
    if pil_format == "JPEG":
        kw["quality"] = 95
    with atomic_path(path) as tmp:
        PILImage.fromarray(np.ascontiguousarray(out)).save(tmp, format=pil_format, **kw)
    return path


def pil_channels(path: Path) -> int:
    """The channels :func:`read_pil_image` gives ``path``, from its header (the pixels are not decoded).

    Raises:
        OSError: Pillow cannot open the file.
    """
    with PILImage.open(path) as im:  # lazy: the header only
        return _PIL_CHANNELS.get(im.mode, 1 if im.mode.startswith("I;16") else 3)
