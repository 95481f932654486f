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


def _write_png(path, arr):
    """``arr`` as a PNG at ``path``, its folders made."""
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _png_pairs(root, names=("2", "10", "1"), shape=(12, 10)):
    """``root/images/NAME.png`` (constant 100) and ``root/masks/NAME.png`` (a 0/255 square) per name."""
    for n in names:
        _write_png(root / "images" / f"{n}.png", np.full(shape, 100, np.uint8))
        m = np.zeros(shape, np.uint8)
        m[2:6, 3:7] = 255
        _write_png(root / "masks" / f"{n}.png", m)
    return root


@pytest.fixture(scope="session")
def write_png():
    """:func:`_write_png`: one PNG written, its folders made."""
    return _write_png


@pytest.fixture(scope="session")
def png_pairs():
    """:func:`_png_pairs`: a plain images/ + masks/ folder of tiny PNGs, names and shape chosen."""
    return _png_pairs


def _save_nifti(path, arr):
    """``arr`` as a NIfTI with the identity affine at ``path``, its folders made."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _volume_case(rng, shape=(9, 10, 7)):
    """(image float32 noise, labels uint8 with classes 1 and 2 nested) of one tiny volume."""
    img = rng.normal(size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:7, 2:5] = 1
    lab[3:4, 4:5, 3:4] = 2
    return img, lab


@pytest.fixture(scope="session")
def save_nifti():
    """:func:`_save_nifti`: one NIfTI written, its folders made."""
    return _save_nifti


@pytest.fixture(scope="session")
def volume_case():
    """:func:`_volume_case`: a tiny volume and its two-class labels from a generator."""
    return _volume_case


def _write_dataset_json(root, channels, file_ending, labels=None, cases=3):
    """An nnU-Net ``dataset.json`` in ``root`` (made): channel names in order, labels, the file ending."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": labels or {"background": 0, "vessel": 1}, "numTraining": cases,
        "file_ending": file_ending}))


@pytest.fixture(scope="session")
def write_dataset_json():
    """:func:`_write_dataset_json`: an nnU-Net raw folder's dataset.json."""
    return _write_dataset_json


def _traced_peak(run):
    """The peak of Python-traced memory (bytes) while ``run()`` runs: numpy buffers included."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="session")
def traced_peak():
    """:func:`_traced_peak`: the peak traced memory of a call."""
    return _traced_peak
