"""``swap_attention``: put any registered kernel into an existing model, in place, weights kept.

Supported attention modules:
    * timm ``Attention`` (``timm.layers.Attention`` = ``timm.models.vision_transformer.Attention``,
      used by ViT, DeiT, DeiT-3, ... and other families built on it) → :class:`TimmKernelAttention`;
    * timm ``efficientvit_mit.LiteMLA`` (ReLU linear attention) → :class:`KernelLiteMLA`;
    * any module with ``set_kernel(kernel, **params)`` (qtvit's ``KernelAttention`` and ``LiteMLA``,
      and modules already swapped): the innermost such modules are switched in place.

The replacements reuse the original projection/normalisation submodules themselves (not copies),
so weights, device, dtype, and the parameters an existing optimizer holds all stay valid; only
the kernel's own learnable parameters (e.g. qt's ``const``) are new.

timm is optional: it is imported lazily, only to recognise its classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import get_kernel
from ..layers.attention import KernelAttention, KernelParams

Tensor = torch.Tensor


def _new_kernel_params(kernel: str, params: dict, like: Tensor) -> KernelParams:
    """KernelParams on ``like``'s device, in its dtype when floating point."""
    kp = KernelParams(kernel, **params)
    return kp.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)


class TimmKernelAttention(KernelAttention):
    """A :class:`KernelAttention` that stands in for timm's ViT ``Attention`` with its submodules.

    Beyond ``KernelAttention`` it keeps timm's optional ``norm`` (``scale_norm=True``: a norm on the
    attention output before ``proj``), ``gate`` (``gated=True``: a sigmoid gate from the input),
    ``scale`` (used by the softmax kernel) and the ``forward(x, attn_mask=None, is_causal=False)``
    signature timm's blocks call. Masks and causal attention work with ``kernel="softmax"`` only.
    Built by :meth:`from_timm`; shapes x (B, N, C) → (B, N, C_out).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm: nn.Module = nn.Identity()
        self.gate: nn.Module | None = None
        self.scale = self.head_dim ** -0.5

    @classmethod
    def from_timm(cls, src: nn.Module, kernel: str, impl: str, **kernel_params) -> TimmKernelAttention:
        """Wrap timm ``Attention`` ``src``'s own submodules (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
        ``gate``, ``proj``, dropouts) around ``kernel``."""
        get_kernel(kernel)  # unknown names raise before anything is built
        with torch.device("meta"):  # placeholders only: every weight-bearing submodule is replaced below
            new = cls(src.qkv.in_features, src.num_heads, attn_head_dim=src.head_dim, impl=impl)
        new.qkv, new.q_norm, new.k_norm, new.proj = src.qkv, src.q_norm, src.k_norm, src.proj
        new.attn_drop, new.proj_drop = src.attn_drop, src.proj_drop
        new.norm = src.norm
        new.gate = src.gate
        new.scale = float(src.scale)
        new.kernel_params = _new_kernel_params(kernel, kernel_params, src.qkv.weight)
        new.train(src.training)
        return new

    def set_kernel(self, kernel: str, **kernel_params) -> None:
        """Switch the kernel in place (projections kept; new kernel parameters start fresh)."""
        self.kernel_params = _new_kernel_params(kernel, kernel_params, self.qkv.weight)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None  # (B, N, H·d)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kernel == "softmax":
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal, scale=self.scale)
        else:
            if attn_mask is not None or is_causal:
                raise ValueError(
                    f"kernel {self.kernel!r} does not support attn_mask/is_causal (linear attention has no "
                    "attention matrix to mask); use kernel='softmax' for masked attention")
            x = self.kernel_params.attend(q, k, v, self.impl)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, H·d)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class KernelLiteMLA(nn.Module):
    """timm's ``efficientvit_mit.LiteMLA`` with its ReLU kernel replaced by any registered kernel.

    Reuses the original ``qkv`` (1×1 conv), ``aggreg`` (multi-scale depthwise + grouped 1×1) and
    ``proj`` (1×1 conv + BN) modules. timm's channel layout is head-major with q/k/v interleaved
    per head; the plain and the aggregated branches are concatenated, giving 2·heads heads of dim d.
    Shapes: x (B, C, H, W) → (B, C_out, H, W).

    With ``kernel="relu"`` this is timm's computation except for the normaliser's ε: timm adds
    1e-5 to the denominator, qtvit 1e-15 (the authors' value; the kernel math runs in float32).
    Only the kernel changes: QT-ViT's key APE and GELU(BN(v)) shortcut (docs/DESIGN.md §qt) are not added;
    build ``qtvit_b*`` models for those.
    """

    def __init__(self, qkv: nn.Module, aggreg: nn.ModuleList, proj: nn.Module, dim: int,
                 kernel: str = "qt", impl: str = "auto", **kernel_params) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = qkv
        self.aggreg = aggreg
        self.proj = proj
        self.impl = impl
        self.kernel_params = _new_kernel_params(kernel, kernel_params, self._weight())

    @classmethod
    def from_timm(cls, src: nn.Module, kernel: str, impl: str, **kernel_params) -> KernelLiteMLA:
        new = cls(src.qkv, src.aggreg, src.proj, src.dim, kernel, impl, **kernel_params)
        new.train(src.training)
        return new

    def _weight(self) -> Tensor:
        return next(self.qkv.parameters())

    @property
    def kernel(self) -> str:
        return self.kernel_params.kernel

    def set_kernel(self, kernel: str, **kernel_params) -> None:
        """Switch the kernel in place (convs kept; new kernel parameters start fresh)."""
        self.kernel_params = _new_kernel_params(kernel, kernel_params, self._weight())

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        d = self.dim
        qkv = self.qkv(x)  # (B, 3·h·d, H, W)
        multi = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)  # (B, 3·h·d·(1+S), H, W)
        multi = multi.reshape(B, -1, 3 * d, H * W).transpose(-1, -2)  # (B, h', N, 3d), h' = h·(1+S)
        q, k, v = multi.split(d, dim=-1)  # each (B, h', N, d)
        out = self.kernel_params.attend(q, k, v, self.impl)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)  # (B, h'·d, H, W)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, impl={self.impl!r}"


def _timm_classes() -> tuple[type | None, type | None]:
    """timm's ViT ``Attention`` and ``efficientvit_mit.LiteMLA`` classes (None where unavailable)."""
    try:
        from timm.layers import Attention
    except ImportError:  # timm missing or too old
        Attention = None
    try:
        from timm.models.efficientvit_mit import LiteMLA
    except ImportError:
        LiteMLA = None
    return Attention, LiteMLA


def _check_timm_attention(name: str, module: nn.Module, base: type) -> None:
    """Refuse timm Attention variants whose computation the replacement would not reproduce."""
    where = f"{name or 'model'} ({type(module).__name__})"
    if type(module).forward is not base.forward:
        raise TypeError(f"cannot swap {where}: a timm Attention subclass with its own forward is unsupported")
    for attr in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim"):
        if not hasattr(module, attr):
            raise TypeError(f"cannot swap {where}: timm Attention without {attr!r} is not supported")
    if not isinstance(module.qkv, nn.Linear) or not isinstance(module.proj, nn.Linear):
        raise TypeError(f"cannot swap {where}: qkv and proj must be nn.Linear")


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def swap_attention(model: nn.Module, kernel: str = "qt", *, impl: str | None = None,
                   return_count: bool = False, **kernel_params) -> nn.Module | tuple[nn.Module, int]:
    """Replace every supported attention module of ``model`` by ``kernel`` attention, in place.

    Args:
        model: a timm VisionTransformer-family model (modules of class ``timm.layers.Attention``),
            a timm ``efficientvit_*`` model (``LiteMLA``), a qtvit model, or a single such module.
        kernel: a name from :func:`qtvit.list_kernels` (default ``"qt"``). Swapping to the kernel the
            model already computes (``"softmax"`` for timm ViTs, ``"relu"`` for timm EfficientViT)
            keeps its outputs.
        impl: ``"auto"``, ``"linear"`` or ``"dense"`` (see :func:`qtvit.attention`); None keeps a
            qtvit module's setting and uses ``"auto"`` for replaced timm modules.
        return_count: also return how many modules were swapped.
        **kernel_params: the kernel's parameters; learnable ones become fresh ``nn.Parameter``s
            (one set per swapped module) on the module's device, in its dtype.

    Returns:
        ``model`` (modified in place; when ``model`` itself is a timm attention module the
        replacement is returned instead, so always use the return value), or ``(model, count)``.

    Raises:
        ValueError: unknown kernel or parameter, or nothing in ``model`` could be swapped (the
            message names the attention-like modules found).
        TypeError: a timm Attention variant this function cannot reproduce (named in the message).

    Create the optimizer after swapping (or add the new kernel parameters to it): the projection
    weights are the same tensors as before, the kernel parameters are new.
    """
    get_kernel(kernel).resolve_params(kernel_params)  # unknown kernel/parameter: raise before any change
    if impl is not None and impl not in ("auto", "linear", "dense"):
        raise ValueError(f"unknown impl {impl!r}; valid: auto, linear, dense")
    TimmAttention, TimmLiteMLA = _timm_classes()
    timm_types = tuple(t for t in (TimmAttention, TimmLiteMLA) if t is not None)

    # Plan first (named_modules must not change while iterating), outermost timm modules win.
    replace: list[tuple[str, nn.Module]] = []
    settable: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(r + ".") or r == "" for r, _ in replace):
            continue  # inside a module being replaced
        if timm_types and isinstance(module, timm_types):
            if TimmAttention is not None and isinstance(module, TimmAttention):
                _check_timm_attention(name, module, TimmAttention)
            replace.append((name, module))
        elif callable(getattr(module, "set_kernel", None)):
            settable.append((name, module))
    # A container whose set_kernel just delegates (a qtvit model's) would double-count: keep the innermost.
    names = [n for n, _ in settable]
    settable = [(n, m) for n, m in settable
                if not any(o != n and (n == "" or o.startswith(n + ".")) for o in names)]

    if not replace and not settable:
        seen = sorted({type(m).__name__ for m in model.modules() if "attn" in type(m).__name__.lower()
                       or "attention" in type(m).__name__.lower() or "mla" in type(m).__name__.lower()})
        found = f"; attention-like modules found: {', '.join(seen)}" if seen else ""
        hint = "" if timm_types else " (timm is not installed, so timm modules are not recognised)"
        raise ValueError(
            f"swap_attention found nothing to swap in {type(model).__name__}: supported are timm "
            f"Attention (ViT/DeiT family), timm efficientvit_mit LiteMLA and modules with set_kernel()"
            f"{found}{hint}")

    for name, module in replace:
        if TimmAttention is not None and isinstance(module, TimmAttention):
            new = TimmKernelAttention.from_timm(module, kernel, impl or "auto", **kernel_params)
        else:
            new = KernelLiteMLA.from_timm(module, kernel, impl or "auto", **kernel_params)
        if name == "":
            model = new
        else:
            _set_child(model, name, new)
    for _, module in settable:
        module.set_kernel(kernel, **kernel_params)
        if impl is not None and hasattr(module, "impl"):
            module.impl = impl
    count = len(replace) + len(settable)
    return (model, count) if return_count else model


__all__ = ["KernelLiteMLA", "TimmKernelAttention", "swap_attention"]
