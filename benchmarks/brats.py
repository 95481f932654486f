"""BraTS 2013 mini: the planned 3D U-Net on four MRI cases within a CPU budget.

Trains on pat0005, pat0006, pat0003 and evaluates on pat0004 (../shared/datasets/README.md), the
way a user would: ``useg train DATA --channels Flair,T1c --label OTMultiClass`` (the planner
picks the 3D network, patch, normalisation), then ``Segmenter.predict_files`` on the held-out
case and region metrics (whole tumour 1-4, tumour core 1,3,4, enhancing 4; Dice and HD95 in mm).

    .venv/bin/python benchmarks/brats.py --data ../shared/datasets/brats2013-mini --budget 30

Writes ``benchmarks/results/brats.json``: dice_wt, dice_tc, dice_et, hd95_wt, minutes, peak_rss_gib.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from useg import runtime  # noqa: E402
from useg.dataset import discover  # noqa: E402
from useg.distances import BRATS_REGIONS, evaluate_regions  # noqa: E402
from useg.files import atomic_path  # noqa: E402
from useg.io import read_image, read_mask  # noqa: E402
from useg.pipeline import train_folder  # noqa: E402
from useg.predict import Segmenter  # noqa: E402
from useg.spec import DataSpec  # noqa: E402

SPEC = DataSpec(channel_names=("Flair", "T1c"), label_name="OTMultiClass")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/datasets/brats2013-mini")
    p.add_argument("--budget", type=float, default=30.0, help="training minutes")
    p.add_argument("--val", default="brats_2013_pat0004_1", help="the held-out case")
    p.add_argument("--runs", default="runs/brats-bench")
    p.add_argument("--out", default="benchmarks/results/brats.json")
    p.add_argument("--threads", type=int, default=0, help="cap on threads (0: all cores)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.threads:
        set_threads = runtime.set_threads
        runtime.set_threads = lambda threads=None: set_threads(min(threads or a.threads, a.threads))
    run, t0 = Path(a.runs), time.time()
    # the held-out case is excluded from training and validation; validation is one training case
    result = train_folder(a.data, run, exclude=a.val, val="brats_2013_pat0003_1", time_budget_min=a.budget,
                          spec=SPEC, overwrite=True, device=a.device, quiet=True)
    minutes = (time.time() - t0) / 60
    seg = Segmenter.load(run, device=a.device)
    case = next(c for c in discover(a.data, SPEC) if c.name == a.val)
    t1 = time.time()
    written = seg.predict_files([case], run / "pred", overwrite=True)
    predict_s = time.time() - t1
    truth = read_mask(case.mask)[0]
    pred = read_mask(written[0])[0]
    spacing = read_image(case.image).spacing
    rows = {r["region"]: r for r in evaluate_regions(pred, truth, BRATS_REGIONS, spacing)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    out = {
        "dice_wt": rows["WT"]["dice"], "dice_tc": rows["TC"]["dice"], "dice_et": rows["ET"]["dice"],
        "hd95_wt": rows["WT"]["hd95"], "hd95_tc": rows["TC"]["hd95"], "hd95_et": rows["ET"]["hd95"],
        "minutes": round(minutes, 2), "predict_seconds": round(predict_s, 1), "peak_rss_gib": round(rss, 2),
        "steps": result.steps, "best_val_dice": result.best_dice, "budget": a.budget,
        "plan": json.loads((run / "plan.json").read_text())["model"] | {"patch": json.loads(
            (run / "plan.json").read_text())["data"]["patch_size"]},
        "device": str(seg.backend.device), "command": " ".join(sys.argv),
    }
    print(f"{'region':<8}{'Dice':>8}{'HD95 mm':>10}")
    for name in ("WT", "TC", "ET"):
        print(f"{name:<8}{rows[name]['dice']:>8.4f}{rows[name]['hd95']:>10.2f}")
    print(f"training {minutes:.1f} min ({result.steps} steps), predict {predict_s:.0f} s, "
          f"peak RSS {rss:.2f} GiB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(a.out) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
