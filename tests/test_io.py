from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from useg import io
from useg.errors import UsegError
from useg.files import NIFTI_SUFFIXES, Image
from useg.io import read_image, read_mask, write_image, write_mask
from useg.labels import infer_label_map

PALETTE = tuple(int(v) for v in (np.arange(768) * 7) % 256)


RGB, ZYX = {"photometric": "rgb"}, {"metadata": {"axes": "ZYX"}, "photometric": "minisblack"}


@pytest.mark.parametrize("shape,kw,expect", [((11, 9), {}, (1, 11, 9)), ((11, 9, 3), RGB, (3, 11, 9)),
                                             ((11, 9, 4), RGB, (3, 11, 9)),
                                             ((2, 11, 9), {}, (2, 11, 9)), ((7, 11, 9), {}, (1, 7, 11, 9)),
                                             ((3, 11, 9), ZYX, (1, 3, 11, 9))])
def test_read_tiff_layouts(tmp_path, rng, shape, kw, expect):
    arr = rng.integers(0, 255, shape).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", arr, **kw)
    img = read_image(tmp_path / "a.tif")
    assert img.array.shape == expect and img.format == "tiff" and len(img.spacing) == len(expect) - 1
    first = (arr[..., 0] if kw.get("photometric") == "rgb"
             else arr if arr.ndim == 2 or expect[0] == 1 else arr[0])
    np.testing.assert_array_equal(img.array[0], first)


def test_spacing_from_tiff_png_and_imagej_kept_on_write(tmp_path):
    # TIFF resolution 2 px/cm across, 4 px/cm down -> (row, column) spacing (2.5, 5.0) mm
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 6), np.uint8), resolution=(2.0, 4.0), resolutionunit=3)
    img = read_image(tmp_path / "a.tif")
    assert img.spacing == pytest.approx((2.5, 5.0)) and img.meta["spacing_unit"] == "mm"
    for name in ("m.tif", "m.png"):
        write_mask(tmp_path / name, np.ones((8, 6), int), like=img)
    assert read_image(tmp_path / "m.tif").spacing == pytest.approx((2.5, 5.0))
    PILImage.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "d.png", dpi=(254, 127))
    img = read_image(tmp_path / "d.png")
    assert img.spacing == pytest.approx((0.2, 0.1))  # 25.4 mm / dpi, (row, column)
    write_mask(tmp_path / "dm.png", np.zeros((4, 5), int), like=img)
    assert read_image(tmp_path / "dm.png").spacing == pytest.approx((0.2, 0.1))
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 8, 6), np.uint8), imagej=True, resolution=(2.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 2.5, "unit": "um"})
    vol = read_image(tmp_path / "v.tif")
    assert vol.array.shape == (1, 3, 8, 6) and vol.spacing == pytest.approx((2.5e-3, 0.25e-3, 0.5e-3))
    write_mask(tmp_path / "vm.tif", np.ones((3, 8, 6), np.int64), like=vol)
    assert read_image(tmp_path / "vm.tif").spacing == pytest.approx(vol.spacing)
    assert read_mask(tmp_path / "vm.tif")[0].shape == (3, 8, 6)


def test_unreadable_files_name_the_file(tmp_path, monkeypatch):
    good = tmp_path / "g.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)).save(good)
    (tmp_path / "t.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(UsegError, match=r"cannot read .*t\.png: the file is truncated"):
        read_image(tmp_path / "t.png")
    (tmp_path / "x.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(UsegError, match=r"cannot read .*x\.tif"):
        read_image(tmp_path / "x.tif")
    (tmp_path / "n.png").write_bytes(b"not an image")
    with pytest.raises(UsegError, match=r"n\.png: it is not an image"):
        read_mask(tmp_path / "n.png")
    with pytest.raises(UsegError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "a.jp2").write_bytes(b"\x00\x00\x00\x0cjP  ")  # JPEG 2000: not in the table
    with pytest.raises(UsegError, match=r"a\.jp2 has an unsupported format"):
        read_image(tmp_path / "a.jp2")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px: a "bomb"
    with pytest.raises(UsegError, match=r"g\.png: it has more pixels than the limit"):
        read_image(good)


def test_mask_modes_and_refusals(tmp_path):
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(UsegError, match=r"m\.jpg is a JPEG mask.*PNG or TIFF"):
        read_mask(tmp_path / "m.jpg")
    grey_rgb = np.repeat(np.array([[0, 255], [255, 0]], np.uint8)[..., None], 3, axis=-1)
    PILImage.fromarray(grey_rgb).save(tmp_path / "g.png")
    raw, mode, pal = read_mask(tmp_path / "g.png")
    assert mode == "grey" and pal is None and raw.shape == (2, 2) and set(np.unique(raw)) == {0, 255}
    tifffile.imwrite(tmp_path / "c2.tif", np.zeros((2, 6, 7), np.uint8))
    with pytest.raises(UsegError, match=r"c2\.tif has 2 channels"):
        read_mask(tmp_path / "c2.tif")
    tifffile.imwrite(tmp_path / "f.tif", np.full((6, 7), 0.5, np.float32))
    with pytest.raises(UsegError, match=r"f\.tif holds non-integer"):
        read_mask(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "i.tif", np.full((6, 7), 2.0, np.float32))  # whole values stored as float
    assert read_mask(tmp_path / "i.tif")[0].max() == 2


def _mask_file(path, kind, rng):
    """A mask file in one encoding, written by Pillow / tifffile as a user's tool would."""
    if kind == "0/255":
        arr = (rng.random((10, 12)) > 0.5).astype(np.uint8) * 255
    elif kind == "ids":
        arr = rng.integers(0, 4, (10, 12)).astype(np.uint8)
    elif kind == "ids16":
        arr = (rng.integers(0, 3, (10, 12)) * 1000).astype(np.uint16)
    elif kind == "rgb":
        colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255]], np.uint8)
        arr = colours[rng.integers(0, 3, (10, 12))]
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr, photometric="rgb" if kind == "rgb" else "minisblack")
    elif kind == "palette":
        im = PILImage.fromarray(rng.integers(0, 3, (10, 12)).astype(np.uint8))
        im.putpalette(list(PALETTE))
        im.save(path)
    else:
        PILImage.fromarray(arr).save(path)


@pytest.mark.parametrize("suffix,kind",
                         [(s, k) for s in (".png", ".tif") for k in ("0/255", "ids", "ids16", "rgb")]
                         + [(".png", "palette")])
def test_label_encodings_round_trip_through_files(tmp_path, rng, suffix, kind):
    src = tmp_path / f"src{suffix}"
    _mask_file(src, kind, rng)
    raw, mode, pal = read_mask(src)
    assert mode == {"palette": "palette", "rgb": "rgb"}.get(kind, "grey")
    lm, problems = infer_label_map({src.name: set(np.unique(raw).tolist())}, mode, pal)
    assert not problems
    classes = lm.decode(raw, src)
    assert classes.dtype == np.int64 and classes.max() == lm.num_classes - 1
    out = write_mask(tmp_path / "out" / f"m{suffix}", classes, like=Image(np.zeros((1, 10, 12), np.uint8)),
                     label_map=lm)
    raw2, mode2, pal2 = read_mask(out)
    assert mode2 == mode and raw2.dtype.itemsize <= 4
    np.testing.assert_array_equal(raw2, raw)
    if kind == "palette":
        assert pal2 == PALETTE
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left behind


def test_write_mask_checks_and_is_atomic(tmp_path, monkeypatch):
    like = Image(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        write_mask(tmp_path / "m.png", np.zeros((4, 5), int), like=like)
    with pytest.raises(ValueError, match="use .png, .tif or .nii.gz"):
        write_mask(tmp_path / "m.jpg", np.zeros((4, 4), int), like=like)
    with pytest.raises(ValueError, match="integer"):
        write_mask(tmp_path / "m.png", np.zeros((4, 4), np.float32), like=like)
    assert list(tmp_path.iterdir()) == []
    write_mask(tmp_path / "big.png", np.full((4, 4), 300), like=like)  # > 255: 16-bit PNG
    assert read_mask(tmp_path / "big.png")[0].max() == 300
    (tmp_path / "big.png").unlink()

    def crash(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    write_mask(tmp_path / "old.png", np.zeros((4, 4), int), like=like)
    monkeypatch.setattr(PILImage.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_mask(tmp_path / "old.png", np.ones((4, 4), int), like=like)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]  # the previous file, intact
    assert read_mask(tmp_path / "old.png")[0].max() == 0


@pytest.mark.parametrize("suffix,shape,dtype", [
    (".png", (3, 5, 6), np.uint8), (".png", (1, 5, 6), np.uint16),
    (".tif", (2, 5, 6), np.float32), (".tif", (3, 5, 6), np.uint8),
    (".tif", (1, 4, 5, 6), np.int16), (".tif", (2, 3, 5, 6), np.float32)])
def test_write_image_round_trip(tmp_path, rng, suffix, shape, dtype):
    arr = (rng.random(shape) * 200).astype(dtype)
    write_image(tmp_path / f"a{suffix}", arr)
    back = read_image(tmp_path / f"a{suffix}")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, arr)
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix}"]


def test_write_image_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=".tif"):
        write_image(tmp_path / "a.png", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=".tif"):
        write_image(tmp_path / "a.png", np.zeros((1, 4, 4), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_the_format_table_is_the_single_source():
    assert io.IMAGE_SUFFIXES == frozenset(io.FORMATS)
    assert io.MASK_SUFFIXES <= io.IMAGE_SUFFIXES
    for suffix in io.IMAGE_SUFFIXES | io.MASK_SUFFIXES:
        assert isinstance(io.FORMATS[suffix], io.Format)
    for suffix in io.MASK_SUFFIXES:
        assert io.FORMATS[suffix].read_mask is not None
    # listed, so that JPEG and WebP masks are found and refused clearly
    assert {".jpg", ".jpeg", ".webp", ".gif", ".bmp"} <= io.MASK_SUFFIXES
    writable = {s for s, f in io.FORMATS.items() if f.write_mask is not None}
    assert writable == {".png", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
    assert NIFTI_SUFFIXES <= io.IMAGE_SUFFIXES


def test_a_new_table_entry_is_all_a_format_needs(tmp_path, monkeypatch):
    calls = []

    def read(path):
        calls.append(("image", path))
        return Image(np.full((1, 2, 3), 7, np.uint8), path=path, format="fake")

    def read_values(path):
        calls.append(("mask", path))
        return np.array([[0, 255], [255, 0]], np.uint8)[..., None].repeat(3, -1), "rgb", None

    def write(path, stored, like, label_map):
        calls.append(("write", stored.dtype.name))
        return path

    fake = io.Format("fake", read, read_values, write, None)
    monkeypatch.setattr(io, "FORMATS", {**io.FORMATS, ".fake": fake})
    img = read_image(tmp_path / "a.FAKE")
    assert img.format == "fake" and calls == [("image", tmp_path / "a.FAKE")]
    raw, mode, pal = read_mask(tmp_path / "m.fake")  # the shared finish: equal colour channels are grey
    assert mode == "grey" and raw.shape == (2, 2) and pal is None
    assert write_mask(tmp_path / "o.fake", np.ones((2, 3), int), like=img) == tmp_path / "o.fake"
    assert calls[-1] == ("write", "uint8")
    with pytest.raises(ValueError, match="cannot write an image as '.fake'"):
        write_image(tmp_path / "i.fake", np.zeros((1, 2, 3), np.uint8))


def test_dicom_folders_are_found_by_content_and_nifti_names_stay_nifti(tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(io, "DICOM_SERIES", io.Format("dicom", lambda p: read.append(p) or "series"))
    monkeypatch.setattr(io.volumes, "is_dicom_dir", lambda p: True)
    assert read_image(tmp_path / "series.png") == "series" and read == [tmp_path / "series.png"]
    with pytest.raises(UsegError, match="does not exist"):
        read_image(tmp_path / "vol.nii.gz")
