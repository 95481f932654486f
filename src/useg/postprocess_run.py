"""Post-processing at the run level: chosen from a run's out-of-fold predictions, recorded in
``RUN/postprocessing.json`` and read back by :meth:`useg.predict.Segmenter.load`.

:func:`determine_postprocessing` (``useg postprocess RUN --predictions DIR --truth DIR``, nnU-Net's
``nnUNetv2_determine_postprocessing``) pairs the predicted masks with the true ones as ``useg
evaluate`` does (the run's label map: 0/255 masks, palettes, NIfTI), measures the true objects'
sizes, lets :func:`useg.postprocess.choose_postprocessing` decide and writes the decision with its
figures atomically. :func:`read_postprocessing` validates the file; :func:`format_decision`
is the table the command prints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import postprocess
from .errors import UsegError
from .files import atomic_write_text, strict_json
from .postprocess import Postprocessing

logger = logging.getLogger(__name__)

RECORD = "postprocessing.json"  # in a run folder: the chosen post-processing and its figures


def determine_postprocessing(run: str | Path, predictions_dir: str | Path, truth_dir: str | Path, *,
                             roi: str | Path | None = None, percentile: float = postprocess.PERCENTILE,
                             tolerance: float = postprocess.TOLERANCE, connectivity: int | None = None
                             ) -> tuple[Postprocessing, dict]:
    """Choose ``run``'s post-processing from predictions and their truth; write ``RUN/postprocessing.json``.

    Args:
        run: the run folder (its plan.json holds the label map).
        predictions_dir: predicted masks, as ``useg predict`` writes them: the out-of-fold
            predictions of a cross-validation (``RUN/cv/predictions``).
        truth_dir: the true masks (or a data folder with ``masks/``): the training masks, whose
            object sizes also give the minimum-size candidates.
        roi: a folder of region-of-interest masks: only pixels inside are scored.
        percentile: the minimum-size candidate of a class is this percentile of its true object
            sizes in voxels (:func:`useg.postprocess.min_sizes_from`).
        tolerance: the Dice any class may lose to a kept step.
        connectivity: of the components (None: faces, edges and corners).

    Returns:
        (the chosen post-processing, the record written: decision, figures, candidates, inputs).

    Raises:
        UsegError: no run folder, no foreground class, and whatever ``useg evaluate`` refuses in
            the two folders (no pairs, unknown values, shape mismatches).
    """
    # evaluation's pairing reads masks and probability maps, which reading a record (predict) does not need
    from .evaluate_pairs import decoded_pairs

    run = Path(run)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if not (run / "plan.json").is_file():
        raise UsegError(f"{run} is not a run folder (no plan.json); pass the --out folder of 'useg train'")
    label_map, cases = decoded_pairs(predictions_dir, truth_dir, run=run, roi=roi)
    classes = list(range(1, label_map.num_classes))
    if not classes:
        raise UsegError(f"the run {run} has no foreground class, so there is nothing to post-process")
    dtype = np.int8 if label_map.num_classes < 127 else np.int32  # the pairs are held in memory
    names, pairs = [], []
    for name, pred, truth in cases:
        names.append(name)
        pairs.append((pred.astype(dtype), truth.astype(dtype)))
    sizes = postprocess.object_sizes((t for _, t in pairs), classes, connectivity)  # of the true objects
    candidates = postprocess.min_sizes_from(sizes, percentile)
    pp, figures = postprocess.choose_postprocessing(pairs, classes, candidates, tolerance, connectivity)
    record = _keys_as_text({"postprocessing": pp.to_dict(), "description": pp.describe(), "figures": figures,
              "min_size_candidates": candidates, "percentile": percentile, "tolerance": tolerance,
              "n_cases": len(pairs), "cases": names, "class_values": list(label_map.values),
              "predictions": str(Path(predictions_dir).resolve()), "truth": str(Path(truth_dir).resolve())})
    atomic_write_text(run / RECORD, strict_json(record) + "\n")
    logger.info("post-processing of %s chosen on %d case(s): %s", run, len(pairs), "; ".join(pp.describe()))
    return pp, record


def read_postprocessing(run: str | Path, num_classes: int | None = None) -> Postprocessing | None:
    """The post-processing recorded in ``RUN/postprocessing.json``, or None without one.

    Args:
        run: the run folder.
        num_classes: K of the run's labels; classes the record names must be below it.

    Raises:
        UsegError: a file that is not JSON, not a record of :func:`determine_postprocessing`, or
            names classes the run does not have.
    """
    path = Path(run) / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or "postprocessing" not in record:
            raise ValueError("no 'postprocessing' entry")
        pp = Postprocessing.from_dict(record["postprocessing"])
        if num_classes is not None and any(c >= num_classes for c in pp.classes):
            raise ValueError(f"it names class {max(pp.classes)} but the run has {num_classes} classes")
    except (OSError, ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = str(e) or type(e).__name__
        raise UsegError(f"{path} is not a valid post-processing record ({why}); delete it or write it again "
                        "with 'useg postprocess RUN --predictions DIR --truth DIR'") from None
    return pp


def describe_run(run: str | Path) -> list[str]:
    """Lines for ``useg info RUN``: the recorded post-processing, or that there is none."""
    if not Path(run).is_dir():
        raise UsegError(f"{run} is not a run folder; pass the --out folder of 'useg train'")
    num_classes = None
    if (Path(run) / "plan.json").is_file():  # checked as Segmenter.load checks it
        from .plan import Plan  # the plan pulls in torch, which reading a record alone does not need

        num_classes = Plan.load(Path(run) / "plan.json").data.label_map.num_classes
    pp = read_postprocessing(run, num_classes)
    if pp is None:
        return [f"post-processing: none ({Path(run) / RECORD} does not exist)"]
    return [f"post-processing ({Path(run) / RECORD}, applied by 'useg predict'):",
            *(f"  {line}" for line in pp.describe())]


def format_decision(record: dict) -> str:
    """The table of a :func:`determine_postprocessing` record: one line per step tried.

    Dice columns: the foreground mean, and for a per-class step that class's Dice too.
    """
    fig, values = record["figures"], record.get("class_values", [])

    def name(c: int) -> str:
        return f"class {c} (value {values[c]})" if c < len(values) else f"class {c}"

    rows = []
    for s in fig["steps"]:
        c, before, after = s["class"], s["before"], s["after"]
        what = ("largest foreground component" if c is None else f"{name(c)}: largest component"
                if s["step"] == "largest_class" else f"{name(c)}: objects under {s['min_size']} voxels")
        per_class = (f"{before['classes'][str(c)]:>7.4f}  {after['classes'][str(c)]:>8.4f}" if c is not None
                     else f"{'':>7}  {'':>8}")
        rows.append((what, f"{before['foreground']:>7.4f}  {after['foreground']:>8.4f}  {per_class}  "
                           f"{'yes' if s['kept'] else 'no'}"))
    width = max([len("step tried"), *(len(w) for w, _ in rows)])
    header = f"{'step tried':<{width}}  {'fg Dice':>7}  {'-> after':>8}  {'class':>7}  {'-> after':>8}  kept"
    out = [header, "-" * len(header), *(f"{w:<{width}}  {r}" for w, r in rows), "-" * len(header)]
    out.append(f"foreground Dice {fig['before']['foreground']:.4f} -> {fig['after']['foreground']:.4f} "
               f"over {record['n_cases']} case(s); chosen: {'; '.join(record['description'])}")
    return "\n".join(out)


def _keys_as_text(obj):
    """Class-number keys as strings, as JSON writes them (so a record reads back as it was written)."""
    if isinstance(obj, dict):
        return {str(k): _keys_as_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_keys_as_text(v) for v in obj]
    return obj
