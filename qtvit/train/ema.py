"""Exponential moving average of the weights with EfficientViT's warm-up (docs/DESIGN.md §recipe).

timm's :class:`~timm.utils.ModelEmaV3` does the averaging (parameters and buffers, in place,
foreach); only the decay schedule differs: EfficientViT uses

    decay(step) = decay · (1 − exp(−step / warmup_steps))

so the average starts as a copy of the model and forgets its random initialisation within a few
thousand steps, instead of timm's power-law warm-up.
"""

from __future__ import annotations

import math

import torch.nn as nn
from timm.utils import ModelEmaV3


def ema_decay(step: int, decay: float, warmup_steps: int | None) -> float:
    """The decay applied at optimizer step ``step`` (0-based: the number of steps before this one)."""
    if not warmup_steps:
        return decay
    return decay * (1.0 - math.exp(-step / warmup_steps))


class WarmupEma(ModelEmaV3):
    """:class:`timm.utils.ModelEmaV3` with :func:`ema_decay` as its schedule.

    Args:
        model: the (unwrapped) model to average; it is deep-copied.
        decay: the asymptotic decay (0.9998 in the paper).
        warmup_steps: the warm-up time constant (4000 in the paper); ``None`` for a constant decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup_steps: int | None = 4000) -> None:
        super().__init__(model, decay=decay)
        self.warmup_steps = warmup_steps

    def get_decay(self, step: int | None = None) -> float:
        return self.decay if step is None else ema_decay(step, self.decay, self.warmup_steps)
