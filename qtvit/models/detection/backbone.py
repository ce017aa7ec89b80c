"""QT-ViT / EfficientViT feature pyramid for detection: backbone stages 1–4 → FPN (5 levels).

The backbone is the classification model without its head (``forward_intermediates``): four
maps at strides 4/8/16/32. torchvision's :class:`FeaturePyramidNetwork` turns them into 256-channel
maps ``"0".."3"`` plus ``"pool"`` (stride 64, a stride-2 max-pool of the coarsest output), the
five levels of mmdet's ``FPN(num_outs=5)`` without extra convolutions.

Shapes: images (B, 3, H, W) → {"0": (B, C, H/4, W/4), ..., "3": (B, C, H/32, W/32),
"pool": (B, C, H/64, W/64)} with C = ``out_channels`` (sizes rounded up).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ...errors import QtvitError
from ..checkpoint import convert_state_dict, load_checkpoint, read_state_dict
from ..efficientvit import EfficientViT
from ..registry import create_model

NORMS = ("bn", "frozen_bn", "sync_bn")


class QtvitFPN(nn.Module):
    """``body`` (an :class:`EfficientViT` without head) followed by an FPN.

    Attributes:
        body: the backbone; its state-dict keys are the classification model's minus ``head.*``.
        fpn: torchvision's FPN (lateral 1×1 and output 3×3 convolutions with bias).
        out_channels: channels of every pyramid level (torchvision's detectors read this).
    """

    def __init__(self, body: EfficientViT, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        in_channels = [info["num_chs"] for info in body.feature_info]  # e.g. B1: 32, 64, 128, 256
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        stages = self.body.forward_intermediates(images, intermediates_only=True)  # strides 4..32
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(stages)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d holding its statistics and affine
    parameters (as buffers: the statistics and scale stop training), in place; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def load_backbone_checkpoint(body: EfficientViT, checkpoint, allow_missing_qt: bool = False,
                             trust_pickle: bool = False) -> None:
    """Load an ImageNet classification checkpoint (any layout qtvit reads) into a head-less ``body``.

    The classification head (``head.*``) is dropped; every other tensor must fit (strict), except the
    QT-ViT extras when ``allow_missing_qt`` (an EfficientViT checkpoint into a QT backbone). APEs
    trained at another resolution are resized to the body's grid.
    """
    sd = convert_state_dict(read_state_dict(checkpoint, trust_pickle=trust_pickle))
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if not sd:
        raise QtvitError(f"backbone checkpoint {checkpoint}: no backbone tensors (only a head?)")
    load_checkpoint(body, sd, strict=True, allow_missing_qt=allow_missing_qt)


def build_fpn_backbone(backbone: str = "qtvit_b1", *, kernel: str = "qt", ape: bool = True,
                       shortcut: bool = True, norm: str = "bn", out_channels: int = 256,
                       backbone_checkpoint=None, allow_missing_qt: bool = False,
                       drop_path_rate: float = 0.0, img_size: int = 224, **backbone_kwargs) -> QtvitFPN:
    """An EfficientViT-family backbone by registry name plus FPN.

    Args:
        backbone: a registered EfficientViT/QT-ViT name (``qtvit_b1`` = ``qtvit_1``, ...).
        kernel, ape, shortcut: as for classification (``"relu"``, False, False: EfficientViT).
        norm: ``"bn"`` (BatchNorm trained with the detector), ``"frozen_bn"`` (statistics and affine
            frozen at the checkpoint's values) or ``"sync_bn"`` (synchronised across DDP ranks).
        out_channels: FPN width (256 as in mmdet).
        backbone_checkpoint: ImageNet classification checkpoint (path or state dict, any layout).
        allow_missing_qt: accept an EfficientViT checkpoint for a QT backbone (QT extras at init).
        drop_path_rate: stochastic depth in the backbone.
        img_size: the grid the APE is stored at (the classification resolution); inputs of any
            size resize it at run time.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    body = create_model(backbone, num_classes=0, kernel=kernel, ape=ape, shortcut=shortcut,
                        drop_path_rate=drop_path_rate, img_size=img_size, **backbone_kwargs)
    if not isinstance(body, EfficientViT):
        raise ValueError(f"backbone {backbone!r} is not an EfficientViT/QT-ViT model")
    body.prune_intermediate_layers(4)  # keep all four stages, drop the classification head
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(body, backbone_checkpoint, allow_missing_qt=allow_missing_qt)
    if norm == "frozen_bn":
        freeze_batchnorm(body)
    elif norm == "sync_bn":
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    return QtvitFPN(body, out_channels)
