from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from useg.errors import UsegError
from useg.io import Image, atomic_path, read_image, read_mask, write_image, write_mask
from useg.labels import LabelMap


@pytest.mark.parametrize("mode,shape,channels", [("L", (13, 17), 1), ("RGB", (13, 17, 3), 3),
                                                 ("RGBA", (13, 17, 4), 3), ("I;16", (13, 17), 1)])
def test_read_png_channels_first(tmp_path, rng, mode, shape, channels):
    dtype = np.uint16 if mode == "I;16" else np.uint8
    arr = rng.integers(0, 200, shape).astype(dtype)
    PILImage.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.array.shape == (channels, 13, 17) and img.spatial_shape == (13, 17)
    assert img.array.dtype == dtype
    first = arr if arr.ndim == 2 else arr[..., 0]
    np.testing.assert_array_equal(img.array[0], first)


@pytest.mark.parametrize("shape,expect", [((11, 9), (1, 11, 9)), ((11, 9, 3), (3, 11, 9)),
                                          ((2, 11, 9), (2, 11, 9)), ((7, 11, 9), (1, 7, 11, 9))])
def test_read_tiff_layouts(tmp_path, rng, shape, expect):
    arr = rng.random(shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    img = read_image(tmp_path / "a.tif")
    assert img.array.shape == expect and img.format == "tiff"


def test_tiff_spacing_kept_on_write(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 6), np.uint8), resolution=(2.0, 4.0), resolutionunit=3)
    img = read_image(tmp_path / "a.tif")
    assert img.spacing == pytest.approx((0.25, 0.5))
    write_mask(tmp_path / "m.tif", np.ones((8, 6), int), like=img)
    assert read_image(tmp_path / "m.tif").spacing == pytest.approx((0.25, 0.5))


def test_unreadable_files_name_the_file(tmp_path):
    good = tmp_path / "g.png"
    PILImage.fromarray(np.zeros((64, 64), np.uint8)).save(good)
    (tmp_path / "t.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(UsegError, match="t.png"):
        read_image(tmp_path / "t.png")
    (tmp_path / "x.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(UsegError, match="x.tif"):
        read_image(tmp_path / "x.tif")
    with pytest.raises(UsegError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UsegError, match="unsupported"):
        read_image(tmp_path / "a.gifx")


def test_jpeg_masks_refused(tmp_path):
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(UsegError, match="JPEG"):
        read_mask(tmp_path / "m.jpg")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("lm", [LabelMap((0, 255)), LabelMap((0, 1, 2)), LabelMap((0, 40, 1000)),
                                LabelMap((0, 3, 9), "palette", tuple(np.arange(768) % 256)),
                                LabelMap((0x000000, 0x00FF00, 0xFF0080), "rgb")])
def test_mask_encodings_round_trip_through_files(tmp_path, rng, suffix, lm):
    if lm.mode == "palette" and suffix == ".tif":
        pytest.skip("palette masks are PNG")
    like = Image(np.zeros((1, 10, 12), np.uint8))
    classes = rng.integers(0, lm.num_classes, (10, 12))
    path = write_mask(tmp_path / f"m{suffix}", classes, like=like, label_map=lm)
    raw, mode, palette = read_mask(path)
    assert mode == lm.mode
    if lm.mode == "palette":
        assert palette[:9] == lm.palette[:9]
    np.testing.assert_array_equal(lm.decode(raw, path), classes)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_mask_checks_shape_and_is_atomic(tmp_path):
    like = Image(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        write_mask(tmp_path / "m.png", np.zeros((4, 5), int), like=like)
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.xyz", np.zeros((4, 4), int), like=like)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_write_image_round_trip(tmp_path, rng):
    arr = rng.integers(0, 255, (3, 5, 6)).astype(np.uint8)
    write_image(tmp_path / "a.png", arr)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").array, arr)
