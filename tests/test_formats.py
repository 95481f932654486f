"""Every format as its own library writes it (tifffile, Pillow), read back through useg: pixels and geometry.

TIFF in each compression, tiled and BigTIFF, 8/16/32-bit integers and floats, multi-page files,
ImageJ hyperstacks and OME-TIFF; GIF, WebP, BMP and 16-bit PNG through Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from PIL import features

from useg.dataset import Case
from useg.errors import UsegError
from useg.files import Image
from useg.io import channel_count, read_image, read_mask, write_mask
from useg.labels import infer_label_map
from useg.writing import output_paths

COMPRESSIONS = ["lzw", "zlib", 32946, "packbits", "zstd", "lzma"]  # zlib: Adobe Deflate (8); 32946: Deflate
DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.float32]


def _values(rng, shape, dtype):
    if np.issubdtype(dtype, np.floating):
        return rng.normal(0, 100, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiff_compressions_read_exactly(tmp_path, rng, compression, dtype):
    arr = _values(rng, (19, 23), dtype)
    tifffile.imwrite(tmp_path / "a.tif", arr, compression=compression)
    assert tifffile.TiffFile(tmp_path / "a.tif").pages[0].compression != 1
    img = read_image(tmp_path / "a.tif")
    assert img.array.shape == (1, 19, 23) and img.array.dtype == dtype
    np.testing.assert_array_equal(img.array[0], arr)
    if not np.issubdtype(dtype, np.floating) and dtype != np.uint32:  # masks: whole values, as they are
        raw, mode, _ = read_mask(tmp_path / "a.tif")
        assert mode == "grey"
        np.testing.assert_array_equal(raw, arr)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd"])
@pytest.mark.parametrize("shape", [(5, 17, 13), (1, 9, 31)])  # odd sizes, one slice
def test_compressed_stacks_are_volumes(tmp_path, rng, compression, shape):
    arr = _values(rng, shape, np.uint16)
    tifffile.imwrite(tmp_path / "v.tif", arr, compression=compression, metadata={"axes": "ZYX"})
    img = read_image(tmp_path / "v.tif")
    assert img.array.shape == (1, *shape) and img.dims == 3
    np.testing.assert_array_equal(img.array[0], arr)


@pytest.mark.parametrize("kw", [{"tile": (16, 16)}, {"bigtiff": True},
                                {"tile": (16, 32), "bigtiff": True, "compression": "zlib"},
                                {"compression": "lzw", "predictor": True},
                                {"compression": "zlib", "predictor": True, "tile": (16, 16)}])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiled_bigtiff_and_predictors(tmp_path, rng, kw, dtype):
    arr = _values(rng, (37, 21), dtype)
    tifffile.imwrite(tmp_path / "t.tif", arr, **kw)
    with tifffile.TiffFile(tmp_path / "t.tif") as tif:
        assert tif.is_bigtiff == kw.get("bigtiff", False) and tif.pages[0].is_tiled == ("tile" in kw)
    np.testing.assert_array_equal(read_image(tmp_path / "t.tif").array[0], arr)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "packbits", "zstd"])
def test_rgb_tiffs_as_scanners_write_them(tmp_path, rng, compression):
    arr = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", arr, photometric="rgb", compression=compression)
    img = read_image(tmp_path / "rgb.tif")
    assert img.array.shape == (3, 23, 17) and channel_count(tmp_path / "rgb.tif") == 3
    np.testing.assert_array_equal(img.array, np.moveaxis(arr, -1, 0))


@pytest.mark.parametrize("photometric,shape", [("minisblack", (24, 32)), ("rgb", (24, 32, 3))])
def test_jpeg_tiff_reads_close_and_is_refused_as_a_mask(tmp_path, photometric, shape):
    yy, xx = np.mgrid[0:24, 0:32]
    smooth = (100 + 60 * np.sin(yy / 6.0) * np.cos(xx / 7.0)).astype(np.uint8)
    arr = smooth if len(shape) == 2 else np.stack([smooth, smooth // 2, 255 - smooth], axis=-1)
    tifffile.imwrite(tmp_path / "j.tif", arr, photometric=photometric, compression="jpeg")
    img = read_image(tmp_path / "j.tif")
    expect = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    assert img.array.shape == expect.shape and img.array.dtype == np.uint8
    assert np.abs(img.array.astype(int) - expect).mean() < 4  # lossy, but close
    with pytest.raises(UsegError, match=r"j\.tif is a JPEG-compressed TIFF mask; lossy JPEG compression "
                                        r"changes label values, save masks as PNG or TIFF"):
        read_mask(tmp_path / "j.tif")


def test_multi_page_tiffs_are_volumes(tmp_path, rng):
    pages = _values(rng, (4, 11, 13), np.uint16)
    with tifffile.TiffWriter(tmp_path / "generic.tif") as tw:  # as a scanner writes pages: no metadata
        for page in pages:
            tw.write(page, metadata=None, compression="lzw")
    for page in pages:  # page by page with tifffile's metadata: each page a series of its own
        tifffile.imwrite(tmp_path / "appended.tif", page, append=True)
    assert len(tifffile.TiffFile(tmp_path / "appended.tif").series) == 4
    for name in ("generic.tif", "appended.tif"):
        img = read_image(tmp_path / name)
        assert img.array.shape == (1, 4, 11, 13), name
        np.testing.assert_array_equal(img.array[0], pages)
        assert read_mask(tmp_path / name)[0].shape == (4, 11, 13)


@pytest.mark.parametrize("unit,factor", [("um", 1e-3), ("micron", 1e-3), ("nm", 1e-6), ("mm", 1.0)])
def test_imagej_hyperstacks_are_channels_and_z_with_spacing(tmp_path, rng, unit, factor):
    data = _values(rng, (5, 2, 9, 7), np.uint16)  # ImageJ's order: Z, C, Y, X
    tifffile.imwrite(tmp_path / "h.tif", data, imagej=True, resolution=(2.0, 4.0), compression="zlib",
                     metadata={"axes": "ZCYX", "spacing": 2.5, "unit": unit})
    img = read_image(tmp_path / "h.tif")
    assert img.array.shape == (2, 5, 9, 7) and img.dims == 3
    np.testing.assert_array_equal(img.array, np.swapaxes(data, 0, 1))
    assert img.spacing == pytest.approx((2.5 * factor, 0.25 * factor, 0.5 * factor))
    out = write_mask(tmp_path / "m.tif", np.ones((5, 9, 7), np.int64), like=img)
    assert read_image(out).spacing == pytest.approx(img.spacing)  # the mask keeps the image's geometry


def test_imagej_rgb_stack_is_three_channels(tmp_path, rng):
    data = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)  # Z, Y, X, RGB
    tifffile.imwrite(tmp_path / "rgb.tif", data, imagej=True, photometric="rgb",
                     metadata={"axes": "ZYXS", "spacing": 3.0, "unit": "um"})
    img = read_image(tmp_path / "rgb.tif")
    assert img.array.shape == (3, 3, 9, 7) and img.spacing[0] == pytest.approx(3e-3)
    np.testing.assert_array_equal(img.array, np.moveaxis(data, -1, 0))


@pytest.mark.parametrize("axes,shape", [("ZYX", (4, 10, 12)), ("YX", (10, 12)), ("CZYX", (2, 4, 10, 12))])
def test_ome_tiff_physical_sizes_are_the_spacing(tmp_path, rng, axes, shape):
    data = _values(rng, shape, np.uint16)
    md = {"axes": axes, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "\u00b5m",
          "PhysicalSizeYUnit": "\u00b5m"}
    if "Z" in axes:
        md.update(PhysicalSizeZ=2.0, PhysicalSizeZUnit="\u00b5m")
    tifffile.imwrite(tmp_path / "o.ome.tif", data, ome=True, metadata=md, compression="zlib")
    assert tifffile.TiffFile(tmp_path / "o.ome.tif").is_ome
    img = read_image(tmp_path / "o.ome.tif")
    spacing = (2e-3, 0.25e-3, 0.5e-3) if "Z" in axes else (0.25e-3, 0.5e-3)
    assert img.spacing == pytest.approx(spacing) and img.meta["spacing_unit"] == "mm"
    assert img.array.shape == ((2, *shape[1:]) if axes == "CZYX" else (1, *shape))
    out = write_mask(tmp_path / "m.tif", np.zeros(img.spatial_shape, np.int64), like=img)
    assert read_image(out).spacing == pytest.approx(spacing)


def test_ome_units_other_than_microns(tmp_path):
    md = {"axes": "YX", "PhysicalSizeX": 500.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.002,
          "PhysicalSizeYUnit": "mm"}
    tifffile.imwrite(tmp_path / "n.ome.tif", np.zeros((6, 8), np.uint8), ome=True, metadata=md)
    assert read_image(tmp_path / "n.ome.tif").spacing == pytest.approx((0.002, 5e-4))


# --- Pillow: GIF, WebP, BMP, 16-bit PNG ---

def _palette_image(indices: np.ndarray) -> PILImage.Image:
    im = PILImage.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 255] + [0] * 759)
    return im


@pytest.mark.parametrize("shape", [(13, 17), (32, 9)])
def test_gif_palette_masks_decode_to_their_classes(tmp_path, rng, shape):
    classes = rng.integers(0, 3, shape)
    _palette_image(classes).save(tmp_path / "m.gif")
    raw, mode, pal = read_mask(tmp_path / "m.gif")
    assert raw.shape == shape
    lm, problems = infer_label_map({"m.gif": set(np.unique(raw).tolist())}, mode, pal)
    assert not problems and lm.num_classes == 3
    decoded = lm.decode(raw, tmp_path / "m.gif")
    # the palette's order decides the class order: black, red, blue
    np.testing.assert_array_equal(decoded, classes)


def test_grey_gif_masks_and_the_first_frame_only(tmp_path, rng):
    truth = (rng.random((20, 24)) > 0.5).astype(np.uint8) * 255
    first = PILImage.fromarray(truth)
    later = PILImage.fromarray(255 - truth)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[later])
    assert PILImage.open(tmp_path / "anim.gif").n_frames == 2
    raw, mode, pal = read_mask(tmp_path / "anim.gif")
    lm, problems = infer_label_map({"anim.gif": set(np.unique(raw).tolist())}, mode, pal)
    assert not problems and lm.num_classes == 2
    np.testing.assert_array_equal(lm.decode(raw, tmp_path / "anim.gif"), truth > 0)
    img = read_image(tmp_path / "anim.gif")
    assert img.format == "gif" and img.spatial_shape == (20, 24)
    np.testing.assert_array_equal(img.array[0] > 127, truth > 0)  # the first frame, not the second


def test_gif_images_are_colour_and_predictions_become_png(tmp_path, rng):
    classes = rng.integers(0, 3, (12, 10))
    _palette_image(classes).save(tmp_path / "c.gif")
    img = read_image(tmp_path / "c.gif")
    assert img.array.shape == (3, 12, 10) and channel_count(tmp_path / "c.gif") == 3
    np.testing.assert_array_equal(img.array[0], np.where(classes == 1, 255, 0))
    cases = [Case("c", tmp_path / "c.gif"), Case("w", tmp_path / "w.webp"), Case("b", tmp_path / "b.bmp")]
    assert [p.name for p in output_paths(cases, tmp_path / "o", False, False)] == ["c.png", "w.png", "b.png"]


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
@pytest.mark.parametrize("shape", [(13, 17, 3), (8, 30, 4)])
def test_webp_images_read_and_webp_masks_are_refused(tmp_path, rng, shape):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    PILImage.fromarray(arr).save(tmp_path / "a.webp", lossless=True, exact=True)
    img = read_image(tmp_path / "a.webp")
    assert img.array.shape == (3, *shape[:2]) and img.format == "webp"
    np.testing.assert_array_equal(img.array, np.moveaxis(arr[..., :3], -1, 0))
    with pytest.raises(UsegError, match=r"a\.webp is a WebP mask; lossy WebP compression changes label"):
        read_mask(tmp_path / "a.webp")


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1"])
def test_bmp_images_and_masks(tmp_path, rng, mode):
    classes = rng.integers(0, 2 if mode == "1" else 3, (11, 15))
    if mode == "P":
        im = _palette_image(classes)
    elif mode == "1":
        im = PILImage.fromarray((classes * 255).astype(np.uint8)).convert("1")
    else:
        grey = (classes * 100).astype(np.uint8)
        im = PILImage.fromarray(grey if mode == "L" else np.stack([grey, grey // 2, grey], -1))
    im.save(tmp_path / "a.bmp")
    img = read_image(tmp_path / "a.bmp")
    assert img.format == "bmp" and img.spatial_shape == (11, 15)
    assert img.channels == channel_count(tmp_path / "a.bmp") == (3 if mode in ("RGB", "P") else 1)
    raw, mmode, pal = read_mask(tmp_path / "a.bmp")
    lm, problems = infer_label_map({"a.bmp": set(np.unique(raw).tolist())}, mmode, pal)
    assert not problems
    np.testing.assert_array_equal(lm.decode(raw, tmp_path / "a.bmp"), classes)


@pytest.mark.parametrize("shape", [(9, 14), (31, 7)])
def test_16_bit_png_images_and_masks_keep_values_above_255(tmp_path, rng, shape):
    arr = rng.integers(0, 65536, shape).astype(np.uint16)
    arr.flat[0], arr.flat[1] = 65535, 256
    PILImage.fromarray(arr).save(tmp_path / "i.png")
    img = read_image(tmp_path / "i.png")
    assert img.array.dtype == np.uint16 and img.channels == 1
    np.testing.assert_array_equal(img.array[0], arr)
    labels = np.zeros(shape, np.uint16)
    labels[: shape[0] // 2] = 40000
    labels[-1, -1] = 300
    PILImage.fromarray(labels).save(tmp_path / "m.png")
    raw, mode, _ = read_mask(tmp_path / "m.png")
    assert mode == "grey"
    np.testing.assert_array_equal(raw, labels)
    lm, problems = infer_label_map({"m.png": set(np.unique(raw).tolist())}, mode, None)
    assert not problems and lm.num_classes == 3
    out = write_mask(tmp_path / "o" / "m.png", lm.decode(raw, Path("m.png")), like=img, label_map=lm)
    np.testing.assert_array_equal(read_mask(out)[0], labels)  # written back as 16-bit, values exact
    out = write_mask(tmp_path / "o" / "ids.png", labels.astype(np.int64), like=Image(np.zeros((1, *shape))))
    np.testing.assert_array_equal(read_mask(out)[0], labels)
