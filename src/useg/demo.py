"""The demo: synthetic touching cells -> train -> predict held-out images -> evaluate -> report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import UsegError

logger = logging.getLogger(__name__)


def run_demo(out: str | Path = "demo-out", minutes: float = 2.0, quiet: bool = False,
             device: str = "auto", n_train: int = 24, n_test: int = 8, seed: int = 0,
             shape: tuple[int, int] = (256, 256), train: dict | None = None,
             model: dict | None = None) -> float:
    """Run the whole job on built-in data and return the held-out foreground Dice.

    Writes into ``out``: ``data/`` (train images/masks), ``test/`` (held-out images/masks),
    ``run/`` (plan, weights, curves), ``pred/`` (predicted masks, metrics.csv/json),
    ``overlays/`` and ``report.html``.

    Args:
        out: the demo folder (re-running replaces its contents).
        minutes: training budget.
        quiet: no progress bars.
        device: "auto", "cpu", "cuda", ...
        n_train, n_test: synthetic images for training (with validation) and held-out testing.
        seed: the data seed (the test set uses seed + 1).
        shape: synthetic image size.
        train, model: plan overrides (the tests use a tiny network).
    """
    from .evaluate import evaluate_folders
    from .evaluate_summary import format_table
    from .io import read_image, read_mask
    from .pipeline import train_folder
    from .predict import Segmenter
    from .report import save_overlay, write_report
    from .spec import Overrides
    from .synthetic import write_cells_dataset

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsegError(f"{out} is a file; choose a folder for --out")
    data = write_cells_dataset(out / "data", n_images=n_train, shape=shape, seed=seed)
    test = write_cells_dataset(out / "test", n_images=n_test, shape=shape, seed=seed + 1)
    logger.info("demo data: %d training and %d held-out images in %s", n_train, n_test, out)
    run = out / "run"
    overrides = Overrides(train={"epochs": 1000, "iters_per_epoch": 10, **(train or {})}, model=model or {})
    result = train_folder(data, run, time_budget_min=minutes, overwrite=True, device=device, quiet=quiet,
                          overrides=overrides)
    seg = Segmenter.load(run, device=device)
    test_images = sorted((test / "images").iterdir())
    pred = out / "pred"
    seg.predict_files(test_images, pred, overwrite=True)
    summary, _ = evaluate_folders(pred, test / "masks", run=run)
    table = format_table(summary)
    logger.info("held-out metrics:\n%s", table)

    overlays = []
    lm = seg.plan.data.label_map
    for path in test_images[:4]:
        image = read_image(path)
        p = lm.decode(read_mask(pred / path.name)[0])
        t = lm.decode(read_mask(test / "masks" / path.name)[0])
        overlays.append(save_overlay(image.array, p, t, out / "overlays" / f"{path.stem}.png",
                                     title=path.stem))
    dice = float(summary["foreground"]["dice"])
    extra = {"training minutes": f"{result.minutes:.1f}", "epochs": result.epochs, "steps": result.steps,
             "best validation dice": f"{result.best_dice:.4f}", "held-out dice": f"{dice:.4f}",
             "plan": json.dumps(seg.plan.to_dict()["model"])}
    write_report(out, "useg demo: synthetic touching cells", table, [run / "curves.png", *overlays], extra)
    if not np.isfinite(dice):
        raise RuntimeError("the demo produced no Dice score")
    return dice
