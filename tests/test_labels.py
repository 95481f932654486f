from __future__ import annotations

import numpy as np
import pytest

from useg.errors import UsegError
from useg.labels import LabelMap, infer_label_map, plausible


def test_binary_255_with_a_stray_value_is_reported():
    sets = {f"m{i}.png": {0, 255} for i in range(5)}
    sets["m3.png"] = {0, 7, 255}
    lm, problems = infer_label_map(sets)
    assert lm.values == (0, 255)
    assert len(problems) == 1 and "m3.png" in problems[0] and "{7}" in problems[0]


@pytest.mark.parametrize("values", [{0, 1}, {0, 255}, {0, 1, 2, 5}, {0, 85, 170, 255}, {0, 64, 128, 192}])
def test_plausible_encodings_are_accepted(values):
    lm, problems = infer_label_map({"a": values, "b": {0}})
    assert not problems and lm.values == tuple(sorted(values))


def test_grey_image_as_mask_is_not_plausible():
    assert not plausible(set(range(0, 256, 3)) | {1}, "grey")
    lm, problems = infer_label_map({"a": set(range(200)), "b": {0, 255}, "c": {0, 255}})
    assert problems and "a" in problems[0]


def test_explicit_labels():
    lm, problems = infer_label_map({"a": {0, 255}, "b": {0, 128}}, explicit=[0, 255])
    assert lm.values == (0, 255)
    assert len(problems) == 1 and problems[0].startswith("b has mask values {128}")


@pytest.mark.parametrize("lm", [LabelMap((0, 255)), LabelMap((0, 1, 2), "palette", tuple(range(768))),
                                LabelMap((0, 0x00FF00, 0xFF0000), "rgb"), LabelMap((0, 1000))])
def test_decode_encode_round_trip(lm, rng):
    classes = rng.integers(0, lm.num_classes, (7, 9))
    stored = lm.encode(classes)
    if lm.mode == "rgb":
        assert stored.shape == (7, 9, 3) and stored.dtype == np.uint8
        stored = (stored[..., 0].astype(np.int64) << 16) | (stored[..., 1].astype(np.int64) << 8) | stored[..., 2]
    else:
        assert stored.dtype == (np.uint8 if max(lm.values) <= 255 else np.uint16)
    np.testing.assert_array_equal(lm.decode(stored), classes)
    assert LabelMap.from_dict(lm.to_dict()) == lm


def test_decode_names_file_and_values():
    with pytest.raises(UsegError, match=r"masks/x.png has mask values \{3\}"):
        LabelMap((0, 255)).decode(np.array([[0, 3], [255, 0]]), path="masks/x.png")
    with pytest.raises(ValueError):
        LabelMap((0, 255)).encode(np.array([2]))
    with pytest.raises(ValueError):
        LabelMap((255, 0))
