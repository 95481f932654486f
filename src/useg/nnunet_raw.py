"""nnU-Net's raw layout, read as it is (Isensee et al. 2021, nnU-Net v2 ``dataset.json``).

``dataset.json`` (``channel_names`` or v1 ``modality``, ``labels``, ``file_ending``), ``imagesTr/``,
``labelsTr/``, ``imagesTs/``, with the conventions of nnU-Net's readers: one ``case_0000.png`` (or
.bmp, .tif) holding all the channels ``channel_names`` names (an RGB image, its NaturalImage2DIO);
a TIFF's spacing from the sidecar ``case.json`` beside it (its Tiff3DIO,
:func:`useg.layouts.sidecar_spacing`); NRRD and MetaImage files through SimpleITK (its SimpleITKIO).
:func:`read_dataset_json` refuses a malformed ``dataset.json`` naming the field
(:func:`dataset_json_problem`); :func:`nnunet_cases` pairs ``imagesTr/`` with ``labelsTr/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsegError
from .files import refuse_special, stem_of, suffix_of
from .io import IMAGE_SUFFIXES, channel_count
from .layouts import group_channels, volume_files


def read_dataset_json(root: Path) -> dict:
    """nnU-Net's dataset.json, v1 or v2, as {channel_names, labels {value: name}, file_ending, layout,
    ignore, num_training}.

    nnU-Net v2's ``"ignore"`` label (``"labels": {"background": 0, "vessel": 1, "ignore": 2}``)
    marks unannotated pixels: it is no class, so it is left out of ``labels`` and returned as
    ``ignore`` (None without one); training then skips its pixels (:data:`useg.roi.IGNORE`).

    Raises:
        UsegError: unreadable JSON, or a field nnU-Net would refuse (:func:`dataset_json_problem`),
            naming the file and the field.
    """
    path = root / "dataset.json"
    refuse_special(path, "a regular dataset.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsegError(f"cannot read {path} ({e}); "
                        "fix the JSON or remove it to use images/ and masks/") from None
    problem = dataset_json_problem(d)
    if problem:
        raise UsegError(f"{path}: {problem}")
    names = d.get("channel_names") or d.get("modality")
    channel_names = [str(names[k]) for k in sorted(names, key=int)]
    labels = d["labels"]
    if _v1_labels(labels):  # v1: {"0": "background", ...}
        values = {int(k): str(v) for k, v in labels.items()}
    else:  # v2: {"background": 0, "tumour": 1}; region entries (lists) are nnU-Net's training choice
        values = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    ignore = next((v for v, name in values.items() if name.lower() == "ignore"), None)
    values.pop(ignore, None)
    return {"channel_names": channel_names, "labels": dict(sorted(values.items())),
            "file_ending": d["file_ending"], "layout": "nnunet", "ignore": ignore,
            "num_training": d.get("numTraining")}


def _v1_labels(labels: dict) -> bool:
    return all(str(k).lstrip("-").isdigit() for k in labels)


def _whole(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def dataset_json_problem(d: object) -> str | None:
    """What nnU-Net's dataset.json ``d`` gets wrong, naming the field and the fix; None when it is usable.

    >>> dataset_json_problem({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
    ...                       "numTraining": 3, "file_ending": ".nii.gz"}) is None
    True
    >>> dataset_json_problem({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1.5},
    ...                       "file_ending": ".nii.gz"})
    "labels: the value of 'liver' must be a whole number (a mask value) or a list of them, not 1.5"
    """
    if not isinstance(d, dict):
        return ("it must hold a JSON object with channel_names, labels and file_ending, "
                f"not a {type(d).__name__}")
    return (_channels_problem(d) or _labels_problem(d.get("labels")) or _ending_problem(d.get("file_ending"))
            or _count_problem(d) or _regions_problem(d))


def _channels_problem(d: dict) -> str | None:
    key = "channel_names" if "channel_names" in d else "modality" if "modality" in d else None
    if key is None:
        return 'channel_names is missing; add e.g. "channel_names": {"0": "CT"}, one entry per image channel'
    names = d[key]
    if not isinstance(names, dict) or not names:
        return f'{key} must map channel numbers to names, e.g. {{"0": "CT"}}, not {names!r}'
    keys = [str(k) for k in names]
    if sorted(keys, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(keys))]:
        numbers = "0" if len(keys) == 1 else f"0 .. {len(keys) - 1}"
        return f"{key} must be numbered {numbers} (one per _000X file), not {keys}"
    return None


def _labels_problem(labels: object) -> str | None:
    if labels is None:
        return 'labels is missing; add e.g. "labels": {"background": 0, "tumour": 1}'
    if not isinstance(labels, dict) or not labels:
        return f'labels must map names to mask values, e.g. {{"background": 0, "tumour": 1}}, not {labels!r}'
    if _v1_labels(labels):
        return None  # v1 maps values to names; the names can be anything
    for name, value in labels.items():
        ok = _whole(value) or (isinstance(value, list) and value and all(_whole(v) for v in value))
        if not ok:
            return (f"labels: the value of {name!r} must be a whole number (a mask value) or a list of "
                    f"them, not {value!r}")
    return None


def _ending_problem(ending: object) -> str | None:
    if ending is None:
        return 'file_ending is missing; add e.g. "file_ending": ".nii.gz", the suffix of every image'
    if not isinstance(ending, str) or suffix_of(Path("x" + ending)) not in IMAGE_SUFFIXES:
        known = ", ".join(sorted(IMAGE_SUFFIXES))
        return f"file_ending {ending!r} is no image format useg reads; use one of {known}"
    return None


def _count_problem(d: dict) -> str | None:
    if "numTraining" in d and not _whole(d["numTraining"], 1):
        return ("numTraining must be the number of training cases (a whole number >= 1), "
                f"not {d['numTraining']!r}")
    return None


def _regions_problem(d: dict) -> str | None:
    """nnU-Net's region training: list labels need ``regions_class_order``, one class per foreground label."""
    labels = d["labels"]
    regions = not _v1_labels(labels) and any(isinstance(v, list) for v in labels.values())
    order = d.get("regions_class_order")
    if order is None:
        return ("labels holds regions (lists) but regions_class_order is missing; add one class per "
                "non-background label") if regions else None
    n = len(labels) - 1  # background is no region
    if not isinstance(order, list) or len(order) != n or not all(_whole(v, 1) for v in order):
        return (f"regions_class_order must list {n} whole numbers >= 1 (one per non-background label), "
                f"not {order!r}")
    return None


def nnunet_cases(root: Path, case_type):
    """Cases of an nnU-Net raw dataset folder (imagesTr + labelsTr).

    Returns:
        (cases, problems, info) with info from :func:`read_dataset_json`.
    """
    info = read_dataset_json(root)
    problems: list[str] = []
    files = [p for p in volume_files(root / "imagesTr") if str(p).endswith(info["file_ending"])]
    if not files:
        return [], [f"{root / 'imagesTr'} holds no {info['file_ending']} images; "
                    "put the training images there"], info
    groups, problems = group_channels(files)
    if info["num_training"] is not None and info["num_training"] != len(groups):
        problems.append(f"{root / 'dataset.json'} says numTraining {info['num_training']} but "
                        f"{root / 'imagesTr'} holds {len(groups)} cases; correct numTraining or add the "
                        "missing cases")
    n = len(info["channel_names"])
    for case, chans in groups.items():
        if len(chans) == n:
            continue
        held = channel_count(chans[0]) if len(chans) == 1 else None  # one RGB file: NaturalImage2DIO
        if held == n:
            continue
        holding = f" holding {held} channel(s)" if held is not None and len(chans) == 1 else ""
        problems.append(f"case {case!r} in {root / 'imagesTr'} has {len(chans)} channel file(s){holding} "
                        f"but dataset.json names {n}; add {case}_0000 .. {case}_{n - 1:04d}"
                        + (" or one file holding all of them" if len(chans) == 1 else ""))
    label_dir = root / "labelsTr"
    labels = {stem_of(p): p for p in volume_files(label_dir)} if label_dir.is_dir() else {}
    cases = []
    for case, chans in groups.items():
        if case not in labels:
            problems.append(f"{chans[0]} has no label {case}{info['file_ending']} in {label_dir}; "
                            "add it or move the case out")
        cases.append(case_type(case, chans[0], labels.get(case), tuple(chans[1:])))
    problems.extend(f"{p} has no image {name}_0000{info['file_ending']} in {root / 'imagesTr'}; "
                    "add it or remove the label"
                    for name, p in labels.items() if name not in groups)
    return cases, problems, info
