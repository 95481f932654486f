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
    ("--seed", "-1", "argument --seed: expected a whole number from 0 to 4294967295, got '-1'"),
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
    ("model", "depth", 10**30, "the depth must be at most 30"),  # 2**depth would hang
    ("train", "seed", 2**64, "the seed must be a whole number from 0 to 4294967295"),  # torch would overflow
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


@pytest.mark.parametrize("name", sorted({**PAIRING, **PLACED}))
def test_train_refuses_masks_that_do_not_pair_or_lie_elsewhere(name, cells_dir, tmp_path, capsys):
    """Names that pair with no mask, or a mask whose orientation or origin differs from its image's."""
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _check_and_train_refuse(data, {**PAIRING, **PLACED}[name](data), tmp_path, capsys)


def test_a_tiny_origin_difference_is_accepted(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)

    def nudge(a):
        a[:3, 3] = 1e-4  # float32 rounding of a header written by another tool

    _moved_mask(data, nudge)
    assert main(["check", str(data)]) == 0


# --- h14-advice: advice that names the real cause, run folder states, guards (issue 14) -----------------

def _started_run(trained, tmp_path):
    """A run folder of a training interrupted before its first checkpoint: plan.json and split.json only."""
    run = tmp_path / "started"
    run.mkdir()
    for name in ("plan.json", "split.json"):
        shutil.copy(trained / name, run / name)
    return run


def test_a_run_folder_without_a_checkpoint_is_no_run(trained, cells_dir, tmp_path, capsys):
    run = _started_run(trained, tmp_path)
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no trained model: training was interrupted before its first checkpoint" in err
    assert "--overwrite" in err and "--resume" not in err
    assert main(["train", str(cells_dir), "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint to resume" in err and f"useg train {cells_dir} --out {run} --overwrite" in err
    assert main(["train", str(cells_dir), "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds no trained model" in err and "pass --overwrite" in err and "--resume" not in err
    assert main(["train", str(cells_dir), "--out", str(trained), *TINY]) == 2
    assert "already holds a run, trained to its end; pass --overwrite" in capsys.readouterr().err
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    assert "holds no run to resume (no plan.json); train without --resume" in capsys.readouterr().err


def test_run_state_tells_the_four_states(trained, tmp_path):
    from useg.runlog import run_state

    assert run_state(tmp_path / "missing").kind == "empty"
    assert run_state(_started_run(trained, tmp_path)).kind == "started"
    state = run_state(trained)
    assert (state.kind, state.epochs_done, state.epochs_planned, state.has_model) == ("complete", 1, 1, True)
    longer = tmp_path / "longer"
    shutil.copytree(trained, longer)
    plan = (longer / "plan.json").read_text().replace('"epochs": 1,', '"epochs": 3,')
    (longer / "plan.json").write_text(plan)
    assert run_state(longer).kind == "resumable" and run_state(longer).epochs_planned == 3


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def test_a_killed_trainings_staging_folder_is_removed_or_taken_up(trained, cells_dir, tmp_path, capsys,
                                                                    caplog, monkeypatch):
    import logging
    import os

    from useg.runlog import OWNER_FILE, _host, clear_stale, stale_staging

    out = tmp_path / "run"
    killed = tmp_path / ".run.new-0badc0de"
    shutil.copytree(trained, killed)
    (killed / OWNER_FILE).write_text(f"{_dead_pid()} {_host()}\n")
    alive = tmp_path / ".run.new-a11ve000"  # a training still at work: never touched
    alive.mkdir()
    (alive / OWNER_FILE).write_text(f"{os.getpid()} {_host()}\n")
    assert stale_staging(out) == [killed]
    assert main(["predict", str(out), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{killed.name} beside it holds a training into it that was killed" in err and "--resume" in err
    monkeypatch.setattr(logging.getLogger("useg"), "propagate", True)  # the CLI set its own handler
    with caplog.at_level("INFO", logger="useg"):
        clear_stale(out, resume=True)  # --resume takes it up
    assert out.is_dir() and not killed.exists() and not (out / OWNER_FILE).exists() and alive.exists()
    assert "taking up .run.new-0badc0de" in caplog.text
    again = tmp_path / ".run.new-0badbeef"
    shutil.copytree(trained, again)
    (again / OWNER_FILE).write_text(f"{_dead_pid()} {_host()}\n")
    with caplog.at_level("INFO", logger="useg"):
        clear_stale(out)  # a new training into it: removed, with a log line
    assert not again.exists() and "removed .run.new-0badbeef" in caplog.text and alive.exists()


def _folders(d, images, masks):
    (d / "images").rename(d / images)
    (d / "masks").rename(d / masks)


def _top_level(d):
    for p in (d / "images").iterdir():
        p.rename(d / p.name)
    (d / "images").rmdir()
    shutil.rmtree(d / "instances")


LAYOUT_NAMES = {
    "singular": lambda d: _folders(d, "image", "mask"),
    "capitalised": lambda d: _folders(d, "Images", "Masks"),
    "imgs labels": lambda d: _folders(d, "imgs", "labels"),
    "images gt": lambda d: _folders(d, "images", "gt"),
    "top level": _top_level,
}


@pytest.mark.parametrize("name", sorted(LAYOUT_NAMES))
def test_common_folder_names_are_the_images_masks_layout(name, cells_dir, tmp_path, capsys):
    from useg.check import check_dataset

    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    LAYOUT_NAMES[name](data)
    report = check_dataset(data)
    assert report.ok, report.problems
    assert len(report.cases) == 6 and all(c.mask is not None for c in report.cases)
    assert report.label_map.values == (0, 255)


def test_folder_names_that_leave_it_open_are_named(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data / "train")
    assert main(["check", str(data)]) == 2
    assert f"holds no images itself, but train/ holds images and masks; give {data / 'train'}" in \
        capsys.readouterr().err
    shutil.rmtree(data)
    shutil.copytree(cells_dir, data)
    _folders(data, "image", "labels")
    shutil.copytree(data / "image", data / "imgs")
    assert main(["check", str(data)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 image folders (image/, imgs/); keep one of them and name it images/" in err
    assert "--channels" not in err


def test_a_3d_volume_given_to_a_2d_run_is_named(trained, tmp_path, capsys):
    import nibabel as nib

    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), str(vol))
    assert main(["predict", str(trained), str(vol), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "vol.nii.gz is a 3D volume (16x16x8) but this run is 2D (trained on 2D images)" in err
    assert "channels first" not in err


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("which", ["masks", "images"])
def test_a_header_with_a_bad_voxel_size_is_named(bad, which, cells_dir, tmp_path, capsys):
    import nibabel as nib

    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _nifti_volumes(data)
    path = data / which / "v1.nii.gz"
    img = nib.load(str(path))
    img.header["pixdim"][2] = bad
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), str(path))
    shown = "nan" if np.isnan(bad) else "inf"
    assert main(["check", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"v1.nii.gz states a voxel size of 1x{shown}x1 in its header" in err and "fix the header" in err
    assert "resample the mask" not in err


def test_evaluating_object_ids_says_so(cells_dir, tmp_path, capsys):
    pred = tmp_path / "pred"
    for i in range(6):
        ids = np.zeros((64, 64), np.uint8)
        for k in range(1, 5):
            ids[10 * k: 10 * k + 5, 10:20] = k  # four objects, numbered as 'useg predict --instances' does
        _png(pred / f"cell_{i:03d}.png", ids)
    for flags in ([], ["--instances"]):
        assert main(["evaluate", str(pred), str(cells_dir), *flags]) == 2
        err = capsys.readouterr().err
        assert "4 consecutive ids 1..4" in err and "object ids of 'useg predict --instances'" in err
        assert "--labels" not in err


def _fifo(path):
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_never_read(trained, cells_dir, tmp_path, capsys):
    said = "is a named pipe (FIFO), not a regular file"
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _fifo(data / "images" / "cell_002.png")
    assert main(["check", str(data)]) == 2
    assert f"cell_002.png {said}" in capsys.readouterr().err
    fifo = _fifo(tmp_path / "in" / "pipe.png")
    assert main(["predict", str(trained), str(fifo), "--out", str(tmp_path / "o")]) == 2
    assert f"pipe.png {said}" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _fifo(run / "plan.json")
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    assert f"plan.json {said}" in capsys.readouterr().err
    assert main(["train", str(cells_dir), "--out", str(run), "--resume", "--quiet"]) == 2
    assert f"plan.json {said}" in capsys.readouterr().err
    pred = tmp_path / "pred"
    shutil.copytree(cells_dir / "masks", pred)
    _fifo(pred / "cell_003.png")
    assert main(["evaluate", str(pred), str(cells_dir)]) == 2
    assert f"cell_003.png {said}" in capsys.readouterr().err
    roi = tmp_path / "roi"
    shutil.copytree(cells_dir / "masks", roi)
    _fifo(roi / "cell_001.png")
    assert main(["check", str(cells_dir), "--roi", str(roi)]) == 2
    assert f"cell_001.png {said}" in capsys.readouterr().err


def test_resume_refuses_options_it_cannot_apply(trained, cells_dir, capsys):
    for flags, named in ((["--width", "8"], "--width"), (["--patch", "32,32", "--lr", "0.1"],
                                                         "--patch, --lr"),
                         (["--preset", "paper"], "--preset"), (["--val", "cell_001"], "--val"),
                         (["--deterministic"], "--deterministic")):
        assert main(["train", str(cells_dir), "--out", str(trained), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert f"{named} cannot change a run on --resume" in err and "plan.json" in err
    assert main(["train", str(cells_dir), "--out", str(trained), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_every_train_option_is_known_to_resume():
    """A new `useg train` option must say whether --resume applies it (else it would be dropped silently)."""
    import argparse

    from useg.cli import NEW_RUN_ONLY, RESUME_APPLIES
    from useg.cli_parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["train"]._actions if a.dest != "help"}
    assert dests == set(NEW_RUN_ONLY) | set(RESUME_APPLIES)
    assert all(sub.choices["train"].get_default(k) in (None, False) for k in NEW_RUN_ONLY)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_predict_never_writes_into_the_training_masks(overwrite, trained, cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    before = {p.name: p.read_bytes() for p in (data / "masks").iterdir()}
    for given in (data / "images", data, data / "images" / "cell_001.png"):
        assert main(["predict", str(trained), str(given), "--out", str(data / "masks"), *overwrite]) == 2
        err = capsys.readouterr().err
        assert "is the mask folder of the input" in err and "training masks" in err
    assert {p.name: p.read_bytes() for p in (data / "masks").iterdir()} == before
    nnunet = tmp_path / "nnunet"
    shutil.copytree(cells_dir / "images", nnunet / "imagesTr")
    shutil.copytree(cells_dir / "masks", nnunet / "labelsTr")
    assert main(["predict", str(trained), str(nnunet / "imagesTr"), "--out", str(nnunet / "labelsTr"),
                 *overwrite]) == 2
    assert "is the mask folder of the input" in capsys.readouterr().err


def test_a_photograph_saved_with_a_palette_is_no_58_class_mask(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    rng = np.random.default_rng(0)
    palette = [int(v) for v in rng.integers(0, 256, 768)]
    for p in (data / "masks").iterdir():
        im = PILImage.fromarray((np.arange(64 * 64) % 58).reshape(64, 64).astype(np.uint8), mode="P")
        im.putpalette(palette)
        im.save(p)
    assert main(["check", str(data)]) == 2
    err = capsys.readouterr().err
    assert "the masks share 58 distinct palette indices" in err and "more than 32 classes" in err
# --- issue 14, memory that is never checked (h14-memory) -------------------------------------------------

def _edit_plan(run, **model):
    import json

    plan = json.loads((run / "plan.json").read_text())
    plan["model"].update(model)
    (run / "plan.json").write_text(json.dumps(plan))


def test_a_plan_edited_to_a_huge_network_is_refused_before_it_is_built(trained, cells_dir, tmp_path, capsys,
                                                                       monkeypatch):
    import resource

    from useg.model import UNet

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _edit_plan(run, width=3000)
    built = []
    monkeypatch.setattr(UNet, "reset_parameters", lambda self: built.append(next(self.parameters()).device))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'model.safetensors'} does not match its plan.json" in err and "shape mismatch" in err
    assert all(d.type == "meta" for d in built)  # the 5 GB network was only ever described
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: no 5 GB peak
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # --resume compares last.safetensors with the plan before building the network too
    assert main(["train", str(cells_dir), "--out", str(run), "--resume", "--quiet"]) == 2
    assert f"{run / 'last.safetensors'} does not match its plan.json" in capsys.readouterr().err
    assert all(d.type == "meta" for d in built)


@pytest.mark.parametrize("damage", [b"", b"\x00" * 4, (2**40).to_bytes(8, "little"),
                                    (10).to_bytes(8, "little") + b"not json!!"])
def test_a_weights_file_with_a_damaged_header_is_one_sentence(damage, trained, cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "model.safetensors").write_bytes(damage)
    assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(tmp_path / "o")]) == 2
    assert f"cannot read {run / 'model.safetensors'}" in capsys.readouterr().err


def _absurd_voxels(d):
    """Three NIfTI cases of 1 mm voxels but one whose header (image and mask alike) says 300 mm."""
    import nibabel as nib

    _nifti_volumes(d)
    for folder in ("images", "masks"):
        p = d / folder / "v1.nii.gz"
        f = nib.load(str(p))
        nib.save(nib.Nifti1Image(np.asarray(f.dataobj), np.diag([300.0, 300.0, 300.0, 1.0])), str(p))


def test_a_case_whose_voxels_are_absurd_is_refused_before_resampling(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _absurd_voxels(data)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--width", "4", "--epochs", "1", "--iters", "1",
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("useg train: error")]
    assert len(error) == 1, err  # one sentence (the planner's warning about the case is logged before it)
    assert "case 'v1' would be resampled from 16x16x8 voxels of 300x300x300 mm to 4800x4800x2400" in error[0]
    assert "TiB, more than the" in error[0] and "--exclude v1" in error[0]
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("dims", [2, 3])
def test_predicting_an_image_whose_voxels_are_absurd_is_refused_before_resampling(dims, tmp_path):
    from useg.errors import UsegError
    from useg.files import Image
    from useg.labels import LabelMap
    from useg.planner import make_plan
    from useg.predict import Segmenter
    from useg.spec import Overrides

    shape = (16,) * dims
    plan = make_plan(LabelMap((0, 1)), 1, [shape], spacings=[(1.0,) * dims],
                     overrides=Overrides(model={"width": 4, "depth": 2}, data={"resample": True}))
    calls = []

    class Backend:
        name, device = "fake", __import__("torch").device("cpu")

        def __call__(self, batch):
            calls.append(batch.shape)
            raise AssertionError("the network must not run")

    seg = Segmenter(plan, Backend())
    voxel = 300.0 if dims == 3 else 1e5  # a 2D image needs a larger blunder to exceed the memory
    image = Image(np.zeros((1, *shape), np.float32), (voxel,) * dims, path=tmp_path / "big.nii.gz")
    for predict in (seg.predict_image, seg.predict_image_proba):
        with pytest.raises(UsegError, match=rf"big.nii.gz would be resampled from 16x16.* voxels of "
                                            rf"{voxel:g}x.* mm .*more than the .* available; check the"):
            predict(image)
    assert not calls


def test_the_resampling_estimate_takes_the_limit_as_an_argument():
    from useg.errors import UsegError
    from useg.memory import check_resample, resample_bytes

    # image (2 channels) and 3 probability maps in float32, the spline buffer and the labels
    assert resample_bytes((10, 10), channels=2, classes=3) == 100 * (8 + 12 + 16)
    assert check_resample("x", (10, 10), (2.0, 2.0), (1.0, 1.0), 2, 3, limit=400 * 36) == 400 * 36
    with pytest.raises(UsegError, match=r"x would be resampled from 10x10 voxels of 2x2 mm to 20x20 voxels "
                                        r"of 1x1 mm \(2 times finer\), about 0.01 MiB, more than the"):
        check_resample("x", (10, 10), (2.0, 2.0), (1.0, 1.0), 2, 3, limit=400 * 36 - 1)


def _nnunet_png(root):
    """A valid 2D nnU-Net raw dataset of 3 PNG cases; returns its dataset.json as a dict."""
    import json

    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros((32, 32), np.uint8)
        lab[8:20, 10:24] = 1
        image = (lab * 100 + rng.integers(0, 50, lab.shape)).astype(np.uint8)
        _png(root / "imagesTr" / f"case{i}_0000.png", image)
        _png(root / "labelsTr" / f"case{i}.png", lab)
    d = {"channel_names": {"0": "EM"}, "labels": {"background": 0, "cell": 1}, "numTraining": 3,
         "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(d))
    return d


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _with(**fields):
    return lambda d: {**d, **fields}


DATASET_JSON = {  # how the file is spoiled -> what the message names
    "not JSON": (lambda d: "{'labels': ", "cannot read"),
    "a list": (lambda d: [d], "must hold a JSON object"),
    "no channel_names": (_without("channel_names"), "channel_names is missing"),
    "channel_names a list": (_with(channel_names=["EM"]), "channel_names must map channel numbers"),
    "channel_names from 1": (_with(channel_names={"1": "EM"}), "channel_names must be numbered 0"),
    "no labels": (_without("labels"), "labels is missing"),
    "labels a list": (_with(labels=["background", "cell"]), "labels must map names to mask values"),
    "label a string": (lambda d: {**d, "labels": {"background": 0, "cell": "1"}},
                       "labels: the value of 'cell' must be a whole number"),
    "label a fraction": (lambda d: {**d, "labels": {"background": 0, "cell": 1.5}}, "value of 'cell'"),
    "no file_ending": (_without("file_ending"), "file_ending is missing"),
    "unknown file_ending": (lambda d: {**d, "file_ending": ".xyz"}, "file_ending '.xyz' is no image format"),
    "numTraining text": (_with(numTraining="three"), "numTraining must be the number of training"),
    "numTraining wrong": (lambda d: {**d, "numTraining": 5}, "says numTraining 5 but"),
    "regions without order": (lambda d: {**d, "labels": {"background": 0, "cell": [1]}},
                              "regions_class_order is missing"),
    "regions_class_order short": (lambda d: {**d, "labels": {"background": 0, "cell": [1]},
                                             "regions_class_order": []}, "regions_class_order must list 1"),
}


@pytest.mark.parametrize("name", sorted(DATASET_JSON))
def test_a_malformed_dataset_json_is_one_sentence(name, tmp_path, capsys):
    import json

    root = tmp_path / "Dataset001_Cells"
    spoil, culprit = DATASET_JSON[name]
    spoiled = spoil(_nnunet_png(root))
    (root / "dataset.json").write_text(spoiled if isinstance(spoiled, str) else json.dumps(spoiled))
    assert main(["check", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'dataset.json'}" in err and culprit in err, err
    assert "Traceback" not in err


def test_a_valid_dataset_json_passes(tmp_path, capsys):
    _nnunet_png(tmp_path / "Dataset001_Cells")
    assert main(["check", str(tmp_path / "Dataset001_Cells")]) == 0


@pytest.mark.parametrize("fmt,suffix", [("tif", ".tif"), ("nii.gz", ".nii.gz")])
def test_predict_mask_format_chooses_the_output(fmt, suffix, trained, cells_dir, tmp_path, capsys):
    from useg.io import read_mask

    out = tmp_path / "o"
    assert main(["predict", str(trained), str(cells_dir / "images"), "--out", str(out), "--mask-format", fmt,
                 "--quiet"]) == 0
    written = sorted(out.iterdir())
    assert len(written) == 6 and all(p.name.endswith(suffix) for p in written)
    assert set(np.unique(read_mask(written[0])[0])) <= {0, 255}


def test_predict_mask_format_with_probabilities_is_refused(trained, cells_dir, tmp_path, capsys):
    assert main(["predict", str(trained), str(cells_dir / "images"), "--out", str(tmp_path / "o"),
                 "--mask-format", "png", "--probabilities", "uint8"]) == 2
    assert "--mask-format chooses the masks' format and --probabilities" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loading_a_case_checks_its_resampled_size_too(cells_dir, tmp_path, monkeypatch):
    """A plan.json trained elsewhere (or a resumed run) resamples in load_case: the same refusal."""
    from useg.dataset import Case, discover
    from useg.errors import UsegError
    from useg.labels import LabelMap
    from useg.memory import check_cases
    from useg.preprocess import load_case

    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    _absurd_voxels(data)
    case = next(c for c in discover(data) if c.name == "v1")
    assert isinstance(case, Case)
    with pytest.raises(UsegError, match=r"v1.nii.gz would be resampled from 16x16x8 voxels of 300x300x300"):
        load_case(case, LabelMap((0, 1)), spacing=(1.0, 1.0, 1.0))

    class Record:  # a case that fits but whose header is suspicious is named in a warning
        name, shape, spacing, num_channels = "v9", (4, 4, 4), (20.0, 1.0, 1.0), 1

    import useg.memory

    said = []
    monkeypatch.setattr(useg.memory.logger, "warning", lambda msg, *args: said.append(msg % args))
    check_cases([Record()], (1.0, 1.0, 1.0), limit=2**30)
    assert said and "case 'v9' has voxels of 20x1x1 mm, 20 times the target spacing" in said[0]
# --- h13-post: post-processing records and their inputs ---------------------------------------

@pytest.mark.parametrize("text, culprit", [
    ("{", "Expecting property name"),
    ('{"figures": {}}', "no 'postprocessing' entry"),
    ('{"postprocessing": {"largest_classes": [0]}}', "integers >= 1"),
    ('{"postprocessing": {"min_sizes": {"1": 2.5}}}', "integers >= 1 voxel"),
    ('{"postprocessing": {"largest_classes": [2]}}', "names class 2 but the run has 2 classes"),
    ('{"postprocessing": {"lcc": true}}', "unknown post-processing field"),
    ('[1, 2]', "no 'postprocessing' entry"),
    ('{"postprocessing": {"largest_classes": "1"}}', "largest_classes must be a list"),
])
def test_a_damaged_postprocessing_record_is_refused_at_load(text, culprit, trained, cells_dir, tmp_path,
                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "postprocessing.json").write_text(text)
    img = str(cells_dir / "images" / "cell_000.png")
    assert main(["predict", str(run), img, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'postprocessing.json'} is not a valid post-processing record" in err and culprit in err
    assert "useg postprocess RUN" in err and "Traceback" not in err and not (tmp_path / "o").exists()
    assert main(["info", str(run)]) == 2
    raw = ["predict", str(run), img, "--out", str(tmp_path / "o"), "--no-postprocessing", "--quiet"]
    assert main(raw) == 0  # the raw masks need no record


def test_postprocess_refuses_what_evaluate_refuses(trained, cells_dir, tmp_path, capsys):
    masks = str(cells_dir / "masks")
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "nope is not a run folder" in capsys.readouterr().err
    assert main(["postprocess", str(tmp_path), "--predictions", masks, "--truth", masks]) == 2
    assert "is not a run folder (no plan.json)" in capsys.readouterr().err
    _png(tmp_path / "pred" / "other.png", np.zeros((64, 64), np.uint8))
    assert main(["postprocess", str(trained), "--predictions", str(tmp_path / "pred"), "--truth", masks]) == 2
    assert "no true mask in" in capsys.readouterr().err
    (tmp_path / "pred" / "other.png").rename(tmp_path / "pred" / "cell_000.png")
    _png(tmp_path / "pred" / "cell_000.png", np.full((64, 64), 7, np.uint8))
    assert main(["postprocess", str(trained), "--predictions", str(tmp_path / "pred"), "--truth", masks]) == 2
    assert "cell_000.png" in capsys.readouterr().err
    assert not (trained / "postprocessing.json").exists()  # nothing written when refused
    with pytest.raises(SystemExit) as exit_:
        main(["postprocess", str(trained), "--predictions", masks, "--truth", masks, "--percentile", "101"])
    assert exit_.value.code == 2
    assert "expected a percentile in [0, 100], got '101'" in capsys.readouterr().err
# --- h11-gpu: --continue, and torchrun's environment ------------------------------------------------------


def test_continue_and_overwrite_together_are_refused(trained, cells_dir, tmp_path, capsys):
    img = str(cells_dir / "images" / "cell_000.png")
    argv = ["predict", str(trained), img, "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--continue", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite replaces the masks already in --out and --continue keeps them" in err
    assert not (tmp_path / "o").exists()


def test_a_broken_rank_environment_is_refused(trained, cells_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    img = str(cells_dir / "images" / "cell_000.png")
    argv = ["predict", str(trained), img, "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu"]
    assert main(argv) == 2
    assert "RANK=2 and WORLD_SIZE=2 in the environment" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
# ------------------------------------------------ a backend this machine cannot run (issue 11, h11-backend)


def test_a_backend_the_machine_cannot_run_is_refused(trained, cells_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine runs torch-fp16")
    out = tmp_path / "o"
    images = str(cells_dir / "images")
    assert main(["predict", str(trained), images, "--out", str(out), "--backend", "torch-fp16",
                 "--device", "cpu", "--quiet"]) == 2
    assert (f"--backend torch-fp16 runs {trained} on a CUDA GPU only, and cpu is none; use --backend auto "
            "or torch-fp32") in capsys.readouterr().err
    assert main(["predict", str(trained), images, "--out", str(out), "--backend", "openvino", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{trained / 'model.onnx'} is missing; run 'useg export {trained}' first" in err
    assert not out.exists() or not any(out.iterdir())


def test_openvino_bf16_without_native_bf16_is_refused(trained, cells_dir, tmp_path, capsys, monkeypatch):
    from useg import runtime

    monkeypatch.setenv("USEG_CPU_BF16", "0")  # an AVX2-only CPU, where OpenVINO cannot compile bf16
    runtime.cpu_has_bf16.cache_clear()
    out = tmp_path / "o"
    try:
        assert main(["predict", str(trained), str(cells_dir / "images"), "--out", str(out),
                     "--backend", "openvino-bf16", "--quiet"]) == 2
    finally:
        runtime.cpu_has_bf16.cache_clear()
    assert (f"--backend openvino-bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX) to run {trained}, "
            "and this one has none; use --backend openvino or auto") in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
# ------------------------- h14-property: what the property test of the command line found (issue 14)


@pytest.mark.parametrize("flags, culprit", [
    (["--depth", "9" * 30], "the depth must be at most 30 (--depth), not 999"),  # 2**depth would hang
    (["--width", "99999999999"], "GiB but this machine has"),  # the allocator was asked for terabytes
    (["--width", "100000", "--depth", "1"], "lower --width, --depth, --patch or --batch-size"),  # weights
])
@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_network_beyond_any_machine_is_one_sentence(command, flags, culprit, cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(cells_dir), "--out", str(run), *TINY] if command == "train" else \
        ["plan", str(cells_dir), "--quiet"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.startswith(f"useg {command}: error:") and "Traceback" not in err
    assert not run.exists() and not list(tmp_path.glob(".run.*"))


@pytest.mark.parametrize("value", ["4294967296", "9" * 30])
def test_a_seed_beyond_32_bits_is_refused_by_the_parser(value, cells_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # torch.manual_seed raised "Overflow when unpacking long"
        main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, "--seed", value])
    assert exit_.value.code == 2
    assert "argument --seed: expected a whole number from 0 to 4294967295" in capsys.readouterr().err
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, "--seed", "4294967295"]) == 0


def test_plan_json_on_stdout_is_json_even_with_logs(cells_dir, capsys):
    """The logs went to stdout, before the plan: `useg plan DATA --json > plan.json` was not JSON."""
    import json

    assert main(["plan", str(cells_dir), "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"]["dims"] == 2
    assert "plan:" in err  # the reasons are still logged, on stderr


@pytest.mark.parametrize("where", ["data", "images", "masks", "parent"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_never_writes_its_run_among_the_inputs(where, overwrite, cells_dir, tmp_path, capsys):
    data = tmp_path / "d" / "data"
    shutil.copytree(cells_dir, data)
    out = {"data": data, "images": data / "images", "masks": data / "masks", "parent": data.parent}[where]
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert main(["train", str(data), "--out", str(out), *TINY, *overwrite]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is" in err and "choose a folder outside" in err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["data"]


def _two_cubes(folder):
    """Two 12^3 NIfTI volumes with a cube each, in ``folder/images`` and ``folder/masks``."""
    import nibabel as nib

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for i in range(2):
            arr = np.zeros((12, 12, 12), np.float32 if sub == "images" else np.uint8)
            arr[3:8, 3:8, 3:8] = 1
            nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / sub / f"v{i}.nii.gz")


def test_a_huge_depth_is_refused_before_the_3d_rules_use_it(tmp_path, capsys):
    _two_cubes(tmp_path / "d")
    assert main(["plan", str(tmp_path / "d"), "--quiet", "--depth", "9" * 30]) == 2  # training_gib looped
    assert "the depth must be at most 30 (--depth)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--labels", "--patch"])
@pytest.mark.parametrize("value", ["", ",", " , "])
def test_an_empty_list_of_integers_is_refused_by_the_parser(flag, value, cells_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # an empty --labels reached the label map: a ValueError
        main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected integers like 256,256 or 0,255, got {value!r}" in err


@pytest.mark.parametrize("flags, culprit", [
    (["--depth", "3", "--patch", "8,8", "--norm", "instance"],
     "--patch 8x8 pools to a single voxel at depth 3"),
    (["--depth", "3", "--patch", "8,8", "--batch-size", "1"],
     "use a patch of at least 16 per axis or a larger"),
])
def test_a_patch_that_pools_to_one_voxel_is_refused(flags, culprit, cells_dir, tmp_path, capsys):
    """Instance (or batch-of-one batch) norm over a 1-voxel bottom: "Expected more than 1 spatial element"."""
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, *flags]) == 2
    assert culprit in capsys.readouterr().err
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, *flags[:2], "--patch",
                 "16,16", *flags[4:]]) == 0


@pytest.mark.parametrize("flag", ["--val", "--exclude"])
def test_a_range_of_billions_of_case_names_is_refused(flag, cells_dir, tmp_path, capsys):
    assert main(["train", str(cells_dir), "--out", str(tmp_path / "run"), *TINY, flag, "0-99999999999"]) == 2
    err = capsys.readouterr().err  # it was expanded name by name: hours
    assert "the range 0-99999999999 names 100000000000 cases, more than 1000000" in err
    assert not (tmp_path / "run").exists()


def test_a_2d_image_given_to_a_3d_run_is_one_sentence(trained, cells_dir):
    """(1, H, W) was taken for a one-slice volume: "labels (1, 64, 64) do not match" from the writer."""
    from useg.errors import UsegError
    from useg.io import read_image
    from useg.plan import Plan
    from useg.predict import Segmenter

    seg = Segmenter.load(trained)
    d = seg.plan.to_dict()  # the same run made 3D: the check is on the image's dimensions, not the weights
    seg.plan = Plan.from_dict({**d, "model": {**d["model"], "dims": 3},
                               "data": {**d["data"], "patch_size": [16] * 3, "spacing": [1.0] * 3},
                               "infer": {**d["infer"], "tile": [16] * 3}})
    with pytest.raises(UsegError, match=r"cell_000.png is a 2D image \(64x64\) but this run is 3D"):
        seg.predict_image(read_image(cells_dir / "images" / "cell_000.png"))


def test_a_negative_3d_patch_is_one_sentence(tmp_path, capsys):
    _two_cubes(tmp_path / "d")
    assert main(["plan", str(tmp_path / "d"), "--quiet", "--patch=-1,255,8"]) == 2  # log2(-1): math error
    assert "--patch -1,255,8 holds a size below 1" in capsys.readouterr().err
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


# --- lead, review: cross-validated runs follow the single run's guards -------------------------------


def test_a_cross_validated_run_is_never_written_among_the_inputs(cells_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert main(["train", str(data), "--out", str(data), *TINY, "--folds", "2"]) == 2
    assert "is or holds the data folder" in capsys.readouterr().err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_fold_beyond_the_folds_leaves_nothing_behind(cells_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY, "--folds", "2", "--fold", "5"]) == 2
    assert "--fold 5 is not a fold of a 2-fold run (0 to 1)" in capsys.readouterr().err
    assert not run.exists()


# --- slices: nnU-Net's 2d configuration on the slices of volumes ----------------------------------------


def _slice_run(folder):
    """An untrained run of a 2D network (width 4, depth 2) on the axial slices of volumes."""
    import torch

    from useg.checkpoint import save_model
    from useg.labels import LabelMap
    from useg.model import UNet
    from useg.planner import make_plan
    from useg.slices import sliced
    from useg.spec import Overrides

    folder.mkdir()
    plan = sliced(make_plan(LabelMap((0, 255), "grey"), 1, [(32, 32)],
                            overrides=Overrides(model={"width": 4, "depth": 2})), 2, (1.0, 1.0, 2.0))
    plan.save(folder / "plan.json")
    torch.manual_seed(0)
    save_model(UNet.from_config(plan.model), folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["data"].update(slice_axis=3), "slice_axis must be 0, 1 or 2"),
    (lambda d: d["data"].update(slice_axis=True), "slice_axis must be 0, 1 or 2"),
    (lambda d: d["model"].update(dims=3), "has a 2D network, not a 3D one"),
    (lambda d: d["data"].update(spacing=[1.0, 1.0]), "must hold 3 positive finite numbers"),
])
def test_an_impossible_slice_plan_json_is_refused(edit, words, tmp_path, capsys):
    import json

    run = _slice_run(tmp_path / "run")
    d = json.loads((run / "plan.json").read_text())
    edit(d)
    (run / "plan.json").write_text(json.dumps(d))
    _png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    assert main(["predict", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path / "p")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_2d_image_given_to_a_slice_run_is_refused_in_one_sentence(tmp_path, capsys):
    run = _slice_run(tmp_path / "run")
    _png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    assert main(["predict", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "x.png is a 2D image (16x16) but this run was trained on the 2D slices of 3D volumes" in err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_configuration_3d_on_2d_images_is_refused(cells_dir, tmp_path):
    from useg.errors import UsegError
    from useg.pipeline import train_folder
    from useg.spec import Overrides

    with pytest.raises(UsegError, match="2D images have no 3D configuration"):
        train_folder(cells_dir, tmp_path / "run", overrides=Overrides(configuration="3d"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_3d_patch_for_the_2d_configuration_is_refused(tmp_path, write_blob_volumes):
    from useg.errors import UsegError
    from useg.pipeline import train_folder
    from useg.spec import Overrides

    data = write_blob_volumes(tmp_path / "data", shape=(12, 10, 9), n=2)
    with pytest.raises(UsegError, match="has 3 axes but configuration 2d trains on 2D slices"):
        train_folder(data, tmp_path / "run", overrides=Overrides(configuration="2d", patch_size=(8, 8, 8)),
                     quiet=True)
    assert not (tmp_path / "run").exists()


# --- configs: --configs 2d,3d and multi-configuration runs ------------------------------------------


@pytest.mark.parametrize("value, words", [("4d", "unknown '4d'"), ("2d,2d", "a name given twice"),
                                          (",", "no name"), ("2d,3d,2d", "a name given twice")])
@pytest.mark.parametrize("command", ["train", "plan", "predict"])
def test_configs_that_name_no_configuration_are_refused_by_the_parser(command, value, words, tmp_path,
                                                                      capsys):
    args = {"train": ["train", "data", "--out", str(tmp_path / "run")], "plan": ["plan", "data"],
            "predict": ["predict", "run", "x.png", "--out", str(tmp_path / "p")]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--configs", value])
    assert exit_.value.code == 2
    assert f"expected configurations among 2d, 3d such as 2d,3d ({words})" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("configs, words", [
    ("3d", "2D images have no 3D configuration"),  # the planner's sentence
    ("2d,3d", "holds 2D images, for which there is no 3D configuration; drop 3d from --configs"),  # before
])                                                # the multi-configuration run writes its configs.json
@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_3d_configuration_of_2d_images_is_refused(command, configs, words, cells_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")] if command == "train" else []
    assert main([command, str(cells_dir), *out, "--configs", configs, *TINY]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _fake_multi(tmp_path, untrained_run, chosen=None):
    run = tmp_path / "multi"
    run.mkdir()
    (run / "configs.json").write_text('{"configurations": ["2d", "3d"], "folds": null, "val": ["c0"]}')
    for name in ("2d", "3d"):
        shutil.copytree(untrained_run, run / name)
    if chosen is not None:
        (run / "configuration.json").write_text(__import__("json").dumps({"chosen": chosen}))
    return run


@pytest.mark.parametrize("args, words", [
    (["--configs", "2d,3d", "--resume"], "--configs cannot change a run on --resume, which continues the "
                                         "configurations of"),
    (["--configs", "2d,3d", "--overwrite"], "--overwrite does not apply to a multi-configuration run"),
    (["--configs", "2d,3d", "--folds", "2", "--fold", "0"], "--fold does not apply to a multi-configuration"),
    (["--configs", "2d,3d"], "already holds a multi-configuration run; pass --resume"),
])
def test_multi_configuration_training_options_that_cannot_work_are_refused(args, words, tmp_path,
                                                                           untrained_run, write_squares,
                                                                           capsys):
    data = write_squares(tmp_path / "data")
    run = _fake_multi(tmp_path, untrained_run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["train", str(data), "--out", str(run), *args, "--device", "cpu", "--quiet"]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_damaged_configs_json_is_refused_on_resume(tmp_path, untrained_run, write_squares, capsys):
    data = write_squares(tmp_path / "data")
    run = _fake_multi(tmp_path, untrained_run)
    (run / "configs.json").write_text("{not json")
    assert main(["train", str(data), "--out", str(run), "--resume", "--device", "cpu", "--quiet"]) == 2
    assert "configs.json is not the record of 'useg train --configs'" in capsys.readouterr().err


def test_predict_and_export_of_a_multi_configuration_run_are_refused_where_they_cannot_work(
        tmp_path, untrained_run, write_squares, capsys):
    data = write_squares(tmp_path / "data")
    image = str(data / "images" / "c0.png")
    run = _fake_multi(tmp_path, untrained_run)
    out = ["--out", str(tmp_path / "p"), "--device", "cpu", "--quiet"]
    assert main(["predict", str(run), image, *out]) == 2
    assert "is a multi-configuration run whose training is not complete (no configuration.json)" in (
        capsys.readouterr().err)
    assert main(["predict", str(run), image, *out, "--configs", "2d,3d"]) == 2
    assert "predict --configs takes one configuration" in capsys.readouterr().err
    assert main(["predict", str(untrained_run), image, *out, "--configs", "2d"]) == 2
    assert "is not a multi-configuration run" in capsys.readouterr().err
    (run / "configuration.json").write_text('{"chosen": ["5d"]}')
    assert main(["predict", str(run), image, *out]) == 2
    assert "configuration.json is not a configuration record" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["export", str(run)]) == 2
    assert f"export one of its configurations instead: 'useg export {run / '2d'}'" in capsys.readouterr().err
    assert not list(run.rglob("*.onnx"))


def test_predict_configs_on_a_missing_run_names_the_missing_run(tmp_path, write_squares, capsys):
    """--configs on a folder that holds no run at all: the missing run is the cause, not --configs."""
    data = write_squares(tmp_path / "data")
    assert main(["predict", str(tmp_path / "nope"), str(data / "images"), "--out", str(tmp_path / "p"),
                 "--configs", "3d", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and "--configs" not in err
    assert not (tmp_path / "p").exists()
