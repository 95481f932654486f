"""Regions of interest: one mask per image marking where labels are valid (``--roi DIR``).

A field-of-view disc in fundus photography, the tissue of a histology slide, the body in CT:
non-zero pixels of the ROI mask are inside. Pixels outside get the label :data:`IGNORE` in
training (the loss, the validation Dice and the border weights skip them; patches are centred
inside), are not scored by :func:`useg.evaluate.evaluate_folders` and are written as background by
prediction. nnU-Net's ``"ignore"`` label of dataset.json becomes the same :data:`IGNORE` label.
ROI files pair with images by :func:`useg.pairing.pair_stems` (equal stems, or ``<stem>_roi`` /
``_mask`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UsegError
from .files import is_special, stem_of, suffix_of
from .io import MASK_SUFFIXES, read_mask
from .pairing import pair_stems

IGNORE = -1  # the class index of pixels no loss, metric or sampler counts (labels are int64 >= 0 otherwise)


def _axes(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def roi_files(roi_dir: str | Path) -> dict[str, Path]:
    """Stem -> ROI mask file of a folder (visible files with a mask suffix).

    Raises:
        UsegError: ``roi_dir`` is not a folder.
    """
    roi_dir = Path(roi_dir)
    if not roi_dir.is_dir():
        raise UsegError(f"{roi_dir} is not a folder; give --roi the folder of region-of-interest masks")
    files = sorted(p for p in roi_dir.iterdir()
                   if (p.is_file() or is_special(p))  # a FIFO is listed so that reading it refuses it
                   and not p.name.startswith(".") and suffix_of(p) in MASK_SUFFIXES)
    return {stem_of(p): p for p in files}


def pair_rois(names: Sequence[str], images: Sequence[Path], roi_dir: str | Path
              ) -> tuple[dict[str, Path], list[str]]:
    """The ROI file of each case name, and one problem per image without one.

    Args:
        names: case names (image stems).
        images: each case's image file, named in the problem sentences.
        roi_dir: the folder of ROI masks.

    Returns:
        (case name -> ROI file, problems); every name lacking an ROI is a problem.

    Raises:
        UsegError: ``roi_dir`` is not a folder.
    """
    roi_dir = Path(roi_dir)
    files = roi_files(roi_dir)
    if not files:
        return {}, [f"{roi_dir} holds no ROI masks ({', '.join(sorted(MASK_SUFFIXES))}); "
                    "put one mask per image there (non-zero = inside), named like its image"]
    pairing = pair_stems(list(names), list(files))
    found = {name: files[other] for name, other in pairing.pairs.items()}
    problems = [f"{image} has no ROI mask {name}.png in {roi_dir}; add its region-of-interest mask "
                "(non-zero = inside) or leave out --roi"
                for name, image in zip(names, images, strict=True) if name not in found]
    return found, problems


def read_roi(path: str | Path, shape: Sequence[int], image: str | Path | None = None) -> np.ndarray:
    """An ROI mask as a boolean array (True = inside: the pixels that are not zero).

    Args:
        path: the ROI mask file (any mask format).
        shape: the spatial shape of its image; the ROI must match it pixel for pixel.
        image: the file it must match (its image, or a true mask), named in the size error.

    Returns:
        (*S) bool.

    Raises:
        UsegError: unreadable file, another size than the image, no pixel inside.
    """
    raw = read_mask(path)[0]
    if raw.shape != tuple(shape):
        raise UsegError(f"{path} is {_axes(raw.shape)} but {image or 'its image'} is {_axes(shape)}; "
                        "ROI masks must match their images pixel for pixel")
    inside = raw != 0
    if not inside.any():
        raise UsegError(f"{path} marks no pixel as inside (every value is 0); non-zero pixels are the "
                        "region of interest, so fix the mask or move its image out")
    return inside


def ignore_outside(labels: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Labels (*S) int64 with :data:`IGNORE` where ``inside`` (*S) bool is False (a new array)."""
    return np.where(inside, labels, np.int64(IGNORE)).astype(np.int64, copy=False)


def background_outside(labels: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Predicted class indices (*S) with class 0 (background) outside the ROI (a new array)."""
    return np.where(inside, labels, np.zeros((), labels.dtype))


def probabilities_outside(probs: np.ndarray, inside: np.ndarray, regions: bool = False) -> np.ndarray:
    """Probabilities (K, *S) with foreground 0 outside the ROI: background 1 for softmax classes,
    every channel 0 for sigmoid regions (all of them foreground). A new float32 array."""
    out = np.array(probs, dtype=np.float32, copy=True)
    first = 0 if regions else 1
    out[first:, ~inside] = 0.0
    if not regions:
        out[0, ~inside] = 1.0
    return out


__all__ = ["IGNORE", "background_outside", "ignore_outside", "pair_rois", "probabilities_outside",
           "read_roi", "roi_files"]
