"""LiteMLA: EfficientViT's multi-scale linear attention, any kernel by name (docs/DESIGN.md §litemla).

Shape legend: B batch, C channels, H×W feature map, N = H·W tokens, d = ``head_dim``,
h = C // d heads, S = 1 + len(scales) token scales, so S·h heads attend (each on its own
d-dim slice of q, k, v; heads never mix inside attention, only in ``proj``).

Channel layout (docs/DESIGN.md §litemla): ``qkv(x)`` has 3·h·d channels, head-major with
q/k/v interleaved per head: channels [3d·i, 3d·(i+1)) are head i's [q | k | v]. The multi-scale
branches keep that layout and are concatenated on the channel axis after the plain branch,
so heads 0..h-1 see the 1×1 tokens and heads h·s..h·(s+1)-1 the tokens aggregated at scale s.

QT-ViT extras (each optional; all off gives EfficientViT's LiteMLA exactly):
  * ``ape``: a learnable absolute positional embedding added to k (official ``positional_encoding``),
    (1, S·h·d, gh, gw) for the grid of the training resolution, channel S·h-major like k:
    channel i·d + j is head i's k[j]. Bicubically resized when the token grid differs.
  * ``v_norm``: the non-linear shortcut out += GELU(BN(v)) (official ``bn``): one BatchNorm2d
    over the d channels of a head, shared by all S·h heads, exact GELU.
  * ``kernel_params``: the kernel's learnable parameters (``const`` for qt, official ``ones_scale1``).
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import cast_back, compute_dtype, get_kernel
from .attention import KernelParams
from .conv import ConvNormAct, NormLayer

Tensor = torch.Tensor


def resize_ape(ape: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of a positional embedding (1, C, gh, gw) → (1, C, H, W) (align_corners=False).

    Half dtypes are resized in float32 (bicubic kernels are not available for all of them) and
    cast back; float64 stays float64. Returned as is when the size already matches, checked only
    for plain-int sizes: symbolic ones (``torch.export`` with dynamic H, W) and ``torch.jit.trace``
    always go through the interpolation, which is an exact identity at the stored size (bicubic
    weights (0, 1, 0, 0)), so the graph holds the resize for every input size.
    """
    H, W = size[0], size[1]
    if (not torch.jit.is_tracing() and isinstance(H, int) and isinstance(W, int)
            and ape.shape[-2] == H and ape.shape[-1] == W):
        return ape
    out = F.interpolate(ape.to(compute_dtype(ape.dtype)), size=[H, W], mode="bicubic", align_corners=False)
    return out.to(ape.dtype)


# torch.fx.symbolic_trace: dtype- and size-dependent helpers become single graph nodes.
torch.fx.wrap("resize_ape")
torch.fx.wrap("compute_dtype")
torch.fx.wrap("cast_back")


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention, (B, C_in, H, W) → (B, C_out, H, W).

    Args:
        in_channels, out_channels: C_in and C_out.
        head_dim: d; heads h = C_in // d (C_in must be a multiple of d).
        scales: kernel sizes of the multi-scale aggregation branches (EfficientViT: (5,)).
        norm_layer: norm of ``proj`` and of the ``v_norm`` shortcut (BatchNorm2d with the model's eps).
        kernel: any name from :func:`qtvit.list_kernels` (``"relu"`` = EfficientViT, ``"qt"`` = QT-ViT).
        kernel_params: the kernel's parameters; learnable ones become nn.Parameters (qt: ``const=1.0``).
        ape: add a learnable, zero-initialised positional embedding to k.
        ape_size: the (gh, gw) token grid the APE is stored at (the stage's grid at the training
            resolution, e.g. (14, 14) at stride 16 for 224 input). Required when ``ape``.
        shortcut: add GELU(BN(v)) to each head's attention output.
        impl: ``"auto"``, ``"linear"`` or ``"dense"``, passed to :func:`qtvit.attention`
            (``"auto"`` picks by the token count in eager mode, ``"linear"`` under
            ``torch.export``, dynamic ``torch.compile`` and ``torch.jit.trace``).

    ``forward`` is traceable by every export path: ``torch.jit.script`` (the kernel call runs in
    Python), ``torch.fx.symbolic_trace`` (the kernel, the APE resize and the dtype casts are single
    nodes), ``torch.export`` and ``torch.compile`` with dynamic batch, height and width.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        head_dim: int = 8,
        scales: tuple[int, ...] = (5,),
        norm_layer: NormLayer = nn.BatchNorm2d,
        kernel: str = "relu",
        kernel_params: dict | None = None,
        ape: bool = False,
        ape_size: tuple[int, int] | None = None,
        shortcut: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if head_dim <= 0 or in_channels % head_dim:
            raise ValueError(f"LiteMLA: in_channels={in_channels} must be a positive multiple of "
                             f"head_dim={head_dim}")
        heads = in_channels // head_dim
        total_dim = heads * head_dim
        self.head_dim = head_dim
        self.heads = heads
        self.scales = tuple(scales)
        self.impl = impl
        n_heads = heads * (1 + len(self.scales))  # S·h: the multi-scale branches add heads

        if ape:
            if ape_size is None:
                raise ValueError("LiteMLA: ape=True needs ape_size=(gh, gw), the token grid at the "
                                 "training resolution")
            # Zero-init (docs/DESIGN.md §init): the model starts position-agnostic, like EfficientViT.
            self.ape = nn.Parameter(torch.zeros(1, n_heads * head_dim, *ape_size))
        else:
            self.register_parameter("ape", None)
        self.kernel_params = KernelParams(kernel, **(kernel_params or {}))
        self.qkv = ConvNormAct(in_channels, 3 * total_dim, 1, norm_layer=None)
        # Depthwise k×k then a grouped 1×1 whose groups are exactly one head's q, k or v (d channels).
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, s, padding=s // 2, groups=3 * total_dim, bias=False),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False),
            )
            for s in self.scales
        ])
        self.proj = ConvNormAct(n_heads * head_dim, out_channels, 1, norm_layer=norm_layer)
        self.v_norm = norm_layer(head_dim) if shortcut else None

    @property
    def kernel(self) -> str:
        return self.kernel_params.kernel

    @property
    def num_attn_heads(self) -> int:
        """S·h: heads that attend (the multi-scale branches double EfficientViT's h)."""
        return self.heads * (1 + len(self.scales))

    def set_kernel(self, kernel: str, **kernel_params) -> None:
        """Switch the kernel in place; all other weights are kept, new kernel parameters start fresh."""
        get_kernel(kernel)  # unknown names raise before anything changes
        ref = self.qkv.conv.weight
        self.kernel_params = KernelParams(kernel, **kernel_params).to(device=ref.device, dtype=ref.dtype)

    def _ape_tokens(self, ape: Tensor, H: int, W: int, dtype: torch.dtype) -> Tensor:
        """The APE as per-head key offsets: (1, S·h, N, d)."""
        ape = resize_ape(ape, (H, W)).to(dtype)  # (1, S·h·d, H, W)
        return ape.reshape(1, -1, self.head_dim, H * W).transpose(-1, -2)

    def _v_shortcut(self, v: Tensor, H: int, W: int) -> Tensor:
        """GELU(BN(v)) with one BN over the d channels shared by all heads: (B, S·h, N, d) → same."""
        B, n_heads, N, d = v.shape
        x = v.transpose(-1, -2).reshape(B * n_heads, d, H, W)  # (B·S·h, d, H, W)
        x = x.to(self.v_norm.weight.dtype)  # float32 BN under autocast; a .half() model keeps its dtype
        x = F.gelu(self.v_norm(x))  # exact GELU, as released
        return x.reshape(B, n_heads, d, N).transpose(-1, -2).to(v.dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)  # (B, 3·h·d, H, W)
        branches = [qkv]
        for op in self.aggreg:
            branches.append(op(qkv))
        qkv = torch.cat(branches, dim=1)  # (B, S·3·h·d, H, W)
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W).transpose(-1, -2)  # (B, S·h, N, 3d)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, S·h, N, d)

        # The released code runs APE, kernel and shortcut in float32 (its ε=1e-15 is zero in fp16):
        # cast here, where the element-wise APE add and the shortcut stay float32 even under
        # autocast; the kernel call disables autocast itself (the one place it is switched off).
        # The input dtype goes back to proj.
        in_dtype = q.dtype
        work = compute_dtype(in_dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        if self.ape is not None:
            k = k + self._ape_tokens(self.ape, H, W, work)
        out = self.kernel_params.attend(q, k, v, self.impl)
        if self.v_norm is not None:
            out = out + self._v_shortcut(v, H, W)
        out = cast_back(out, in_dtype)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)  # (B, S·h·d, H, W)
        return self.proj(out)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint trained at another resolution stores the APE at another grid
        # (docs/DESIGN.md §checkpoints): resize it bicubically to this module's grid instead of
        # failing on the shape.
        key = prefix + "ape"
        if self.ape is not None and key in state_dict:
            t = state_dict[key]
            if (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[:2] == self.ape.shape[:2]
                    and t.shape[2:] != self.ape.shape[2:]):
                state_dict[key] = resize_ape(t, tuple(self.ape.shape[2:]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        ape = f", ape={tuple(self.ape.shape[2:])}" if self.ape is not None else ""
        return (f"kernel={self.kernel!r}, heads={self.num_attn_heads}, head_dim={self.head_dim}, "
                f"scales={self.scales}{ape}, shortcut={self.v_norm is not None}, impl={self.impl!r}")


def ape_grid(img_size: int | tuple[int, int], stride: int) -> tuple[int, int]:
    """Token grid of a stride-``stride`` stage for input ``img_size``: ⌈size/stride⌉, as the convs give."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return math.ceil(h / stride), math.ceil(w / stride)


__all__ = ["LiteMLA", "ape_grid", "resize_ape"]
