"""Segmentation metrics per case and per class, and their summary.

Inputs are class-index label arrays ``(*S)`` of integers (2D or 3D), prediction and truth of the
same shape. Counts per class come from one confusion matrix (:func:`confusion`); every overlap
metric is a ratio of those counts.

Empty-mask rule (used by every function here):

* a class absent from both truth and prediction scores 1.0 on every overlap metric (Dice, IoU,
  precision, recall): predicting nothing where there is nothing is perfect;
* a ratio that is 0/0 while only one side is empty scores 0.0, e.g. precision with an empty
  prediction but a non-empty truth (nothing found), or recall with an empty truth but a
  non-empty prediction (only false positives).

Dice and IoU are never 0/0 with one side non-empty, so only precision and recall use the second
case. Summaries average per-case values (macro over cases), so a case with an absent class that
the model also left empty counts as a success for that class.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "precision", "recall")
COLUMNS = ("case", "class", "name", *METRICS, "tp", "fp", "fn", "pixel_error")


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """True positives, false positives and false negatives per class.

    Args:
        pred: (*S) integer class indices in [0, num_classes).
        truth: (*S) integer class indices in [0, num_classes), same shape.
        num_classes: K.

    Returns:
        (K, 3) int64: columns tp, fp, fn.
    """
    pred, truth = _check_pair(pred, truth)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    k = int(num_classes)
    for name, a in (("pred", pred), ("truth", truth)):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{name} has values in [{a.min()}, {a.max()}], outside [0, {k - 1}]")
    # One bincount over truth * K + pred gives the full K x K matrix (rows truth, columns pred).
    flat = truth.ravel().astype(np.int64) * k + pred.ravel().astype(np.int64)
    cm = np.bincount(flat, minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], axis=1).astype(np.int64)


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice = 2 tp / (2 tp + fp + fn); 1.0 when the class is absent from both sides."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) = tp / (tp + fp + fn); 1.0 when the class is absent from both sides."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def precision(tp: int, fp: int, fn: int) -> float:
    """Precision = tp / (tp + fp); with an empty prediction 1.0 if the truth is empty too, else 0.0."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def recall(tp: int, fp: int, fn: int) -> float:
    """Recall = tp / (tp + fn); with an empty truth 1.0 if the prediction is empty too, else 0.0."""
    tp, fp, fn = _check_counts(tp, fp, fn)
    if tp + fn == 0:
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


def pixel_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels (voxels) whose predicted class differs from the truth.

    Args:
        pred: (*S) class indices.
        truth: (*S) class indices, same shape, non-empty.

    Returns:
        A float in [0, 1].
    """
    pred, truth = _check_pair(pred, truth)
    if pred.size == 0:
        raise ValueError("pixel_error needs non-empty arrays")
    return float(np.count_nonzero(pred != truth) / pred.size)


def evaluate_case(
    pred: np.ndarray,
    truth: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    case: str = "",
) -> list[dict]:
    """All metrics of one case, one row per class.

    Args:
        pred: (*S) predicted class indices.
        truth: (*S) true class indices, same shape.
        num_classes: K.
        class_names: K names; default "background" for class 0 and "class c" for the others.
        case: the case's name, copied into every row.

    Returns:
        K dicts with keys case, class, name, dice, iou, precision, recall, tp, fp, fn,
        pixel_error (the case's, repeated on each row).
    """
    names = _class_names(num_classes, class_names)
    counts = confusion(pred, truth, num_classes)
    err = pixel_error(pred, truth)
    rows = []
    for c, (tp, fp, fn) in enumerate(counts.tolist()):
        row = {"case": str(case), "class": c, "name": names[c]}
        row.update({m: f(tp, fp, fn) for m, f in zip(METRICS, (dice, iou, precision, recall))})
        row.update({"tp": tp, "fp": fp, "fn": fn, "pixel_error": err})
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Means over cases, per class and over the foreground classes.

    Args:
        rows: rows from :func:`evaluate_case` for any number of cases (one row per case and class).

    Returns:
        ``{"classes": [{"class", "name", "n_cases", "dice", "iou", "precision", "recall"}, ...],
        "foreground": {"dice", "iou", "precision", "recall"}, "pixel_error": float,
        "n_cases": int}``. ``foreground`` is the mean of the per-class means over classes
        1..K-1 (over class 0 alone when K == 1); ``pixel_error`` is the mean over cases.
    """
    if not rows:
        raise ValueError("summarize needs at least one row")
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(int(row["class"]), []).append(row)
    classes = []
    for c in sorted(by_class):
        group = by_class[c]
        entry = {"class": c, "name": str(group[0]["name"]), "n_cases": len(group)}
        entry.update({m: float(np.mean([r[m] for r in group])) for m in METRICS})
        classes.append(entry)
    fg = [e for e in classes if e["class"] >= 1] or classes
    first = by_class[classes[0]["class"]]  # one row per case, so each case's error counts once
    return {
        "classes": classes,
        "foreground": {m: float(np.mean([e[m] for e in fg])) for m in METRICS},
        "pixel_error": float(np.mean([r["pixel_error"] for r in first])),
        "n_cases": len(first),
    }


def write_metrics(rows: Sequence[dict], out_dir: str | Path, extra: dict | None = None,
                  summary: dict | None = None) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (one row per case and class) and ``metrics.json`` atomically.

    Each file is written to a temporary name in ``out_dir`` and moved into place with
    ``os.replace``, so a reader never sees a half-written file; both texts are serialised
    before either is written, so a failure (e.g. a value JSON cannot encode) writes nothing.

    Args:
        rows: rows from :func:`evaluate_case`.
        out_dir: destination folder, created if missing.
        extra: more JSON-able results (regions, instances) stored beside ``cases`` and ``summary``.
        summary: the summary the caller already has (default :func:`summarize` of ``rows``).

    Returns:
        (path of metrics.csv, path of metrics.json).
    """
    out_dir = Path(out_dir)
    clean = [{k: _plain(v) for k, v in row.items()} for row in rows]
    summary = _plain_tree(summary) if summary is not None else summarize(clean)
    # Both texts are built before either file is touched, so a failure leaves neither behind.
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(clean)
    csv_text = buf.getvalue()
    json_text = json.dumps({"cases": clean, "summary": summary, **_plain_tree(extra or {})}, indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = _atomic_write(out_dir / "metrics.csv", csv_text)
    json_path = _atomic_write(out_dir / "metrics.json", json_text)
    logger.info("metrics of %d case(s) written to %s", summary["n_cases"], out_dir)
    return csv_path, json_path


def format_table(summary: dict) -> str:
    """A plain-text table of a :func:`summarize` result.

    Args:
        summary: the dict returned by :func:`summarize`.

    Returns:
        Lines: header, one line per class (name, Dice, IoU, precision, recall), the foreground
        mean, and the mean pixel error.
    """
    lines = [(str(e["name"]), *(e[m] for m in METRICS)) for e in summary["classes"]]
    lines.append(("foreground mean", *(summary["foreground"][m] for m in METRICS)))
    width = max(len("class"), *(len(line[0]) for line in lines))
    header = f"{'class':<{width}}  " + "  ".join(f"{h:>9}" for h in ("Dice", "IoU", "precision", "recall"))
    out = [header, "-" * len(header)]
    for i, (name, *values) in enumerate(lines):
        if i == len(lines) - 1:
            out.append("-" * len(header))
        out.append(f"{name:<{width}}  " + "  ".join(f"{v:>9.4f}" for v in values))
    out.append(f"pixel error {summary['pixel_error']:.4f} over {summary['n_cases']} case(s)")
    for name, r in summary.get("regions", {}).items():
        out.append(f"region {name}: Dice {r['dice']:.4f}  IoU {r['iou']:.4f}  HD95 {r['hd95']:.2f}  ASSD {r['assd']:.2f}")
    if "instances" in summary:
        r = summary["instances"]
        out.append(f"objects: precision {r['object_precision']:.4f}  recall {r['object_recall']:.4f}  "
                   f"F1 {r['object_f1']:.4f}  adapted Rand error {r['rand_error']:.4f}")
    return "\n".join(out)


def _plain_tree(obj):
    if isinstance(obj, dict):
        return {str(k): _plain_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_tree(v) for v in obj]
    return _plain(obj)


def parse_regions(spec: str | None) -> dict[str, tuple[int, ...]] | None:
    """``"brats"`` or ``"WT=1,2,3,4;TC=1,3,4;ET=4"`` -> {name: mask values}; None stays None."""
    if not spec:
        return None
    if spec.strip().lower() == "brats":
        from .distances import BRATS_REGIONS

        return dict(BRATS_REGIONS)
    try:
        return {name.strip(): tuple(int(v) for v in values.split(",")) for name, values in
                (part.split("=") for part in spec.split(";") if part.strip())}
    except ValueError:
        raise ValueError(f"cannot read regions {spec!r}; write them like WT=1,2,3,4;TC=1,3,4;ET=4 or 'brats'") from None


def _mean_rows(rows: Sequence[dict], key: str, metrics: Sequence[str]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {k: {m: float(np.nanmean([r[m] for r in g])) if any(np.isfinite(r[m]) for r in g) else float("nan")
                for m in metrics} for k, g in groups.items()}


# ---------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    for name, a in (("pred", pred), ("truth", truth)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    return pred, truth


def _check_counts(tp: int, fp: int, fn: int) -> tuple[int, int, int]:
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    return int(tp), int(fp), int(fn)


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if class_names is None:
        return ["background"] + [f"class {c}" for c in range(1, int(num_classes))]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


def _plain(value):
    """numpy scalars to Python scalars, so rows serialise to JSON."""
    return value.item() if isinstance(value, np.generic) else value


def _atomic_write(path: Path, text: str) -> Path:
    from .files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return path


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path | None = None,
    run: str | Path | None = None,
    labels: Sequence[int] | None = None,
    regions: str | dict | None = None,
    instances: bool = False,
) -> tuple[dict, tuple[Path, Path]]:
    """Evaluate every predicted mask in ``pred_dir`` against the truth mask of the same stem.

    Masks are decoded to class indices with the run's label map (``run``), explicit mask values
    (``labels``), or else the encoding inferred from the truth masks.

    Args:
        pred_dir: folder of predicted masks.
        truth_dir: folder of true masks, or a data folder holding ``masks/``.
        out_dir: where metrics.csv / metrics.json go (default ``pred_dir``).
        run: a run folder whose plan.json holds the label map.
        labels: the masks' stored values, e.g. ``[0, 255]``.
        regions: nested regions in mask values (:func:`parse_regions`), scored with Dice, IoU,
            HD95 and ASSD in the truth's spacing (NIfTI) or in pixels.
        instances: also score the objects of class 1 (object F1 at IoU 0.5, adapted Rand error).

    Returns:
        (summary as from :func:`summarize`, plus "regions" and "instances" means when asked,
        (csv path, json path)).

    Raises:
        UsegError: empty folders, a prediction without truth, unknown values, shape mismatches.
    """
    from .dataset import mask_stem
    from .errors import UsegError
    from .files import stem_of, suffix_of
    from .io import MASK_SUFFIXES, read_mask
    from .labels import LabelMap, infer_label_map

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if (truth_dir / "masks").is_dir():
        truth_dir = truth_dir / "masks"
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise UsegError(f"{folder} is not a folder; give the folder of masks")
    preds = sorted(p for p in pred_dir.iterdir() if suffix_of(p) in MASK_SUFFIXES and not p.name.startswith("."))
    if not preds:
        raise UsegError(f"{pred_dir} holds no masks; run 'useg predict' into it first")
    truths = {}
    for p in truth_dir.iterdir():
        if suffix_of(p) in MASK_SUFFIXES:
            truths[mask_stem(stem_of(p))] = p
    missing = [p.name for p in preds if stem_of(p) not in truths]
    if missing:
        raise UsegError(f"no true mask in {truth_dir} for {', '.join(missing[:5])}; evaluate predictions of labelled images only")
    pairs = [(p, truths[stem_of(p)]) for p in preds]
    try:
        regions = parse_regions(regions) if isinstance(regions, str) else regions
    except ValueError as e:
        raise UsegError(str(e)) from None
    raw_truth = {t: read_mask(t) for _, t in pairs}
    if run is not None:
        from .plan import Plan

        label_map = Plan.load(Path(run) / "plan.json").data.label_map
    else:
        modes = {mode for _, mode, _ in raw_truth.values()}
        mode = modes.pop() if len(modes) == 1 else "grey"
        palette = next((pal for _, m, pal in raw_truth.values() if pal is not None), None)
        value_sets = {str(t): set(np.unique(r).tolist()) for t, (r, _, _) in raw_truth.items()}
        label_map, problems = infer_label_map(value_sets, mode, palette=palette, explicit=labels)
        if problems:
            raise UsegError(problems[0])
    assert isinstance(label_map, LabelMap)
    names = [f"value {v}" if label_map.mode != "rgb" else f"#{v:06x}" for v in label_map.values]
    if regions:
        unknown = sorted({v for vs in regions.values() for v in vs} - set(label_map.values))
        if unknown:
            raise UsegError(f"regions name mask values {unknown} that {truth_dir} does not use; "
                            f"use values of {list(label_map.values)}")
        as_classes = {k: tuple(label_map.values.index(v) for v in vs) for k, vs in regions.items()}
    rows: list[dict] = []
    region_rows: list[dict] = []
    instance_rows: list[dict] = []
    for pred_path, truth_path in pairs:
        truth = label_map.decode(raw_truth[truth_path][0], path=truth_path)
        pred = label_map.decode(read_mask(pred_path)[0], path=pred_path)
        if pred.shape != truth.shape:
            raise UsegError(f"{pred_path} is {pred.shape} but {truth_path} is {truth.shape}; predict the matching images")
        case = stem_of(pred_path)
        rows.extend(evaluate_case(pred, truth, label_map.num_classes, names, case=case))
        if regions:
            from .distances import evaluate_regions
            from .volumes import is_nifti, nifti_spacing

            spacing = nifti_spacing(truth_path) if is_nifti(truth_path) else None
            region_rows.extend({"case": case, **r} for r in evaluate_regions(pred, truth, as_classes, spacing))
        if instances:
            from .instances import evaluate_instances

            instance_rows.append({"case": case, **evaluate_instances(pred, truth, object_class=1)})
    summary, extra = summarize(rows), {}
    if region_rows:
        summary["regions"] = _mean_rows(region_rows, "region", ("dice", "iou", "hd95", "assd"))
        extra["regions"] = region_rows
    if instance_rows:
        keys = ("object_precision", "object_recall", "object_f1", "rand_error")
        summary["instances"] = {k: float(np.mean([r[k] for r in instance_rows])) for k in keys}
        extra["instances"] = instance_rows
    paths = write_metrics(rows, out_dir or pred_dir, extra=extra, summary=summary)
    return summary, paths
