"""nnU-Net's 2d configuration on volumes (useg.slices): planning, prediction over slices, a run end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from useg import slices
from useg.backends import TorchBackend
from useg.check import check_dataset
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.model import UNet
from useg.plan import Plan, data_dims
from useg.planner import batch_size, make_plan, plan_dataset
from useg.predict import predict_labels, predict_proba
from useg.runtime import pick_precision
from useg.spec import Overrides


@pytest.fixture(scope="module")
def iso(tmp_path_factory, write_blob_volumes):
    return write_blob_volumes(tmp_path_factory.mktemp("iso"), shape=(12, 10, 9), zooms=(1.0, 1.0, 1.0), n=3)


@pytest.fixture(scope="module")
def thick_x(tmp_path_factory, write_blob_volumes):
    """Volumes whose X voxels are 3.5x the others: sagittal slices."""
    return write_blob_volumes(tmp_path_factory.mktemp("thick"), shape=(9, 40, 36), zooms=(3.5, 1.0, 1.0),
                              n=3)


@pytest.mark.parametrize("data, axis, plane", [("iso", 2, (12, 10)), ("thick_x", 0, (40, 36))])
def test_the_planner_cuts_across_the_coarsest_axis_with_the_2d_rules(data, axis, plane, request):
    report = check_dataset(request.getfixturevalue(data))
    plan, reasons = plan_dataset(report, Overrides(configuration="2d"), device="cpu")
    deep, _ = plan_dataset(report, Overrides(), device="cpu")
    assert plan.data.slice_axis == axis and plan.model.dims == 2 and data_dims(plan) == 3
    assert plan.data.spacing == deep.data.spacing and len(plan.data.spacing) == 3  # resampling stays 3D
    assert (plan.data.normalization, plan.data.resample) == (deep.data.normalization, deep.data.resample)
    assert len(plan.data.patch_size) == 2 and plan.infer.tile == plan.data.patch_size
    assert all(p >= s for p, s in zip(plan.data.patch_size, plane))  # the slice, rounded up to a valid size
    assert plan.train.batch_size == batch_size("default", 2, plan.data.patch_size, {})
    assert plan.model.width == 32 and plan.model.norm == "batch"  # the 2D preset's, not 3D's 16 + instance
    assert sum("configuration 2d" in r and slices.AXIS_NAMES[axis] in r for r in reasons) == 1


def test_2d_on_images_changes_nothing_and_3d_on_images_is_refused(cells_dir):
    report = check_dataset(cells_dir)
    assert plan_dataset(report, Overrides(configuration="2d"))[0] == plan_dataset(report, Overrides())[0]
    with pytest.raises(UsegError, match="2D images have no 3D configuration"):
        plan_dataset(report, Overrides(configuration="3d"))


def test_a_slice_plan_round_trips_and_old_plans_load(iso, tmp_path):
    plan, _ = plan_dataset(check_dataset(iso), Overrides(configuration="2d"), device="cpu")
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    old = make_plan(LabelMap((0, 1)), 1, [(8, 8, 8)]).to_dict()
    del old["data"]["slice_axis"]  # a plan.json written before slice plans
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Plan.load(tmp_path / "old.json").data.slice_axis is None


def _slice_plan(axis, tile, padding="same", tta=False, classes=(0, 1, 2)):
    plan = make_plan(LabelMap(classes), 2, [(40, 40)], overrides=Overrides(
        model={"width": 4, "depth": 2, "padding": padding}, patch_size=tile,
        infer={"tta": tta, "batch_size": 3}))
    return slices.sliced(plan, axis, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("axis, shape, tile, padding, tta", [
    (2, (13, 11, 5), (16, 16), "same", False),  # a slice fits in one tile: the slices are batched
    (0, (7, 13, 11), (16, 16), "same", True),
    (2, (21, 19, 3), (8, 8), "same", False),  # several tiles a slice: one slice at a time
    (0, (3, 21, 19), (8, 12), "same", True),
    (1, (9, 4, 11), (20, 20), "valid", False),  # overlap-tile
])
def test_a_volume_is_the_stack_of_its_slices_predicted_in_2d(axis, shape, tile, padding, tta, one_thread):
    plan = _slice_plan(axis, tile, padding, tta)
    torch.manual_seed(1)
    net = UNet.from_config(plan.model).eval()
    backend = TorchBackend(net, plan, torch.device("cpu"), pick_precision(torch.device("cpu"), "fp32"))
    volume = np.random.default_rng(2).normal(size=(2, *shape)).astype(np.float32)
    flat = slices.network_plan(plan)
    cut = [np.take(volume, i, axis=1 + axis) for i in range(shape[axis])]
    expected = np.stack([predict_proba(backend, s, flat) for s in cut], axis=1 + axis)
    got = predict_proba(backend, volume, plan)
    assert got.shape == (3, *shape) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, atol=1e-5)
    labels = predict_labels(backend, volume, plan)
    assert labels.shape == shape
    stacked = np.stack([predict_labels(backend, s, flat) for s in cut], axis=axis)
    np.testing.assert_array_equal(labels, stacked)


def test_region_plans_predict_slices_too(one_thread):
    plan = _slice_plan(2, (16, 16))
    plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, num_classes=2),
                               data=dataclasses.replace(plan.data, regions=((1, 2), (2,))))
    net = UNet.from_config(plan.model).eval()
    backend = TorchBackend(net, plan, torch.device("cpu"), pick_precision(torch.device("cpu"), "fp32"))
    volume = np.random.default_rng(0).normal(size=(2, 9, 10, 4)).astype(np.float32)
    probs = predict_proba(backend, volume, plan)
    assert probs.shape == (2, 9, 10, 4) and probs.min() >= 0 and probs.max() <= 1
    assert set(np.unique(predict_labels(backend, volume, plan))) <= {0, 1, 2}


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory, write_blob_volumes):
    from useg.pipeline import train_folder

    root = tmp_path_factory.mktemp("slicerun")
    data = write_blob_volumes(root / "data", shape=(20, 18, 9), zooms=(1.0, 1.0, 2.0), n=4)
    ov = Overrides(configuration="2d", model={"width": 4, "depth": 2}, train={
        "epochs": 1, "iters_per_epoch": 3, "batch_size": 2, "precision": "fp32", "workers": 0})
    train_folder(data, root / "run", overrides=ov, val="v2", exclude="v3", device="cpu", quiet=True)
    return data, root / "run"


def test_a_slice_run_trains_validates_and_writes_volumes(slice_run, tmp_path):
    import nibabel as nib
    from safetensors.torch import load_file

    from useg.predict import Segmenter

    data, run = slice_run
    plan = Plan.load(run / "plan.json")
    assert plan.data.slice_axis == 2 and plan.model.dims == 2  # the 2 mm axis: axial slices
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val_dice"] <= 1  # the whole validation volume, through the slices
    tile = load_file(str(run / "agreement_tile.safetensors"))["tile"]
    assert tuple(tile.shape) == (1, *plan.infer.tile)  # a 2D tile of a slice
    seg = Segmenter.load(run, device="cpu", precision="fp32")
    (out,) = seg.predict_files([data / "images" / "v3.nii.gz"], tmp_path / "pred")
    written, source = nib.load(str(out)), nib.load(str(data / "images" / "v3.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    with pytest.raises(UsegError, match="trained on the 2D slices of 3D volumes"):
        seg.predict(np.zeros((20, 18), np.float32))


def test_an_onnx_export_of_a_slice_run_predicts_volumes_like_torch(slice_run):
    from useg.backends import exported_backend
    from useg.export import export_run
    from useg.predict import Segmenter

    _, run = slice_run
    path = export_run(run)
    volume = np.random.default_rng(0).normal(size=(11, 9, 5)).astype(np.float32)
    torch_probs = Segmenter.load(run, device="cpu", precision="fp32").predict_proba(volume)
    onnx = Segmenter(*exported_backend(path))
    assert onnx.plan.data.slice_axis == 2
    np.testing.assert_allclose(onnx.predict_proba(volume), torch_probs, atol=1e-4)
