"""Data folders, the discover stage: finding the cases (pairing images with masks).

Layout: ``DATA/images/<stem>.<ext>`` with ``DATA/masks/<stem>.<ext>``, PNG, TIFF or NIfTI, paired
by name as :mod:`useg.pairing` describes (equal stems, ``<stem>_mask``, shared prefixes and
suffixes, one number per name, or the user's patterns); channels as separate ``<stem>_0000`` files
and case folders through :mod:`useg.layouts`, nnU-Net's raw layout through :mod:`useg.nnunet_raw`.
:func:`discover` gives the cases of a training folder, :func:`prediction_inputs` what ``useg
predict`` was given. Checking the cases is :mod:`useg.check`'s (:func:`pair_folder` hands it the
pairing problems); reading them into arrays is :mod:`useg.preprocess`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layouts, nnunet_raw, volumes
from .errors import UsegError
from .files import is_special, refuse_special, stem_of, suffix_of
from .io import IMAGE_SUFFIXES, MASK_SUFFIXES
from .pairing import RULE_TEXT, STEM, Ambiguity, Pairing, compile_pattern, mask_stem, pair_stems
from .roi import pair_rois
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


def pair_folder(root: Path, spec: DataSpec) -> tuple[list[Case], list[str], list[Path], dict]:
    """Cases, pairing problems, ignored (non-image) files and layout information of a data folder."""
    if not root.is_dir():
        return [], [f"{root} is not a folder; give a folder with images/ and masks/"], [], {}
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        cases, problems, info = nnunet_raw.nnunet_cases(root, Case)
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
    without masks); images without masks get ``mask=None``. :func:`useg.check.check_dataset` reports
    the rest.
    nnU-Net raw folders and case folders (``spec.channel_names``/``spec.label_name`` file-name
    prefixes) are read as :mod:`useg.layouts` describes.

    Raises:
        UsegError: the folder does not exist or holds no images.
    """
    spec = spec or DataSpec()
    cases, problems, _, _ = pair_folder(Path(root), spec)
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
