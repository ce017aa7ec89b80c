"""``qtvit.attention``: any registered kernel, dense (N×M weights) or linear (O(N) feature maps).

Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, e) → out (B, H, N, e).

Numerics: the kernel math always runs in float32 (float64 stays float64) with autocast
disabled for the tensors' device, and the result is cast back to the input dtype. ε = 1e-15 is
zero in fp16, so no division ever happens in half precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch

from . import triton as fused_triton
from .definitions import EPS
from .linear import concrete, linear_attention_core, needs_grad, over_chunks, tokens_per_chunk
from .registry import Kernel, get_kernel

Tensor = torch.Tensor

# Peak bytes of one chunk of dense N×M weights: queries are processed this many at a time so
# peak memory stays O(N·d + chunk·M). (The feature-map paths chunk by linear.CHUNK_BYTES.)
# Bigger on GPUs: fewer, larger matmuls (launch overhead dominates small ones).
DENSE_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (B, H, tokens, dim); got a {t.dim()}-D tensor of shape "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; attention needs a floating-point tensor")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            "q, k and v must share (B, H): got q "
            f"{tuple(q.shape[:2])}, k {tuple(k.shape[:2])}, v {tuple(v.shape[:2])}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim: q has {q.shape[-1]}, k has {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of tokens: k has {k.shape[-2]}, v has {v.shape[-2]}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype: got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device: got {q.device}, {k.device}, {v.device}")


def fp32_region(device: torch.device):
    """A context that disables autocast for ``device``'s type while it is enabled there.

    A no-op context when autocast is off (nothing is recorded in a traced or exported graph) or
    where the device type has no autocast.
    """
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # device types without autocast support (meta, ...)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False) if enabled else contextlib.nullcontext()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast_back(out: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to ``dtype``; for fp16, saturate at ±65504 so an out-of-range result is not inf."""
    if dtype == torch.float16:
        out = out.clamp(-65504.0, 65504.0)  # torch.finfo(torch.float16).max (TorchScript has no finfo)
    return out.to(dtype)


def _upcast(q: Tensor, k: Tensor, v: Tensor, params: dict) -> tuple[Tensor, Tensor, Tensor, dict]:
    """q, k, v and the tensor parameters in the compute dtype (float32; float64 stays float64)."""
    work = compute_dtype(q.dtype)
    params = {n: p.to(work) if isinstance(p, torch.Tensor) else p for n, p in params.items()}
    return q.to(work), k.to(work), v.to(work), params


def feature_map(x: Tensor, kernel: str | Kernel, role: str = "q", n_keys: int | None = None,
                **params) -> Tensor:
    """The full feature map φ(x) = [ψ(x), const], (B, H, T, d) → (B, H, T, D).

    ``role`` is ``"q"`` or ``"k"`` (they differ for ``sigmoid_softmax``); ``n_keys`` is the key
    count M (used by ``mean``), defaulting to T. Meant for analysis and tests: the attention
    paths never materialise the constant column.
    """
    kern = get_kernel(kernel)
    if kern.features is None:
        raise ValueError(f"kernel {kern.name!r} has no feature map (it is dense only)")
    params = kern.resolve_params(params)
    psi = kern.features(x, role, n_keys or x.shape[-2], **params)
    const = kern.constant_feature(params)
    if const is None:
        return psi
    const = torch.as_tensor(const, dtype=psi.dtype, device=psi.device)
    return torch.cat([psi, const.expand(*psi.shape[:-1], 1)], dim=-1)


def _linear_generic(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float = EPS) -> Tensor:
    """Feature-map path: out = φ(Q)[φ(K)ᵀ[V,1]], never building an N×M matrix, chunked over tokens.

    The constant features (c·c) contribute the same column c²·[Σ_j v_j; M] to every query, so it
    is added once per query instead of appending a constant to every token.
    """
    d, M = q.shape[-1], k.shape[-2]
    const = kern.constant_feature(params)
    D = kern.feature_dim(d, **params)
    return linear_attention_core(
        q, k, v,
        key_features=lambda x: kern.features(x, "k", M, **params),
        query_features=lambda x: (kern.features(x, "q", M, **params), None),
        width=D, normalized=kern.normalized, const_weight=None if const is None else const * const,
        eps=eps, scale=None if kern.output_scale is None else kern.output_scale(M),
        token_local=kern.token_local, grad_inputs=tuple(params.values()),
        recompute=D > 4 * d)  # large maps (taylor2's ~d²/2): recompute ψ in backward


def _dense(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float = EPS) -> Tensor:
    """Reference path: the N×M weight matrix from the pairwise formula, rows normalised.

    Queries are processed in chunks so the weights of one chunk stay under DENSE_CHUNK_BYTES.
    """
    if kern.dense_impl is not None:  # softmax: torch's fused kernels
        return kern.dense_impl(q, k, v, eps=eps, **params)
    B, H, N, _ = q.shape
    M = k.shape[-2]
    budget = DENSE_CHUNK_BYTES.get(q.device.type, DENSE_CHUNK_BYTES["cpu"])
    chunk = tokens_per_chunk(B * H * 4, M, q.element_size(), budget, minimum=1)  # ~4 temporaries of w's size

    def query_chunk(q_c: Tensor) -> Tensor:
        w = kern.pairwise(q_c, k, **params)  # (B, H, n, M)
        if kern.normalized:
            return (w @ v) / (w.sum(-1, keepdim=True) + eps)
        return w @ v if kern.output_scale is None else (w @ v) * kern.output_scale(M)

    grad = needs_grad(q, k, v, *params.values())
    return over_chunks(lambda s, t, _: query_chunk(q[..., s:t, :]), N, chunk, (B, H, N, v.shape[-1]), q, grad)


# --------------------------------------------------------------------------------- dispatch
# An implementation ("impl") is a runner(kern, q, k, v, params, eps) -> out (B, H, N, e). It is
# called with autocast disabled for the inputs' device, on q, k, v in their input dtype (a runner
# that computes in float32 upcasts them itself, ``_upcast``); its result is cast back to that
# dtype by ``kernel_attention``. A new impl is one entry in RUNNERS (and, if ``impl="auto"``
# should pick it, a rule in ``choose_impl``); see qtvit/kernels/README.md.
Runner = Callable[[Kernel, Tensor, Tensor, Tensor, dict, float], Tensor]


def _run_dense(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float) -> Tensor:
    return _dense(kern, *_upcast(q, k, v, params), eps)


def _run_linear(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float) -> Tensor:
    if not kern.has_linear:
        raise ValueError(f"kernel {kern.name!r} has no linear (feature-map) form; use impl='dense'")
    q, k, v, params = _upcast(q, k, v, params)
    if kern.linear_impl is not None:
        return kern.linear_impl(q, k, v, eps=eps, **params)
    return _linear_generic(kern, q, k, v, params, eps)


def _run_generic(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float) -> Tensor:
    if not kern.has_linear:
        raise ValueError(f"kernel {kern.name!r} has no linear (feature-map) form; use impl='dense'")
    return _linear_generic(kern, *_upcast(q, k, v, params), eps)


# ----- fused Triton kernels (qtvit/kernels/triton/): qt and relu as one custom op, inputs read in
# their own dtype and strides (no upcast copies; the kernels convert to float32 on load).


def _run_triton(kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float) -> Tensor:
    return fused_triton.fused_attention(q, k, v, kern.name, eps=eps, **params)


def _auto_picks_triton(kern: Kernel, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """``impl="auto"`` on CUDA: the fused kernels where they support the inputs and their one-time
    self-check (per device and dtype, cached; a failure logs one warning) passed. Never while
    exporting: an exported graph keeps plain PyTorch ops (ONNX, machines without qtvit's op)."""
    if torch.compiler.is_exporting() or not concrete(q.shape[-2], k.shape[-2]):
        return False
    return fused_triton.use_fused(q, k, v, kern.name)
# ----- end of the fused Triton kernels


RUNNERS: dict[str, Runner] = {
    "linear": _run_linear,  # O(N) feature maps (the kernel's specialised form where it has one)
    "dense": _run_dense,  # N×M weights from the pairwise formula: the reference
    "triton": _run_triton,  # fused Triton kernels, qt and relu (CUDA; CPU under TRITON_INTERPRET=1)
}
IMPLS = ("auto", *RUNNERS)


def choose_impl(kernel: str | Kernel, n_queries: int, n_keys: int, d: int, e: int, **params) -> str:
    """What ``impl="auto"`` picks: ``dense`` where the N×M product is cheaper than the feature path.

    Cost model in multiply-adds: dense N·M·(d + e), linear (N + M)·D·(e + 1). When the token
    counts are not plain ints (symbolic under ``torch.export`` and dynamic ``torch.compile``, or
    recorded by ``torch.jit.trace``) the choice is ``linear`` for every kernel that has it: an
    exported or traced graph holds one path, valid for every input size.
    """
    kern = get_kernel(kernel)
    if not kern.has_linear:
        return "dense"
    if not concrete(n_queries, n_keys):
        return "linear"
    D = kern.feature_dim(d, **kern.resolve_params(params))
    return "dense" if n_queries * n_keys * (d + e) <= (n_queries + n_keys) * D * (e + 1) else "linear"


def _run(runner: Runner, kern: Kernel, q: Tensor, k: Tensor, v: Tensor, params: dict, eps: float) -> Tensor:
    """The one place autocast is switched off around kernel math, and the result cast back."""
    in_dtype = q.dtype
    with fp32_region(q.device):
        out = runner(kern, q, k, v, params, eps)
    return cast_back(out, in_dtype)


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str | Kernel, impl: str,
                     params: Mapping[str, object], eps: float = EPS) -> Tensor:
    """:func:`attention` with the kernel's parameters as one mapping (what the modules call).

    ``params`` holds tensors (learnable ones, e.g. an ``nn.Parameter``) and fixed Python values
    (``pool``, ``chunks``, ``seed``); missing ones take the kernel's defaults.
    """
    kern = get_kernel(kernel)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    _check_inputs(q, k, v)
    params = kern.resolve_params(dict(params))
    if impl == "auto":
        impl = "triton" if _auto_picks_triton(kern, q, k, v) else \
            choose_impl(kern, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], **params)
    return _run(RUNNERS[impl], kern, q, k, v, params, eps)


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str | Kernel = "qt", impl: str = "auto", *,
              eps: float = EPS, **params) -> Tensor:
    """Kernel attention out_i = Σ_j w(q_i, k_j) v_j [/ Σ_j w(q_i, k_j)].

    Args:
        q: queries (B, H, N, d).
        k: keys (B, H, M, d).
        v: values (B, H, M, e); e may differ from d.
        kernel: a name from :func:`qtvit.list_kernels` (default ``"qt"``).
        impl: ``"linear"`` (O(N) feature-map path), ``"dense"`` (N×M weights from the pairwise
            formula; the reference), ``"triton"`` (fused Triton kernels for ``qt`` and ``relu``:
            CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``) or ``"auto"`` (on CUDA the
            Triton kernels where they apply and pass a one-time self-check; otherwise linear
            unless dense is cheaper, e.g. tiny N; always linear when the token counts are
            symbolic, as under ``torch.export``).
        eps: added to the normaliser of normalised kernels (default 1e-15, the released
            QT-ViT/EfficientViT value; timm's EfficientViT port uses 1e-5). Always added in fp32.
        **params: the kernel's parameters (``const`` for ``qt``; ``alpha, beta, gamma`` for
            ``qt_paper``; ``pool``, ``chunks``, ``seed`` for the reduced taylor2 kernels). They
            may be tensors that require grad.

    Returns:
        (B, H, N, e) in the input dtype. Computed in float32 (float64 inputs: float64) with
        autocast disabled. The linear path returns a transposed view of (B, H, e, N) memory
        (what a conv backbone reshapes to (B, H·e, h, w) for free); use ``reshape`` rather than
        ``view`` on it, or ``.contiguous()``.
    """
    return kernel_attention(q, k, v, kernel, impl, params, eps)


def linear_attention_generic(q: Tensor, k: Tensor, v: Tensor, kernel: str | Kernel, *, eps: float = EPS,
                             **params) -> Tensor:
    """The generic feature-map path even for kernels with a specialised one (for tests/benchmarks)."""
    kern = get_kernel(kernel)
    _check_inputs(q, k, v)
    return _run(_run_generic, kern, q, k, v, kern.resolve_params(params), eps)


__all__ = ["attention", "kernel_attention", "feature_map", "choose_impl", "linear_attention_generic",
           "IMPLS", "RUNNERS", "fp32_region", "cast_back", "compute_dtype"]
