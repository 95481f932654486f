"""The masks' output format is decided before the network runs (useg.maskformat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from useg.errors import UsegError
from useg.files import Image
from useg.io import read_mask, write_image
from useg.labels import LabelMap
from useg.maskformat import MASK_FORMATS, mask_suffix
from useg.planner import make_plan
from useg.predict import Segmenter
from useg.spec import Overrides
from useg.volumes import write_nifti


class Threshold:
    """A backend without a network: foreground where the normalised input is positive; counts calls."""

    name, device = "threshold", torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        fg = (batch[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], dim=1)


def _segmenter(values=(0, 255), mode="grey", dims=2, shape=None, palette=None):
    shape = shape or (32,) * dims
    plan = make_plan(LabelMap(values, mode, palette), 1, [shape],
                     overrides=Overrides(model={"width": 4, "depth": 2}, patch_size=(16,) * dims))
    return Segmenter(plan, Threshold())


def _input(tmp_path, dims=2, shape=None):
    """One input file: a bright square on a dark background (PNG in 2D, NIfTI in 3D)."""
    shape = shape or (32,) * dims
    arr = np.zeros(shape, np.uint8)
    arr[(slice(8, 20),) * dims] = 200
    (tmp_path / "in").mkdir(exist_ok=True)
    if dims == 2:
        return write_image(tmp_path / "in" / "a.png", arr[None]), arr > 0
    path = tmp_path / "in" / "a.nii.gz"
    write_nifti(path, arr, Image(arr[None], (1.0,) * 3, format="nifti"))
    return path, arr > 0


@pytest.mark.parametrize("dims,fmt", [(2, "png"), (2, "tif"), (2, "nii.gz"), (3, "tif"), (3, "nii.gz")])
def test_every_mask_format_that_holds_the_masks_round_trips(dims, fmt, tmp_path):
    src, truth = _input(tmp_path, dims)
    seg = _segmenter(dims=dims)
    (out,) = seg.predict_files([src], tmp_path / "out", mask_format=fmt)
    assert out.name == "a" + MASK_FORMATS[fmt]
    values = read_mask(out)[0]
    np.testing.assert_array_equal(values, np.where(truth, 255, 0))


def test_a_volume_into_tiff_is_warned_of_its_lost_orientation(tmp_path, monkeypatch):
    import useg.maskformat

    said = []
    monkeypatch.setattr(useg.maskformat.logger, "warning", lambda msg, *args: said.append(msg % args))
    src, _ = _input(tmp_path, 3)
    (out,) = _segmenter(dims=3).predict_files([src], tmp_path / "out", mask_format="tif")
    assert out.suffix == ".tif" and "not the orientation and origin" in said[0] and "nii.gz" in said[0]


@pytest.mark.parametrize("values,expect", [((0, 70000), (0, 70000)), ((-5, 3), (-5, 3))])
def test_values_png_cannot_hold_go_to_tiff_by_default(values, expect, tmp_path):
    src, truth = _input(tmp_path)
    (out,) = _segmenter(values).predict_files([src], tmp_path / "out")
    assert out.suffix == ".tif"
    np.testing.assert_array_equal(read_mask(out)[0], np.where(truth, expect[1], expect[0]))


@pytest.mark.parametrize("dims,values,mode,fmt,culprit", [
    (2, (0, 70000), "grey", "png", "PNG holds mask values 0 .. 65535, not 0 .. 70000); choose --mask-format "
                                   "tif or nii.gz"),
    (2, (-1, 1), "grey", "png", "PNG holds mask values 0 .. 65535, not -1 .. 1"),
    (3, (0, 1), "grey", "png", "PNG holds 2D masks, not 3D ones); choose --mask-format tif or nii.gz"),
    (2, (0, 0xFF0000), "rgb", "nii.gz", "NIfTI holds no rgb masks (it holds grey, palette)); choose "
                                        "--mask-format png or tif"),
    (2, (0, 2**31), "grey", "nii.gz", "NIfTI holds mask values -2147483648 .. 2147483647"),
])
def test_a_mask_format_that_cannot_hold_the_masks_is_refused_before_predicting(dims, values, mode, fmt,
                                                                               culprit, tmp_path):
    src, _ = _input(tmp_path, dims)
    seg = _segmenter(values, mode, dims)
    with pytest.raises(UsegError, match="--mask-format") as e:
        seg.predict_files([src], tmp_path / "out", mask_format=fmt)
    assert culprit in str(e.value) and str(src) in str(e.value)
    assert seg.backend.calls == 0 and not (tmp_path / "out").exists()


def test_mask_format_is_refused_with_probabilities(tmp_path):
    src, _ = _input(tmp_path)
    seg = _segmenter()
    with pytest.raises(UsegError, match="--mask-format .* --probabilities"):
        seg.predict_files([src], tmp_path / "out", mask_format="tif", probabilities="uint8")
    assert seg.backend.calls == 0


def test_no_format_holding_the_values_is_refused(tmp_path):
    plan = _segmenter((0, 2**33)).plan
    with pytest.raises(UsegError, match="no mask format holds the masks of .*a.png"):
        mask_suffix(".png", plan, None, False, tmp_path / "a.png")


def test_more_objects_than_png_holds_need_tiff(tmp_path):
    """300 x 300 isolated dots are 90,000 objects: PNG is refused with the fix, TIFF holds uint32 ids."""
    arr = np.zeros((600, 600), np.uint8)
    arr[::2, ::2] = 255
    (tmp_path / "in").mkdir()
    src = write_image(tmp_path / "in" / "dots.png", arr[None])
    seg = _segmenter(shape=arr.shape)
    with pytest.raises(UsegError, match=r"dots.png has 90000 objects, more than PNG holds \(65535\); give "
                                        r"--mask-format tif"):
        seg.predict_files([src], tmp_path / "png", instances=True)
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())
    (out,) = seg.predict_files([src], tmp_path / "tif", instances=True, mask_format="tif")
    ids = read_mask(out)[0]
    assert ids.dtype == np.uint32 and ids.max() == 90000 and len(np.unique(ids)) == 90001
