"""Every bad input a user can cause: one sentence naming the file, exit status 2, nothing half-written.

RELIABILITY.md lists the same cases with what the user sees.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from useg.cli import main

TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2",
        "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _truncated_png(d):
    p = d / "images" / "cell_002.png"
    p.write_bytes(p.read_bytes()[:100])
    return "cell_002.png"


def _truncated_tiff(d):
    (d / "images" / "cell_002.png").unlink()
    tifffile.imwrite(d / "images" / "cell_002.tif", np.zeros((64, 64), np.uint8))
    p = d / "images" / "cell_002.tif"
    p.write_bytes(p.read_bytes()[:50])
    return "cell_002.tif"


def _size_mismatch(d):
    _png(d / "masks" / "cell_001.png", np.zeros((64, 60), np.uint8))
    return "cell_001.png"


def _unknown_values(d):
    m = np.array(PILImage.open(d / "masks" / "cell_003.png"))
    m[:2, :2] = 7
    _png(d / "masks" / "cell_003.png", m)
    return "cell_003.png"


def _nan_image(d):
    (d / "images" / "cell_004.png").unlink()
    arr = np.zeros((64, 64), np.float32)
    arr[5, 5] = np.nan
    tifffile.imwrite(d / "images" / "cell_004.tif", arr)
    return "cell_004.tif"


def _duplicate_stem(d):
    shutil.copy(d / "images" / "cell_000.png", d / "images" / "cell_000.tif")
    return "cell_000"


def _missing_mask(d):
    (d / "masks" / "cell_005.png").unlink()
    return "cell_005.png"


def _jpeg_mask(d):
    (d / "masks" / "cell_005.png").rename(d / "masks" / "cell_005.jpg")
    return "cell_005.jpg"


def _empty(d):
    shutil.rmtree(d / "images")
    shutil.rmtree(d / "masks")
    (d / "images").mkdir()
    return "images"


def _mixed_channels(d):
    _png(d / "images" / "cell_001.png", np.zeros((64, 64, 3), np.uint8))
    return "cell_001.png"


def _nifti_volumes(d, image_zooms=(1.0, 1.0, 1.0)):
    """Replace the PNG cells by small NIfTI volumes (one NIfTI mask per image)."""
    import nibabel as nib

    shutil.rmtree(d / "images")
    shutil.rmtree(d / "masks")
    rng = np.random.default_rng(0)
    for k in range(3):
        lab = np.zeros((16, 16, 8), np.uint8)
        lab[4:12, 4:12, 2:6] = 1
        image = (lab + rng.normal(0, 0.2, lab.shape)).astype(np.float32)
        for folder, arr, zooms in (("images", image, image_zooms), ("masks", lab, (1.0, 1.0, 1.0))):
            (d / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.diag([*zooms, 1.0])), str(d / folder / f"v{k}.nii.gz"))


def _truncated_nifti(d):
    _nifti_volumes(d)
    p = d / "images" / "v1.nii.gz"
    p.write_bytes(p.read_bytes()[:300])
    return "v1.nii.gz"


def _spacing_mismatch(d):
    _nifti_volumes(d, image_zooms=(1.0, 1.0, 3.0))
    return "v0.nii.gz has spacing 1x1x1 but its image has 1x1x3"


def _fractional_labels(d):
    import nibabel as nib

    _nifti_volumes(d)
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 0.5, np.float32), np.eye(4)),
             str(d / "masks" / "v2.nii.gz"))
    return "v2.nii.gz holds non-integral label values"


CASES = {f.__name__[1:]: f for f in (_truncated_png, _truncated_tiff, _size_mismatch, _unknown_values,
                                       _nan_image, _duplicate_stem, _missing_mask, _jpeg_mask, _empty,
                                       _mixed_channels, _truncated_nifti, _spacing_mismatch,
                                       _fractional_labels)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_refuses_bad_data(name, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    culprit = CASES[name](data)
    assert main(["check", str(data)]) == 2
    assert culprit in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.startswith("useg train: error:")
    assert not run.exists() or not any(run.iterdir())  # nothing written


@pytest.fixture(scope="module")
def trained(cells_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY]) == 0
    return run


def test_predict_refuses_wrong_channels_and_nan(trained, tmp_path, capsys):
    _png(tmp_path / "in" / "rgb.png", np.zeros((40, 40, 3), np.uint8))
    assert main(["predict", str(trained), str(tmp_path / "in" / "rgb.png"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "rgb.png has 3 channels but the model was trained on 1" in capsys.readouterr().err
    arr = np.ones((40, 40), np.float32)
    arr[0, 0] = np.inf
    tifffile.imwrite(tmp_path / "in" / "inf.tif", arr)
    assert main(["predict", str(trained), str(tmp_path / "in" / "inf.tif"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "inf.tif contains NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_outputs_need_overwrite(trained, cells_dir, tmp_path, capsys):
    assert main(["train", str(cells_dir), "--out", str(trained), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    out = tmp_path / "o"
    img = str(cells_dir / "images" / "cell_000.png")
    assert main(["predict", str(trained), img, "--out", str(out), "--quiet"]) == 0
    before = (out / "cell_000.png").read_bytes()
    assert main(["predict", str(trained), img, "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "cell_000.png").read_bytes() == before


def test_decompression_bomb_is_refused(tmp_path, monkeypatch, capsys):
    from useg.errors import UsegError
    from useg.io import read_image

    _png(tmp_path / "big.png", np.zeros((300, 300), np.uint8))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UsegError, match="big.png"):
        read_image(tmp_path / "big.png")


def test_damaged_weights_are_refused(trained, cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "model.safetensors").write_bytes(b"\x00" * 16)
    img = str(cells_dir / "images" / "cell_000.png")
    assert main(["predict", str(run), img, "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (run / "plan.json").write_text("{")
    assert main(["predict", str(run), img, "--out", str(tmp_path / "o")]) == 2
    assert "plan.json is not valid JSON" in capsys.readouterr().err


def test_disk_full_while_writing_leaves_nothing(trained, cells_dir, tmp_path, monkeypatch, capsys):
    import errno

    def full(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(PILImage.Image, "save", full)
    out = tmp_path / "o"
    assert main(["predict", str(trained), str(cells_dir / "images"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / 'cell_000.png'} (No space left on device)" in err and "another --out" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_permission_errors_say_access_not_space(trained, cells_dir, tmp_path, monkeypatch, capsys):
    import errno

    def denied(self, fp, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(fp))

    monkeypatch.setattr(PILImage.Image, "save", denied)
    out = tmp_path / "o"
    assert main(["predict", str(trained), str(cells_dir / "images" / "cell_000.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot access {out / 'cell_000.png'} (Permission denied); check its permissions" in err
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------- pairing by name (issue 12)


def _ambiguous_masks(d):
    shutil.copy(d / "masks" / "cell_003.png", d / "masks" / "cell_003_seg.png")
    shutil.copy(d / "masks" / "cell_003.png", d / "masks" / "cell_003_mask.png")
    (d / "masks" / "cell_003.png").unlink()
    return "cell_003_mask.png and cell_003_seg.png are both masks of 'cell_003'"


def _repeated_numbers(d):
    for i in range(6):
        (d / "masks" / f"cell_{i:03d}.png").rename(d / "masks" / f"{i}_truth.png")
    shutil.copy(d / "images" / "cell_002.png", d / "images" / "scan_002.png")
    return "cell_002.png and scan_002.png pair with the same mask(s) 2_truth.png"


def _unpaired_names(d):
    for i in range(6):
        (d / "masks" / f"cell_{i:03d}.png").rename(d / "masks" / f"{i}_truth.png")
    (d / "masks" / "5_truth.png").rename(d / "masks" / "gt_five.png")
    return "gt_five.png has no image"


PAIRING = {f.__name__[1:]: f for f in (_ambiguous_masks, _repeated_numbers, _unpaired_names)}


@pytest.mark.parametrize("name", sorted(PAIRING))
def test_train_refuses_names_that_do_not_pair(name, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    culprit = PAIRING[name](data)
    assert main(["check", str(data)]) == 2
    assert culprit in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.startswith("useg train: error:")
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("flag, pattern, culprit", [
    ("--mask-pattern", "{stem}_seg", "--mask-pattern '{stem}_seg' matches none of the 6 files in"),
    ("--image-pattern", "img_{stem}", "--image-pattern 'img_{stem}' matches none of the 6 files in"),
    ("--mask-pattern", "seg", "--mask-pattern: the name pattern 'seg' must hold {stem} exactly once"),
])
def test_a_name_pattern_that_matches_nothing_is_refused(flag, pattern, culprit, cells_dir, tmp_path, capsys):
    assert main(["check", str(cells_dir), flag, pattern]) == 2
    err = capsys.readouterr().err
    assert culprit in err
    assert "(such as cell_000.png)" in err or "exactly once" in culprit
    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), flag, pattern, *TINY]) == 2
    assert culprit in capsys.readouterr().err
    assert not run.exists()
