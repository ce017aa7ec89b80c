"""EfficientViT and QT-ViT (docs/DESIGN.md §architecture): one class, seven registered sizes at the bottom.

QT-ViT-1..6 are EfficientViT-B1, B2, B3, L1, L2, L3 with the ``qt`` kernel in every LiteMLA, a
zero-initialised APE on the keys and the GELU(BN(v)) shortcut. ``kernel="relu", ape=False,
shortcut=False`` gives EfficientViT of the same size exactly (timm's state-dict layout).

Module tree (= timm's ``efficientvit_*`` keys, docs/DESIGN.md §checkpoints):
    stem.in_conv, stem.res{k}                      stride 2
    stages.{i}.blocks.{j}, i = 0..3                 strides 4, 8, 16, 32; block 0 = stride-2 entry
    head.in_conv, head.classifier.{0,1,4}
B-style stages: 0–1 MBConv (expand 4), 2–3 a fewer-norm MBConv entry then EfficientViT blocks.
L-style stages: 0–1 FusedMBConv (entry expand 16), 2 fewer-norm MBConv (entry 16), 3 MBConv
entry (expand 24) then EfficientViT blocks with FFN expand 6. Attention lives in the
EfficientViT blocks only.

Shapes: x (B, 3, H, W) → stage i features (B, widths[i+1], ⌈H/2^(i+2)⌉, ⌈W/2^(i+2)⌉)
        → logits (B, classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..layers.blocks import (
    ActLayer,
    ClsHead,
    ConvNormAct,
    DropPath,
    DSConv,
    EfficientViTBlock,
    FusedMBConv,
    LiteMLA,
    MBConv,
    ResBlock,
    ResidualBlock,
    get_act_layer,
)
from ..layers.lite_mla import ape_grid
from .registry import ModelCard, register_model

Tensor = torch.Tensor

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
STYLES = ("b", "l")
# L-style expansion ratios (official EfficientViTLargeBackbone): stage-entry blocks expand 4× the
# stage's ratio, i.e. 16 for the FusedMBConv/MBConv stages and 24 for the attention stage's entry;
# the attention stage's FFN expands 6.
L_ENTRY_EXPAND = (16.0, 16.0, 16.0, 24.0)
L_FFN_EXPAND = 6.0


def _linear_rates(rate: float, n: int) -> list[float]:
    """rate·(i+1)/n for i < n: every residual gets some drop-path, the deepest the full rate
    (the EfficientViT trainer's linear decay)."""
    return [rate * (i + 1) / n for i in range(n)]


def _take_indices(n: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Stage indices to return (timm semantics: None = all, int k = last k, sequence = those)."""
    if indices is None:
        take = list(range(n))
    elif isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: need 1 ≤ k ≤ {n} (the last k of {n} stages)")
        take = list(range(n - indices, n))
    else:
        take = [i + n if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take, strict=True) if not 0 <= t < n]
        if bad or not take:
            raise ValueError(f"indices={list(indices)}: stage indices must be in [-{n}, {n}) and non-empty")
    return take, max(take)


def _check_pool(global_pool: str, num_classes: int) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: EfficientViT's head supports 'avg' or '' "
                         "(no pooling)")
    if global_pool == "" and num_classes:
        raise ValueError("global_pool='' returns unpooled features, which have no classifier: "
                         "use num_classes=0")


class Stem(nn.Sequential):
    """3×3 stride-2 conv + BN + act (``in_conv``), then residual blocks ``res0..`` (DSConv for B,
    ResBlock for L). A Sequential so timm's ``flatten_sequential`` feature extraction sees it."""

    def __init__(self, in_chans: int, width: int, depth: int, style: str, norm_layer, act_layer,
                 stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.add_module("in_conv", ConvNormAct(in_chans, width, 3, stride, norm_layer=norm_layer,
                                               act_layer=act_layer))
        block = DSConv if style == "b" else ResBlock
        for k in range(depth):
            main = block(width, width, norm_layer=norm_layer, act_layer=act_layer)
            self.add_module(f"res{k}", ResidualBlock(main))


class EfficientViTStage(nn.Module):
    """One stride-2 stage: ``blocks[0]`` downsamples (no shortcut), the rest keep the shape."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class EfficientViT(nn.Module):
    """EfficientViT backbone + classification head, with the attention kernel, APE and shortcut configurable.

    Args:
        widths: channels of (stem, stage 1..4), e.g. (16, 32, 64, 128, 256) for B1.
        depths: blocks per (stem, stage 1..4) as in the EfficientViT configs (B stages 1–2 count
            the entry block, B stages 3–4 and all L stages count blocks after it).
        head_dim: d of every LiteMLA (heads = width // d).
        head_widths: (conv width, hidden width) of the classification head.
        style: ``"b"`` (EfficientViT-B layout) or ``"l"`` (EfficientViT-L layout).
        act_layer: ``"hardswish"`` (B), ``"gelu_tanh"`` (L), another name, or a module factory.
        norm_eps: eps of every BatchNorm and of the head LayerNorm (1e-5 for B, 1e-7 for L).
        expand_ratio: MBConv expansion (B everywhere; L inside the non-attention stages).
        kernel: attention kernel name (``"qt"`` = QT-ViT, ``"relu"`` = EfficientViT).
        kernel_params: the kernel's parameters (e.g. ``{"pool": 4}`` for ``taylor2_pool``).
        ape: learnable absolute positional embedding on the keys.
        shortcut: GELU(BN(v)) shortcut in every LiteMLA.
        attn_impl: ``"auto"``, ``"linear"`` or ``"dense"`` for :func:`qtvit.attention`.
        drop_path_rate: stochastic depth; every identity residual gets rate·(i+1)/n in depth order.
        drop_rate: dropout before the final Linear.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pre-logits).
        img_size: training resolution, int or (H, W): fixes the grid the APE is stored at.
        strides: stride (1 or 2) of the stem and of stage 1..4's entry block; the default halves
            the resolution five times (attention at strides 16 and 32). Small study models at
            small images use 1s to give attention a finer token grid.
        in_chans: input channels.
        global_pool: ``"avg"`` (as EfficientViT) or ``""``: no pooling, ``forward_head`` returns the
            head conv's unpooled map (B, head_widths[0], h, w) (timm's convention; needs num_classes=0).
    """

    __jit_unused_properties__ = ["default_cfg"]  # TorchScript: a Python-only alias

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        depths: Sequence[int] = (1, 2, 3, 3, 4),
        head_dim: int = 16,
        head_widths: Sequence[int] = (1536, 1600),
        *,
        style: str = "b",
        act_layer: str | ActLayer = "hardswish",
        norm_eps: float = 1e-5,
        expand_ratio: float = 4.0,
        kernel: str = "qt",
        kernel_params: dict | None = None,
        ape: bool = True,
        shortcut: bool = True,
        attn_impl: str = "auto",
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        global_pool: str = "avg",
        strides: Sequence[int] = (2, 2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 entries (stem, stage 1..4); "
                             f"got {widths!r}, {depths!r}")
        if len(strides) != 5 or any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides needs 5 entries (stem, stage 1..4), each 1 or 2; got {strides!r}")
        _check_pool(global_pool, num_classes)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        attn_stages = (2, 3) if style == "b" else (3,)
        for i in attn_stages:
            if widths[i + 1] % head_dim:
                raise ValueError(f"stage {i + 1} width {widths[i + 1]} is not a multiple of "
                                 f"head_dim={head_dim}")
        act = get_act_layer(act_layer)
        norm = partial(nn.BatchNorm2d, eps=norm_eps)
        self.style = style
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grad_checkpointing = False
        self.pretrained_cfg: dict = {}

        self.stem = Stem(in_chans, widths[0], depths[0], style, norm, act, stride=strides[0])
        stages, self.feature_info, stride, c_in = [], [], self.stem.stride, widths[0]
        for i in range(4):
            step = strides[i + 1]
            stride *= step
            c_out, depth = widths[i + 1], depths[i + 1]
            if i in attn_stages:
                entry_expand = expand_ratio if style == "b" else L_ENTRY_EXPAND[i]
                ffn_expand = expand_ratio if style == "b" else L_FFN_EXPAND
                grid = ape_grid(self.img_size, stride)
                entry = MBConv(c_in, c_out, step, entry_expand, fewer_norm=True, norm_layer=norm,
                               act_layer=act)
                blocks = [ResidualBlock(entry, shortcut=False)]
                blocks += [EfficientViTBlock(c_out, head_dim, ffn_expand, norm_layer=norm, act_layer=act,
                                             kernel=kernel, kernel_params=kernel_params, ape=ape,
                                             ape_size=grid, shortcut=shortcut, impl=attn_impl)
                           for _ in range(depth)]
            elif style == "b":  # depth counts the entry block
                blocks = [ResidualBlock(MBConv(c_in if j == 0 else c_out, c_out, step if j == 0 else 1,
                                               expand_ratio, norm_layer=norm, act_layer=act), shortcut=j > 0)
                          for j in range(depth)]
            else:  # L stages 1–2 fused, stage 3 fewer-norm MBConv; depth counts blocks after the entry
                fused = i < 2
                blocks = []
                for j in range(depth + 1):
                    e, s, cin = (L_ENTRY_EXPAND[i], step, c_in) if j == 0 else (expand_ratio, 1, c_out)
                    main = (FusedMBConv(cin, c_out, s, e, norm_layer=norm, act_layer=act) if fused else
                            MBConv(cin, c_out, s, e, fewer_norm=True, norm_layer=norm, act_layer=act))
                    blocks.append(ResidualBlock(main, shortcut=j > 0))
            stages.append(EfficientViTStage(blocks))
            self.feature_info.append(dict(num_chs=c_out, reduction=stride, module=f"stages.{i}"))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.num_features = c_in
        self.head = ClsHead(c_in, tuple(head_widths), num_classes, drop_rate, norm_layer=norm, act_layer=act,
                            ln_eps=norm_eps)
        self.head_hidden_size = self.head.num_features
        self._set_drop_path(drop_path_rate)

    # ------------------------------------------------------------------ configuration
    def _set_drop_path(self, rate: float) -> None:
        """Give every identity-shortcut residual (stem, stages; both branches of an EfficientViT
        block count separately) the rate rate·(i+1)/n, in depth order."""
        sites = [m for m in self.modules() if isinstance(m, ResidualBlock) and m.shortcut is not None]
        for block, p in zip(sites, _linear_rates(rate, len(sites)), strict=True):
            block.drop_path = DropPath(p) if p > 0 else nn.Identity()

    @property
    def default_cfg(self) -> dict:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every stage block in backward (activation memory O(one block) per stage)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_attention_impl(self, impl: str) -> None:
        """Set ``impl`` (``"auto"``/``"linear"``/``"dense"``) of every LiteMLA."""
        for m in self.modules():
            if isinstance(m, LiteMLA):
                m.impl = impl

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters to exclude from weight decay: the APEs and the kernels' learnable scalars."""
        return {n for n, _ in self.named_parameters() if n.endswith(".ape") or ".kernel_params." in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay (timm convention)."""
        blocks = r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        return dict(stem=r"^stem", blocks=blocks)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.classifier[4]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None,
                         reset_other: bool = False) -> None:
        """New final Linear with ``num_classes`` outputs (0: identity). ``reset_other`` also drops the
        head's conv and hidden Linear/LayerNorm/act, leaving pool → classifier on the backbone features."""
        _check_pool(self.global_pool if global_pool is None else global_pool, num_classes)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.reset(num_classes, reset_other=reset_other)
        self.head_hidden_size = self.head.num_features

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (timm's fx feature extraction): no shapes
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        H, W = x.shape[-2:]
        side = self.feature_info[-1]["reduction"]  # the total stride: below it the last map is padding only
        if H < side or W < side:
            raise ValueError(f"input size {H}×{W} is too small: this EfficientViT needs at least "
                             f"{side}×{side} (multiples of {side} are exact; others are padded)")

    @torch.jit.ignore
    def _run_stage(self, stage: EfficientViTStage, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in stage.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) → (B, num_features, ⌈H/32⌉, ⌈W/32⌉)."""
        if not torch.jit.is_scripting():  # Python-side checks (TorchScript skips them)
            self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for stage in self.stages:
                x = self._run_stage(stage, x)
            return x
        return self.stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, num_features, h, w) → logits (B, num_classes), or (B, head_hidden_size) if ``pre_logits``;
        with ``global_pool=""`` the head conv's unpooled map (B, C, h, w)."""
        if self.global_pool == "":
            return self.head.in_conv(x)
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs at strides 4/8/16/32 (timm interface; works under grad checkpointing).

        Args:
            indices: stages to return: None = all four, int k = the last k, or a sequence.
            norm: accepted for the interface; EfficientViT has no final norm, so it changes nothing.
            stop_early: stop after the last requested stage (the returned final x is then that stage's).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return just the list.

        Returns:
            ``[(B, C_i, H_i, W_i), ...]``, or ``(final features, list)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take, last = _take_indices(len(self.stages), indices)
        if not torch.jit.is_scripting():  # Python-side checks (TorchScript skips them)
            self._check_input(x)
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(self.stages):
            if stop_early and i > last:
                break
            x = self._run_stage(stage, x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one (and the head), for feature extraction."""
        take, last = _take_indices(len(self.stages), indices)
        pruned_end = last < len(self.stages) - 1
        self.stages = self.stages[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if pruned_end:
            self.num_features = self.feature_info[last]["num_chs"]
            self.head.in_features = self.num_features
        if prune_head or pruned_end:
            self.reset_classifier(0, reset_other=True)
        return take


# ---------------------------------------------------------------------------------- spec sheet
# (widths stem,s1..s4), (depths), head dim, head widths, style, act, norm eps — docs/DESIGN.md §models.
CONFIGS: dict[str, dict] = {
    "b0": dict(widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2), head_dim=16, head_widths=(1024, 1280),
               style="b", act_layer="hardswish", norm_eps=1e-5),
    "b1": dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16, head_widths=(1536, 1600),
               style="b", act_layer="hardswish", norm_eps=1e-5),
    "b2": dict(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), head_dim=32, head_widths=(2304, 2560),
               style="b", act_layer="hardswish", norm_eps=1e-5),
    "b3": dict(widths=(32, 64, 128, 256, 512), depths=(1, 4, 6, 6, 9), head_dim=32, head_widths=(2304, 2560),
               style="b", act_layer="hardswish", norm_eps=1e-5),
    "l1": dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 6), head_dim=32, head_widths=(3072, 3200),
               style="l", act_layer="gelu_tanh", norm_eps=1e-7),
    "l2": dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 8, 8), head_dim=32, head_widths=(3072, 3200),
               style="l", act_layer="gelu_tanh", norm_eps=1e-7),
    "l3": dict(widths=(64, 128, 256, 512, 1024), depths=(1, 2, 2, 8, 8), head_dim=32,
               head_widths=(6144, 6400), style="l", act_layer="gelu_tanh", norm_eps=1e-7),
}

# Parameter counts of the ReLU / no-APE / no-shortcut variants (= EfficientViT, docs/DESIGN.md §models).
EFFICIENTVIT_PARAMS = {"b0": 3_410_008, "b1": 9_102_024, "b2": 24_330_712, "b3": 48_646_056,
                       "l1": 52_654_088, "l2": 63_707_016, "l3": 246_037_288}


def _pretrained_cfg(size: str) -> dict:
    return dict(
        architecture=f"qtvit_{size}", input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.95 if size == "b1" else 1.0,  # DESIGN.md §recipe: eval crop 0.95 for B1, 1.0 otherwise
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_classes=1000, first_conv="stem.in_conv.conv", classifier="head.classifier.4",
    )


def _card(size: str, params: int, macs: int, paper_gmacs: float | None, top1: float | None,
          top5: float | None, paper_name: str | None) -> ModelCard:
    return ModelCard(params=params, macs_224=macs, paper_gmacs_224=paper_gmacs, top1=top1, top5=top5,
                     paper_name=paper_name, pretrained_cfg=_pretrained_cfg(size))


# size: params and MACs of one 224×224 image, both exact (``qtvit models --recount``; tests recount
# them), then the paper's GMACs ("FLOPs" there), top-1, top-5 and name. B0 is not in the paper.
CARDS: dict[str, ModelCard] = {
    "b0": _card("b0", 3_485_404, 100_157_952, None, None, None, None),
    "b1": _card("b1", 9_353_135, 518_963_712, 0.52, 79.6, 94.7, "QT-ViT-1"),
    "b2": _card("b2", 24_858_210, 1_584_411_136, 1.60, 82.5, 95.9, "QT-ViT-2"),
    "b3": _card("b3", 49_700_727, 3_952_768_512, 3.97, 83.9, 96.7, "QT-ViT-3"),
    "l1": _card("l1", 52_955_534, 5_258_178_560, 5.26, 84.7, 96.7, "QT-ViT-4"),
    "l2": _card("l2", 64_108_944, 6_949_460_992, 6.96, 85.2, 97.0, "QT-ViT-5"),
    "l3": _card("l3", 246_840_624, 27_585_722_368, 27.60, 86.0, 97.3, "QT-ViT-6"),
}


def _build(size: str, num_classes: int, kernel: str, ape: bool, shortcut: bool, drop_path_rate: float,
           **kwargs) -> EfficientViT:
    cfg = {**CONFIGS[size], **kwargs}
    model = EfficientViT(num_classes=num_classes, kernel=kernel, ape=ape, shortcut=shortcut,
                         drop_path_rate=drop_path_rate, **cfg)
    # a model built for another resolution is evaluated at that resolution (timm's convention)
    model.pretrained_cfg = {**_pretrained_cfg(size), "input_size": (3, *model.img_size),
                            "num_classes": num_classes}
    return model


@register_model("qtvit_b0", card=CARDS["b0"])
def qtvit_b0(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """EfficientViT-B0 size with QT attention (not in the paper)."""
    return _build("b0", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_b1", aliases=("qtvit_1",), card=CARDS["b1"])
def qtvit_b1(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-1: EfficientViT-B1 with QT attention."""
    return _build("b1", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_b2", aliases=("qtvit_2",), card=CARDS["b2"])
def qtvit_b2(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-2: EfficientViT-B2 with QT attention."""
    return _build("b2", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_b3", aliases=("qtvit_3",), card=CARDS["b3"])
def qtvit_b3(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-3: EfficientViT-B3 with QT attention."""
    return _build("b3", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_l1", aliases=("qtvit_4",), card=CARDS["l1"])
def qtvit_l1(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-4: EfficientViT-L1 with QT attention."""
    return _build("l1", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_l2", aliases=("qtvit_5",), card=CARDS["l2"])
def qtvit_l2(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-5: EfficientViT-L2 with QT attention."""
    return _build("l2", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


@register_model("qtvit_l3", aliases=("qtvit_6",), card=CARDS["l3"])
def qtvit_l3(num_classes: int = 1000, kernel: str = "qt", ape: bool = True, shortcut: bool = True,
             drop_path_rate: float = 0.0, **kwargs) -> EfficientViT:
    """QT-ViT-6: EfficientViT-L3 with QT attention."""
    return _build("l3", num_classes, kernel, ape, shortcut, drop_path_rate, **kwargs)


__all__ = ["CARDS", "CONFIGS", "EFFICIENTVIT_PARAMS", "EfficientViT", "EfficientViTStage", "Stem"] + [
    f"qtvit_{s}" for s in CONFIGS]
