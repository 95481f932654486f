"""useg.scores: exact threshold-free metrics from score histograms, cross-checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from useg.scores import (
    average_precision,
    counts_at,
    empty_counts,
    f1_curve,
    merge,
    roc_auc,
    roc_curve,
    score_counts,
    score_metrics,
)

metrics = pytest.importorskip("sklearn.metrics")


def _scores(rng, dtype, shape):
    """Random scores with many ties, in the stored dtype, and the same as floats in [0, 1]."""
    if dtype == "uint8":
        codes = rng.integers(0, 256, shape).astype(np.uint8)
        return codes, codes / 255.0, 1 / 255
    levels = rng.choice(np.linspace(0, 1, 37), shape)  # 37 levels: ties everywhere
    stored = levels.astype(dtype)
    return stored, stored.astype(np.float64), 1.0


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(31, 17), (5, 9, 7)])
def test_auc_ap_f1_and_counts_match_sklearn(dtype, shape, rng):
    stored, p, scale = _scores(rng, dtype, shape)
    truth = rng.random(shape) < 0.3 + 0.4 * p  # informative but imperfect
    c = score_counts(stored, truth, scale)
    y, s = truth.ravel(), p.ravel()
    assert roc_auc(c) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(c) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    ours = roc_curve(c)
    np.testing.assert_allclose(ours[0], fpr, atol=1e-12)
    np.testing.assert_allclose(ours[1], tpr, atol=1e-12)
    thresholds, f1 = f1_curve(c)
    for t, f in zip(thresholds[::7], f1[::7]):
        assert f == pytest.approx(metrics.f1_score(y, s >= t), abs=1e-12)
    tn, fp, fn, tp = metrics.confusion_matrix(y, s >= 0.5, labels=[False, True]).ravel()
    assert counts_at(c, 0.5) == (tp, fp, fn, tn)
    m = score_metrics(c)
    assert m["f1_best"] == pytest.approx(max(metrics.f1_score(y, s >= t) for t in np.unique(s)), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(metrics.recall_score(y, s >= 0.5))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y, s >= 0.5))
    assert m["positives"] + m["negatives"] == truth.size


def test_float16_bit_patterns_equal_unique_values(rng):
    stored, p, _ = _scores(rng, "float16", (40, 40))
    stored[0, :3] = np.array([-0.0, 0.0, 0.0], np.float16)  # two bit patterns, one value
    truth = rng.random((40, 40)) < 0.5
    a, b = score_counts(stored, truth), score_counts(stored.astype(np.float64), truth)
    for x, y in ((a.values, b.values), (a.pos, b.pos), (a.neg, b.neg)):
        np.testing.assert_array_equal(x, y)
    assert len(a.values) <= 37


def test_perfect_inverted_and_degenerate_cases():
    s = np.array([0.1, 0.2, 0.7, 0.9])
    t = np.array([False, False, True, True])
    perfect = score_metrics(score_counts(s, t))
    assert perfect["auc"] == perfect["ap"] == perfect["f1_best"] == 1.0 and perfect["threshold_best"] == 0.7
    assert roc_auc(score_counts(s, ~t)) == 0.0
    only_neg = score_metrics(score_counts(s, np.zeros(4, bool)))
    assert np.isnan(only_neg["auc"]) and np.isnan(only_neg["ap"])  # sklearn refuses one class
    assert only_neg["sensitivity"] == 0.0 and only_neg["specificity"] == 0.5  # 0.7, 0.9 are false positives
    all_low = score_metrics(score_counts(np.array([0.1, 0.2]), np.zeros(2, bool)))
    # nothing to find, nothing found
    assert all_low["f1_05"] == all_low["sensitivity"] == all_low["specificity"] == 1.0


def test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        score_counts(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="boolean"):
        score_counts(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="uint8 or floating"):
        score_counts(np.zeros(3, np.int32), np.zeros(3, bool))
    with pytest.raises(ValueError, match="NaN"):
        score_counts(np.array([0.1, np.nan], np.float16), np.zeros(2, bool))
    with pytest.raises(ValueError, match="at least one pixel"):
        score_metrics(empty_counts())


codes = st.lists(st.tuples(st.integers(0, 255), st.booleans()), min_size=2, max_size=200)


@settings(max_examples=60, deadline=None)
@given(codes, st.integers(0, 200))
def test_streaming_two_parts_equals_one_batch(pairs, cut):
    s = np.array([c for c, _ in pairs], np.uint8)
    t = np.array([b for _, b in pairs])
    cut = min(cut, len(s))
    whole = score_counts(s, t, 1 / 255)
    parts = merge(score_counts(s[:cut], t[:cut], 1 / 255), empty_counts(),
                  score_counts(s[cut:], t[cut:], 1 / 255))
    for x, y in ((whole.values, parts.values), (whole.pos, parts.pos), (whole.neg, parts.neg)):
        np.testing.assert_array_equal(x, y)
    a, b = score_metrics(whole), score_metrics(parts)
    assert a.keys() == b.keys() and all(a[k] == b[k] or np.isnan(a[k]) and np.isnan(b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(codes)
def test_auc_of_reversed_scores_is_one_minus_auc(pairs):
    s = np.array([c for c, _ in pairs], np.uint8)
    t = np.array([b for _, b in pairs])
    auc, flipped = roc_auc(score_counts(s, t)), roc_auc(score_counts(255 - s, t))
    if t.all() or not t.any():
        assert np.isnan(auc) and np.isnan(flipped)
    else:
        assert flipped == pytest.approx(1 - auc, abs=1e-12)
        assert 0 <= auc <= 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=50), st.lists(st.integers(0, 255), min_size=1,
                                                                           max_size=50))
def test_separated_scores_score_one(neg, pos):
    lo, hi = np.array(neg) // 2, 128 + np.array(pos) // 2  # every positive above every negative
    s = np.concatenate([lo, hi]).astype(np.uint8)
    t = np.r_[np.zeros(len(lo), bool), np.ones(len(hi), bool)]
    m = score_metrics(score_counts(s, t, 1 / 255))
    assert m["auc"] == m["ap"] == m["f1_best"] == 1.0
    assert m["f1_05"] == m["sensitivity"] == m["specificity"] == m["accuracy"] == 1.0


# --- evaluate_folders and `useg evaluate --probabilities` ------------------------------------


def _prob_folder(root, rng, dtype, n=3, shape=(12, 10)):
    """Truth PNG masks 0/255 and (2, H, W) probability TIFFs written by tifffile, noisy around the truth."""
    from PIL import Image as PILImage

    (root / "truth").mkdir(parents=True)
    (root / "pred").mkdir()
    for k in range(n):
        m = np.zeros(shape, np.uint8)
        m[2:7, k + 1:k + 6] = 255
        PILImage.fromarray(m).save(root / "truth" / f"c{k}.png")
        p1 = np.clip((m > 0) * 0.6 + rng.normal(0.2, 0.25, shape), 0, 1)
        probs = np.stack([1 - p1, p1])
        stored = np.round(probs * 255).astype(np.uint8) if dtype == "uint8" else probs.astype(np.float16)
        tifffile.imwrite(root / "pred" / f"c{k}_probs.tif", stored, photometric="minisblack",
                         planarconfig="separate", metadata={"axes": "SYX"})
    return root / "pred", root / "truth"


def _pooled_reference(pred, truth, cls=1, value=255):
    """sklearn's AUC and AP over every pixel of every case, read back with tifffile and Pillow."""
    from PIL import Image as PILImage

    ys, ss = [], []
    for t in sorted(truth.glob("*.png")):
        probs = tifffile.imread(pred / f"{t.stem}_probs.tif")
        scale = 255.0 if probs.dtype == np.uint8 else 1.0
        ys.append((np.array(PILImage.open(t)) == value).ravel())
        ss.append(probs[cls].astype(np.float64).ravel() / scale)
    y, s = np.concatenate(ys), np.concatenate(ss)
    return metrics.roc_auc_score(y, s), metrics.average_precision_score(y, s)


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_evaluate_folders_scores_probability_maps(tmp_path, rng, dtype):
    import csv
    import json

    from useg.evaluate import evaluate_folders
    from useg.evaluate_summary import COLUMNS, format_table
    from useg.scores import SCORE_METRICS

    pred, truth = _prob_folder(tmp_path, rng, dtype)
    summary, (csv_path, json_path) = evaluate_folders(pred, truth, probabilities=True)
    (entry,) = summary["probabilities"]
    auc, ap = _pooled_reference(pred, truth)
    assert entry["name"] == "value 255" and entry["positives"] == 3 * 25
    assert entry["auc"] == pytest.approx(auc, abs=1e-12) and entry["ap"] == pytest.approx(ap, abs=1e-12)
    assert 0 < entry["f1_05"] <= entry["f1_best"] <= 1 and 0 <= entry["threshold_best"] <= 1
    assert summary["n_cases"] == 3 and 0 < summary["foreground"]["dice"] <= 1  # the argmax, scored as a mask
    header = next(csv.reader(csv_path.open()))
    assert header == [*COLUMNS, *SCORE_METRICS]
    cases = json.loads(json_path.read_text())["cases"]
    assert [r["case"] for r in cases] == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert "auc" in cases[1] and "auc" not in cases[0]  # foreground classes only
    table = format_table(summary)
    assert "AUC" in table and "pooled" in table and f"{entry['auc']:.4f}" in table


def test_evaluate_folders_scores_nifti_volumes_per_class(tmp_path, rng):
    import nibabel as nib

    from useg.evaluate import evaluate_folders

    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    ys, ss = [], []
    for k in range(2):
        lab = np.zeros((9, 8, 7), np.uint8)
        lab[2:6, 2:6, 1:5] = 1
        lab[3:5, 3:5, 2:4] = 2
        logits = rng.normal(0, 1, (9, 8, 7, 3)) + 2.0 * np.eye(3)[lab]
        probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float16)
        affine = np.diag([1.5, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "truth" / f"v{k}.nii.gz"))
        # as useg predict writes them: (*S, K) float32 holding float16 values
        nib.save(nib.Nifti1Image(probs.astype(np.float32), affine),
                 str(tmp_path / "pred" / f"v{k}_probs.nii.gz"))
        ys.append(lab.ravel())
        ss.append(probs.reshape(-1, 3).astype(np.float64))
    summary, _ = evaluate_folders(tmp_path / "pred", tmp_path / "truth", probabilities=True)
    y, s = np.concatenate(ys), np.concatenate(ss)
    assert [e["class"] for e in summary["probabilities"]] == [1, 2]
    for e in summary["probabilities"]:
        c = e["class"]
        assert e["auc"] == pytest.approx(metrics.roc_auc_score(y == c, s[:, c]), abs=1e-12)
        assert e["ap"] == pytest.approx(metrics.average_precision_score(y == c, s[:, c]), abs=1e-12)
        assert e["sensitivity"] == pytest.approx(metrics.recall_score(y == c, s[:, c] >= 0.5))


def test_masks_are_scored_as_before_beside_probability_maps(tmp_path, rng):
    import csv

    from PIL import Image as PILImage

    from useg.evaluate import evaluate_folders
    from useg.evaluate_summary import COLUMNS

    pred, truth = _prob_folder(tmp_path, rng, "uint8")
    for t in truth.glob("*.png"):
        PILImage.open(t).save(pred / t.name)  # perfect masks beside the maps
    summary, (csv_path, _) = evaluate_folders(pred, truth)
    assert "probabilities" not in summary and summary["foreground"]["dice"] == 1.0
    assert next(csv.reader(csv_path.open())) == list(COLUMNS)  # the old columns, unchanged


TINY = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "1", "--iters", "2",
        "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def test_cli_train_predict_probabilities_evaluate(cells_dir, tmp_path, capsys):
    import json

    from useg.cli import main

    run = tmp_path / "run"
    assert main(["train", str(cells_dir), "--out", str(run), *TINY]) == 0
    aucs = {}
    for dtype in ("uint8", "float16"):
        pred = tmp_path / dtype
        assert main(["predict", str(run), str(cells_dir / "images"), "--out", str(pred), "--probabilities",
                     dtype, "--device", "cpu", "--quiet"]) == 0
        assert sorted(p.name for p in pred.iterdir()) == [f"cell_{k:03d}_probs.tif" for k in range(6)]
        extra = ["--run", str(run)] if dtype == "uint8" else []  # the run's label map, or the inferred one
        assert main(["evaluate", str(pred), str(cells_dir), "--probabilities", *extra, "--quiet"]) == 0
        out = capsys.readouterr().out
        assert "AUC" in out and "F1@0.5" in out
        (entry,) = json.loads((pred / "metrics.json").read_text())["summary"]["probabilities"]
        auc, ap = _pooled_reference(pred, cells_dir / "masks")
        assert entry["auc"] == pytest.approx(auc, abs=1e-12) and entry["ap"] == pytest.approx(ap, abs=1e-12)
        aucs[dtype] = entry["auc"]
    assert aucs["uint8"] == pytest.approx(aucs["float16"], abs=0.01)  # 1/255 steps barely move the curve
