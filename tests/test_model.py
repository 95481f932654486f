from __future__ import annotations

import pytest
import torch

from useg.model import (UNet, center_crop, input_size_for_output, output_size, valid_input_size,
                        valid_sizes)


def _convs(net):
    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    return sum(isinstance(m, kinds) for m in net.modules())


def test_the_papers_network():
    net = UNet(1, 2, width=64, depth=4, padding="valid", up="transpose", norm=None)
    assert sum(p.numel() for p in net.parameters()) == 31_030_658
    assert _convs(net) == 23
    assert net.output_size((572, 572)) == (388, 388)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("up", ["transpose", "interp"])
@pytest.mark.parametrize("norm", [None, "batch", "instance"])
def test_shapes(dims, padding, up, norm):
    depth = 2
    net = UNet(2, 3, dims=dims, width=4, depth=depth, padding=padding, up=up, norm=norm, dropout=0.2)
    size = valid_input_size((21, 30, 27)[:dims] if padding == "same" else (45, 49, 53)[:dims], depth, padding)
    y = net(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *output_size(size, depth, padding))
    if padding == "same":
        assert y.shape[2:] == size


def test_size_helpers():
    assert valid_sizes(4, "same", 64) == [16, 32, 48, 64]
    assert valid_sizes(4, "valid", 260) == [188, 204, 220, 236, 252]
    assert valid_input_size((100, 17), 4, "same") == (112, 32)
    assert input_size_for_output((388,), 4, "valid") == (572,)
    assert input_size_for_output((389,), 4, "valid") == (588,)
    with pytest.raises(ValueError, match="nearest larger valid size is \\(572,\\)"):
        output_size((570,), 4, "valid")
    with pytest.raises(ValueError, match="multiple of 16"):
        UNet(1, 2, width=2)(torch.zeros(1, 1, 40, 48))


def test_he_init_and_bias():
    net = UNet(1, 2, width=64, depth=1, norm=None)
    w = net.inc[0].weight  # 64 x 1 x 3 x 3: fan_in 9
    assert w.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.2)
    w = net.inc[2].weight  # fan_in 64 * 9
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(net.inc[0].bias) == 0
    assert UNet(1, 2, width=4, depth=1, norm="batch").inc[0].bias is None


def test_dropout_only_in_training():
    net = UNet(1, 2, width=4, depth=2, dropout=0.5).eval()
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_bf16_channels_last_and_trace():
    net = UNet(1, 2, width=4, depth=2).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.shape == (2, 2, 32, 32) and torch.isfinite(y.float()).all()
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), net(x))


def test_center_crop_and_bad_args():
    x = torch.arange(2 * 7 * 8).reshape(1, 2, 7, 8)
    c = center_crop(x, (3, 4))
    assert c.shape == (1, 2, 3, 4) and c[0, 0, 0, 0] == x[0, 0, 2, 2]
    with pytest.raises(ValueError):
        center_crop(x, (9, 4))
    for kw in ({"padding": "full"}, {"up": "pixelshuffle"}, {"norm": "group"}, {"dims": 4}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            UNet(1, 2, **kw)
