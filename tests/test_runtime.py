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


# --- the effective ISA level: the CPU's flags, capped by ONEDNN_MAX_CPU_ISA and USEG_CPU_BF16 (speed) ------

_ZEN3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"  # an AVX2-only EPYC
_ZEN4 = _ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16"
_SPR = _ZEN4 + " amx_bf16 amx_tile amx_int8"  # Sapphire Rapids


@pytest.mark.parametrize("flags, cap, switch, expect", [
    ("fpu sse sse2 sse4_2 avx", "", "", "baseline"),
    ("sse4_2 avx avx2", "", "", "baseline"),  # AVX2 without FMA is not oneDNN's AVX2
    (_ZEN3, "", "", "avx2"),
    (_ZEN3 + " avx512f", "", "", "avx2"),  # avx512f alone (Knights Landing) is not AVX512_CORE
    (_ZEN3 + " avx512f avx512bw avx512vl", "", "", "avx512"),
    (_ZEN4, "", "", "avx512-bf16"),
    (_SPR, "", "", "amx"),
    (_SPR, "avx512_core_bf16", "", "avx512-bf16"),  # the cap is case-insensitive
    (_SPR, "AVX512_CORE", "", "avx512"),
    (_ZEN4, "AVX2", "0", "avx2"),  # the command: an AVX2-only CPU on this machine
    (_ZEN4, "AVX2", "", "avx2"),
    (_ZEN4, "", "0", "avx512"),  # no native bf16: AVX-512 without its bf16 instructions
    (_SPR, "", "0", "avx512"),
    (_ZEN4, "ALL", "", "avx512-bf16"),
    (_ZEN4, "DEFAULT", "1", "avx512-bf16"),
    (_ZEN4, "BOGUS", "", "avx512"),  # an unknown cap: no level here, and no bf16 as cpu_has_bf16 says
    (_ZEN3, "", "1", "avx2"),  # USEG_CPU_BF16=1 never raises the level above the flags
    (_ZEN3, "AVX512_CORE_AMX", "", "avx2"),  # nor does a cap above the CPU
    ("", "", "", "baseline"),
])
def test_isa_of_flags_names_the_effective_level(flags, cap, switch, expect):
    assert runtime.isa_of_flags(flags, cap, switch) == expect
    assert expect in runtime.ISA_LEVELS


@pytest.mark.parametrize("env, expect", [
    ({}, "avx512-bf16"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "USEG_CPU_BF16": "0"}, "avx2"),
    ({"USEG_CPU_BF16": "0"}, "avx512"),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, "avx512-bf16"),
])
def test_isa_level_reads_the_cpu_and_the_environment_caps(monkeypatch, env, expect):
    for key in ("USEG_CPU_BF16", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: _ZEN4)
    assert runtime.isa_level() == expect
    runtime.cpu_has_bf16.cache_clear()
    try:  # where the level says no bf16 on this bf16 CPU, the precision rule says so too
        if expect in ("avx2", "avx512"):
            assert not runtime.cpu_has_bf16()
    finally:
        runtime.cpu_has_bf16.cache_clear()


def test_isa_level_names_a_machine_without_x86_flags_by_its_architecture(monkeypatch):
    import platform

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: None)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert runtime.isa_level() == "arm64"
    assert runtime.info()["cpu isa"] == "arm64"  # `useg info` shows it
