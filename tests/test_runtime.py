from __future__ import annotations

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
