"""Pairing images with masks by name: the rules of useg.pairing, the check's report of them, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from useg.check import check_dataset
from useg.cli import main
from useg.dataset import discover
from useg.errors import UsegError
from useg.pairing import MASK_STEM_SUFFIXES, Ambiguity, Pairing, compile_pattern, mask_stem, pair_stems
from useg.spec import DataSpec

TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2",
        "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]

# ------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("images, others, rule, pairs", [
    (["2", "1"], ["1", "2"], "same stem", {"2": "2", "1": "1"}),
    (["a", "b", "c"], ["a_mask", "b_Label", "c"], "mask suffix", {"a": "a_mask", "b": "b_Label", "c": "c"}),
    (["case7_img", "case8_img"], ["case7_label", "case8_label"], "shared affixes",
     {"case7_img": "case7_label", "case8_img": "case8_label"}),
    (["s01_raw", "s02_raw"], ["s01_gt", "s02_gt"], "shared affixes",
     {"s01_raw": "s01_gt", "s02_raw": "s02_gt"}),
    (["img_a", "img_b"], ["lab-a", "lab-b"], "shared affixes", {"img_a": "lab-a", "img_b": "lab-b"}),
    (["raw_a_v1", "raw_b_v1"], ["a", "b"], "shared affixes", {"raw_a_v1": "a", "raw_b_v1": "b"}),
    # DRIVE's names: the masks hold two numbers, the shared suffixes still pair them
    (["21_training", "22_training"], ["21_manual1", "22_manual1"], "shared affixes",
     {"21_training": "21_manual1", "22_training": "22_manual1"}),
    # an affix ends at a boundary: 1_img is not cut from case1_img, or case1 would be case11
    (["case1_img", "case11_img"], ["case1_label", "case11_label"], "shared affixes",
     {"case1_img": "case1_label", "case11_img": "case11_label"}),
    (["07_scan", "12_scan"], ["7_truth", "12_truth"], "number",
     {"07_scan": "7_truth", "12_scan": "12_truth"}),
    (["7"], ["07"], "number", {"7": "07"}),
    (["scan-3", "scan-10", "scan-2"], ["10x", "2y", "3z"], "number",
     {"scan-3": "3z", "scan-10": "10x", "scan-2": "2y"}),
])
def test_each_rule_pairs_its_names(images, others, rule, pairs):
    p = pair_stems(images, others)
    assert (p.rule, p.pairs) == (rule, pairs)
    assert list(p.pairs) == [s for s in images if s in pairs]  # image order
    assert p.unpaired_images == () and p.unpaired_others == () and p.ambiguous == ()


def test_the_first_rule_that_pairs_every_image_wins_else_the_one_that_pairs_most():
    # equal names win over the suffix rule even though the suffix rule would pair as many
    assert pair_stems(["1", "2"], ["1", "2", "1_mask"]).rule == "same stem"
    # the existing mixed folder: equal names and suffixes, one image and one mask without partner
    p = pair_stems(["1", "2", "10", "img3"], ["1", "10_mask", "img3_label", "7"])
    assert p == Pairing("mask suffix", {"1": "1", "10": "10_mask", "img3": "img3_label"}, ("2",), ("7",))
    # 12 of 20 masks pair by number: the number rule pairs the most, what is left is listed
    images = [f"{i:02d}_scan" for i in range(20)]
    masks = [f"{i}_truth" for i in range(12)] + [f"x{i}_truth" for i in range(30, 38)]
    p = pair_stems(images, masks)
    assert p.rule == "number" and len(p.pairs) == 12 and p.pairs["07_scan"] == "7_truth"
    assert p.unpaired_images == tuple(images[12:]) and p.unpaired_others == tuple(masks[12:])
    # nothing pairs: the first rule, everything listed
    p = pair_stems(["a", "b"], ["x", "y"])
    assert p == Pairing("same stem", {}, ("a", "b"), ("x", "y"))


def test_empty_sides():
    assert pair_stems([], ["a"]) == Pairing("same stem", {}, (), ("a",))
    assert pair_stems(["a"], []) == Pairing("same stem", {}, ("a",), ())
    with pytest.raises(ValueError, match="given twice"):
        pair_stems(["a", "a"], ["a"])


def test_ambiguity_is_reported_never_guessed():
    p = pair_stems(["a", "b"], ["a_mask", "a_seg", "b"])  # two masks for one image
    assert p.rule == "mask suffix" and p.pairs == {"b": "b"}
    assert p.ambiguous == (Ambiguity("a", ("a",), ("a_mask", "a_seg")),)
    assert p.unpaired_images == ("a",) and p.unpaired_others == ("a_mask", "a_seg")
    p = pair_stems(["a1", "b1", "c2"], ["1", "2"])  # a number that repeats among the images
    assert p.rule == "number" and p.pairs == {"c2": "2"}
    assert p.ambiguous == (Ambiguity("1", ("a1", "b1"), ("1",)),) and p.unpaired_others == ("1",)
    p = pair_stems(["1", "2"], ["x01", "y1", "z2"])  # ... and among the masks (01 is 1)
    assert p.pairs == {"2": "z2"} and p.ambiguous == (Ambiguity("1", ("1",), ("x01", "y1")),)
    assert pair_stems(["a1", "b1"], ["x1"]).ambiguous == (Ambiguity("1", ("a1", "b1"), ("x1",)),)


def test_names_with_no_or_two_numbers_do_not_pair_by_number():
    p = pair_stems(["t1_07", "t1_08", "scan"], ["7", "8", "9"])
    assert p.pairs == {} and p.unpaired_images == ("t1_07", "t1_08", "scan")


def test_patterns_override_every_rule():
    # equal names would pair a with a; the pattern says the masks are {stem}_seg
    p = pair_stems(["a", "b"], ["a", "b_seg"], other_pattern="{stem}_seg")
    assert p == Pairing("pattern", {"b": "b_seg"}, ("a",), ("a",))
    p = pair_stems(["p1_left", "p2_right"], ["p1_leftv2", "p2_rightv2"])
    assert p.pairs == {}  # no rule sees that v2 (no separator) is the masks' suffix
    p = pair_stems(["p1_left", "p2_right"], ["p1_leftv2", "p2_rightv2"], other_pattern="{stem}v2")
    assert p.pairs == {"p1_left": "p1_leftv2", "p2_right": "p2_rightv2"} and p.rule == "pattern"
    p = pair_stems(["img.a(1)", "img.b(1)"], ["a", "b"], image_pattern="img.{stem}(1)")
    assert p.pairs == {"img.a(1)": "a", "img.b(1)": "b"}  # the literal parts are not regular expressions
    p = pair_stems(["imgXa(1)"], ["a"], image_pattern="img.{stem}(1)")
    assert p.pairs == {} and p.unpaired_images == ("imgXa(1)",)
    assert pair_stems(["c7_img"], ["c7_label"], "{stem}_img", "{stem}_label").pairs == {"c7_img": "c7_label"}


@pytest.mark.parametrize("pattern", ["seg", "{stem}_{stem}", "{ stem }"])
def test_a_pattern_needs_stem_exactly_once(pattern):
    with pytest.raises(UsegError, match="exactly once"):
        pair_stems(["a"], ["a"], other_pattern=pattern)
    with pytest.raises(UsegError, match="exactly once"):
        compile_pattern(pattern)


def test_mask_stem_and_its_suffixes():
    assert MASK_STEM_SUFFIXES == ("_mask", "_label", "_labels", "_seg")
    stems = ("a_mask", "a_LABELS", "a_seg", "a", "_mask")
    assert [mask_stem(s) for s in stems] == ["a", "a", "a", "a", "_mask"]


# random names with a random shared affix per side pair back exactly

_BASES = st.lists(st.text(alphabet="ab01_-", min_size=1, max_size=6), min_size=1, max_size=8, unique=True)
_TAGS = st.tuples(st.sampled_from("_-."), st.text(alphabet="xyz", min_size=1, max_size=3))


def _affixed(base: str, tag: tuple[str, str], prefix: bool) -> str:
    sep, word = tag
    return f"{word}{sep}{base}" if prefix else f"{base}{sep}{word}"


@settings(max_examples=400, deadline=None)
@given(_BASES, _TAGS, _TAGS, st.booleans(), st.booleans(), st.randoms(use_true_random=False))
def test_random_names_with_shared_affixes_pair_back_exactly(bases, image_tag, mask_tag, image_prefix,
                                                             mask_prefix, random):
    images = [_affixed(b, image_tag, image_prefix) for b in bases]
    masks = [_affixed(b, mask_tag, mask_prefix) for b in bases]
    random.shuffle(masks)
    p = pair_stems(images, masks)
    expected = {_affixed(b, image_tag, image_prefix): _affixed(b, mask_tag, mask_prefix) for b in bases}
    assert p.pairs == expected
    assert p.unpaired_images == () and p.unpaired_others == () and p.ambiguous == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=12, unique=True), st.integers(0, 4),
       st.integers(0, 4))
def test_random_numbers_pair_back_whatever_their_padding(numbers, image_pad, mask_pad):
    images = [f"scan{n:0{image_pad}d}x" for n in numbers]
    masks = [f"gt_{n:0{mask_pad}d}" for n in reversed(numbers)]
    p = pair_stems(images, masks)
    assert p.pairs == {f"scan{n:0{image_pad}d}x": f"gt_{n:0{mask_pad}d}" for n in numbers}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab01_-xyz", min_size=1, max_size=6), max_size=8, unique=True),
       st.lists(st.text(alphabet="ab01_-xyz", min_size=1, max_size=6), max_size=8, unique=True))
def test_any_names_pair_one_to_one_and_account_for_every_name(images, others):
    p = pair_stems(images, others)
    assert len(set(p.pairs.values())) == len(p.pairs)  # never two images on one mask
    assert sorted([*p.pairs, *p.unpaired_images]) == sorted(images)
    assert sorted([*p.pairs.values(), *p.unpaired_others]) == sorted(others)
    for a in p.ambiguous:
        assert set(a.images) <= set(p.unpaired_images) and set(a.others) <= set(p.unpaired_others)
        assert len(a.images) + len(a.others) > 2


# ------------------------------------------------------------------------------- the check


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _folder(root, image_names, mask_names, shape=(16, 16)):
    m = np.zeros(shape, np.uint8)
    m[4:10, 4:10] = 255
    for n in image_names:
        _png(root / "images" / n, np.full(shape, 100, np.uint8))
    for n in mask_names:
        _png(root / "masks" / n, m)
    return root


def test_check_pairs_by_number_and_reports_the_rule(tmp_path):
    root = _folder(tmp_path, [f"{i:02d}_scan.png" for i in (7, 12, 3)], ["7_truth.png", "12_truth.png",
                                                                         "3_truth.png"])
    report = check_dataset(root)
    assert report.ok, report.problems
    assert [(c.name, c.mask.name) for c in report.cases] == [("03_scan", "3_truth.png"),
                                                             ("07_scan", "7_truth.png"),
                                                             ("12_scan", "12_truth.png")]
    assert report.info["pairing"] == "number" and report.info["files"] == {"images": 3, "masks": 3}
    assert report.stats["images/"] == "3 files"
    assert report.stats["masks/"] == "3 files, paired by number (03_scan.png with 3_truth.png)"
    assert [c.name for c in discover(root)] == ["03_scan", "07_scan", "12_scan"]  # the images' stems


def test_check_keeps_the_sentences_of_equal_names(tmp_path):
    root = _folder(tmp_path, ["a.png", "b.png"], ["a.png", "b.png"])
    report = check_dataset(root)
    assert report.ok and report.info["pairing"] == "same stem"
    assert report.stats["masks/"] == "2 files, paired by same stem"
    _png(root / "masks" / "a_mask.png", np.zeros((16, 16), np.uint8))
    assert check_dataset(root).problems == [f"{root / 'masks' / 'a_mask.png'} and a.png are both masks of "
                                            "'a'; keep one of them"]


def test_check_hints_when_a_folder_almost_pairs(tmp_path):
    images = [f"{i:02d}_scan.png" for i in range(20)]
    masks = [f"{i}_truth.png" for i in range(12)] + [f"v{i}_truth_2.png" for i in range(8)]
    report = check_dataset(_folder(tmp_path, images, masks))
    assert report.info["pairing"] == "number"
    assert report.problems[0].startswith(f"12 of 20 masks in {tmp_path / 'masks'} pair with an image by the "
                                         "one number in each name; name the other 8 the same way or give "
                                         "--mask-pattern")
    assert sum("has no mask in" in p for p in report.problems) == 8
    assert sum("has no image in" in p for p in report.problems) == 8
    assert any(p.startswith(str(tmp_path / "images" / "12_scan.png")) for p in report.problems)
    assert report.stats["masks/"] == "20 files, 12 paired by number (00_scan.png with 0_truth.png)"


def test_check_says_when_nothing_pairs(tmp_path):
    report = check_dataset(_folder(tmp_path, ["p1_left.png", "p2_right.png"], ["p1_leftv2.png",
                                                                              "p2_rightv2.png"]))
    assert report.problems[0].startswith(f"no mask in {tmp_path / 'masks'} pairs with an image")
    assert "--mask-pattern" in report.problems[0] and len(report.problems) == 5  # the hint and 4 files
    report = check_dataset(tmp_path, DataSpec(mask_pattern="{stem}v2"))
    assert report.ok, report.problems
    assert report.info["pairing"] == "pattern" and report.info["mask_pattern"] == "{stem}v2"
    assert report.stats["masks/"] == "2 files, paired by pattern (p1_left.png with p1_leftv2.png)"


def test_check_reports_ambiguity_and_patterns_that_match_nothing(tmp_path):
    root = _folder(tmp_path, ["a1.png", "b1.png", "c2.png"], ["m1.png", "m2.png"])
    problems = check_dataset(root).problems
    assert problems == [f"{root / 'images' / 'a1.png'} and b1.png pair with the same mask(s) m1.png by the "
                        "one number in each name; rename them or give --image-pattern and --mask-pattern"]
    problems = check_dataset(root, DataSpec(mask_pattern="{stem}_seg")).problems
    assert problems == [f"--mask-pattern '{{stem}}_seg' matches none of the 2 files in {root / 'masks'} "
                        "(such as m1.png); write their names with {stem} in place of the part they share "
                        "with their partners, like '{stem}_seg'"]
    problems = check_dataset(root, DataSpec(image_pattern="x{stem}")).problems
    assert len(problems) == 1 and problems[0].startswith("--image-pattern 'x{stem}' matches none of the 3")
    problems = check_dataset(root, DataSpec(mask_pattern="seg")).problems
    assert problems == ["--mask-pattern: the name pattern 'seg' must hold {stem} exactly once, like "
                        "'{stem}_seg' for case7_seg.png beside case7.tif"]


# ------------------------------------------------------------------------------- the CLI and the run


def test_cli_check_prints_channels_and_folders(tmp_path, capsys):
    root = _folder(tmp_path / "d", [f"{i:02d}_scan.png" for i in range(3)], [f"{i}_gt.png" for i in range(3)])
    assert main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 3 cases, 1 channel(s)" in out
    assert "images/: 3 files\n" in out
    assert "masks/: 3 files, paired by number (00_scan.png with 0_gt.png)" in out
    _png(root / "images" / "01_scan.png", np.zeros((16, 16, 3), np.uint8))
    assert main(["check", str(root)]) == 2
    assert f"{root}: 3 cases, channels differ (1, 3)" in capsys.readouterr().out
    for p in (root / "images").iterdir():
        p.write_bytes(b"not a png")
    assert main(["check", str(root)]) == 2
    assert f"{root}: 3 cases, channels unknown (no readable image)" in capsys.readouterr().out


def test_cli_patterns_reach_the_plan(tmp_path, capsys):
    root = _folder(tmp_path / "d", ["p1_left.png", "p2_right.png"], ["p1_leftv2.png", "p2_rightv2.png"],
                   shape=(32, 32))
    assert main(["check", str(root)]) == 2
    assert "--mask-pattern" in capsys.readouterr().err
    assert main(["check", str(root), "--mask-pattern", "{stem}v2"]) == 0
    assert "paired by pattern" in capsys.readouterr().out
    assert main(["plan", str(root), "--mask-pattern", "{stem}v2", "--json", "--device", "cpu",
                 "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert (data["pairing"], data["image_pattern"], data["mask_pattern"]) == ("pattern", None, "{stem}v2")
    assert main(["plan", str(root), "--image-pattern", "p{stem}", "--mask-pattern", "p{stem}v2", "--json",
                 "--quiet", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert (data["image_pattern"], data["mask_pattern"]) == ("p{stem}", "p{stem}v2")


def test_train_stores_the_rule_and_resume_reuses_the_patterns(cells_dir, tmp_path, capsys):
    from useg.plan import Plan

    data = tmp_path / "data"
    shutil.copytree(cells_dir, data)
    for i in range(6):  # cell_000.png ~ 0_truth.png: paired by number, predictions under the image's name
        (data / "masks" / f"cell_{i:03d}.png").rename(data / "masks" / f"{i}_truth.png")
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TINY]) == 0
    assert Plan.load(run / "plan.json").data.pairing == "number"
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"cell_{i:03d}" for i in range(6)]
    for i in range(6):  # now only the pattern pairs them
        (data / "masks" / f"{i}_truth.png").rename(data / "masks" / f"cell_{i:03d}7x.png")
    run2 = tmp_path / "run2"
    assert main(["train", str(data), "--out", str(run2), *TINY]) == 2
    assert main(["train", str(data), "--out", str(run2), "--mask-pattern", "{stem}7x", *TINY]) == 0
    d = Plan.load(run2 / "plan.json").data
    assert (d.pairing, d.mask_pattern) == ("pattern", "{stem}7x")
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(run2), "--resume", "--quiet"]) == 0  # the run's own pattern


def test_plan_files_without_the_pairing_fields_load_with_defaults():
    from useg.labels import LabelMap
    from useg.plan import DataConfig, ModelConfig, Plan

    plan = Plan(ModelConfig(), DataConfig(LabelMap((0, 255), "grey")))
    d = plan.to_dict()
    for key in ("pairing", "image_pattern", "mask_pattern"):
        del d["data"][key]
    loaded = Plan.from_dict(d)
    d = loaded.data
    assert (d.pairing, d.image_pattern, d.mask_pattern) == ("same stem", None, None)
    assert loaded == plan
