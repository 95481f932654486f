"""Reading and writing images and masks through one table of file formats, :data:`FORMATS`.

The contract every format keeps: :func:`read_image` returns an :class:`useg.files.Image` (array
``(C, *spatial)`` as stored, spacing, affine, what writing back needs), and :func:`write_mask`
writes class labels with that image's geometry, to a temporary name renamed when complete.
Files that cannot be read raise :class:`UsegError` naming the file. Each suffix maps to one
:class:`Format` whose callables do the format's part (PNG/JPEG/BMP/GIF/WebP through Pillow in
:mod:`useg.raster`, TIFF in :mod:`useg.tiff`, NIfTI and DICOM series in :mod:`useg.volumes`, NRRD
and MetaImage in :mod:`useg.itk`); the public functions check the inputs, dispatch, and finish
what all formats share. Adding a format is one entry in the table. Lossy formats (JPEG, WebP,
JPEG-compressed TIFF) are read as images and refused as masks.

Spacing is in millimetres per pixel when the file states a physical unit (PNG/JPEG dpi, TIFF
inch or centimetre resolution, ImageJ's micron/nm/mm unit) and in the file's own unit when it
states none (``meta["spacing_unit"] == ""``); it is 1.0 where the file says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from . import itk, tiff, volumes
from .errors import UsegError
from .files import NIFTI_SUFFIXES, Image, MaskHolds, is_special, refuse_special, suffix_of
from .labels import LabelMap, pack_rgb
from .raster import (
    PIL_FORMATS,
    pil_channels,
    read_pil_image,
    read_pil_mask,
    refuse_lossy_mask,
    write_pil_image,
    write_png_mask,
)

MaskValues = tuple[np.ndarray, str, "tuple[int, ...] | None"]


@dataclass(frozen=True)
class Format:
    """What one file format can do; None where it cannot (the public function then refuses the file).

    Attributes:
        name: the format's name, as :attr:`Image.format` gives it ("png", "tiff", "nifti", ...).
        read_image: ``(path) -> Image`` with the array (C, H, W) or (C, D, H, W), dtype as stored,
            and the file's geometry. Raises UsegError naming the file (missing, damaged, too large).
        read_mask: ``(path) -> (values, mode, palette)``: values (*S) with mode "grey" (integers,
            or whole numbers as float), (*S) palette indices with mode "palette" and the flat
            768-entry palette, or (*S, 3) colours with mode "rgb" (packed by :func:`read_mask`).
            Raises UsegError naming the file, also for a format that must not hold masks (JPEG).
        write_mask: ``(path, stored, like, label_map) -> path``: writes encoded values (*S)
            (uint8/uint16/int32; (*S, 3) uint8 colours in rgb mode), ``like.spatial_shape``,
            atomically with ``like``'s geometry; ``label_map`` (None: values as they are) says
            whether to write a palette or colours. Raises ValueError for values the format cannot hold.
        write_image: ``(path, array, like) -> path``: writes (C, H, W) or (C, D, H, W) atomically
            with ``like``'s resolution. Raises ValueError for what the format cannot hold.
        read_spacing: ``(path) -> spacing or None`` from the header alone, in the axis order of
            ``read_image``'s array, for formats whose headers hold a physical spacing (medical
            volumes); None when the file cannot be read.
        read_affine: ``(path) -> 4x4 RAS voxel-to-world matrix or None`` from the header alone, for
            the same formats: a mask's orientation and origin are compared with its image's.
        mask_holds: the dimensions, stored values and encodings ``write_mask`` holds
            (:class:`useg.files.MaskHolds`), so that prediction picks or refuses an output format
            before it computes anything (:mod:`useg.maskformat`).
    """

    name: str
    read_image: Callable[[Path], Image]
    read_mask: Callable[[Path], MaskValues] | None = None
    write_mask: Callable[[Path, np.ndarray, Image, LabelMap | None], Path] | None = None
    write_image: Callable[[Path, np.ndarray, Image], Path] | None = None
    read_spacing: Callable[[Path], tuple[float, ...] | None] | None = None
    read_affine: Callable[[Path], np.ndarray | None] | None = None
    mask_holds: MaskHolds | None = None  # what write_mask holds (dims, value range, modes); None: no writer


def _read_nifti_mask(path: Path) -> MaskValues:
    return volumes.read_nifti_labels(path), "grey", None


def _write_nifti_mask(path: Path, stored: np.ndarray, like: Image, label_map: LabelMap | None) -> Path:
    return volumes.write_nifti_labels(path, stored, like)


INT32 = (-(2**31), 2**31 - 1)
_PNG = Format("png", partial(read_pil_image, name="png"), read_pil_mask, write_png_mask,
              partial(write_pil_image, pil_format="PNG"), mask_holds=MaskHolds("PNG", (2,), 0, 65535))
_JPEG = Format("jpeg", partial(read_pil_image, name="jpeg"), partial(refuse_lossy_mask, codec="JPEG"), None,
               partial(write_pil_image, pil_format="JPEG"))
_BMP = Format("bmp", partial(read_pil_image, name="bmp"), read_pil_mask, None,
              partial(write_pil_image, pil_format="BMP"))
_GIF = Format("gif", partial(read_pil_image, name="gif"), read_pil_mask)  # first frame; palette masks
_WEBP = Format("webp", partial(read_pil_image, name="webp"), partial(refuse_lossy_mask, codec="WebP"))
_TIFF = Format("tiff", tiff.read_tiff_image, tiff.read_tiff_mask, tiff.write_tiff_mask, tiff.write_tiff_image,
               mask_holds=MaskHolds("TIFF", (2, 3), INT32[0], 2**32 - 1))  # int32 or uint32 objects
_NIFTI = Format("nifti", volumes.read_nifti, _read_nifti_mask, _write_nifti_mask,
                read_spacing=volumes.nifti_spacing, read_affine=volumes.nifti_affine_of,
                mask_holds=MaskHolds("NIfTI", (2, 3), *INT32, ("grey", "palette")))
DICOM_SERIES = Format("dicom", volumes.read_dicom_series)  # a folder of one series' slices, found by content
_ITK = {name: Format(name, itk.read_itk_image, itk.read_itk_mask, itk.write_itk_mask, itk.write_itk_image,
                     itk.itk_spacing, itk.itk_header_affine,
                     MaskHolds(label, (2, 3), *INT32, ("grey", "palette")))
        for name, label in (("nrrd", "NRRD"), ("metaimage", "MetaImage"))}

FORMATS: dict[str, Format] = {
    ".png": _PNG,
    ".jpg": _JPEG,
    ".jpeg": _JPEG,
    ".bmp": _BMP,
    ".gif": _GIF,
    ".webp": _WEBP,
    ".tif": _TIFF,
    ".tiff": _TIFF,
    **{s: _NIFTI for s in NIFTI_SUFFIXES},
    **{s: _ITK[name] for s, name in itk.ITK_FORMATS.items()},  # NRRD, MetaImage: SimpleITK (useg[itk])
}
IMAGE_SUFFIXES = frozenset(FORMATS)
# JPEG and WebP are listed so that their masks are found and refused clearly
MASK_SUFFIXES = frozenset(s for s, f in FORMATS.items() if f.read_mask is not None)


def read_image(path: str | Path) -> Image:
    """Read an image as a channels-first array with its geometry.

    PNG/JPEG/BMP/GIF/WebP through Pillow: grey (L, I;16, I, F) -> 1 channel keeping the dtype,
    RGB -> 3, RGBA -> 3 (alpha dropped), LA -> 1, palette -> RGB; the first frame of an animation.
    TIFF through tifffile: (H, W) -> (1, H, W); (H, W, 3|4) channels last -> (C, H, W) (alpha
    dropped); (C, H, W) with C <= 4 kept; other 3-D stacks, multi-page files, or stacks the file
    marks as Z, -> (1, D, H, W); ImageJ hyperstacks -> (C, D, H, W). NIfTI (.nii, .nii.gz) and
    DICOM series folders through :mod:`useg.volumes`, NRRD (.nrrd, .nhdr) and MetaImage (.mha,
    .mhd) through :mod:`useg.itk` (voxel order as stored, affine kept). Spacing: see the module note.

    Raises:
        UsegError: missing, unreadable, truncated, too large or unsupported files, naming the file.
    """
    path = Path(path)
    refuse_special(path, "a regular image file")  # a FIFO would block the reader forever
    suffix = suffix_of(path)
    fmt = FORMATS.get(suffix)
    if fmt is not _NIFTI and volumes.is_dicom_dir(path):  # a series folder, whatever its name but a NIfTI one
        fmt = DICOM_SERIES
    if fmt is not None:
        image = fmt.read_image(path)
        if isinstance(image, Image):  # a NaN or zero voxel size is the header's fault: said here, once
            _refuse_bad_spacing(path, image.spacing)
        return image
    if not path.exists():
        raise UsegError(f"{path} does not exist; check the path")
    raise UsegError(f"{path} has an unsupported format {suffix or '(no suffix)'}; convert it to one of "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}")


def read_mask(path: str | Path) -> tuple[np.ndarray, str, tuple[int, ...] | None]:
    """Read a mask's stored values.

    Returns:
        (raw, mode, palette): raw (*S) (the image's spatial shape) integer values; mode
        "grey"; "palette" for palette PNGs, GIFs and BMPs (raw = palette indices, the flat 768-entry palette
        returned); "rgb" for colour masks, packed into int32 ``r << 16 | g << 8 | b`` (a colour
        mask whose three channels are equal is "grey").

    Raises:
        UsegError: JPEG, WebP and JPEG-compressed TIFF masks (lossy compression changes label
            values), non-integer values,
            several channels that are not a colour, and unreadable files.
    """
    path = Path(path)
    refuse_special(path, "a regular mask file")
    suffix = suffix_of(path)
    fmt = FORMATS.get(suffix)
    if fmt is None or fmt.read_mask is None:
        if not path.exists():
            raise UsegError(f"{path} does not exist; check the path")
        raise UsegError(f"{path} has an unsupported mask format {suffix or '(no suffix)'}; "
                        "save masks as PNG or TIFF")
    arr, mode, palette = fmt.read_mask(path)
    if mode == "palette":
        return arr, mode, palette
    if mode == "rgb":
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            return pack_rgb(arr), "rgb", None
        arr = arr[..., 0]
    if not np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        elif not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UsegError(f"{path} holds non-integer mask values; "
                            "save whole class values (no interpolation)")
        else:
            arr = arr.astype(np.int64)
    return arr, "grey", None


def write_mask(path: str | Path, labels: np.ndarray, like: Image, label_map: LabelMap | None = None) -> Path:
    """Write class labels with ``like``'s geometry, encoded through ``label_map``, atomically.

    Args:
        path: destination; the suffix picks the format (.png, .tif/.tiff, .nii.gz/.nii, .nrrd/.nhdr,
            .mha/.mhd). Palette PNG when
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
    fmt = FORMATS.get(suffix)
    if fmt is None or fmt.write_mask is None:
        raise ValueError(f"cannot write a mask as {suffix or 'a file without suffix'!r}; "
                         "use .png, .tif or .nii.gz (or .nrrd, .mha)")
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
        # object ids beyond 65535 are uint32 (TIFF holds them, PNG refuses them)
        stored = labels.astype(np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32)
    return fmt.write_mask(path, stored, like, label_map)


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
    suffix = path.suffix.lower()  # the last suffix: no format writes images as .nii.gz
    like = image if isinstance(image, Image) else None
    arr = np.asarray(image.array if isinstance(image, Image) else image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim not in (3, 4):
        raise ValueError(f"write_image needs (H, W), (C, H, W) or (C, D, H, W), got {arr.shape}")
    if like is None:
        like = Image(arr)
    fmt = FORMATS.get(suffix)
    if fmt is None or fmt.write_image is None:
        raise ValueError(f"cannot write an image as {suffix!r}; "
                         f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    return fmt.write_image(path, arr, like)


def file_spacing(path: str | Path) -> tuple[float, ...] | None:
    """The physical spacing a file's header states (NIfTI, NRRD, MetaImage), without its pixels.

    None for formats whose spacing is not a reliable header field (PNG, TIFF, ...) and for files
    that cannot be read (reading them later names the problem). Masks are compared with their
    images by it, and surface distances are measured in it.
    """
    fmt = FORMATS.get(suffix_of(path))
    refuse_special(path)
    spacing = fmt.read_spacing(Path(path)) if fmt is not None and fmt.read_spacing is not None else None
    _refuse_bad_spacing(Path(path), spacing)
    return spacing


def _refuse_bad_spacing(path: Path, spacing: tuple[float, ...] | None) -> None:
    """A header whose voxel size is NaN, infinite, zero or negative is the header's fault: say so.

    Compared with its image, such a mask would be told to "resample"; resampled, NaN spreads.

    Raises:
        UsegError: naming the file, the spacing and the fix (the header, not the pixels).
    """
    if spacing is None or all(math.isfinite(s) and s > 0 for s in spacing):
        return
    shown = "x".join(f"{s:g}" for s in spacing)
    raise UsegError(f"{path} states a voxel size of {shown} in its header, but every axis needs a positive "
                    "finite size; fix the header to the true voxel size in mm (NIfTI: pixdim, e.g. nibabel's "
                    "header.set_zooms), its pixels need no change")


def file_affine(path: str | Path) -> np.ndarray | None:
    """The 4x4 RAS voxel-to-world matrix a file's header states (NIfTI, NRRD, MetaImage), without its
    pixels; None for raster formats and unreadable files, as :func:`file_spacing`."""
    fmt = FORMATS.get(suffix_of(path))
    if is_special(path):
        return None
    return fmt.read_affine(Path(path)) if fmt is not None and fmt.read_affine is not None else None


def channel_count(path: str | Path) -> int | None:
    """The channels :func:`read_image` gives ``path``, from the header where the format allows.

    Pillow's formats and TIFF are not decoded; other formats are read. None when the file cannot
    be read (reading it later names the problem).
    """
    path = Path(path)
    fmt = FORMATS.get(suffix_of(path))
    if is_special(path):
        return None  # never opened: reading it later names it
    try:
        if fmt is not None and fmt.name == "tiff":
            return tiff.tiff_channels(path)
        if fmt is not None and fmt.name in PIL_FORMATS:
            return pil_channels(path)
        return read_image(path).channels
    except (UsegError, OSError, ValueError):
        return None
