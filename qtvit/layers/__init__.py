"""Building blocks: kernel attention for token sequences, and the EfficientViT/QT-ViT blocks."""

from .attention import KernelAttention, KernelParams
from .blocks import (
    ClsHead,
    ConvNormAct,
    DropPath,
    DSConv,
    EfficientViTBlock,
    FusedMBConv,
    LiteMLA,
    MBConv,
    ResBlock,
    ResidualBlock,
    drop_path,
    get_act_layer,
    resize_ape,
)

__all__ = [
    "ClsHead", "ConvNormAct", "DSConv", "DropPath", "EfficientViTBlock", "FusedMBConv", "KernelAttention",
    "KernelParams", "LiteMLA", "MBConv", "ResBlock", "ResidualBlock", "drop_path", "get_act_layer",
    "resize_ape",
]
