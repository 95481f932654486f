"""NIfTI and DICOM volumes: geometry kept, labels checked, bad files named."""

import nibabel as nib
import numpy as np
import pytest

from useg.errors import UsegError
from useg.files import Image
from useg.io import read_image, read_mask, write_mask
from useg.volumes import nifti_affine, write_nifti


def _nifti(path, arr, zooms=(1.0, 1.0, 1.0), affine=None, dtype=None, slope=None, inter=0.0):
    affine = np.diag([*zooms, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(zooms[: arr.ndim])
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("shape", [(7, 9, 5), (6, 11)])
def test_nifti_round_trip_keeps_the_geometry(tmp_path, rng, shape):
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])[: 4, : 4]
    zooms = (0.8, 0.8, 2.5)[: len(shape)]
    arr = rng.normal(size=shape).astype(np.float32)
    src = _nifti(tmp_path / "img.nii.gz", arr, zooms, affine)
    image = read_image(src)
    assert image.array.shape == (1, *shape) and image.format == "nifti"
    assert image.spacing == pytest.approx(zooms)
    np.testing.assert_array_equal(image.array[0], arr)
    labels = (arr > 0).astype(np.int64) * 3
    out = write_mask(tmp_path / "out" / "img.nii.gz", labels, like=image)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib.load(str(src)).affine)  # overlays its image in a viewer
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert back.get_data_dtype() == np.uint8
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.nii.gz"]  # no temporary left


def test_float_labels_accepted_when_integral_and_refused_otherwise(tmp_path):
    lab = np.zeros((4, 5, 6), np.float32)
    lab[1:3, 1:3, 1:3] = 4
    raw, mode, _ = read_mask(_nifti(tmp_path / "ok.nii.gz", lab))
    assert mode == "grey" and raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 4}
    lab[0, 0, 0] = 0.5
    with pytest.raises(UsegError, match=r"bad\.nii\.gz.*non-integral"):
        read_mask(_nifti(tmp_path / "bad.nii.gz", lab))


def test_scaled_integer_labels_round_to_whole_values(tmp_path):
    # BraTS' brainmask: int32 with a tiny slope, 0/1 only up to float rounding once scaled
    raw = np.full((3, 4, 5), -(2**31), np.int32)
    raw[1] = 2**31 - 1
    arr, _, _ = read_mask(_nifti(tmp_path / "m.nii.gz", raw, dtype=np.int32, slope=2.0**-32, inter=0.5))
    assert set(np.unique(arr)) == {0, 1}


def test_truncated_nifti_is_named(tmp_path, rng):
    good = _nifti(tmp_path / "g.nii.gz", rng.normal(size=(20, 20, 20)).astype(np.float32))
    bad = tmp_path / "t.nii.gz"
    bad.write_bytes(good.read_bytes()[:600])
    with pytest.raises(UsegError, match=r"t\.nii\.gz"):
        read_image(bad)


def test_dicom_series_reads_in_slice_order(tmp_path, rng):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    # (slices, rows, cols)
    series, vol = generate_uid(), rng.integers(0, 1000, size=(4, 6, 5)).astype(np.uint16)
    folder = tmp_path / "ct"
    folder.mkdir()
    for k in [2, 0, 3, 1]:  # written out of order: position decides
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(folder / f"s{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.Rows, ds.Columns = 6, 5
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.6], 2.0
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 2.0 * k]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = vol[k].tobytes()
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    image = read_image(folder)
    assert image.format == "dicom" and image.array.shape == (1, 5, 6, 4)
    np.testing.assert_array_equal(image.array[0], np.transpose(vol, (2, 1, 0)).astype(np.float32) - 1024)
    assert image.spacing == pytest.approx((0.6, 0.7, 2.0))
    out = write_mask(tmp_path / "ct.nii.gz", (image.array[0] > 0).astype(np.uint8), like=image)
    assert nib.load(str(out)).shape == (5, 6, 4)


def test_nifti_affine_is_the_one_fallback():
    rotated = np.array([[0, -0.8, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], float)
    assert nifti_affine(Image(np.zeros((1, 2, 3, 4)), affine=rotated)) is rotated
    np.testing.assert_array_equal(nifti_affine(Image(np.zeros((1, 2, 3, 4)), spacing=(2.0, 0.5, 0.25))),
                                  np.diag([2.0, 0.5, 0.25, 1.0]))
    np.testing.assert_array_equal(nifti_affine(Image(np.zeros((1, 3, 4)), spacing=(0.5, 0.25))),
                                  np.diag([0.5, 0.25, 1.0, 1.0]))  # 2D: the missing axis is 1.0


def test_write_nifti_keeps_the_geometry_and_the_values(tmp_path, rng):
    src = _nifti(tmp_path / "img.nii", rng.normal(size=(4, 5, 6)).astype(np.float32), (0.8, 0.9, 2.5))
    image = read_image(src)
    probs = rng.random((4, 5, 6, 3)).astype(np.float32)  # a 4th axis of channels
    out = write_nifti(tmp_path / "o" / "p.nii.gz", probs, image)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib.load(str(src)).affine)
    assert back.get_data_dtype() == np.float32
    assert back.header.get_zooms()[:3] == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_array_equal(np.asarray(back.dataobj), probs)
    vol = Image(np.zeros((1, 4, 5, 6), np.uint16), spacing=(2.0, 0.5, 0.25), format="tiff")  # no header
    counts = rng.integers(0, 9, (4, 5, 6, 2)).astype(np.uint8)
    back = nib.load(str(write_nifti(tmp_path / "t.nii.gz", counts, vol)))
    np.testing.assert_array_equal(back.affine, np.diag([2.0, 0.5, 0.25, 1.0]))
    assert back.header.get_zooms() == pytest.approx((2.0, 0.5, 0.25, 1.0))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), counts)
    with pytest.raises(ValueError, match="use .nii.gz or .nii"):
        write_nifti(tmp_path / "p.tif", probs, image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii", "o", "t.nii.gz"]  # no temporary left
