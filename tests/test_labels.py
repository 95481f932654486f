from __future__ import annotations

import json

import numpy as np
import pytest

from useg.errors import UsegError
from useg.labels import LabelMap, infer_label_map, label_map_of_masks, pack_rgb, plausible


def _binary_sets(n=5):
    return {f"masks/m{i}.png": {0, 255} for i in range(n)}


def test_binary_255_with_a_stray_value_is_reported():
    sets = _binary_sets()
    sets["masks/a.png"] = {0, 7, 255}
    lm, problems = infer_label_map(sets)
    assert lm.values == (0, 255) and lm.mode == "grey"
    assert len(problems) == 1
    assert problems[0].startswith("masks/a.png has mask values {7}") and "{0, 255}" in problems[0]
    assert "--labels" in problems[0]


@pytest.mark.parametrize("stray", [1, 5, 8, 15, 128])
def test_stray_values_that_fit_a_grid_are_still_caught(stray):
    # {0, 1, 255} or {0, 15, 255} are multiples of the smallest step but use a few of many levels
    sets = _binary_sets()
    sets["masks/a.png"] = {0, stray, 255}
    lm, problems = infer_label_map(sets)
    if stray == 128:  # 0/128/255 is a genuine 3-level grey encoding
        assert lm.values == (0, 128, 255) and not problems
    else:
        assert lm.values == (0, 255) and len(problems) == 1 and f"{{{stray}}}" in problems[0]


def test_ids_case_and_an_antialiased_file_adds_no_classes():
    sets = {f"m{i}": {0, 1, 2} for i in range(8)}
    sets["rare"] = {0, 1, 2, 3}  # a rare but genuine class in a clean file
    lm, problems = infer_label_map(sets)
    assert lm.values == (0, 1, 2, 3) and not problems
    sets["blurred"] = set(range(256))
    lm, problems = infer_label_map(sets)
    assert lm.values == (0, 1, 2, 3)
    assert len(problems) == 1 and problems[0].startswith("blurred has mask values {4, 5,")


@pytest.mark.parametrize("values", [{0, 1}, {0, 255}, {0, 1, 2, 5}, {0, 85, 170, 255}, {0, 64, 128, 192},
                                    {0, 127, 255}, {0, 63, 127, 191, 255}, {0, 85, 255}])
def test_plausible_encodings_are_accepted(values):
    lm, problems = infer_label_map({"a": values, "b": {0}, "c": set(values)})
    assert not problems and lm.values == tuple(sorted(values))


def test_even_greys_with_a_stray_value():
    sets = {f"m{i}": {0, 85, 170, 255} for i in range(4)}
    sets["x"] = {0, 85, 90, 170, 255}
    lm, problems = infer_label_map(sets)
    assert lm.values == (0, 85, 170, 255)
    assert len(problems) == 1 and problems[0].startswith("x has mask values {90}")


def test_palette_indices_are_plausible_up_to_32_of_256():
    pal = tuple(range(256)) * 3
    sets = {"a": {0, 1, 2}, "b": {0, 2, 200}}
    lm, problems = infer_label_map(sets, "palette", palette=pal)
    assert lm.values == (0, 1, 2, 200) and lm.mode == "palette" and lm.palette == pal and not problems
    assert plausible(set(range(21)) | {255}, "palette")  # PASCAL VOC: 21 classes and the 255 border
    # the grey rule for palettes too: a quantised photograph is no 58-class mask
    assert not plausible(set(range(58)), "palette") and not plausible(set(range(256)), "grey")
    lm, problems = infer_label_map({"a": set(range(58)), "b": set(range(58))}, "palette", palette=pal)
    assert len(problems) == 1 and problems[0].startswith("the masks share 58 distinct palette indices")


def test_rgb_colours():
    red, green, blue = 0xFF0000, 0x00FF00, 0x0000FF
    sets = {f"m{i}": {0, red, green} for i in range(4)}
    sets["odd"] = {0, red, green, blue}
    lm, problems = infer_label_map(sets, "rgb")
    assert lm.values == tuple(sorted({0, red, green, blue})) and not problems
    sets["jpeg_like"] = {0, red, green} | set(range(1, 40))  # 39 near-black colours
    lm, problems = infer_label_map(sets, "rgb")
    assert lm.values == tuple(sorted({0, red, green, blue}))
    assert len(problems) == 1 and problems[0].startswith("jpeg_like has mask values {#000001")


def test_grey_image_as_mask_is_reported():
    assert not plausible(set(range(0, 256, 3)) | {1}, "grey")
    lm, problems = infer_label_map({"a": set(range(200)), "b": {0, 255}, "c": {0, 255}})
    assert lm.values == (0, 255)
    assert len(problems) == 1 and problems[0].startswith("a has mask values")
    # every mask a grey image: nothing is rare, too many values is reported once
    lm, problems = infer_label_map({"a": set(range(100)), "b": set(range(100))})
    assert len(problems) == 1 and "100 distinct values" in problems[0]


def test_explicit_labels():
    lm, problems = infer_label_map({"a": {0, 255}, "b": {0, 128}}, explicit=[255, 0, 0])
    assert lm.values == (0, 255)
    assert len(problems) == 1 and problems[0].startswith("b has mask values {128} that are not in --labels")
    lm, problems = infer_label_map({"a": {0, 1}}, explicit=[0, 1, 2])  # a class absent from a subset is fine
    assert lm.values == (0, 1, 2) and not problems
    with pytest.raises(ValueError):
        infer_label_map({"a": {0}}, explicit=[])


@pytest.mark.parametrize("lm", [LabelMap((0, 255)), LabelMap((0, 1, 2), "palette", tuple(range(256)) * 3),
                                LabelMap((0, 0x00FF00, 0xFF0000), "rgb"), LabelMap((0, 1000)),
                                LabelMap((-1, 0, 3))])
def test_decode_encode_round_trip(lm, rng):
    classes = rng.integers(0, lm.num_classes, (7, 9))
    stored = lm.encode(classes)
    if lm.mode == "rgb":
        assert stored.shape == (7, 9, 3) and stored.dtype == np.uint8
        np.testing.assert_array_equal(lm.decode(stored), classes)  # colours are packed on decode
        stored = pack_rgb(stored)
    else:
        expect = np.int32 if min(lm.values) < 0 else np.uint8 if max(lm.values) <= 255 else np.uint16
        assert stored.dtype == expect
    np.testing.assert_array_equal(lm.decode(stored), classes)
    again = LabelMap.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert again == lm and hash(again) == hash(lm)


def test_decode_names_file_values_and_fix():
    with pytest.raises(UsegError, match=r"masks/x.png has mask values \{3\} outside .*--labels"):
        LabelMap((0, 255)).decode(np.array([[0, 3], [255, 0]]), path="masks/x.png")
    with pytest.raises(UsegError, match=r"\{#0000ff\}"):
        LabelMap((0, 0xFF0000), "rgb").decode(np.array([0, 0xFF, 0xFF0000]))


@pytest.mark.parametrize("bad", [{"values": (255, 0)}, {"values": ()}, {"values": (0, 0)},
                                 {"values": (0, 1), "mode": "hsv"}, {"values": (0, 300), "mode": "palette"},
                                 {"values": (0, 1), "mode": "palette", "palette": (0,) * 10}])
def test_label_map_validation(bad):
    with pytest.raises(ValueError):
        LabelMap(**bad)


def test_encode_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="class indices"):
        LabelMap((0, 255)).encode(np.array([2]))
    with pytest.raises(ValueError):
        LabelMap((0, 255)).encode(np.array([0.5]))


def test_nested_regions_write_their_innermost_class():
    from useg.labels import region_classes, regions_to_labels

    brats = ((1, 2, 3, 4), (1, 3, 4), (4,))
    assert region_classes(brats) == [2, 1, 4]
    probs = np.zeros((3, 2, 3))
    probs[0] = 0.9  # everything is whole tumour
    probs[1, 0] = 0.7  # first row is core
    probs[2, 0, 0] = 0.6  # one voxel enhancing
    np.testing.assert_array_equal(regions_to_labels(probs, brats), [[4, 1, 1], [2, 2, 2]])
    with pytest.raises(ValueError, match="outer to inner"):
        region_classes(((4,), (1, 3, 4), (1, 4)))


def test_label_map_of_masks_majority_mode_palettes_and_one_class():
    grey = {"a.png": {0, 255}, "b.png": {0, 255}, "c.png": {0, 1}}
    modes = {"a.png": "grey", "b.png": "grey", "c.png": "palette"}
    lm, problems = label_map_of_masks(grey, modes, {"c.png": (0,) * 768})
    assert lm == LabelMap((0, 255)) and problems == [
        "c.png is a palette mask but most masks are grey; save all masks the same way"]
    # a tie goes to the mode seen first
    lm, problems = label_map_of_masks({"x": {0, 1}, "y": {0, 1}}, {"x": "palette", "y": "grey"},
                                      {"x": tuple(range(768))})
    assert lm.mode == "palette" and lm.palette == tuple(range(768)) and len(problems) == 1
    # palette masks whose palettes give a used index different colours
    red, blue = (0, 0, 0, 255, 0, 0) + (0,) * 762, (0, 0, 0, 0, 0, 255) + (0,) * 762
    lm, problems = label_map_of_masks({"p": {0, 1}, "q": {0, 1}}, {"p": "palette", "q": "palette"},
                                      {"p": red, "q": blue})
    assert lm.palette == red and len(problems) == 1 and problems[0].startswith("q gives palette indices [1]")
    _, problems = label_map_of_masks({"m": {3}}, {"m": "grey"}, folder="data/masks")
    assert problems == ["every mask in data/masks holds only the value 3; a segmentation needs at least two "
                        "classes, check the masks or pass --labels"]
    _, problems = label_map_of_masks({"m": {0, 9}}, {"m": "grey"}, explicit=[0, 1])
    assert len(problems) == 1 and "not in --labels" in problems[0]
    with pytest.raises(ValueError, match="at least one mask"):
        label_map_of_masks({}, {})
