"""Batch-norm statistics re-estimation before evaluation (docs/DESIGN.md §recipe: on 16k training images).

Multi-resolution training leaves running statistics that mix four resolutions (and an EMA
model's statistics are an average of the model's, not statistics *of* the averaged weights).
Before evaluation the statistics are recomputed exactly: the network runs in eval mode (no
dropout or drop-path) on training images at the evaluation resolution, each BN layer in train
mode with ``momentum=None``, i.e. a plain average over batches of the batch statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor], max_images: int,
                  info: DistInfo | None = None, channels_last: bool = False) -> int:
    """Recompute every BatchNorm's running mean/var of ``model`` in place; return the images used.

    Args:
        model: the network (left in the train/eval mode it came in).
        batches: input batches (already on the model's device); consumed until ``max_images``
            images have been seen on this process.
        max_images: images per process (the caller divides the global budget by the world size).
        info: the process group; statistics are averaged over ranks so all ranks agree.
        channels_last: convert inputs to channels-last memory format.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns or max_images <= 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over batches
        m.train()
    seen = 0
    try:
        for x in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            seen += x.shape[0]
            if seen >= max_images:
                break
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if info is not None and info.distributed:
        for m in bns:  # equal shares per rank: the mean of the per-rank averages is the global one
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    all_reduce_sum(buf, info).div_(info.world_size)
    return seen
