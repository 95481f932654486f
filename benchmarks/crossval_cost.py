"""What cross-validation and fold ensembles cost (issue 13's goal: CV <= k runs + the out-of-fold
prediction, an ensemble of k folds <= k x the time of one model).

Synthetic cells; the same fixed work (epochs x iterations) for the k-fold run and for k separate
single runs trained on the same splits, so the difference is the overhead of cross-validation
itself (planning once, loading, the out-of-fold prediction and cv.json). Then one image predicted
by the k-fold ensemble and by one fold.

    PYTHONPATH=src python benchmarks/crossval_cost.py --out /tmp/cvcost [--folds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from useg.crossval import PREDICTIONS_DIR
from useg.dataset import discover
from useg.io import read_image
from useg.pipeline import train_folder
from useg.predict import Segmenter
from useg.spec import Overrides
from useg.synthetic import write_cells_dataset


def _overrides() -> Overrides:
    return Overrides(model={"width": 8, "depth": 3}, patch_size=(64, 64), train={
        "epochs": 2, "iters_per_epoch": 10, "batch_size": 4, "precision": "fp32", "workers": 0})


def _timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def _predict_seconds(seg: Segmenter, image: np.ndarray, repeats: int) -> float:
    seg.predict_proba(image[..., :64, :64])  # warm-up: first-call allocations
    times = [_timed(lambda: seg.predict_proba(image))[1] for _ in range(repeats)]
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    data = write_cells_dataset(a.out / "data", n_images=a.images, shape=(128, 128), seed=0)
    kw = dict(overrides=_overrides(), device=a.device, quiet=True)

    cv, cv_s = _timed(lambda: train_folder(data, a.out / "cv", folds=a.folds, **kw))
    splits = json.loads((a.out / "cv" / "splits.json").read_text())
    train_s = sum(r.minutes * 60 for r in cv.trained.values())
    separate_s = 0.0
    for k, split in enumerate(splits):  # the same folds as single runs: --val names the held-out cases
        run = a.out / f"single_{k}"
        _, s = _timed(lambda run=run, split=split: train_folder(data, run, val=split["val"], **kw))
        separate_s += s
    cases = {c.name: c for c in discover(data)}
    oof_s = 0.0
    for k, split in enumerate(splits):  # what predicting the held-out cases of k single runs costs
        seg = Segmenter.load(a.out / f"single_{k}", device=a.device)
        _, s = _timed(lambda seg=seg, split=split, k=k: seg.predict_files(
            [cases[n] for n in split["val"]], a.out / "single_pred" / str(k)))
        oof_s += s

    image = np.tile(read_image(data / "images" / "cell_000.png").array, (1, 4, 4))  # 512 x 512
    one = _predict_seconds(Segmenter.load(a.out / "cv" / "fold_0", device=a.device), image, a.repeats)
    ens = _predict_seconds(Segmenter.load(a.out / "cv", device=a.device), image, a.repeats)
    result = {
        "folds": a.folds, "images": a.images, "device": a.device, "threads": torch.get_num_threads(),
        "cv_total_s": round(cv_s, 1), "cv_fold_training_s": round(train_s, 1),
        "separate_runs_s": round(separate_s, 1), "separate_oof_predict_s": round(oof_s, 1),
        "cv_over_separate_plus_predict": round(cv_s / (separate_s + oof_s), 3),
        "oof_predictions": len(list((a.out / "cv" / PREDICTIONS_DIR).iterdir())),
        "predict_512_single_s": round(one, 3), "predict_512_ensemble_s": round(ens, 3),
        "ensemble_over_single": round(ens / one, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
