"""Tests for useg.nnunet_raw: nnU-Net's raw layout read as it is, with its readers' conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from useg.check import check_dataset
from useg.preprocess import load_case


def test_nnunet_raw_layout_is_read_as_is(tmp_path, rng, save_nifti, volume_case):
    root = tmp_path / "Dataset001"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    for k in range(3):
        img, lab = volume_case(rng)
        save_nifti(root / "imagesTr" / f"c{k}_0000.nii.gz", img)
        save_nifti(root / "imagesTr" / f"c{k}_0001.nii.gz", -img)
        save_nifti(root / "labelsTr" / f"c{k}.nii.gz", lab)
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.num_channels == 2 and report.label_map.values == (0, 1, 2)
    assert report.info["layout"] == "nnunet"
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (2, 9, 10, 7) and labels.shape == (9, 10, 7)
    np.testing.assert_array_equal(image[1], -image[0])
    (root / "imagesTr" / "c2_0001.nii.gz").unlink()
    assert any("c2" in p and "channel" in p for p in check_dataset(root).problems)


# --- nnU-Net's 2D conventions and its other readers (NaturalImage2DIO, SimpleITKIO) ---

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
def test_nnunet_natural_images_hold_all_channels_in_one_file(tmp_path, rng, ending, channels, shape,
                                                             write_dataset_json):
    root = tmp_path / "Dataset002_Fundus"
    write_dataset_json(root, channels, ending)
    for k in range(3):
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        _write_2d(root / "imagesTr" / f"case{k}_0000{ending}", rgb)
        _write_2d(root / "labelsTr" / f"case{k}{ending}", (rgb[..., 0] > 128).astype(np.uint8))
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.num_channels == 3 and report.label_map.values == (0, 1) and len(report.cases) == 3
    image, labels = load_case(report.cases[0], report.label_map)
    assert image.shape == (3, *shape) and labels.shape == shape


def test_nnunet_one_file_with_too_few_channels_is_named(tmp_path, rng, write_dataset_json):
    root = tmp_path / "Dataset003"
    write_dataset_json(root, ("R", "G", "B"), ".png")
    for k in range(2):
        grey = rng.integers(0, 256, (12, 14), dtype=np.uint8)
        _write_2d(root / "imagesTr" / f"case{k}_0000.png", grey if k == 1 else np.stack([grey] * 3, -1))
        _write_2d(root / "labelsTr" / f"case{k}.png", (grey > 128).astype(np.uint8))
    problems = check_dataset(root).problems
    assert any("'case1'" in p and "holding 1 channel(s) but dataset.json names 3" in p for p in problems)
    assert not any("'case0'" in p for p in problems)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_nnunet_itk_files_through_simpleitk(tmp_path, rng, ending, volume_case, write_dataset_json):
    sitk = pytest.importorskip("SimpleITK")
    root = tmp_path / "Dataset005_GC"
    write_dataset_json(root, ("CT", "PET"), ending, {"background": 0, "a": 1, "b": 2}, cases=2)
    for k in range(2):
        img, lab = volume_case(rng, (5, 7, 9))  # SimpleITK's (z, y, x)
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
