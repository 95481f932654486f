"""What the measured backend choice keeps: the cache records and the agreement tile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from useg import autotune_cache
from useg.labels import LabelMap
from useg.planner import make_plan
from useg.spec import Overrides


def _plan(tile=(32, 32)):
    plan = make_plan(LabelMap((0, 255)), 1, [tile], overrides=Overrides(
        model={"width": 4, "depth": 2}, infer={"tta": False, "batch_size": 2}, patch_size=tile))
    assert tuple(plan.infer.tile) == tile
    return plan


# ------------------------------------------------------------------------------ the cache records


def test_cache_records_round_trip_per_machine_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("USEG_CACHE_DIR", str(tmp_path / "cache"))
    assert autotune_cache.cache_dir() == tmp_path / "cache"
    digest, tile = "ab" * 32, [1, 1, 32, 32]
    entry = {"weights_sha256": digest, "tile": tile, "chosen": "torch-fp32"}
    assert autotune_cache.read_cached("machine-a", digest, tile) is None  # nothing yet
    path = autotune_cache.write_cached("machine-a", entry)
    assert path == tmp_path / "cache" / f"inference-{digest[:16]}.json"
    autotune_cache.write_cached("machine-b", {**entry, "chosen": "onnxruntime"})
    assert autotune_cache.read_cached("machine-a", digest, tile) == entry
    assert autotune_cache.read_cached("machine-b", digest, tile)["chosen"] == "onnxruntime"
    assert autotune_cache.read_cached("machine-a", digest, [1, 1, 64, 64]) is None  # another tile
    assert autotune_cache.read_cached("machine-c", digest, tile) is None  # another machine
    table = json.loads(path.read_text())[autotune_cache.CACHE_KEY]
    assert sorted(table) == ["machine-a", "machine-b"]
    path.write_text('{"backends": {"machine-a": {"weights_sha256": "other"}}}')  # entries of other weights
    assert autotune_cache.read_cached("machine-a", digest, tile) is None
    autotune_cache.write_cached("machine-b", entry)
    assert sorted(json.loads(path.read_text())[autotune_cache.CACHE_KEY]) == ["machine-b"]  # dropped


# ------------------------------------------------------------------------------ the agreement tile


@pytest.mark.parametrize("shape", [(50, 70), (20, 33), (40, 40, 9)])
def test_the_agreement_tile_round_trips(tmp_path, shape):
    tile = (32, 32) if len(shape) == 2 else (16, 16, 16)
    plan = make_plan(LabelMap((0, 255)), 1, [tile], overrides=Overrides(
        model={"width": 4, "depth": 2}, patch_size=tile))
    assert tuple(plan.infer.tile) == tile
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    run = tmp_path / "run"
    run.mkdir()
    random = autotune_cache.agreement_tile(run, plan)
    assert random.shape == (1, 1, *tile)
    autotune_cache.save_agreement_tile(run, plan, [image])
    got = autotune_cache.agreement_tile(run, plan)[0, 0].numpy()
    assert got.shape == tile and not np.array_equal(got, random[0, 0].numpy())
    if all(s >= t for s, t in zip(shape, tile)):  # the centre crop
        starts = [(s - t) // 2 for s, t in zip(shape, tile)]
        want = image[0][tuple(slice(a, a + t) for a, t in zip(starts, tile))]
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    else:  # mirrored where the image is smaller
        assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_a_damaged_agreement_tile_falls_back_to_a_random_one(tmp_path):
    plan = _plan()
    run = tmp_path / "run"
    run.mkdir()
    (run / autotune_cache.TILE_FILE).write_bytes(b"not safetensors")
    assert autotune_cache.agreement_tile(run, plan).shape == (1, 1, 32, 32)
