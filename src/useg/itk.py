"""ITK formats through SimpleITK (the extra ``useg[itk]``): NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd).

The formats of grand-challenge.org releases. A volume is held the way :mod:`useg.volumes` holds
NIfTI: voxel order as ITK indexes it, so ITK's (i, j, k) image of size (X, Y, Z) becomes an
:class:`useg.files.Image` of shape (C, X, Y, Z) (SimpleITK's numpy view is (Z, Y, X), reversed
here) with spacing (sx, sy, sz) in the same axis order, and ``affine`` the RAS voxel-to-world
matrix built from ITK's LPS origin, spacing and direction (what ITK's own NIfTI writer stores),
so an NRRD and the NIfTI converted from it read alike. ``meta["itk"]`` keeps the origin, spacing
and direction as the file states them, and a mask written back gets them exactly. Multi-component
pixels (an RGB .mha) are channels. Without SimpleITK every read or write names the file and the
extra to install.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsegError
from .files import Image, atomic_path, suffix_of

if TYPE_CHECKING:
    from .labels import LabelMap

logger = logging.getLogger(__name__)

ITK_FORMATS = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}  # suffix -> name
DETACHED = frozenset({".nhdr", ".mhd"})  # a header naming a separate data file
MAX_VOXELS = 1 << 31  # as for NIfTI: above any clinical volume, still stops a corrupt header
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's patient frame (LPS) -> NIfTI's (RAS); its own inverse


def _sitk(path: Path, verb: str):
    """SimpleITK, or the one sentence saying which extra to install."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise UsegError(f"{verb} {path} needs SimpleITK; pip install 'useg[itk]'") from None
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warnings go to stderr, not through logging
    return sitk


def _reason(e: BaseException) -> str:
    """The useful part of an ITK exception: the text after "ITK ERROR: <object>(0x...): "."""
    text = " ".join(str(e).split())
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        text = text.split("): ", 1)[1] if "): " in text[:80] else text
    return text.strip() or type(e).__name__


def _read(path: Path):
    """(SimpleITK, the image) after checking the header's size; UsegError naming the file otherwise."""
    sitk = _sitk(path, "reading")
    if not path.exists():
        raise UsegError(f"{path} does not exist; check the path")
    name = "NRRD" if ITK_FORMATS.get(suffix_of(path)) == "nrrd" else "MetaImage"
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        values = math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
        if values > MAX_VOXELS:
            raise UsegError(f"{path} holds {values} values, more than useg reads at once; crop it first")
        img = reader.Execute()
    except (UsegError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - SimpleITK raises RuntimeError for every damaged file
        raise UsegError(f"cannot read {path}: {_reason(e)}; check that it is a valid {name} file "
                        "(and its data file) or export it again") from None
    if img.GetDimension() not in (2, 3):
        raise UsegError(f"{path} has {img.GetDimension()} dimensions; give one 2D or 3D volume per file")
    return sitk, img


def itk_affine(spacing, origin, direction) -> np.ndarray:
    """The 4x4 RAS voxel-to-world matrix of ITK's LPS geometry (2D: the third axis is the identity).

    >>> itk_affine((0.5, 2.0), (10.0, 20.0), (1.0, 0.0, 0.0, 1.0)).tolist()[:2]
    [[-0.5, 0.0, 0.0, -10.0], [0.0, -2.0, 0.0, -20.0]]
    """
    d = len(spacing)
    lps = np.eye(4)
    lps[:d, :d] = np.asarray(direction, np.float64).reshape(d, d) * np.asarray(spacing, np.float64)
    lps[:d, 3] = origin
    return LPS_TO_RAS @ lps + 0.0  # + 0.0: no signed zeros


def _geometry(like: Image, dims: int) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in ITK's terms for writing like ``like``, in ``like``'s axis order."""
    g = like.meta.get("itk")
    if g is not None and len(g["spacing"]) == dims:
        return tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"])
    if like.affine is not None:
        lps = LPS_TO_RAS @ np.asarray(like.affine, np.float64)
        cols = lps[:dims, :dims]
        spacing = np.linalg.norm(cols, axis=0)
        spacing[spacing == 0] = 1.0
        direction = (cols / spacing).ravel()
        return tuple(spacing.tolist()), tuple(lps[:dims, 3].tolist()), tuple(direction.tolist())
    # a raster image (PNG, TIFF) is (z, y, x) / (y, x): ITK's x is its last axis
    return tuple(reversed(like.spacing)), (0.0,) * dims, tuple(np.eye(dims).ravel().tolist())


def itk_spacing(path: Path) -> tuple[float, ...] | None:
    """The spacing in an NRRD / MetaImage header, in :func:`read_itk_image`'s axis order (x, y, z);
    None when the file cannot be read or SimpleITK is missing (reading it names the problem)."""
    try:
        sitk = _sitk(path, "reading")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(float(v) for v in reader.GetSpacing())
    except Exception:  # noqa: BLE001 - SimpleITK raises RuntimeError for every damaged file
        return None


def itk_header_affine(path: Path) -> np.ndarray | None:
    """The RAS 4x4 matrix (:func:`itk_affine`) of an NRRD / MetaImage header; None when unreadable."""
    try:
        sitk = _sitk(path, "reading")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.GetDimension() not in (2, 3):
            return None
        return itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    except Exception:  # noqa: BLE001 - SimpleITK raises RuntimeError for every damaged file
        return None


def read_itk_image(path: Path) -> Image:
    """An NRRD / MetaImage file as an Image (C, X, Y, Z) or (C, X, Y), dtype as stored, affine kept.

    Raises:
        UsegError: SimpleITK missing, a missing, damaged or too large file, or one of 4+ dimensions.
    """
    sitk, img = _read(path)
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, components)
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    arr = np.transpose(arr, (arr.ndim - 1, *range(arr.ndim - 2, -1, -1)))  # -> (components, x, y, z)
    spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    meta = {"itk": {"spacing": spacing, "origin": origin, "direction": direction},
            "pixel_type": img.GetPixelIDTypeAsString(), "spacing_unit": "mm"}
    affine = itk_affine(spacing, origin, direction)
    return Image(np.ascontiguousarray(arr), spacing, affine, path, ITK_FORMATS[suffix_of(path)], meta)


def read_itk_mask(path: Path) -> tuple[np.ndarray, str, None]:
    """A label file's values (X, Y, Z) or (X, Y), in :func:`read_itk_image`'s axis order, "grey".

    Raises:
        UsegError: SimpleITK missing, unreadable files, and files of several components per voxel.
    """
    sitk, img = _read(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UsegError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                        "save masks with one")
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).T), "grey", None


def write_itk(path: str | Path, array: np.ndarray, like: Image) -> Path:
    """Write (*S) values, or (C, *S) channels as a vector image, atomically with ``like``'s geometry.

    ``*S`` is ``like.spatial_shape``: ITK's voxel order for an image with an affine (NIfTI, DICOM,
    ITK), (z, y, x) for a raster image. Single-file formats (.nrrd, .mha) go to a temporary name
    renamed when complete; a detached header (.nhdr, .mhd) is written beside its data file in a
    temporary folder and moved in after it, so the header never names a half-written file.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    sitk = _sitk(path, "writing")
    dims = like.dims
    vector = array.ndim == dims + 1
    voxel_order = like.affine is not None
    if voxel_order:  # (C?, x, y, z) -> ITK's numpy order (z, y, x, C?)
        spatial = range(array.ndim - 1, array.ndim - 1 - dims, -1)
        array = np.transpose(array, (*spatial, *([0] if vector else [])))
    elif vector:
        array = np.moveaxis(array, 0, -1)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
    spacing, origin, direction = _geometry(like, dims)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    if suffix_of(path) not in DETACHED:
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), True)  # SimpleITK picks the format from tmp's suffix
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".useg-") as folder:
        sitk.WriteImage(img, str(Path(folder) / path.name), True)
        written = sorted(Path(folder).iterdir(), key=lambda p: p.name == path.name)  # the header last
        for p in written:
            os.replace(p, path.parent / p.name)
    return path


def write_itk_mask(path: Path, stored: np.ndarray, like: Image, label_map: LabelMap | None) -> Path:
    """Write encoded mask values (*S) with ``like``'s geometry (the :data:`useg.io.FORMATS` entry)."""
    if stored.ndim != like.dims:
        raise ValueError(f"NRRD and MetaImage masks hold class values; write colour masks as .png or .tif "
                         f"({path})")
    return write_itk(path, stored, like)


def write_itk_image(path: Path, array: np.ndarray, like: Image) -> Path:
    """Write (C, *S), any dtype SimpleITK holds: one channel as a scalar image, more as a vector image."""
    return write_itk(path, array[0] if array.shape[0] == 1 else array, like)
