"""Inference-time fusion: ``qtvit.deploy.fuse(model)`` returns a faster model with the same logits.

What changes (all exact up to float rounding):

* every ``Conv2d → BatchNorm2d`` pair (stem, MBConv/FusedMBConv/ResBlock/DSConv, the head's
  ``in_conv`` and LiteMLA's output projection) becomes one convolution with a bias;
* every :class:`~qtvit.layers.LiteMLA` becomes a :class:`FusedLiteMLA`, which keeps q, k and v in
  the conv layout (B, heads, d, N) (no transposes), runs the ``qt`` and ``relu`` kernels as a few
  batched matmuls with no Python branching on the token count (so ``torch.export``/ONNX see one
  graph for every input size), folds the value shortcut's BatchNorm (one BN over the d channels
  shared by all heads) into a per-channel scale and shift, and skips qt's first normalisation:
  n(n(x)²) = x²/‖x²‖ because squaring and the second normalisation cancel any positive scale
  of x (the released ε moves the result by < 1e-14 relative);
* the APE is used as stored at its own token grid (where the bicubic resize is the identity), and
  optionally also cached resized to one other input size (``ape_size=(H, W)``); other sizes
  resize. Only plain-int sizes skip the resize: an export with dynamic H, W keeps it in the graph;
* an exported graph (``torch.export``, ONNX) spells the qt epilogue and the value shortcut for
  onnxruntime, which fuses no element-wise chain it has no pattern for: the constant column folded
  into the products, v·s + t as one BatchNormalization, the GELU as its GeluFusion pattern.

A fused model is for inference only: ``.train()`` raises :class:`FusedModelError`.
"""

from __future__ import annotations

import copy
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtvitError
from ..kernels import attention
from ..kernels.definitions import EPS, QT_NORM_FLOOR
from ..kernels.linear import concrete
from ..layers.conv import ConvNormAct
from ..layers.lite_mla import LiteMLA, resize_ape

Tensor = torch.Tensor

# kernels FusedLiteMLA computes itself; any other kernel goes through qtvit.attention
FAST_KERNELS = ("qt", "relu")


class FusedModelError(QtvitError):
    """A fused (inference-only) model was asked to train."""


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing bn(conv(x)) with ``bn``'s running statistics (eval-mode BN).

    w' = w·γ/√(σ²+ε) per output channel, b' = (b − μ)·γ/√(σ²+ε) + β; computed in float64.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise FusedModelError(f"cannot fold {bn}: it tracks no running statistics")
    w = conv.weight.double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_(bias)
    return fused


def _fuse_conv_norm_act(m: ConvNormAct) -> None:
    if isinstance(m.norm, nn.BatchNorm2d):
        m.conv = fold_bn(m.conv, m.norm)
        m.norm = nn.Identity()


class FusedLiteMLA(nn.Module):
    """Inference form of :class:`~qtvit.layers.LiteMLA`: (B, C_in, H, W) → (B, C_out, H, W).

    Built from a LiteMLA in eval mode; the same parameters, BNs folded. The attention runs in
    float32 whatever the input dtype (an fp16 model keeps its attention fp32) and is written
    with batched matmuls on (B, G, d, N) tensors, G = S·h attention heads, N = H·W tokens.

    Args:
        mla: the LiteMLA to convert (not modified).
        ape_size: token grid (gh, gw) at which to cache the resized APE, or None.
    """

    def __init__(self, mla: LiteMLA, ape_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel = mla.kernel
        self.head_dim = mla.head_dim
        self.num_attn_heads = mla.num_attn_heads
        self.impl = mla.impl
        self.qkv = copy.deepcopy(mla.qkv.conv)
        if not isinstance(mla.qkv.norm, nn.Identity):  # LiteMLA's qkv has no norm; be safe
            self.qkv = fold_bn(self.qkv, mla.qkv.norm)
        self.aggreg = copy.deepcopy(mla.aggreg)
        proj = copy.deepcopy(mla.proj)
        _fuse_conv_norm_act(proj)
        self.proj = proj
        params = {n: (p.detach().clone() if isinstance(p, Tensor) else p)
                  for n, p in mla.kernel_params.as_kwargs().items()}
        self.kernel_kwargs = {n: p for n, p in params.items() if not isinstance(p, Tensor)}
        for n, p in params.items():
            if isinstance(p, Tensor):
                self.register_buffer(f"kp_{n}", p, persistent=True)
        if mla.ape is not None:
            self.register_buffer("ape", mla.ape.detach().clone())  # (1, G·d, gh, gw)
        else:
            self.ape = None
        self.ape_cache_size: tuple[int, int] | None = None
        self.ape_cache = None
        if ape_size is not None and self.ape is not None:
            self.cache_ape(ape_size)
        if mla.v_norm is not None:  # GELU(BN(v)): BN over the d channels every head shares
            bn = mla.v_norm
            scale = bn.running_var.double().add(bn.eps).rsqrt() * bn.weight.double()
            shift = bn.bias.double() - bn.running_mean.double() * scale
            self.register_buffer("v_scale", scale.float().reshape(-1, 1))  # (d, 1)
            self.register_buffer("v_shift", shift.float().reshape(-1, 1))
            # statistics (0, 1) of the exported BatchNormalization computing v·s + t (_v_shortcut)
            self.register_buffer("v_mean", torch.zeros(self.head_dim), persistent=False)
            self.register_buffer("v_var", torch.ones(self.head_dim), persistent=False)
        else:
            self.v_scale = self.v_shift = None

    @torch.no_grad()
    def cache_ape(self, grid: tuple[int, int]) -> None:
        """Store the APE resized to token grid ``grid`` = (gh, gw) as a (1, G, d, gh·gw) buffer."""
        gh, gw = int(grid[0]), int(grid[1])
        self.ape_cache = self._ape_tokens_resized(gh, gw)
        self.ape_cache_size = (gh, gw)

    def _ape_tokens_resized(self, H, W) -> Tensor:
        # the layer's resize: the stored APE as is at its own grid for plain-int sizes, otherwise
        # the bicubic resize (kept in exported graphs, where it is the identity at the stored size)
        ape = resize_ape(self.ape.float(), (H, W))
        return ape.reshape(1, self.num_attn_heads, self.head_dim, -1)  # (1, G, d, N)

    def _ape_tokens(self, H, W) -> Tensor:
        """The APE as key offsets (1, G, d, N) for an H×W token grid.

        Plain-int sizes (eager, torch.compile with static shapes) skip the resize at the cached
        grid and at the stored grid (:func:`~qtvit.layers.lite_mla.resize_ape`); inductor would
        otherwise fuse the interpolation into the key kernel and redo it for every image of the
        batch. Symbolic sizes (torch.export/ONNX with dynamic H, W) and jit traces keep the resize,
        so one graph serves every size.
        """
        if concrete(H, W) and self.ape_cache is not None and self.ape_cache_size == (H, W):
            return self.ape_cache.float()
        return self._ape_tokens_resized(H, W)

    def _param(self, name: str) -> Tensor:
        return getattr(self, f"kp_{name}").float()

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        G, d = self.num_attn_heads, self.head_dim
        qkv = self.qkv(x)  # (B, 3·h·d, H, W)
        qkv = torch.cat([qkv, *[op(qkv) for op in self.aggreg]], dim=1)  # (B, G·3d, H, W)
        qkv = qkv.reshape(B, G, 3 * d, -1).float()  # (B, G, 3d, N), attention in float32
        q, k, v = qkv[:, :, :d], qkv[:, :, d:2 * d], qkv[:, :, 2 * d:]  # each (B, G, d, N)
        if self.ape is not None:
            k = k + self._ape_tokens(H, W)
        exporting = torch.compiler.is_exporting()  # the graph will run in onnxruntime (see _v_shortcut)
        if self.kernel == "qt":
            out = _qt_channels_first(q, k, v, self._param("const"), fold_constant=exporting)
        elif self.kernel == "relu":
            out = _relu_channels_first(q, k, v)
        else:  # any other kernel: the library path on (B, G, N, d) views
            out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), self.kernel,
                            impl=self.impl, **self.kernel_kwargs,
                            **{n[3:]: b for n, b in self.named_buffers() if n.startswith("kp_")})
            out = out.transpose(-1, -2)
        if self.v_scale is not None:
            out = out + self._v_shortcut(v, exporting)
        out = out.to(x.dtype).reshape(B, -1, H, W)  # (B, G·d, H, W)
        return self.proj(out)

    def _v_shortcut(self, v: Tensor, exporting: bool) -> Tensor:
        """GELU(v·s + t), the value shortcut with its BN folded: (B, G, d, N) → same.

        Written for each backend's fusion (same values up to float rounding): eager and
        ``torch.compile`` take one ``addcmul`` and ``F.gelu`` (inductor fuses both into the
        attention epilogue). An exported graph runs them in onnxruntime, which fuses no
        element-wise chain except the patterns it knows: there v·s + t is one BatchNormalization
        node (statistics 0 and 1, ε = 0: exactly v·s + t) instead of a Mul and an Add, and the GELU
        is spelled as onnxruntime's GeluFusion matches it (one Gelu node instead of five passes).
        """
        if exporting:
            B, G, d, N = v.shape
            y = F.batch_norm(v.reshape(B * G, d, N), self.v_mean.float(), self.v_var.float(),
                             self.v_scale.float().reshape(-1), self.v_shift.float().reshape(-1),
                             training=False, momentum=0.0, eps=0.0)
            return _gelu_erf_exportable(y).reshape(B, G, d, N)
        return F.gelu(torch.addcmul(self.v_shift.float(), v, self.v_scale.float()))

    def extra_repr(self) -> str:
        ape = "" if self.ape is None else f", ape={tuple(self.ape.shape[2:])}"
        cache = "" if self.ape_cache_size is None else f", ape_cache={self.ape_cache_size}"
        return (f"kernel={self.kernel!r}, heads={self.num_attn_heads}, head_dim={self.head_dim}"
                f"{ape}{cache}, shortcut={self.v_scale is not None}")


def _sq_norm(x: Tensor) -> Tensor:
    """max(‖x‖₂, QT_NORM_FLOOR) over the channel axis: (B, G, d, N) → (B, G, 1, N).

    Spelled as a sum of squares: over this strided axis ``torch.linalg.vector_norm`` takes a slow
    path in eager PyTorch (see :func:`qtvit.kernels.definitions.row_norm`), and onnxruntime runs
    its ReduceL2 slower than the Mul, ReduceSum and Sqrt this exports to."""
    return (x * x).sum(2, keepdim=True).clamp_min(QT_NORM_FLOOR * QT_NORM_FLOOR).sqrt()


def _gelu_erf_exportable(x: Tensor) -> Tensor:
    """Exact GELU as x·½·(1 + erf(x/√2)), node for node the subgraph onnxruntime's GeluFusion
    replaces by one Gelu node (Div by √2, Erf, Add 1, and Mul(Mul(x, ½), ·))."""
    return (x * 0.5) * (torch.erf(x / math.sqrt(2.0)) + 1.0)


def _qt_channels_first(q: Tensor, k: Tensor, v: Tensor, const: Tensor, fold_constant: bool = False) -> Tensor:
    """qt linear attention on (B, G, d, N) tensors → (B, G, e, N).

    k̂ = k²/‖k²‖; with c² the constant feature's weight and r(q) = ‖q²‖,
    out_n = (KV·q_n² + r(q_n)·c²Σv) / (Kz·q_n² + r(q_n)·(c²N + ε)), KV = Σ_m v_m k̂_mᵀ, Kz = Σ_m k̂_m.

    ``fold_constant`` (what an exported graph uses): the constant column rides in the two products
    as one more column, [KV | c²Σv] and [Kz | c²N + ε] times [q²; r(q)], instead of an (e, N)
    outer product r(q)·c²Σv added to KV·q² (two element-wise passes onnxruntime runs unfused; one
    concatenation instead). Eager PyTorch and inductor are faster with the outer product, which
    they fuse into the division.
    """
    k2 = k * k
    k_hat = k2 / _sq_norm(k2)  # (B, G, d, N)
    q2 = q * q
    r_q = _sq_norm(q2)  # (B, G, 1, N)
    c2 = const * const
    kv = v @ k_hat.transpose(-1, -2)  # (B, G, e, d)
    kz = k_hat.sum(-1, keepdim=True).transpose(-1, -2)  # (B, G, 1, d)
    v_sum = v.sum(-1, keepdim=True) * c2  # (B, G, e, 1)
    n_const = c2 * k.shape[-1] + EPS  # c²N + ε (N symbolic under export: read off the shape at run time)
    if fold_constant:
        q_aug = torch.cat([q2, r_q], dim=2)  # [q²; r(q)]: (B, G, d + 1, N)
        num = torch.cat([kv, v_sum], dim=-1) @ q_aug  # (B, G, e, N)
        den = torch.cat([kz, n_const.expand(kz.shape[:-1] + (1,))], dim=-1) @ q_aug  # (B, G, 1, N)
        return num / den
    num = torch.addcmul(kv @ q2, v_sum, r_q)  # (B, G, e, N)
    den = torch.addcmul(kz @ q2, r_q, n_const)  # (B, G, 1, N)
    return num / den


def _relu_channels_first(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """EfficientViT's ReLU linear attention on (B, G, d, N) tensors → (B, G, e, N)."""
    q, k = torch.relu(q), torch.relu(k)
    kv = v @ k.transpose(-1, -2)  # (B, G, e, d)
    kz = k.sum(-1, keepdim=True).transpose(-1, -2)  # (B, G, 1, d)
    return (kv @ q) / (kz @ q + EPS)


def _refuse_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise FusedModelError("this model was fused for inference (BatchNorms folded into convolutions): "
                              "it cannot be trained; fine-tune the unfused model and fuse it again")
    return nn.Module.train(self, False)


def fuse(model: nn.Module, ape_size: int | tuple[int, int] | None = None, inplace: bool = False) -> nn.Module:
    """Fold BatchNorms and convert every LiteMLA to :class:`FusedLiteMLA`; returns an eval-mode model.

    Args:
        model: any qtvit model (or a module containing LiteMLAs / ConvNormActs, e.g. a backbone).
        ape_size: input image size (int or (H, W)) at which to cache each LiteMLA's resized APE
            (the grid of each stage is derived from the stage's stride); None caches nothing.
        inplace: modify ``model`` instead of a deep copy.

    The result equals the unfused model's eval-mode output up to float rounding (tests check 1e-5
    relative on the logits of every registered size) and refuses ``.train()``.
    """
    if getattr(model, "is_fused", False):
        return model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    img = (ape_size, ape_size) if isinstance(ape_size, int) else ape_size
    grids = _lite_mla_grids(model, tuple(img)) if img is not None else {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LiteMLA):
            _set_submodule(model, name, FusedLiteMLA(module, ape_size=grids.get(name)).eval())
    for module in model.modules():
        if isinstance(module, ConvNormAct):
            _fuse_conv_norm_act(module)
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_fused = True
    model.train = types.MethodType(_refuse_train, model)
    return model


def _lite_mla_grids(model: nn.Module, img: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Token grid each LiteMLA sees for input ``img``, found by one forward pass on zeros."""
    grids: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            grids.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, LiteMLA)]
    if not hooks:
        return grids
    ref = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, getattr(model, "in_chans", 3), *img, device=ref.device, dtype=ref.dtype))
    finally:
        for h in hooks:
            h.remove()
    return grids


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


__all__ = ["FAST_KERNELS", "FusedLiteMLA", "FusedModelError", "fold_bn", "fuse"]
