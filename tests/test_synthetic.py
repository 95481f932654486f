from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from useg.synthetic import make_blobs_3d, make_cells, semantic_from_instances, write_cells_dataset


@pytest.mark.parametrize("shape", [(64, 64), (47, 81)])
def test_make_cells_types_and_labels(shape):
    image, inst = make_cells(shape, rng=np.random.default_rng(1))
    assert image.shape == shape and image.dtype == np.uint8
    assert inst.shape == shape and inst.dtype == np.int32
    ids = np.unique(inst)
    assert ids[0] == 0 and len(ids) > 2  # background and several cells
    np.testing.assert_array_equal(ids, np.arange(ids.max() + 1))  # cells numbered 1..N
    assert 0.2 < (inst > 0).mean() < 0.9


def test_make_cells_each_cell_is_one_piece():
    _, inst = make_cells((96, 96), rng=np.random.default_rng(2))
    for i in range(1, inst.max() + 1):
        assert ndi.label(inst == i)[1] == 1, f"cell {i} is split"


def test_make_cells_reproducible_from_the_generator():
    a = make_cells((48, 48), rng=np.random.default_rng(5))
    b = make_cells((48, 48), rng=np.random.default_rng(5))
    c = make_cells((48, 48), rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_make_cells_touch_and_membranes_are_dark():
    image, inst = make_cells((128, 128), n_cells=20, rng=np.random.default_rng(3))
    sem = semantic_from_instances(inst)
    gaps = (inst > 0) & (sem == 0)
    assert gaps.sum() > 50  # many cells touch their neighbours
    interior = ndi.binary_erosion(inst > 0, iterations=3)
    assert image[gaps].mean() < image[interior].mean() - 30


def test_make_cells_not_solved_by_a_threshold():
    image, inst = make_cells((128, 128), rng=np.random.default_rng(4))
    sem = semantic_from_instances(inst) > 0
    best = max(2 * (sem & (image > t)).sum() / (sem.sum() + (image > t).sum()) for t in range(0, 256, 4))
    assert 0.5 < best < 0.95


def test_make_cells_validates_arguments():
    with pytest.raises(ValueError, match="Generator"):
        make_cells((32, 32), rng=0)
    with pytest.raises(ValueError, match="shape"):
        make_cells((8, 32), rng=np.random.default_rng(0))


def test_semantic_gap_between_two_touching_squares():
    inst = np.zeros((6, 9), np.int32)
    inst[1:5, 1:4] = 1
    inst[1:5, 4:8] = 2
    sem = semantic_from_instances(inst)
    assert sem.dtype == np.uint8
    np.testing.assert_array_equal(sem[1:5, 4], 0)  # one column of gap, on one side only
    np.testing.assert_array_equal(sem[1:5, 1:4], 1)
    np.testing.assert_array_equal(sem[1:5, 5:8], 1)
    assert sem.sum() == (inst > 0).sum() - 4


def test_semantic_keeps_a_lone_instance_whole():
    inst = np.zeros((7, 7), np.int32)
    inst[2:5, 2:5] = 3
    np.testing.assert_array_equal(semantic_from_instances(inst), (inst > 0).astype(np.uint8))


@pytest.mark.parametrize("dims", [2, 3])
def test_semantic_separates_instances_under_full_connectivity(dims):
    rng = np.random.default_rng(dims)
    shape = (9, 11, 13)[-dims:]
    # a random tessellation: touching instances in every direction, diagonals included
    inst = ndi.zoom(rng.integers(1, 6, [3] * dims), [s / 3 for s in shape], order=0)
    inst = inst[tuple(slice(s) for s in shape)]
    inst = inst.astype(np.int32)
    sem = semantic_from_instances(inst)
    comps, n = ndi.label(sem, structure=np.ones([3] * dims))
    for c in range(1, n + 1):
        assert len(np.unique(inst[comps == c])) == 1
    assert sem.sum() > 0.3 * sem.size  # the gap is thin, not everything


def test_semantic_rejects_float_input():
    with pytest.raises(ValueError):
        semantic_from_instances(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize("shape", [(16, 24, 24), (9, 13, 17)])
def test_make_blobs_3d(shape):
    image, inst = make_blobs_3d(shape, n_blobs=3, rng=np.random.default_rng(0))
    assert image.shape == shape and image.dtype == np.float32
    assert inst.shape == shape and inst.dtype == np.int32
    assert set(np.unique(inst)) <= {0, 1, 2, 3} and inst.max() >= 1
    assert image[inst > 0].mean() > image[inst == 0].mean() + 0.3
    again = make_blobs_3d(shape, n_blobs=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(image, again[0])


def _read(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def test_write_cells_dataset_files_and_consistency(tmp_path):
    root = write_cells_dataset(tmp_path / "d", n_images=3, shape=(40, 56), seed=7)
    assert root == tmp_path / "d"
    for name in ("cell_000.png", "cell_001.png", "cell_002.png"):
        mode, image = _read(root / "images" / name)
        assert mode == "L" and image.shape == (40, 56)
        _, mask = _read(root / "masks" / name)
        _, inst = _read(root / "instances" / name)
        assert set(np.unique(mask)) <= {0, 255}
        assert inst.dtype == np.uint16 or inst.dtype.itemsize >= 2
        np.testing.assert_array_equal(mask // 255, semantic_from_instances(inst.astype(np.int32)))
    assert not list(root.rglob("*.tmp"))


def test_write_cells_dataset_deterministic_and_idempotent(tmp_path):
    a = write_cells_dataset(tmp_path / "a", n_images=3, shape=(32, 32), seed=1)
    b = write_cells_dataset(tmp_path / "b", n_images=2, shape=(32, 32), seed=1)
    for sub in ("images", "masks", "instances"):
        np.testing.assert_array_equal(_read(a / sub / "cell_001.png")[1], _read(b / sub / "cell_001.png")[1])
    other = write_cells_dataset(tmp_path / "c", n_images=1, shape=(32, 32), seed=2)
    assert not np.array_equal(_read(a / "images" / "cell_000.png")[1],
                              _read(other / "images" / "cell_000.png")[1])
    # re-running with fewer images leaves exactly the new set
    (a / "images" / "notes.txt").write_text("kept")
    write_cells_dataset(a, n_images=2, shape=(32, 32), seed=1)
    for sub in ("images", "masks", "instances"):
        assert sorted(p.name for p in (a / sub).glob("cell_*.png")) == ["cell_000.png", "cell_001.png"]
    assert (a / "images" / "notes.txt").exists()
    np.testing.assert_array_equal(_read(a / "masks" / "cell_001.png")[1],
                                  _read(b / "masks" / "cell_001.png")[1])


def test_write_cells_dataset_rejects_zero_images(tmp_path):
    with pytest.raises(ValueError):
        write_cells_dataset(tmp_path, n_images=0)
