"""Multi-channel cases, nnU-Net's raw layout and case folders."""

import json

import nibabel as nib
import numpy as np
import pytest

from useg.check import check_dataset
from useg.dataset import discover
from useg.io import read_image, write_mask
from useg.layouts import read_case_image
from useg.planner import pooled_intensities
from useg.preprocess import load_case
from useg.spec import DataSpec


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _case(rng, shape=(9, 10, 7)):
    img = rng.normal(size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:7, 2:5] = 1
    lab[3:4, 4:5, 3:4] = 2
    return img, lab


def test_nnunet_raw_layout_is_read_as_is(tmp_path, rng):
    root = tmp_path / "Dataset001"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    for k in range(3):
        img, lab = _case(rng)
        _save(root / "imagesTr" / f"c{k}_0000.nii.gz", img)
        _save(root / "imagesTr" / f"c{k}_0001.nii.gz", -img)
        _save(root / "labelsTr" / f"c{k}.nii.gz", lab)
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.num_channels == 2 and report.label_map.values == (0, 1, 2)
    assert report.info["layout"] == "nnunet"
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (2, 9, 10, 7) and labels.shape == (9, 10, 7)
    np.testing.assert_array_equal(image[1], -image[0])
    (root / "imagesTr" / "c2_0001.nii.gz").unlink()
    assert any("c2" in p and "channel" in p for p in check_dataset(root).problems)


def test_case_folders_need_and_use_channel_prefixes(tmp_path, rng):
    for name in ("p1", "p2"):
        img, lab = _case(rng)
        _save(tmp_path / name / "Flair_norm.nii.gz", img)
        _save(tmp_path / name / "T1c_norm.nii.gz", img * 2)
        _save(tmp_path / name / "seg.nii.gz", lab.astype(np.float32))
    report = check_dataset(tmp_path)
    assert not report.ok and "--channels" in report.problems[0]
    report = check_dataset(tmp_path, DataSpec(channel_names=("Flair", "T1c"), label_name="seg"))
    assert report.ok, report.problems
    assert [c.name for c in report.cases] == ["p1", "p2"] and report.num_channels == 2
    assert [r.spacing for r in report.records] == [(1.0, 1.0, 1.0)] * 2
    assert len(pooled_intensities(report.records)) == 2
    assert [c.name for c in discover(tmp_path, DataSpec(channel_names=["Flair", "T1c"]))] == ["p1", "p2"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_plain_layout_groups_channel_files(tmp_path, rng, suffix):
    import tifffile

    for k in range(2):
        img, lab = _case(rng)
        for c in range(2):
            p = tmp_path / "images" / f"case{k}_{c:04d}{suffix}"
            p.parent.mkdir(exist_ok=True)
            _save(p, img + c) if suffix == ".nii.gz" else tifffile.imwrite(p, img + c)
        m = tmp_path / "masks" / f"case{k}{suffix}"
        _save(m, lab) if suffix == ".nii.gz" else (m.parent.mkdir(exist_ok=True), tifffile.imwrite(m, lab))
    report = check_dataset(tmp_path)
    assert report.ok, report.problems
    assert [c.name for c in report.cases] == ["case0", "case1"] and report.num_channels == 2


def test_spacing_mismatch_between_image_and_mask_is_named(tmp_path, rng):
    img, lab = _case(rng)
    nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 3.0, 1.0])), str(tmp_path / "images" / "a.nii.gz")) if (
        tmp_path / "images").mkdir() is None else None
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "masks" / "a.nii.gz"))
    report = check_dataset(tmp_path)
    assert any("a.nii.gz has spacing 1x1x1 but its image has 1x1x3" in p for p in report.problems)


def test_held_out_cases_stay_out_of_the_fingerprint(tmp_path, rng):
    for k, offset in enumerate((0.0, 0.0, 1000.0)):  # the third case is much brighter
        img, lab = _case(rng)
        _save(tmp_path / "images" / f"c{k}.nii.gz", img + offset)
        _save(tmp_path / "masks" / f"c{k}.nii.gz", lab)
    report = check_dataset(tmp_path)
    assert report.ok, report.problems
    kept = report.without({"c2"})
    assert [c.name for c in kept.cases] == ["c0", "c1"] and [r.name for r in kept.records] == ["c0", "c1"]
    assert pooled_intensities(kept.records)[0].max() < 100 < pooled_intensities(report.records)[0].max()
    assert report.without(set()) is report


def test_cases_are_resampled_to_the_plans_spacing(tmp_path, rng):
    img, lab = _case(rng, shape=(9, 10, 7))
    nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 2.0, 1.0])), str(_mk(tmp_path / "images" / "a.nii.gz")))
    nib.save(nib.Nifti1Image(lab, np.diag([1.0, 1.0, 2.0, 1.0])), str(_mk(tmp_path / "masks" / "a.nii.gz")))
    report = check_dataset(tmp_path)
    assert report.ok, report.problems
    image, labels = load_case(report.cases[0], report.label_map, spacing=(1.0, 1.0, 1.0))
    assert image.shape == (1, 9, 10, 14) and labels.shape == (9, 10, 14)
    assert set(np.unique(labels)) <= {0, 1, 2}
    same, _ = load_case(report.cases[0], report.label_map, spacing=(1.0, 1.0, 2.0))
    np.testing.assert_array_equal(same[0], img)  # at its own spacing nothing is resampled


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- nnU-Net's 2D conventions and its other readers (NaturalImage2DIO, Tiff3DIO, SimpleITKIO) ---

def _dataset_json(root, channels, file_ending, labels=None, cases=3):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": labels or {"background": 0, "vessel": 1}, "numTraining": cases,
        "file_ending": file_ending}))


def _write_2d(path, arr):
    import tifffile
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 else "minisblack", compression="lzw")
    else:
        PILImage.fromarray(arr).save(path)


@pytest.mark.parametrize("ending", [".png", ".tif", ".bmp"])
@pytest.mark.parametrize("channels", [("R", "G", "B"), ("red", "green", "blue")])
@pytest.mark.parametrize("shape", [(20, 24), (17, 9)])
def test_nnunet_natural_images_hold_all_channels_in_one_file(tmp_path, rng, ending, channels, shape):
    root = tmp_path / "Dataset002_Fundus"
    _dataset_json(root, channels, ending)
    for k in range(3):
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        _write_2d(root / "imagesTr" / f"case{k}_0000{ending}", rgb)
        _write_2d(root / "labelsTr" / f"case{k}{ending}", (rgb[..., 0] > 128).astype(np.uint8))
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.num_channels == 3 and report.label_map.values == (0, 1) and len(report.cases) == 3
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (3, *shape) and labels.shape == shape


def test_nnunet_one_file_with_too_few_channels_is_named(tmp_path, rng):
    root = tmp_path / "Dataset003"
    _dataset_json(root, ("R", "G", "B"), ".png")
    for k in range(2):
        grey = rng.integers(0, 256, (12, 14), dtype=np.uint8)
        _write_2d(root / "imagesTr" / f"case{k}_0000.png", grey if k == 1 else np.stack([grey] * 3, -1))
        _write_2d(root / "labelsTr" / f"case{k}.png", (grey > 128).astype(np.uint8))
    problems = check_dataset(root).problems
    assert any("'case1'" in p and "holding 1 channel(s) but dataset.json names 3" in p for p in problems)
    assert not any("'case0'" in p for p in problems)


# nnU-Net's Tiff3DIO writes volumes without axes metadata; a stack of up to 4 planes then reads as
# channels (tifffile's own reading), so few-slice volumes carry axes="ZYX" as ImageJ and tifffile write it
@pytest.mark.parametrize("shape,md", [((6, 10, 9), None), ((5, 8, 11), None), ((3, 8, 11), {"axes": "ZYX"})])
def test_nnunet_tiff3d_spacing_comes_from_the_json_sidecar(tmp_path, rng, shape, md):
    import tifffile

    root = tmp_path / "Dataset004_EM"
    _dataset_json(root, ("EM",), ".tif", {"background": 0, "a": 1, "b": 2}, cases=2)
    for k in range(2):
        img, lab = _case(rng, shape)
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        # the sidecar wins over the TIFF's own resolution, as in nnU-Net
        tifffile.imwrite(root / "imagesTr" / f"c{k}_0000.tif", img, resolution=(3.0, 3.0), metadata=md,
                         photometric="minisblack", compression="zlib")
        (root / "imagesTr" / f"c{k}.json").write_text(json.dumps({"spacing": [2.5, 0.5, 0.25]}))
        tifffile.imwrite(root / "labelsTr" / f"c{k}.tif", lab, metadata=md, photometric="minisblack",
                         compression="zlib")
        (root / "labelsTr" / f"c{k}.json").write_text(json.dumps({"spacing": [2.5, 0.5, 0.25]}))
    report = check_dataset(root)
    assert report.ok, report.problems
    assert [r.spacing for r in report.records] == [(2.5, 0.5, 0.25)] * 2
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (1, *shape) and labels.shape == shape
    like = read_case_image(report.cases[0].files)
    out = write_mask(tmp_path / "pred.tif", np.zeros(shape, np.int64), like=like)
    assert read_image(out).spacing == pytest.approx((2.5, 0.5, 0.25))  # the prediction keeps it
    (root / "imagesTr" / "c1.json").write_text(json.dumps({"spacing": [1.0, 1.0]}))
    assert any("c1.json gives spacing [1.0, 1.0] for the 3D image" in p for p in check_dataset(root).problems)
    (root / "imagesTr" / "c1.json").write_text("{")
    assert any("cannot read the spacing of" in p and "c1.json" in p for p in check_dataset(root).problems)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_nnunet_itk_files_through_simpleitk(tmp_path, rng, ending):
    sitk = pytest.importorskip("SimpleITK")
    root = tmp_path / "Dataset005_GC"
    _dataset_json(root, ("CT", "PET"), ending, {"background": 0, "a": 1, "b": 2}, cases=2)
    for k in range(2):
        img, lab = _case(rng, (5, 7, 9))  # SimpleITK's (z, y, x)
        for c, arr in enumerate((img, img * 2)):
            (root / "imagesTr").mkdir(exist_ok=True)
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((0.7, 0.8, 3.0))
            sitk.WriteImage(im, str(root / "imagesTr" / f"c{k}_{c:04d}{ending}"))
        (root / "labelsTr").mkdir(exist_ok=True)
        im = sitk.GetImageFromArray(lab)
        im.SetSpacing((0.7, 0.8, 3.0))
        sitk.WriteImage(im, str(root / "labelsTr" / f"c{k}{ending}"))
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.num_channels == 2 and report.label_map.values == (0, 1, 2)
    assert report.records[0].spacing == pytest.approx((0.7, 0.8, 3.0))
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (2, 9, 7, 5) and labels.shape == (9, 7, 5)
    np.testing.assert_allclose(image[1], image[0] * 2, rtol=1e-5, atol=1e-5)
