from __future__ import annotations

import os

import pytest
import torch

from useg import runtime


def test_cpu_precision_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.pick_precision(cpu, "fp32") == runtime.Precision(None, channels_last=False, scaler=False)
    bf = runtime.pick_precision(cpu, "bf16")
    assert bf.dtype is torch.bfloat16 and bf.channels_last and bf.name == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.pick_precision(cpu, "auto").dtype is None
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.pick_precision(cpu, "auto").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        runtime.pick_precision(cpu, "fp16")
    with pytest.raises(ValueError):
        runtime.pick_precision(cpu, "int8")


def test_memory_format_and_autocast():
    bf = runtime.Precision(torch.bfloat16, True, False)
    assert runtime.memory_format(2, bf) is torch.channels_last
    assert runtime.memory_format(3, bf) is torch.channels_last_3d
    assert runtime.memory_format(2, runtime.Precision(None, False, False)) is torch.contiguous_format
    with runtime.autocast(torch.device("cpu"), bf):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype is torch.bfloat16


def test_device_and_info():
    if not torch.cuda.is_available():
        assert runtime.pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA"):
            runtime.pick_device("cuda")
    info = runtime.info()
    assert {"torch", "device", "precision", "threads"} <= set(info)
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_global_state_puts_the_thread_count_back_even_on_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(runtime.cpu_count() + 1)  # a count global_state would never pick
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with runtime.global_state("cpu") as (dist, dev):
                assert dist == runtime.Dist() and dev.type == "cpu"
                assert torch.get_num_threads() == runtime.cpu_count()  # one process takes every core
                raise RuntimeError("inside")
        assert torch.get_num_threads() == runtime.cpu_count() + 1
        with runtime.global_state("cpu"):
            pass
        assert torch.get_num_threads() == runtime.cpu_count() + 1
    finally:
        torch.set_num_threads(before)


def test_deterministic_mode_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with runtime.deterministic_mode(True, torch.device("cpu")):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()  # the CPU only warns
            assert cudnn.deterministic and not cudnn.benchmark
            raise RuntimeError("inside")
    assert not torch.are_deterministic_algorithms_enabled() and not cudnn.deterministic
    with runtime.deterministic_mode(True, torch.device("cuda")):  # sets flags only; runs nothing on a GPU
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    # what the caller had set (warn-only included) comes back; enabled=False changes nothing
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with runtime.deterministic_mode(True, torch.device("cuda")):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        with runtime.deterministic_mode(False, torch.device("cpu")):
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_single_process_collectives_are_no_ops():
    one = runtime.Dist()
    assert runtime.any_rank(True, one) and not runtime.any_rank(False, one)
    assert runtime.replicas_in_sync(torch.nn.Linear(2, 2), one)
    assert torch.equal(runtime.all_reduce_sum(torch.ones(3), one), torch.ones(3))


@pytest.mark.parametrize("env, expect", [
    ({"USEG_CPU_BF16": "0"}, False),
    ({"USEG_CPU_BF16": "1"}, True),
    ({"USEG_CPU_BF16": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}, True),  # the explicit switch wins
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # oneDNN would emulate bf16: tens of times slower
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),
])
def test_bf16_can_be_switched_off_like_an_avx2_cpu(monkeypatch, env, expect):
    for key in ("USEG_CPU_BF16", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runtime.cpu_has_bf16.cache_clear()
    try:
        assert runtime.cpu_has_bf16() is expect
        cpu = torch.device("cpu")
        assert (runtime.pick_precision(cpu, "auto").dtype is not None) is expect
    finally:
        monkeypatch.undo()
        runtime.cpu_has_bf16.cache_clear()
