"""Tiny fixtures shared by the tests: generated, never read from ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory, monkeypatch):
    """Backend timings and on-the-fly exports (useg.autotune) go to a temporary cache, not ~/.cache."""
    monkeypatch.setenv("USEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "useg-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensor ops on one thread.

    On a shared, loaded CPU, OpenMP threads spin-waiting on each other make tiny convs ~100x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _write_squares(root):
    """Six 24x24 PNGs with 0/255 square masks in ``root/images`` and ``root/masks``: the smallest
    2D data folder that trains in a second."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    for i in range(6):
        mask = np.zeros((24, 24), np.uint8)
        mask[3 + i:13 + i, 5:15] = 255
        image = (rng.normal(80, 10, mask.shape) + (mask > 0) * 80).clip(0, 255).astype(np.uint8)
        for sub, arr in (("images", image), ("masks", mask)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(arr).save(root / sub / f"c{i}.png")
    return root


@pytest.fixture(scope="session")
def write_squares():
    """:func:`_write_squares`, for module- and session-scoped fixtures that build their own data."""
    return _write_squares


@pytest.fixture
def untrained_run(tmp_path):
    """A tiny untrained 2-D run of 0/255 masks (width 4, depth 2): its random weights still make
    input-dependent masks."""
    from useg.checkpoint import save_model
    from useg.labels import LabelMap
    from useg.model import UNet
    from useg.planner import make_plan
    from useg.spec import Overrides

    folder = tmp_path / "run"
    folder.mkdir()
    plan = make_plan(LabelMap((0, 255), "grey"), 1, [(64, 64)],
                     overrides=Overrides(model={"width": 4, "depth": 2}))
    plan.save(folder / "plan.json")
    torch.manual_seed(0)
    save_model(UNet.from_config(plan.model), folder / "model.safetensors")
    return folder


@pytest.fixture(scope="session")
def cells_dir(tmp_path_factory):
    """A tiny synthetic cells dataset (images/, masks/ 0/255, instances/) of 64x64 images."""
    from useg.synthetic import write_cells_dataset

    return write_cells_dataset(tmp_path_factory.mktemp("cells"), n_images=6, shape=(64, 64), seed=3)


def _write_blob_volumes(root, shape=(20, 18, 9), zooms=(1.0, 1.0, 2.0), n=4):
    """``n`` synthetic blob volumes as NIfTI (images/ and masks/ 0/1, RAS affine of ``zooms``): the
    smallest 3D data folder that trains in a second."""
    import nibabel as nib

    from useg.synthetic import make_blobs_3d

    rng = np.random.default_rng(0)
    affine = np.diag([*zooms, 1.0])
    for k in range(n):
        image, inst = make_blobs_3d(shape, n_blobs=2, rng=rng)
        for folder, arr in (("images", image), ("masks", (inst > 0).astype(np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, affine), str(root / folder / f"v{k}.nii.gz"))
    return root


@pytest.fixture(scope="session")
def write_blob_volumes():
    """:func:`_write_blob_volumes`: NIfTI blob volumes of a given shape and voxel size."""
    return _write_blob_volumes
