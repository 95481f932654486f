"""NRRD and MetaImage through SimpleITK (useg[itk]): written by SimpleITK, read back with their geometry."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest

from useg.errors import UsegError
from useg.files import Image
from useg.io import read_image, read_mask, write_image, write_mask
from useg.writing import output_paths, write_probabilities

sitk = pytest.importorskip("SimpleITK")

SUFFIXES = [".nrrd", ".nhdr", ".mha", ".mhd"]
# a rotation about z by 30 degrees, then a tilt: ITK's direction matrix, row-major
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
IDENTITY = tuple(np.eye(3).ravel().tolist())
ROTATED = tuple((np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]])
                 @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])).ravel().tolist())


def _itk_file(path, arr_zyx, spacing, origin, direction, vector=False):
    img = sitk.GetImageFromArray(arr_zyx, isVector=vector)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
    return img


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_itk_volumes_keep_pixels_and_geometry(tmp_path, rng, suffix, dtype):
    arr = (rng.normal(0, 300, (5, 7, 9))).astype(dtype)  # SimpleITK's order (z, y, x): size (9, 7, 5)
    spacing, origin = (0.8, 0.9, 2.5), (10.0, -5.0, 3.0)
    ref = _itk_file(tmp_path / f"a{suffix}", arr, spacing, origin, ROTATED)
    img = read_image(tmp_path / f"a{suffix}")
    assert img.array.shape == (1, 9, 7, 5) and img.array.dtype == dtype  # (C, X, Y, Z) as NIfTI holds it
    assert img.format == {".nrrd": "nrrd", ".nhdr": "nrrd"}.get(suffix, "metaimage")
    np.testing.assert_array_equal(img.array[0], arr.T)
    assert img.spacing == pytest.approx(spacing)
    for ijk in [(0, 0, 0), (8, 6, 4), (3, 1, 2)]:  # the affine maps voxels where ITK does, in RAS
        lps = np.array(ref.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(img.affine @ [*ijk, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-9)


def test_itk_reads_like_the_nifti_itk_writes(tmp_path, rng):
    arr = rng.integers(0, 1000, (4, 6, 8)).astype(np.int16)
    ref = _itk_file(tmp_path / "a.mha", arr, (0.7, 0.6, 2.0), (1.0, 2.0, 3.0), ROTATED)
    sitk.WriteImage(ref, str(tmp_path / "a.nii.gz"))
    mha, nii = read_image(tmp_path / "a.mha"), read_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(mha.array, nii.array)
    np.testing.assert_allclose(mha.affine, nii.affine, atol=1e-5)
    assert mha.spacing == pytest.approx(nii.spacing)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("shape", [(5, 7, 9), (7, 9)])  # 3D and 2D, odd sizes
def test_masks_are_written_back_with_the_inputs_geometry(tmp_path, rng, suffix, shape):
    d = len(shape)
    spacing, origin = (0.8, 0.9, 2.5)[:d], (10.0, -5.0, 3.0)[:d]
    direction = ROTATED if d == 3 else (0.0, -1.0, 1.0, 0.0)
    arr = rng.normal(size=shape).astype(np.float32)
    _itk_file(tmp_path / f"img{suffix}", arr, spacing, origin, direction)
    image = read_image(tmp_path / f"img{suffix}")
    assert image.spatial_shape == shape[::-1]
    labels = (rng.random(image.spatial_shape) > 0.6).astype(np.int64) * 2
    out = write_mask(tmp_path / "out" / f"m{suffix}", labels, like=image)
    back = sitk.ReadImage(str(out))
    assert back.GetSpacing() == pytest.approx(spacing) and back.GetOrigin() == pytest.approx(origin)
    assert back.GetDirection() == pytest.approx(direction)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels.T)
    raw, mode, _ = read_mask(out)
    assert mode == "grey"
    np.testing.assert_array_equal(raw, labels)
    hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert hidden == []  # no temporary left behind


def test_a_nifti_image_gives_its_geometry_to_an_nrrd_mask(tmp_path, rng):
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    arr = rng.normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "a.nii.gz"))
    image = read_image(tmp_path / "a.nii.gz")
    labels = np.zeros((6, 5, 4), np.int64)
    labels[1:3] = 1
    out = write_mask(tmp_path / "a.nrrd", labels, like=image)
    again = read_image(out)
    np.testing.assert_allclose(again.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(again.array[0], labels)
    tiff_like = Image(np.zeros((1, 3, 4, 5)), spacing=(2.0, 0.5, 0.25))  # (z, y, x) raster order
    back = sitk.ReadImage(str(write_mask(tmp_path / "t.mha", np.ones((3, 4, 5), int), like=tiff_like)))
    assert back.GetSize() == (5, 4, 3) and back.GetSpacing() == pytest.approx((0.25, 0.5, 2.0))


def test_vector_pixels_are_channels_and_images_write_back(tmp_path, rng):
    rgb = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)  # (y, x, components)
    _itk_file(tmp_path / "rgb.mha", rgb, (0.5, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), vector=True)
    img = read_image(tmp_path / "rgb.mha")
    assert img.array.shape == (3, 9, 7)
    np.testing.assert_array_equal(img.array, np.transpose(rgb, (2, 1, 0)))
    with pytest.raises(UsegError, match=r"rgb\.mha has 3 components per voxel"):
        read_mask(tmp_path / "rgb.mha")
    write_image(tmp_path / "copy.nrrd", img)
    again = read_image(tmp_path / "copy.nrrd")
    np.testing.assert_array_equal(again.array, img.array)
    np.testing.assert_allclose(again.affine, img.affine)


def test_float_labels_must_be_whole(tmp_path):
    lab = np.zeros((3, 4, 5), np.float32)
    lab[1] = 2.0
    _itk_file(tmp_path / "ok.mha", lab, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    raw, mode, _ = read_mask(tmp_path / "ok.mha")
    assert mode == "grey" and set(np.unique(raw).tolist()) == {0, 2}
    lab[0, 0, 0] = 0.5
    _itk_file(tmp_path / "bad.mha", lab, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    with pytest.raises(UsegError, match=r"bad\.mha holds non-integer mask values"):
        read_mask(tmp_path / "bad.mha")


def test_damaged_and_missing_itk_files_are_named(tmp_path, rng):
    _itk_file(tmp_path / "g.nrrd", rng.normal(size=(8, 8, 8)).astype(np.float32), (1.0,) * 3, (0.0,) * 3,
              IDENTITY)
    (tmp_path / "t.nrrd").write_bytes((tmp_path / "g.nrrd").read_bytes()[:200])
    with pytest.raises(UsegError, match=r"cannot read .*t\.nrrd: .*valid NRRD file"):
        read_image(tmp_path / "t.nrrd")
    (tmp_path / "x.mha").write_bytes(b"not a header at all")
    with pytest.raises(UsegError, match=r"cannot read .*x\.mha"):
        read_mask(tmp_path / "x.mha")
    _itk_file(tmp_path / "d.mhd", np.zeros((3, 4, 5), np.uint8), (1.0,) * 3, (0.0,) * 3, IDENTITY)
    for p in tmp_path.glob("d.*raw"):
        p.unlink()  # the header without its data file
    with pytest.raises(UsegError, match=r"cannot read .*d\.mhd"):
        read_image(tmp_path / "d.mhd")
    with pytest.raises(UsegError, match=r"missing\.nrrd does not exist"):
        read_image(tmp_path / "missing.nrrd")


def test_missing_simpleitk_says_what_to_install(tmp_path, monkeypatch):
    header = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 2 2\nencoding: raw\n\n"
    (tmp_path / "a.nrrd").write_bytes(header + b"\0\0\0\0")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    with pytest.raises(UsegError, match=r"^reading .*a\.nrrd needs SimpleITK; pip install 'useg\[itk\]'$"):
        read_image(tmp_path / "a.nrrd")
    with pytest.raises(UsegError, match=r"a\.nrrd needs SimpleITK"):
        read_mask(tmp_path / "a.nrrd")
    with pytest.raises(UsegError, match=r"^writing .*m\.mha needs SimpleITK"):
        write_mask(tmp_path / "m.mha", np.zeros((2, 2), int), like=Image(np.zeros((1, 2, 2))))


def test_predictions_of_itk_inputs_keep_format_and_affine(tmp_path, rng):
    from useg.dataset import Case

    cases = [Case(n, tmp_path / f"{n}{s}") for n, s in zip("abcd", SUFFIXES)]
    assert [p.name for p in output_paths(cases, tmp_path / "o", False, False)] == [
        "a.nrrd", "b.nrrd", "c.mha", "d.mha"]
    assert {p.name for p in output_paths(cases, tmp_path / "o", False, True)} == {
        f"{n}_probs.nii.gz" for n in "abcd"}
    _itk_file(tmp_path / "v.mha", rng.normal(size=(4, 5, 6)).astype(np.float32), (0.7, 0.8, 2.0),
              (5.0, 6.0, 7.0), ROTATED)
    image = read_image(tmp_path / "v.mha")
    probs = rng.random((2, 6, 5, 4)).astype(np.float32)
    out = write_probabilities(tmp_path / "o" / "v_probs.nii.gz", probs, image)
    np.testing.assert_allclose(nib.load(str(out)).affine, image.affine, atol=1e-5)


def test_header_spacing_checks_masks_and_scales_surface_distances(tmp_path):
    from useg.check import check_dataset
    from useg.evaluate import evaluate_folders
    from useg.io import file_spacing

    for d in ("images", "masks", "pred"):
        (tmp_path / d).mkdir()
    mask = np.zeros((6, 8, 10), np.uint8)
    mask[2:4, 2:6, 3:8] = 1
    for k in range(2):
        _itk_file(tmp_path / "images" / f"c{k}.nrrd", mask.astype(np.float32) * 100, (1.0, 1.0, 2.0),
                  (0.0, 0.0, 0.0), IDENTITY)
        _itk_file(tmp_path / "masks" / f"c{k}.nrrd", mask, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    assert file_spacing(tmp_path / "masks" / "c0.nrrd") == (1.0, 1.0, 2.0)
    assert file_spacing(tmp_path / "images" / "missing.nrrd") is None
    assert check_dataset(tmp_path).ok
    _itk_file(tmp_path / "masks" / "c1.nrrd", mask, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY)
    problems = check_dataset(tmp_path).problems
    assert any("c1.nrrd has spacing 1x1x3 but its image has 1x1x2" in p for p in problems)

    # a prediction one slice off along z (ITK's third axis, 2 mm): HD95 is 2 mm, not 1 pixel
    shifted = np.roll(mask, 1, axis=0)
    _itk_file(tmp_path / "masks" / "c1.nrrd", mask, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    for k in range(2):
        _itk_file(tmp_path / "pred" / f"c{k}.nrrd", shifted, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    summary, _ = evaluate_folders(tmp_path / "pred", tmp_path / "masks", regions="fg=1")
    assert summary["regions"]["fg"]["hd95"] == pytest.approx(2.0)
