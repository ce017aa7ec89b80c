"""The kernel registry: one :class:`Kernel` record per attention kernel, looked up by name.

Shape legend used throughout ``qtvit.kernels``:
    B batch, H heads, N query tokens, M key tokens, d query/key head dim,
    e value head dim, D feature dimension of the kernel's feature map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

# ψ(x, role, n_keys, **params): (B, H, T, d) → (B, H, T, D - 1 if there is a constant feature else D).
FeatureFn = Callable[..., Tensor]
PairwiseFn = Callable[..., Tensor]
LinearFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Kernel:
    """Description of one attention kernel: its formulas and the properties the paths rely on.

    Attributes:
        name: registry name (``qtvit.attention(..., kernel=name)``).
        normalized: if True, out_i = Σ_j w_ij v_j / (Σ_j w_ij + ε) (paper Eq. 3); otherwise
            out_i = output_scale(M) · Σ_j w_ij v_j.
        params: keyword parameters and their defaults (``const`` for ``qt``, ...).
        learnable: the subset of ``params`` a module should own as ``nn.Parameter``.
        pairwise: ``pairwise(q, k, **params) -> w`` of shape (B, H, N, M), the dense reference.
        features: ``features(x, role, n_keys, **params) -> ψ`` with ψ (B, H, T, D') for a token
            axis of length T (``role`` is ``"q"`` or ``"k"``). The full feature map is
            φ(x) = [ψ(x), c] with c the ``constant`` feature. None if the kernel is dense only.
        constant: the constant feature c shared by queries and keys, so w = ψ(q)·ψ(k) + c²: a
            number, or a function of the kernel's parameters (``constant(**params)``, e.g. qt's
            learnable ``const``). None if φ has no constant feature. The linear path never
            appends it as a column: it adds c²·[Σ_j v_j; M] to every query's sums instead.
        token_local: ψ of a token depends on that token only, so keys may be processed in chunks.
            False when a key's features depend on all keys (``sigmoid_softmax``'s softmax over
            the token axis).
        feature_dim: ``feature_dim(d, **params) -> D`` including the constant feature.
        output_scale: ``output_scale(n_keys) -> float`` of unnormalised kernels (``cosine``
            divides by M); 1 when None.
        linear_impl: optional specialised O(N) path ``linear_impl(q, k, v, eps=..., **params)`` used
            instead of the generic feature-map path (must agree with it and with ``pairwise``).
        dense_impl: optional specialised dense path ``dense_impl(q, k, v, eps=..., **params)`` used
            instead of the chunked pairwise weights (``softmax``: torch's fused SDPA kernels).
        reference: the paper's Table 2/3 number, for docs and reproduction tables.
        description: one line for ``qtvit kernels`` and the docs.
    """

    name: str
    normalized: bool
    description: str
    params: dict[str, object] = field(default_factory=dict)
    learnable: tuple[str, ...] = ()
    pairwise: PairwiseFn | None = None
    features: FeatureFn | None = None
    constant: float | Callable[..., float | Tensor] | None = None
    token_local: bool = True
    feature_dim: Callable[..., int] | None = None
    output_scale: Callable[[int], float] | None = None
    linear_impl: LinearFn | None = None
    dense_impl: LinearFn | None = None
    reference: str = ""

    @property
    def has_linear(self) -> bool:
        return self.features is not None

    def constant_feature(self, params: dict[str, object]) -> float | Tensor | None:
        """c for these (resolved) parameters; None if the feature map has no constant feature."""
        if self.constant is None or isinstance(self.constant, (int, float)):
            return self.constant
        return self.constant(**params)

    def resolve_params(self, given: dict[str, object]) -> dict[str, object]:
        """Fill defaults and reject unknown keyword parameters with a message naming them."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise TypeError(
                f"kernel {self.name!r} got unknown parameter(s) {', '.join(unknown)}; valid: {valid}"
            )
        return {**self.params, **given}


_REGISTRY: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry. Registering a name twice raises ``ValueError``."""
    if kernel.name in _REGISTRY:
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    _REGISTRY[kernel.name] = kernel
    return kernel


def get_kernel(name: str | Kernel) -> Kernel:
    """Return the registered kernel ``name``; an unknown name raises ``ValueError`` listing valid ones."""
    if isinstance(name, Kernel):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention kernel {name!r}; valid kernels: {', '.join(list_kernels())}"
        ) from None


def list_kernels(linear_only: bool = False) -> list[str]:
    """Names of the registered kernels in registration order (``linear_only``: with a feature map)."""
    return [n for n, k in _REGISTRY.items() if k.has_linear or not linear_only]
