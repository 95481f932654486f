"""TIFF writing through the public write_tiff: layouts, resolution kept, atomic."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from useg.files import Image
from useg.io import read_image
from useg.tiff import write_tiff


@pytest.mark.parametrize("shape,rgb,like,expect", [((5, 6), False, None, (1, 5, 6)),
                                                   ((5, 6, 3), True, None, (3, 5, 6)),
                                                   ((2, 5, 6), False, None, (2, 5, 6)),
                                                   ((4, 5, 6), False, "volume", (1, 4, 5, 6)),
                                                   ((2, 4, 5, 6), False, None, (2, 4, 5, 6))])
def test_write_tiff_layouts_round_trip(tmp_path, rng, shape, rgb, like, expect):
    arr = rng.integers(0, 200, shape).astype(np.uint8)
    like_image = Image(np.zeros((1, 4, 5, 6), np.uint8)) if like == "volume" else None
    out = write_tiff(tmp_path / "a.tif", arr, like_image, rgb=rgb)
    assert out == tmp_path / "a.tif" and [p.name for p in tmp_path.iterdir()] == ["a.tif"]
    back = read_image(out)
    assert back.array.shape == expect
    np.testing.assert_array_equal(back.array, np.moveaxis(arr, -1, 0) if rgb else arr.reshape(expect))


def test_write_tiff_keeps_spacing_and_leaves_nothing_on_error(tmp_path, monkeypatch):
    like = Image(np.zeros((1, 3, 8, 6)), spacing=(2.0, 0.5, 0.25))  # mm, set by hand
    write_tiff(tmp_path / "v.tif", np.zeros((3, 8, 6), np.float32), like)
    assert read_image(tmp_path / "v.tif").spacing == pytest.approx((2.0, 0.5, 0.25))

    def crash(path, *a, **k):
        open(path, "wb").write(b"II*\x00half")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(tmp_path / "v.tif", np.ones((3, 8, 6), np.float32), like)
    assert [p.name for p in tmp_path.iterdir()] == ["v.tif"]  # the previous file, intact
