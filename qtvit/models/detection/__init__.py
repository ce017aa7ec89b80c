"""Detectors with QT-ViT / EfficientViT backbones: Cascade Mask R-CNN (the paper's COCO table) and
torchvision's Mask R-CNN, registered as ``qtvit_{1,2,3}_cascade_mask_rcnn_coco`` and
``qtvit_{1,2,3}_mask_rcnn_coco``.

torchvision's detection modules are imported only when a detector is built, so ``import qtvit``
stays light. Build by name (``num_classes`` counts object classes without background; 80 for COCO
by default — ``qtvit.create_model`` passes the classification default 1000 when the caller names no
class count, and these builders read 1000 as "not given")::

    model = qtvit.create_model("qtvit_1_cascade_mask_rcnn_coco")                  # QT-ViT-1, 57.85 M
    twin = qtvit.create_model("qtvit_1_cascade_mask_rcnn_coco", kernel="relu", ape=False,
                              shortcut=False)                                     # EfficientViT-B1, 57.60 M
    model = qtvit.create_model("qtvit_1_cascade_mask_rcnn_coco", backbone_checkpoint="qtvit_1.pt")

In eval mode a detector takes a list of (3, H, W) images in [0, 1] (any sizes) or a (B, 3, H, W)
batch and returns torchvision's format, one dict per image: ``boxes`` (n, 4) xyxy in input pixels,
``labels`` (n,) in 1..num_classes, ``scores`` (n,), ``masks`` (n, 1, H, W) probabilities. In train
mode ``model(images, targets)`` returns a dict of losses (sum them).
"""

from __future__ import annotations

from ..registry import ModelCard, register_model

ARCHS = ("cascade_mask_rcnn", "mask_rcnn")
# registry name → (backbone, paper name); the paper's Table 4 lists the cascade with these backbones
SIZES = {"1": ("qtvit_b1", "QT-ViT-1"), "2": ("qtvit_b2", "QT-ViT-2"), "3": ("qtvit_b3", "QT-ViT-3")}
# Parameter counts with 80 classes and the default (QT) backbone, checked by tests/test_det_models.py.
CLASSIFICATION_DEFAULT = 1000  # what qtvit.create_model passes when the caller names no class count
PARAMS = {
    ("cascade_mask_rcnn", "1"): 57_851_461, ("cascade_mask_rcnn", "2"): 68_522_360,
    ("cascade_mask_rcnn", "3"): 93_131_405,
    ("mask_rcnn", "1"): 24_927_548, ("mask_rcnn", "2"): 35_598_447, ("mask_rcnn", "3"): 60_207_492,
}


def build_detector(arch: str = "cascade_mask_rcnn", backbone: str = "qtvit_b1", num_classes: int = 80, *,
                   kernel: str = "qt", ape: bool = True, shortcut: bool = True, norm: str = "bn",
                   fpn_channels: int = 256, backbone_checkpoint=None, allow_missing_qt: bool = False,
                   drop_path_rate: float = 0.0, img_size: int = 224, **head_kwargs):
    """A detector on a QT-ViT/EfficientViT backbone + FPN.

    Args:
        arch: ``"cascade_mask_rcnn"`` or ``"mask_rcnn"``.
        backbone: a registered EfficientViT-family name (``qtvit_b0`` … ``qtvit_l3``).
        num_classes: object classes, background not counted (80 for COCO).
        kernel, ape, shortcut: the backbone's attention (``"relu"``, False, False: EfficientViT).
        norm: backbone BatchNorm: ``"bn"``, ``"frozen_bn"`` or ``"sync_bn"``.
        fpn_channels: FPN width (256).
        backbone_checkpoint: ImageNet classification checkpoint (any layout qtvit reads).
        allow_missing_qt: accept an EfficientViT checkpoint for a QT backbone.
        drop_path_rate, img_size: backbone options (``img_size``: the APE's stored grid).
        **head_kwargs: ``min_size``, ``max_size`` (input resizing), RPN options
            (``pre_nms_top_n_{train,test}``, ``post_nms_top_n_{train,test}``, ``rpn_nms_thresh``,
            ``anchor_sizes``, ``rpn_batch_size_per_image``) and RoI-head options
            (``representation``, ``mask_layers``, ``batch_size_per_image``, ``score_thresh``,
            ``box_nms_thresh``, ``detections_per_img``; for the cascade also ``iou_thresholds``,
            ``stage_loss_weights``, ``target_stds``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown detector architecture {arch!r}; valid: {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, background not counted), "
                         f"got {num_classes}")
    from .backbone import build_fpn_backbone
    from .cascade import build_cascade_mask_rcnn, build_mask_rcnn

    body = build_fpn_backbone(backbone, kernel=kernel, ape=ape, shortcut=shortcut, norm=norm,
                              out_channels=fpn_channels, backbone_checkpoint=backbone_checkpoint,
                              allow_missing_qt=allow_missing_qt, drop_path_rate=drop_path_rate,
                              img_size=img_size)
    build = build_cascade_mask_rcnn if arch == "cascade_mask_rcnn" else build_mask_rcnn
    model = build(body, num_classes, **head_kwargs)
    model.model_name = f"{arch}:{backbone}"
    model.num_classes = num_classes
    return model


def _register(arch: str, size: str) -> None:
    backbone, paper = SIZES[size]
    name = f"qtvit_{size}_{arch}_coco"
    kind = "Cascade Mask R-CNN" if arch == "cascade_mask_rcnn" else "Mask R-CNN"

    def builder(num_classes: int = 80, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
                **kwargs):
        if num_classes == CLASSIFICATION_DEFAULT:
            num_classes = 80
        return build_detector(arch, backbone, num_classes, kernel=kernel, ape=ape, shortcut=shortcut,
                              **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{kind} + FPN on {paper} ({backbone}) for COCO (80 classes); "
                       f"EfficientViT twin with kernel='relu', ape=False, shortcut=False.")
    card = ModelCard(params=PARAMS[arch, size], paper_name=f"{paper} {kind}",
                     pretrained_cfg=dict(task="detection", num_classes=80, min_size=800, max_size=1333))
    register_model(name, card=card)(builder)


for _arch in ARCHS:
    for _size in SIZES:
        _register(_arch, _size)

__all__ = ["ARCHS", "PARAMS", "SIZES", "build_detector"]
