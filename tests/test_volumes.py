"""NIfTI and DICOM volumes: geometry kept, labels checked, bad files named."""

import nibabel as nib
import numpy as np
import pytest

from useg.errors import UsegError
from useg.io import read_image, read_mask, stem_of, suffix_of, write_mask


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


def test_names_with_nii_gz():
    assert suffix_of("a/case_0001.nii.gz") == ".nii.gz" and stem_of("a/case_0001.nii.gz") == "case_0001"
    assert suffix_of("x.PNG") == ".png" and stem_of("x.png") == "x"


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

    series, vol = generate_uid(), rng.integers(0, 1000, size=(4, 6, 5)).astype(np.uint16)  # (slices, rows, cols)
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
