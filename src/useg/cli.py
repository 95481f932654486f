"""The ``useg`` command: runs the parsed subcommand (:mod:`useg.cli_parser` parses) by calling the library."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
from pathlib import Path

from .cli_parser import build_parser
from .errors import UsegError
from .spec import DataSpec, Overrides

logger = logging.getLogger("useg")


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

    from .configrun import refuse_unfit, report_dims
    from .planner import explain, plan_dataset
    from .sizing import explain_sizing, size_for_budget

    refuse_unfit(report_dims(report), a.configs, a.data)
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
        from .runlog import CONFIGS_FILE, is_multi_configuration

        them = "them" if len(given) > 1 else "it"
        if is_multi_configuration(Path(a.out)):  # no plan.json of its own, and never overwritten whole
            raise UsegError(f"{', '.join(given)} cannot change a run on --resume, which continues the "
                            f"configurations of {Path(a.out) / CONFIGS_FILE} as they are; drop {them}, or "
                            "start a new run in another --out")
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


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "train": cmd_train, "predict": cmd_predict,
            "export": cmd_export, "evaluate": cmd_evaluate, "postprocess": cmd_postprocess, "demo": cmd_demo,
            "info": cmd_info}  # what each subcommand of :func:`useg.cli_parser.build_parser` runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command](args)
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
