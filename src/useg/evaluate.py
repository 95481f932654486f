"""Evaluation of a folder of predicted masks against the true masks: the ``useg evaluate`` stage.

:func:`evaluate_folders` pairs each prediction with the true mask of the same stem, decodes both
with one label map (the run's, explicit values, or the one :func:`useg.labels.label_map_of_masks`
infers from the truth, refusing masks the data check would flag), scores every case with the
array functions of :mod:`useg.metrics`, :mod:`useg.distances` and :mod:`useg.instances`,
averages the rows (:func:`summarize`) and writes ``metrics.csv`` / ``metrics.json``
(:func:`write_metrics`). :func:`format_table` prints a summary.

With ``probabilities=True`` the predictions are the ``NAME_probs.tif`` / ``NAME_probs.nii.gz``
maps of ``useg predict --probabilities``: their argmax is scored like a mask, and each foreground
class's scores are counted (:mod:`useg.scores`) per case and pooled over all cases for ROC AUC,
average precision, F1 at the best threshold and at 0.5, sensitivity, specificity and accuracy.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .distances import BRATS_REGIONS, REGION_METRICS, evaluate_regions
from .errors import UsegError
from .files import atomic_write_text, stem_of, strict_json, suffix_of
from .instances import evaluate_instances
from .io import MASK_SUFFIXES, file_spacing, read_image, read_mask
from .labels import LabelMap, label_map_of_masks
from .layouts import plain_folders
from .metrics import METRICS, evaluate_case
from .pairing import pair_stems
from .roi import background_outside, ignore_outside, pair_rois, read_roi
from .scores import SCORE_METRICS, ScoreCounts, empty_counts, merge, score_counts, score_metrics
from .volumes import is_nifti

logger = logging.getLogger(__name__)

COLUMNS = ("case", "class", "name", *METRICS, "tp", "fp", "fn", "pixel_error")
INSTANCE_METRICS = ("object_precision", "object_recall", "object_f1", "rand_error")
MAX_LISTED = 10  # problems of the truth masks named in the error, the rest counted
PROBS_SUFFIX = "_probs"  # what writing.output_paths appends to a probability map's stem
PROBS_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz")


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
        (summary as from :func:`summarize`, plus "regions" and "instances" means when asked and
        "probabilities", one entry per foreground class with :data:`useg.scores.SCORE_METRICS`
        pooled over all pixels of all cases, (csv path, json path)).

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
    pairs = _pairs(pred_dir, truth_dir, probabilities)
    rois = _rois(pairs, roi) if roi is not None else {}
    try:
        regions = parse_regions(regions) if isinstance(regions, str) else regions
    except ValueError as e:
        raise UsegError(str(e)) from None
    raw_truth = {t: read_mask(t) for _, t in pairs}
    label_map = _label_map(raw_truth, truth_dir, run, labels)
    names = [f"value {v}" if label_map.mode != "rgb" else f"#{v:06x}" for v in label_map.values]
    as_classes = _region_classes(regions, label_map, truth_dir) if regions else None
    rows, region_rows, instance_rows, pooled = _score_cases(pairs, raw_truth, label_map, names, as_classes,
                                                            instances, probabilities, rois)
    summary, extra = summarize(rows), {}
    if probabilities:
        summary["probabilities"] = [{"class": c, "name": names[c], **score_metrics(counts)}
                                    for c, counts in enumerate(pooled, start=1)]
    if region_rows:
        summary["regions"] = _mean_rows(region_rows, "region", REGION_METRICS)
        extra["regions"] = region_rows
    if instance_rows:
        summary["instances"] = {k: float(np.mean([r[k] for r in instance_rows])) for k in INSTANCE_METRICS}
        extra["instances"] = instance_rows
    paths = write_metrics(rows, out_dir or pred_dir, extra=extra, summary=summary)
    return summary, paths


def decoded_pairs(pred_dir: str | Path, truth_dir: str | Path, run: str | Path | None = None,
                  labels: Sequence[int] | None = None, roi: str | Path | None = None
                  ) -> tuple[LabelMap, Iterator[tuple[str, np.ndarray, np.ndarray]]]:
    """The masks :func:`evaluate_folders` pairs, as class indices, for another consumer
    (:func:`useg.postprocess_run.determine_postprocessing`).

    Args:
        pred_dir, truth_dir, run, labels, roi: as :func:`evaluate_folders`.

    Returns:
        (the label map, an iterator of (case, prediction (*S) int64, truth (*S) int64) read one
        case at a time; the truth is :data:`useg.roi.IGNORE` outside the ROI).

    Raises:
        UsegError: as :func:`evaluate_folders`, for the pairing and the label map at once, for a
            case's shape or values when the iterator reaches it.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if (truth_dir / "masks").is_dir():
        truth_dir = truth_dir / "masks"
    pairs = _pairs(pred_dir, truth_dir)
    rois = _rois(pairs, roi) if roi is not None else {}
    raw_truth = {t: read_mask(t) for _, t in pairs} if run is None else {}  # a run's map needs no reading
    label_map = _label_map(raw_truth, truth_dir, run, labels)

    def cases() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for pred_path, truth_path in pairs:
            raw = raw_truth.pop(truth_path, None) or read_mask(truth_path)
            truth = label_map.decode(raw[0], path=truth_path)
            pred, _ = _prediction(pred_path, truth_path, truth, label_map, False)
            if pred_path in rois:
                truth = ignore_outside(truth, read_roi(rois[pred_path], truth.shape, truth_path))
            yield _case_stem(pred_path), pred, truth

    return label_map, cases()


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
            when :func:`evaluate_folders` added them).

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
        pred, counts = _prediction(pred_path, truth_path, truth, label_map, probabilities, inside)
        case = _case_stem(pred_path)
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


def _pairs(pred_dir: Path, truth_dir: Path, probabilities: bool = False) -> list[tuple[Path, Path]]:
    """(prediction, truth) paths, the predictions sorted by name, paired by stem (without ``_probs``)."""
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise UsegError(f"{folder} is not a folder; give the folder of masks")
    listed = sorted(p for p in pred_dir.iterdir()
                    if suffix_of(p) in MASK_SUFFIXES and not p.name.startswith("."))
    maps = [p for p in listed if _is_probability_map(p)]
    preds = maps if probabilities else [p for p in listed if p not in maps]
    if probabilities and not preds:
        raise UsegError(f"{pred_dir} holds no probability maps (NAME_probs.tif or NAME_probs.nii.gz); "
                        "run 'useg predict --probabilities uint8' into it first")
    if maps and not probabilities:
        if not preds:
            raise UsegError(f"{pred_dir} holds probability maps ({maps[0].name}) but no masks; "
                            "pass --probabilities to score them")
        logger.warning("ignoring %d probability map(s) in %s; pass --probabilities to score them",
                       len(maps), pred_dir)
    if not preds:
        raise UsegError(f"{pred_dir} holds no masks; run 'useg predict' into it first")
    truths = {stem_of(p): p for p in sorted(truth_dir.iterdir())
              if suffix_of(p) in MASK_SUFFIXES and not p.name.startswith(".")}
    # the same rules as the data check: predictions carry the image's name, the truth the mask's
    paired = pair_stems([_case_stem(p) for p in preds], list(truths)).pairs
    missing = [p.name for p in preds if _case_stem(p) not in paired]
    if missing:
        raise UsegError(f"no true mask in {truth_dir} for {', '.join(missing[:5])}; "
                        "evaluate predictions of labelled images only")
    return [(p, truths[paired[_case_stem(p)]]) for p in preds]


def _rois(pairs: Sequence[tuple[Path, Path]], roi_dir: str | Path) -> dict[Path, Path]:
    """Prediction path -> its ROI mask in ``roi_dir`` (paired by the case stem, ``_probs`` removed).

    Raises:
        UsegError: ``roi_dir`` is no folder, or a prediction has no ROI mask there.
    """
    preds = [p for p, _ in pairs]
    found, problems = pair_rois([_case_stem(p) for p in preds], preds, roi_dir)
    if problems:
        raise UsegError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} predictions have no ROI mask in {roi_dir}, e.g. {problems[0]}")
    return {p: found[_case_stem(p)] for p in preds}


def _is_probability_map(path: Path) -> bool:
    """A ``NAME_probs.tif`` / ``.nii.gz`` as ``useg predict --probabilities`` names them."""
    stem = stem_of(path)
    return suffix_of(path) in PROBS_SUFFIXES and stem.endswith(PROBS_SUFFIX) and len(stem) > len(PROBS_SUFFIX)


def _case_stem(path: Path) -> str:
    """The case a prediction belongs to: its stem, without ``_probs`` for probability maps."""
    stem = stem_of(path)
    return stem[: -len(PROBS_SUFFIX)] if _is_probability_map(path) else stem


def _prediction(pred_path: Path, truth_path: Path, truth: np.ndarray, label_map: LabelMap,
                probabilities: bool, inside: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[ScoreCounts]]:
    """The predicted classes (*S) and, for probability maps, the score counts of classes 1..K-1
    (over the pixels ``inside`` an ROI when given)."""
    if not probabilities:
        raw = read_mask(pred_path)[0]
        _refuse_object_ids(pred_path, raw, label_map)
        pred = label_map.decode(raw, path=pred_path)
        _check_shape(pred_path, pred.shape, truth_path, truth.shape)
        return pred, []
    probs, scale = _read_probabilities(pred_path, truth_path, truth.shape, label_map)
    keep = (slice(None),) if inside is None else inside
    counts = [score_counts(probs[c][keep], (truth == c)[keep], scale)
              for c in range(1, label_map.num_classes)]
    return np.argmax(probs, axis=0), counts


def _refuse_object_ids(path: Path, raw: np.ndarray, label_map: LabelMap) -> None:
    """Object ids (0, 1, ..., N of 'useg predict --instances') where class values belong are named as such.

    Decoding them would say "values outside the label map; pass --labels", which cannot help: the
    file holds objects, not classes.
    """
    values = np.unique(raw)
    if label_map.mode == "rgb" or len(values) <= label_map.num_classes or values[0] != 0:
        return
    if set(values.tolist()) <= set(label_map.values) or values[-1] != len(values) - 1:
        return  # class values, or not the consecutive ids of a relabelled instance image
    raise UsegError(f"{path} holds {len(values) - 1} consecutive ids 1..{values[-1]} where the true masks "
                    f"have {label_map.num_classes} classes (mask values {list(label_map.values)}): it "
                    "looks like the object ids of 'useg predict --instances', and evaluate scores class "
                    "masks; predict into another folder without --instances and evaluate that "
                    "(with --instances to score its objects too)")


def _read_probabilities(path: Path, truth_path: Path, shape: tuple[int, ...],
                        label_map: LabelMap) -> tuple[np.ndarray, float]:
    """A probability map as (K, *S) uint8 (with scale 1/255) or float (scale 1), checked.

    TIFF maps hold (K, *S); NIfTI maps (*S, K), which a 2D map's reading gives as one channel.
    """
    arr = read_image(path).array
    if is_nifti(path) and arr.ndim == len(shape) + 2 and arr.shape[0] == 1:
        arr = np.moveaxis(arr[0], -1, 0)
    _check_shape(path, arr.shape[1:], truth_path, shape)
    k = label_map.num_classes
    if arr.shape[0] != k:
        raise UsegError(f"{path} holds {arr.shape[0]} probability channel(s) but the truth masks have {k} "
                        f"classes (mask values {list(label_map.values)}); score the probabilities of a run "
                        "trained on these masks (runs trained with --regions are not scored this way)")
    if arr.dtype == np.uint8:
        return arr, 1.0 / 255
    if not np.issubdtype(arr.dtype, np.floating):
        raise UsegError(f"{path} holds {arr.dtype} values; probability maps are uint8 (p * 255) or float, "
                        "as 'useg predict --probabilities' writes them")
    if not (np.all(np.isfinite(arr)) and arr.min() >= 0 and arr.max() <= 1):
        raise UsegError(f"{path} holds values outside [0, 1] (or NaN); give probabilities, "
                        "as 'useg predict --probabilities' writes them")
    half = arr.astype(np.float16)
    # NIfTI stores float16 maps as float32: binning their float16 bit patterns is exact and needs no sort
    return (half if np.array_equal(half, arr) else arr), 1.0


def _check_shape(pred_path: Path, pred_shape: tuple, truth_path: Path, truth_shape: tuple) -> None:
    if tuple(pred_shape) != tuple(truth_shape):
        raise UsegError(f"{pred_path} is {tuple(pred_shape)} but {truth_path} is {tuple(truth_shape)}; "
                        "predict the matching images")


def _label_map(raw_truth: Mapping[Path, tuple], truth_dir: Path, run: str | Path | None,
               labels: Sequence[int] | None) -> LabelMap:
    """The run's label map, or the one the truth masks (``read_mask`` results) hold.

    Raises:
        UsegError: listing every problem :func:`useg.labels.label_map_of_masks` finds.
    """
    if run is not None:
        from .plan import Plan  # plan pulls in the model (torch); evaluation without a run needs neither

        return Plan.load(Path(run) / "plan.json").data.label_map
    value_sets = {str(t): set(np.unique(raw).tolist()) for t, (raw, _, _) in raw_truth.items()}
    modes = {str(t): mode for t, (_, mode, _) in raw_truth.items()}
    palettes = {str(t): pal for t, (_, _, pal) in raw_truth.items() if pal is not None}
    label_map, problems = label_map_of_masks(value_sets, modes, palettes, labels, truth_dir, min_classes=1)
    if problems:
        listed = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f"... and {len(problems) - MAX_LISTED} more")
        raise UsegError(f"cannot tell the classes of the true masks in {truth_dir} "
                        f"({len(problems)} problem(s)):" + "".join(f"\n  {p}" for p in listed)
                        + "\nfix the masks ('useg check' lists the same), or pass --run or --labels")
    return label_map


def _region_classes(regions: Mapping[str, Sequence[int]], label_map: LabelMap,
                    truth_dir: Path) -> dict[str, tuple[int, ...]]:
    """Regions in mask values -> the same regions in class indices of ``label_map``."""
    unknown = sorted({v for vs in regions.values() for v in vs} - set(label_map.values))
    if unknown:
        raise UsegError(f"regions name mask values {unknown} that {truth_dir} does not use; "
                        f"use values of {list(label_map.values)}")
    return {k: tuple(label_map.values.index(v) for v in vs) for k, vs in regions.items()}


def _mean_rows(rows: Sequence[dict], key: str, metrics: Sequence[str]) -> dict:
    """Per value of ``key``, the nan-skipping mean of each metric (nan when every case is nan)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {k: {m: float(np.nanmean([r[m] for r in g])) if any(np.isfinite(r[m]) for r in g) else float("nan")
                for m in metrics} for k, g in groups.items()}


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
