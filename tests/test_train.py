from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from useg.checkpoint import load_checkpoint, save_checkpoint
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.planner import make_plan
from useg.predict import Segmenter
from useg.preprocess import normalize
from useg.spec import Overrides
from useg.train import fit


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "last.safetensors", model, opt, {"epoch": 3, "best_dice": 0.5})
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state = load_checkpoint(tmp_path / "last.safetensors", model2, opt2)
    assert state == {"epoch": 3, "best_dice": 0.5}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 0.1
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left
    (tmp_path / "last.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsegError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "last.safetensors", model2, opt2)


def _tiny(dims: int = 2):
    rng = np.random.default_rng(0)
    shape = (32, 32) if dims == 2 else (16, 16, 16)
    images, labels = [], []
    for _ in range(3):
        lab = np.zeros(shape, np.int64)
        sl = tuple(slice(int(rng.integers(2, 6)), int(rng.integers(10, 14))) for _ in shape)
        lab[sl] = 1
        img = (lab * 2.0 + rng.normal(0, 0.3, shape)).astype(np.float32)[None]
        images.append(normalize(img))  # fit takes normalised arrays, as train_folder gives it
        labels.append(lab)
    return images, labels


@pytest.mark.parametrize("dims,padding", [(2, "same"), (3, "same"), (2, "valid")])
def test_fit_learns_a_square_and_writes_the_run(tmp_path, dims, padding):
    images, labels = _tiny(dims)
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [i.shape[1:] for i in images], overrides=Overrides(
        model={"width": 4, "depth": 2, "padding": padding},
        train={"epochs": 10, "iters_per_epoch": 8, "batch_size": 4, "lr": 1e-2, "precision": "fp32"}))
    result = fit(plan, (images[:2], labels[:2]), (images[2:], labels[2:]), tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    for name in ("plan.json", "model.safetensors", "last.safetensors", "metrics.jsonl", "curves.png",
                 "summary.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 10 and result.steps == 80
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.best_dice > 0.8
    pred = Segmenter.load(run, precision="fp32").predict(images[2])
    inter = ((pred == 1) & (labels[2] == 1)).sum()
    dice = 2 * inter / ((pred == 1).sum() + (labels[2] == 1).sum())
    assert dice == pytest.approx(result.best_dice, abs=1e-6)


def test_resume_continues_from_the_checkpoint(tmp_path):
    images, labels = _tiny()
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)], overrides=Overrides(
        model={"width": 4, "depth": 2},
        train={"epochs": 2, "iters_per_epoch": 3, "batch_size": 2, "precision": "fp32"}))
    run = tmp_path / "run"
    fit(plan, (images, labels), ([], []), run, quiet=True)
    import dataclasses

    longer = dataclasses.replace(plan, train=dataclasses.replace(plan.train, epochs=4))
    # resume reads the model/optimizer/loop state but keeps going with the given plan
    result = fit(longer, (images, labels), ([], []), run, resume=True, quiet=True)
    assert result.epochs == 4 and result.steps == 12
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert math.isnan(result.best_dice)


def test_border_weights_peak_in_the_gap_between_touching_objects():
    import dataclasses

    from useg.train import border_weights

    lab = np.zeros((20, 21), np.int64)
    lab[5:15, 2:10], lab[5:15, 11:19] = 1, 1  # two cells, one background column between them
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [lab.shape])
    plan = dataclasses.replace(plan, data=dataclasses.replace(plan.data, border_weights=True))
    (w,) = border_weights([lab], plan)
    assert w.shape == lab.shape
    gap, far = w[10, 10], w[0, 0]
    assert gap > far + 5  # w0 * exp(-(1 + 1)^2 / (2 * 5^2)) = 9.2 on top of the class weight


def test_bf16_inference_is_checked_against_fp32_after_training(tmp_path, cells_dir, monkeypatch):
    import json

    from useg import runtime
    from useg.pipeline import train_folder
    from useg.predict import Segmenter, check_low_precision
    from useg.preprocess import load_arrays

    run = tmp_path / "run"
    train_folder(cells_dir, run, quiet=True, device="cpu", overrides=Overrides(
        model={"width": 4, "depth": 2}, patch_size=(32, 32),
        train={"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "precision": "fp32", "workers": 0}))
    from useg.dataset import discover
    from useg.plan import Plan

    plan = Plan.load(run / "plan.json")
    images, _ = load_arrays(discover(cells_dir)[:1], plan.data.label_map)
    if not runtime.cpu_has_bf16():  # nothing to compare on a CPU without bf16
        assert check_low_precision(plan, run, images, runtime.pick_device("cpu")) == {}
        return
    record = check_low_precision(plan, run, images, runtime.pick_device("cpu"))
    assert record["fast_path"] == "bf16" and 0.9 <= record["agreement"] <= 1.0
    assert json.loads((run / "inference.json").read_text())["precision"] == record["precision"]
    # a disagreeing fast path makes "auto" fall back to fp32
    (run / "inference.json").write_text(json.dumps({**record, "precision": "fp32"}))
    assert Segmenter.load(run, device="cpu").backend.precision.dtype is None


def test_loop_state_is_stored_under_the_same_keys():
    from useg.train import LoopState

    fresh = {"epoch": 0, "step": 0, "seconds": 0.0, "best_dice": -1.0, "best_epoch": -1}
    assert list(LoopState().to_dict().items()) == list(fresh.items())  # the keys in the order stored before
    state = {"epoch": 3, "step": 9, "seconds": 1.5, "best_dice": 0.25, "best_epoch": 2}
    assert LoopState.from_dict(state).to_dict() == state


@pytest.mark.parametrize("checkpoint", [None, b"garbage"])
def test_a_refused_resume_leaves_the_global_state_as_it_was(tmp_path, checkpoint):
    import dataclasses

    from useg import runtime

    images, labels = _tiny()
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)], overrides=Overrides(
        model={"width": 4, "depth": 2},
        train={"epochs": 1, "iters_per_epoch": 1, "batch_size": 2, "workers": 0}))
    plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, deterministic=True))
    run = tmp_path / "run"
    if checkpoint is not None:
        run.mkdir()
        (run / "last.safetensors").write_bytes(checkpoint)
    before = torch.get_num_threads()
    torch.set_num_threads(runtime.cpu_count() + 1)  # a count fit would never pick
    try:
        with pytest.raises(UsegError, match="nothing to resume" if checkpoint is None else "cannot read"):
            fit(plan, (images, labels), ([], []), run, resume=True, device="cpu", quiet=True)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == runtime.cpu_count() + 1
        # a run that finishes puts them back too
        fit(plan, (images, labels), ([], []), tmp_path / "done", device="cpu", quiet=True)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == runtime.cpu_count() + 1
    finally:
        torch.set_num_threads(before)


def test_time_budget_stops_after_validating(tmp_path):
    images, labels = _tiny()
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)], overrides=Overrides(
        model={"width": 4, "depth": 2},
        train={"epochs": 3, "iters_per_epoch": 4, "batch_size": 2, "precision": "fp32", "workers": 0}))
    run = tmp_path / "run"
    result = fit(plan, (images[:2], labels[:2]), (images[2:], labels[2:]), run, time_budget_min=1e-9,
                 quiet=True)
    assert result.epochs == 1 and result.steps == 1  # the first step spends the budget
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and "val_dice" in records[0]
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


# --- a diverged training stops with one sentence and never saves non-finite weights (issue 14) -----------

TINY_CLI = ["--width", "4", "--depth", "2", "--patch", "32,32", "--epochs", "2", "--iters", "6",
            "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("iters", ["2", "6"])  # the check at the epoch's end, and the one every 5 steps
def test_a_diverging_loss_stops_training_with_the_fix(iters, cells_dir, tmp_path, capsys):
    from useg.cli import main

    run = tmp_path / "run"
    argv = ["train", str(cells_dir), "--out", str(run), *TINY_CLI, "--iters", iters, "--lr", "1e30"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the training loss became nan" in err and "lower --lr" in err
    assert f"by step {min(int(iters), 5)} (epoch 0)" in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists() and not list(tmp_path.glob(".run.*"))  # nothing diverged was saved


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    from safetensors.torch import save_file

    from useg.checkpoint import load_weights, save_model
    from useg.model import UNet

    images, _ = _tiny()
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [i.shape[1:] for i in images],
                     overrides=Overrides(model={"width": 4, "depth": 2}))
    model = UNet.from_config(plan.model)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(UsegError, match="not finite.*lower --lr"):
        save_model(model, tmp_path / "model.safetensors")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UsegError, match="not finite"):
        save_checkpoint(tmp_path / "last.safetensors", model, optimizer, {"epoch": 1})
    assert not list(tmp_path.iterdir())  # neither file, nor a temporary one
    # a run folder whose weights diverged (written by an older useg, or by hand) is refused at load
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsegError, match="not finite.*lower --lr"):
        load_weights(UNet.from_config(plan.model), tmp_path / "model.safetensors")
    plan.save(tmp_path / "plan.json")
    with pytest.raises(UsegError, match="not finite"):
        Segmenter.load(tmp_path, precision="fp32")


@pytest.mark.parametrize("field, flag, value", [("epochs", "--epochs", 0), ("epochs", "--epochs", -3),
                                                ("iters_per_epoch", "--iters", 0),
                                                ("batch_size", "--batch-size", 0)])
def test_a_plan_of_no_step_is_refused(field, flag, value, tmp_path):
    with pytest.raises(UsegError, match=f"{flag} .*must be a whole number of at least 1"):
        make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)], overrides=Overrides(train={field: value}))
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)])
    d = plan.to_dict()
    d["train"][field] = value
    (tmp_path / "plan.json").write_text(json.dumps(d))
    from useg.plan import Plan

    with pytest.raises(UsegError, match="is not a useg plan.*at least 1"):
        Plan.load(tmp_path / "plan.json")


# --- the step never waits for the device; the loss is read every SYNC_EVERY steps (h11-gpu) --------------


def test_the_loss_is_read_and_checked_every_sync_every_steps_and_at_the_epoch_end(tmp_path, monkeypatch):
    from useg import train

    checks = []
    real = train._stop_if_diverged

    def spy(s, state, loss, agreed=False):
        checks.append((state.step, agreed))
        real(s, state, loss, agreed)

    monkeypatch.setattr(train, "_stop_if_diverged", spy)
    monkeypatch.setattr(train.runtime, "cpu_count", lambda: 1)  # tiny convs: one thread on a loaded CPU
    images, labels = _tiny()
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [i.shape[1:] for i in images], overrides=Overrides(
        model={"width": 4, "depth": 2}, train={"epochs": 1, "iters_per_epoch": 11, "batch_size": 1},
        patch_size=(32, 32)))
    fit(plan, (images, labels), ([], []), tmp_path / "run", device="cpu", quiet=True)
    every = train.SYNC_EVERY
    assert checks == [*((k, False) for k in range(every, 11 + 1, every)), (11, True)]
