"""Training patches: random windows with foreground oversampling, reproducible per (seed, epoch, index)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .roi import IGNORE
from .tiling import mirror_indices

FG_SAMPLES_PER_CLASS = 10_000  # foreground locations kept per class and image (nnU-Net keeps as many)
ROI_SAMPLES = 100_000  # locations inside the ROI kept per image, for windows centred inside it


def _window(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The window ``start:start+size`` over the trailing axes, mirror-extended outside the array."""
    lead = array.ndim - len(size)
    index = np.ix_(*(mirror_indices(s, n, d) for s, n, d in zip(start, size, array.shape[lead:])))
    return array[(slice(None),) * lead + index]


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches with foreground oversampling, reproducible per (seed, epoch, index).

    Item i of epoch e draws everything from ``np.random.default_rng([seed, e, i])``, so it is
    the same in any worker process and differs between epochs. With probability
    ``fg_fraction`` the output window is centred on a foreground pixel: a foreground class
    present in the image is chosen uniformly, then one of its pixels (as nnU-Net does, so rare
    classes are seen); otherwise the output window lies uniformly inside the image, or, when the
    labels hold :data:`useg.roi.IGNORE` pixels (outside an ROI), it is centred on a uniformly drawn
    pixel that is not ignored, so every patch has labelled pixels at its centre. The input
    window adds the context margin ``(patch_size - out_size) / 2`` around it and is mirrored
    where it leaves the image (the U-Net paper's overlap-tile extrapolation), so images smaller
    than the patch work.

    Args:
        images: (C, *S) float32 normalised images, S two or three sizes.
        labels: (*S) int64 class labels, one per image.
        patch_size: network input size (len(S) values).
        out_size: network output size (smaller with valid convolutions); labels and weights are
            centre-cropped to it. None: same as ``patch_size``.
        length: patches per epoch.
        seed: base seed.
        augment: ``augment(image, label, weight, rng) -> (image, label, weight)`` on the full
            patch (weight may be None), sizes unchanged.
        weights: optional (*S) float32 per-pixel loss weights, one per image.
        fg_fraction: share of patches centred on a foreground (label > 0) pixel.
        slice_axis: for a 2D network on volumes (``useg.slices``): the spatial axis of the (C, X, Y, Z)
            images that patches are one voxel thick across; ``patch_size`` and ``out_size`` are then
            in-plane (two sizes). The window is drawn as above with extent 1 on that axis (so a
            foreground patch lies in a slice holding its class) and squeezed before augmentation.

    Items are dicts of tensors: ``image`` (C, *patch) float32, ``label`` (*out) int64 and, when
    weights are given, ``weight`` (*out) float32.
    """

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], patch_size: Sequence[int],
                 out_size: Sequence[int] | None = None, length: int = 250, seed: int = 0,
                 augment: Callable | None = None, weights: list[np.ndarray] | None = None,
                 fg_fraction: float = 0.33, slice_axis: int | None = None):
        if not images or len(images) != len(labels):
            raise ValueError(f"images and labels must be non-empty lists of one length, "
                             f"got {len(images)} and {len(labels)}")
        if weights is not None and len(weights) != len(images):
            raise ValueError(f"weights must hold one array per image, got {len(weights)} for {len(images)}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.out_size = tuple(int(p) for p in (out_size if out_size is not None else patch_size))
        nd = len(self.patch_size)
        if nd not in (2, 3) or len(self.out_size) != nd or min(self.patch_size) < 1 or min(self.out_size) < 1:
            raise ValueError(
                f"patch_size and out_size must be 2 or 3 positive sizes, got {patch_size}, {out_size}")
        if any(o > p for o, p in zip(self.out_size, self.patch_size)):
            raise ValueError(f"out_size {self.out_size} must not exceed patch_size {self.patch_size}")
        self.slice_axis = slice_axis
        # the window drawn from the images: one voxel thick across the slice axis for a 2D network on volumes
        self._window, self._out = self.patch_size, self.out_size
        if slice_axis is not None:
            if nd != 2 or slice_axis not in (0, 1, 2):
                raise ValueError(f"slices need a 2D patch and a slice_axis of 0, 1 or 2, got {patch_size}, "
                                 f"{slice_axis!r}")
            self._window, self._out = (tuple(np.insert(size, slice_axis, 1).tolist())
                                       for size in (self.patch_size, self.out_size))
            nd = 3
        for k, (img, lab) in enumerate(zip(images, labels)):
            if img.ndim != nd + 1 or lab.shape != img.shape[1:]:
                raise ValueError(
                    f"image {k} {img.shape} and label {lab.shape} must be (C, *S) and S with {nd} sizes")
            if weights is not None and weights[k].shape != lab.shape:
                raise ValueError(f"weight {k} {weights[k].shape} must have its label's shape {lab.shape}")
        if not 0 <= fg_fraction <= 1 or length < 1 or seed < 0:
            raise ValueError(f"fg_fraction must lie in [0, 1], length be positive and seed non-negative, "
                             f"got {fg_fraction}, {length}, {seed}")
        self.images, self.labels, self.weights = images, labels, weights
        self.length, self.seed, self.augment, self.fg_fraction = int(length), int(seed), augment, fg_fraction
        self.epoch = 0
        # foreground locations per image and class, found once (searching per item would dominate)
        self._fg = [_class_locations(lab, np.random.default_rng([self.seed, k]))
                    for k, lab in enumerate(labels)]
        # inside the ROI: None for images without ignored pixels (their windows stay uniform)
        self._inside = [_inside_locations(lab, np.random.default_rng([self.seed, k, 1]))
                        for k, lab in enumerate(labels)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        k = int(rng.integers(len(self.images)))
        image, label = self.images[k], self.labels[k]
        shape = label.shape
        fg = self._fg[k]
        if fg and rng.random() < self.fg_fraction:
            locations = fg[int(rng.integers(len(fg)))]
            centre = np.unravel_index(locations[rng.integers(locations.size)], shape)
            out_start = [int(c) - o // 2 for c, o in zip(centre, self._out)]
        elif (inside := self._inside[k]) is not None:  # centred on a labelled pixel inside the ROI
            centre = np.unravel_index(inside[rng.integers(inside.size)], shape)
            out_start = [int(c) - o // 2 for c, o in zip(centre, self._out)]
        else:  # uniform inside the image; an image smaller than the output is centred and mirrored
            out_start = [int(rng.integers(d - o + 1)) if d >= o else (d - o) // 2
                         for d, o in zip(shape, self._out)]
        margin = [(p - o) // 2 for p, o in zip(self._window, self._out)]
        start = [s - m for s, m in zip(out_start, margin)]
        img = _window(image, start, self._window)
        lab = _window(label, start, self._window)
        w = _window(self.weights[k], start, self._window) if self.weights is not None else None
        if self.slice_axis is not None:  # the slice the window lies in, as a 2D patch
            a = self.slice_axis
            img, lab = img[(slice(None),) * (1 + a) + (0,)], lab[(slice(None),) * a + (0,)]
            w = None if w is None else w[(slice(None),) * a + (0,)]
            margin = [m for i, m in enumerate(margin) if i != a]
        if self.augment is not None:
            img, lab, w = self.augment(img, lab, w, rng)
        crop = tuple(slice(m, m + o) for m, o in zip(margin, self.out_size))
        out = {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
               "label": torch.from_numpy(np.ascontiguousarray(lab[crop], dtype=np.int64))}
        if w is not None:
            out["weight"] = torch.from_numpy(np.ascontiguousarray(w[crop], dtype=np.float32))
        return out


def _class_locations(label: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Flat indices of each foreground class present, at most FG_SAMPLES_PER_CLASS each (random subset)."""
    out = []
    for c in np.unique(label):
        if c <= 0:
            continue
        idx = np.flatnonzero(label == c)
        if idx.size > FG_SAMPLES_PER_CLASS:
            idx = np.sort(rng.choice(idx, FG_SAMPLES_PER_CLASS, replace=False))
        out.append(idx)
    return out


def _inside_locations(label: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Flat indices of the pixels that are not ignored (at most ROI_SAMPLES, a random subset);
    None when no pixel is ignored or every pixel is."""
    ignored = label == IGNORE
    if not ignored.any() or ignored.all():
        return None
    idx = np.flatnonzero(~ignored)
    if idx.size > ROI_SAMPLES:
        idx = np.sort(rng.choice(idx, ROI_SAMPLES, replace=False))
    return idx
