"""Regions of interest (--roi) and nnU-Net's ignore label: pixels outside count nowhere.

Tiny data generated here: images with a disc-shaped field of view (fundus style), ROI masks
written with Pillow (2D) or tifffile (3D stacks) and read back through useg.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image as PILImage

from useg.augment import AugmentConfig, augment_sample
from useg.check import check_dataset
from useg.cli import main
from useg.dataset import discover
from useg.errors import UsegError
from useg.evaluate import evaluate_folders
from useg.labels import LabelMap
from useg.losses import KINDS, SegLoss
from useg.nnunet_raw import read_dataset_json
from useg.pairing import pair_stems
from useg.patches import PatchDataset
from useg.plan import Plan
from useg.planner import make_plan
from useg.preprocess import load_case
from useg.roi import IGNORE, ignore_outside, probabilities_outside, read_roi
from useg.spec import DataSpec, Overrides
from useg.weightmap import border_weight_map, class_balance_weights

TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2",
        "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def _disc(shape, radius_frac=0.4) -> np.ndarray:
    """A centred disc (2D) or ball (3D) of radius ``radius_frac`` of the smallest side, as bool."""
    grid = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return d2 <= (radius_frac * min(shape)) ** 2


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _disc_dataset(root, n=4, shape=(40, 44), roi_suffix="_roi"):
    """images/, masks/ (0/255) and roi/ (0/255 disc) PNGs; foreground squares inside and outside."""
    rng = np.random.default_rng(1)
    inside = _disc(shape)
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        mask[12:20, 14:24] = 255  # inside the disc
        mask[0:4, 0:4] = 255  # a corner outside the disc: never counted
        image = (mask * 0.6 + rng.integers(0, 60, shape)).astype(np.uint8)
        image[~inside] = 0  # dark outside the field of view, as a fundus photograph
        _png(root / "images" / f"c{i}.png", image)
        _png(root / "masks" / f"c{i}.png", mask)
        _png(root / "roi" / f"c{i}{roi_suffix}.png", inside.astype(np.uint8) * 255)
    return root


# ---------------------------------------------------------------------------------------------
# pairing and reading


def test_pair_stems_equal_and_suffixed():
    p = pair_stems(["a", "b", "c"], ["a", "b_roi", "b", "x_mask"])
    assert p.pairs == {"a": "a", "b": "b"} and p.rule == "same stem"
    assert p.unpaired_images == ("c",) and set(p.unpaired_others) == {"b_roi", "x_mask"}
    q = pair_stems(["07_scan"], ["07_scan_mask"])
    assert q.pairs == {"07_scan": "07_scan_mask"} and q.rule == "mask suffix"
    r = pair_stems(["a", "b"], ["a_roi", "b_roi"])  # every ROI name shares _roi
    assert r.pairs == {"a": "a_roi", "b": "b_roi"} and r.rule == "shared affixes"
    assert pair_stems(["a"], ["a_gt"], other_pattern="{stem}_gt").pairs == {"a": "a_gt"}


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_read_roi_is_nonzero_and_checks_size(tmp_path, shape):
    inside = _disc(shape)
    def write(name, arr):  # each format with its own library
        path = tmp_path / (name + (".png" if arr.ndim == 2 else ".tif"))
        if arr.ndim == 2:
            PILImage.fromarray(arr).save(path)
        else:
            tifffile.imwrite(path, arr)
        return path

    path = write("r", inside.astype(np.uint8) * 200)
    assert np.array_equal(read_roi(path, shape), inside)
    with pytest.raises(UsegError, match="ROI masks must match their images pixel for pixel"):
        read_roi(path, tuple(s + 1 for s in shape), "img.png")
    with pytest.raises(UsegError, match="marks no pixel as inside"):
        read_roi(write("e", np.zeros(shape, np.uint8)), shape)


@pytest.mark.parametrize("suffix", ["", "_roi", "_mask"])
def test_check_pairs_rois_and_reports_their_share(tmp_path, suffix):
    data = _disc_dataset(tmp_path / "d", roi_suffix=suffix)
    report = check_dataset(data, DataSpec(roi_dir=data / "roi"))
    assert report.ok, report.problems
    assert all(c.roi == data / "roi" / f"{c.name}{suffix}.png" for c in report.cases)
    share = float(_disc((40, 44)).mean())
    assert report.stats["ROI share (mean)"] == pytest.approx(share, abs=1e-4)
    assert report.info["roi"] == str(data / "roi")
    assert all(c.roi is None for c in check_dataset(data).cases)  # without --roi nothing changes
    assert all(c.roi is not None for c in discover(data, DataSpec(roi_dir=data / "roi")))


# ---------------------------------------------------------------------------------------------
# training: labels, loss, weights, patches, validation


def test_load_case_ignores_outside_and_raw_labels_outside_do_not_matter(tmp_path):
    data = _disc_dataset(tmp_path / "d", n=1)
    case = check_dataset(data, DataSpec(roi_dir=data / "roi")).cases[0]
    _, labels = load_case(case, LabelMap((0, 255)))
    inside = _disc((40, 44))
    assert (labels[~inside] == IGNORE).all() and set(np.unique(labels[inside])) == {0, 1}
    # another mask that differs only outside the ROI loads to the same labels
    mask = np.asarray(PILImage.open(case.mask)).copy()
    mask[~inside] = 255 - mask[~inside]
    _png(case.mask, mask)
    assert np.array_equal(load_case(case, LabelMap((0, 255)))[1], labels)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", [*KINDS, "regions"])
def test_loss_and_gradient_ignore_outside(dims, kind):
    shape = (2, 9, 11) if dims == 2 else (2, 5, 6, 7)
    g = torch.Generator().manual_seed(0)
    regions = ((1, 2), (2,)) if kind == "regions" else ()
    k = 2 if regions else 3
    logits = torch.randn(shape[0], k, *shape[1:], generator=g)
    labels = torch.randint(0, 3, shape, generator=g)
    inside = torch.from_numpy(np.broadcast_to(_disc(shape[1:]), shape).copy())
    target = torch.where(inside, labels, torch.full_like(labels, IGNORE))
    loss_fn = SegLoss("dice_ce" if regions else kind, ignore_index=IGNORE, regions=regions)

    def loss_and_grad(lg):
        lg = lg.clone().requires_grad_(True)
        loss = loss_fn(lg, target)
        loss.backward()
        return loss.detach(), lg.grad

    loss, grad = loss_and_grad(logits)
    assert torch.isfinite(loss) and grad.abs().sum() > 0
    assert (grad.movedim(1, -1)[~inside] == 0).all()  # outside pixels get no gradient
    changed = logits.clone()
    changed.movedim(1, -1)[~inside] = torch.randn(int((~inside).sum()), k, generator=g) * 5
    loss2, grad2 = loss_and_grad(changed)  # any network output outside: the same loss and gradient
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    if kind == "ce":  # and what is counted is exactly the inside pixels
        keep = inside.reshape(-1)
        flat = logits.movedim(1, -1).reshape(-1, k)[keep]
        expected = torch.nn.functional.cross_entropy(flat, labels.reshape(-1)[keep])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(20, 23), (9, 10, 11)])
def test_border_weights_are_zero_outside_and_balance_inside(shape):
    labels = np.zeros(shape, np.int64)
    labels[(slice(2, 6),) * len(shape)] = 1
    labels[(slice(7, 9),) * len(shape)] = 2
    inside = np.zeros(shape, bool)
    inside[(slice(1, 10),) * len(shape)] = True
    w = border_weight_map(labels, valid=inside)
    assert (w[~inside] == 0).all() and (w[inside] > 0).all()
    fg, bg = (labels > 0) & inside, (labels == 0) & inside
    cb = class_balance_weights(labels, valid=inside)
    assert cb[inside].mean() == pytest.approx(1.0, rel=1e-6) and (cb[~inside] == 0).all()
    assert cb[fg][0] * fg.sum() == pytest.approx(cb[bg][0] * bg.sum(), rel=1e-5)  # balanced inside only
    assert np.array_equal(class_balance_weights(labels), class_balance_weights(labels, valid=None))


@pytest.mark.parametrize("shape,patch", [((30, 41), (8, 8)), ((12, 15, 17), (4, 6, 4))])
def test_patches_are_centred_inside_the_roi(shape, patch):
    inside = _disc(shape, 0.25)
    label = ignore_outside(np.zeros(shape, np.int64), inside)
    label[inside & (np.indices(shape)[0] > shape[0] // 2)] = 1
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    centre = tuple(p // 2 for p in patch)
    for fg_fraction in (0.0, 0.5):
        ds = PatchDataset([image], [label], patch, length=60, fg_fraction=fg_fraction)
        for i in range(len(ds)):
            lab = ds[i]["label"].numpy()
            assert lab[centre] != IGNORE  # every window is centred on a labelled pixel
    # augmentation moves the ignore label with the labels and creates no new values
    cfg = AugmentConfig(p_elastic=1.0, elastic_std=3.0)
    img, lab, _ = augment_sample(image, label, None, np.random.default_rng(3), cfg)
    assert set(np.unique(lab)) <= {IGNORE, 0, 1} and (lab == IGNORE).any()
    # an image without ignored pixels keeps exactly the old sampling
    plain = np.zeros(shape, np.int64)
    a = PatchDataset([image], [plain], patch, length=5, fg_fraction=0.0)
    assert a._inside == [None]


def test_validate_counts_only_inside(tmp_path):
    from useg import runtime
    from useg.backends import TorchBackend
    from useg.metrics import confusion, dice
    from useg.model import UNet
    from useg.predict import predict_proba
    from useg.train import validate

    shape = (32, 32)
    plan = make_plan(LabelMap((0, 1)), 1, [shape], overrides=Overrides(
        model={"width": 4, "depth": 2}, train={"precision": "fp32"}))
    model = UNet.from_config(plan.model).eval()
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    inside = _disc(shape)
    truth = np.zeros(shape, np.int64)
    truth[8:20, 8:20] = 1
    label = ignore_outside(truth, inside)
    dev, prec = torch.device("cpu"), runtime.pick_precision(torch.device("cpu"), "fp32")
    probs = predict_proba(TorchBackend(model, plan, dev, prec), image, plan)
    counts = confusion(probs.argmax(0)[inside], truth[inside], 2)
    result = validate(model, [image], [label], plan, dev, prec)
    assert result["val_dice"] == pytest.approx(dice(*counts[1]))
    p_true = np.take_along_axis(probs, truth[None], 0)[0][inside]
    assert result["val_loss"] == pytest.approx(float(-np.log(np.clip(p_true, 1e-8, 1)).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# nnU-Net's ignore label


def _nnunet_with_ignore(root, shape=(24, 26)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "image"}, "labels": {"background": 0, "vessel": 1, "ignore": 2},
        "numTraining": 3, "file_ending": ".png"}))
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros(shape, np.uint8)
        lab[5:12, 6:15] = 1
        lab[:, :4] = 2  # unannotated stripe
        image = (lab * 40 + rng.integers(0, 40, shape)).astype(np.uint8)
        _png(root / "imagesTr" / f"case{i}_0000.png", image)
        _png(root / "labelsTr" / f"case{i}.png", lab)
    return root


def test_nnunet_ignore_label_maps_to_the_same_mechanism(tmp_path):
    root = _nnunet_with_ignore(tmp_path / "Dataset001")
    info = read_dataset_json(root)
    assert info["ignore"] == 2 and info["labels"] == {0: "background", 1: "vessel"}
    report = check_dataset(root)
    assert report.ok, report.problems
    assert report.label_map.values == (0, 1) and report.stats["ignore label"] == 2
    from useg.planner import plan_dataset

    plan, reasons = plan_dataset(report, Overrides(model={"width": 4, "depth": 2}), device="cpu")
    assert plan.data.ignore_value == 2 and not plan.data.roi
    assert any("ignore label 2" in r for r in reasons)
    _, labels = load_case(report.cases[0], plan.data.label_map, ignore_value=plan.data.ignore_value)
    assert (labels[:, :4] == IGNORE).all() and set(np.unique(labels[:, 4:])) == {0, 1}
    run = tmp_path / "run"
    assert main(["train", str(root), "--out", str(run), *TINY]) == 0
    assert Plan.load(run / "plan.json").data.ignore_value == 2


def test_plans_without_the_roi_fields_still_load(tmp_path):
    plan = make_plan(LabelMap((0, 1)), 1, [(32, 32)])
    d = plan.to_dict()
    assert d["data"]["roi"] is False and d["data"]["ignore_value"] is None
    for key in ("roi", "ignore_value"):
        del d["data"][key]
    (tmp_path / "plan.json").write_text(json.dumps(d))
    old = Plan.load(tmp_path / "plan.json")
    assert old.data.roi is False and old.data.ignore_value is None and old == plan


# ---------------------------------------------------------------------------------------------
# evaluate and predict


def _eval_folders(root, shape=(30, 34)):
    rng = np.random.default_rng(5)
    inside = _disc(shape)
    for i in range(3):
        truth = (rng.random(shape) < 0.3).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.8, truth, 1 - truth).astype(np.uint8)
        _png(root / "truth" / f"s{i}.png", truth * 255)
        _png(root / "pred" / f"s{i}.png", pred * 255)
        _png(root / "roi" / f"s{i}_roi.png", inside.astype(np.uint8))
    return inside


def test_evaluate_counts_only_inside(tmp_path):
    inside = _eval_folders(tmp_path)
    summary, (csv_path, _) = evaluate_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "o1",
                                              roi=tmp_path / "roi", regions="FG=255", instances=True)
    rows = json.loads((tmp_path / "o1" / "metrics.json").read_text())["cases"]
    for row in rows:  # the counts are those of the inside pixels
        assert row["tp"] + row["fp"] + row["fn"] <= inside.sum()
    fg = [r for r in rows if r["class"] == 1 and r["case"] == "s0"][0]
    truth = np.asarray(PILImage.open(tmp_path / "truth" / "s0.png")) > 0
    pred = np.asarray(PILImage.open(tmp_path / "pred" / "s0.png")) > 0
    assert fg["tp"] == int((truth & pred & inside).sum()) and fg["fp"] == int((~truth & pred & inside).sum())
    assert fg["pixel_error"] == pytest.approx(float((truth != pred)[inside].mean()))
    # flipping every prediction outside the ROI changes no metric
    for p in (tmp_path / "pred").iterdir():
        arr = np.asarray(PILImage.open(p)).copy()
        arr[~inside] = 255 - arr[~inside]
        _png(p, arr)
    flipped, _ = evaluate_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "o2",
                                  roi=tmp_path / "roi", regions="FG=255", instances=True)
    assert flipped == summary
    plain, _ = evaluate_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "o3")
    assert plain["pixel_error"] != summary["pixel_error"]  # without --roi the outside counts


def test_probabilities_outside():
    probs = np.full((3, 4, 5), 1 / 3, np.float32)
    inside = np.zeros((4, 5), bool)
    inside[1:3, 1:4] = True
    out = probabilities_outside(probs, inside)
    assert (out[0][~inside] == 1).all() and (out[1:][:, ~inside] == 0).all()
    assert np.array_equal(out[:, inside], probs[:, inside])
    assert (probabilities_outside(probs, inside, regions=True)[:, ~inside] == 0).all()


def test_cli_end_to_end_with_a_disc_roi(tmp_path, capsys):
    data = _disc_dataset(tmp_path / "d", n=4)
    roi = str(data / "roi")
    assert main(["check", str(data), "--roi", roi]) == 0
    out = capsys.readouterr().out
    assert "ROI share (mean): 0." in out and "4 cases" in out
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--roi", roi, *TINY]) == 0
    assert Plan.load(run / "plan.json").data.roi is True
    # predict --roi: background outside the disc, in masks and in probabilities
    pred = tmp_path / "pred"
    assert main(["predict", str(run), str(data / "images"), "--out", str(pred), "--roi", roi, "--quiet"]) == 0
    inside = _disc((40, 44))
    for i in range(4):
        mask = np.asarray(PILImage.open(pred / f"c{i}.png"))
        assert (mask[~inside] == 0).all()
    probs_dir = tmp_path / "probs"
    assert main(["predict", str(run), str(data / "images"), "--out", str(probs_dir), "--roi", roi,
                 "--probabilities", "float16", "--quiet"]) == 0
    probs = tifffile.imread(probs_dir / "c0_probs.tif")
    assert (probs[1][~inside] == 0).all() and (probs[0][~inside] == 1).all()
    # evaluate --roi: the foreground corner outside the disc counts nowhere
    assert main(["evaluate", str(pred), str(data), "--roi", roi, "--out", str(tmp_path / "m")]) == 0
    rows = json.loads((tmp_path / "m" / "metrics.json").read_text())["cases"]
    assert all(r["tp"] + r["fp"] + r["fn"] <= inside.sum() for r in rows)
    # resuming without the ROI the run was trained with is refused
    assert main(["train", str(data), "--out", str(run), "--resume", "--quiet"]) == 2
    assert "trained with --roi" in capsys.readouterr().err


def test_roi_copy_of_dataset_changes_only_inside(tmp_path):
    """Training data that differ only outside the ROI give the same first training loss."""
    from useg.pipeline import train_folder

    a = _disc_dataset(tmp_path / "a", n=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    inside = _disc((40, 44))
    for m in (b / "masks").iterdir():
        arr = np.asarray(PILImage.open(m)).copy()
        arr[~inside] = 255 - arr[~inside]
        _png(m, arr)
    ov = Overrides(model={"width": 4, "depth": 2}, patch_size=(32, 32),
                   train={"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32",
                          "deterministic": True, "workers": 0})
    losses = []
    for data in (a, b):
        run = tmp_path / f"run_{data.name}"
        train_folder(data, run, spec=DataSpec(roi_dir=data / "roi"), overrides=ov, device="cpu", quiet=True)
        losses.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"])
    assert losses[0] == losses[1]

