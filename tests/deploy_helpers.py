"""Shared helpers of the deployment tests: models whose fusion cannot pass by accident."""

from __future__ import annotations

import torch
import torch.nn as nn

import qtvit


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, every APE and
    kernel constant a non-initial value (fusion of the initial 0/1 statistics is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith(".ape"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("kernel_params.const"):
                p.fill_(0.7)
    return model.eval()


def classification_models() -> list[str]:
    """Every registered classification model (canonical names, no aliases): the models whose card
    names no other task (segmentation and detection models carry ``task`` in their config)."""
    from qtvit.models.registry import get_model_card

    return [n for n in qtvit.list_models()
            if get_model_card(n).pretrained_cfg.get("task", "classification") == "classification"]
