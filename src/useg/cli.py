"""The ``useg`` command: parses arguments and calls the library; nothing else happens here."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
from pathlib import Path

from .errors import UsegError
from .spec import BOUNDS, CONFIGURATIONS, DataSpec, Overrides

logger = logging.getLogger("useg")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:  # "" or "," too: an empty --labels or --patch means nothing the library can use
        raise argparse.ArgumentTypeError(f"expected integers like 256,256 or 0,255, got {text!r}")
    return values


def _number(kind, low: float, low_ok: bool, what: str, high: float = float("inf")):
    """An argparse type: a finite ``kind`` (int or float) above ``low`` (or equal, with ``low_ok``),
    at most ``high``."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < low or (value == low and not low_ok)
                or value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_POSITIVE = _number(float, 0.0, False, "a positive number")


def _configs(text: str) -> tuple[str, ...]:
    """--configs: configurations among :data:`useg.spec.CONFIGURATIONS`, comma-separated, none twice."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if not names or unknown or len(set(names)) != len(names):
        why = f"unknown {unknown[0]!r}" if unknown else "a name given twice" if names else "no name"
        raise argparse.ArgumentTypeError(f"expected configurations among {', '.join(CONFIGURATIONS)} such as "
                                         f"2d,3d ({why}), got {text!r}")
    return names


def _field(name: str):
    """The argparse type of a plan field's flag: its kind and the lower bound of its one rule
    (:data:`useg.spec.BOUNDS`), and for whole numbers the upper one too; the plan refuses the rest of
    it, naming the flag."""
    bound = BOUNDS[name]
    high = bound.high - 1 if bound.whole else float("inf")
    return _number(int if bound.whole else float, bound.low, bound.low_ok, bound.what, high=high)


def _percentile(text: str) -> float:
    value = _number(float, 0.0, True, "a percentile in [0, 100]")(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a percentile in [0, 100], got {text!r}")
    return value


def _device(text: str) -> str:
    """A --device value torch knows and this machine has ("auto" is decided later); the text itself."""
    if text != "auto":
        from .runtime import pick_device

        try:
            pick_device(text)
        except UsegError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _setup_logging(quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # logs go to stderr: stdout is the command's result (`useg plan --json > plan.json` stays JSON)
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    root = logging.getLogger("useg")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # tifffile logs its own warnings for damaged files before useg's one-sentence error
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the ONNX exporter narrates every pass
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _spec(a: argparse.Namespace) -> DataSpec:
    """The DataSpec of --labels, --channels, --label, --image-pattern, --mask-pattern and --roi."""
    return DataSpec(mask_values=a.labels, channel_names=a.channels, label_name=a.label,
                    image_pattern=a.image_pattern, mask_pattern=a.mask_pattern, roi_dir=a.roi)


def _channels(report) -> str:
    """"3 channel(s)", "channels differ (1, 3)" or "channels unknown (no readable image)"."""
    if report.num_channels is not None:
        return f"{report.num_channels} channel(s)"
    counts = sorted({r.num_channels for r in report.records})
    if counts:
        return f"channels differ ({', '.join(map(str, counts))})"
    return "channels unknown (no readable image)"


def cmd_check(a: argparse.Namespace) -> int:
    from .check import check_dataset

    report = check_dataset(a.data, _spec(a))
    print(f"{a.data}: {len(report.cases)} cases, {_channels(report)}")
    if report.label_map is not None:
        lm = report.label_map
        print(f"classes: {lm.num_classes} (mask values {list(lm.values)}, {lm.mode})")
    for key, value in (report.stats or {}).items():
        print(f"{key}: {value}")
    if report.problems:
        print(f"{len(report.problems)} problem(s):", file=sys.stderr)
        for p in report.problems:
            print(f"- {p}", file=sys.stderr)
        return 2
    print("no problems found")
    return 0


def _overrides(a: argparse.Namespace) -> Overrides:
    """The Overrides of the plan and train flags (--preset, --width, --epochs, --patch, ...)."""
    model = {k: getattr(a, k) for k in ("width", "depth", "padding", "up", "dropout")
             if getattr(a, k) is not None}
    if a.norm is not None:
        model["norm"] = None if a.norm == "none" else a.norm
    train = {k: getattr(a, k) for k in ("epochs", "lr", "optimizer", "loss", "seed", "precision", "workers")
             if getattr(a, k, None) is not None}
    if a.iters is not None:
        train["iters_per_epoch"] = a.iters
    if a.batch_size is not None:
        train["batch_size"] = a.batch_size
    if getattr(a, "deterministic", False):
        train["deterministic"] = True
    infer = {"tta": True} if getattr(a, "tta", False) else {}
    configs = getattr(a, "configs", None)  # one: that configuration; two: useg.configs trains each
    return Overrides(preset=a.preset or "default", model=model, train=train, infer=infer, patch_size=a.patch,
                     memory_gb=a.memory_gb, regions=_regions(a.regions),
                     configuration=configs[0] if configs and len(configs) == 1 else None)


def cmd_plan(a: argparse.Namespace) -> int:
    from .check import check_dataset
    from .fingerprint import fingerprint
    from .planner import explain, plan_dataset
    from .sizing import explain_sizing, size_for_budget

    report = check_dataset(a.data, _spec(a))
    if not report.ok:
        raise UsegError("\n".join(report.problems))
    if a.configs and len(a.configs) > 1:
        return _plan_configurations(a, report)
    overrides = _overrides(a)  # one --configs: the planner's configuration (it refuses 3d for 2D images)
    plan, reasons = plan_dataset(report, overrides, device=a.device)
    plan = size_for_budget(plan, overrides, a.time_budget, a.device, plan_config=lambda c: plan_dataset(
        report, dataclasses.replace(overrides, configuration=c), device=a.device)[0])  # volumes: 2D on slices
    if a.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print("fingerprint:")
    for key, value in fingerprint(report).items():
        print(f"  {key}: {value}")
    print("choices:")
    for line in reasons + explain_sizing(plan.sizing) + explain(plan).splitlines():
        print(f"  {line}")
    return 0


def _plan_configurations(a: argparse.Namespace, report) -> int:
    """`useg plan --configs 2d,3d`: the plan of each configuration (with --json, {name: plan.json})."""
    import dataclasses

    from .configrun import data_dims, refuse_unfit
    from .planner import explain, plan_dataset
    from .sizing import explain_sizing, size_for_budget

    refuse_unfit(data_dims(report), a.configs, a.data)
    plans = {}
    for name in a.configs:
        overrides = dataclasses.replace(_overrides(a), configuration=name)
        plan, reasons = plan_dataset(report, overrides, device=a.device)
        # the configuration is fixed, so sizing keeps it (no plan_config)
        plans[name] = (size_for_budget(plan, overrides, a.time_budget, a.device), reasons)
    if a.json:
        print(json.dumps({name: plan.to_dict() for name, (plan, _) in plans.items()}, indent=2))
        return 0
    for name, (plan, reasons) in plans.items():
        print(f"configuration {name}:")
        for line in reasons + explain_sizing(plan.sizing) + explain(plan).splitlines():
            print(f"  {line}")
    return 0


# `useg train` options that shape a new run only: --resume continues the run's own plan.json and split
NEW_RUN_ONLY = ("preset", "labels", "patch", "width", "depth", "padding", "up", "norm", "dropout", "epochs",
                "iters", "batch_size", "lr", "optimizer", "loss", "seed", "precision", "workers",
                "deterministic", "tta", "memory_gb", "regions", "val", "exclude", "configs")
# the options --resume applies: where the data is and how to read it again, this call's device and budget
RESUME_APPLIES = ("data", "out", "resume", "overwrite", "time_budget", "device", "quiet", "channels", "label",
                  "mask_pattern", "image_pattern", "roi", "folds", "fold")


def _refuse_resume_overrides(a: argparse.Namespace) -> None:
    """Options --resume cannot apply are refused, never silently dropped (the parser leaves the
    ungiven ones None, or False for switches)."""
    if not a.resume:
        return
    if a.overwrite:
        raise UsegError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    given = [f"--{k.replace('_', '-')}" for k in NEW_RUN_ONLY if getattr(a, k) not in (None, False)]
    if given:
        them = "them" if len(given) > 1 else "it"
        raise UsegError(f"{', '.join(given)} cannot change a run on --resume, which continues "
                        f"{Path(a.out) / 'plan.json'} and its split as they are; drop {them}, or start a new "
                        "run with --overwrite (or another --out)")


def cmd_train(a: argparse.Namespace) -> int:
    from . import runtime
    from .pipeline import train_folder
    from .runlog import is_multi_configuration

    _refuse_resume_overrides(a)
    if (a.configs and len(a.configs) > 1) or (a.resume and is_multi_configuration(a.out)):
        return _train_configurations(a)
    result = train_folder(
        a.data, a.out, spec=_spec(a), overrides=_overrides(a), val=a.val, exclude=a.exclude,
        time_budget_min=a.time_budget, resume=a.resume, overwrite=a.overwrite, device=a.device, quiet=a.quiet,
        folds=a.folds, fold=a.fold,
    )
    if not runtime.main_process():  # under torchrun, rank 0 speaks for the job
        return 0
    if a.folds is not None or a.fold is not None:
        _print_folds(result)
        return 0
    print(f"trained {result.epochs} epochs ({result.steps} steps) in {result.minutes:.1f} min; "
          f"best val dice {result.best_dice:.4f} at epoch {result.best_epoch}; run in {result.run}")
    return 0


def _train_configurations(a: argparse.Namespace) -> int:
    """`useg train --configs 2d,3d` (or --resume of such a run): :func:`useg.configs.train_configurations`."""
    from .configs import train_configurations

    if a.overwrite or a.fold is not None:
        flag = "--overwrite" if a.overwrite else "--fold"
        raise UsegError(f"{flag} does not apply to a multi-configuration run (--configs 2d,3d); drop it "
                        f"(delete {a.out} to train it again)")
    result = train_configurations(
        a.data, a.out, configurations=a.configs or (), spec=_spec(a), overrides=_overrides(a), val=a.val,
        exclude=a.exclude, folds=a.folds, time_budget_min=a.time_budget, resume=a.resume, device=a.device,
        quiet=a.quiet)
    for name, score in result.record["candidates"].items():
        print(f"{name}: mean foreground dice {score['dice']:.4f} on {result.record['scored_on']}")
    print(f"chosen: {'+'.join(result.record['chosen'])}; run in {result.run} (configuration.json)")
    return 0


def _print_folds(result) -> None:
    """What a cross-validated ``useg train`` did: the folds it trained, then cv.json's figure."""
    for k, r in sorted(result.trained.items()):
        print(f"fold {k}: {r.epochs} epochs ({r.steps} steps) in {r.minutes:.1f} min; best val dice "
              f"{r.best_dice:.4f}")
    if result.summary is None:
        print(f"{len(result.trained)} fold(s) trained; {result.run}/cv.json follows when all "
              f"{result.folds} folds are complete")
    else:
        print(f"cross-validated foreground dice {result.summary['foreground']['dice']:.4f} over "
              f"{result.summary['n_cases']} cases ({result.folds} folds); run in {result.run}")


def cmd_predict(a: argparse.Namespace) -> int:
    import dataclasses

    from rich.progress import Progress

    from . import runtime, shards
    from .autotune import load_segmenter
    from .dataset import prediction_inputs

    missing = [p for p in a.inputs if not Path(p).exists()]
    if missing:  # before loading the model: a typo should fail at once
        raise UsegError(f"{missing[0]} does not exist; check the path")
    _refuse_idle_predict_options(a)
    with shards.joined(a.device) as device:  # under torchrun: this rank's GPU or CPU share, its inputs
        seg = load_segmenter(a.run, device=device, backend=a.backend, postprocessing=not a.no_postprocessing,
                             folds=a.folds, configuration=a.configs[0] if a.configs else None)
        changes = {k: True for k in ("tta", "largest_component") if getattr(a, k)}
        if changes:
            seg.plan = dataclasses.replace(seg.plan, infer=dataclasses.replace(seg.plan.infer, **changes))
        files = prediction_inputs(a.inputs, seg.plan.data.channel_names)
        shard = shards.current()
        autotune = runtime.cudnn_autotune(seg.backend.device)
        with Progress(disable=a.quiet or shard.rank > 0) as progress, autotune:
            task = progress.add_task("predict", total=len(files))
            written = seg.predict_files(
                files, a.out, overwrite=a.overwrite, instances=a.instances, probabilities=a.probabilities,
                watershed=a.watershed, roi=a.roi, mask_format=a.mask_format, skip_existing=a.skip_existing,
                progress=lambda done, total: progress.update(task, completed=done, total=total))
    where = f" (rank {shard.rank} of {shard.world})" if shard.world > 1 else ""
    print(f"wrote {len(written)} {'instance ' if a.instances else ''}mask(s) to {a.out}{where}")
    return 0


def _refuse_idle_predict_options(a: argparse.Namespace) -> None:
    """Options that would have no effect together are refused, never silently dropped."""
    if a.watershed and not a.instances:
        raise UsegError("--watershed splits instance masks and needs --instances; add --instances or "
                        "drop --watershed")
    if a.overwrite and a.skip_existing:
        raise UsegError("--overwrite replaces the masks already in --out and --continue keeps them, not "
                        "both; choose one")
    if a.configs and len(a.configs) > 1:
        raise UsegError("predict --configs takes one configuration, 2d or 3d; without it a "
                        "multi-configuration run predicts with the one(s) its configuration.json chose")
    if a.instances and a.probabilities:
        raise UsegError("--instances writes object ids and --probabilities writes class probabilities, "
                        "not both; choose one (run predict twice into two --out folders for both)")


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(a.run, a.out, a.format, a.opset)
    if path.suffix == ".json":  # a cross-validated run: one export per fold, combined by the sidecar
        print(f"exported every fold of {a.run}; {path} says how to combine them")
    else:
        print(f"exported {path} (settings in {path}.json)")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_folders
    from .evaluate_summary import format_table

    summary, paths = evaluate_folders(a.pred, a.truth, out_dir=a.out, run=a.run, labels=a.labels,
                                      regions=a.regions, instances=a.instances, roi=a.roi,
                                      probabilities=a.probabilities)
    print(format_table(summary))
    print(f"per-case metrics: {paths[0]} and {paths[1]}")
    return 0


def cmd_postprocess(a: argparse.Namespace) -> int:
    from .postprocess_run import RECORD, determine_postprocessing, format_decision

    _, record = determine_postprocessing(a.run, a.predictions, a.truth, roi=a.roi, percentile=a.percentile,
                                         tolerance=a.tolerance)
    print(format_decision(record))
    print(f"decision and figures: {Path(a.run) / RECORD} (applied by 'useg predict {a.run}')")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    dice = run_demo(a.out, minutes=a.minutes, quiet=a.quiet, device=a.device)
    print(f"demo: dice={dice:.2f}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .runtime import info

    for key, value in info().items():
        print(f"{key}: {value}")
    if a.run is not None:  # its post-processing, and its backends timed here (measured now unless cached)
        from .autotune import info_table
        from .configrun import chosen_runs, describe_choice
        from .postprocess_run import describe_run

        runs = chosen_runs(a.run)  # a multi-configuration run: its choice, then each chosen configuration
        if runs is not None:
            print("\n".join(describe_choice(a.run)))
        for run in runs or [a.run]:
            print("\n".join(describe_run(run)))
            print(info_table(run))
    return 0


def _regions(spec: str | None) -> dict | None:
    from .evaluate import parse_regions

    try:
        return parse_regions(spec)
    except ValueError as e:
        raise UsegError(str(e)) from None


def _layout_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--channels", type=lambda t: [v for v in t.split(",") if v],
                    help="case folders: channel file-name prefixes in order, e.g. Flair,T1c")
    sp.add_argument("--label", help="case folders: the label file-name prefix, e.g. seg")
    sp.add_argument("--mask-pattern", help="a mask's name around its image's, e.g. {stem}_seg "
                    "(default: equal names, _mask/_label/_seg, shared prefixes/suffixes or one number)")
    sp.add_argument("--image-pattern", help="with --mask-pattern: the part of an image's name that is "
                    "shared, e.g. {stem}_img (default: {stem}, the whole name)")
    _roi_arg(sp, "labels count only inside it (training ignores the rest)")


def _roi_arg(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--roi", metavar="DIR",
                    help=f"one region-of-interest mask per image, named like it (non-zero = inside): {what}")


def _common(sp: argparse.ArgumentParser, device: bool = True) -> None:
    sp.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    if device:
        sp.add_argument("--device", default="auto", type=_device,
                        help="auto (cuda, mps, cpu), cpu, cuda, cuda:1 ...")


def _add_check(sub) -> None:
    """`useg check`."""
    c = sub.add_parser("check", help="list every problem in a data folder")
    c.add_argument("data", help="folder with images/ and masks/")
    c.add_argument("--labels", type=_ints, help="the masks' values, e.g. 0,255 (default: inferred)")
    _layout_args(c)
    _common(c, device=False)
    c.set_defaults(fn=cmd_check)


def _plan_options(t: argparse.ArgumentParser) -> None:
    """The options of `useg plan` and `useg train`: the preset and every plan field they override."""
    t.add_argument("data", help="folder with images/ and masks/")
    t.add_argument("--preset", choices=["default", "paper"],  # None when not given (see --resume)
                   help="named recipe: default (the default), or paper (Ronneberger et al. 2015)")
    t.add_argument("--labels", type=_ints, help="the masks' values, e.g. 0,255 (default: inferred)")
    t.add_argument("--patch", type=_ints, help="training patch, e.g. 256,256")
    t.add_argument("--width", type=int, help="channels at the first level")
    t.add_argument("--depth", type=int, help="number of poolings")
    t.add_argument("--padding", choices=["same", "valid"])
    t.add_argument("--up", choices=["transpose", "interp"])
    t.add_argument("--norm", choices=["none", "batch", "instance"])
    t.add_argument("--dropout", type=_field("dropout"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--iters", type=int, help="optimizer steps per epoch")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=_field("lr"))
    t.add_argument("--optimizer", choices=["adamw", "sgd"])
    t.add_argument("--loss", choices=["dice_ce", "ce", "dice"])
    t.add_argument("--seed", type=_field("seed"))
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--workers", type=_field("workers"),
                   help="DataLoader workers (default: from the machine)")
    t.add_argument("--deterministic", action="store_true",
                   help="fp32 and deterministic kernels: a resumed run equals an uninterrupted one")
    t.add_argument("--tta", action="store_true", help="flip test-time augmentation at inference")
    t.add_argument("--memory-gb", type=_POSITIVE,
                   help="training memory budget for planning (default: from the machine)")
    t.add_argument("--regions", help="train on nested regions (mask values, outer to inner): 'brats' or "
                   "WT=1,2,3,4;TC=1,3,4;ET=4")
    t.add_argument("--configs", type=_configs, help="2d (a 2D network, on the slices of volumes), 3d, or "
                   "2d,3d: train both, each in --out/2d and --out/3d, and choose the best or their ensemble "
                   "by the validation Dice (--out/configuration.json)")
    _layout_args(t)


def _add_plan(sub) -> None:
    t = sub.add_parser("plan", help="print the plan for a data folder")
    _plan_options(t)
    t.add_argument("--json", action="store_true", help="print plan.json instead of the explanation")
    t.add_argument("--time-budget", type=_POSITIVE, help="minutes of training: size the network to this "
                   "machine's compute as 'useg train --time-budget' does (times a few steps)")
    _common(t)
    t.set_defaults(fn=cmd_plan)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a U-Net")
    _plan_options(t)
    t.add_argument("--out", required=True, help="the run folder to write")
    t.add_argument("--val", help="validation cases by stem: 3,7 or 25-29 (default: a seeded 20%%)")
    t.add_argument("--exclude", help="cases kept out entirely (a test set): 25-29")
    t.add_argument("--time-budget", type=_POSITIVE, help="minutes of training, validation included")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--folds", type=_number(int, 2, True, "a whole number >= 2"),
                   help="k-fold cross-validation: one run per fold in --out/fold_K, split by case in "
                   "--out/splits.json (editable), out-of-fold metrics in --out/cv.json")
    t.add_argument("--fold", type=_number(int, 0, True, "a whole number >= 0"),
                   help="train only this fold of a cross-validated run (folds run "
                   "in parallel, one per machine); cv.json is written by the call that completes the last")
    _common(t)
    t.set_defaults(fn=cmd_train)


def _add_predict(sub) -> None:
    """`useg predict`."""
    pr = sub.add_parser("predict", help="segment images with a trained run")
    pr.add_argument("run", help="run folder made by 'useg train'")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True, help="folder for the masks")
    pr.add_argument("--overwrite", action="store_true", help="replace masks already in --out")
    pr.add_argument("--continue", dest="skip_existing", action="store_true",
                    help="keep the masks already in --out (they are complete) and predict the rest")
    pr.add_argument("--tta", action="store_true", help="average over flips (slower, a little better)")
    pr.add_argument("--lcc", dest="largest_component", action="store_true",
                    help="keep only the largest connected component of each class")
    pr.add_argument("--instances", action="store_true",
                    help="write instance labels: connected components of the foreground class (class 1)")
    pr.add_argument("--watershed", action="store_true",
                    help="with --instances: split touching objects by a seeded watershed on the distance map")
    pr.add_argument("--probabilities", choices=["float16", "uint8"],
                    help="write class probabilities (NAME_probs.tif or .nii.gz) instead of masks")
    pr.add_argument("--mask-format", choices=["png", "tif", "nii.gz"],
                    help="write every mask in this format (default: the input's; TIFF where it cannot hold "
                    "the mask values)")
    pr.add_argument("--backend", default="auto",
                    choices=["auto", "torch", "torch-fp32", "torch-channels-last", "torch-bf16", "torch-fp16",
                             "onnxruntime", "openvino"],
                    help="auto (default): the fastest that agrees with fp32, timed once on this machine "
                    "(see 'useg info RUN'); torch: the run's precision; onnxruntime and openvino run the "
                    "model.onnx of 'useg export'")
    pr.add_argument("--no-postprocessing", action="store_true",
                    help="ignore RUN/postprocessing.json (made by 'useg postprocess'): write the raw masks")
    pr.add_argument("--folds", type=_ints, help="of a cross-validated run: the folds to ensemble, e.g. 0,2 "
                    "(default: all; their probabilities are averaged)")
    pr.add_argument("--configs", type=_configs, help="of a multi-configuration run (train --configs 2d,3d): "
                    "predict with this configuration only, 2d or 3d (default: the one(s) it chose)")
    _roi_arg(pr, "pixels outside it are written as background")
    _common(pr)
    pr.set_defaults(fn=cmd_predict)


def _add_export(sub) -> None:
    """`useg export`."""
    ex = sub.add_parser("export", help="export a run's network to ONNX or TorchScript, verified")
    ex.add_argument("run", help="run folder made by 'useg train'")
    ex.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    ex.add_argument("--out", help="the model file (default: RUN/model.onnx or RUN/model.pt)")
    ex.add_argument("--opset", type=_number(int, 7, True, "an ONNX opset >= 7"),
                    help="ONNX opset (default: the exporter's)")
    _common(ex, device=False)
    ex.set_defaults(fn=cmd_export)


def _add_evaluate(sub) -> None:
    """`useg evaluate`."""
    ev = sub.add_parser("evaluate", help="compare predicted masks with the truth")
    ev.add_argument("pred", help="folder of predicted masks")
    ev.add_argument("truth", help="folder of true masks (or a data folder with masks/)")
    ev.add_argument("--run",
                    help="the run whose label map decodes the masks (default: inferred from the truth)")
    ev.add_argument("--labels", type=_ints, help="the masks' values, e.g. 0,255")
    ev.add_argument("--out", help="where metrics.csv/json go (default: the prediction folder)")
    ev.add_argument("--regions", help="nested regions to score with Dice, HD95 and ASSD: 'brats' or "
                    "NAME=1,2,3;NAME=4")
    ev.add_argument("--instances", action="store_true",
                    help="also score objects: precision/recall/F1 at IoU 0.5 and the adapted Rand error")
    _roi_arg(ev, "only pixels inside it are scored")
    ev.add_argument("--probabilities", action="store_true",
                    help="score the NAME_probs maps of 'useg predict --probabilities': ROC AUC, average "
                    "precision, F1 at the best threshold and at 0.5, sensitivity, specificity, accuracy")
    _common(ev, device=False)
    ev.set_defaults(fn=cmd_evaluate)


def _add_postprocess(sub) -> None:
    """`useg postprocess`."""
    pp = sub.add_parser("postprocess", help="choose post-processing from predictions of labelled cases "
                        "(out-of-fold): RUN/postprocessing.json, applied by predict")
    pp.add_argument("run", help="run folder made by 'useg train'")
    pp.add_argument("--predictions", required=True, help="folder of predicted masks (RUN/cv/predictions)")
    pp.add_argument("--truth", required=True, help="their true masks (or a data folder with masks/)")
    pp.add_argument("--percentile", type=_percentile, default=1.0,
                    help="minimum-size candidate: this percentile of the true object sizes (default 1)")
    pp.add_argument("--tolerance", type=_number(float, 0.0, True, "a number >= 0"), default=1e-4,
                    help="the Dice any class may lose to a kept step (default 0.0001)")
    _roi_arg(pp, "only pixels inside it are scored")
    _common(pp, device=False)
    pp.set_defaults(fn=cmd_postprocess)


def _add_demo(sub) -> None:
    """`useg demo`."""
    d = sub.add_parser("demo", help="train, predict and evaluate on built-in synthetic cells")
    d.add_argument("--out", default="demo-out", help="folder for data, run, masks and report")
    d.add_argument("--minutes", type=_POSITIVE, default=2.0, help="training time budget")
    _common(d)
    d.set_defaults(fn=cmd_demo)


def _add_info(sub) -> None:
    """`useg info`."""
    i = sub.add_parser("info", help="versions, device, precision and threads (and a run's post-processing "
                       "and prediction backends)")
    i.add_argument("run", nargs="?", help="a run folder: also show its post-processing and time its "
                   "prediction backends on this machine")
    i.set_defaults(fn=cmd_info, quiet=False)


def build_parser() -> argparse.ArgumentParser:
    from .runtime import package_version

    p = argparse.ArgumentParser(prog="useg", description="U-Net segmentation for biomedical images.")
    p.add_argument("--version", action="version", version=f"useg {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_check, _add_plan, _add_train, _add_predict, _add_export, _add_evaluate, _add_postprocess,
                _add_demo, _add_info):
        add(sub)  # one function per subcommand, in the order of the data flow
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.fn(args)
    except UsegError as e:
        print(f"useg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # every write goes to a temporary name first, so nothing half-written is left behind
        where = e.filename or "a file"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = f"cannot write {where} ({e.strerror}); free some space or choose another --out"
        else:  # permissions or a read-only file system: reading or writing
            msg = f"cannot access {where} ({e.strerror}); check its permissions or choose another folder"
        print(f"useg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
