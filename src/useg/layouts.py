"""Data-folder layouts beyond ``images/`` + ``masks/``: multi-channel cases, case folders, folder names.

* Channels as separate files, nnU-Net's naming: ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz`` ...
  (in ``images/`` or ``imagesTr/``), the mask named ``<case>.nii.gz``; a TIFF's spacing from the
  sidecar ``case.json`` ``{"spacing": [z, y, x]}`` beside it (nnU-Net's Tiff3DIO).
* nnU-Net's raw layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``) is :mod:`useg.nnunet_raw`'s.
* One folder per case holding named channel files and a label file (BraTS-style):
  ``case/Flair.nii.gz``, ``case/T1c.nii.gz``, ``case/seg.nii.gz``; the channels and the label are
  named by file-name prefix (``--channels Flair,T1c --label seg``).
* The common names of a plain layout's folders (:func:`plain_folders`) and the mask folder an image
  pairs with (:func:`paired_mask_folders`).

Each layout yields :class:`useg.dataset.Case` objects whose ``extra`` holds the channel files after
the first; :func:`read_case_image` stacks them into one :class:`useg.files.Image`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsegError
from .files import Image, stem_of, suffix_of
from .io import IMAGE_SUFFIXES, read_image

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: case_0000


def split_channel(stem: str) -> tuple[str, int] | None:
    """``"case_0001"`` -> ``("case", 1)``; None for a stem without a channel number."""
    m = CHANNEL_RE.match(stem)
    return (m["case"], int(m["channel"])) if m else None


def group_channels(files: Sequence[Path]) -> tuple[dict[str, tuple[Path, ...]], list[str]]:
    """Group ``<case>_XXXX`` files into cases, channels in order; problems for gaps and uneven counts.

    Returns:
        ({case name: channel files}, problems). Files without a channel number are their own case.
    """
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        parsed = split_channel(stem_of(p))
        case, ch = parsed if parsed else (stem_of(p), 0)
        groups.setdefault(case, {})[ch] = p
    problems, out = [], {}
    counts = [len(g) for g in groups.values()]
    common = max(set(counts), key=counts.count) if counts else 0
    for case, g in groups.items():
        if sorted(g) != list(range(len(g))):
            problems.append(f"{next(iter(g.values())).parent} has channels {sorted(g)} of case {case!r}; "
                            f"number them {case}_0000, {case}_0001, ... without gaps")
        elif len(g) != common:
            problems.append(f"case {case!r} has {len(g)} channel file(s) but most cases have {common}; "
                            "give every case the same channels")
        out[case] = tuple(g[k] for k in sorted(g))
    return out, problems


def read_case_image(files: Sequence[Path]) -> Image:
    """Read a case's channel files and stack them: (sum of channels, *S), geometry of the first.

    A TIFF named ``<case>_0000.tif`` takes its spacing from ``<case>.json`` beside it when there is
    one (nnU-Net's Tiff3DIO sidecar, ``{"spacing": [z, y, x]}``, in the array's axis order).

    Raises:
        UsegError: a channel whose shape (or NIfTI orientation) differs from the first one, or a
            sidecar that is not valid.
    """
    images = [read_image(p) for p in files]
    images[0] = sidecar_spacing(images[0], Path(files[0]))
    first = images[0]
    for im in images[1:]:
        if im.spatial_shape != first.spatial_shape:
            raise UsegError(f"{im.path} is {'x'.join(map(str, im.spatial_shape))} but {first.path} is "
                            f"{'x'.join(map(str, first.spatial_shape))}; "
                            "the channels of a case must be aligned")
        if (im.affine is not None and first.affine is not None
                and not np.allclose(im.affine, first.affine, atol=1e-3)):
            raise UsegError(f"{im.path} has another orientation or origin than {first.path}; "
                            "resample the channels of a case onto one grid")
    if len(images) == 1:
        return first
    arr = np.concatenate([im.array for im in images], axis=0)
    return Image(arr, first.spacing, first.affine, first.path, first.format, first.meta)


def sidecar_spacing(image: Image, path: Path) -> Image:
    """``image`` with the spacing of nnU-Net's Tiff3DIO sidecar ``<case>.json`` of ``<case>_XXXX.tif``.

    The sidecar wins over the TIFF's own resolution, as in nnU-Net. nnU-Net's 2D reader ignores
    sidecars, so a 2D image keeps its spacing unless the sidecar gives exactly two values.

    Raises:
        UsegError: unreadable JSON, no "spacing" list of positive numbers, or (3D) a wrong length.
    """
    parsed = split_channel(stem_of(path))
    if suffix_of(path) not in (".tif", ".tiff") or parsed is None:
        return image
    side = path.with_name(parsed[0] + ".json")
    if not side.is_file():
        return image
    try:
        spacing = tuple(float(v) for v in json.loads(side.read_text(encoding="utf-8"))["spacing"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsegError(f"cannot read the spacing of {path} from {side} ({type(e).__name__}: {e}); "
                        'write it as {"spacing": [z, y, x]}') from None
    if len(spacing) != image.dims or not all(s > 0 for s in spacing):
        if image.dims == 2:
            return image
        raise UsegError(f"{side} gives spacing {list(spacing)} for the {image.dims}D image {path}; "
                        f"give {image.dims} positive values in the array's axis order [z, y, x]")
    drop = ("resolution", "resolution_unit", "imagej_spacing", "imagej_unit", "dpi")
    meta = {k: v for k, v in image.meta.items() if k not in drop}  # written back from the spacing
    meta.update(spacing_source=str(side), spacing_unit="mm")
    return Image(image.array, spacing, image.affine, image.path, image.format, meta)


def volume_files(folder: Path) -> list[Path]:
    """The visible image files of a folder (any suffix :mod:`useg.io` reads), sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and suffix_of(p) in IMAGE_SUFFIXES)


# names a data folder's image and mask folders go by (any case); images/ and masks/ win where both are
IMAGE_FOLDERS = ("images", "image", "imgs", "img")
MASK_FOLDERS = ("masks", "mask", "labels", "label", "annotations", "segmentations", "gt", "groundtruth",
                "ground_truth")
SPLIT_FOLDERS = ("train", "training", "val", "valid", "validation", "test", "testing")  # one data folder each
NNUNET_PAIRS = {"imagestr": "labelsTr", "imagests": "labelsTs"}  # nnU-Net's image folder -> its label folder


@dataclass(frozen=True)
class PlainFolders:
    """Where a plain layout keeps its images and masks, under whatever common names they have."""

    images: Path | None  # the image folder; the data folder itself for images at its top level
    masks: Path | None  # the mask folder, None without one
    problem: str | None = None  # names that leave it open (two image folders), or data one level down


def _named(root: Path, names: Sequence[str], kind: str) -> tuple[Path | None, str | None]:
    """The one subfolder of ``root`` named one of ``names`` (any case); the first name wins outright."""
    if (root / names[0]).is_dir():
        return root / names[0], None
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in names)
    if len(found) > 1:
        return None, (f"{root} holds {len(found)} {kind} folders ({', '.join(p.name + '/' for p in found)}); "
                      f"keep one of them and name it {names[0]}/")
    return (found[0] if found else None), None


def plain_folders(root: Path) -> PlainFolders:
    """The image and mask folders of a data folder: ``images/`` + ``masks/``, their singular and
    capitalised forms and common synonyms (``imgs/``, ``labels/``, ``gt/`` ...), or images at the top
    level beside a mask folder. A folder holding only split folders (``train/images`` ...) gets a
    problem naming the one to give.
    """
    if not root.is_dir():
        return PlainFolders(None, None)
    images, problem = _named(root, IMAGE_FOLDERS, "image")
    masks, mask_problem = _named(root, MASK_FOLDERS, "mask")
    if problem or mask_problem:
        return PlainFolders(None, None, problem or mask_problem)
    if images is None and masks is not None and volume_files(root):
        images = root  # images at the top level, their masks in a folder beside them
    if images is None and masks is None:
        return PlainFolders(None, None, _split_problem(root))
    return PlainFolders(images, masks)


def _split_problem(root: Path) -> str | None:
    """"DATA holds no images, but train/ holds images/ and masks/: give DATA/train" (or None)."""
    if volume_files(root):
        return None
    splits = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDERS)
    inner = [p for p in splits if (f := plain_folders(p)).images is not None and f.masks is not None]
    if not inner:
        return None
    given = " or ".join(str(p) for p in inner)
    return (f"{root} holds no images itself, but {', '.join(p.name + '/' for p in inner)} "
            f"{'holds' if len(inner) == 1 else 'each hold'} images and masks; give {given} as the data "
            "folder")


def paired_mask_folders(image: Path) -> list[Path]:
    """The mask folders an image file's data folder pairs with it (``images/x.png`` -> ``masks/``)."""
    folder = image.parent
    found = []
    if folder.name.lower() in NNUNET_PAIRS:
        found.append(folder.parent / NNUNET_PAIRS[folder.name.lower()])
    for root in (folder.parent, folder):
        f = plain_folders(root) if root.is_dir() else PlainFolders(None, None)
        if f.images is not None and f.masks is not None and f.images.resolve() == folder.resolve():
            found.append(f.masks)
    return found


def is_case_folders(root: Path) -> bool:
    """A folder of per-case folders, each with image volumes and no images/ of its own."""
    if not root.is_dir() or plain_folders(root).images is not None:
        return False
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subdirs) and all(volume_files(d) for d in subdirs[:4])


def _pick(files: list[Path], prefix: str) -> list[Path]:
    return [p for p in files if stem_of(p).lower().startswith(prefix.lower())]


def case_folder_files(folder: Path, channel_names: Sequence[str]) -> list[Path] | None:
    """The channel files of one case folder, in ``channel_names`` order; None when it is not one."""
    files = volume_files(folder) if channel_names else []
    picked = [_pick(files, n) for n in channel_names]
    return [p[0] for p in picked] if files and all(len(p) == 1 for p in picked) else None


def folder_cases(root: Path, channel_names: Sequence[str] | None, label_name: str | None, case_type):
    """Cases of a folder of case folders, channels and label picked by file-name prefix.

    Returns:
        (cases, problems, info); info["channel_names"] are the prefixes.
    """
    info = {"channel_names": list(channel_names or []), "label_name": label_name, "layout": "folders"}
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not channel_names:
        example = ", ".join(stem_of(p) for p in volume_files(subdirs[0])[:4]) if subdirs else ""
        return [], [f"{root} holds one folder per case; name the channel files with --channels "
                    f"(file-name prefixes, e.g. from {example}) and the mask with --label"], info
    lower = [n.lower() for n in channel_names]  # prefixes match case-insensitively (_pick)
    twice = sorted({n for n in lower if lower.count(n) > 1})
    shared = label_name is not None and label_name.lower() in lower
    if shared or twice:
        what = f"--label {label_name!r} is also one of --channels" if shared else \
            f"--channels names {twice[0]!r} twice"
        return [], [f"{what} ({root}); a file is one channel or the label, never both: "
                    "name each file once"], info
    cases, problems = [], []
    for d in subdirs:
        files = volume_files(d)
        chans = []
        for prefix in channel_names:
            found = _pick(files, prefix)
            if len(found) != 1:
                problems.append(f"{d} has {len(found)} files starting with {prefix!r}; "
                                "keep exactly one per case")
            chans.extend(found[:1])
        masks = _pick(files, label_name) if label_name else []
        if label_name and len(masks) != 1:
            problems.append(f"{d} has {len(masks)} files starting with {label_name!r}; "
                            "keep exactly one label file per case")
        both = sorted({p.name for p in chans if chans.count(p) > 1 or p in masks[:1]})
        if both:
            problems.append(f"{d / both[0]} matches two of --channels/--label ({', '.join(channel_names)}; "
                            f"{label_name}); a file is one channel or the label, never both: "
                            "use longer prefixes")
            continue
        if len(chans) == len(channel_names):
            cases.append(case_type(d.name, chans[0], masks[0] if len(masks) == 1 else None, tuple(chans[1:])))
    return cases, problems, info
