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


def write_metrics(rows: Sequence[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (one row per case and class) and ``metrics.json`` atomically.

    Each file is written to a temporary name in ``out_dir`` and moved into place with
    ``os.replace``, so a reader never sees a half-written file; both texts are serialised
    before either is written, so a failure (e.g. a value JSON cannot encode) writes nothing.

    Args:
        rows: rows from :func:`evaluate_case`.
        out_dir: destination folder, created if missing.

    Returns:
        (path of metrics.csv, path of metrics.json).
    """
    out_dir = Path(out_dir)
    clean = [{k: _plain(v) for k, v in row.items()} for row in rows]
    summary = summarize(clean)
    # Both texts are built before either file is touched, so a failure leaves neither behind.
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(clean)
    csv_text = buf.getvalue()
    json_text = json.dumps({"cases": clean, "summary": summary}, indent=2) + "\n"
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
    return "\n".join(out)


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
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return path


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path | None = None,
    run: str | Path | None = None,
    labels: Sequence[int] | None = None,
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

    Returns:
        (summary as from :func:`summarize`, (csv path, json path)).

    Raises:
        UsegError: empty folders, a prediction without truth, unknown values, shape mismatches.
    """
    from .dataset import mask_stem
    from .errors import UsegError
    from .io import MASK_SUFFIXES, read_mask
    from .labels import LabelMap, infer_label_map

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if (truth_dir / "masks").is_dir():
        truth_dir = truth_dir / "masks"
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise UsegError(f"{folder} is not a folder; give the folder of masks")
    preds = sorted(p for p in pred_dir.iterdir() if p.suffix.lower() in MASK_SUFFIXES)
    if not preds:
        raise UsegError(f"{pred_dir} holds no masks; run 'useg predict' into it first")
    truths = {}
    for p in truth_dir.iterdir():
        if p.suffix.lower() in MASK_SUFFIXES:
            truths[mask_stem(p.stem)] = p
    missing = [p.name for p in preds if p.stem not in truths]
    if missing:
        raise UsegError(f"no true mask in {truth_dir} for {', '.join(missing[:5])}; evaluate predictions of labelled images only")
    pairs = [(p, truths[p.stem]) for p in preds]
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
    rows: list[dict] = []
    for pred_path, truth_path in pairs:
        truth = label_map.decode(raw_truth[truth_path][0], path=truth_path)
        pred = label_map.decode(read_mask(pred_path)[0], path=pred_path)
        if pred.shape != truth.shape:
            raise UsegError(f"{pred_path} is {pred.shape} but {truth_path} is {truth.shape}; predict the matching images")
        rows.extend(evaluate_case(pred, truth, label_map.num_classes, names, case=pred_path.stem))
    paths = write_metrics(rows, out_dir or pred_dir)
    return summarize(rows), paths
