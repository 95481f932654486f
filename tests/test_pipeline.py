"""From a data folder to a run: names, checks, splits."""

from __future__ import annotations

import json

import pytest

from useg.dataset import Case
from useg.errors import UsegError
from useg.pipeline import parse_names, split_cases, train_folder
from useg.spec import Overrides


def test_parse_names():
    assert parse_names("25-27,a") == ["25", "26", "27", "a"]
    assert parse_names(None) == []


def test_split():
    cases = [Case(str(i), None) for i in range(10)]
    tr, va = split_cases(cases, 0.2, seed=1)
    assert len(va) == 2 and len(tr) == 8 and not {c.name for c in tr} & {c.name for c in va}
    assert split_cases(cases, 0.2, seed=1) == (tr, va)
    assert split_cases(cases, 0.2, seed=2) != (tr, va)
    assert [len(s) for s in split_cases(cases[:2], 0.01)] == [1, 1]
    assert [len(s) for s in split_cases(cases[:3], 0.9)] == [1, 2]
    tr, va = split_cases(cases, val_names=["3"])
    assert [c.name for c in va] == ["3"] and len(tr) == 9
    assert split_cases(cases[:1]) == (cases[:1], [])
    with pytest.raises(UsegError, match="not in the data"):
        split_cases(cases, val_names=["nope"])
    with pytest.raises(ValueError):
        split_cases(cases, 1.0)


def test_train_folder_refuses_bad_data_and_existing_runs(tmp_path, cells_dir):
    with pytest.raises(UsegError):
        train_folder(tmp_path / "nothing", tmp_path / "run", quiet=True)
    kw = dict(quiet=True, overrides=Overrides(model={"width": 4, "depth": 2}, patch_size=(32, 32), train={
        "epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32"}))
    train_folder(cells_dir, tmp_path / "run", val="cell_000", exclude="cell_005", **kw)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["val"] == ["cell_000"]
    assert "cell_005" not in split["train"] and len(split["train"]) == 4
    with pytest.raises(UsegError, match="already holds a run"):
        train_folder(cells_dir, tmp_path / "run", **kw)
    with pytest.raises(UsegError, match="not in"):
        train_folder(cells_dir, tmp_path / "run2", exclude="nope", **kw)


def test_3d_nifti_round_trip_learns_the_blobs(tmp_path):
    """Synthetic blob volumes as NIfTI (anisotropic, non-identity affine): train, predict, write back."""
    import nibabel as nib
    import numpy as np

    from useg.dataset import discover
    from useg.predict import Segmenter
    from useg.synthetic import make_blobs_3d

    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -0.8, 0, 20], [0.8, 0.0, 0, -7], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    for k in range(4):
        image, inst = make_blobs_3d((24, 32, 32), rng=rng)
        for folder, arr in (("images", image), ("masks", (inst > 0).astype(np.uint8))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "data" / folder / f"b{k}.nii.gz"))
    run = tmp_path / "run"
    result = train_folder(tmp_path / "data", run, quiet=True, exclude="b3", val="b2", device="cpu",
                          overrides=Overrides(model={"width": 8, "depth": 2}, patch_size=(24, 32, 32),
                                              train={"epochs": 20, "iters_per_epoch": 6, "batch_size": 2,
                                                     "lr": 1e-2, "precision": "fp32", "workers": 0}))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["model"]["dims"] == 3 and plan["data"]["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    case = next(c for c in discover(tmp_path / "data") if c.name == "b3")
    (out,) = Segmenter.load(run, device="cpu", precision="fp32").predict_files([case], tmp_path / "pred")
    written, truth = nib.load(str(out)), nib.load(str(case.mask))
    np.testing.assert_allclose(written.affine, affine)  # same geometry and orientation as the input
    assert written.shape == truth.shape and nib.aff2axcodes(written.affine) == nib.aff2axcodes(truth.affine)
    pred, true = np.asarray(written.dataobj) > 0, np.asarray(truth.dataobj) > 0
    dice = 2 * (pred & true).sum() / (pred.sum() + true.sum())
    assert dice > 0.9, (dice, result.best_dice)


def test_an_overwrite_replaces_a_multi_configuration_run_whole(tmp_path, cells_dir):
    """A multi-configuration run has no plan.json of its own (RUN/2d, RUN/3d, configs.json): an
    --overwrite must still replace it whole, or its old configuration.json would send predict to
    the old sub-runs."""
    from useg.runlog import CHOICE_FILE, CONFIGS_FILE, is_multi_configuration, run_state

    run = tmp_path / "run"
    (run / "2d").mkdir(parents=True)
    (run / "2d" / "plan.json").write_text("{}")
    (run / CONFIGS_FILE).write_text(json.dumps({"configurations": ["2d", "3d"]}))
    (run / CHOICE_FILE).write_text(json.dumps({"chosen": ["2d"]}))
    assert is_multi_configuration(run)
    tiny = Overrides(model={"width": 4, "depth": 2}, patch_size=(32, 32),
                     train={"epochs": 1, "iters_per_epoch": 1, "batch_size": 2, "precision": "fp32"})
    train_folder(cells_dir, run, quiet=True, overwrite=True, overrides=tiny)
    assert sorted(p.name for p in run.iterdir() if p.name in {"2d", CONFIGS_FILE, CHOICE_FILE}) == []
    assert (run / "plan.json").is_file() and run_state(run).kind == "complete"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the old one removed
