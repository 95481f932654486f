"""The U-Net (Ronneberger, Fischer, Brox 2015) for 2D images and 3D volumes.

The network reads like the paper's Fig. 1: a contracting path of :class:`Down` blocks (2x max
pooling, then two 3x3 convolutions with ReLU), an expanding path of :class:`Up` blocks (a 2x2
up-convolution halving the channels, concatenation with the cropped skip feature map of the same
level, two 3x3 convolutions), and a final 1x1 convolution to the classes. With
``UNet(1, 2, width=64, depth=4, padding="valid", up="transpose", norm=None)`` it is exactly the
paper's network: 572x572 in, 388x388 out, 23 convolutional layers, 31,030,658 parameters.

Shape rules (the pure helpers below implement them):

- ``"same"`` padding: every spatial size must be a multiple of ``2**depth``; output = input.
- ``"valid"`` padding: each 3x3 conv loses 2 px, so each :class:`DoubleConv` loses 4; every size
  entering a pooling must be even and every size must stay positive. With depth d >= 2 the
  valid inputs are ``n = 12 * 2**d - 4 + k * 2**d`` (k >= 0) and the output is ``n - 12 * 2**d + 8``
  (572 -> 388 for d = 4; 132x132x116 -> 44x44x28 for the 3D U-Net of Cicek et al. 2016, d = 3).
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PADDINGS = ("same", "valid")
UPS = ("transpose", "interp")
NORMS = (None, "batch", "instance")


def layers(dims: int) -> SimpleNamespace:
    """The layer classes for a 2D (``dims=2``) or 3D (``dims=3``) network."""
    if dims == 2:
        return SimpleNamespace(conv=nn.Conv2d, up=nn.ConvTranspose2d, pool=nn.MaxPool2d,
                               batch=nn.BatchNorm2d, instance=nn.InstanceNorm2d, mode="bilinear")
    if dims == 3:
        return SimpleNamespace(conv=nn.Conv3d, up=nn.ConvTranspose3d, pool=nn.MaxPool3d,
                               batch=nn.BatchNorm3d, instance=nn.InstanceNorm3d, mode="trilinear")
    raise ValueError(f"dims must be 2 or 3, not {dims!r}")


class DoubleConv(nn.Sequential):
    """Two times (3x3 conv -> [norm] -> ReLU).

    Shapes: (B, cin, *S) -> (B, cout, *S) with "same" padding, (B, cout, *(S - 4)) with "valid".
    """

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None):
        L = layers(dims)
        mods: list[nn.Module] = []
        for c in (cin, cout):
            # A norm layer subtracts the mean, which makes a conv bias redundant.
            mods.append(L.conv(c, cout, 3, padding=1 if padding == "same" else 0, bias=norm is None))
            if norm == "batch":
                mods.append(L.batch(cout))
            elif norm == "instance":
                mods.append(L.instance(cout, affine=True))
            mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


class Down(nn.Sequential):
    """2x max pooling, then a :class:`DoubleConv`: one step down the contracting path.

    Shapes: (B, cin, *S) -> (B, cout, *(S / 2)) ("same"), (B, cout, *(S / 2 - 4)) ("valid").
    """

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None):
        super().__init__(layers(dims).pool(2), DoubleConv(cin, cout, dims, padding, norm))


class Up(nn.Module):
    """Up-convolution to the skip's channels, concatenation with the skip, :class:`DoubleConv`.

    Shapes: x (B, cin, *S) and skip (B, cout, *T) with T >= 2S -> (B, cout, *(2S)) ("same") or
    (B, cout, *(2S - 4)) ("valid"); ``cin == 2 * cout`` in the paper (the up-convolution halves
    the channels), ``cin == cout`` where a width cap stops the doubling.
    """

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None, up: str):
        super().__init__()
        L = layers(dims)
        if up == "transpose":
            self.up = L.up(cin, cout, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode=L.mode, align_corners=False),
                                    L.conv(cin, cout, 1))
        self.conv = DoubleConv(2 * cout, cout, dims, padding, norm)
        self.crop = padding == "valid"

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.crop:  # valid convs shrink the expanding path more than the skip (paper, Fig. 1)
            skip = center_crop(skip, x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net for 2D (``dims=2``) or 3D (``dims=3``) segmentation.

    Args:
        in_channels: image channels C.
        num_classes: output classes K (background included).
        dims: 2 or 3.
        width: channels at the first level; level i has ``min(width * 2**i, max_width)``, i = 0..depth.
        depth: number of poolings (the paper: 4).
        padding: "same" (output size = input size) or "valid" (the paper: unpadded convs).
        up: "transpose" (the paper's 2x2 up-convolution) or "interp" (bi/trilinear + 1x1 conv).
        norm: None (the paper), "batch" or "instance" (both affine).
        dropout: probability of the dropout layer at the end of the contracting path (the paper
            uses 0.5); element-wise, like the paper's Caffe layer.
        max_width: cap on the channels of the deepest levels (nnU-Net caps 3D networks at 320);
            None doubles at every level as in the paper.

    Shapes:
        input (B, C, *S) -> logits (B, K, *self.output_size(S)). ``forward`` raises ValueError
        naming the nearest valid size when S is not a valid input size.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 2, width: int = 64, depth: int = 4,
                 padding: str = "same", up: str = "transpose", norm: str | None = "batch",
                 dropout: float = 0.0, max_width: int | None = None):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
        if up not in UPS:
            raise ValueError(f"up must be one of {UPS}, not {up!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        if min(in_channels, num_classes, width, depth) < 1:
            raise ValueError("in_channels, num_classes, width and depth must be positive integers")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        L = layers(dims)
        self.in_channels, self.dims, self.depth, self.padding = in_channels, dims, depth, padding
        widths = [min(width * 2**i, max_width or width * 2**i) for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], dims, padding, norm)
        self.downs = nn.ModuleList(Down(a, b, dims, padding, norm) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(Up(b, a, dims, padding, norm, up)
                                 for a, b in zip(reversed(widths[:-1]), reversed(widths[1:])))
        self.outc = L.conv(widths[0], num_classes, 1)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: Any) -> UNet:
        """The network a :class:`useg.plan.ModelConfig` describes, freshly initialised.

        ``cfg`` is any object with the ModelConfig fields (the constructor's arguments): the
        model does not import the plan, which imports the model's size rules.
        """
        return cls(cfg.in_channels, cfg.num_classes, dims=cfg.dims, width=cfg.width, depth=cfg.depth,
                   padding=cfg.padding, up=cfg.up, norm=cfg.norm, dropout=cfg.dropout,
                   max_width=cfg.max_width)

    def reset_parameters(self) -> None:
        """He initialisation: normal with std sqrt(2/N), N = inputs of one unit; zero biases.

        The paper (Sec. 3) gives N = 9 * 64 for a 3x3 conv on 64 channels. For the 2x2 stride-2
        up-convolution each output unit sees one kernel tap per input channel, so N = cin.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                taps = math.prod(max(1, k // s) for k, s in zip(m.kernel_size, m.stride))
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / (m.in_channels * taps)))
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, *out) for images (B, C, *S); see the class docstring."""
        if not torch.jit.is_tracing():  # shape checks would be frozen into a trace as constants
            if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
                raise ValueError(f"expected a (B, {self.in_channels}, {'D, ' if self.dims == 3 else ''}H, W) "
                                 f"tensor, got {tuple(x.shape)}")
            check_size(tuple(x.shape[2:]), self.depth, self.padding)
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial size for an input size (raises ValueError if the input is not valid)."""
        return output_size(size, self.depth, self.padding)

    def valid_input_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The smallest valid input size >= ``size`` on every axis."""
        return valid_input_size(size, self.depth, self.padding)

    def input_size_for_output(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The smallest valid input whose output is >= ``size`` on every axis."""
        return input_size_for_output(size, self.depth, self.padding)


def center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the trailing ``len(size)`` dims of ``x`` at the centre to ``size``.

    Args:
        x: (..., *S) any tensor, e.g. features (B, C, *S) or targets (B, *S).
        size: the wanted trailing size T, T <= S on every axis.

    Returns:
        A view (..., *T); the extra pixels are split evenly, the odd one taken from the end.
    """
    n = len(size)
    spatial = x.shape[max(x.dim() - n, 0):]
    if not torch.jit.is_tracing():  # under a trace the sizes are tensors: keep the slicing symbolic
        if n > x.dim() or any(s < t for s, t in zip(spatial, size)):
            raise ValueError(f"cannot centre-crop a tensor of shape {tuple(x.shape)} to the trailing size "
                             f"{tuple(size)}")
    index = [slice(None)] * (x.dim() - n)
    index += [slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(spatial, size)]
    return x[tuple(index)]


def _check_args(depth: int, padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
    if depth < 1:
        raise ValueError(f"depth must be a positive integer, not {depth!r}")


def _output_1d(n: int, depth: int, padding: str) -> int | None:
    """Output length of one axis, or None when the input length is not valid."""
    if padding == "same":
        return n if n > 0 and n % 2**depth == 0 else None
    for _ in range(depth):  # contracting path: two 3x3 valid convs, then a 2x pool
        n -= 4
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= 4  # the bottom block
    if n <= 0:
        return None
    for _ in range(depth):  # expanding path: 2x up-conv, then two 3x3 valid convs
        n = 2 * n - 4
    return n if n > 0 else None  # once non-positive it stays so: checking the end suffices


def _next_valid_1d(n: int, depth: int, padding: str) -> int:
    n = max(int(n), 1)
    while _output_1d(n, depth, padding) is None:
        n += 1
    return n


def check_size(size: tuple[int, ...], depth: int, padding: str) -> None:
    """Raise ValueError naming the nearest larger valid size when ``size`` is not a valid input."""
    _check_args(depth, padding)
    if any(_output_1d(int(s), depth, padding) is None for s in size):
        rule = (f"a multiple of {2**depth}" if padding == "same"
                else f"at least {_next_valid_1d(1, depth, padding)} and even at every pooling "
                     f"after the 4 px each conv pair loses")
        raise ValueError(f"input size {tuple(size)} is not valid for depth {depth} with {padding} padding "
                         f"(each size must be {rule}); the nearest larger valid size is "
                         f"{valid_input_size(size, depth, padding)}")


def output_size(input_size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """Output spatial size of a U-Net for ``input_size`` (572 -> 388 for the paper's net).

    Raises:
        ValueError: when the input size is not valid, naming the nearest larger valid size.
    """
    check_size(tuple(input_size), depth, padding)
    return tuple(int(_output_1d(int(s), depth, padding)) for s in input_size)


def valid_input_size(size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """The smallest valid input size >= ``size`` on every axis.

    Same padding needs a multiple of ``2**depth``; valid (unpadded) convolutions need a size whose
    feature maps stay even before every pooling (the paper's 572 -> 388 tile).

    Examples:
        >>> valid_input_size((500, 512), depth=4, padding="same")
        (512, 512)
        >>> valid_input_size((500,), depth=4, padding="valid")
        (508,)
    """
    _check_args(depth, padding)
    return tuple(_next_valid_1d(s, depth, padding) for s in size)


def input_size_for_output(size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """The smallest valid input whose output is >= ``size`` on every axis (overlap-tile planning)."""
    _check_args(depth, padding)
    out = []
    for s in size:
        n = _next_valid_1d(1, depth, padding)
        while _output_1d(n, depth, padding) < s:  # the output grows with the valid input
            n = _next_valid_1d(n + 1, depth, padding)
        out.append(n)
    return tuple(out)


def valid_sizes(depth: int, padding: str, max_size: int) -> list[int]:
    """All valid 1-D input sizes up to ``max_size``, ascending."""
    _check_args(depth, padding)
    return [n for n in range(1, int(max_size) + 1) if _output_1d(n, depth, padding) is not None]
