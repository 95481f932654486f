"""Data folders: pairing images with masks, checking them, normalising, splitting, sampling patches.

Layout: ``DATA/images/<stem>.<ext>`` with ``DATA/masks/<stem>.<ext>`` (or ``<stem>_mask`` /
``<stem>_label``), PNG or TIFF, paired by stem. :func:`check_dataset` reads every file once and
lists every problem, one sentence each naming the file and the fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UsegError
from .io import IMAGE_SUFFIXES, JPEG_SUFFIXES, MASK_SUFFIXES, read_image, read_mask
from .labels import LabelMap, infer_label_map

logger = logging.getLogger(__name__)

MASK_STEM_SUFFIXES = ("_mask", "_label", "_labels", "_seg")


@dataclass(frozen=True)
class Case:
    name: str  # the file stem shared by image and mask
    image: Path  # the image file
    mask: Path | None = None  # its mask, None for unlabelled images


def natural_key(text: str) -> list:
    """Sort key putting "2" before "10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                   and not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def _mask_stem(stem: str) -> str:
    for suffix in MASK_STEM_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _pair(root: Path) -> tuple[list[Case], list[str]]:
    """Cases and pairing problems of a data folder."""
    root = Path(root)
    problems: list[str] = []
    if not root.is_dir():
        return [], [f"{root} is not a folder; give a folder with images/ and masks/"]
    img_dir = root / "images" if (root / "images").is_dir() else root
    images = _files(img_dir, IMAGE_SUFFIXES)
    if not images:
        return [], [f"{img_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put the images in {root}/images"]
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            problems.append(f"{p} and {by_stem[p.stem].name} share the stem {p.stem!r}; keep one of them")
        else:
            by_stem[p.stem] = p
    masks: dict[str, Path] = {}
    mask_dir = root / "masks"
    if mask_dir.is_dir():
        for p in _files(mask_dir, MASK_SUFFIXES):
            stem = p.stem if p.stem in by_stem else _mask_stem(p.stem)
            if stem in masks:
                problems.append(f"{p} and {masks[stem].name} are both masks of {stem!r}; keep one of them")
            else:
                masks[stem] = p
        for stem, p in masks.items():
            if stem not in by_stem:
                problems.append(f"{p} has no image {stem}.* in {img_dir}; add the image or remove the mask")
        for stem, p in by_stem.items():
            if stem not in masks:
                problems.append(f"{p} has no mask {stem}.png in {mask_dir}; add its mask or move the image out")
    cases = [Case(stem, p, masks.get(stem)) for stem, p in by_stem.items()]
    return cases, problems


def discover(root: str | Path) -> list[Case]:
    """The cases of a data folder (images/ paired with masks/ by stem, natural order).

    A folder without images/ is a folder of images to predict (cases without masks).

    Raises:
        UsegError: when the folder holds no images.
    """
    cases, problems = _pair(Path(root))
    if not cases:
        raise UsegError(problems[0])
    return cases


@dataclass
class CheckReport:
    cases: list[Case]  # paired cases (mask may be None when masks/ is missing)
    problems: list[str]  # one sentence each, naming the file and the fix
    label_map: LabelMap | None = None  # the masks' encoding, when masks were readable
    channels: int | None = None  # image channels (when consistent)
    stats: dict = field(default_factory=dict)  # sizes, class frequencies

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: str | Path, labels: Sequence[int] | None = None) -> CheckReport:
    """Read every file of a training folder once and list every problem.

    Args:
        root: a folder with images/ and masks/.
        labels: the masks' stored values, when they should not be inferred.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when anything must be fixed.
    """
    root = Path(root)
    cases, problems = _pair(root)
    if cases and not (root / "masks").is_dir():
        problems.append(f"{root} has no masks/ folder; put one mask per image in {root}/masks")
    value_sets: dict[str, set[int]] = {}
    modes: dict[str, str] = {}
    palette = None
    channels: dict[int, list[str]] = {}
    shapes = []
    pixel_counts: dict[int, int] = {}
    for case in cases:
        try:
            image = read_image(case.image)
        except UsegError as e:
            problems.append(str(e))
            image = None
        if image is not None:
            if not np.issubdtype(image.array.dtype, np.integer) and not np.isfinite(image.array).all():
                problems.append(f"{case.image} contains NaN or infinite values; fix or mask them")
            channels.setdefault(image.channels, []).append(case.image.name)
            shapes.append(image.spatial_shape)
        if case.mask is None:
            continue
        if case.mask.suffix.lower() in JPEG_SUFFIXES:
            problems.append(f"{case.mask} is a JPEG mask; lossy compression changes label values, "
                            "save masks as PNG or TIFF")
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
        values, counts = np.unique(raw, return_counts=True)
        value_sets[str(case.mask)] = set(values.tolist())
        for v, c in zip(values.tolist(), counts.tolist()):
            pixel_counts[v] = pixel_counts.get(v, 0) + c
        modes[str(case.mask)] = mode
        palette = palette or pal
    if len(channels) > 1:
        common = max(channels, key=lambda c: len(channels[c]))
        for c, names in channels.items():
            if c != common:
                problems.append(f"{', '.join(names[:3])} have {c} channel(s) but most images have {common}; "
                                "convert them to the same channels")
    label_map = None
    if value_sets:
        kinds = set(modes.values())
        if len(kinds) > 1:
            common = max(kinds, key=lambda k: sum(m == k for m in modes.values()))
            for name, m in modes.items():
                if m != common:
                    problems.append(f"{name} is a {m} mask but most masks are {common}; save all masks the same way")
            mode = common
        else:
            mode = kinds.pop()
        label_map, label_problems = infer_label_map(value_sets, mode, palette, explicit=labels)
        problems.extend(label_problems)
        if label_map.num_classes < 2:
            problems.append(f"every mask in {root}/masks holds only the value {label_map.values[0]}; "
                            "a segmentation needs at least two classes")
    stats = {}
    if shapes:
        stats["image sizes"] = f"{min(shapes)} .. {max(shapes)}"
    if pixel_counts:
        total = sum(pixel_counts.values())
        stats["pixel share per mask value"] = ", ".join(f"{v}: {c / total:.3f}" for v, c in sorted(pixel_counts.items()))
    nchan = next(iter(channels)) if len(channels) == 1 else None
    return CheckReport(cases, problems, label_map, nchan, stats)


def load_case(case: Case, label_map: LabelMap | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (C, *S) float32 and labels (*S) int64 (None without a mask or label map)."""
    image = read_image(case.image)
    labels = None
    if case.mask is not None and label_map is not None:
        labels = label_map.decode(read_mask(case.mask)[0], path=case.mask)
    return image.array.astype(np.float32), labels


def normalize(array: np.ndarray, method: str = "zscore") -> np.ndarray:
    """Per image and channel z-score ``(x - mean) / std`` (nnU-Net's default for non-CT), float32.

    Args:
        array: (C, *S).
        method: "zscore" or "none".
    """
    x = np.asarray(array, dtype=np.float32)
    if method == "none":
        return x
    if method != "zscore":
        raise ValueError(f"unknown normalization {method!r}; choose zscore or none")
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0,
                val_names: Sequence[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split (at least one case each side when there are two or more).

    Args:
        cases: all labelled cases.
        val_fraction: share for validation when ``val_names`` is None.
        seed: the shuffle seed.
        val_names: explicit validation case names.
    """
    cases = list(cases)
    if val_names:
        names = set(val_names)
        return [c for c in cases if c.name not in names], [c for c in cases if c.name in names]
    if len(cases) < 2 or val_fraction <= 0:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    order = np.random.default_rng(seed).permutation(len(cases))
    val = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def mirror_index(start: int, size: int, dim: int) -> np.ndarray:
    """Indices start..start+size-1 into an axis of length ``dim``, mirrored (reflect) outside it."""
    idx = np.arange(start, start + size)
    if dim == 1:
        return np.zeros_like(idx)
    period = 2 * (dim - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= dim, period - idx, idx)


def _window(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The window ``start:start+size`` over the trailing axes, mirror-extended outside the array."""
    lead = array.ndim - len(size)
    index = np.ix_(*(mirror_index(s, n, d) for s, n, d in zip(start, size, array.shape[lead:])))
    return array[(slice(None),) * lead + index]


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches with foreground oversampling, reproducible per (seed, epoch, index).

    Args:
        images: (C, *S) float32 normalised images.
        labels: (*S) int64 class labels.
        patch_size: network input size.
        out_size: network output size (smaller with valid padding); labels are centre-cropped to it.
        length: patches per epoch.
        seed: base seed.
        augment: callable(image, label, weight, rng) -> (image, label, weight), same sizes.
        weights: optional (*S) float32 per-pixel loss weights.
        fg_fraction: share of patches centred on a random foreground (label > 0) pixel.
    """

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], patch_size: Sequence[int],
                 out_size: Sequence[int] | None = None, length: int = 250, seed: int = 0,
                 augment: Callable | None = None, weights: list[np.ndarray] | None = None,
                 fg_fraction: float = 0.33):
        if not images or len(images) != len(labels):
            raise ValueError("images and labels must be non-empty lists of the same length")
        self.images, self.labels, self.weights = images, labels, weights
        self.patch_size = tuple(int(p) for p in patch_size)
        self.out_size = tuple(int(p) for p in (out_size or patch_size))
        self.length, self.seed, self.augment, self.fg_fraction = length, seed, augment, fg_fraction
        self.epoch = 0
        # foreground coordinates per image, found once (sampling them each time would dominate)
        self._fg = [np.flatnonzero(lab > 0) for lab in labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(len(self.images)))
        image, label = self.images[k], self.labels[k]
        shape = label.shape
        if self._fg[k].size and rng.random() < self.fg_fraction:
            centre = np.unravel_index(self._fg[k][rng.integers(self._fg[k].size)], shape)
            out_start = [int(c) - o // 2 for c, o in zip(centre, self.out_size)]
        else:  # uniform inside the image; an image smaller than the output is centred and mirrored
            out_start = [int(rng.integers(d - o + 1)) if d >= o else (d - o) // 2
                         for d, o in zip(shape, self.out_size)]
        # the input window adds the context margin that valid convolutions consume
        margin = [(p - o) // 2 for p, o in zip(self.patch_size, self.out_size)]
        start = [s - m for s, m in zip(out_start, margin)]
        img = _window(image, start, self.patch_size)
        lab = _window(label, start, self.patch_size)
        w = _window(self.weights[k], start, self.patch_size) if self.weights is not None else None
        if self.augment is not None:
            img, lab, w = self.augment(img, lab, w, rng)
        crop = tuple(slice(m, m + o) for m, o in zip(margin, self.out_size))
        out = {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
               "label": torch.from_numpy(np.ascontiguousarray(lab[crop], dtype=np.int64))}
        if w is not None:
            out["weight"] = torch.from_numpy(np.ascontiguousarray(w[crop], dtype=np.float32))
        return out
