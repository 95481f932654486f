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


def _check_and_train_refuse(data, culprit, tmp_path, capsys, *flags):
    """``useg check`` and ``useg train`` both exit 2 naming ``culprit``, and train writes nothing."""
    assert main(["check", str(data), *flags]) == 2
    assert culprit in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *flags, *TINY]) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.startswith("useg train: error:")
    assert not run.exists() or not any(run.iterdir())  # nothing written


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_refuses_bad_data(name, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _check_and_train_refuse(data, CASES[name](data), tmp_path, capsys)


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


# --- regions of interest (--roi) -------------------------------------------------------------


def _rois(d, shape=(64, 64)):
    for p in sorted((d / "images").iterdir()):
        _png(d / "roi" / p.name, np.full(shape, 255, np.uint8))
    return d / "roi"


def _roi_missing(d):
    (_rois(d) / "cell_001.png").unlink()
    return "cell_001.png has no ROI mask cell_001.png in"


def _roi_wrong_size(d):
    _png(_rois(d) / "cell_002.png", np.full((32, 64), 255, np.uint8))
    return "cell_002.png is 32x64 but"


def _roi_empty(d):
    _png(_rois(d) / "cell_003.png", np.zeros((64, 64), np.uint8))
    return "cell_003.png marks no pixel as inside"


def _roi_not_a_folder(d):
    return "roi is not a folder; give --roi the folder"


ROI_CASES = {f.__name__[5:]: f for f in (_roi_missing, _roi_wrong_size, _roi_empty, _roi_not_a_folder)}


@pytest.mark.parametrize("name", sorted(ROI_CASES))
def test_train_refuses_bad_rois(name, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    culprit = ROI_CASES[name](data)
    _check_and_train_refuse(data, culprit, tmp_path, capsys, "--roi", str(data / "roi"))


def test_predict_and_evaluate_refuse_a_missing_roi(trained, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    roi = _rois(data)
    (roi / "cell_004.png").unlink()
    out = tmp_path / "o"
    assert main(["predict", str(trained), str(data / "images"), "--out", str(out), "--roi", str(roi),
                 "--quiet"]) == 2
    assert "cell_004.png has no ROI mask cell_004.png in" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # refused before anything is predicted
    assert main(["evaluate", str(data / "masks"), str(data), "--roi", str(roi), "--out", str(out)]) == 2
    assert "cell_004.png has no ROI mask" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# --- useg evaluate --probabilities ------------------------------------------------------------


def _probability_case(root, channels=2, dtype=np.uint8, value=None):
    """truth/c0.png (0/255) and pred/c0_probs.tif with ``channels`` channels, written by tifffile."""
    m = np.zeros((12, 10), np.uint8)
    m[3:8, 2:7] = 255
    _png(root / "truth" / "c0.png", m)
    probs = np.full((channels, 12, 10), 1 / channels if value is None else value)
    stored = np.round(probs * 255).astype(np.uint8) if dtype == np.uint8 else probs.astype(dtype)
    (root / "pred").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "pred" / "c0_probs.tif", stored, photometric="minisblack",
                     planarconfig="separate", metadata={"axes": "SYX"})
    return root / "pred", root / "truth"


def _probs_without_truth(root):
    pred, truth = _probability_case(root)
    (truth / "c0.png").rename(truth / "other.png")
    return [str(pred), str(truth), "--probabilities"], "no true mask in", "c0_probs.tif"


def _truth_without_probabilities(root):
    pred, truth = _probability_case(root)
    (pred / "c0_probs.tif").unlink()
    _png(pred / "c0.png", np.zeros((12, 10), np.uint8))  # masks only
    return [str(pred), str(truth), "--probabilities"], "holds no probability maps", str(pred)


def _wrong_channels(root):
    pred, truth = _probability_case(root, channels=3)
    return [str(pred), str(truth), "--probabilities"], "holds 3 probability channel(s) but", "c0_probs.tif"


def _outside_unit_interval(root):
    pred, truth = _probability_case(root, dtype=np.float32, value=1.5)
    return [str(pred), str(truth), "--probabilities"], "outside [0, 1]", "c0_probs.tif"


def _probs_without_flag(root):
    pred, truth = _probability_case(root)
    return [str(pred), str(truth)], "pass --probabilities", "c0_probs.tif"


def _probs_with_regions(root):
    pred, truth = _probability_case(root)
    args = [str(pred), str(truth), "--probabilities", "--regions", "fg=255"]
    return args, "region probabilities", "--regions"


PROBABILITY_CASES = {f.__name__.strip("_"): f for f in (_probs_without_truth, _truth_without_probabilities,
                                                         _wrong_channels, _outside_unit_interval,
                                                         _probs_without_flag, _probs_with_regions)}


@pytest.mark.parametrize("name", sorted(PROBABILITY_CASES))
def test_evaluate_probabilities_refuses_bad_inputs(name, tmp_path, capsys):
    args, says, culprit = PROBABILITY_CASES[name](tmp_path)
    assert main(["evaluate", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("useg evaluate: error:") and says in err and culprit in err
    assert not list((tmp_path / "pred").glob("metrics.*"))  # nothing written


# --- issue 12, formats: a missing codec or package, lossy masks, a damaged GIF ---

def _png_as(d, folder, stem, suffix, write):
    """Replace ``folder/stem.png`` by the same pixels written by ``write(path, array)`` as ``stem+suffix``."""
    src = d / folder / f"{stem}.png"
    arr = np.array(PILImage.open(src))
    src.unlink()
    write(d / folder / f"{stem}{suffix}", arr)
    return f"{stem}{suffix}"


def _lzw_without_imagecodecs(d, monkeypatch):
    import tifffile.tifffile as tt
    from tifffile import _imagecodecs

    name = _png_as(d, "images", "cell_002", ".tif", lambda p, a: tifffile.imwrite(p, a, compression="lzw"))
    monkeypatch.setattr(tt, "imagecodecs", _imagecodecs)  # what tifffile falls back to without imagecodecs
    monkeypatch.setattr(tt.TIFF.DECOMPRESSORS, "_codecs", {1: tt.identityfunc})
    return f"{name}: its LZW compression needs the imagecodecs package; pip install imagecodecs"


def _webp_mask(d, monkeypatch):
    name = _png_as(d, "masks", "cell_001", ".webp",
                   lambda p, a: PILImage.fromarray(a).save(p, lossless=True))
    return f"{name} is a WebP mask; lossy WebP compression changes label values"


def _jpeg_tiff_mask(d, monkeypatch):
    name = _png_as(d, "masks", "cell_001", ".tif", lambda p, a: tifffile.imwrite(p, a, compression="jpeg"))
    return f"{name} is a JPEG-compressed TIFF mask; lossy JPEG compression changes label values"


def _damaged_gif_mask(d, monkeypatch):
    name = _png_as(d, "masks", "cell_003", ".gif", lambda p, a: PILImage.fromarray(a).save(p))
    p = d / "masks" / name
    p.write_bytes(p.read_bytes()[:40])
    return f"cannot read {p}"


def _nrrd_without_simpleitk(d, monkeypatch):
    import sys

    def nrrd(path, arr):  # NRRD as its specification writes it: a text header, then the raw values
        head = f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {arr.shape[1]} {arr.shape[0]}\nencoding: raw\n\n"
        path.write_bytes(head.encode() + np.ascontiguousarray(arr, np.uint8).tobytes())

    name = _png_as(d, "images", "cell_004", ".nrrd", nrrd)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    return f"reading {d / 'images' / name} needs SimpleITK; pip install 'useg[itk]'"


FORMAT_CASES = {f.__name__[1:]: f for f in (_lzw_without_imagecodecs, _webp_mask, _jpeg_tiff_mask,
                                              _damaged_gif_mask, _nrrd_without_simpleitk)}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_format_failures_are_one_sentence(name, cells_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _check_and_train_refuse(data, FORMAT_CASES[name](data, monkeypatch), tmp_path, capsys)


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
    _check_and_train_refuse(data, PAIRING[name](data), tmp_path, capsys)


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


# --- prediction outputs (issue 14): never an input, claimed when written, names within limits ------


def _predict(trained, *args):
    return main(["predict", str(trained), *map(str, args), "--quiet"])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_never_writes_over_its_inputs(overwrite, trained, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    images = data / "images"
    before = _snapshot(images)
    flags = ["--overwrite"] if overwrite else []
    assert _predict(trained, images, "--out", images, *flags) == 2  # the input folder itself
    assert f"--out {images} is the folder of the input" in capsys.readouterr().err
    one = images / "cell_000.png"
    assert _predict(trained, one, "--out", images, *flags) == 2  # one input, written beside itself
    assert "is the folder of the input" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(images)  # the same folder reached another way
    assert _predict(trained, one, "--out", tmp_path / "link", *flags) == 2
    assert "is the folder of the input" in capsys.readouterr().err
    assert _snapshot(images) == before


def test_an_output_that_links_to_an_input_is_refused(trained, cells_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    one = cells_dir / "images" / "cell_000.png"
    (out / "cell_000.png").symlink_to(one)  # writing the output would replace the input's bytes
    before = one.read_bytes()
    assert _predict(trained, one, "--out", out, "--overwrite") == 2
    assert f"{out / 'cell_000.png'} would replace the input {one} with its mask" in capsys.readouterr().err
    assert one.read_bytes() == before


def test_out_that_is_a_file_or_an_output_that_is_a_folder(trained, cells_dir, tmp_path, capsys, monkeypatch):
    from useg import predict

    called = []
    monkeypatch.setattr(predict.Segmenter, "predict_image", lambda *a: called.append(1))
    one = cells_dir / "images" / "cell_000.png"
    (tmp_path / "file").write_text("keep")
    assert _predict(trained, one, "--out", tmp_path / "file") == 2
    assert f"--out {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"
    (tmp_path / "o" / "cell_000.png").mkdir(parents=True)
    assert _predict(trained, one, "--out", tmp_path / "o", "--overwrite") == 2
    assert f"{tmp_path / 'o' / 'cell_000.png'} is a folder" in capsys.readouterr().err
    assert called == []  # refused before anything was computed


def test_a_name_near_the_file_name_limit_is_predicted(trained, cells_dir, tmp_path, capsys):
    long = "c" * 240 + ".png"
    (tmp_path / "in").mkdir()
    shutil.copy(cells_dir / "images" / "cell_000.png", tmp_path / "in" / long)
    assert _predict(trained, tmp_path / "in" / long, "--out", tmp_path / "o") == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == [long]
    top = "d" * 251 + ".png"  # a valid input name whose probability map name would be too long
    shutil.copy(cells_dir / "images" / "cell_000.png", tmp_path / "in" / top)
    assert _predict(trained, tmp_path / "in" / top, "--out", tmp_path / "p", "--probabilities", "uint8") == 2
    assert "over the file-name limit of 255; rename the input shorter" in capsys.readouterr().err


@pytest.mark.parametrize("flags, culprit", [
    (["--watershed"], "--watershed splits instance masks and needs --instances"),
    (["--instances", "--probabilities", "uint8"], "--instances writes object ids and --probabilities"),
])
def test_predict_options_without_effect_are_refused(flags, culprit, trained, cells_dir, tmp_path, capsys):
    assert _predict(trained, cells_dir / "images" / "cell_000.png", "--out", tmp_path / "o", *flags) == 2
    assert culprit in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_two_predicts_into_one_folder_do_not_mix(trained, cells_dir, tmp_path):
    """Both pass the up-front check, then race: one refuses, every output comes whole from one model."""
    import threading

    from useg.errors import UsegError
    from useg.predict import Segmenter
    from useg.writing import predict_files

    start = threading.Barrier(2, timeout=60)

    class Constant:  # a "model" that labels every pixel k, so each mask tells which run wrote it
        def __init__(self, k):
            self.plan, self.k, self.first = Segmenter.load(trained).plan, k, True

        def predict_image(self, image):
            if self.first:  # both have checked the empty folder before either writes
                self.first = False
                start.wait()
            return np.full(image.spatial_shape, self.k, np.int64)

    out, results = tmp_path / "o", {}

    def run(k):
        try:
            results[k] = predict_files(Constant(k), sorted((cells_dir / "images").iterdir()), out)
        except UsegError as e:
            results[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [k for k, r in results.items() if isinstance(r, UsegError)]
    assert len(refused) == 1 and "already exists (written by another process" in str(results[refused[0]])
    winner = 1 - refused[0]
    assert len(results[winner]) == 6
    values = {tuple(np.unique(np.array(PILImage.open(p))).tolist()) for p in out.iterdir()}
    assert values == {(255,) if winner else (0,)}  # whole, and all from the run that won
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (cells_dir / "images").iterdir())


@pytest.mark.timeout(240)
def test_two_predict_processes_into_one_folder(trained, cells_dir, tmp_path):
    """Two real processes, one writing class masks and one instance masks (other bytes, same names)."""
    import os
    import subprocess
    import sys

    images = cells_dir / "images"
    runs = {"classes": [], "instances": ["--instances"]}
    for kind, flags in runs.items():  # what each would write alone
        assert _predict(trained, images, "--out", tmp_path / kind, *flags) == 0
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {kind: subprocess.Popen([sys.executable, "-m", "useg", "predict", str(trained), str(images),
                                     "--out", str(out), "--quiet", *flags], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for kind, flags in runs.items()}
    done = {kind: (p.wait(200), p.stderr.read()) for kind, p in procs.items()}
    assert sorted(rc for rc, _ in done.values()) == [0, 2], done
    winner = next(kind for kind, (rc, _) in done.items() if rc == 0)
    loser_err = next(err for rc, err in done.values() if rc == 2)
    assert "already exists" in loser_err and "Traceback" not in loser_err
    assert _snapshot(out) == _snapshot(tmp_path / winner)  # every output whole, all from the one that won


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_predict_never_writes_over_the_roi_masks(overwrite, trained, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    roi = _rois(data)
    before = _snapshot(roi)
    assert _predict(trained, data / "images", "--out", roi, "--roi", roi, *overwrite) == 2
    err = capsys.readouterr().err
    assert f"--out {roi} is the --roi folder; predictions would replace the ROI masks" in err
    assert _snapshot(roi) == before


# --- issue 14, run folder: counts of no step and a diverging learning rate ---------------------------------

@pytest.mark.parametrize("flags, culprit", [
    (["--epochs", "0"], "--epochs (the plan's train.epochs) must be a whole number of at least 1, got 0"),
    (["--epochs", "-2"], "--epochs (the plan's train.epochs) must be a whole number of at least 1, got -2"),
    (["--iters", "0"], "--iters (the plan's train.iters_per_epoch) must be a whole number of at least 1"),
    (["--batch-size", "0"],
     "--batch-size (the plan's train.batch_size) must be a whole number of at least 1"),
    (["--lr", "1e30"], "lower --lr and train again"),
])
def test_train_refuses_a_run_of_no_step_or_a_diverging_one(flags, culprit, cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert culprit in err and len(err.strip().splitlines()) == 1
    assert not run.exists() and not list(tmp_path.glob(".run.*"))
    if flags[0] != "--lr":  # refused when the plan is made: `useg plan` says the same
        assert main(["plan", str(cells_dir), *flags]) == 2
        assert culprit in capsys.readouterr().err


# ------------------------------------------------ options checked at the boundary (issue 14, guards)


@pytest.mark.parametrize("flags, culprit", [
    (["--width", "0"], "the width must be a whole number >= 1 (--width), not 0"),
    (["--depth", "0"], "the depth must be a whole number >= 1 (--depth), not 0"),
    (["--depth", "10"], "--depth 10 pools 1024 pixels into one, but the largest image is 64x64; "
                        "use --depth 6 or less"),
    (["--dropout", "1.5"], "the dropout must lie in [0, 1) (--dropout), not 1.5"),
    (["--patch", "32"], "--patch 32 has 1 axes but the images have 2; give 2 sizes like --patch 64,64"),
    (["--patch", "32,32,32"], "--patch 32,32,32 has 3 axes but the images have 2"),
    (["--patch", "0,32"], "--patch 0,32 holds a size below 1"),
    (["--exclude", "cell_000,cell_001,cell_002,cell_003,cell_004,cell_005"],
     "--exclude names every one of the 6 cases; keep at least one case to train on"),
    (["--val", "cell_001", "--exclude", "cell_001"], "['cell_001'] are given to --exclude and to --val"),
])
def test_impossible_options_are_one_sentence(flags, culprit, cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY, *flags]) == 2  # later flags win
    err = capsys.readouterr().err
    assert culprit in err and err.startswith("useg train: error:") and "Traceback" not in err
    assert "not in the data" not in err
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("flag, value, culprit", [
    ("--lr", "-1", "argument --lr: expected a positive number, got '-1'"),
    ("--lr", "nan", "argument --lr: expected a positive number, got 'nan'"),
    ("--dropout", "-0.1", "argument --dropout: expected a number in [0, 1), got '-0.1'"),
    ("--seed", "-1", "argument --seed: expected a whole number >= 0, got '-1'"),
    ("--workers", "-5", "argument --workers: expected a whole number >= 0, or -1 for automatic"),
    ("--memory-gb", "0", "argument --memory-gb: expected a positive number, got '0'"),
    ("--time-budget", "inf", "argument --time-budget: expected a positive number, got 'inf'"),
])
def test_option_syntax_is_refused_by_the_parser(flag, value, culprit, cells_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, f"{flag}={value}"])
    assert exit_.value.code == 2
    assert culprit in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, culprit", [
    ("bogus", "device 'bogus' is unknown; use auto, cpu, cuda, cuda:1 or mps"),
    ("cuda:99", "cuda:99"),
])
@pytest.mark.parametrize("command", ["train", "plan", "predict"])
def test_a_device_that_is_not_there_exits_2(device, culprit, command, cells_dir, tmp_path, capsys):
    args = {"train": ["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY[:-5]],
            "plan": ["plan", str(cells_dir)],
            "predict": ["predict", str(tmp_path / "run"), str(cells_dir / "images"),
                        "--out", str(tmp_path / "o")]}
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before anything runs
        main([*args[command], "--device", device])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_cuda_without_cuda_exits_2(cells_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY[:-3], "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "device 'cuda' was asked for but CUDA is not available; use --device cpu" in err


@pytest.mark.parametrize("shape", [(48, 48), (40, 56)])
def test_an_oversize_patch_is_capped_to_the_images(shape, tmp_path, caplog):
    from useg.labels import LabelMap
    from useg.planner import make_plan
    from useg.spec import Overrides

    with caplog.at_level("WARNING", logger="useg.planner"):
        plan = make_plan(LabelMap((0, 255)), 1, [shape, (32, 32)], overrides=Overrides(
            model={"depth": 4}, patch_size=(4096, 4096)))
    want = tuple(-(-s // 16) * 16 for s in shape)  # the smallest multiple of 2^4 covering each edge
    assert plan.data.patch_size == want == plan.infer.tile
    largest = f"{shape[0]}x{shape[1]}"
    assert f"patch 4096x4096 is larger than the images allow (the largest is {largest})" in caplog.text


def test_a_preset_depth_too_deep_for_tiny_images_is_lowered(caplog):
    from useg.labels import LabelMap
    from useg.planner import make_plan

    with caplog.at_level("WARNING", logger="useg.planner"):
        plan = make_plan(LabelMap((0, 255)), 1, [(8, 8)])  # the default preset's depth 4 needs 16 px
    assert plan.model.depth == 3 and plan.data.patch_size == (8, 8)
    assert "using depth 3" in caplog.text


@pytest.mark.parametrize("section, key, value, culprit", [
    ("model", "width", 0, "the width must be a whole number >= 1"),
    ("model", "dropout", 2.0, "the dropout must lie in [0, 1)"),
    ("model", "norm", "group", "the norm must be one of None, batch, instance, not 'group'"),
    ("model", "dims", 4, "dims must be 2 or 3"),
    ("data", "patch_size", [32], "has 1 axes but the images have 2"),
    ("infer", "tile", [32, 0], "must hold whole numbers >= 1"),
    ("infer", "overlap", 1.0, "the tile overlap must lie in [0, 1)"),
    ("train", "lr", 0, "the learning rate must be a positive finite number"),
])
def test_a_semantically_invalid_plan_json_is_refused_at_load(section, key, value, culprit, trained,
                                                            cells_dir, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    plan = json.loads((run / "plan.json").read_text())
    plan[section][key] = value
    (run / "plan.json").write_text(json.dumps(plan))
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'plan.json'} is not a useg plan" in err and culprit in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_predict_refuses_a_stale_onnx_export(trained, cells_dir, tmp_path, capsys):
    """An export beside weights it was not made from must not run (`train --overwrite` now replaces
    the whole folder, so the stale export is copied back as a user restoring files would)."""
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["export", str(run), "--quiet"]) == 0
    capsys.readouterr()
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy2(run / name, kept / name)
    assert main(["train", str(cells_dir), "--out", str(run), "--overwrite", *TINY, "--width", "8"]) == 0
    assert not (run / "model.onnx").exists()  # the overwrite took the old export with the old run
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy2(kept / name, run / name)
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(out), "--backend",
                 "onnxruntime", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"{run / 'model.onnx'} was exported from other weights than {run / 'model.safetensors'}; "
            f"run 'useg export {run}' again") in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["export", str(run), "--quiet"]) == 0
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(out), "--backend",
                 "onnxruntime", "--quiet"]) == 0


# ------------------------------------------------ a file is a channel or the label (issue 14, guards)


def _case_folders(d):
    import nibabel as nib

    rng = np.random.default_rng(0)
    for k in range(3):
        lab = np.zeros((16, 16, 8), np.uint8)
        lab[4:12, 4:12, 2:6] = 1
        case = d / f"case{k}"
        case.mkdir(parents=True)
        for prefix, arr in (("t1", lab + rng.normal(0, 0.2, lab.shape)), ("seg", lab)):
            nib.save(nib.Nifti1Image(arr.astype(np.float32 if prefix == "t1" else np.uint8), np.eye(4)),
                     str(case / f"{prefix}_{k}.nii.gz"))
    return d


@pytest.mark.parametrize("flags, culprit", [
    (["--channels", "seg", "--label", "seg"], "--label 'seg' is also one of --channels"),
    (["--channels", "t1,SEG", "--label", "seg"], "--label 'seg' is also one of --channels"),
    (["--channels", "t1,t1", "--label", "seg"], "--channels names 't1' twice"),
    (["--channels", "s", "--label", "seg"], "seg_0.nii.gz matches two of --channels/--label"),
])
def test_a_file_is_a_channel_or_the_label_never_both(flags, culprit, tmp_path, capsys):
    data = _case_folders(tmp_path / "data")
    _check_and_train_refuse(data, culprit, tmp_path, capsys, *flags)
    assert main(["check", str(data), "--channels", "t1", "--label", "seg"]) == 0


# --------------------------------------------- a mask placed elsewhere than its image (issue 14, guards)


def _moved_mask(d, change):
    import nibabel as nib

    _nifti_volumes(d, image_zooms=(1.0, 1.0, 2.0))
    for k in range(3):  # the masks get their images' zooms, so only the change below differs
        path = d / "masks" / f"v{k}.nii.gz"
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        if k == 1:
            change(affine)
        nib.save(nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), affine), str(path))


def _flipped_axis(d):
    def flip(a):
        a[0, 0], a[0, 3] = -1.0, 15.0

    _moved_mask(d, flip)
    return "v1.nii.gz is oriented LAS but its image RAS (a flipped or permuted axis)"


def _swapped_axes(d):
    def swap(a):
        a[:2, :2] = [[0.0, 1.0], [1.0, 0.0]]

    _moved_mask(d, swap)
    return "v1.nii.gz is oriented ARS but its image RAS"


def _moved_origin(d):
    def move(a):
        a[1, 3] = 5.0

    _moved_mask(d, move)
    return "v1.nii.gz has its origin at 0x5x0 mm but its image at 0x0x0 mm (the mask is shifted)"


PLACED = {f.__name__[1:]: f for f in (_flipped_axis, _swapped_axes, _moved_origin)}


@pytest.mark.parametrize("name", sorted(PLACED))
def test_a_mask_placed_elsewhere_than_its_image_is_refused(name, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _check_and_train_refuse(data, PLACED[name](data), tmp_path, capsys)


def test_a_tiny_origin_difference_is_accepted(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)

    def nudge(a):
        a[:3, 3] = 1e-4  # float32 rounding of a header written by another tool

    _moved_mask(data, nudge)
    assert main(["check", str(data)]) == 0


# --- h13-cv: cross-validated runs (issue 13): splits.json, --folds, --fold, fold ensembles ------------------

def _fold(train, val):
    return {"train": [f"cell_00{i}" if isinstance(i, int) else i for i in train],
            "val": [f"cell_00{i}" if isinstance(i, int) else i for i in val]}


FOLD_SPLITS = {
    "not a list": ({"train": [], "val": []}, "is not a list"),
    "unknown case": ([_fold([0], ["nope"]), _fold(["nope"], [0])], "not cases of the data"),
    "twice in val": ([_fold([1], [0]), _fold([1], [0])], "in the val of folds 0 and 1"),
    "in no val": ([_fold([1], [0]), _fold([0], [1])], "in no fold's val"),
    "train and val": ([_fold([0], [0]), _fold([0], [1])], "trains and validates"),
}


@pytest.mark.parametrize("name", sorted(FOLD_SPLITS))
def test_a_bad_splits_json_is_refused(name, cells_dir, tmp_path, capsys):
    splits, words = FOLD_SPLITS[name]
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text(__import__("json").dumps(splits))
    assert main(["train", str(cells_dir), "--out", str(run), "--folds", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "splits.json" in err and words in err
    assert sorted(p.name for p in run.iterdir()) == ["splits.json"]  # nothing planned or trained


@pytest.mark.parametrize("args, words", [
    (["--folds", "2", "--val", "cell_000"], "drop --val"),
    (["--folds", "2", "--fold", "2"], "--fold 2 is not a fold"),
    (["--fold", "0", "--overwrite"], "not one fold"),
    (["--folds", "7"], "between 2 and 6 folds"),
])
def test_cross_validation_options_that_cannot_work_are_refused(args, words, cells_dir, tmp_path, capsys):
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *args, *TINY]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run" / "fold_0").exists()


def test_folds_on_a_single_run_and_on_unfinished_folds_are_refused(cells_dir, tmp_path, capsys):
    single = tmp_path / "single"
    single.mkdir()
    (single / "plan.json").write_text("{}")
    image = str(cells_dir / "images" / "cell_000.png")
    assert main(["train", str(cells_dir), "--out", str(single), "--folds", "2", *TINY]) == 2
    assert "holds a single run, not a cross-validated one" in capsys.readouterr().err
    assert main(["predict", str(single), image, "--out", str(tmp_path / "p"), "--folds", "0"]) == 2
    assert "not a cross-validated run" in capsys.readouterr().err
    cv = tmp_path / "cv"
    (cv / "fold_0").mkdir(parents=True)
    (cv / "splits.json").write_text('[{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]')
    assert main(["predict", str(cv), image, "--out", str(tmp_path / "p")]) == 2
    assert "fold_0 is not trained yet" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
