"""Data folders: pairing images with masks, checking them, normalising, splitting, sampling patches.

Layout: ``DATA/images/<stem>.<ext>`` with ``DATA/masks/<stem>.<ext>`` (or ``<stem>_mask`` /
``<stem>_label``), PNG, TIFF or NIfTI, paired by stem; channels as separate ``<stem>_0000`` files,
nnU-Net's raw layout and case folders through :mod:`useg.layouts`. :func:`check_dataset` reads
every file once and lists every problem, one sentence each naming the file and the fix.
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
from .files import stem_of, suffix_of
from .io import IMAGE_SUFFIXES, MASK_SUFFIXES, read_mask
from .labels import LabelMap, label_map_of_masks

logger = logging.getLogger(__name__)

MASK_STEM_SUFFIXES = ("_mask", "_label", "_labels", "_seg")  # mask stem = image stem + one of these


@dataclass(frozen=True)
class Case:
    name: str  # the file stem shared by image and mask
    image: Path  # the image file
    mask: Path | None = None  # its mask, None for unlabelled images
    extra: tuple[Path, ...] = ()  # channel files after the first, for cases stored one file per channel

    @property
    def files(self) -> tuple[Path, ...]:
        """Every channel file of the image, in channel order."""
        return (self.image, *self.extra)


def natural_key(text: str) -> list:
    """Sort key putting "2" before "10" (case-insensitive otherwise)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text)]


def _listing(folder: Path, suffixes: frozenset[str] | set[str]) -> tuple[list[Path], list[Path]]:
    """(files with a known suffix in natural order, other visible files) of a folder."""
    files, other = [], []
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            (files if suffix_of(p) in suffixes else other).append(p)
    return sorted(files, key=lambda p: natural_key(p.name)), sorted(other)


def mask_stem(stem: str) -> str:
    for suffix in MASK_STEM_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _pair(root: Path, channels: Sequence[str] | None = None, label: str | None = None
          ) -> tuple[list[Case], list[str], list[Path], dict]:
    """Cases, pairing problems, ignored (non-image) files and layout information of a data folder."""
    if not root.is_dir():
        return [], [f"{root} is not a folder; give a folder with images/ and masks/"], [], {}
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        cases, problems, info = layouts.nnunet_cases(root, Case)
        return cases, problems, [], info
    if channels or label or layouts.is_case_folders(root):
        cases, problems, info = layouts.folder_cases(root, channels, label, Case)
        return cases, problems, [], info
    img_dir = root / "images" if (root / "images").is_dir() else root
    images, ignored = _listing(img_dir, IMAGE_SUFFIXES)
    if not images:
        no_images = (f"{img_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                     f"put the images in {root / 'images'}")
        return [], [no_images], ignored, {}
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
    masks: dict[str, Path] = {}
    mask_dir = root / "masks"
    if img_dir != root and mask_dir.is_dir():
        mask_files, other = _listing(mask_dir, MASK_SUFFIXES)
        ignored += other
        if not mask_files:
            problems.append(f"{mask_dir} holds no masks; put one mask per image there, named like its image")
        for p in mask_files:
            stem = stem_of(p) if stem_of(p) in by_stem else mask_stem(stem_of(p))
            if stem in masks:
                problems.append(f"{p} and {masks[stem].name} are both masks of {stem!r}; keep one of them")
            else:
                masks[stem] = p
        for stem, p in masks.items():
            if stem not in by_stem:
                problems.append(f"{p} has no image {stem}.* in {img_dir}; add the image or remove the mask")
        if mask_files:
            for stem, p in by_stem.items():
                if stem not in masks:
                    problems.append(f"{p} has no mask {stem}.png in {mask_dir}; add its mask or move the image out")
    cases = [Case(stem, p, masks.get(stem), extra.get(stem, ())) for stem, p in by_stem.items()]
    return cases, problems, ignored, {"layout": "plain"}


def discover(root: str | Path, channels: Sequence[str] | None = None, label: str | None = None) -> list[Case]:
    """The cases of a data folder: ``root/images/*`` paired with ``root/masks/*`` by stem.

    A mask may carry a ``_mask`` / ``_label`` suffix on its image's stem. Cases come in natural
    order (2 before 10). A folder without images/ is a folder of images to predict (cases
    without masks); images without masks get ``mask=None``. :func:`check_dataset` reports the rest.
    nnU-Net raw folders and case folders (``channels``/``label`` file-name prefixes) are read as
    :mod:`useg.layouts` describes.

    Raises:
        UsegError: the folder does not exist or holds no images.
    """
    cases, problems, _, _ = _pair(Path(root), channels, label)
    if not cases:
        raise UsegError(problems[0])
    return cases


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
            found.append(Case(stem_of(p), p))
        elif (files := layouts.case_folder_files(p, channel_names)) is not None:
            found.append(Case(p.name, files[0], None, tuple(files[1:])))
        else:  # images/ of a data folder, the folder itself (channels grouped), or a folder of case folders
            found.extend(discover(p, channels=list(channel_names) or None))
    return found


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        cases: paired cases (mask None where it is missing).
        problems: one sentence each, naming the file and the fix; empty when the data is usable.
        label_map: the masks' encoding, when masks were readable.
        channels: image channels, when every readable image has the same count.
        stats: JSON-able summary (counts, sizes, dtypes, pixel share per mask value, ignored files).
        shapes: spatial shape of every readable image, so planning need not read them again.
        spacings: voxel spacing of every readable image (same order as ``shapes``).
        intensities: per channel, foreground intensity samples pooled over cases (the
            fingerprint's intensity statistics; nnU-Net samples the same way).
        info: the layout ("plain", "nnunet", "folders") and what it names (channels, labels).
    """

    cases: list[Case]
    problems: list[str]
    label_map: LabelMap | None = None
    channels: int | None = None
    stats: dict = field(default_factory=dict)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    intensities: list[np.ndarray] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    per_case: dict[str, dict] = field(default_factory=dict)  # name -> shape, spacing, samples, background

    def without(self, names) -> CheckReport:
        """The report of the cases not in ``names`` (held-out test cases), so a plan's fingerprint,
        intensity statistics included, never sees them."""
        names = set(names)
        if not names:
            return self
        keep = {n: v for n, v in self.per_case.items() if n not in names}
        samples = [v["samples"] for v in keep.values() if v.get("samples") is not None]
        info = {**self.info, "background_share": float(np.mean([v["background"] for v in keep.values()] or [0.0]))}
        return dataclasses.replace(
            self, cases=[c for c in self.cases if c.name not in names],
            shapes=[v["shape"] for v in keep.values()], spacings=[v["spacing"] for v in keep.values()],
            intensities=[np.concatenate(c) for c in zip(*samples)] if samples else [], info=info, per_case=keep)

    @property
    def ok(self) -> bool:
        return not self.problems


def _majority(groups: dict) -> object:
    return max(groups, key=lambda k: len(groups[k]))


def check_dataset(root: str | Path, labels: Sequence[int] | None = None,
                  channels: Sequence[str] | None = None, label: str | None = None) -> CheckReport:
    """Read every file of a training folder once and list every problem.

    Problems: missing or empty folders, images without masks and masks without images,
    duplicate names, unreadable files, JPEG masks, image/mask size mismatches, inconsistent
    channel counts or dimensions, palettes that disagree, unknown mask values (see
    :func:`useg.labels.label_map_of_masks`) and a single class only.

    Args:
        root: a folder with images/ and masks/.
        labels: the masks' stored values (``--labels``), when they should not be inferred
            (an nnU-Net dataset.json's labels are used otherwise).
        channels, label: file-name prefixes of the channel and label files in case folders.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when anything must be fixed.
    """
    root = Path(root)
    cases, problems, ignored, info = _pair(root, channels, label)
    if labels is None and info.get("labels"):
        labels = sorted(info["labels"])
    if cases and info.get("layout") == "plain" and not (root / "masks").is_dir():
        problems.append(f"{root} has no masks/ folder; put the images in {root / 'images'} "
                        f"and one mask per image in {root / 'masks'}")
    value_sets: dict[str, set[int]] = {}
    modes: dict[str, list[str]] = {}
    palettes: dict[str, tuple[int, ...]] = {}
    channels: dict[int, list[Path]] = {}
    dims: dict[int, list[Path]] = {}
    shapes, spacings, dtypes, samples, background = [], [], set(), [], []
    pixel_counts: dict[int, int] = {}
    per_case: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for case in cases:
        try:
            image = layouts.read_case_image(case.files)
        except UsegError as e:
            problems.append(str(e))
            image = None
        if image is not None:
            if not np.issubdtype(image.array.dtype, np.integer) and not np.isfinite(image.array).all():
                problems.append(f"{case.image} contains NaN or infinite values; replace them before training")
            channels.setdefault(image.channels, []).append(case.image)
            dims.setdefault(image.dims, []).append(case.image)
            shapes.append(image.spatial_shape)
            spacings.append(image.spacing)
            lowest = image.array.reshape(image.channels, -1).min(axis=1).reshape((-1,) + (1,) * image.dims)
            background.append(float((image.array == lowest).all(axis=0).mean()))
            per_case[case.name] = {"shape": image.spatial_shape, "spacing": image.spacing,
                                   "background": background[-1], "samples": None}
            dtypes.add(str(image.array.dtype))
        if case.mask is None:
            continue
        try:
            raw, mode, pal = read_mask(case.mask)
        except UsegError as e:
            problems.append(str(e))
            continue
        if image is not None and raw.shape != image.spatial_shape:
            problems.append(f"{case.mask} is {'x'.join(map(str, raw.shape))} but its image is "
                            f"{'x'.join(map(str, image.spatial_shape))}; masks must match their images pixel for pixel")
            continue
        mask_spacing = volumes.nifti_spacing(case.mask) if volumes.is_nifti(case.mask) else None
        if image is not None and mask_spacing and not np.allclose(mask_spacing, image.spacing, rtol=1e-3):
            problems.append(f"{case.mask} has spacing {_fmt(mask_spacing)} but its image has {_fmt(image.spacing)}; "
                            "resample the mask onto its image's grid (nearest neighbour)")
            continue
        if image is not None and mode == "grey" and (not samples or len(samples[0]) == image.channels):
            samples.append(_foreground_sample(image.array, raw > raw.min(initial=0), rng))
            per_case[case.name]["samples"] = samples[-1]
        values, counts = np.unique(raw, return_counts=True)
        value_sets[str(case.mask)] = set(values.tolist())
        for v, c in zip(values.tolist(), counts.tolist()):
            pixel_counts[v] = pixel_counts.get(v, 0) + c
        modes.setdefault(mode, []).append(str(case.mask))
        if pal is not None:
            palettes[str(case.mask)] = pal
    for groups, what, fix in ((channels, "channel(s)", "convert them to the same channels"),
                              (dims, "spatial dimensions", "train 2D and 3D data separately")):
        if len(groups) > 1:
            common = _majority(groups)
            for c, paths in groups.items():
                problems.extend(f"{p} has {c} {what} but most images have {common}; {fix}"
                                for p in paths if c != common)
    label_map = None
    if value_sets:
        label_map, label_problems = label_map_of_masks(
            value_sets, {n: m for m, names in modes.items() for n in names}, palettes, labels, root / "masks")
        problems.extend(label_problems)
    stats: dict = {"cases": len(cases), "labelled": sum(c.mask is not None for c in cases)}
    if shapes:
        stats["dims"] = sorted(dims)
        stats["image sizes"] = f"{'x'.join(map(str, min(shapes)))} .. {'x'.join(map(str, max(shapes)))}"
        stats["image dtypes"] = sorted(dtypes)
    if pixel_counts:
        total = sum(pixel_counts.values())
        stats["pixel share per mask value"] = {str(v): round(c / total, 4) for v, c in sorted(pixel_counts.items())}
    if ignored:
        stats["ignored files"] = [str(p) for p in ignored]
        logger.info("ignoring %d files that are not images: %s", len(ignored), ", ".join(p.name for p in ignored[:5]))
    nchan = next(iter(channels)) if len(channels) == 1 else None
    if spacings:
        stats["spacing (median)"] = _fmt(tuple(float(np.median([s[i] for s in spacings])) for i in range(len(spacings[0]))))
    if info.get("layout", "plain") != "plain":
        stats["layout"] = info["layout"]
    intensities = [np.concatenate(c) for c in zip(*samples)] if samples else []
    if background:
        info = {**info, "background_share": float(np.mean(background))}
    return CheckReport(cases, problems, label_map, nchan, stats, shapes, spacings, intensities, info, per_case)


def _fmt(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


def _foreground_sample(image: np.ndarray, fg: np.ndarray, rng: np.random.Generator, n: int = 10_000) -> list[np.ndarray]:
    """Up to ``n`` foreground intensities per channel (all voxels when the mask is empty)."""
    idx = np.flatnonzero(fg) if fg.any() else np.arange(fg.size)
    if idx.size > n:
        idx = rng.choice(idx, n, replace=False)
    flat = image.reshape(image.shape[0], -1)
    return [flat[c, idx].astype(np.float32) for c in range(image.shape[0])]


def load_case(case: Case, label_map: LabelMap | None, spacing: Sequence[float] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one case, resampled to ``spacing`` when given and different from the file's.

    Returns:
        (image (C, *S) float32, labels (*S) int64 class indices, or None without a mask or map).

    Raises:
        UsegError: unreadable files, unknown mask values, a mask of another size than its image.
    """
    image = layouts.read_case_image(case.files)
    labels = None
    if case.mask is not None and label_map is not None:
        labels = label_map.decode(read_mask(case.mask)[0], path=case.mask)
        if labels.shape != image.spatial_shape:
            raise UsegError(f"{case.mask} is {'x'.join(map(str, labels.shape))} but {case.image} is "
                            f"{'x'.join(map(str, image.spatial_shape))}; masks must match their images pixel for pixel")
    array = image.array.astype(np.float32)
    if spacing is not None and not np.allclose(image.spacing, spacing, rtol=1e-3):
        from .resample import resample_image, resample_labels

        array = resample_image(array, image.spacing, tuple(spacing))
        if labels is not None:
            labels = resample_labels(labels, array.shape[1:])
    return array, labels


NORMALIZATIONS = ("zscore", "zscore_mask", "ct", "none")


def normalize(array: np.ndarray, method: str = "zscore",
              intensity: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Intensity normalisation per channel, nnU-Net's three schemes (Isensee et al. 2021).

    * ``"zscore"``: per image and channel ``(x - mean) / max(std, 1e-8)`` (the non-CT default).
    * ``"zscore_mask"``: the same statistics taken inside the object (voxels where some channel is
      above its minimum, i.e. not the constant background of a skull-stripped MRI); the
      background is set to 0. nnU-Net does this when cropping to the non-zero region pays.
    * ``"ct"``: clip to the dataset's foreground 0.5/99.5 percentiles, then subtract the dataset's
      foreground mean and divide by its std: one global scale, since CT units are physical.
    * ``"none"``: cast to float32 only.

    Args:
        array: (C, *S) image.
        method: one of :data:`NORMALIZATIONS`.
        intensity: for "ct", per channel (lo, hi, mean, std) from the dataset fingerprint.

    Returns:
        (C, *S) float32.
    """
    x = np.asarray(array, dtype=np.float32)
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if method == "none":
        return x
    if x.ndim < 2:
        raise ValueError(f"normalize needs a channels-first array (C, *S), got shape {x.shape}")
    if method == "ct":
        if intensity is None or len(intensity) != x.shape[0]:
            raise ValueError(f"ct normalization needs (lo, hi, mean, std) for each of the {x.shape[0]} channels")
        out = np.empty_like(x)
        for c, (lo, hi, mean, std) in enumerate(intensity):
            out[c] = (np.clip(x[c], lo, hi) - mean) / max(std, 1e-8)
        return out
    axes = tuple(range(1, x.ndim))
    if method == "zscore_mask":
        inside = (x > x.min(axis=axes, keepdims=True)).any(axis=0)
        if inside.any():
            out = np.zeros_like(x)
            for c in range(x.shape[0]):
                v = x[c][inside]
                out[c][inside] = (v - v.mean(dtype=np.float64)) / max(float(v.std(dtype=np.float64)), 1e-8)
            return out
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0,
                val_names: Sequence[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split, both in the input order.

    Args:
        cases: all labelled cases.
        val_fraction: share for validation when ``val_names`` is None, in [0, 1); with two or
            more cases and a positive fraction each side gets at least one case.
        seed: the shuffle seed.
        val_names: explicit validation case names.

    Raises:
        UsegError: a name in ``val_names`` that is no case, or names that leave no training case.
    """
    cases = list(cases)
    if val_names:
        names = set(val_names)
        unknown = names - {c.name for c in cases}
        if unknown:
            raise UsegError(f"validation cases {sorted(unknown)[:5]} are not in the data; use names of its images")
        train, val = [c for c in cases if c.name not in names], [c for c in cases if c.name in names]
        if not train:
            raise UsegError("every case is a validation case; leave at least one for training")
        return train, val
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if len(cases) < 2 or val_fraction == 0:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]
