"""The U-Net (Ronneberger, Fischer, Brox 2015) for 2D images and 3D volumes.

The network reads like the paper's Fig. 1: a contracting path of :class:`Down` blocks (2x max
pooling, then two 3x3 convolutions with ReLU), an expanding path of :class:`Up` blocks (a 2x2
up-convolution halving the channels, concatenation with the cropped skip feature map of the same
level, two 3x3 convolutions), and a final 1x1 convolution to the classes. With
``UNet(1, 2, width=64, depth=4, padding="valid", up="transpose", norm=None)`` it is exactly the
paper's network: 572x572 in, 388x388 out, 23 convolutional layers, 31,030,658 parameters.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
import torch.nn.functional as F

PADDINGS = ("same", "valid")
UPS = ("transpose", "interp")
NORMS = (None, "batch", "instance")


def layers(dims: int) -> SimpleNamespace:
    """The layer classes for 2D or 3D networks."""
    if dims == 2:
        return SimpleNamespace(conv=nn.Conv2d, up=nn.ConvTranspose2d, pool=nn.MaxPool2d,
                               batch=nn.BatchNorm2d, instance=nn.InstanceNorm2d, drop=nn.Dropout2d,
                               mode="bilinear")
    if dims == 3:
        return SimpleNamespace(conv=nn.Conv3d, up=nn.ConvTranspose3d, pool=nn.MaxPool3d,
                               batch=nn.BatchNorm3d, instance=nn.InstanceNorm3d, drop=nn.Dropout3d,
                               mode="trilinear")
    raise ValueError(f"dims must be 2 or 3, not {dims!r}")


class DoubleConv(nn.Sequential):
    """Two (3x3 conv -> [norm] -> ReLU); "valid" convs lose 2 px per side per block."""

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None):
        L = layers(dims)
        pad = 1 if padding == "same" else 0
        mods: list[nn.Module] = []
        for c in (cin, cout):
            mods.append(L.conv(c, cout, 3, padding=pad, bias=norm is None))
            if norm == "batch":
                mods.append(L.batch(cout))
            elif norm == "instance":
                mods.append(L.instance(cout, affine=True))
            mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


class Down(nn.Sequential):
    """2x max pooling, then a :class:`DoubleConv`: one step down the contracting path."""

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None):
        super().__init__(layers(dims).pool(2), DoubleConv(cin, cout, dims, padding, norm))


class Up(nn.Module):
    """Up-convolution halving the channels, concatenation with the skip, :class:`DoubleConv`."""

    def __init__(self, cin: int, cout: int, dims: int, padding: str, norm: str | None, up: str):
        super().__init__()
        L = layers(dims)
        if up == "transpose":
            self.up = L.up(cin, cin // 2, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode=L.mode, align_corners=False),
                                    L.conv(cin, cin // 2, 1))
        self.conv = DoubleConv(cin // 2 + cout, cout, dims, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # "valid" convs shrink the expanding path, so the skip is cropped to it (paper, Fig. 1).
        return self.conv(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))


class UNet(nn.Module):
    """U-Net for 2D (``dims=2``) or 3D (``dims=3``) segmentation.

    Args:
        in_channels: image channels C.
        num_classes: output classes K (background included).
        dims: 2 or 3.
        width: channels at the first level; level i has ``width * 2**i``.
        depth: number of poolings (the paper: 4).
        padding: "same" (output size = input size) or "valid" (the paper: unpadded convs).
        up: "transpose" (the paper's 2x2 up-convolution) or "interp" (bi/trilinear + 1x1 conv).
        norm: None (the paper), "batch" or "instance".
        dropout: dropout probability at the end of the contracting path (the paper: 0.5).

    Shapes:
        input (B, C, *S) -> logits (B, K, *self.output_size(S)).
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 2, width: int = 64, depth: int = 4,
                 padding: str = "same", up: str = "transpose", norm: str | None = "batch",
                 dropout: float = 0.0):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
        if up not in UPS:
            raise ValueError(f"up must be one of {UPS}, not {up!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        if in_channels < 1 or num_classes < 1 or width < 1 or depth < 1:
            raise ValueError("in_channels, num_classes, width and depth must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, dims=dims, width=width,
                           depth=depth, padding=padding, up=up, norm=norm, dropout=dropout)
        self.dims, self.depth, self.padding = dims, depth, padding
        L = layers(dims)
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], dims, padding, norm)
        self.downs = nn.ModuleList(Down(a, b, dims, padding, norm) for a, b in zip(widths, widths[1:]))
        self.dropout = L.drop(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(Up(b, a, dims, padding, norm, up) for a, b in zip(widths[::-1][1:], widths[::-1]))
        self.outc = L.conv(widths[0], num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation (std sqrt(2/N), N = inputs of one unit), as the paper recommends."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # ConvTranspose weights are (in, out, k...): fan_in is then the first dimension.
                mode = "fan_out" if isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) else "fan_in"
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a (B, C, {'D, ' if self.dims == 3 else ''}H, W) tensor, got {tuple(x.shape)}")
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
    """Crop the trailing ``len(size)`` dims of ``x`` at the centre to ``size``."""
    spatial = x.shape[-len(size):]
    if any(s < t for s, t in zip(spatial, size)):
        raise ValueError(f"cannot crop {tuple(spatial)} to the larger {tuple(size)}")
    index = [slice(None)] * (x.dim() - len(size))
    index += [slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(spatial, size)]
    return x[tuple(index)]


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
    return n if n > 0 else None


def _next_valid_1d(n: int, depth: int, padding: str) -> int:
    n = max(n, 1)
    while _output_1d(n, depth, padding) is None:
        n += 1
    return n


def check_size(size: tuple[int, ...], depth: int, padding: str) -> None:
    """Raise ValueError naming the nearest valid size when ``size`` is not a valid input."""
    if any(_output_1d(s, depth, padding) is None for s in size):
        rule = (f"a multiple of {2**depth}" if padding == "same"
                else "even before every pooling after the 4-px loss of each valid conv block")
        raise ValueError(f"input size {tuple(size)} is not valid for depth {depth} with {padding} padding "
                         f"(each size must be {rule}); the nearest larger valid size is "
                         f"{valid_input_size(size, depth, padding)}")


def output_size(input_size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """Output spatial size of a U-Net for ``input_size`` (572 -> 388 for the paper's net).

    Raises:
        ValueError: when the input size is not valid, naming the nearest valid size.
    """
    check_size(tuple(input_size), depth, padding)
    return tuple(int(_output_1d(s, depth, padding)) for s in input_size)


def valid_input_size(size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """The smallest valid input size >= ``size`` on every axis."""
    return tuple(_next_valid_1d(int(s), depth, padding) for s in size)


def input_size_for_output(size: tuple[int, ...], depth: int, padding: str) -> tuple[int, ...]:
    """The smallest valid input whose output is >= ``size`` on every axis."""
    out = []
    for s in size:
        n = _next_valid_1d(1, depth, padding)
        while _output_1d(n, depth, padding) < s:
            n = _next_valid_1d(n + 1, depth, padding)
        out.append(n)
    return tuple(out)


def valid_sizes(depth: int, padding: str, max_size: int) -> list[int]:
    """All valid 1-D input sizes up to ``max_size``."""
    return [n for n in range(1, max_size + 1) if _output_1d(n, depth, padding) is not None]
