"""Convolutional building blocks of EfficientViT (docs/DESIGN.md §blocks).

Submodule names follow timm's ``efficientvit_mit`` (``conv``/``norm``/``act``, ``depth_conv``,
``point_conv``, ``inverted_conv``, ``spatial_conv``, ``conv1``/``conv2``) so the state-dict keys
are timm's, and the official checkpoints map onto them by a prefix rename.

Shapes: every block maps (B, C_in, H, W) → (B, C_out, ⌈H/s⌉, ⌈W/s⌉) for stride s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

Tensor = torch.Tensor
# A factory for a norm layer taking the channel count (e.g. ``partial(nn.BatchNorm2d, eps=1e-7)``),
# or None for no norm.
NormLayer = Callable[[int], nn.Module]
# A factory for an activation module taking no arguments, or None for no activation.
ActLayer = Callable[[], nn.Module]

_ACTS: dict[str, ActLayer] = {
    "hardswish": nn.Hardswish,
    "hswish": nn.Hardswish,
    # EfficientViT-L's "gelu" is the tanh approximation (official act.py and timm's GELUTanh).
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
}


def get_act_layer(act: str | ActLayer | None) -> ActLayer | None:
    """Resolve an activation by name (``hardswish``, ``gelu_tanh``, ``gelu``, ``relu``, ``relu6``,
    ``silu``) or pass a factory through. Unknown names raise ``ValueError`` listing the valid ones."""
    if act is None or callable(act):
        return act
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}; valid: {', '.join(_ACTS)}")
    return _ACTS[act]


class ConvNormAct(nn.Module):
    """Conv2d (padding k//2, so stride s gives ⌈H/s⌉) → norm → act. (B, C_in, H, W) → (B, C_out, H', W').

    ``norm`` and ``act`` are ``nn.Identity`` when absent, as in timm, so key names never move.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=bias)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class DSConv(nn.Module):
    """Depthwise-separable conv (B stem): 3×3 depthwise (stride s) + norm + act → 1×1 + norm, no act."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.depth_conv = ConvNormAct(in_channels, in_channels, kernel_size, stride, groups=in_channels,
                                      norm_layer=norm_layer, act_layer=act_layer)
        self.point_conv = ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    """Inverted bottleneck: 1×1 expand (mid = round(C_in·expand)) → 3×3 depthwise (stride s) → 1×1 project.

    Full-norm form (default): BN after all three convs, no biases. ``fewer_norm=True`` (B stage-3/4
    entry blocks, all L stage-3/4 MBConvs, the FFN of every EfficientViT block): the first two
    convs carry a bias instead of a norm, only the projection has BN. The projection never has an
    activation (it feeds a residual sum or the next stage).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        kernel_size: int = 3,
        fewer_norm: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        inner_norm = None if fewer_norm else norm_layer
        self.inverted_conv = ConvNormAct(in_channels, mid, 1, bias=fewer_norm, norm_layer=inner_norm,
                                         act_layer=act_layer)
        self.depth_conv = ConvNormAct(mid, mid, kernel_size, stride, groups=mid, bias=fewer_norm,
                                      norm_layer=inner_norm, act_layer=act_layer)
        self.point_conv = ConvNormAct(mid, out_channels, 1, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    """Fused inverted bottleneck (L stages 1–2): full 3×3 conv C_in → mid (stride s) + BN + act → 1×1 + BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        kernel_size: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.spatial_conv = ConvNormAct(in_channels, mid, kernel_size, stride, norm_layer=norm_layer,
                                        act_layer=act_layer)
        self.point_conv = ConvNormAct(mid, out_channels, 1, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.spatial_conv(x))


class ResBlock(nn.Module):
    """Two 3×3 convs (L stem; timm's ``ConvBlock``): conv1 (stride s) + BN + act → conv2 + BN, no act."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expand_ratio: float = 1.0,
        kernel_size: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.conv1 = ConvNormAct(in_channels, mid, kernel_size, stride, norm_layer=norm_layer,
                                 act_layer=act_layer)
        self.conv2 = ConvNormAct(mid, out_channels, kernel_size, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


__all__ = ["ActLayer", "ConvNormAct", "DSConv", "FusedMBConv", "MBConv", "NormLayer", "ResBlock",
           "get_act_layer"]
