"""The ``useg`` command's arguments: one parser function per subcommand, and the flag types.

Each numeric flag's type applies the one value rule of its plan field (:data:`useg.spec.BOUNDS`),
so the parser and the plan refuse the same values; every other check is the library's. The
commands themselves, and what a subcommand runs, are :mod:`useg.cli`'s.
"""

from __future__ import annotations

import argparse

from .errors import UsegError
from .spec import BOUNDS, CONFIGURATIONS


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
                   "2d,3d (train: both, each in --out/2d and --out/3d, then the best or their ensemble by "
                   "the validation Dice, in --out/configuration.json; plan: both plans)")
    _layout_args(t)


def _add_plan(sub) -> None:
    t = sub.add_parser("plan", help="print the plan for a data folder")
    _plan_options(t)
    t.add_argument("--json", action="store_true", help="print plan.json instead of the explanation")
    t.add_argument("--time-budget", type=_POSITIVE, help="minutes of training: size the network to this "
                   "machine's compute as 'useg train --time-budget' does (times a few steps)")
    _common(t)


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
                             "onnxruntime", "openvino", "openvino-bf16"],
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


def _add_export(sub) -> None:
    """`useg export`."""
    ex = sub.add_parser("export", help="export a run's network to ONNX or TorchScript, verified")
    ex.add_argument("run", help="run folder made by 'useg train'")
    ex.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    ex.add_argument("--out", help="the model file (default: RUN/model.onnx or RUN/model.pt)")
    ex.add_argument("--opset", type=_number(int, 7, True, "an ONNX opset >= 7"),
                    help="ONNX opset (default: the exporter's)")
    _common(ex, device=False)


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


def _add_demo(sub) -> None:
    """`useg demo`."""
    d = sub.add_parser("demo", help="train, predict and evaluate on built-in synthetic cells")
    d.add_argument("--out", default="demo-out", help="folder for data, run, masks and report")
    d.add_argument("--minutes", type=_POSITIVE, default=2.0, help="training time budget")
    _common(d)


def _add_info(sub) -> None:
    """`useg info`."""
    i = sub.add_parser("info", help="versions, device, precision and threads (and a run's post-processing "
                       "and prediction backends)")
    i.add_argument("run", nargs="?", help="a run folder: also show its post-processing and time its "
                   "prediction backends on this machine")
    i.set_defaults(quiet=False)


def build_parser() -> argparse.ArgumentParser:
    from .runtime import package_version

    p = argparse.ArgumentParser(prog="useg", description="U-Net segmentation for biomedical images.")
    p.add_argument("--version", action="version", version=f"useg {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_check, _add_plan, _add_train, _add_predict, _add_export, _add_evaluate, _add_postprocess,
                _add_demo, _add_info):
        add(sub)  # one function per subcommand, in the order of the data flow
    return p
