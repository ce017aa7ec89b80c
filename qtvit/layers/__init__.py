"""Building blocks: kernel attention for token sequences, and the EfficientViT/QT-ViT blocks."""

from .attention import KernelAttention, KernelParams

__all__ = ["KernelAttention", "KernelParams"]
