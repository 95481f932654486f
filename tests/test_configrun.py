"""A multi-configuration run as prediction sees it: the recorded choice and the ensemble of two Segmenters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from useg.configrun import ConfigEnsemble, chosen_runs, describe_choice, read_choice, refuse_unfit
from useg.errors import UsegError
from useg.files import Image
from useg.predict import Segmenter
from useg.runlog import run_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(64, 64), (37, 50)])
def test_the_ensemble_of_two_copies_of_one_model_is_that_model(untrained_run, rng, shape):
    one = Segmenter.load(untrained_run, device="cpu")
    both = ConfigEnsemble([Segmenter.load(untrained_run, device="cpu") for _ in range(2)])
    array = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(both.predict_proba(array), one.predict_proba(array), atol=1e-6)
    np.testing.assert_array_equal(both.predict(array), one.predict(array))
    image = Image(array[None], (1.0, 1.0))
    np.testing.assert_array_equal(both.predict_image(image), one.predict_image(image))
    assert both.plan == one.plan and both.num_classes == one.num_classes and both.postprocessing is None


def test_the_ensemble_passes_test_time_augmentation_to_its_members(untrained_run):
    import dataclasses

    both = ConfigEnsemble([Segmenter.load(untrained_run, device="cpu") for _ in range(2)])
    both.plan = dataclasses.replace(both.plan, infer=dataclasses.replace(both.plan.infer, tta=True))
    assert all(m.plan.infer.tta for m in both.members)
    with pytest.raises(ValueError):
        ConfigEnsemble(both.members[:1])


def _multi(tmp_path, untrained_run, record=None):
    import shutil

    run = tmp_path / "multi"
    run.mkdir()
    asked = {"configurations": ["2d", "3d"], "folds": None, "val": ["a"]}
    (run / "configs.json").write_text(json.dumps(asked))
    for name in ("2d", "3d"):
        shutil.copytree(untrained_run, run / name)
    if record is not None:
        (run / "configuration.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return run


def test_chosen_runs_follow_the_record(tmp_path, untrained_run):
    assert chosen_runs(untrained_run) is None  # an ordinary run
    with pytest.raises(UsegError, match="not a multi-configuration run"):
        chosen_runs(untrained_run, "2d")
    run = _multi(tmp_path, untrained_run)
    assert run_state(run).kind == "resumable"  # trained configurations, no choice yet
    with pytest.raises(UsegError, match="training is not complete"):
        chosen_runs(run)
    assert chosen_runs(run, "3d") == [run / "3d"]
    record = {"chosen": ["2d", "3d"], "candidates": {"2d": {"dice": 0.5, "classes": {"value 255": 0.5}}},
              "rule": "the rule", "scored_on": "the validation cases"}
    (run / "configuration.json").write_text(json.dumps(record))
    assert chosen_runs(run) == [run / "2d", run / "3d"] and run_state(run).kind == "complete"
    lines = describe_choice(run)
    assert "2d     foreground dice 0.5000 (value 255 0.5000)" in lines[1] and lines[-1] == "  rule: the rule"
    assert isinstance(Segmenter.load(run, device="cpu"), ConfigEnsemble)


@pytest.mark.parametrize("record, words", [
    ("{not json", "is not a configuration record"),
    ({"chosen": []}, "'chosen' must list one or two"),
    ({"chosen": ["2d", "2d"]}, "'chosen' must list one or two"),
    ({"chosen": ["4d"]}, "'chosen' must list one or two"),
    ([1, 2], "'chosen' must list one or two"),
])
def test_a_damaged_record_is_refused(tmp_path, untrained_run, record, words):
    run = _multi(tmp_path, untrained_run, record)
    with pytest.raises(UsegError, match=words):
        read_choice(run)


def test_3d_is_refused_for_2d_images():
    refuse_unfit(3, ["3d"], "data")
    with pytest.raises(UsegError, match="data holds 2D images, for which there is no 3D configuration"):
        refuse_unfit(2, ["2d", "3d"], "data")
