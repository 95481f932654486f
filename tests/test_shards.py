"""Tests for useg.shards: sharded prediction (faked torchrun ranks in-process) and --continue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from useg import runtime, shards
from useg.cli import main
from useg.errors import UsegError
from useg.io import read_mask
from useg.predict import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs on a loaded shared CPU


@pytest.fixture
def run(untrained_run):
    return untrained_run


@pytest.fixture
def images(cells_dir):
    return sorted((cells_dir / "images").iterdir())  # six 64x64 PNGs


def as_rank(monkeypatch, rank: int | None, world: int = 2) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` (no process group: none is joined)."""
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))


def masks(folder):
    return {p.name: read_mask(p)[0] for p in sorted(folder.iterdir())}


def test_current_reads_torchrun_environment(monkeypatch):
    as_rank(monkeypatch, None)
    assert shards.current() == shards.Shard(0, 1)
    as_rank(monkeypatch, 2, 3)
    assert shards.current() == shards.Shard(2, 3)
    for rank, world in (("3", "3"), ("-1", "2"), ("x", "2"), ("0", "0")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(UsegError, match="RANK=.* WORLD_SIZE=.*unset them or launch with torchrun"):
            shards.current()


def test_two_ranks_write_each_output_once_and_together_what_one_process_writes(run, images, tmp_path,
                                                                               monkeypatch):
    import tifffile

    seg = Segmenter.load(run, device="cpu", precision="fp32")
    as_rank(monkeypatch, None)
    single = seg.predict_files(images, tmp_path / "one", probabilities="float16")  # a map per image
    out, written = tmp_path / "two", {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank)
        calls = []
        written[rank] = seg.predict_files(images, out, probabilities="float16",
                                          progress=lambda d, t, c=calls: c.append((d, t)))
        assert calls[-1] == (3, 3)  # progress counts this rank's share
    stems = [p.stem for p in images]
    assert [p.name for p in written[0]] == [f"{stems[i]}_probs.tif" for i in (0, 2, 4)]
    assert [p.name for p in written[1]] == [f"{stems[i]}_probs.tif" for i in (1, 3, 5)]
    assert sorted(p.name for p in single) == sorted(p.name for p in out.iterdir())
    for p in single:
        alone, shared = tifffile.imread(p), tifffile.imread(out / p.name)
        assert alone.shape == (2, 64, 64) and np.array_equal(alone, shared)
    assert len({tifffile.imread(p).tobytes() for p in single}) == len(images)  # six different maps


def test_a_rank_checks_only_its_own_outputs(run, images, tmp_path, monkeypatch):
    seg = Segmenter.load(run, device="cpu", precision="fp32")
    out = tmp_path / "o"
    as_rank(monkeypatch, 0)
    seg.predict_files(images, out)
    as_rank(monkeypatch, 0)
    with pytest.raises(UsegError, match="already exists; pass --overwrite .* --continue"):
        seg.predict_files(images, out)  # its own outputs are there
    as_rank(monkeypatch, 1)
    assert len(seg.predict_files(images, out)) == 3  # rank 0's outputs are none of its business


@pytest.mark.parametrize("world", [1, 2])
def test_continue_predicts_only_what_is_missing(run, images, tmp_path, monkeypatch, world):
    seg = Segmenter.load(run, device="cpu", precision="fp32")
    out = tmp_path / "o"
    as_rank(monkeypatch, None)
    seg.predict_files(images, out)
    before = masks(out)
    (out / images[3].name).unlink()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = []
    for rank in range(world):
        as_rank(monkeypatch, rank if world > 1 else None, world)
        done += seg.predict_files(images, out, skip_existing=True)
    assert [p.name for p in done] == [images[3].name]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamp} == stamp  # untouched
    after = masks(out)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert seg.predict_files(images, out, skip_existing=True) == []
    with pytest.raises(ValueError, match="choose one"):
        seg.predict_files(images, out, overwrite=True, skip_existing=True)


def test_cli_continue(run, images, tmp_path, capsys):
    out = tmp_path / "o"
    folder = str(images[0].parent)
    args = ["predict", str(run), folder, "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    (out / images[1].name).unlink()
    assert main([*args, "--continue"]) == 0
    assert "wrote 1 mask(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in images]


def test_agree_without_a_process_group_raises_only_here():
    shards.agree(None, shards.Shard(1, 2))
    with pytest.raises(UsegError, match="exists"):
        shards.agree("out/a.png exists", shards.Shard(1, 2))


def test_cudnn_autotune_is_on_for_cuda_only_and_restored():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with runtime.cudnn_autotune(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        with runtime.cudnn_autotune(torch.device("cuda")):  # a device object needs no GPU
            assert torch.backends.cudnn.benchmark is True
            with runtime.deterministic_mode(True, torch.device("cuda")):
                assert torch.backends.cudnn.benchmark is False  # timing-based choices are not repeatable
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
