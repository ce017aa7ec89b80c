"""EfficientViT / QT-ViT blocks: residual wrapper, EfficientViT block, classification head.

Also re-exports the convolutional blocks, LiteMLA and DropPath, so every building block can be
imported from ``qtvit.layers.blocks`` (or ``qtvit.layers``).

Module names follow timm's ``efficientvit_mit`` (``main``, ``context_module``, ``local_module``,
``in_conv``, ``classifier.{0,1,4}``) so state-dict keys are timm's (docs/DESIGN.md §checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .conv import ActLayer, ConvNormAct, DSConv, FusedMBConv, MBConv, NormLayer, ResBlock, get_act_layer
from .drop import DropPath, drop_path
from .lite_mla import LiteMLA, ape_grid, resize_ape

Tensor = torch.Tensor


class ResidualBlock(nn.Module):
    """``x + drop_path(main(x))`` when ``shortcut``; just ``main(x)`` otherwise (the stride-2 entry blocks).

    Drop-path only applies with a shortcut: dropping a branch that is the whole output would
    zero the sample.
    """

    def __init__(self, main: nn.Module, shortcut: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        if drop_path and not shortcut:
            raise ValueError("drop_path needs a shortcut: without one the block's output would be dropped")
        self.main = main
        self.shortcut = nn.Identity() if shortcut else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is None:
            return self.main(x)
        return self.shortcut(x) + self.drop_path(self.main(x))


class EfficientViTBlock(nn.Module):
    """``x + LiteMLA(x)`` then ``x + MBConv(x)``: (B, C, H, W) → (B, C, H, W).

    No LayerNorm, layer-scale or 1/√d anywhere (as in EfficientViT). The FFN is a fewer-norm
    MBConv (biases on the first two convs, BN only on the projection).

    Args:
        channels: C.
        head_dim: d of LiteMLA.
        expand_ratio: FFN MBConv expansion (4 for B, 6 for L).
        drop_path: stochastic-depth rate of both residual branches.
        kernel, kernel_params, ape, ape_size, shortcut, impl, scales: see :class:`LiteMLA`.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int = 32,
        expand_ratio: float = 4.0,
        scales: tuple[int, ...] = (5,),
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
        kernel: str = "relu",
        kernel_params: dict | None = None,
        ape: bool = False,
        ape_size: tuple[int, int] | None = None,
        shortcut: bool = False,
        impl: str = "auto",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.context_module = ResidualBlock(
            LiteMLA(channels, channels, head_dim=head_dim, scales=scales, norm_layer=norm_layer,
                    kernel=kernel, kernel_params=kernel_params, ape=ape, ape_size=ape_size,
                    shortcut=shortcut, impl=impl),
            drop_path=drop_path,
        )
        self.local_module = ResidualBlock(
            MBConv(channels, channels, expand_ratio=expand_ratio, fewer_norm=True, norm_layer=norm_layer,
                   act_layer=act_layer),
            drop_path=drop_path,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


class ClsHead(nn.Module):
    """Classification head: 1×1 conv+BN+act → global avg pool → Linear+LayerNorm+act → dropout → Linear.

    (B, C, H, W) → (B, num_classes); ``pre_logits=True`` stops before the last Linear and returns
    (B, widths[1]). With ``num_classes=0`` the last Linear is an identity.
    """

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, int],
        num_classes: int = 1000,
        dropout: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.Hardswish,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(widths) != 2:
            raise ValueError(f"ClsHead needs two widths (conv, hidden), got {widths!r}")
        self.in_features = in_channels
        self.num_features = widths[1]  # the pre-logits width (timm's head_hidden_size)
        self.in_conv = ConvNormAct(in_channels, widths[0], 1, norm_layer=norm_layer, act_layer=act_layer)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=False),
            nn.LayerNorm(widths[1], eps=ln_eps),
            act_layer() if act_layer is not None else nn.Identity(),
            nn.Dropout(dropout),
            nn.Linear(widths[1], num_classes) if num_classes > 0 else nn.Identity(),
        )

    def reset(self, num_classes: int, reset_other: bool = False) -> None:
        """Replace the last Linear (random init) with ``num_classes`` outputs; 0 → identity.

        ``reset_other`` also removes ``in_conv`` and the hidden Linear/LayerNorm/act, so the head
        becomes pool → dropout → Linear on the backbone features (``num_features = in_features``).
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if reset_other:
            self.in_conv = nn.Identity()
            for i in range(3):
                self.classifier[i] = nn.Identity()
            self.num_features = self.in_features
        ref = next(self.parameters(), None)
        factory = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        new = nn.Linear(self.num_features, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.classifier[4] = new.train(self.classifier.training)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(self.in_conv(x)).flatten(1)  # (B, widths[0])
        # Linear, LayerNorm, act, dropout → (B, widths[1]) (literal indices: TorchScript needs them)
        x = self.classifier[3](self.classifier[2](self.classifier[1](self.classifier[0](x))))
        return x if pre_logits else self.classifier[4](x)


__all__ = [
    "ActLayer", "ClsHead", "ConvNormAct", "DSConv", "DropPath", "EfficientViTBlock", "FusedMBConv",
    "LiteMLA", "MBConv", "NormLayer", "ResBlock", "ResidualBlock", "ape_grid", "drop_path", "get_act_layer",
    "resize_ape",
]
