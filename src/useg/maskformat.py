"""The output format of predicted masks, decided before anything is computed.

A mask format holds some values and not others (:attr:`useg.io.Format.mask_holds`): PNG 2D
masks of 0 .. 65535, NIfTI int32 values and no colours, TIFF 2D and 3D masks up to uint32 object
ids. Without a choice the mask takes its input's format (:data:`useg.writing.MASK_OUT_SUFFIX`);
when that format cannot hold the run's stored mask values (negative ones, or above 65535 into
PNG) TIFF is taken instead, with a log line. ``--mask-format`` (:data:`MASK_FORMATS`) chooses one
for every output; a choice that cannot hold the run's labels or the input's dimensions (3D into
PNG) is refused, with the fix, before the network runs. Object ids (``--instances``) are counted
only once predicted: :func:`check_objects` refuses more than the chosen format holds, naming the
format that does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import UsegError
from .files import MaskHolds, suffix_of
from .io import FORMATS
from .plan import Plan, data_dims

logger = logging.getLogger(__name__)

MASK_FORMATS = {"png": ".png", "tif": ".tif", "nii.gz": ".nii.gz"}  # --mask-format -> output suffix
AFFINE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")  # outputs that hold a volume's orientation and origin
FALLBACK = ".tif"  # holds every dimension, mode and value a plan can produce


def holds(suffix: str) -> MaskHolds:
    """What the mask writer of ``suffix`` holds (every output suffix has a mask writer)."""
    entry = FORMATS[suffix].mask_holds
    if entry is None:  # pragma: no cover - MASK_OUT_SUFFIX names only formats with a mask writer
        raise ValueError(f"{suffix} has no mask writer")
    return entry


def stored_range(plan: Plan, instances: bool) -> tuple[int, int, str]:
    """(lowest, highest stored value, encoding mode) of the run's masks; object ids start at 0 and
    are counted when predicted (:func:`check_objects`), the mode is grey then."""
    if instances:
        return 0, 0, "grey"
    lm = plan.data.label_map
    if lm.mode == "rgb":  # written as three uint8 channels, not as the packed values
        return 0, 255, "rgb"
    return min(lm.values), max(lm.values), lm.mode


def mask_suffix(default: str, plan: Plan, mask_format: str | None, instances: bool, source: Path) -> str:
    """The output suffix of one input's mask: ``mask_format``'s, or ``default`` (the input's) when it
    holds the run's masks, else TIFF.

    Args:
        default: the suffix :func:`useg.writing.output_paths` derives from the input.
        plan: the run's plan (dims, the label map's stored values and mode).
        mask_format: a key of :data:`MASK_FORMATS`, or None for the input's format.
        instances: object ids are written instead of classes.
        source: the input, for the message.

    Raises:
        UsegError: ``mask_format`` cannot hold the masks (or is unknown), or no format can.
    """
    dims = data_dims(plan)  # the masks': 3 for a 2D network on the slices of volumes
    low, high, mode = stored_range(plan, instances)
    if mask_format is not None:
        if mask_format not in MASK_FORMATS:
            raise UsegError(f"--mask-format must be one of {', '.join(MASK_FORMATS)}, not {mask_format!r}")
        problem = holds(MASK_FORMATS[mask_format]).problem(dims, low, high, mode)
        if problem:
            others = [k for k, s in MASK_FORMATS.items() if holds(s).problem(dims, low, high, mode) is None]
            fix = f"choose --mask-format {' or '.join(others)}" if others else "train with other mask values"
            raise UsegError(f"--mask-format {mask_format} cannot hold the masks of {source} ({problem}); "
                            f"{fix}")
        if default in AFFINE_SUFFIXES and mask_format == "tif":  # holds the spacing, not the orientation
            logger.warning("%s: a TIFF mask keeps the voxel spacing but not the orientation and origin of "
                           "its input; use --mask-format nii.gz to keep them", source)
        return MASK_FORMATS[mask_format]
    problem = holds(default).problem(dims, low, high, mode)
    if problem is None:
        return default
    fallback = holds(FALLBACK).problem(dims, low, high, mode)
    if fallback:
        raise UsegError(f"no mask format holds the masks of {source} ({problem}; {fallback}); "
                        "train with mask values in 0 .. 65535")
    logger.info("%s: %s, so its mask is written as TIFF", source, problem)
    return FALLBACK


def check_objects(objects: np.ndarray, target: Path, source: Path) -> None:
    """Refuse to write more object ids than ``target``'s format holds (PNG: 65535), naming the fix.

    Raises:
        UsegError: the highest id is beyond the format's range.
    """
    top = int(objects.max(initial=0))
    entry = holds(suffix_of(target))
    if top > entry.high:
        raise UsegError(f"{source} has {top} objects, more than {entry.name} holds ({entry.high}); "
                        "give --mask-format tif (uint32 object ids)")

