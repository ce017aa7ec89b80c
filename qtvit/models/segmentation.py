"""Semantic segmentation models on QT-ViT / EfficientViT backbones: UperNet and EfficientViT's SegHead.

Two heads, registered with qtvit's registry (``qtvit.create_model``):

``qtvit_{1..6}_upernet_ade20k``
    UperNet as trained in the QT-ViT paper's ADE20K table: a pyramid pooling module (pool scales
    1, 2, 3, 6) on the stride-32 stage and an FPN over all four stages (strides 4/8/16/32), 512
    channels, dropout 0.1 before the 1×1 classifier, 150 classes. The head is
    ``segmentation_models_pytorch``'s ``UPerNet`` (imported only when such a model is built) on the
    timm registration of the qtvit backbone (``tu-qtvit_b1`` …). An auxiliary FCN head on the
    stride-16 stage (256 channels; training only) is optional (``aux_head=True``). Output: logits
    at stride 4.
``qtvit_{b0,1,2,3,4,5}_seghead_{ade20k,cityscapes}``
    EfficientViT's own light head: the stride-32/16/8 stages each go through a 1×1 conv + BN to
    the head width, are resized to stride 8 (bicubic, in float32) and summed; then ``depth``
    residual MBConv / FusedMBConv blocks, an optional 1×1 expansion (conv + BN + act) and a 1×1
    classifier with bias. Output: logits at stride 8. Widths per model and dataset follow
    EfficientViT's segmentation model zoo (:data:`SEGHEAD_CONFIGS`).

Every builder takes the backbone's options (``kernel``, ``ape``, ``shortcut``, ``drop_path_rate``,
``img_size`` …): ``kernel="relu", ape=False, shortcut=False`` is the EfficientViT twin of the same
size. ``backbone_checkpoint=`` starts the backbone from an ImageNet classification checkpoint in any
layout :func:`qtvit.models.load_checkpoint` reads (the classifier head is dropped);
``sync_bn=True`` converts every BatchNorm to ``SyncBatchNorm`` for multi-GPU training.

Forward contract (both heads): ``model(x)`` with x (B, 3, H, W), H and W multiples of 32, returns
logits (B, classes, H / s, W / s) with s = ``model.output_stride``; in training mode with an
auxiliary head it returns ``(logits, aux_logits)``. Other sizes: pad with
:func:`qtvit.tasks.segmentation.inference.pad_to_multiple` (the padding stays outside the model,
so exported graphs have no data-dependent pads) and resize the logits to the label size before
the argmax or the loss (``qtvit.tasks.segmentation`` does both).

``num_classes``: the dataset's by default (150 ADE20K, 19 Cityscapes). ``qtvit.create_model``
passes the classification default 1000 when the caller gives none; these builders read 1000 as
"not given" too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.blocks import ConvNormAct, FusedMBConv, MBConv, ResidualBlock, get_act_layer
from .efficientvit import CONFIGS, EfficientViT
from .registry import ModelCard, create_model, register_model

Tensor = torch.Tensor

DATASET_CLASSES = {"ade20k": 150, "cityscapes": 19}
_CLASSIFICATION_DEFAULT = 1000  # what qtvit.create_model passes when the caller names no class count
SIZE_OF_INDEX = {1: "b1", 2: "b2", 3: "b3", 4: "l1", 5: "l2", 6: "l3"}  # QT-ViT-k = EfficientViT size
DIVISOR = 32  # the backbone's total stride: inputs must be multiples of it

# EfficientViT SegHead per (backbone size, dataset): head width, depth, middle block, its expansion,
# final expansion (None: no expansion layer), activation, BatchNorm eps. The input channels are
# the backbone's stride-32/16/8 widths.
SEGHEAD_CONFIGS: dict[tuple[str, str], dict] = {
    ("b0", "cityscapes"): dict(width=32, depth=1, block="mbconv", expand=4, final_expand=4,
                               act="hardswish", eps=1e-5),
    ("b1", "cityscapes"): dict(width=64, depth=3, block="mbconv", expand=4, final_expand=4,
                               act="hardswish", eps=1e-5),
    ("b1", "ade20k"): dict(width=64, depth=3, block="mbconv", expand=4, final_expand=None,
                           act="hardswish", eps=1e-5),
    ("b2", "cityscapes"): dict(width=96, depth=3, block="mbconv", expand=4, final_expand=4,
                               act="hardswish", eps=1e-5),
    ("b2", "ade20k"): dict(width=96, depth=3, block="mbconv", expand=4, final_expand=None,
                           act="hardswish", eps=1e-5),
    ("b3", "cityscapes"): dict(width=128, depth=3, block="mbconv", expand=4, final_expand=4,
                               act="hardswish", eps=1e-5),
    ("b3", "ade20k"): dict(width=128, depth=3, block="mbconv", expand=4, final_expand=None,
                           act="hardswish", eps=1e-5),
    ("l1", "cityscapes"): dict(width=256, depth=3, block="fused", expand=1, final_expand=None,
                               act="gelu_tanh", eps=1e-7),
    ("l1", "ade20k"): dict(width=128, depth=3, block="fused", expand=4, final_expand=8,
                           act="gelu_tanh", eps=1e-7),
    ("l2", "cityscapes"): dict(width=256, depth=5, block="fused", expand=1, final_expand=None,
                               act="gelu_tanh", eps=1e-7),
    ("l2", "ade20k"): dict(width=128, depth=3, block="fused", expand=4, final_expand=8,
                           act="gelu_tanh", eps=1e-7),
}


class SegHead(nn.Module):
    """EfficientViT's segmentation head: [s8, s16, s32] features → logits at stride 8.

    Args:
        in_channels: channels of the (stride-8, stride-16, stride-32) inputs.
        num_classes: output channels.
        width: head width (every input is projected to it).
        depth: residual middle blocks.
        block: ``"mbconv"`` (full-norm MBConv) or ``"fused"`` (FusedMBConv).
        expand: the middle blocks' expansion ratio.
        final_expand: 1×1 conv + BN + act to ``width * final_expand`` before the classifier (None: none).
        act: activation name (see :func:`qtvit.layers.get_act_layer`).
        eps: BatchNorm eps.
        dropout: dropout before the classifier.

    Shapes: [(B, C8, H/8, W/8), (B, C16, H/16, W/16), (B, C32, H/32, W/32)] → (B, classes, H/8, W/8).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int, depth: int,
                 block: str = "mbconv", expand: float = 4.0, final_expand: float | None = None,
                 act: str = "hardswish", eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        if block not in ("mbconv", "fused"):
            raise ValueError(f"unknown SegHead block {block!r}; valid: mbconv, fused")
        if len(in_channels) != 3:
            raise ValueError(f"SegHead takes the stride-8/16/32 features: 3 channel counts, "
                             f"got {in_channels!r}")
        norm = partial(nn.BatchNorm2d, eps=eps)
        act_layer = get_act_layer(act)
        self.in_channels = tuple(in_channels)
        self.inputs = nn.ModuleList(ConvNormAct(c, width, 1, norm_layer=norm) for c in in_channels)
        make = MBConv if block == "mbconv" else FusedMBConv
        self.middle = nn.Sequential(*[
            ResidualBlock(make(width, width, 1, expand, norm_layer=norm, act_layer=act_layer))
            for _ in range(depth)])
        out = width
        if final_expand:
            out = round(width * final_expand)
            self.expand = ConvNormAct(width, out, 1, norm_layer=norm, act_layer=act_layer)
        else:
            self.expand = nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(out, num_classes, 1, bias=True)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        x = None
        for proj, f in zip(self.inputs, features, strict=True):
            y = proj(f)
            if y.shape[-2:] != size:
                # bicubic in float32 (as EfficientViT; half-precision bicubic is not implemented everywhere)
                y = F.interpolate(y.float(), size=size, mode="bicubic", align_corners=False).to(y.dtype)
            x = y if x is None else x + y
        x = self.expand(self.middle(x))
        return self.classifier(self.dropout(x))


class EfficientViTSeg(nn.Module):
    """An EfficientViT/QT-ViT backbone (classification head removed) + :class:`SegHead`.

    ``backbone.forward_intermediates`` gives the stride-8/16/32 stages; logits come out at stride 8.
    """

    output_stride = 8

    def __init__(self, backbone: EfficientViT, head: SegHead) -> None:
        super().__init__()
        backbone.head = nn.Identity()  # classification head unused (and not counted)
        self.backbone = backbone
        self.head = head
        self.num_classes = head.classifier.out_channels

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        features = self.backbone.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
        return self.head(features)


class FCNHead(nn.Module):
    """mmseg's auxiliary FCN head: 3×3 conv + BN + ReLU, dropout 0.1, 1×1 classifier.

    (B, C, h, w) → (B, classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 3, act_layer=partial(nn.ReLU, inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetSeg(nn.Module):
    """``segmentation_models_pytorch.UPerNet`` on a qtvit backbone, + optional auxiliary FCN head.

    Attributes:
        net: the smp model (``net.encoder.model`` is timm's feature wrapper around the backbone).
        aux_head: :class:`FCNHead` on the stride-16 stage, or None. Used in training mode only
            (``forward`` then returns ``(logits, aux_logits)``); never counted on the model cards.
    """

    output_stride = 4

    def __init__(self, net: nn.Module, num_classes: int, aux_head: bool = False) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        channels = net.encoder.out_channels  # [3, 0, C4, C8, C16, C32]
        self.aux_head = FCNHead(channels[-2], num_classes) if aux_head else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        _check_input(x)
        features = self.net.encoder(x)  # [x, empty, s4, s8, s16, s32]
        logits = self.net.segmentation_head(self.net.decoder(features))
        if self.aux_head is not None and self.training:
            return logits, self.aux_head(features[-2])
        return logits


def _check_input(x: Tensor) -> None:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        H, W = x.shape[-2:]
        if H % DIVISOR or W % DIVISOR:
            raise ValueError(f"input size {H}×{W} is not a multiple of {DIVISOR}: pad it first "
                             f"(qtvit.tasks.segmentation.pad_to_multiple) and crop the logits back")


# ------------------------------------------------------------------------------ backbone checkpoint
def load_backbone_checkpoint(backbone: EfficientViT, checkpoint, *, trust_pickle: bool = False,
                             allow_missing_qt: bool = False, use_ema: bool = False) -> None:
    """Fill ``backbone`` (head removed or not) from an ImageNet classification checkpoint.

    Any layout :func:`qtvit.models.load_checkpoint` reads; the checkpoint's classification head
    is ignored, every backbone tensor must be present (strict), and an EfficientViT checkpoint
    fills a QT backbone with ``allow_missing_qt=True``.
    """
    from .checkpoint import convert_state_dict, load_checkpoint, read_state_dict

    sd = convert_state_dict(read_state_dict(checkpoint, trust_pickle, use_ema=use_ema))
    own = backbone.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.") or k in own}
    load_checkpoint(backbone, sd, strict=True, allow_missing_qt=allow_missing_qt)


def _copy_into_feature_net(source: nn.Module, features: nn.Module) -> None:
    """Copy a backbone's weights into timm's ``features_only`` wrapper of the same backbone.

    timm flattens the module tree (``stem.in_conv`` → ``stem_in_conv`` …) but keeps the order,
    so tensors pair up by position; every pair is checked by shape and by name with dots and
    underscores equated.
    """
    src = [(k, v) for k, v in source.state_dict().items() if not k.startswith("head.")]
    dst = list(features.state_dict().items())
    canon = lambda k: k.replace("_", ".")  # noqa: E731
    if len(src) != len(dst) or any(canon(a) != canon(b) or va.shape != vb.shape
                                   for (a, va), (b, vb) in zip(src, dst, strict=True)):
        raise RuntimeError("backbone and its timm feature wrapper disagree on their tensors; "
                           "cannot copy the backbone checkpoint")
    features.load_state_dict({b: va for (_, va), (b, _) in zip(src, dst, strict=True)})


# ------------------------------------------------------------------------------ builders
def _classes(num_classes: int | None, dataset: str) -> int:
    if num_classes is None or num_classes == _CLASSIFICATION_DEFAULT:
        return DATASET_CLASSES[dataset]
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes


def _finish(model: nn.Module, sync_bn: bool) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


def build_seghead(size: str, dataset: str, num_classes: int | None = None, *, kernel: str = "qt",
                  ape: bool = True, shortcut: bool = True, drop_path_rate: float = 0.0, dropout: float = 0.0,
                  backbone_checkpoint=None, trust_pickle: bool = False, allow_missing_qt: bool = False,
                  sync_bn: bool = False, **backbone_kwargs) -> EfficientViTSeg:
    """EfficientViT-``size`` backbone (any kernel) + the SegHead configured for ``dataset``."""
    if (size, dataset) not in SEGHEAD_CONFIGS:
        valid = ", ".join(f"{s}/{d}" for s, d in SEGHEAD_CONFIGS)
        raise ValueError(f"no SegHead configuration for {size}/{dataset}; valid: {valid}")
    backbone = create_model(f"qtvit_{size}", num_classes=0, kernel=kernel, ape=ape, shortcut=shortcut,
                            drop_path_rate=drop_path_rate, **backbone_kwargs)
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(backbone, backbone_checkpoint, trust_pickle=trust_pickle,
                                 allow_missing_qt=allow_missing_qt)
    widths = [info["num_chs"] for info in backbone.feature_info[1:]]  # strides 8, 16, 32
    head = SegHead(widths, _classes(num_classes, dataset), dropout=dropout, **SEGHEAD_CONFIGS[size, dataset])
    return _finish(EfficientViTSeg(backbone, head), sync_bn)


def build_upernet(size: str, num_classes: int | None = None, *, dataset: str = "ade20k", kernel: str = "qt",
                  ape: bool = True, shortcut: bool = True, drop_path_rate: float = 0.0,
                  channels: int = 512, dropout: float = 0.1, aux_head: bool = False,
                  backbone_checkpoint=None, trust_pickle: bool = False, allow_missing_qt: bool = False,
                  sync_bn: bool = False, **backbone_kwargs) -> UperNetSeg:
    """UperNet (segmentation_models_pytorch) on the QT-ViT/EfficientViT-``size`` backbone."""
    try:
        import segmentation_models_pytorch as smp
        import timm  # noqa: F401  (registers qtvit's backbones with timm: smp's "tu-" encoders)
    except ImportError as err:
        raise ImportError(f"UperNet models need segmentation_models_pytorch and timm "
                          f"(pip install 'qtvit[seg]'): {err}") from err
    classes = _classes(num_classes, dataset)
    backbone_opts = dict(kernel=kernel, ape=ape, shortcut=shortcut, drop_path_rate=drop_path_rate,
                         **backbone_kwargs)
    with warnings.catch_warnings():  # smp warns that tu- encoders ignore encoder_depth-style options
        warnings.simplefilter("ignore", UserWarning)
        net = smp.UPerNet(encoder_name=f"tu-qtvit_{size}", encoder_weights=None, decoder_channels=channels,
                          classes=classes, upsampling=1, **backbone_opts)
    if dropout > 0:  # mmseg's UPerHead drops channels before its 1×1 classifier
        net.segmentation_head.insert(0, nn.Dropout2d(dropout))
    if backbone_checkpoint is not None:
        source = create_model(f"qtvit_{size}", num_classes=0, **backbone_opts)
        load_backbone_checkpoint(source, backbone_checkpoint, trust_pickle=trust_pickle,
                                 allow_missing_qt=allow_missing_qt)
        _copy_into_feature_net(source, net.encoder.model)
    return _finish(UperNetSeg(net, classes, aux_head=aux_head), sync_bn)


# ------------------------------------------------------------------------------ registration
# Cards: params with the default kernel/APE/shortcut and the dataset's classes, and the exact MACs of
# one 224×224 image (``macs_224``, the registry's convention; the heads' MACs grow with the pixels);
# tests recount both.
# The EfficientViT twins (kernel="relu", ape=False, shortcut=False) are listed in TWIN_PARAMS.
def _seg_cfg(dataset: str, classes: int) -> dict:
    return dict(input_size=(3, 512, 512) if dataset == "ade20k" else (3, 1024, 2048), num_classes=classes,
                interpolation="bilinear", crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="backbone.stem.in_conv.conv", classifier="head.classifier", task="segmentation",
                dataset=dataset)


UPERNET_CARDS = {  # k: (params, MACs of one 3×224×224 image); QT-ViT-k, 150 classes, no auxiliary head
    1: (32_756_125, 40_659_048_448),
    2: (44_275_376, 41_773_146_624),
    3: (69_732_773, 44_204_189_184),
    4: (68_019_388, 45_485_759_488),
    5: (79_172_798, 47_177_041_920),
    6: (228_121_310, 67_857_944_576),
}
SEGHEAD_CARDS: dict[tuple[str, str], tuple[int, int]] = {  # (params, MACs at 224×224), dataset's classes
    ("b0", "cityscapes"): (782_087, 104_993_280),
    ("b1", "cityscapes"): (5_054_554, 600_406_016),
    ("b1", "ade20k"): (5_042_525, 591_273_984),
    ("b2", "cityscapes"): (15_851_277, 1_761_403_392),
    ("b2", "ade20k"): (15_820_880, 1_738_071_552),
    ("b3", "cityscapes"): (40_657_826, 4_287_112_704),
    ("b3", "ade20k"): (40_600_869, 4_243_158_528),
    ("l1", "cityscapes"): (40_543_673, 6_758_255_616),
    ("l1", "ade20k"): (40_710_972, 6_955_146_240),
    ("l2", "cityscapes"): (53_009_851, 9_477_142_528),
    ("l2", "ade20k"): (51_864_382, 8_646_428_672),
}
# EfficientViT twins (kernel="relu", ape=False, shortcut=False), 150 classes: the QT-ViT paper's Table 6
# prints 32.50 / 43.75 / 68.68 M for the three UperNets (B1's 32.505 M printed as 32.50).
TWIN_PARAMS = {"qtvit_1_upernet_ade20k": 32_505_014, "qtvit_2_upernet_ade20k": 43_747_878,
               "qtvit_3_upernet_ade20k": 68_678_102}


def _register_upernet(k: int) -> None:
    size = SIZE_OF_INDEX[k]
    params, macs = UPERNET_CARDS[k]
    card = ModelCard(params=params or None, macs_224=macs or None, paper_name=f"QT-ViT-{k} + UperNet",
                     pretrained_cfg=_seg_cfg("ade20k", 150))

    def builder(num_classes: int | None = None, **kwargs) -> UperNetSeg:
        return build_upernet(size, num_classes, **kwargs)

    builder.__name__ = f"qtvit_{k}_upernet_ade20k"
    builder.__doc__ = (f"QT-ViT-{k} (EfficientViT-{size.upper()} size) + UperNet for ADE20K (150 classes); "
                       f"kwargs: see build_upernet.")
    register_model(builder.__name__, aliases=(f"qtvit_{size}_upernet_ade20k",), card=card)(builder)


def _register_seghead(size: str, dataset: str) -> None:
    k = next((i for i, s in SIZE_OF_INDEX.items() if s == size), None)
    name = f"qtvit_{k}_seghead_{dataset}" if k else f"qtvit_{size}_seghead_{dataset}"
    aliases = (f"qtvit_{size}_seghead_{dataset}",) if k else ()
    params, macs = SEGHEAD_CARDS.get((size, dataset), (0, 0))
    paper = f"QT-ViT-{k} + SegHead" if k else f"QT-ViT-{size.upper()} + SegHead"
    card = ModelCard(params=params or None, macs_224=macs or None, paper_name=paper,
                     pretrained_cfg=_seg_cfg(dataset, DATASET_CLASSES[dataset]))

    def builder(num_classes: int | None = None, **kwargs) -> EfficientViTSeg:
        return build_seghead(size, dataset, num_classes, **kwargs)

    builder.__name__ = name
    builder.__doc__ = (f"QT-ViT backbone of EfficientViT-{size.upper()} size + EfficientViT's SegHead for "
                       f"{dataset} ({DATASET_CLASSES[dataset]} classes); kwargs: see build_seghead.")
    register_model(name, aliases=aliases, card=card)(builder)


DEMO_BACKBONE = dict(widths=(8, 16, 24, 48, 64), depths=(0, 1, 1, 1, 1), head_dim=8)
DEMO_PARAMS, DEMO_MACS = 146_030, 34_035_008  # 4 classes; MACs at 224×224


@register_model("qtvit_seg_demo", card=ModelCard(params=DEMO_PARAMS, macs_224=DEMO_MACS, pretrained_cfg=dict(
    input_size=(3, 32, 128), num_classes=4, task="segmentation", dataset="synthetic")))
def qtvit_seg_demo(num_classes: int | None = None, *, kernel: str = "qt", ape: bool = False,
                   shortcut: bool = False, drop_path_rate: float = 0.0, img_size=(32, 128),
                   **kwargs) -> EfficientViTSeg:
    """A narrow B-style backbone (one block per stage, widths 8…64, head dim 8) + a one-block SegHead:
    the CPU demo on the synthetic cue set (4 classes, 32×128 images); ~0.15 M parameters."""
    classes = 4 if num_classes in (None, _CLASSIFICATION_DEFAULT) else num_classes
    backbone = EfficientViT(**DEMO_BACKBONE, num_classes=0, kernel=kernel, ape=ape, shortcut=shortcut,
                            drop_path_rate=drop_path_rate, img_size=img_size, **kwargs)
    head = SegHead([i["num_chs"] for i in backbone.feature_info[1:]], classes, width=32, depth=1, expand=2)
    return EfficientViTSeg(backbone, head)


for _k in SIZE_OF_INDEX:
    _register_upernet(_k)
for _size, _dataset in SEGHEAD_CONFIGS:
    _register_seghead(_size, _dataset)

assert set(SIZE_OF_INDEX.values()) <= set(CONFIGS)

__all__ = ["DATASET_CLASSES", "SEGHEAD_CONFIGS", "TWIN_PARAMS", "EfficientViTSeg", "FCNHead", "SegHead",
           "UperNetSeg", "build_seghead", "build_upernet", "load_backbone_checkpoint"]


def segmentation_models() -> list[str]:
    """Names of the registered segmentation models."""
    from .registry import list_models

    return [n for n in list_models() if "_upernet_" in n or "_seghead_" in n or n == "qtvit_seg_demo"]
