"""Writing predictions: files in, masks (or probabilities) out, in the training masks' encoding.

:func:`predict_files` is the read -> predict -> write pipeline behind
:meth:`useg.predict.Segmenter.predict_files` (nnU-Net splits prediction from
``export_prediction`` the same way); :func:`output_paths` names the outputs and
:func:`write_probabilities` writes (K, *S) probability maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from . import shards
from .dataset import Case
from .errors import UsegError
from .files import NAME_MAX, NIFTI_SUFFIXES, Image, atomic_path, stem_of, suffix_of
from .instances import label_instances
from .io import write_mask
from .layouts import paired_mask_folders, read_case_image
from .maskformat import check_objects, mask_suffix
from .plan import Plan
from .roi import background_outside, pair_rois, probabilities_outside, read_roi
from .tiff import write_tiff
from .tiling import Progress
from .volumes import write_nifti

logger = logging.getLogger(__name__)

MASK_OUT_SUFFIX = {".png": ".png", ".tif": ".tif", ".tiff": ".tiff", ".nii": ".nii", ".nii.gz": ".nii.gz",
                   ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}  # one file per mask
VOLUME_OUT = (".nii", ".nii.gz", ".nrrd", ".mha")  # inputs with an affine: probabilities as NIfTI
PROBABILITY_DTYPES = ("float16", "uint8")


class ImagePredictor(Protocol):
    """What :func:`predict_files` needs of a :class:`useg.predict.Segmenter`."""

    plan: Plan

    def predict_image(self, image: Image) -> np.ndarray:
        """(*S) class indices in the image's geometry."""
        ...

    def predict_image_proba(self, image: Image) -> np.ndarray:
        """(K, *S) float32 probabilities in the image's geometry."""
        ...


def predict_files(
    segmenter: ImagePredictor,
    inputs: Sequence[str | Path | Case],
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Progress | None = None,
    instances: bool = False,
    probabilities: str | None = None,
    watershed: bool = False,
    roi: str | Path | None = None,
    mask_format: str | None = None,
    skip_existing: bool = False,
) -> list[Path]:
    """Predict each input and write its mask into ``out_dir``: :meth:`useg.predict.Segmenter.predict_files`.

    Under torchrun (``RANK`` / ``WORLD_SIZE``) this process predicts its share of the inputs only
    (:mod:`useg.shards`); with ``skip_existing`` inputs whose output exists are skipped.

    Returns:
        The paths this process wrote, in input order.
    """
    out_dir = Path(out_dir)
    if probabilities not in (None, *PROBABILITY_DTYPES):
        raise ValueError(f"probabilities must be float16 or uint8, not {probabilities!r}")
    cases = [c if isinstance(c, Case) else Case(stem_of(c), Path(c)) for c in inputs]
    if roi is not None and Path(roi).resolve() == out_dir.resolve():  # masks named as the ROI masks
        raise UsegError(f"--out {out_dir} is the --roi folder; predictions would replace the ROI masks, "
                        "choose another --out")
    if mask_format is not None and probabilities:
        raise UsegError("--mask-format chooses the masks' format and --probabilities writes probability maps "
                        "(TIFF, or NIfTI for volumes); drop one of them")
    # the masks' format is decided (or refused) here, before any network call
    targets = output_paths(cases, out_dir, overwrite, probabilities is not None,
                           suffix=partial(mask_suffix, plan=segmenter.plan, mask_format=mask_format,
                                          instances=instances), existing=False)
    label_map = segmenter.plan.data.label_map
    outside = _outside(cases, roi, probabilities is not None, bool(segmenter.plan.data.regions))
    todo = shards.pending(targets, shards.current(), overwrite, skip_existing)  # this rank's, not yet there

    def encode(target: Path, labels: np.ndarray, image: Image) -> None:
        if probabilities:
            write_probabilities(target, labels, image, probabilities)
        elif instances:
            objects = label_instances(labels, object_class=1, watershed=watershed)
            check_objects(objects, target, image.path or target)  # counted only now: PNG holds 65535
            write_mask(target, objects, like=image)
        else:
            write_mask(target, labels, like=image, label_map=label_map)

    def write(target: Path, labels: np.ndarray, image: Image) -> Path:
        # Each output is claimed when it is complete: another process that wrote the same name since
        # output_paths looked makes this one refuse instead of mixing two runs' masks in one folder.
        try:
            with atomic_path(target, exclusive=not overwrite) as tmp:
                encode(tmp, labels, image)
        except FileExistsError:
            raise UsegError(f"{target} already exists (written by another process since this one "
                            "started); pass --overwrite or choose another --out") from None
        return target

    # Reading the next file and writing the last mask overlap with the network's work on this
    # one (file I/O and compression release the GIL); at most one read and one write are queued.
    written: list[Path] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        reading = pool.submit(read_case_image, cases[todo[0]].files) if todo else None
        writing = None
        for n, i in enumerate(todo):
            image = reading.result()
            reading = pool.submit(read_case_image, cases[todo[n + 1]].files) if n + 1 < len(todo) else None
            labels = segmenter.predict_image_proba(image) if probabilities else segmenter.predict_image(image)
            if outside is not None:
                labels = outside(cases[i], labels, image)
            if writing is not None:
                written.append(writing.result())
            writing = pool.submit(write, targets[i], labels, image)
            if progress is not None:
                progress(n + 1, len(todo))
        if writing is not None:
            written.append(writing.result())
    return written


def _outside(cases: Sequence[Case], roi: str | Path | None, probabilities: bool, regions: bool):
    """None without ``roi``; else ``(case, prediction, image) -> prediction`` with background
    outside the case's ROI mask (class 0, or foreground probabilities 0).

    Raises:
        UsegError: ``roi`` is no folder, or an input has no ROI mask in it (before anything is
            predicted).
    """
    if roi is None:
        return None
    found, problems = pair_rois([c.name for c in cases], [c.image for c in cases], roi)
    if problems:
        raise UsegError(problems[0])

    def cut(case: Case, prediction: np.ndarray, image: Image) -> np.ndarray:
        inside = read_roi(found[case.name], image.spatial_shape, case.image)
        if probabilities:
            return probabilities_outside(prediction, inside, regions)
        return background_outside(prediction, inside)

    return cut


def output_paths(cases: Sequence[Case], out_dir: Path, overwrite: bool, probabilities: bool,
                 suffix: Callable[..., str] | None = None, *, existing: bool = True) -> list[Path]:
    """One output per case inside ``out_dir``; clashes, inputs and existing files are refused up front.

    Names are the case names (never a path outside ``out_dir``) with the input's suffix for
    PNG/TIFF/NIfTI/NRRD/MetaImage (.nhdr -> .nrrd, .mhd -> .mha), ``.nii.gz`` for DICOM series and
    ``.png`` otherwise (JPEG, BMP, GIF, WebP); probability maps are ``<name>_probs.tif``, or
    ``<name>_probs.nii.gz`` for NIfTI, NRRD and MetaImage inputs (the affine kept). ``suffix``
    ``(default, source=...) -> suffix`` may change a mask's suffix (:func:`useg.maskformat.mask_suffix`).

    Raises:
        UsegError: ``out_dir`` is a file or a folder of inputs; two cases with the same output; an
            output that is an input, a folder, longer than the file-name limit, or exists without
            ``overwrite`` (checked only with ``existing``: :func:`predict_files` leaves that to
            :func:`useg.shards.pending`, rank by rank).
    """
    _refuse_input_folders(cases, out_dir)
    choose = suffix
    inputs = {p.resolve() for c in cases for p in c.files}
    targets: list[Path] = []
    for c in cases:
        suffix = MASK_OUT_SUFFIX.get(suffix_of(c.image), ".nii.gz" if c.image.is_dir() else ".png")
        if probabilities:
            suffix = "_probs" + (".nii.gz" if suffix in VOLUME_OUT else ".tif")
        elif choose is not None:
            suffix = choose(suffix, source=c.image)
        # no separators in the name, so whatever the input names, the output stays in out_dir
        target = out_dir / (c.name.replace("/", "_").replace("\\", "_") + suffix)
        if target in targets:
            raise UsegError(f"{c.image} and another input both map to {target.name}; rename one of them")
        if target.resolve() in inputs:  # a link, or a folder reached two ways: never replace an input
            raise UsegError(f"{target} would replace the input {c.image} with its mask; choose an --out "
                            "folder that holds no inputs")
        if len(target.name.encode()) > NAME_MAX:
            raise UsegError(f"the output name for {c.image} would be {len(target.name.encode())} bytes, over "
                            f"the file-name limit of {NAME_MAX}; rename the input shorter")
        if target.is_dir():
            raise UsegError(f"{target} is a folder, so the output for {c.image} cannot be written there; "
                            "move or rename it, or choose another --out")
        if existing and target.exists() and not overwrite:
            raise UsegError(f"{target} already exists; pass --overwrite or choose another --out")
        targets.append(target)
    return targets


def _refuse_input_folders(cases: Sequence[Case], out_dir: Path) -> None:
    """Refuse an ``out_dir`` that is a file, the folder of an input, or inside an input folder (DICOM).

    Masks beside their images would be read as images by the next ``useg predict`` of that folder,
    and with ``--overwrite`` a mask of the same name replaces its image.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UsegError(f"--out {out_dir} is a file, not a folder; choose a folder for the masks")
    out = out_dir.resolve()
    for c in cases:
        for f in c.files:
            src = f.resolve()
            folder = src if src.is_dir() else src.parent  # a DICOM series is a folder of inputs
            if out == folder or (src.is_dir() and src in out.parents):
                raise UsegError(f"--out {out_dir} is the folder of the input {f}; predictions would mix "
                                "with (or replace) the images, choose another --out")
        if any(m.resolve() == out for m in paired_mask_folders(c.image)):  # DATA/images -> DATA/masks
            raise UsegError(f"--out {out_dir} is the mask folder of the input {c.image}; predictions would "
                            "replace (or mix with) the training masks, choose another --out")


def write_probabilities(path: Path, probs: np.ndarray, like: Image, dtype: str = "float16") -> Path:
    """Write (K, *S) probabilities atomically: float16, or uint8 as round(p * 255).

    TIFF holds (K, *S) with the image's resolution; NIfTI (for volumes) holds (*S, K) with the
    image's affine, the channel last as NIfTI's 4th axis.
    """
    if dtype == "float16":
        data = probs.astype(np.float16)
    else:
        data = np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8)
    if suffix_of(path) in NIFTI_SUFFIXES:
        # NIfTI has no float16
        arr = np.moveaxis(data.astype(np.float32) if dtype == "float16" else data, 0, -1)
        return write_nifti(path, arr, like)
    return write_tiff(path, data, like)
