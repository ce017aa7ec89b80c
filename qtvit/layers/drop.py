"""Stochastic depth (drop-path): drop a residual branch per sample during training.

timm's ``efficientvit_mit`` has none; the QT-ViT/EfficientViT recipe trains with a linearly
increasing rate (docs/DESIGN.md §recipe). Written here so the core needs torch alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Tensor = torch.Tensor


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> Tensor:
    """Zero the whole of ``x[b]`` with probability ``drop_prob`` for each sample b (training only).

    Kept samples are scaled by 1/(1 - drop_prob) so the expectation is unchanged.
    x: (B, ...) → same shape.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


__all__ = ["DropPath", "drop_path"]
