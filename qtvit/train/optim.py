"""Which parameters get weight decay.

Two rules (``optim.decay_rule``):

* ``authors`` (default, the released QT-ViT/EfficientViT recipe): every parameter is decayed
  except biases and the affine parameters of normalisation layers. The authors select by name
  ("norm"/"bias" not in the parameter's name), and in their naming the APE
  (``positional_encoding``), the kernel constant (``ones_scale1``) and the value shortcut's
  BatchNorm (``bn``) do not match, so those *are* decayed — we follow that by module type, which
  does not depend on how our modules happen to be named.
* ``timm``: timm's usual grouping — no decay on any tensor with ≤ 1 dimension (norms, biases,
  scalars) nor on the model's ``no_weight_decay()`` names (the APEs).
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

DECAY_RULES = ("authors", "timm")
_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _value_shortcut_norms(model: nn.Module) -> set[int]:
    """ids of the LiteMLA value-shortcut norms (``v_norm``): the authors decay their weights."""
    return {id(m.v_norm) for m in model.modules() if getattr(m, "v_norm", None) is not None}


def param_groups(model: nn.Module, weight_decay: float, rule: str = "authors") -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0}]``."""
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown weight-decay rule {rule!r}; valid: {', '.join(DECAY_RULES)}")
    decay, no_decay = [], []
    if rule == "timm":
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    else:
        shortcut = _value_shortcut_norms(model)
        for module in model.modules():
            is_norm = isinstance(module, _NORMS) and id(module) not in shortcut
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["DECAY_RULES", "param_groups"]
