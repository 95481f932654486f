"""Medical volumes: NIfTI through nibabel, DICOM series through pydicom (an optional extra).

Arrays keep the file's voxel order: a NIfTI volume of shape (X, Y, Z) becomes an
:class:`useg.files.Image` of shape (1, X, Y, Z) with ``spacing`` = the header's zooms and ``affine`` =
the file's voxel-to-world matrix, so a mask written back with :func:`write_nifti_labels` overlays
its image exactly in any viewer (same shape, same affine, same qform/sform codes). A DICOM series
(a folder of one series' slices) is read the same way: voxel order (column, row, slice), spacing
in mm, the affine converted from DICOM's LPS patient frame to NIfTI's RAS; its predictions are
written as NIfTI with that affine, since a DICOM SEG writer is beyond a segmentation tool's scope.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .errors import UsegError
from .files import NIFTI_SUFFIXES, Image, atomic_path, suffix_of

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
MAX_VOXELS = 1 << 31  # 2 G voxels: above any clinical volume, still stops a corrupt header
LABEL_TOLERANCE = 1e-3  # scaled integer labels (slope 2**-32 * n) land within float rounding of integers


def is_nifti(path: str | Path) -> bool:
    return suffix_of(path) in NIFTI_SUFFIXES


def is_dicom_dir(path: str | Path) -> bool:
    """A folder holding DICOM files (by suffix, or by the "DICM" preamble for suffix-less files)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for p in sorted(path.iterdir())[:8]:
        if p.is_file() and (p.suffix.lower() in DICOM_SUFFIXES or _has_dicm(p)):
            return True
    return False


def _has_dicm(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.exists():
        raise UsegError(f"{path} does not exist; check the path")
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise UsegError(f"cannot read {path}: {_reason(e)}; check that it is a valid NIfTI file "
                        "or export it again") from None
    if math.prod(img.shape) > MAX_VOXELS:
        raise UsegError(f"{path} holds {math.prod(img.shape)} voxels, more than useg reads at once; "
                        "crop it first")
    return img


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, EOFError) or "truncat" in text.lower() or "compressed file ended" in text.lower():
        return "the file is truncated"
    return text


def _nifti_data(img, path: Path) -> np.ndarray:
    try:
        # get_fdata would always give float64; the proxy keeps integer types and applies scale factors
        return np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - a truncated .gz fails only when the data is read
        raise UsegError(f"cannot read {path}: {_reason(e)}; check that it is a valid NIfTI file "
                        "or export it again") from None


def read_nifti(path: str | Path) -> Image:
    """Read a NIfTI image as an :class:`useg.files.Image` of shape (C, X, Y, Z) (or (C, X, Y) for 2D files).

    A 4th axis is taken as channels (nnU-Net keeps one file per channel, which
    :mod:`useg.layouts` stacks instead). Scale factors are applied by nibabel.

    Raises:
        UsegError: missing, truncated or unreadable files, and files with more than 4 axes.
    """
    path = Path(path)
    img = _load_nifti(path)
    arr = _nifti_data(img, path)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise UsegError(f"{path} has shape {arr.shape}; give one 2D or 3D volume per file "
                        "(channels as a 4th axis or as separate files)")
    dims = arr.ndim - 1
    spacing = tuple(float(z) for z in img.header.get_zooms()[:dims])
    meta = {"header": img.header.copy(), "nifti_class": type(img).__name__}
    affine = np.asarray(img.affine, dtype=np.float64)
    return Image(np.ascontiguousarray(arr), spacing, affine, path, "nifti", meta)


def nifti_spacing(path: str | Path) -> tuple[float, ...] | None:
    """The voxel spacing from a NIfTI header (the data is not read); None when unreadable."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - reading the file later names the problem
        return None
    n = min(3, len(img.shape))
    return tuple(float(z) for z in img.header.get_zooms()[:n])


def nifti_affine_of(path: str | Path) -> np.ndarray | None:
    """The 4x4 voxel-to-world matrix of a NIfTI header (the data is not read); None when unreadable."""
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception:  # noqa: BLE001 - reading the file later names the problem
        return None


DIRECTION_TOL = 1e-3  # largest accepted difference of the axes' unit direction vectors
ORIGIN_TOL = 1e-2  # largest accepted origin shift, in voxels of the smallest spacing


def geometry_difference(mask: np.ndarray, image: np.ndarray, spacing: tuple[float, ...]) -> str | None:
    """How a mask's affine places its voxels elsewhere than its image's, or None when they agree.

    Spacing is compared before (the zooms); this compares what is left: the axes' directions (a
    flipped, permuted or rotated axis) within :data:`DIRECTION_TOL`, and the origin within
    :data:`ORIGIN_TOL` of a voxel.

    Args:
        mask: the mask's 4x4 voxel-to-world matrix (RAS).
        image: its image's.
        spacing: the image's spacing (the unit of the origin tolerance).

    Returns:
        The part of a sentence after the mask's name, e.g. "is oriented LAS but its image RAS".
    """
    import nibabel as nib

    def directions(a: np.ndarray) -> np.ndarray:
        cols = np.asarray(a, np.float64)[:3, :3]
        return cols / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)

    if not np.allclose(directions(mask), directions(image), rtol=0, atol=DIRECTION_TOL):
        codes = ["".join(c or "?" for c in nib.orientations.aff2axcodes(a)) for a in (mask, image)]
        how = "a flipped or permuted axis" if codes[0] != codes[1] else "rotated axes"
        return f"is oriented {codes[0]} but its image {codes[1]} ({how})"
    tol = ORIGIN_TOL * min(abs(float(s)) for s in spacing) if spacing else ORIGIN_TOL
    origins = np.asarray(mask, np.float64)[:3, 3], np.asarray(image, np.float64)[:3, 3]
    if np.abs(origins[0] - origins[1]).max() > tol:
        fmt = ["x".join(f"{v:g}" for v in np.round(o, 3)) for o in origins]
        return f"has its origin at {fmt[0]} mm but its image at {fmt[1]} mm (the mask is shifted)"
    return None


def read_nifti_labels(path: str | Path) -> np.ndarray:
    """A label volume's integer values (*S); floats are accepted when they are integral.

    Some datasets store labels as float32 (BraTS) or as integers with a scale factor; values within
    :data:`LABEL_TOLERANCE` of an integer are rounded, anything else is refused.

    Raises:
        UsegError: unreadable files and non-integral label values, naming the file.
    """
    path = Path(path)
    arr = _nifti_data(_load_nifti(path), path)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise UsegError(f"{path} has shape {arr.shape}; a label file holds one 2D or 3D volume")
    if np.issubdtype(arr.dtype, np.integer):
        return np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    rounded = np.round(arr)
    if not np.isfinite(arr).all() or np.abs(arr - rounded).max(initial=0) > LABEL_TOLERANCE:
        raise UsegError(f"{path} holds non-integral label values; labels must be whole class numbers "
                        "(was the mask resampled with interpolation? resample it with nearest neighbour)")
    top = float(np.abs(rounded).max(initial=0))
    return rounded.astype(np.uint8 if rounded.min(initial=0) >= 0 and top <= 255 else np.int32)


def nifti_affine(like: Image) -> np.ndarray:
    """The 4x4 voxel-to-world matrix ``like``'s voxels are written with (the one fallback for all writers).

    Its own affine (NIfTI, DICOM series), else its spacing on the diagonal, missing axes 1.0 (a
    volume from TIFF, a 2D image).
    """
    if like.affine is not None:
        return like.affine
    return np.diag([*(list(like.spacing) + [1.0] * 3)[:3], 1.0])


def write_nifti(path: str | Path, array: np.ndarray, like: Image) -> Path:
    """Write ``array`` as NIfTI in ``like``'s geometry, atomically, its values stored as they are.

    The affine is :func:`nifti_affine`; an image read from NIfTI also gives its header (NIfTI-1 or
    -2, qform/sform codes, units), so the file overlays its image exactly in any viewer. Otherwise
    the zooms are ``like``'s spacing and both codes are 1 (scanner).

    Args:
        path: destination ending in .nii.gz or .nii.
        array: (*S) or (*S, K) (a 4th axis of channels), ``like.spatial_shape`` first; stored in
            its own dtype, never scaled.
        like: the :class:`useg.files.Image` the values belong to.

    Returns:
        ``path`` as a Path.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"cannot write NIfTI as {path.name!r}; use .nii.gz or .nii")
    affine = nifti_affine(like)
    header = like.meta.get("header")
    cls = nib.Nifti2Image if like.meta.get("nifti_class") == "Nifti2Image" else nib.Nifti1Image
    img = cls(array, affine, header=header.copy() if header is not None else None)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)  # values are stored as they are, never scaled
    if header is None:
        img.header.set_zooms((tuple(like.spacing) + (1.0,) * array.ndim)[: array.ndim])
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        # nibabel picks gzip from the name, so the temporary keeps the full ".nii.gz" ending
        nib.save(img, str(tmp))
    return path


def write_nifti_labels(path: str | Path, labels: np.ndarray, like: Image) -> Path:
    """Write integer labels (*S) as NIfTI with ``like``'s geometry, atomically (see :func:`write_nifti`).

    Args:
        path: destination ending in .nii.gz or .nii.
        labels: (*S) integer values, ``like.spatial_shape``; stored as uint8, int16 or int32.
        like: the :class:`useg.files.Image` the labels belong to (NIfTI or DICOM).
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"cannot write a NIfTI mask as {path.name!r}; use .nii.gz or .nii")
    labels = np.asarray(labels)
    hi, lo = int(labels.max(initial=0)), int(labels.min(initial=0))
    if lo < -(2**31) or hi >= 2**31:  # io.FORMATS says so first; never wrap values silently
        raise ValueError(f"NIfTI masks hold values {-(2**31)} .. {2**31 - 1}, not {lo} .. {hi}; "
                         "write them as .tif")
    small = lo >= 0 and hi <= 255
    out = labels.astype(np.uint8 if small else np.int16 if -32768 <= lo and hi < 32768 else np.int32)
    return write_nifti(path, out, like)


def _read_dicom_slices(folder: Path) -> list:
    """Every slice in ``folder`` as (path, dataset), pixels decoded; refuses damage and mixed series."""
    try:
        import pydicom
    except ImportError:
        raise UsegError(f"{folder} is a DICOM series but pydicom is not installed; "
                        "run pip install 'useg[dicom]'") from None
    slices = []
    for p in sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")):
        try:
            ds = pydicom.dcmread(p)
            ds.pixel_array  # noqa: B018 - decode now, so a damaged file is named here
        except Exception as e:  # noqa: BLE001 - pydicom raises InvalidDicomError, ValueError, ...
            raise UsegError(f"cannot read {p}: {_reason(e)}; remove it from the series folder "
                            "or export the series again") from None
        slices.append((p, ds))
    if not slices:
        raise UsegError(f"{folder} holds no DICOM slices; point at the folder of one series")
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise UsegError(f"{folder} mixes {len(uids)} DICOM series; put each series in its own folder")
    return slices


def _position(ds) -> np.ndarray:
    """A slice's ImagePositionPatient (LPS, mm); its InstanceNumber along z when the tag is missing."""
    default = [0, 0, float(getattr(ds, "InstanceNumber", 0))]
    return np.array([float(v) for v in getattr(ds, "ImagePositionPatient", default)])


def read_dicom_series(folder: str | Path) -> Image:
    """Read one DICOM series (a folder of its slices) as an :class:`useg.files.Image` (1, cols, rows, slices).

    Slices are ordered by their position along the slice normal, RescaleSlope/Intercept applied
    (CT in Hounsfield units), spacing from PixelSpacing and the slice positions.

    Raises:
        UsegError: pydicom missing, no readable slices, several series, or inconsistent slices.
    """
    folder = Path(folder)
    slices = _read_dicom_slices(folder)
    ds0 = slices[0][1]
    orient = np.array([float(v) for v in getattr(ds0, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row_dir, col_dir = orient[:3], orient[3:]  # direction of increasing column index, of increasing row index
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(_position(s[1]) @ normal))
    shapes = {s[1].pixel_array.shape for s in slices}
    if len(shapes) > 1:
        raise UsegError(f"{folder} holds slices of different sizes {sorted(shapes)}; it is not one series")
    planes = []
    for _, ds in slices:
        a = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append((a * slope + inter).T)  # (rows, cols) -> (cols, rows): voxel index i runs along a row
    arr = np.stack(planes, axis=-1)[None]
    # (between rows, between columns)
    row_mm, col_mm = (float(v) for v in getattr(ds0, "PixelSpacing", [1, 1]))
    if len(slices) > 1:
        step = (_position(slices[-1][1]) - _position(slices[0][1])) / (len(slices) - 1)
        dz = float(np.linalg.norm(step)) or float(getattr(ds0, "SliceThickness", 1) or 1)
    else:
        dz = float(getattr(ds0, "SliceThickness", 1) or 1)
        step = normal * dz
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * col_mm, col_dir * row_mm
    lps[:3, 2], lps[:3, 3] = step, _position(slices[0][1])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    meta = {"modality": str(getattr(ds0, "Modality", ""))}
    return Image(np.ascontiguousarray(arr), (col_mm, row_mm, dz), affine, folder, "dicom", meta)
