"""Token-sequence attention with any registered kernel: a drop-in for timm's ViT ``Attention``.

Shapes: x (B, N, C) → (B, N, C); heads H = num_heads, head dim d = C/H (or ``attn_head_dim``).

No ``from __future__ import annotations`` here: ``torch.jit.script`` reads the real annotations
of the ``@torch.jit.ignore`` method :meth:`KernelParams.attend` to type its call.
"""

import torch
import torch.fx
import torch.nn as nn

from ..kernels import get_kernel, kernel_attention

Tensor = torch.Tensor

# torch.fx.symbolic_trace records kernel_attention as one call (executed eagerly by the traced
# GraphModule, where token counts are real numbers) instead of tracing its shape-dependent Python.
torch.fx.wrap("kernel_attention")


def check_rank(x: Tensor, rank: int, who: str, layout: str) -> None:
    """Raise a one-line ValueError unless ``x`` has ``rank`` dims (a single FX node when traced)."""
    if x.dim() != rank:
        raise ValueError(f"{who} expects x of shape {layout}; got {x.shape}")


torch.fx.wrap("check_rank")


class KernelParams(nn.Module):
    """Owns a kernel's learnable parameters (``const`` for qt, α/β/γ for qt_paper) as nn.Parameters.

    Fixed parameters (``pool``, ``chunks``, ``seed``) are plain attributes named after them.
    :meth:`attend` runs the kernel with all of them; ``as_kwargs()`` returns what
    :func:`qtvit.attention` takes.

    Modules call ``self.kernel_params.attend(q, k, v, self.impl)`` from ``forward``: no keyword
    expansion there, so ``torch.jit.script`` compiles the caller (``attend`` itself runs in Python,
    ``@torch.jit.ignore``), ``torch.fx`` records one ``kernel_attention`` node, and
    ``torch.export``/``torch.compile`` trace straight through (see ``qtvit.attention`` for how
    ``impl="auto"`` resolves there).
    """

    # Declared so a scripted copy keeps them (an empty list has no type TorchScript can infer);
    # ``attend`` reads them back from there.
    kernel: str
    fixed_names: list[str]
    __jit_unused_properties__ = ["fixed"]

    def __init__(self, kernel: str, **params) -> None:
        super().__init__()
        spec = get_kernel(kernel)
        self.kernel = spec.name
        resolved = spec.resolve_params(params)
        self.fixed_names = [n for n in resolved if n not in spec.learnable]
        for name in self.fixed_names:
            if hasattr(self, name):
                raise ValueError(f"kernel {spec.name!r}: parameter {name!r} clashes with a module attribute")
            setattr(self, name, resolved[name])
        for name in spec.learnable:
            self.register_parameter(name, nn.Parameter(torch.tensor(float(resolved[name]))))

    @property
    def fixed(self) -> dict:
        """The fixed (non-learnable) parameters by name."""
        return {n: getattr(self, n) for n in self.fixed_names}

    def as_kwargs(self) -> dict:
        return _kernel_kwargs(self)

    @torch.jit.ignore
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
        """This kernel on q, k (B, H, N|M, d) and v (B, H, M, e) → (B, H, N, e), via ``impl``."""
        # ``self`` may be the scripted copy, which has attributes and parameters but no Python methods
        return kernel_attention(q, k, v, self.kernel, impl, _kernel_kwargs(self))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}" + "".join(f", {n}={v}" for n, v in self.fixed.items())


def _kernel_kwargs(params: nn.Module) -> dict:
    """A KernelParams' (or its scripted copy's) parameters by name: fixed values and nn.Parameters."""
    kwargs = {n: getattr(params, n) for n in params.fixed_names}
    kwargs.update(params.named_parameters(recurse=False))
    return kwargs


class KernelAttention(nn.Module):
    """Multi-head self-attention whose softmax is replaced by a kernel chosen by name.

    Constructor arguments follow ``timm.models.vision_transformer.Attention`` (``dim``,
    ``num_heads``, ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``attn_drop``, ``proj_drop``,
    ``norm_layer``) and the submodules have the same names (``qkv``, ``q_norm``, ``k_norm``,
    ``proj``), so a timm ViT's weights load unchanged. ``kernel="softmax"`` reproduces timm's
    attention exactly.

    Args:
        kernel: a name from :func:`qtvit.list_kernels` (default ``"qt"``).
        impl: ``"auto"``, ``"linear"`` or ``"dense"`` (see :func:`qtvit.attention`: ``"auto"``
            picks by the token count in eager mode and ``"linear"`` under ``torch.export``,
            dynamic ``torch.compile`` and ``torch.jit.trace``).
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
        check_rank(x, 3, "KernelAttention", "(B, N, C)")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kernel == "softmax":
            # SDPA applies the dropout inside; this matches timm's fused path exactly.
            x = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = self.kernel_params.attend(q, k, v, self.impl)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, H·d)
        return self.proj_drop(self.proj(x))
