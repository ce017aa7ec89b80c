"""Token-sequence attention with any registered kernel: a drop-in for timm's ViT ``Attention``.

Shapes: x (B, N, C) → (B, N, C); heads H = num_heads, head dim d = C/H (or ``attn_head_dim``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import attention, get_kernel

Tensor = torch.Tensor


class KernelParams(nn.Module):
    """Owns a kernel's learnable parameters (``const`` for qt, α/β/γ for qt_paper) as nn.Parameters.

    Fixed parameters (``pool``, ``chunks``, ``seed``) are plain attributes. ``as_kwargs()``
    returns what :func:`qtvit.attention` takes.
    """

    def __init__(self, kernel: str, **params) -> None:
        super().__init__()
        self.kernel = get_kernel(kernel).name
        spec = get_kernel(kernel)
        resolved = spec.resolve_params(params)
        self.fixed = {n: v for n, v in resolved.items() if n not in spec.learnable}
        for name in spec.learnable:
            self.register_parameter(name, nn.Parameter(torch.tensor(float(resolved[name]))))

    def as_kwargs(self) -> dict:
        return {**self.fixed, **{n: p for n, p in self.named_parameters(recurse=False)}}

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}" + "".join(f", {n}={v}" for n, v in self.fixed.items())


class KernelAttention(nn.Module):
    """Multi-head self-attention whose softmax is replaced by a kernel chosen by name.

    Constructor arguments follow ``timm.models.vision_transformer.Attention`` (``dim``,
    ``num_heads``, ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``attn_drop``, ``proj_drop``,
    ``norm_layer``) and the submodules have the same names (``qkv``, ``q_norm``, ``k_norm``,
    ``proj``), so a timm ViT's weights load unchanged. ``kernel="softmax"`` reproduces timm's
    attention exactly.

    Args:
        kernel: a name from :func:`qtvit.list_kernels` (default ``"qt"``).
        impl: ``"auto"``, ``"linear"`` or ``"dense"`` (see :func:`qtvit.attention`).
        **kernel_params: the kernel's parameters; learnable ones initialise nn.Parameters.

    ``attn_drop`` is applied only by the dense softmax path: linear kernels never form the
    attention matrix it would drop from.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        attn_head_dim: int | None = None,
        kernel: str = "qt",
        impl: str = "auto",
        **kernel_params,
    ) -> None:
        super().__init__()
        head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.impl = impl
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_params = KernelParams(kernel, **kernel_params)

    @property
    def kernel(self) -> str:
        return self.kernel_params.kernel

    def set_kernel(self, kernel: str, **kernel_params) -> None:
        """Switch the kernel in place (projection weights are kept; new kernel parameters start fresh)."""
        weight = self.qkv.weight
        self.kernel_params = KernelParams(kernel, **kernel_params).to(weight.device, weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"KernelAttention expects x of shape (B, N, C); got {tuple(x.shape)}")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kernel == "softmax":
            # SDPA applies the dropout inside; this matches timm's fused path exactly.
            x = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = attention(q, k, v, self.kernel, impl=self.impl, **self.kernel_params.as_kwargs())
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, H·d)
        return self.proj_drop(self.proj(x))
