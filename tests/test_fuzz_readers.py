"""Fuzzing the readers: any bytes give an image or a UsegError naming the file, never a traceback."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from useg.errors import UsegError
from useg.io import read_image, read_mask

pytestmark = pytest.mark.filterwarnings("ignore")


def _valid_png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _valid_tiff(arr: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


SEEDS = [_valid_png(np.arange(64, dtype=np.uint8).reshape(8, 8)),
         _valid_tiff(np.arange(64, dtype=np.uint16).reshape(8, 8)),
         _valid_png(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, "GIF"),
         _valid_tiff(np.arange(256, dtype=np.uint16).reshape(16, 16), compression="lzw")]
SUFFIXES = [".png", ".tif", ".gif", ".tif"]


@st.composite
def damaged(draw):
    """A valid file with bytes flipped, cut or appended, or random bytes."""
    kind = draw(st.sampled_from(["flip", "cut", "random"]))
    which = draw(st.integers(0, len(SEEDS) - 1))
    data = bytearray(SEEDS[which])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    return bytes(data), SUFFIXES[which]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=damaged())
def test_readers_never_crash(tmp_path, sample):
    data, suffix = sample
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    for reader in (read_image, read_mask):
        try:
            out = reader(path)
        except UsegError as e:
            assert "fuzz" in str(e)
        else:
            arr = out.array if hasattr(out, "array") else out[0]
            assert isinstance(arr, np.ndarray)
