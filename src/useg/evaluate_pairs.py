"""The files ``useg evaluate`` scores: predictions paired with true masks, decoded with one label map.

:func:`prediction_pairs` pairs each prediction (a mask, or a ``NAME_probs`` probability map of
``useg predict --probabilities``) with the true mask of its case by the data check's rules
(:func:`useg.pairing.pair_stems`), :func:`roi_masks` with its region-of-interest mask,
:func:`truth_label_map` finds the one label map both are decoded with (the run's, explicit values,
or the one :func:`useg.labels.label_map_of_masks` infers from the truth, refusing masks the data
check would flag), and :func:`read_prediction` reads a prediction as classes (and a probability
map's score counts, :mod:`useg.scores`), checked against its truth. :func:`decoded_pairs` is all
of it for another consumer (:mod:`useg.postprocess_run`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import UsegError
from .files import stem_of, suffix_of
from .io import MASK_SUFFIXES, read_image, read_mask
from .labels import LabelMap, label_map_of_masks
from .pairing import pair_stems
from .roi import ignore_outside, pair_rois, read_roi
from .scores import ScoreCounts, score_counts
from .volumes import is_nifti

logger = logging.getLogger(__name__)

MAX_LISTED = 10  # problems of the truth masks named in the error, the rest counted
PROBS_SUFFIX = "_probs"  # what writing.output_paths appends to a probability map's stem
PROBS_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz")


def decoded_pairs(pred_dir: str | Path, truth_dir: str | Path, run: str | Path | None = None,
                  labels: Sequence[int] | None = None, roi: str | Path | None = None
                  ) -> tuple[LabelMap, Iterator[tuple[str, np.ndarray, np.ndarray]]]:
    """The masks :func:`useg.evaluate.evaluate_folders` pairs, as class indices, for another consumer
    (:func:`useg.postprocess_run.determine_postprocessing`).

    Args:
        pred_dir, truth_dir, run, labels, roi: as :func:`useg.evaluate.evaluate_folders`.

    Returns:
        (the label map, an iterator of (case, prediction (*S) int64, truth (*S) int64) read one
        case at a time; the truth is :data:`useg.roi.IGNORE` outside the ROI).

    Raises:
        UsegError: as :func:`useg.evaluate.evaluate_folders`, for the pairing and the label map at once, for a
            case's shape or values when the iterator reaches it.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if (truth_dir / "masks").is_dir():
        truth_dir = truth_dir / "masks"
    pairs = prediction_pairs(pred_dir, truth_dir)
    rois = roi_masks(pairs, roi) if roi is not None else {}
    raw_truth = {t: read_mask(t) for _, t in pairs} if run is None else {}  # a run's map needs no reading
    label_map = truth_label_map(raw_truth, truth_dir, run, labels)

    def cases() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for pred_path, truth_path in pairs:
            raw = raw_truth.pop(truth_path, None) or read_mask(truth_path)
            truth = label_map.decode(raw[0], path=truth_path)
            pred, _ = read_prediction(pred_path, truth_path, truth, label_map, False)
            if pred_path in rois:
                truth = ignore_outside(truth, read_roi(rois[pred_path], truth.shape, truth_path))
            yield case_stem(pred_path), pred, truth

    return label_map, cases()


def prediction_pairs(pred_dir: Path, truth_dir: Path, probabilities: bool = False) -> list[tuple[Path, Path]]:
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
    paired = pair_stems([case_stem(p) for p in preds], list(truths)).pairs
    missing = [p.name for p in preds if case_stem(p) not in paired]
    if missing:
        raise UsegError(f"no true mask in {truth_dir} for {', '.join(missing[:5])}; "
                        "evaluate predictions of labelled images only")
    return [(p, truths[paired[case_stem(p)]]) for p in preds]


def roi_masks(pairs: Sequence[tuple[Path, Path]], roi_dir: str | Path) -> dict[Path, Path]:
    """Prediction path -> its ROI mask in ``roi_dir`` (paired by the case stem, ``_probs`` removed).

    Raises:
        UsegError: ``roi_dir`` is no folder, or a prediction has no ROI mask there.
    """
    preds = [p for p, _ in pairs]
    found, problems = pair_rois([case_stem(p) for p in preds], preds, roi_dir)
    if problems:
        raise UsegError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} predictions have no ROI mask in {roi_dir}, e.g. {problems[0]}")
    return {p: found[case_stem(p)] for p in preds}


def _is_probability_map(path: Path) -> bool:
    """A ``NAME_probs.tif`` / ``.nii.gz`` as ``useg predict --probabilities`` names them."""
    stem = stem_of(path)
    return suffix_of(path) in PROBS_SUFFIXES and stem.endswith(PROBS_SUFFIX) and len(stem) > len(PROBS_SUFFIX)


def case_stem(path: Path) -> str:
    """The case a prediction belongs to: its stem, without ``_probs`` for probability maps."""
    stem = stem_of(path)
    return stem[: -len(PROBS_SUFFIX)] if _is_probability_map(path) else stem


def read_prediction(pred_path: Path, truth_path: Path, truth: np.ndarray, label_map: LabelMap,
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


def truth_label_map(raw_truth: Mapping[Path, tuple], truth_dir: Path, run: str | Path | None,
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
