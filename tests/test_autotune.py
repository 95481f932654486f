"""The measured backend choice: the decision rule, the machine key, the cached choice, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from useg import autotune, autotune_cache, runtime
from useg.autotune import REFERENCE, Timing, decide, measure
from useg.checkpoint import save_model
from useg.cli import main
from useg.errors import UsegError
from useg.labels import LabelMap
from useg.model import UNet
from useg.planner import make_plan
from useg.predict import INFERENCE_RECORD, Segmenter
from useg.spec import Overrides

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _plan(dims=2, tile=(32, 32), regions=False):
    plan = make_plan(LabelMap((0, 255)), 1, [tile], overrides=Overrides(
        model={"width": 4, "depth": 2}, infer={"tta": False, "batch_size": 2}, patch_size=tile))
    assert plan.model.dims == dims and tuple(plan.infer.tile) == tile
    return plan


def _run(path, tile=(32, 32), seed=0):
    plan = _plan(len(tile), tile)
    path.mkdir(parents=True, exist_ok=True)
    plan.save(path / "plan.json")
    torch.manual_seed(seed)
    save_model(UNet.from_config(plan.model), path / "model.safetensors")
    return path


@pytest.fixture
def no_bf16(monkeypatch):
    """An AVX2-like CPU for useg: no native bf16, whatever this machine has."""
    monkeypatch.setenv("USEG_CPU_BF16", "0")
    runtime.cpu_has_bf16.cache_clear()
    yield
    runtime.cpu_has_bf16.cache_clear()


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("USEG_CACHE_DIR", str(tmp_path / "user-cache" / "useg"))
    return tmp_path / "user-cache" / "useg"


def _records(cache):
    """The cached measurements: weights-hash file name -> its table of machines."""
    files = sorted(cache.glob("inference-*.json"))
    return {p.name: json.loads(p.read_text())[autotune_cache.CACHE_KEY] for p in files}


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the decision rule


def test_the_fastest_eligible_candidate_wins():
    timings = [Timing(REFERENCE, 30.0, 1.0), Timing("torch-channels-last", 20.0, 1.0),
               Timing("onnxruntime", 12.0, 0.9995), Timing("openvino", 14.0, 1.0)]
    assert decide(timings) == "onnxruntime"
    assert decide(timings[:2]) == "torch-channels-last"
    tie = [Timing(REFERENCE, 5.0, 1.0), Timing("onnxruntime", 5.0, 1.0)]
    assert decide(tie) == REFERENCE  # a tie keeps the simpler


def test_an_ineligible_or_untimed_candidate_is_never_chosen():
    timings = [Timing(REFERENCE, 30.0, 1.0), Timing("torch-bf16", 1.0, 0.9989, "disagrees with fp32"),
               Timing("openvino", None, None, "unavailable: not installed"),
               Timing("onnxruntime", 2.0, None)]
    assert decide(timings) == REFERENCE
    assert decide(timings, threshold=0.99) == "torch-bf16"
    assert decide([]) == REFERENCE


def test_bf16_is_no_candidate_without_native_support(no_bf16):
    names = autotune.candidates(CPU)
    assert names[0] == REFERENCE and "torch-channels-last" in names
    assert "torch-bf16" not in names and "openvino-bf16" not in names
    assert ("onnxruntime" in names) == (autotune.importlib.util.find_spec("onnxruntime") is not None)


def test_bf16_is_a_candidate_where_native(monkeypatch):
    monkeypatch.setenv("USEG_CPU_BF16", "1")
    runtime.cpu_has_bf16.cache_clear()
    try:
        names = autotune.candidates(CPU)
        assert "torch-bf16" in names
        assert ("openvino-bf16" in names) == ("openvino" in names)  # where OpenVINO is installed
    finally:
        runtime.cpu_has_bf16.cache_clear()


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_candidates_are_the_autocast_precisions(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    want = [REFERENCE, "torch-bf16", "torch-fp16"] if bf16 else [REFERENCE, "torch-fp16"]
    assert autotune.candidates(torch.device("cuda")) == want
    assert autotune.candidates(torch.device("mps")) == [REFERENCE]


def test_the_machine_key_follows_every_fact(no_bf16):
    facts = autotune.machine_facts(CPU)
    assert facts["cpu_bf16"] == "no" and facts["threads"] == str(torch.get_num_threads())
    assert {"cpu", "isa", "torch", "device", "onnxruntime", "openvino"} <= set(facts)
    key = autotune.machine_key(facts)
    for field in facts:
        assert autotune.machine_key({**facts, field: facts[field] + "x"}) != key, field


# ------------------------------------------------------------------------------ measuring


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Costly:
    """A fake backend: each call takes ``cost`` seconds of the fake clock; labels by the input's sign."""

    device = CPU

    def __init__(self, name, clock, cost, flip=0):
        self.name, self.clock, self.cost, self.flip, self.calls = name, clock, cost, flip, 0

    def __call__(self, batch):
        self.calls += 1
        self.clock.now += self.cost
        p = (batch[:, :1] > 0).float()
        if self.flip:
            p.view(-1)[: self.flip] = 1 - p.view(-1)[: self.flip]
        return torch.cat([1 - p, p], 1)


def test_measure_checks_agreement_first_and_times_within_the_budget():
    clock = Clock()
    tile = torch.randn(1, 1, 40, 25, generator=torch.Generator().manual_seed(0))  # 1000 pixels
    fakes = {REFERENCE: Costly(REFERENCE, clock, 0.5), "torch-channels-last": Costly("cl", clock, 0.1),
             "torch-bf16": Costly("bf16", clock, 0.01, flip=2),
             "onnxruntime": Costly("ort", clock, 0.2, flip=1)}

    def broken():
        raise RuntimeError("no such runtime\nsecond line")

    builders = {name: (lambda f=f: f) for name, f in fakes.items()}
    builders["openvino"] = broken
    kept = {}
    got = {t.name: t for t in measure(builders, tile, budget_s=5.0, reps=5, timer=clock, keep=kept)}
    assert list(got) == [REFERENCE, "torch-channels-last", "torch-bf16", "onnxruntime", "openvino"]
    assert got[REFERENCE] == Timing(REFERENCE, 500.0, 1.0)  # 1 s share: the first pass then 2 timed ones
    assert fakes[REFERENCE].calls == 1 + 2
    assert got["torch-channels-last"].ms == 100.0 and fakes["torch-channels-last"].calls == 1 + 5  # reps cap
    assert got["torch-bf16"] == Timing("torch-bf16", None, 0.998, "disagrees with fp32")
    assert fakes["torch-bf16"].calls == 1  # never timed
    assert got["onnxruntime"].agreement == 0.999 and got["onnxruntime"].ms == 200.0
    assert got["openvino"] == Timing("openvino", None, None, "unavailable: no such runtime")
    assert list(kept) == ["torch-channels-last"]  # the fastest agreeing one only: the others are let go
    assert decide(list(got.values())) == "torch-channels-last"


def test_a_reference_that_cannot_run_is_an_error():
    def broken():
        raise ValueError("the run is broken")

    with pytest.raises(ValueError, match="the run is broken"):
        measure({REFERENCE: broken}, torch.zeros(1, 1, 8, 8))


def test_region_labels_are_compared_per_region():
    clock = Clock()
    tile = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    builders = {REFERENCE: lambda: Costly(REFERENCE, clock, 0.1),
                "x": lambda: Costly("x", clock, 0.1, flip=1)}
    got = measure(builders, tile, regions=True, budget_s=0.0, reps=1, timer=clock)
    assert got[1].agreement == 0.99  # one pixel flipped in both region maps: 2 of 200 differ


# ------------------------------------------------------------------------------ the cache


def _count_measures(monkeypatch):
    calls = []
    real = autotune.measure

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(autotune, "measure", counting)
    return calls


def _choose(run, **kw):
    seg = Segmenter.load(run, device="cpu", backend=REFERENCE)
    return autotune.choose(run, seg.plan, seg.backend, budget_s=0.05, **kw)


def test_a_second_load_reads_the_cache(tmp_path, monkeypatch, user_cache, no_bf16):
    run = _run(tmp_path / "run")
    calls = _count_measures(monkeypatch)
    first = _choose(run)
    assert calls == [1] and not first["cached"] and first["chosen"] in autotune.candidates(CPU)
    assert [t["name"] for t in first["timings"]] == autotune.candidates(CPU)
    assert all(t["agreement"] >= 0.999 for t in first["timings"] if t["ms"] is not None)
    (table,) = _records(user_cache).values()
    (key, entry), = table.items()
    assert key == autotune.machine_key(autotune.machine_facts(CPU)) and entry["tile"] == [1, 1, 32, 32]
    second = _choose(run)
    assert calls == [1] and second["cached"] and second["chosen"] == first["chosen"]
    assert autotune.load_segmenter(run, device="cpu").backend.name == first["chosen"]
    assert calls == [1]
    assert _choose(run, refresh=True)["cached"] is False and calls == [1, 1]


def test_measuring_never_writes_into_the_run_folder(tmp_path, user_cache, no_bf16):
    run = _run(tmp_path / "run")
    (run / INFERENCE_RECORD).write_text(json.dumps({"precision": "fp32", "agreement": 0.9}))
    before = _tree(run)
    _choose(run)
    autotune.load_segmenter(run, device="cpu", budget_s=0.05)
    assert _tree(run) == before  # predict changes no input: the cache is the user's
    assert _records(user_cache)


def test_another_machine_or_other_weights_measure_again(tmp_path, monkeypatch, user_cache, no_bf16):
    run = _run(tmp_path / "run")
    calls = _count_measures(monkeypatch)
    _choose(run)
    facts = autotune.machine_facts
    monkeypatch.setattr(autotune, "machine_facts", lambda dev: {**facts(dev), "threads": "64"})
    assert not _choose(run)["cached"] and calls == [1, 1]
    (table,) = _records(user_cache).values()
    assert len(table) == 2  # both machines, for the same weights
    assert _choose(run)["cached"]
    _run(run, seed=1)  # trained again: other weights
    assert not _choose(run)["cached"] and calls == [1, 1, 1]
    assert sorted(len(t) for t in _records(user_cache).values()) == [1, 2]  # a record per weights hash


def test_an_unwritable_cache_only_measures_again(tmp_path, monkeypatch, user_cache, no_bf16):
    run = _run(tmp_path / "run")
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text("a file where the cache folder should be")  # any write there fails, root too
    calls = _count_measures(monkeypatch)
    assert not _choose(run)["cached"]
    assert not _choose(run)["cached"] and calls == [1, 1]


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch, user_cache, no_bf16):
    run = _run(tmp_path / "run")
    calls = _count_measures(monkeypatch)
    _choose(run)
    (record,) = user_cache.glob("inference-*.json")
    record.write_text('{"backends": [1, 2')
    assert not _choose(run)["cached"] and calls == [1, 1]
    assert autotune_cache.CACHE_KEY in json.loads(record.read_text())


@pytest.mark.parametrize("batch_ms, expected", [(1e-6, 2), (1e9, 1)])
def test_prediction_takes_the_plan_batch_only_where_it_pays(tmp_path, monkeypatch, user_cache, no_bf16,
                                                             batch_ms, expected):
    run = _run(tmp_path / "run")  # the plan's inference batch is 2
    monkeypatch.setattr(autotune, "_batch_ms", lambda backend, tile, batch, budget: batch_ms)
    record = _choose(run)
    assert (record["batch"], record["batch_ms"], record["tiles_per_call"]) == (2, batch_ms, expected)
    seg = autotune.load_segmenter(run, device="cpu")
    assert seg.plan.infer.batch_size == expected and seg.backend.name == record["chosen"]
    assert f"tiles a call: {expected}" in autotune.format_table(record)


def test_a_batch_bigger_than_the_cpu_cap_is_not_timed(tmp_path, monkeypatch, user_cache, no_bf16):
    run = _run(tmp_path / "run")  # 2 tiles of 32x32: 2048 voxels a call
    monkeypatch.setattr(autotune, "BATCH_VOXELS_CPU", 2047)
    monkeypatch.setattr(autotune, "_batch_ms", lambda *a: pytest.fail("a batch over the cap was timed"))
    record = _choose(run)
    assert (record["batch_ms"], record["tiles_per_call"]) == (None, 1)
    assert "tiles a call: 1 (the plan's batch of 2 is not timed" in autotune.format_table(record)


def test_the_batch_timing_is_real_and_a_record_without_it_measures_again(tmp_path, monkeypatch,
                                                                        user_cache, no_bf16):
    run = _run(tmp_path / "run")
    first = _choose(run)
    assert first["batch_ms"] > 0 and first["tiles_per_call"] in (1, 2)
    (path,) = user_cache.glob("inference-*.json")
    data = json.loads(path.read_text())
    for entry in data[autotune_cache.CACHE_KEY].values():
        del entry["tiles_per_call"]  # a record written before tiles were timed in a batch
    path.write_text(json.dumps(data))
    calls = _count_measures(monkeypatch)
    assert not _choose(run)["cached"] and calls == [1]
    assert _choose(run)["cached"] and calls == [1]


# ------------------------------------------------------------------------------ end to end


def test_auto_predicts_like_fp32_and_caches_the_onnx_export(tmp_path, user_cache, no_bf16):
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path / "run")
    seg = autotune.load_segmenter(run, device="cpu", budget_s=0.05)
    assert list(user_cache.glob("onnx/model-*.onnx"))  # exported on the fly, beside its sidecar
    image = np.random.default_rng(2).integers(0, 255, (45, 61)).astype(np.uint8)
    fp32 = Segmenter.load(run, device="cpu", backend=REFERENCE).predict(image)
    assert (seg.predict(image) == fp32).mean() >= 0.999
    assert autotune.load_segmenter(run, backend="torch-channels-last").backend.name == "torch-channels-last"


def test_a_cached_exported_choice_skips_the_torch_model(tmp_path, monkeypatch, user_cache, no_bf16):
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path / "run")
    image = np.random.default_rng(3).integers(0, 255, (45, 61)).astype(np.uint8)
    fp32 = Segmenter.load(run, device="cpu", backend=REFERENCE).predict(image)
    monkeypatch.setattr(autotune, "decide", lambda timings, threshold=0.999: "onnxruntime")
    first = _choose(run)
    assert first["chosen"] == "onnxruntime" and not first["cached"]

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference PyTorch model was built for a cached exported choice")

    monkeypatch.setattr(Segmenter, "load", no_reference)
    seg = autotune.load_segmenter(run, device="cpu")
    assert seg.backend.name == "onnxruntime" and seg.plan.infer.batch_size == first["tiles_per_call"]
    assert (seg.predict(image) == fp32).mean() >= 0.999


def test_a_cached_exported_choice_still_refuses_an_edited_plan(tmp_path, monkeypatch, user_cache, no_bf16):
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path / "run")
    monkeypatch.setattr(autotune, "decide", lambda timings, threshold=0.999: "onnxruntime")
    assert _choose(run)["chosen"] == "onnxruntime"
    plan = json.loads((run / "plan.json").read_text())
    plan["model"]["width"] = 8  # the weights are of width 4: the cached record and export still match them
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UsegError, match="does not match its plan.json"):
        autotune.load_segmenter(run, device="cpu")


def test_cli_backend_override_and_info_table(tmp_path, cells_dir, user_cache, no_bf16, capsys):
    run = _run(tmp_path / "run", tile=(64, 64))
    image = str(cells_dir / "images" / "cell_000.png")
    assert main(["predict", str(run), image, "--out", str(tmp_path / "a"), "--backend", "torch-channels-last",
                 "--quiet", "--device", "cpu"]) == 0
    assert not (run / INFERENCE_RECORD).exists()  # an explicit backend measures nothing
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "backends for" in out and "measured now" in out and "ms/tile" in out
    assert "torch-fp32" in out and "torch-channels-last" in out and "*" in out
    assert main(["info", str(run)]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["predict", str(run), image, "--out", str(tmp_path / "b"), "--quiet", "--device", "cpu"]) == 0
    from useg.io import read_mask

    a, b = read_mask(tmp_path / "a" / "cell_000.png")[0], read_mask(tmp_path / "b" / "cell_000.png")[0]
    assert (a == b).mean() >= 0.999
