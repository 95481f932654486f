"""Tests for useg.raster: Pillow's formats read channels first, palettes as colours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.io import read_image


@pytest.mark.parametrize("mode,shape,channels", [("L", (13, 17), 1), ("RGB", (13, 17, 3), 3),
                                                 ("RGBA", (13, 17, 4), 3), ("I;16", (13, 17), 1),
                                                 ("LA", (13, 17, 2), 1)])
def test_read_png_channels_first(tmp_path, rng, mode, shape, channels):
    dtype = np.uint16 if mode == "I;16" else np.uint8
    arr = rng.integers(0, 200, shape).astype(dtype)
    PILImage.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.array.shape == (channels, 13, 17) and img.spatial_shape == (13, 17)
    assert img.array.dtype == dtype and img.dims == 2 and img.channels == channels
    assert img.spacing == (1.0, 1.0) and img.affine is None and img.format == "png"
    np.testing.assert_array_equal(img.array[0], arr if arr.ndim == 2 else arr[..., 0])


def test_palette_png_image_becomes_rgb(tmp_path):
    im = PILImage.fromarray(np.array([[0, 1], [2, 1]], np.uint8))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    im.save(tmp_path / "p.png")
    arr = read_image(tmp_path / "p.png").array
    assert arr.shape == (3, 2, 2)
    np.testing.assert_array_equal(arr[:, 0, 1], [255, 0, 0])
