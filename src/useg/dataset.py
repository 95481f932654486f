"""Data folders: finding the cases (pairing images with masks) and checking them.

Layout: ``DATA/images/<stem>.<ext>`` with ``DATA/masks/<stem>.<ext>``, PNG, TIFF or NIfTI, paired
by name as :mod:`useg.pairing` describes (equal stems, ``<stem>_mask``, shared prefixes and
suffixes, one number per name, or the user's patterns); channels as separate ``<stem>_0000`` files,
nnU-Net's raw layout and case folders through :mod:`useg.layouts`. :func:`check_dataset` reads
every file once and lists every problem, one sentence each naming the file and the fix, and keeps
a :class:`CaseRecord` per case so planning need not read the files again. Reading cases into
arrays is :mod:`useg.preprocess`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layouts, volumes
from .errors import UsegError
from .files import is_special, refuse_special, stem_of, suffix_of
from .io import IMAGE_SUFFIXES, MASK_SUFFIXES, Image, file_affine, file_spacing, read_mask
from .labels import LabelMap, label_map_of_masks
from .pairing import RULE_TEXT, STEM, Ambiguity, Pairing, compile_pattern, mask_stem, pair_stems
from .roi import pair_rois, read_roi
from .spec import DataSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    name: str  # the file stem shared by image and mask
    image: Path  # the image file
    mask: Path | None = None  # its mask, None for unlabelled images
    extra: tuple[Path, ...] = ()  # channel files after the first, for cases stored one file per channel
    roi: Path | None = None  # its region-of-interest mask (--roi; non-zero = inside), None for none

    @property
    def files(self) -> tuple[Path, ...]:
        """Every channel file of the image, in channel order."""
        return (self.image, *self.extra)


def format_axes(values: Sequence[float]) -> str:
    """A shape or spacing as "240x240x155" / "0.8x0.8x2.5" (integers in full, floats by ``:g``)."""
    return "x".join(str(v) if isinstance(v, (int, np.integer)) else f"{v:g}" for v in values)


def natural_key(text: str) -> list:
    """Sort key putting "2" before "10" (case-insensitive otherwise)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text)]


def _listing(folder: Path, suffixes: frozenset[str] | set[str]) -> tuple[list[Path], list[Path]]:
    """(files with a known suffix in natural order, other visible files) of a folder."""
    files, other = [], []
    for p in folder.iterdir():  # a FIFO named like an image is listed, so that reading it refuses it
        if (p.is_file() or is_special(p)) and not p.name.startswith("."):
            (files if suffix_of(p) in suffixes else other).append(p)
    return sorted(files, key=lambda p: natural_key(p.name)), sorted(other)


def _pair(root: Path, spec: DataSpec) -> tuple[list[Case], list[str], list[Path], dict]:
    """Cases, pairing problems, ignored (non-image) files and layout information of a data folder."""
    if not root.is_dir():
        return [], [f"{root} is not a folder; give a folder with images/ and masks/"], [], {}
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        cases, problems, info = layouts.nnunet_cases(root, Case)
        return cases, problems, [], info
    folders = layouts.plain_folders(root)
    if folders.problem:  # two image folders, or the data one level down (train/images)
        return [], [folders.problem], [], {}
    if spec.channel_names or spec.label_name or (folders.images is None and layouts.is_case_folders(root)):
        cases, problems, info = layouts.folder_cases(root, spec.channel_names, spec.label_name, Case)
        return cases, problems, [], info
    img_dir = folders.images or root
    if folders.images is not None and (img_dir.name, getattr(folders.masks, "name", "masks")) != (
            "images", "masks"):
        logger.info("reading images from %s and masks from %s", img_dir, folders.masks)
    images, ignored = _listing(img_dir, IMAGE_SUFFIXES)
    if not images:
        no_images = (f"{img_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                     f"put the images in {root / 'images'}")
        return [], [no_images], ignored, {}
    by_stem, extra, problems = _image_stems(images)
    masks, pairing = _pair_masks(folders.masks, img_dir, by_stem, ignored, problems, spec)
    cases = [Case(stem, p, masks.get(stem), extra.get(stem, ())) for stem, p in by_stem.items()]
    where = {"image_dir": str(img_dir), "mask_dir": str(folders.masks) if folders.masks else None}
    return cases, problems, ignored, {"layout": "plain", **where, **pairing}


def _image_stems(images: Sequence[Path]) -> tuple[dict[str, Path], dict[str, tuple[Path, ...]], list[str]]:
    """(case name -> first image file, case name -> further channel files, problems) of a plain folder."""
    problems: list[str] = []
    by_stem: dict[str, Path] = {}
    extra: dict[str, tuple[Path, ...]] = {}
    if all(layouts.split_channel(stem_of(p)) for p in images):  # case_0000, case_0001: one file per channel
        groups, problems = layouts.group_channels(images)
        by_stem = {case: files[0] for case, files in groups.items()}
        extra = {case: files[1:] for case, files in groups.items()}
    for p in images if not extra else ():
        stem = stem_of(p)
        if stem in by_stem:
            problems.append(f"{p} and {by_stem[stem].name} share the name {stem!r}; keep one of them")
        else:
            by_stem[stem] = p
    return by_stem, extra, problems


def _pair_masks(mask_dir: Path | None, img_dir: Path, by_stem: dict[str, Path], ignored: list[Path],
                problems: list[str], spec: DataSpec) -> tuple[dict[str, Path], dict]:
    """(case name -> mask file from ``mask_dir``, pairing information); non-masks go to
    ``ignored``, pairing problems to ``problems``."""
    if mask_dir is None:
        return {}, {}
    mask_files, other = _listing(mask_dir, MASK_SUFFIXES)
    ignored.extend(other)
    if not mask_files:
        problems.append(f"{mask_dir} holds no masks; put one mask per image there, named like its image")
        return {}, {}
    by_mask: dict[str, Path] = {}
    for p in mask_files:
        if stem_of(p) in by_mask:
            problems.append(f"{p} and {by_mask[stem_of(p)].name} share the name {stem_of(p)!r}; "
                            "keep one of them")
        else:
            by_mask[stem_of(p)] = p
    for flag, pattern in (("--image-pattern", spec.image_pattern), ("--mask-pattern", spec.mask_pattern)):
        try:
            compile_pattern(pattern or STEM)
        except UsegError as e:
            problems.append(f"{flag}: {e}")
            return {}, {}
    pairing = pair_stems(list(by_stem), list(by_mask), spec.image_pattern, spec.mask_pattern)
    folders = _Folders(img_dir, mask_dir, by_stem, by_mask)
    problems.extend(_pattern_problems(folders, spec) or _pairing_problems(folders, pairing))
    masks = {stem: by_mask[m] for stem, m in pairing.pairs.items()}
    info = {"pairing": pairing.rule, "image_pattern": spec.image_pattern, "mask_pattern": spec.mask_pattern,
            "files": {"images": len(by_stem), "masks": len(by_mask)}}
    if pairing.pairs:
        stem, m = next(iter(pairing.pairs.items()))
        info["example"] = (by_stem[stem].name, by_mask[m].name)
    return masks, info


@dataclass(frozen=True)
class _Folders:
    """The two folders of a plain layout and their files by stem, for the pairing sentences."""

    img_dir: Path
    mask_dir: Path
    images: dict[str, Path]  # image stem (case name) -> its first file
    masks: dict[str, Path]  # mask stem -> mask file


def _pattern_problems(f: _Folders, spec: DataSpec) -> list[str]:
    """A pattern that matches no file of its folder (one sentence, instead of one per file)."""
    problems = []
    for flag, pattern, files, folder in (("--image-pattern", spec.image_pattern, f.images, f.img_dir),
                                         ("--mask-pattern", spec.mask_pattern, f.masks, f.mask_dir)):
        if pattern is not None and not any(compile_pattern(pattern).fullmatch(s) for s in files):
            problems.append(f"{flag} {pattern!r} matches none of the {len(files)} files in {folder} "
                            f"(such as {next(iter(files.values())).name}); write their names with {STEM} "
                            f"in place of the part they share with their partners, like '{STEM}_seg'")
    return problems


def _pairing_problems(f: _Folders, pairing: Pairing) -> list[str]:
    """One sentence per ambiguity and per unpaired file, after a hint when the folder almost pairs."""
    how = RULE_TEXT[pairing.rule]
    problems = [_ambiguity_sentence(f, a, how) for a in pairing.ambiguous]
    in_ambiguity = {s for a in pairing.ambiguous for s in (*a.images, *a.others)}
    lone_images = [s for s in pairing.unpaired_images if s not in in_ambiguity]
    lone_masks = [s for s in pairing.unpaired_others if s not in in_ambiguity]
    by_name = pairing.rule in ("same stem", "mask suffix")
    for stem in lone_masks:
        p = f.masks[stem]
        if by_name and mask_stem(stem) in pairing.pairs:
            problems.append(f"{p} and {f.masks[pairing.pairs[mask_stem(stem)]].name} are both masks of "
                            f"{mask_stem(stem)!r}; keep one of them")
        elif by_name:
            problems.append(f"{p} has no image {mask_stem(stem)}.* in {f.img_dir}; "
                            "add the image or remove the mask")
        else:
            problems.append(f"{p} has no image in {f.img_dir} that pairs with it by {how}; "
                            "add the image, remove the mask or give --mask-pattern")
    for stem in lone_images:
        p = f.images[stem]
        if by_name:
            problems.append(f"{p} has no mask {stem}.png in {f.mask_dir}; add its mask or move the image out")
        else:
            problems.append(f"{p} has no mask in {f.mask_dir} that pairs with it by {how}; "
                            "add its mask, move the image out or give --mask-pattern")
    if lone_images and lone_masks and pairing.rule != "pattern":  # names that almost pair
        problems.insert(0, _almost_pairs_hint(f, pairing, how))
    return [p for p in problems if p]


def _ambiguity_sentence(f: _Folders, a: Ambiguity, how: str) -> str:
    """One sentence naming the files that could pair more than one way."""
    if len(a.images) == 1:
        masks = [f.masks[s] for s in a.others]
        return (f"{masks[0]} and {_names(masks[1:])} are {'both' if len(masks) == 2 else 'all'} masks of "
                f"{a.images[0]!r} by {how}; keep one of them or give --mask-pattern")
    images = [f.images[s] for s in a.images]
    return (f"{images[0]} and {_names(images[1:])} pair with the same mask(s) "
            f"{_names([f.masks[s] for s in a.others])} by {how}; rename them or give "
            "--image-pattern and --mask-pattern")


def _names(paths: Sequence[Path], most: int = 3) -> str:
    names = ", ".join(p.name for p in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _almost_pairs_hint(f: _Folders, pairing: Pairing, how: str) -> str | None:
    """"12 of 20 masks pair by number; ..." when images and masks are left over on both sides and
    names pair some other way than equal names and suffixes (or not at all)."""
    if not pairing.pairs:
        return (f"no mask in {f.mask_dir} pairs with an image in {f.img_dir} (tried equal names, "
                "the suffixes _mask, _label, _labels and _seg, shared prefixes and suffixes, one number "
                f"per name); name the masks like their images or give --mask-pattern, like '{STEM}_seg'")
    if pairing.rule in ("same stem", "mask suffix"):  # the file sentences say it: files are missing
        return None
    return (f"{len(pairing.pairs)} of {len(f.masks)} masks in {f.mask_dir} pair with an image by {how}; "
            f"name the other {len(f.masks) - len(pairing.pairs)} the same way or give --mask-pattern "
            f"(and --image-pattern), like '{STEM}_seg'")


def discover(root: str | Path, spec: DataSpec | None = None) -> list[Case]:
    """The cases of a data folder: ``root/images/*`` paired with ``root/masks/*`` by name.

    Names pair by :func:`useg.pairing.pair_stems` (``spec.image_pattern`` / ``spec.mask_pattern``
    override its rules); a case is named after its image's stem. Cases come in natural
    order (2 before 10). A folder without images/ is a folder of images to predict (cases
    without masks); images without masks get ``mask=None``. :func:`check_dataset` reports the rest.
    nnU-Net raw folders and case folders (``spec.channel_names``/``spec.label_name`` file-name
    prefixes) are read as :mod:`useg.layouts` describes.

    Raises:
        UsegError: the folder does not exist or holds no images.
    """
    spec = spec or DataSpec()
    cases, problems, _, _ = _pair(Path(root), spec)
    if not cases:
        raise UsegError(problems[0])
    return with_rois(cases, spec.roi_dir, [])


def with_rois(cases: Sequence[Case], roi_dir: str | Path | None, problems: list[str]) -> list[Case]:
    """The cases with their ROI masks from ``roi_dir`` (unchanged without one); images lacking an
    ROI go to ``problems``.

    Raises:
        UsegError: ``roi_dir`` is not a folder.
    """
    if roi_dir is None or not cases:
        return list(cases)
    found, missing = pair_rois([c.name for c in cases], [c.image for c in cases], roi_dir)
    problems.extend(missing)
    return [dataclasses.replace(c, roi=found.get(c.name)) for c in cases]


def prediction_inputs(paths: Sequence[str | Path], channel_names: Sequence[str] = ()) -> list[Case]:
    """What ``useg predict`` was given, as cases: files, DICOM series folders, one case folder
    (its channel files found by ``channel_names``), data folders and folders of case folders.

    Raises:
        UsegError: a path that does not exist, or a folder holding no images.
    """
    found: list[Case] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsegError(f"{p} does not exist; check the path")
        if not p.is_dir() or volumes.is_dicom_dir(p):
            refuse_special(p, "a regular image file")  # at discovery: reading a FIFO would wait forever
            found.append(Case(stem_of(p), p))
        elif (files := layouts.case_folder_files(p, channel_names)) is not None:
            found.append(Case(p.name, files[0], None, tuple(files[1:])))
        else:  # images/ of a data folder, the folder itself (channels grouped), or a folder of case folders
            found.extend(discover(p, DataSpec(channel_names=tuple(channel_names))))
    return found


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
    cases, problems, ignored, info = _pair(root, spec)
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


