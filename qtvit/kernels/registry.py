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

# Features (ψ, const): φ(x) = [ψ(x), const]. The constant is kept apart so the linear
# path can fold it algebraically instead of appending a column of constants.
FeatureFn = Callable[..., tuple[Tensor, "float | Tensor"]]
PairwiseFn = Callable[..., Tensor]
LinearFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Kernel:
    """Description of one attention kernel.

    Attributes:
        name: registry name (``qtvit.attention(..., kernel=name)``).
        normalized: if True, out_i = Σ_j w_ij v_j / Σ_j w_ij (paper Eq. 3); otherwise
            out_i = scale · Σ_j w_ij v_j.
        params: keyword parameters and their defaults (``const`` for ``qt``, ...).
        learnable: the subset of ``params`` a module should own as ``nn.Parameter``.
        pairwise: ``pairwise(q, k, **params) -> w`` of shape (B, H, N, M), the dense reference.
            None for ``softmax`` (computed by SDPA).
        features: ``features(x, role, n_keys, **params) -> (ψ, const)`` with ψ (B, H, T, D-1)
            for a token axis of length T. None if the kernel has no feature map.
        feature_dim: ``feature_dim(d, **params) -> D`` including the constant feature.
        output_scale: ``output_scale(n_keys) -> float`` for unnormalised kernels (``cosine``
            divides by M); 1 when None.
        linear_impl: optional specialised O(N) path ``linear_impl(q, k, v, eps=..., **params)`` used
            instead of the generic feature-map path (must agree with it and with ``pairwise``).
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
    feature_dim: Callable[..., int] | None = None
    output_scale: Callable[[int], float] | None = None
    linear_impl: LinearFn | None = None
    reference: str = ""

    @property
    def has_linear(self) -> bool:
        return self.features is not None

    @property
    def has_dense(self) -> bool:
        return True

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
