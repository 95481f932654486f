"""Reading cases into arrays and normalising them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.dataset import discover
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.preprocess import load_arrays, load_case, normalize


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _one_case(root, shape=(12, 10)):
    _write(root / "images" / "a.png", np.full(shape, 100, np.uint8))
    m = np.zeros(shape, np.uint8)
    m[2:6, 3:7] = 255
    _write(root / "masks" / "a.png", m)
    return root


def test_load_case(tmp_path):
    case = discover(_one_case(tmp_path))[0]
    image, labels = load_case(case, LabelMap((0, 255)))
    assert image.dtype == np.float32 and image.shape == (1, 12, 10)
    assert labels.dtype == np.int64 and labels.sum() == 16
    assert load_case(case, None)[1] is None
    with pytest.raises(UsegError, match=r"a\.png has mask values \{255\}"):
        load_case(case, LabelMap((0, 1)))
    images, labels = load_arrays([case], LabelMap((0, 255)))
    assert images[0].max() == 0 and labels[0].sum() == 16  # a constant image z-scores to 0


def test_normalize():
    x = np.random.default_rng(0).normal(5, 3, (2, 9, 11)).astype(np.float32)
    x[1] *= 10
    z = normalize(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-4)
    assert normalize(np.ones((1, 3, 3))).max() == 0  # constant image: no division by zero
    np.testing.assert_array_equal(normalize(x, "none"), x)
    with pytest.raises(ValueError):
        normalize(x, "minmax")
