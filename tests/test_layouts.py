"""Multi-channel cases, nnU-Net's raw layout and case folders."""

import json

import nibabel as nib
import numpy as np
import pytest

from useg.dataset import check_dataset, discover
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
