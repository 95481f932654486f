"""Tests for useg.layouts: multi-channel cases, case folders, the Tiff3DIO spacing sidecar."""

import json

import nibabel as nib
import numpy as np
import pytest

from useg.check import check_dataset
from useg.dataset import discover
from useg.fingerprint import pooled_intensities
from useg.io import read_image, write_mask
from useg.layouts import read_case_image
from useg.preprocess import load_case
from useg.spec import DataSpec


def test_case_folders_need_and_use_channel_prefixes(tmp_path, rng, save_nifti, volume_case):
    for name in ("p1", "p2"):
        img, lab = volume_case(rng)
        save_nifti(tmp_path / name / "Flair_norm.nii.gz", img)
        save_nifti(tmp_path / name / "T1c_norm.nii.gz", img * 2)
        save_nifti(tmp_path / name / "seg.nii.gz", lab.astype(np.float32))
    report = check_dataset(tmp_path)
    assert not report.ok and "--channels" in report.problems[0]
    report = check_dataset(tmp_path, DataSpec(channel_names=("Flair", "T1c"), label_name="seg"))
    assert report.ok, report.problems
    assert [c.name for c in report.cases] == ["p1", "p2"] and report.num_channels == 2
    assert [r.spacing for r in report.records] == [(1.0, 1.0, 1.0)] * 2
    assert len(pooled_intensities(report.records)) == 2
    assert [c.name for c in discover(tmp_path, DataSpec(channel_names=["Flair", "T1c"]))] == ["p1", "p2"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_plain_layout_groups_channel_files(tmp_path, rng, suffix, save_nifti, volume_case):
    import tifffile

    for k in range(2):
        img, lab = volume_case(rng)
        for c in range(2):
            p = tmp_path / "images" / f"case{k}_{c:04d}{suffix}"
            p.parent.mkdir(exist_ok=True)
            save_nifti(p, img + c) if suffix == ".nii.gz" else tifffile.imwrite(p, img + c)
        m = tmp_path / "masks" / f"case{k}{suffix}"
        if suffix == ".nii.gz":
            save_nifti(m, lab)
        else:
            m.parent.mkdir(exist_ok=True)
            tifffile.imwrite(m, lab)
    report = check_dataset(tmp_path)
    assert report.ok, report.problems
    assert [c.name for c in report.cases] == ["case0", "case1"] and report.num_channels == 2


def test_spacing_mismatch_between_image_and_mask_is_named(tmp_path, rng, volume_case):
    img, lab = volume_case(rng)
    nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 3.0, 1.0])), str(tmp_path / "images" / "a.nii.gz")) if (
        tmp_path / "images").mkdir() is None else None
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "masks" / "a.nii.gz"))
    report = check_dataset(tmp_path)
    assert any("a.nii.gz has spacing 1x1x1 but its image has 1x1x3" in p for p in report.problems)


def test_held_out_cases_stay_out_of_the_fingerprint(tmp_path, rng, save_nifti, volume_case):
    for k, offset in enumerate((0.0, 0.0, 1000.0)):  # the third case is much brighter
        img, lab = volume_case(rng)
        save_nifti(tmp_path / "images" / f"c{k}.nii.gz", img + offset)
        save_nifti(tmp_path / "masks" / f"c{k}.nii.gz", lab)
    report = check_dataset(tmp_path)
    assert report.ok, report.problems
    kept = report.without({"c2"})
    assert [c.name for c in kept.cases] == ["c0", "c1"] and [r.name for r in kept.records] == ["c0", "c1"]
    assert pooled_intensities(kept.records)[0].max() < 100 < pooled_intensities(report.records)[0].max()
    assert report.without(set()) is report


def test_cases_are_resampled_to_the_plans_spacing(tmp_path, rng, volume_case):
    img, lab = volume_case(rng, shape=(9, 10, 7))
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


# nnU-Net's Tiff3DIO writes volumes without axes metadata; a stack of up to 4 planes then reads as
# channels (tifffile's own reading), so few-slice volumes carry axes="ZYX" as ImageJ and tifffile write it
@pytest.mark.parametrize("shape,md", [((6, 10, 9), None), ((5, 8, 11), None), ((3, 8, 11), {"axes": "ZYX"})])
def test_nnunet_tiff3d_spacing_comes_from_the_json_sidecar(tmp_path, rng, shape, md, volume_case,
                                                           write_dataset_json):
    import tifffile

    root = tmp_path / "Dataset004_EM"
    write_dataset_json(root, ("EM",), ".tif", {"background": 0, "a": 1, "b": 2}, cases=2)
    for k in range(2):
        img, lab = volume_case(rng, shape)
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
