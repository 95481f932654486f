"""The results of ``useg evaluate``: means over cases, ``metrics.csv`` / ``metrics.json``, the table.

:func:`summarize` averages the per-case rows of :func:`useg.metrics.evaluate_case` per class and
over the foreground, :func:`mean_rows` the region rows, :func:`write_metrics` writes both files
atomically (strict JSON) and :func:`format_table` prints a summary.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .files import atomic_write_text, strict_json
from .metrics import METRICS
from .scores import SCORE_METRICS

logger = logging.getLogger(__name__)

COLUMNS = ("case", "class", "name", *METRICS, "tp", "fp", "fn", "pixel_error")


def summarize(rows: Sequence[dict]) -> dict:
    """Means over cases, per class and over the foreground classes.

    Args:
        rows: rows from :func:`useg.metrics.evaluate_case` for any number of cases (one row per
            case and class).

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
        rows: rows from :func:`useg.metrics.evaluate_case`; when any row holds "auc" (probability
            maps), the CSV gains the columns :data:`useg.scores.SCORE_METRICS`.
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
    columns = [*COLUMNS, *SCORE_METRICS] if any("auc" in r for r in clean) else list(COLUMNS)
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(clean)
    csv_text = buf.getvalue()
    # metrics.json is strict JSON: an undefined metric (no positives for an AUC, say) is null
    json_text = strict_json({"cases": clean, "summary": summary, **_plain_tree(extra or {})}) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_text(out_dir / "metrics.csv", csv_text)
    json_path = atomic_write_text(out_dir / "metrics.json", json_text)
    logger.info("metrics of %d case(s) written to %s", summary["n_cases"], out_dir)
    return csv_path, json_path


def format_table(summary: dict) -> str:
    """A plain-text table of a :func:`summarize` result.

    Args:
        summary: the dict returned by :func:`summarize` (with "regions" and "instances" means
            when :func:`useg.evaluate.evaluate_folders` added them).

    Returns:
        Lines: header, one line per class (name, Dice, IoU, precision, recall), the foreground
        mean, and the mean pixel error; regions, objects and the pooled probability metrics
        (one line per foreground class) when the summary has them.
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
        out.append(f"region {name}: Dice {r['dice']:.4f}  IoU {r['iou']:.4f}  "
                   f"HD95 {r['hd95']:.2f}  ASSD {r['assd']:.2f}")
    if "instances" in summary:
        r = summary["instances"]
        out.append(f"objects: precision {r['object_precision']:.4f}  recall {r['object_recall']:.4f}  "
                   f"F1 {r['object_f1']:.4f}  adapted Rand error {r['rand_error']:.4f}")
    if summary.get("probabilities"):
        out.extend(_probability_table(summary["probabilities"], summary["n_cases"]))
    return "\n".join(out)


def mean_rows(rows: Sequence[dict], key: str, metrics: Sequence[str]) -> dict:
    """Per value of ``key``, the nan-skipping mean of each metric (nan when every case is nan)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {k: {m: float(np.nanmean([r[m] for r in g])) if any(np.isfinite(r[m]) for r in g) else float("nan")
                for m in metrics} for k, g in groups.items()}


# ---------------------------------------------------------------------------------------------


def _probability_table(entries: Sequence[dict], n_cases: int) -> list[str]:
    """Lines of the pooled probability metrics, one per foreground class."""
    heads = ("AUC", "AP", "F1 best", "at", "F1@0.5", "sens", "spec", "acc")  # SCORE_METRICS, in order
    width = max(len("class"), *(len(str(e["name"])) for e in entries))
    header = f"{'class':<{width}}  " + "  ".join(f"{h:>7}" for h in heads)
    out = ["", f"probabilities, all pixels of {n_cases} case(s) pooled (F1@0.5, sens, spec, acc: p >= 0.5)",
           header, "-" * len(header)]
    for e in entries:
        out.append(f"{str(e['name']):<{width}}  " + "  ".join(f"{e[k]:>7.4f}" for k in SCORE_METRICS))
    return out


def _plain_tree(obj):
    """Nested dicts, lists and numpy scalars -> JSON-able Python values (keys as strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_tree(v) for v in obj]
    return _plain(obj)


def _plain(value):
    """numpy scalars to Python scalars, so rows serialise to JSON."""
    return value.item() if isinstance(value, np.generic) else value
