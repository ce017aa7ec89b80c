"""Multiply-accumulate counting (what the paper calls FLOPs), attention matmuls included.

Uses ``torch.utils.flop_counter.FlopCounterMode``: it counts convolutions (grouped ones
correctly), linear layers and every matmul/bmm — so the kernel's φ(K)ᵀV and φ(Q)·(KV) products
are counted — and ignores element-wise work (norms, activations, the kernel's feature maps),
as MAC tables in the literature do. MACs = FLOPs / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224), by_module: bool = False
               ) -> int | tuple[int, dict[str, int]]:
    """MACs of one eval-mode forward pass of ``model`` on a zero tensor of ``input_size``.

    The input is created on the model's device and dtype; a model built under
    ``torch.device("meta")`` is counted without allocating or computing anything.

    Args:
        model: any module taking one image tensor.
        input_size: (B, C, H, W); MACs scale with B.
        by_module: also return MACs per module name (top-level and nested, as FlopCounterMode reports).

    Returns:
        total MACs (int), or ``(total, {module name: MACs})`` when ``by_module``.
    """
    if len(input_size) != 4 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"input_size must be (B, C, H, W) with positive sizes, got {tuple(input_size)}")
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros(tuple(int(s) for s in input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops() // 2
    if not by_module:
        return total
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return total, per_module


__all__ = ["count_macs"]
