"""One optimizer step: the schedule, the optimizer table, a step that never waits for the device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from useg import runtime
from useg.labels import LabelMap
from useg.losses import SegLoss
from useg.model import UNet
from useg.planner import make_plan
from useg.spec import Overrides
from useg.step import lr_factor, make_optimizer, train_step


def _plan(**train):
    plan = make_plan(LabelMap((0, 1), "grey"), 1, [(32, 32)],
                     overrides=Overrides(model={"width": 4, "depth": 2}))
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, **train))


def test_lr_factor_shapes():
    assert lr_factor(0.0, "poly", 0.0) == 1.0
    assert lr_factor(1.0, "poly", 0.0) == 0.0
    assert lr_factor(0.5, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(0.01, "poly", 0.1) < 0.2  # warming up
    assert lr_factor(0.3, "constant", 0.0) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0.3, "steps", 0.0)


def test_the_optimizer_table():
    net = UNet.from_config(_plan().model)
    sgd = make_optimizer(net, _plan(optimizer="sgd", lr=0.01, momentum=0.99))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    assert isinstance(make_optimizer(net, _plan(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="the optimizer must be one of adamw, sgd"):
        _plan(optimizer="lamb")  # refused with the plan, before any optimizer is made


@pytest.mark.usefixtures("one_thread")
def test_train_step_reads_nothing_back_from_the_device(monkeypatch):
    """On CUDA a host read (.item(), float(), bool() of a tensor) stalls the queue; none in the step."""
    plan = _plan()
    net = UNet.from_config(plan.model).train()
    optimizer = make_optimizer(net, plan)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 32, 32, generator=gen), torch.randint(0, 2, (2, 32, 32), generator=gen)

    def guard(name):
        real = getattr(torch.Tensor, name)

        def read(t, *args, **kwargs):
            # AdamW's step counters live on the host even for CUDA parameters: reading them is free
            if not any(t is state.get("step") for state in optimizer.state.values()):
                raise AssertionError(f"Tensor.{name} inside train_step would wait for the device")
            return real(t, *args, **kwargs)

        return read

    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    cpu = torch.device("cpu")
    fp32 = runtime.pick_precision(cpu, "fp32")
    loss = train_step(net, x, y, None, SegLoss("dice_ce"), optimizer, scaler, cpu, fp32)
    monkeypatch.undo()
    assert loss.requires_grad is False and np.isfinite(float(loss))
