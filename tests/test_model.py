from __future__ import annotations

import warnings

import pytest
import torch

from useg.model import UNet, center_crop, input_size_for_output, output_size, valid_input_size, valid_sizes

CONVS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Conv3d, torch.nn.ConvTranspose3d)


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(net, kinds):
    return sum(isinstance(m, kinds) for m in net.modules())


def test_the_papers_network():
    net = UNet(1, 2, width=64, depth=4, padding="valid", up="transpose", norm=None).eval()
    assert sum(p.numel() for p in net.parameters()) == 31_030_658
    assert _count(net, CONVS) == 23
    assert net.output_size((572, 572)) == (388, 388)
    assert net.input_size_for_output((388, 388)) == (572, 572)
    with torch.no_grad():  # the one full-size forward of the suite
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("up", ["transpose", "interp"])
def test_shapes(dims, padding, up):
    depth = 2
    net = UNet(2, 3, dims=dims, width=4, depth=depth, padding=padding, up=up, dropout=0.2)
    odd = (21, 29, 27) if padding == "same" else (45, 49, 53)
    size = net.valid_input_size(odd[:dims])
    assert all(s >= o for s, o in zip(size, odd))
    y = net(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *output_size(size, depth, padding))
    if padding == "same":
        assert y.shape[2:] == size
    else:  # valid convs lose 12 * 2**depth - 8 px per axis
        assert y.shape[2:] == tuple(s - 40 for s in size)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", [None, "batch", "instance"])
def test_norm_and_bias(dims, norm):
    net = UNet(1, 2, dims=dims, width=4, depth=1, norm=norm)
    bn = torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d
    inn = torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d
    norms = [m for m in net.modules() if isinstance(m, (bn, inn))]
    assert len(norms) == (0 if norm is None else 6)  # 3 DoubleConvs x 2
    assert all(m.affine for m in norms) and all(isinstance(m, bn if norm == "batch" else inn) for m in norms)
    conv3 = [m for m in net.modules() if isinstance(m, CONVS[::2]) and m.kernel_size[0] == 3]
    assert len(conv3) == 6 and all((m.bias is None) == (norm is not None) for m in conv3)
    assert net.outc.bias is not None and torch.count_nonzero(net.outc.bias) == 0


def test_size_helpers():
    assert valid_sizes(4, "same", 64) == [16, 32, 48, 64]
    assert valid_sizes(4, "valid", 260) == [188, 204, 220, 236, 252]
    assert valid_sizes(1, "valid", 24) == [18, 20, 22, 24]
    for d in (2, 3, 5):  # closed form of the valid sizes (module docstring) against the simulation
        sizes = valid_sizes(d, "valid", 20 * 2**d)
        assert sizes == list(range(12 * 2**d - 4, 20 * 2**d + 1, 2**d))
        assert [output_size((n,), d, "valid")[0] for n in sizes] == [n - 12 * 2**d + 8 for n in sizes]
    assert output_size((132, 132, 116), 3, "valid") == (44, 44, 28)  # the 3D U-Net (Cicek et al. 2016)
    assert valid_input_size((100, 17), 4, "same") == (112, 32)
    assert valid_input_size((1, 189), 4, "valid") == (188, 204)
    assert input_size_for_output((388,), 4, "valid") == (572,)
    assert input_size_for_output((389, 1), 4, "valid") == (588, 188)
    assert input_size_for_output((33,), 4, "same") == (48,)
    with pytest.raises(ValueError, match="nearest larger valid size is \\(572,\\)"):
        output_size((570,), 4, "valid")
    with pytest.raises(ValueError, match="padding"):
        valid_sizes(4, "full", 64)
    with pytest.raises(ValueError, match="depth"):
        valid_input_size((64,), 0, "same")


@pytest.mark.parametrize("dims", [2, 3])
def test_forward_rejects_bad_inputs(dims):
    net = UNet(1, 2, dims=dims, width=2, depth=2)
    nearest = "\\(" + "8, " * (dims - 1) + "12\\)"
    with pytest.raises(ValueError, match=f"multiple of 4.*nearest larger valid size is {nearest}"):
        net(torch.zeros(1, 1, *(8,) * (dims - 1), 10))
    with pytest.raises(ValueError, match="expected a \\(B, 1"):
        net(torch.zeros(1, 3, *(8,) * dims))
    with pytest.raises(ValueError, match="expected"):
        net(torch.zeros(1, 1, 8))


def test_he_init():
    net = UNet(1, 2, width=64, depth=1, norm=None)
    w = net.inc[0].weight  # 64 x 1 x 3 x 3: N = 9
    assert w.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.2)
    w = net.inc[2].weight  # N = 64 * 9, the paper's example
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    w = net.ups[0].up.weight  # 2x2 stride-2 up-conv 128 -> 64: each output sees N = 128 inputs
    assert w.shape == (128, 64, 2, 2)
    assert w.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.05)
    biases = [m.bias for m in net.modules() if isinstance(m, CONVS)]
    assert len(biases) == 8 and all(torch.count_nonzero(b) == 0 for b in biases)


def test_dropout_at_the_bottom_only_in_training():
    net = UNet(1, 2, width=4, depth=2, dropout=0.5).eval()
    assert isinstance(net.dropout, torch.nn.Dropout) and net.dropout.p == 0.5
    assert _count(net, torch.nn.Dropout) == 1
    assert _count(UNet(1, 2, width=4, depth=2), torch.nn.Dropout) == 0
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_channels_last(dims):
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    net = UNet(1, 2, dims=dims, width=4, depth=2).eval().to(memory_format=fmt)
    x = torch.randn(2, 1, *(16,) * dims).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
    assert y.shape == (2, 2, *(16,) * dims) and torch.isfinite(y.float()).all()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.05  # bf16 keeps ~3 digits


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_trace_generalises_to_other_sizes(padding):
    net = UNet(1, 2, width=2, depth=2, padding=padding, up="interp").eval()
    a, b = ((32, 48), (48, 32)) if padding == "same" else ((44, 52), (60, 44))
    x = torch.randn(1, 1, *a)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.trace is deprecated, still asked for
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no shape frozen into the trace
        traced = torch.jit.trace(net, x)
        other = torch.randn(1, 1, *b)
        torch.testing.assert_close(traced(other), net(other))


def test_center_crop():
    x = torch.arange(2 * 7 * 8).reshape(1, 2, 7, 8)
    c = center_crop(x, (3, 4))
    assert c.shape == (1, 2, 3, 4) and c[0, 0, 0, 0] == x[0, 0, 2, 2] and c[0, 1, 2, 3] == x[0, 1, 4, 5]
    assert center_crop(x, (6, 8))[0, 0, 0, 0] == x[0, 0, 0, 0]  # the odd pixel comes off the end
    target = torch.arange(3 * 5 * 6 * 7).reshape(3, 5, 6, 7)  # (B, D, H, W) labels
    assert torch.equal(center_crop(target, (3, 2, 5)), target[:, 1:4, 2:4, 1:6])
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(x, (9, 4))
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(x, (1, 1, 1, 1, 1))


def test_from_config_builds_the_network_the_model_config_describes():
    import dataclasses
    import inspect

    from useg.plan import ModelConfig

    kw = dict(in_channels=3, num_classes=4, dims=3, width=2, depth=1, padding="valid", up="interp",
              norm="instance", dropout=0.1, max_width=None)
    net = UNet(**kw)
    again = UNet.from_config(ModelConfig(**kw))
    assert ({k: v.shape for k, v in again.state_dict().items()}
            == {k: v.shape for k, v in net.state_dict().items()})
    assert isinstance(again.dropout, torch.nn.Dropout) and again.dropout.p == 0.1
    # one source of truth: every ModelConfig field is a constructor argument, and the other way round
    params = list(inspect.signature(UNet).parameters)
    assert [f.name for f in dataclasses.fields(ModelConfig)] == params


@pytest.mark.parametrize("kw", [{"padding": "full"}, {"up": "pixelshuffle"}, {"norm": "group"}, {"dims": 4},
                                {"dropout": 1.0}, {"depth": 0}, {"width": 0}])
def test_bad_args(kw):
    with pytest.raises(ValueError):
        UNet(1, 2, **kw)


@pytest.mark.parametrize("dims", [2, 3])
def test_max_width_caps_the_deep_levels(dims):
    # nnU-Net caps 3D widths at 320; with a cap the up-convolution keeps the channels instead of halving
    net = UNet(1, 2, dims=dims, width=4, depth=3, max_width=8)
    widths = [net.inc[0].out_channels] + [
        d[-1][-1].out_channels if hasattr(d[-1][-1], "out_channels") else None for d in net.downs]
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert max(c.out_channels for c in convs) == 8 and widths[0] == 4
    x = torch.randn(1, 1, *([16] * dims))
    assert net(x).shape == (1, 2, *([16] * dims))
    uncapped = UNet(1, 2, dims=dims, width=4, depth=3)
    assert max(m.out_channels for m in uncapped.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))) == 32
