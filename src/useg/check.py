"""The check stage: every file of a training folder read once, every problem listed.

:func:`check_dataset` pairs the folder as :func:`useg.dataset.discover` does, reads each image and
mask once (:mod:`useg.io`; :mod:`useg.labels` infers the masks' encoding) and lists every problem,
one sentence each naming the file and the fix, in a :class:`CheckReport` that keeps a
:class:`CaseRecord` per case so planning need not read the files again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layouts, volumes
from .dataset import Case, format_axes, pair_folder, with_rois
from .errors import UsegError
from .io import Image, file_affine, file_spacing, read_mask
from .labels import LabelMap, label_map_of_masks
from .roi import read_roi
from .spec import DataSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseRecord:
    """What the check read of one case with a readable image, for planning without reading it again."""

    name: str  # the case name (Case.name)
    shape: tuple[int, ...]  # spatial shape of the image
    spacing: tuple[float, ...]  # voxel spacing of the image
    num_channels: int  # image channels
    dims: int  # spatial dimensions (2 or 3)
    dtype: str  # the image's stored dtype
    background: float  # share of voxels at every channel's minimum (a constant background)
    # per channel, up to 10,000 foreground intensities (nnU-Net samples the same way); None when the
    # mask is missing, unusable or not grey, or the image has other channels than the first sampled one
    samples: tuple[np.ndarray, ...] | None = None


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        cases: paired cases (mask None where it is missing).
        problems: one sentence each, naming the file and the fix; empty when the data is usable.
        label_map: the masks' encoding, when masks were readable.
        num_channels: image channels, when every readable image has the same count.
        stats: JSON-able summary (counts, sizes, dtypes, pixel share per mask value, ignored files).
        info: the layout ("plain", "nnunet", "folders") and what it names (channel names, labels,
            the pairing rule of a plain layout).
        records: one :class:`CaseRecord` per readable image, in case order (the planner's
            fingerprint is computed from them: :func:`useg.planner.fingerprint`).
    """

    cases: list[Case]
    problems: list[str]
    label_map: LabelMap | None = None
    num_channels: int | None = None
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    records: tuple[CaseRecord, ...] = ()

    def without(self, names) -> CheckReport:
        """The report of the cases not in ``names`` (held-out test cases), so a plan's fingerprint,
        intensity statistics included, never sees them."""
        names = set(names)
        if not names:
            return self
        if self.cases and all(c.name in names for c in self.cases):
            raise UsegError(f"--exclude names every one of the {len(self.cases)} cases; "
                            "keep at least one case to train on")
        return dataclasses.replace(self, cases=[c for c in self.cases if c.name not in names],
                                   records=tuple(r for r in self.records if r.name not in names))

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Scan:
    """What the pass over the cases collects, for the checks across cases."""

    records: list[CaseRecord] = field(default_factory=list)
    value_sets: dict[str, set[int]] = field(default_factory=dict)  # mask -> its values
    modes: dict[str, list[str]] = field(default_factory=dict)  # "grey"/"palette"/"rgb" -> masks
    palettes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # palette mask -> its palette
    pixel_counts: dict[int, int] = field(default_factory=dict)  # mask value -> pixels
    sample_channels: int | None = None  # channels of the first intensity sample: later ones must match
    ignore_value: int | None = None  # the mask value of unlabelled pixels (nnU-Net's "ignore" label)
    roi_shares: list[float] = field(default_factory=list)  # share of each image inside its ROI


def _majority(groups: dict) -> object:
    return max(groups, key=lambda k: len(groups[k]))


def check_dataset(root: str | Path, spec: DataSpec | None = None) -> CheckReport:
    """Read every file of a training folder once and list every problem.

    Problems: missing or empty folders, images without masks and masks without images (after
    a hint when a folder almost pairs), names that pair more than one way, patterns that match
    nothing, duplicate names, unreadable files, JPEG masks, image/mask size mismatches, inconsistent
    channel counts or dimensions, palettes that disagree, unknown mask values (see
    :func:`useg.labels.label_map_of_masks`) and a single class only.

    Args:
        root: a folder with images/ and masks/.
        spec: how to read it: ``mask_values`` (``--labels``) when they should not be inferred (an
            nnU-Net dataset.json's labels are used otherwise), the channel and label file-name
            prefixes of case folders, the image and mask name patterns, ``roi_dir`` (``--roi``):
            every image then needs an ROI mask of its size with at least one pixel inside
            (``stats["ROI share (mean)"]``).

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when anything must be fixed. A plain layout
        with masks/ has ``info["pairing"]`` (the rule that paired it, :mod:`useg.pairing`), the
        patterns, ``info["files"]`` (stems per folder) and ``info["example"]`` (one pair's names).
    """
    root, spec = Path(root), spec or DataSpec()
    cases, problems, ignored, info = pair_folder(root, spec)
    cases, info = _rois(cases, spec, problems, info)
    mask_values = spec.mask_values
    if mask_values is None and info.get("labels"):
        mask_values = sorted(info["labels"])
    if cases and info.get("layout") == "plain" and not info.get("mask_dir"):
        problems.append(f"{root} has no masks/ folder; put the images in {root / 'images'} "
                        f"and one mask per image in {root / 'masks'}")
    scan, rng = _Scan(ignore_value=info.get("ignore")), np.random.default_rng(0)
    for case in cases:
        _scan_case(case, scan, problems, rng)
    problems.extend(_disagreements(scan.records, cases))
    value_sets, modes, palettes = scan.value_sets, scan.modes, scan.palettes
    label_map = None
    if value_sets:
        label_map, label_problems = label_map_of_masks(
            value_sets, {n: m for m, names in modes.items() for n in names}, palettes, mask_values,
            Path(info.get("mask_dir") or root / "masks"))
        problems.extend(label_problems)
    counts = {r.num_channels for r in scan.records}
    num_channels = next(iter(counts)) if len(counts) == 1 else None
    stats = _stats(cases, scan, ignored, info)
    return CheckReport(cases, problems, label_map, num_channels, stats, info, tuple(scan.records))


def _rois(cases: list[Case], spec: DataSpec, problems: list[str], info: dict) -> tuple[list[Case], dict]:
    """The cases with their ROI masks (``spec.roi_dir``) and the info recording it; what is missing
    goes to ``problems``."""
    if spec.roi_dir is None:
        return cases, info
    try:
        cases = with_rois(cases, spec.roi_dir, problems)
    except UsegError as e:
        problems.append(str(e))
    return cases, {**info, "roi": str(spec.roi_dir)}


def _scan_case(case: Case, scan: _Scan, problems: list[str], rng: np.random.Generator) -> None:
    """Read one case's image and mask into ``scan``; what is wrong with them goes to ``problems``."""
    try:
        image = layouts.read_case_image(case.files)
    except UsegError as e:
        problems.append(str(e))
        image = None
    if image is not None:
        if not np.issubdtype(image.array.dtype, np.integer) and not np.isfinite(image.array).all():
            problems.append(f"{case.image} contains NaN or infinite values; replace them before training")
        lowest = image.array.reshape(image.channels, -1).min(axis=1).reshape((-1,) + (1,) * image.dims)
        background = float((image.array == lowest).all(axis=0).mean())
        scan.records.append(CaseRecord(case.name, image.spatial_shape, image.spacing, image.channels,
                                       image.dims, str(image.array.dtype), background))
    if case.roi is not None and image is not None:
        try:
            scan.roi_shares.append(float(read_roi(case.roi, image.spatial_shape, case.image).mean()))
        except UsegError as e:
            problems.append(str(e))
    if case.mask is not None:
        _scan_mask(case, image, scan, problems, rng)


def _scan_mask(case: Case, image: Image | None, scan: _Scan, problems: list[str],
               rng: np.random.Generator) -> None:
    """Read one case's mask into ``scan`` (values, encoding, the image's foreground intensities)."""
    try:
        raw, mode, pal = read_mask(case.mask)
    except UsegError as e:
        problems.append(str(e))
        return
    if image is not None and raw.shape != image.spatial_shape:
        problems.append(f"{case.mask} is {format_axes(raw.shape)} but its image is "
                        f"{format_axes(image.spatial_shape)}; masks must match their images pixel for pixel")
        return
    try:
        mask_spacing = file_spacing(case.mask)  # NIfTI, NRRD, MetaImage headers
    except UsegError as e:  # a NaN or zero voxel size: the header's fault, not the grid's
        problems.append(str(e))
        return
    if image is not None and mask_spacing and not np.allclose(mask_spacing, image.spacing, rtol=1e-3):
        problems.append(f"{case.mask} has spacing {format_axes(mask_spacing)} but its image has "
                        f"{format_axes(image.spacing)}; resample the mask onto its image's grid "
                        "(nearest neighbour)")
        return
    moved = _placed_elsewhere(case.mask, image) if mask_spacing and image is not None else None
    if moved:
        problems.append(moved)
        return
    if image is not None and mode == "grey" and scan.sample_channels in (None, image.channels):
        fg = raw > raw.min(initial=0)
        if scan.ignore_value is not None:
            fg &= raw != scan.ignore_value
        samples = _foreground_sample(image.array, fg, rng)
        scan.sample_channels = image.channels
        scan.records[-1] = dataclasses.replace(scan.records[-1], samples=tuple(samples))
    values, counts = np.unique(raw, return_counts=True)
    scan.value_sets[str(case.mask)] = set(values.tolist()) - {scan.ignore_value}
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        scan.pixel_counts[v] = scan.pixel_counts.get(v, 0) + c
    scan.modes.setdefault(mode, []).append(str(case.mask))
    if pal is not None:
        scan.palettes[str(case.mask)] = pal


def _placed_elsewhere(mask: Path, image: Image) -> str | None:
    """A sentence when the mask's header puts its voxels elsewhere than its image's (flipped axis, moved
    origin), though shape and spacing agree: training pairs voxels by index, so the labels would
    belong to other places than the viewer shows."""
    affine = file_affine(mask)
    if affine is None or image.affine is None:
        return None
    how = volumes.geometry_difference(affine, image.affine, image.spacing)
    if how is None:
        return None
    return (f"{mask} {how}; resample the mask onto its image's grid, or give it its image's affine "
            "if only its header is wrong")


def _disagreements(records: Sequence[CaseRecord], cases: Sequence[Case]) -> list[str]:
    """Images whose channel count or dimensions differ from most images'."""
    image_of = {c.name: c.image for c in cases}
    problems: list[str] = []
    for key, what, fix in (("num_channels", "channel(s)", "convert them to the same channels"),
                           ("dims", "spatial dimensions", "train 2D and 3D data separately")):
        groups: dict[int, list[Path]] = {}
        for r in records:
            groups.setdefault(getattr(r, key), []).append(image_of[r.name])
        if len(groups) > 1:
            common = _majority(groups)
            for c, paths in groups.items():
                problems.extend(f"{p} has {c} {what} but most images have {common}; {fix}"
                                for p in paths if c != common)
    return problems


def _stats(cases: Sequence[Case], scan: _Scan, ignored: Sequence[Path], info: dict) -> dict:
    """The JSON-able summary ``useg check`` prints, in that order."""
    stats: dict = {**_folder_lines(cases, info), "cases": len(cases),
                   "labelled": sum(c.mask is not None for c in cases)}
    shapes = [r.shape for r in scan.records]
    if shapes:
        stats["dims"] = sorted({r.dims for r in scan.records})
        stats["image sizes"] = f"{format_axes(min(shapes))} .. {format_axes(max(shapes))}"
        stats["image dtypes"] = sorted({r.dtype for r in scan.records})
    if scan.pixel_counts:
        total = sum(scan.pixel_counts.values())
        stats["pixel share per mask value"] = {str(v): round(c / total, 4)
                                               for v, c in sorted(scan.pixel_counts.items())}
    if scan.roi_shares:
        stats["ROI share (mean)"] = round(float(np.mean(scan.roi_shares)), 4)
    if scan.ignore_value is not None:
        stats["ignore label"] = scan.ignore_value
    if ignored:
        stats["ignored files"] = [str(p) for p in ignored]
        logger.info("ignoring %d files that are not images: %s", len(ignored),
                    ", ".join(p.name for p in ignored[:5]))
    if shapes:
        spacings = [r.spacing for r in scan.records]
        stats["spacing (median)"] = format_axes(tuple(float(np.median([s[i] for s in spacings]))
                                                      for i in range(len(spacings[0]))))
    if info.get("layout", "plain") != "plain":
        stats["layout"] = info["layout"]
    return stats


def _folder_lines(cases: Sequence[Case], info: dict) -> dict[str, str]:
    """The per-folder summary of a plain layout: "images/": "20 files", "masks/": "20 files, paired
    by number (07_scan.tif with 07_truth.gif)"."""
    if info.get("layout", "plain") != "plain" or not cases:
        return {}
    names = [Path(info[k]).name if info.get(k) else default
             for k, default in (("image_dir", "images"), ("mask_dir", "masks"))]
    lines = {f"{names[0]}/": f"{sum(len(c.files) for c in cases)} files"}
    if "pairing" in info:
        paired = sum(c.mask is not None for c in cases)
        n = info["files"]["masks"]
        line = f"{n} files, {'' if paired == n else f'{paired} '}paired by {info['pairing']}"
        if info.get("example") and info["pairing"] != "same stem":
            line += " ({} with {})".format(*info["example"])
        lines[f"{names[1]}/"] = line
    return lines


def _foreground_sample(image: np.ndarray, fg: np.ndarray, rng: np.random.Generator,
                       n: int = 10_000) -> list[np.ndarray]:
    """Up to ``n`` foreground intensities per channel (all voxels when the mask is empty)."""
    idx = np.flatnonzero(fg) if fg.any() else np.arange(fg.size)
    if idx.size > n:
        idx = rng.choice(idx, n, replace=False)
    flat = image.reshape(image.shape[0], -1)
    return [flat[c, idx].astype(np.float32) for c in range(image.shape[0])]
