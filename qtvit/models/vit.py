"""A plain Vision Transformer whose attention kernel is chosen by name (any of ``qtvit.list_kernels()``).

For small-scale kernel studies and for users who want QT attention in a standard ViT. The module
names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1/attn/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``), so a timm ViT state dict of the
same shape loads unchanged, and with ``kernel="softmax"`` gives timm's logits.

Shape legend:
    B batch, C embed dim, (gh, gw) patch grid = (H/p, W/p), P = gh·gw patches,
    T = P + 1 tokens with the class token (P with global average pooling), K classes.

The learned position embedding covers the grid of ``img_size``; inputs of another size (any
multiple of the patch size, square or not) use a bicubic resize of it, and loading a state dict
trained at another resolution resizes it at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layers.attention import KernelAttention
from ..layers.drop import DropPath
from .registry import ModelCard, register_model

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GLOBAL_POOLS = ("token", "avg", "")  # "": no pooling, the head sees every token (timm's convention)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    h, w = x
    return int(h), int(w)


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1) -> Tensor:
    """Bicubically resize a learned position embedding to another patch grid.

    (1, prefix + gh·gw, C) → (1, prefix + gh'·gw', C). The prefix (class token) rows are kept.
    Interpolation runs in float32 with antialiasing (it matters when shrinking), as timm does.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = grid.shape[-1]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(
            f"pos_embed has {grid.shape[1]} grid tokens, which is not the grid {old_grid[0]}×{old_grid[1]}")
    grid = grid.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, C).to(pos_embed.dtype)  # (1, gh'·gw', C)
    return torch.cat([prefix, grid], dim=1)


def check_patch_multiple(x: Tensor, patch_size: int) -> None:
    """Raise a one-line ValueError unless the image's H and W are multiples of the patch size."""
    H, W = x.shape[-2], x.shape[-1]
    if H % patch_size or W % patch_size:
        raise ValueError(f"input size {H}×{W} is not a multiple of the patch size {patch_size}")


def pos_embed_for_grid(pos_embed: Tensor, grid_size: tuple[int, int], x: Tensor,
                       num_prefix_tokens: int) -> Tensor:
    """The position embedding for patch grid x (B, gh, gw, C): stored one, or resized to (gh, gw)."""
    gh, gw = x.shape[1], x.shape[2]
    if gh == grid_size[0] and gw == grid_size[1]:
        return pos_embed
    return resize_pos_embed(pos_embed, grid_size, (gh, gw), num_prefix_tokens)


# torch.fx.symbolic_trace (timm's and torchvision's feature extractors): these size-dependent helpers
# become single graph nodes instead of failing on symbolic shapes.
torch.fx.wrap("check_patch_multiple")
torch.fx.wrap("pos_embed_for_grid")


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → C channels: (B, 3, H, W) → (B, gh, gw, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        check_patch_multiple(x, self.patch_size)
        return self.proj(x).permute(0, 2, 3, 1)  # (B, gh, gw, C)


class Mlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout: (B, T, C) → (B, T, C)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))). (B, T, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0, kernel: str = "qt", impl: str = "auto",
                 **kernel_params) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # timm's ViT eps, so its weights give its logits
        self.attn = KernelAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, kernel=kernel,
                                    impl=impl, **kernel_params)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Plain ViT (DeiT-style) with kernel attention.

    Args:
        img_size: training resolution (int or (H, W)); sets the position-embedding grid.
        patch_size: patch side p; inputs must be multiples of it.
        in_chans: input channels.
        num_classes: classifier outputs K (0: no classifier, ``forward`` returns pooled features).
        embed_dim, depth, num_heads, mlp_ratio: width C, blocks, heads (head dim C/heads), MLP expansion.
        qkv_bias: bias in the qkv projection (True, as timm/DeiT).
        global_pool: ``"token"`` (class token, as timm's default ViT), ``"avg"`` (no class token;
            mean of the final-normed patch tokens) or ``""`` (class token kept, no pooling: the head
            sees every token, as in timm).
        drop_rate: dropout after the MLP/attention projections and before the head.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this over the blocks.
        kernel: attention kernel name from :func:`qtvit.list_kernels` (default ``"qt"``).
        impl: ``"auto"``, ``"linear"`` or ``"dense"`` attention path (see :func:`qtvit.attention`).
        **kernel_params: the kernel's parameters (e.g. ``const`` for qt, ``pool`` for taylor2_pool).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        kernel: str = "qt",
        impl: str = "auto",
        **kernel_params,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r}; valid: {', '.join(GLOBAL_POOLS)}")
        img_size = _pair(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(
                f"img_size {img_size[0]}×{img_size[1]} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0 if global_pool == "avg" else 1
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        num_tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 → drop_path_rate
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rate, kernel, impl, **kernel_params)
            for rate in rates
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ kernel
    @property
    def kernel(self) -> str:
        return self.blocks[0].attn.kernel if len(self.blocks) else "none"

    def set_kernel(self, kernel: str, **kernel_params) -> None:
        """Switch every block's attention kernel in place (weights kept; kernel parameters start fresh)."""
        for blk in self.blocks:
            blk.attn.set_kernel(kernel, **kernel_params)

    # ------------------------------------------------------------------ timm-style interface
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: identity).

        ``global_pool`` may switch between ``"token"`` (needs the class token), ``"avg"`` (mean of
        the patch tokens) and ``""`` (no pooling).
        """
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                valid = ", ".join(map(repr, GLOBAL_POOLS))
                raise ValueError(f"unknown global_pool {global_pool!r}; valid: {valid}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token; this model was built with "
                                 "global_pool='avg' (no class token)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight  # (the norm may have been pruned away)
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Patch grid (B, gh, gw, C) → tokens with class token and position embedding (B, T, C)."""
        B, C = x.shape[0], x.shape[-1]
        pos = pos_embed_for_grid(self.pos_embed, self.grid_size, x, self.num_prefix_tokens)
        x = x.reshape(B, -1, C)  # (B, gh·gw, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → final-normed tokens (B, T, C); H, W any multiple of the patch size."""
        x = self._pos_embed(self.patch_embed(x))
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, T, C) → logits (B, K), or the pooled features (B, C) with ``pre_logits``
        (with ``global_pool=""``: per-token logits (B, T, K) / tokens (B, T, C))."""
        if self.global_pool == "token":
            x = x[:, 0]  # (B, C)
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → logits (B, K)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, return_prefix_tokens: bool = False):
        """Block outputs as feature maps (timm interface).

        Args:
            indices: blocks to return: None = all, int k = the last k, or a sequence (negative from the end).
            norm: apply the final norm to the returned maps.
            stop_early: stop after the last requested block (the returned final x is then that block's).
            output_fmt: ``"NCHW"`` (B, C, gh, gw) or ``"NHWC"`` (B, gh, gw, C).
            intermediates_only: return only the list.
            return_prefix_tokens: return (map, class-token (B, 1, C)) pairs.

        Returns:
            ``[maps]`` or ``(final normed tokens (B, T, C), [maps])``.
        """
        from .efficientvit import _take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        take, last = _take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.patch_embed(x)
        gh, gw = x.shape[1], x.shape[2]
        x = self._pos_embed(x)
        out = []
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                fmap = tokens.reshape(B, gh, gw, -1)
                if output_fmt == "NCHW":
                    fmap = fmap.permute(0, 3, 1, 2).contiguous()
                out.append((fmap, prefix) if return_prefix_tokens else fmap)
        if intermediates_only:
            return out
        return self.norm(x), out

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last requested one (and the norm/head if asked); returns the
        kept indices."""
        from .efficientvit import _take_indices

        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A checkpoint trained at another resolution: resize its (square) position grid to ours.
        key = prefix + "pos_embed"
        pos = state_dict.get(key)
        if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape != self.pos_embed.shape:
            n = pos.shape[1] - self.num_prefix_tokens
            side = math.isqrt(max(n, 0))
            if side * side == n and pos.shape[-1] == self.embed_dim:
                state_dict[key] = resize_pos_embed(pos, (side, side), self.grid_size, self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, kernel={self.kernel!r}"


def vit_macs(embed_dim: int, depth: int, num_heads: int, img_size: int = 224, patch_size: int = 16,
             mlp_ratio: float = 4.0, num_classes: int = 1000, in_chans: int = 3, kernel: str = "qt",
             class_token: bool = True) -> int:
    """Multiply-accumulates of one image's forward (matmuls and convs; norms and activations excluded).

    Per block with T tokens, head dim d: qkv T·C·3C, proj T·C², MLP 2·T·C·(rC), and the attention
    matmuls per head: qt's linear path ψ̂(K)ᵀV = T·d·d plus ψ̂(Q)·[ψ̂(K)ᵀV, Σψ̂(K)] = T·d·(d+1), where
    ψ̂ is the d-dimensional map without qt's constant feature (the constant's terms and Σψ̂(K) are
    sums, not multiply-accumulates); softmax QKᵀ and AV = 2·T²·d. This is exactly what
    :func:`qtvit.models.macs.count_macs` counts for the model (a test holds the two equal). Only
    ``qt`` and ``softmax`` are modelled (the card's kernel and the baseline).
    """
    if kernel not in ("qt", "softmax"):
        raise ValueError(f"vit_macs models the 'qt' and 'softmax' kernels only; got {kernel!r}")
    C, p = embed_dim, patch_size
    P = (img_size // p) ** 2
    T = P + int(class_token)
    d = C // num_heads
    hidden = int(C * mlp_ratio)
    attn = num_heads * (T * d * (2 * d + 1) if kernel == "qt" else 2 * T * T * d)
    block = T * C * 3 * C + attn + T * C * C + 2 * T * C * hidden
    return P * in_chans * p * p * C + depth * block + C * num_classes


# ---------------------------------------------------------------------------------- spec sheet
# Widths/depths/heads: DeiT (Touvron et al. 2021) tiny/small/base; micro is ours, for CPU studies.
# params: 1000 classes, default kernel qt (one learnable `const` per block on top of timm's ViT).
_ARCHS: dict[str, dict] = {
    "qtvit_vit_micro": dict(embed_dim=96, depth=4, num_heads=3, img_size=64, patch_size=8),
    "qtvit_vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, img_size=224, patch_size=16),
    "qtvit_vit_small": dict(embed_dim=384, depth=12, num_heads=6, img_size=224, patch_size=16),
    "qtvit_vit_base": dict(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16),
}
_PARAMS = {"qtvit_vit_micro": 569_420, "qtvit_vit_tiny": 5_717_428, "qtvit_vit_small": 22_050_676,
           "qtvit_vit_base": 86_567_668}


def _pretrained_cfg(img_size: int | Sequence[int], name: str) -> dict:
    h, w = _pair(img_size)
    return dict(architecture=name, input_size=(3, h, w), crop_pct=0.875, interpolation="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, first_conv="patch_embed.proj",
                classifier="head")


def _card(name: str) -> ModelCard:
    a = _ARCHS[name]
    macs = vit_macs(a["embed_dim"], a["depth"], a["num_heads"], 224, a["patch_size"])  # exact, at 224 px
    return ModelCard(params=_PARAMS[name], macs_224=macs, pretrained_cfg=_pretrained_cfg(a["img_size"], name))


def _create(name: str, num_classes: int, kernel: str, img_size, patch_size, drop_path_rate: float,
            **kwargs) -> VisionTransformer:
    a = dict(_ARCHS[name])
    a["img_size"] = a["img_size"] if img_size is None else img_size
    a["patch_size"] = a["patch_size"] if patch_size is None else patch_size
    a.update(kwargs)  # an explicit embed_dim, depth, num_heads, … overrides the architecture's
    model = VisionTransformer(num_classes=num_classes, kernel=kernel, drop_path_rate=drop_path_rate, **a)
    # "architecture" names the registered model (as EfficientViT's do), so a saved or exported model
    # need not be identified from its weights' shapes (a ViT's global_pool leaves no trace in them).
    model.pretrained_cfg = {**_pretrained_cfg(model.img_size, name), "num_classes": num_classes}
    return model


ImgSize = int | tuple[int, int] | None

_ARGS = """
    Args:
        num_classes: classifier outputs (0: features only).
        kernel: attention kernel name (default ``"qt"``; ``"softmax"`` is timm's/DeiT's ViT).
        img_size: training resolution, int or (H, W) (default: the architecture's).
        patch_size: patch side (default: the architecture's).
        drop_path_rate: final stochastic-depth rate (linear over depth).
        **kwargs: ``global_pool``, ``drop_rate``, ``impl``, ``in_chans``, ``mlp_ratio``, ``qkv_bias``
            and the kernel's parameters (e.g. ``const=1.0`` for qt).
"""


@register_model("qtvit_vit_micro", card=_card("qtvit_vit_micro"))
def qtvit_vit_micro(num_classes: int = 1000, kernel: str = "qt", img_size: ImgSize = None,
                    patch_size: int | None = None, drop_path_rate: float = 0.0,
                    **kwargs) -> VisionTransformer:
    return _create("qtvit_vit_micro", num_classes, kernel, img_size, patch_size, drop_path_rate, **kwargs)


@register_model("qtvit_vit_tiny", card=_card("qtvit_vit_tiny"))
def qtvit_vit_tiny(num_classes: int = 1000, kernel: str = "qt", img_size: ImgSize = None,
                   patch_size: int | None = None, drop_path_rate: float = 0.0,
                   **kwargs) -> VisionTransformer:
    return _create("qtvit_vit_tiny", num_classes, kernel, img_size, patch_size, drop_path_rate, **kwargs)


@register_model("qtvit_vit_small", card=_card("qtvit_vit_small"))
def qtvit_vit_small(num_classes: int = 1000, kernel: str = "qt", img_size: ImgSize = None,
                    patch_size: int | None = None, drop_path_rate: float = 0.0,
                    **kwargs) -> VisionTransformer:
    return _create("qtvit_vit_small", num_classes, kernel, img_size, patch_size, drop_path_rate, **kwargs)


@register_model("qtvit_vit_base", card=_card("qtvit_vit_base"))
def qtvit_vit_base(num_classes: int = 1000, kernel: str = "qt", img_size: ImgSize = None,
                   patch_size: int | None = None, drop_path_rate: float = 0.0,
                   **kwargs) -> VisionTransformer:
    return _create("qtvit_vit_base", num_classes, kernel, img_size, patch_size, drop_path_rate, **kwargs)


qtvit_vit_micro.__doc__ = "ViT-Micro (C=96, depth 4, 3 heads; 64 px, patch 8), for CPU studies." + _ARGS
qtvit_vit_tiny.__doc__ = "ViT-Tiny (DeiT-Ti: C=192, depth 12, 3 heads; 224 px, patch 16)." + _ARGS
qtvit_vit_small.__doc__ = "ViT-Small (DeiT-S: C=384, depth 12, 6 heads; 224 px, patch 16)." + _ARGS
qtvit_vit_base.__doc__ = "ViT-Base (DeiT-B: C=768, depth 12, 12 heads; 224 px, patch 16)." + _ARGS
