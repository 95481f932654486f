"""ISBI 2012 membranes, like for like: five recipes, one wall-clock training budget each.

Train on slices 0-24, evaluate on the held-out slices 25-29 (../shared/datasets/README.md):

1. ``default``           useg's default preset;
2. ``paper``             ``--preset paper`` (Ronneberger et al. 2015);
3. ``paper-no-weights``  the paper preset without the eq. 2 border weights;
4. ``paper-no-elastic``  the paper preset without elastic deformation;
5. ``monai-basicunet``   MONAI's BasicUNet with DiceCELoss, Adam 1e-3, random 256x256 patches with
                         flips, batch 8, in a plain loop; sliding-window inference (roi 256,
                         overlap 0.5, Gaussian).

useg variants split slices 0-24 into 20 training / 5 validation slices as ``useg train`` does
(the saved model is the best on validation; validation time counts against the budget); the
paper variants validate every 100 steps, as in BENCHMARKS.md's first paper run. MONAI trains on
all 25 slices and keeps its last weights.

Metrics over slices 25-29 pooled: membrane (mask value 0 = class 0) Dice and IoU, pixel error,
and the adapted Rand error of the cells (4-connected components of the cell class of prediction
and truth, per slice; contingency tables summed over slices); also object F1 (IoU > 0.5).

    .venv/bin/python benchmarks/isbi2012.py --data ../shared/datasets/isbi2012 --budget 20
    # one variant per process, e.g. five processes pinned to 2 cores each, then combine:
    taskset -c 0,1 .venv/bin/python benchmarks/isbi2012.py --data D --only paper &
    ...
    .venv/bin/python benchmarks/isbi2012.py --merge

Each variant writes ``<runs>/<name>.json`` (and its run folder ``<runs>/<name>/``); every
invocation ends by rebuilding ``--out`` from all per-variant files present, in variant order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from useg import runtime
from useg.files import atomic_path
from useg.instances import adapted_rand_error, label_instances, match_instances
from useg.io import read_image, read_mask
from useg.metrics import confusion, dice, iou

VARIANTS = ("default", "paper", "paper-no-weights", "paper-no-elastic", "monai-basicunet")
TEST = [str(i) for i in range(25, 30)]
TRAIN = [str(i) for i in range(25)]
MEMBRANE, CELL = 0, 1  # class indices: mask value 0 -> class 0 (membrane), 255 -> class 1 (cell)


def load_slice(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(1, H, W) raw image and (H, W) int64 class indices (0 membrane, 1 cell) of one slice."""
    image = read_image(data / "images" / f"{name}.png").array
    raw = read_mask(data / "masks" / f"{name}.png")[0]
    values = set(np.unique(raw).tolist())
    if not values <= {0, 255}:
        raise SystemExit(f"{data}/masks/{name}.png holds values {sorted(values)}; expected 0 and 255")
    return image, (raw == 255).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# useg variants


def train_useg(name: str, data: Path, run: Path, budget_min: float, device: str) -> dict:
    """Plan, split and fit as ``useg train --exclude 25-29`` does, with the variant's plan changes."""
    from useg.check import check_dataset
    from useg.pipeline import split_cases
    from useg.planner import make_plan
    from useg.preprocess import load_arrays
    from useg.spec import Overrides
    from useg.train import fit

    report = check_dataset(data)
    if not report.ok:
        raise SystemExit("\n".join(report.problems))
    if tuple(report.label_map.values) != (0, 255):
        raise SystemExit(f"expected mask values (0, 255), got {report.label_map.values}")
    cases = [c for c in report.cases if c.name not in TEST]
    train_cases, val_cases = split_cases(cases, val_fraction=0.2, seed=0)
    train_data = load_arrays(train_cases, report.label_map)
    val_data = load_arrays(val_cases, report.label_map)
    preset = "default" if name == "default" else "paper"
    train = {"iters_per_epoch": 100} if preset == "paper" else {}
    plan = make_plan(report.label_map, num_channels=train_data[0][0].shape[0],
                     image_shapes=[a.shape[1:] for a in train_data[0]],
                     overrides=Overrides(preset=preset, train=train))
    if name == "paper-no-weights":
        plan = dataclasses.replace(plan, data=dataclasses.replace(plan.data, border_weights=False))
    elif name == "paper-no-elastic":
        aug = dataclasses.replace(plan.data.augment, p_elastic=0.0)
        plan = dataclasses.replace(plan, data=dataclasses.replace(plan.data, augment=aug))
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(run / "split.json") as tmp:
        tmp.write_text(json.dumps({"train": [c.name for c in train_cases],
                                   "val": [c.name for c in val_cases]}, indent=1), encoding="utf-8")
    result = fit(plan, train_data, val_data, run, time_budget_min=budget_min, device=device, quiet=True)
    return {"minutes": result.minutes, "steps": result.steps, "epochs": result.epochs}


def predict_useg(run: Path, data: Path, device: str, tta: bool = False) -> list[np.ndarray]:
    """Labels of the test slices; ``tta`` adds the 8 flips and rotations of each tile."""
    from useg.predict import Segmenter

    seg = Segmenter.load(run, device=device)
    if tta:
        seg.plan = dataclasses.replace(seg.plan,
                                       infer=dataclasses.replace(seg.plan.infer, tta=True, tta_rotate=True))
    return [seg.predict(load_slice(data, n)[0]) for n in TEST]


# ---------------------------------------------------------------------------------------------
# MONAI baseline


def train_monai(data: Path, run: Path, budget_min: float, device: str) -> tuple[torch.nn.Module, dict]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    from useg.preprocess import normalize

    dev = runtime.pick_device(device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = [load_slice(data, n) for n in TRAIN]
    images = [normalize(im, "zscore") for im, _ in pairs]
    labels = [lab for _, lab in pairs]
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    patch, batch = 256, 8
    net.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_min * 60.0:
        xs, ys = [], []
        for _ in range(batch):
            k = int(rng.integers(len(images)))
            h, w = labels[k].shape
            y0, x0 = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
            x = images[k][:, y0:y0 + patch, x0:x0 + patch]
            y = labels[k][None, y0:y0 + patch, x0:x0 + patch]
            for axis in (1, 2):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        x = torch.from_numpy(np.stack(xs)).to(dev)
        y = torch.from_numpy(np.stack(ys)).to(dev)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    minutes = (time.perf_counter() - start) / 60.0
    run.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run / "model.pt")
    return net, {"minutes": minutes, "steps": steps, "epochs": None}


def predict_monai(net: torch.nn.Module, data: Path, device: str) -> list[np.ndarray]:
    from monai.inferers import sliding_window_inference

    from useg.preprocess import normalize

    dev = runtime.pick_device(device)
    net.eval()
    out = []
    with torch.inference_mode():
        for n in TEST:
            x = torch.from_numpy(normalize(load_slice(data, n)[0], "zscore"))[None].to(dev)
            logits = sliding_window_inference(x, roi_size=(256, 256), sw_batch_size=4, predictor=net,
                                              overlap=0.5, mode="gaussian")
            out.append(logits.argmax(1)[0].cpu().numpy().astype(np.int64))
    return out


# ---------------------------------------------------------------------------------------------
# metrics and files


def score(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Pooled pixel metrics of the membrane class and the cells' adapted Rand error and object F1."""
    counts = sum(confusion(p, t, 2) for p, t in zip(preds, truths))
    tp, fp, fn = (int(v) for v in counts[MEMBRANE])
    wrong = sum(int(np.count_nonzero(p != t)) for p, t in zip(preds, truths))
    total = sum(t.size for t in truths)
    # Cells per slice; ids made distinct across slices (prediction's 0 too), so the Rand error of
    # the stack is that of the summed per-slice contingency tables.
    p_stack, p_objs, t_stack, p_off, t_off = [], [], [], 0, 0
    for p, t in zip(preds, truths):
        pi, ti = label_instances(p, CELL), label_instances(t, CELL)
        p_stack.append(pi.astype(np.int64) + p_off)
        p_objs.append(np.where(pi > 0, pi.astype(np.int64) + p_off, 0))
        t_stack.append(np.where(ti > 0, ti.astype(np.int64) + t_off, 0))
        p_off += int(pi.max()) + 1
        t_off += int(ti.max())
    rand, rand_p, rand_r = adapted_rand_error(np.stack(p_stack), np.stack(t_stack))
    m = match_instances(np.stack(p_objs), np.stack(t_stack))
    return {"dice": dice(tp, fp, fn), "iou": iou(tp, fp, fn), "pixel_error": wrong / total,
            "rand_error": rand, "rand_precision": rand_p, "rand_recall": rand_r,
            "object_f1": m["f1"], "n_pred": m["n_pred"], "n_true": m["n_true"]}


def run_variant(name: str, data: Path, runs: Path, budget_min: float, device: str) -> dict:
    run = runs / name
    print(f"[{name}] training for {budget_min:g} min in {run}", flush=True)
    if name == "monai-basicunet":
        net, info = train_monai(data, run, budget_min, device)
        t0 = time.perf_counter()
        preds = predict_monai(net, data, device)
    else:
        info = train_useg(name, data, run, budget_min, device)
        t0 = time.perf_counter()
        preds = predict_useg(run, data, device)
    predict_s = time.perf_counter() - t0
    truths = [load_slice(data, n)[1] for n in TEST]
    row = {"name": name, **score(preds, truths), **info, "predict_seconds": round(predict_s, 1),
           "budget_minutes": budget_min, "threads": torch.get_num_threads()}
    write_json(runs / f"{name}.json", row)
    print(f"[{name}] {format_row(row)}", flush=True)
    if name == "default":  # the same model with 8-fold flip/rotation averaging: what TTA buys
        t0 = time.perf_counter()
        preds = predict_useg(run, data, device, tta=True)
        tta_row = {**row, "name": "default+tta", **score(preds, truths),
                   "predict_seconds": round(time.perf_counter() - t0, 1)}
        write_json(runs / "default+tta.json", tta_row)
        print(f"[default+tta] {format_row(tta_row)}", flush=True)
    return row


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def merge(runs: Path, out: Path) -> list[dict]:
    rows = []
    for name in (*VARIANTS[:1], "default+tta", *VARIANTS[1:]):
        path = runs / f"{name}.json"
        if path.exists():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    if rows:
        write_json(out, rows)
    return rows


HEADER = (f"{'variant':<18} {'Dice':>7} {'IoU':>7} {'pix err':>8} {'Rand err':>9} {'obj F1':>7} "
          f"{'minutes':>8} {'steps':>6}")


def format_row(r: dict) -> str:
    steps = "" if r.get("steps") is None else str(r["steps"])
    return (f"{r['name']:<18} {r['dice']:>7.4f} {r['iou']:>7.4f} {r['pixel_error']:>8.4f} "
            f"{r['rand_error']:>9.4f} {r.get('object_f1', math.nan):>7.4f} {r['minutes']:>8.2f} {steps:>6}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/isbi2012"))
    p.add_argument("--budget", type=float, default=20.0, help="training minutes per variant")
    p.add_argument("--only", help=f"comma-separated variants among {','.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/isbi2012.json"))
    p.add_argument("--runs", type=Path, default=Path("runs/isbi2012-bench"))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--merge", action="store_true", help="only combine <runs>/<name>.json into --out")
    a = p.parse_args(argv)
    names = list(VARIANTS) if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    if not a.merge:
        if not (a.data / "images").is_dir():
            p.error(f"{a.data} has no images/; pass --data to the ISBI 2012 folder")
        torch.set_num_threads(a.threads)
        # useg's fit() sets threads to the cores the process may use; cap it at --threads.
        set_threads = runtime.set_threads
        runtime.set_threads = lambda threads=None: set_threads(min(threads or a.threads, a.threads))
        for name in names:
            run_variant(name, a.data, a.runs, a.budget, a.device)
    rows = merge(a.runs, a.out)
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(format_row(r))
    print(f"{len(rows)} variant(s) in {a.out}" if rows else f"no results in {a.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
