from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from useg.dataset import PatchDataset, check_dataset, discover, natural_key, normalize, split_cases
from useg.errors import UsegError


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _data(root, names=("2", "10", "1"), shape=(12, 10)):
    for n in names:
        _write(root / "images" / f"{n}.png", np.full(shape, 100, np.uint8))
        m = np.zeros(shape, np.uint8)
        m[2:6, 3:7] = 255
        _write(root / "masks" / f"{n}.png", m)
    return root


def test_pairing_natural_order_and_suffixes(tmp_path):
    root = _data(tmp_path)
    (root / "masks" / "10.png").rename(root / "masks" / "10_mask.png")
    cases = discover(root)
    assert [c.name for c in cases] == ["1", "2", "10"]
    assert cases[2].mask.name == "10_mask.png"
    assert sorted(["a10", "a2", "a1"], key=natural_key) == ["a1", "a2", "a10"]


def test_check_ok(tmp_path):
    report = check_dataset(_data(tmp_path))
    assert report.ok, report.problems
    assert report.label_map.values == (0, 255) and report.channels == 1


def test_check_lists_every_problem_with_the_file(tmp_path):
    root = _data(tmp_path, names=("a", "b", "c", "d", "e", "f"))
    (root / "masks" / "a.png").unlink()  # image without mask
    _write(root / "masks" / "zz.png", np.zeros((12, 10), np.uint8))  # mask without image
    _write(root / "masks" / "b.png", np.zeros((12, 11), np.uint8))  # size mismatch
    shutil.copy(root / "images" / "c.png", root / "images" / "c.tif")  # duplicate stem
    m = np.array(PILImage.open(root / "masks" / "d.png"))
    m[0, 0] = 7
    _write(root / "masks" / "d.png", m)  # unknown value
    _write(root / "images" / "e.png", np.zeros((12, 10, 3), np.uint8))  # channels differ
    (root / "masks" / "f.png").rename(root / "masks" / "f.jpg")  # JPEG mask
    (root / "images" / "f.png").write_bytes(b"\x89PNG broken")  # unreadable image
    report = check_dataset(root)
    text = "\n".join(report.problems)
    for name in ("a.png", "zz.png", "b.png", "c.tif", "d.png", "e.png", "f.png"):
        assert name in text, (name, text)
    assert "JPEG" in text or "f.jpg" in text
    assert not report.ok


def test_check_empty_and_single_class(tmp_path):
    assert "holds no images" in check_dataset(tmp_path).problems[0]
    assert "not a folder" in check_dataset(tmp_path / "nope").problems[0]
    with pytest.raises(UsegError):
        discover(tmp_path)
    root = tmp_path / "one"
    _write(root / "images" / "a.png", np.zeros((5, 5), np.uint8))
    _write(root / "masks" / "a.png", np.zeros((5, 5), np.uint8))
    assert any("at least two classes" in p for p in check_dataset(root).problems)


def test_normalize_and_split():
    x = np.random.default_rng(0).normal(5, 3, (2, 9, 11)).astype(np.float32)
    z = normalize(x)
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-4)
    assert normalize(np.ones((1, 3, 3))).max() == 0  # constant image: no division by zero
    from useg.dataset import Case

    cases = [Case(str(i), None) for i in range(10)]
    tr, va = split_cases(cases, 0.2, seed=1)
    assert len(va) == 2 and not {c.name for c in tr} & {c.name for c in va}
    assert split_cases(cases, 0.2, seed=1) == (tr, va)
    tr, va = split_cases(cases, val_names=["3"])
    assert [c.name for c in va] == ["3"] and len(tr) == 9
    assert split_cases(cases[:1]) == (cases[:1], [])


@pytest.mark.parametrize("shape,patch,out", [((30, 41), (16, 16), None), ((30, 41), (28, 28), (12, 12)),
                                             ((7, 9), (16, 16), None), ((9, 20, 17), (8, 8, 8), None)])
def test_patch_dataset_shapes_and_reproducibility(shape, patch, out):
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(2, *shape)).astype(np.float32)]
    labels = [(rng.random(shape) > 0.7).astype(np.int64)]
    ds = PatchDataset(images, labels, patch, out_size=out, length=5, seed=3,
                      weights=[np.ones(shape, np.float32)])
    item = ds[1]
    assert item["image"].shape == (2, *patch)
    assert item["label"].shape == tuple(out or patch) and item["weight"].shape == tuple(out or patch)
    assert np.array_equal(ds[1]["image"], item["image"])
    ds.set_epoch(1)
    if all(s >= p for s, p in zip(shape, patch)):  # smaller images are always centred
        assert not np.array_equal(ds[1]["image"], item["image"])


def test_patch_labels_align_with_image_and_foreground_oversampling():
    shape = (40, 50)
    label = np.zeros(shape, np.int64)
    label[30:34, 40:44] = 1
    image = label[None].astype(np.float32) * 10  # the image equals its label
    ds = PatchDataset([image], [label], (12, 12), out_size=(8, 8), length=20, fg_fraction=1.0)
    for i in range(20):
        item = ds[i]
        assert item["label"].sum() > 0
        inner = item["image"][0, 2:10, 2:10].numpy()
        np.testing.assert_array_equal(inner / 10, item["label"].numpy())
