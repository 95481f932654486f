"""Evaluation of a folder of predicted masks against the true masks: the ``useg evaluate`` stage.

:func:`evaluate_folders` takes the (prediction, truth) pairs of :mod:`useg.evaluate_pairs`
decoded with one label map (the run's, explicit values, or the one
:func:`useg.labels.label_map_of_masks` infers from the truth, refusing masks the data check would
flag), scores every case with the array functions of :mod:`useg.metrics`, :mod:`useg.distances`
and :mod:`useg.instances`, and hands the rows to :mod:`useg.evaluate_summary`, which averages
them and writes ``metrics.csv`` / ``metrics.json``. :func:`parse_regions` reads ``--regions``.

With ``probabilities=True`` the predictions are the ``NAME_probs.tif`` / ``NAME_probs.nii.gz``
maps of ``useg predict --probabilities``: their argmax is scored like a mask, and each foreground
class's scores are counted (:mod:`useg.scores`) per case and pooled over all cases for ROC AUC,
average precision, F1 at the best threshold and at 0.5, sensitivity, specificity and accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .distances import BRATS_REGIONS, REGION_METRICS, evaluate_regions
from .errors import UsegError
from .evaluate_pairs import case_stem, prediction_pairs, read_prediction, roi_masks, truth_label_map
from .evaluate_summary import mean_rows, summarize, write_metrics
from .instances import evaluate_instances
from .io import file_spacing, read_mask
from .labels import LabelMap
from .layouts import plain_folders
from .metrics import evaluate_case
from .roi import background_outside, read_roi
from .scores import ScoreCounts, empty_counts, merge, score_metrics

INSTANCE_METRICS = ("object_precision", "object_recall", "object_f1", "rand_error")


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path | None = None,
    run: str | Path | None = None,
    labels: Sequence[int] | None = None,
    regions: str | dict | None = None,
    instances: bool = False,
    probabilities: bool = False,
    roi: str | Path | None = None,
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
        probabilities: score the ``NAME_probs`` maps in ``pred_dir`` (K channels, uint8 as
            round(p * 255) or float) instead of masks; region probabilities are refused.
        roi: a folder with one region-of-interest mask per prediction (non-zero = inside, paired
            by :func:`useg.pairing.pair_stems`): the counts, overlap metrics, pixel error and
            probability scores see only the pixels inside; regions and objects are scored on both
            masks with every pixel outside set to background (cut at the ROI's edge).

    Returns:
        (summary as from :func:`useg.evaluate_summary.summarize`, plus "regions" and "instances"
        means when asked and "probabilities", one entry per foreground class with
        :data:`useg.scores.SCORE_METRICS` pooled over all pixels of all cases, (csv path, json path)).

    Raises:
        UsegError: empty folders, a prediction without truth, truth masks the data check would
            flag (mixed encodings, values no encoding explains, one class only), unknown values,
            shape mismatches; probability maps with other channels than classes, values outside
            [0, 1], given without ``probabilities`` (or missing with it), or with ``regions``;
            a prediction without its ROI mask, an ROI of another size or empty.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    inner = plain_folders(truth_dir).masks  # a data folder: its masks/ (or mask/, labels/, gt/ ...)
    if inner is not None and inner != truth_dir:
        truth_dir = inner
    if probabilities and regions:
        raise UsegError("--probabilities with --regions: useg scores class probabilities, not region "
                        "probabilities (one sigmoid per region); evaluate the region masks "
                        "without --probabilities")
    pairs = prediction_pairs(pred_dir, truth_dir, probabilities)
    rois = roi_masks(pairs, roi) if roi is not None else {}
    try:
        regions = parse_regions(regions) if isinstance(regions, str) else regions
    except ValueError as e:
        raise UsegError(str(e)) from None
    raw_truth = {t: read_mask(t) for _, t in pairs}
    label_map = truth_label_map(raw_truth, truth_dir, run, labels)
    names = [f"value {v}" if label_map.mode != "rgb" else f"#{v:06x}" for v in label_map.values]
    as_classes = _region_classes(regions, label_map, truth_dir) if regions else None
    rows, region_rows, instance_rows, pooled = _score_cases(pairs, raw_truth, label_map, names, as_classes,
                                                            instances, probabilities, rois)
    summary, extra = summarize(rows), {}
    if probabilities:
        summary["probabilities"] = [{"class": c, "name": names[c], **score_metrics(counts)}
                                    for c, counts in enumerate(pooled, start=1)]
    if region_rows:
        summary["regions"] = mean_rows(region_rows, "region", REGION_METRICS)
        extra["regions"] = region_rows
    if instance_rows:
        summary["instances"] = {k: float(np.mean([r[k] for r in instance_rows])) for k in INSTANCE_METRICS}
        extra["instances"] = instance_rows
    paths = write_metrics(rows, out_dir or pred_dir, extra=extra, summary=summary)
    return summary, paths


def parse_regions(spec: str | None) -> dict[str, tuple[int, ...]] | None:
    """``"brats"`` or ``"WT=1,2,3,4;TC=1,3,4;ET=4"`` -> {name: mask values}; None stays None.

    Args:
        spec: "brats" (:data:`useg.distances.BRATS_REGIONS`), ``name=v,v,...`` parts joined by
            ";", or None / "" for no regions.

    Returns:
        Region name -> the mask values it unites, in the order given; None without a spec.

    Raises:
        ValueError: a part that is not ``name=integers``.

    >>> parse_regions("WT=2,4;ET=4")
    {'WT': (2, 4), 'ET': (4,)}
    >>> parse_regions("BraTS")
    {'WT': (1, 2, 3, 4), 'TC': (1, 3, 4), 'ET': (4,)}
    >>> parse_regions(None) is None
    True
    >>> parse_regions("WT=1,x")
    Traceback (most recent call last):
    ...
    ValueError: cannot read regions 'WT=1,x'; write them like WT=1,2,3,4;TC=1,3,4;ET=4 or 'brats'
    """
    if not spec:
        return None
    if spec.strip().lower() == "brats":
        return dict(BRATS_REGIONS)
    try:
        return {name.strip(): tuple(int(v) for v in values.split(",")) for name, values in
                (part.split("=") for part in spec.split(";") if part.strip())}
    except ValueError:
        raise ValueError(f"cannot read regions {spec!r}; "
                         "write them like WT=1,2,3,4;TC=1,3,4;ET=4 or 'brats'") from None


# ---------------------------------------------------------------------------------------------


def _score_cases(pairs: Sequence[tuple[Path, Path]], raw_truth: Mapping[Path, tuple], label_map: LabelMap,
                 names: Sequence[str], as_classes: Mapping[str, tuple[int, ...]] | None, instances: bool,
                 probabilities: bool, rois: Mapping[Path, Path]
                 ) -> tuple[list[dict], list[dict], list[dict], list[ScoreCounts]]:
    """Per-case rows (classes, regions, objects) and, for probability maps, the pooled counts of
    classes 1..K-1; the cases are read one at a time, only the pixels inside an ROI count."""
    rows: list[dict] = []
    region_rows: list[dict] = []
    instance_rows: list[dict] = []
    pooled = [empty_counts() for _ in range(1, label_map.num_classes)] if probabilities else []
    for pred_path, truth_path in pairs:
        truth = label_map.decode(raw_truth[truth_path][0], path=truth_path)
        inside = read_roi(rois[pred_path], truth.shape, truth_path) if pred_path in rois else None
        pred, counts = read_prediction(pred_path, truth_path, truth, label_map, probabilities, inside)
        case = case_stem(pred_path)
        counted = (pred, truth) if inside is None else (pred[inside], truth[inside])  # only inside counts
        case_rows = evaluate_case(*counted, label_map.num_classes, names, case=case)
        for c, class_counts in enumerate(counts, start=1):
            case_rows[c].update(score_metrics(class_counts))
            pooled[c - 1] = merge(pooled[c - 1], class_counts)  # memory: the distinct scores, not the pixels
        rows.extend(case_rows)
        if inside is not None:  # regions and objects: both masks cut to the ROI
            pred, truth = background_outside(pred, inside), background_outside(truth, inside)
        if as_classes:
            spacing = file_spacing(truth_path)  # mm from NIfTI, NRRD, MetaImage; else pixels
            scores = evaluate_regions(pred, truth, as_classes, spacing)
            region_rows.extend({"case": case, **r} for r in scores)
        if instances:
            instance_rows.append({"case": case, **evaluate_instances(pred, truth, object_class=1)})
    return rows, region_rows, instance_rows, pooled


def _region_classes(regions: Mapping[str, Sequence[int]], label_map: LabelMap,
                    truth_dir: Path) -> dict[str, tuple[int, ...]]:
    """Regions in mask values -> the same regions in class indices of ``label_map``."""
    unknown = sorted({v for vs in regions.values() for v in vs} - set(label_map.values))
    if unknown:
        raise UsegError(f"regions name mask values {unknown} that {truth_dir} does not use; "
                        f"use values of {list(label_map.values)}")
    return {k: tuple(label_map.values.index(v) for v in vs) for k, vs in regions.items()}
