"""Every kernel of the paper (docs/DESIGN.md §kernels): feature maps ψ, constants, pairwise weights.

Each kernel is written twice, from two different formulas, so one checks the other:
  * ``pairwise(q, k)``: the weight w(q_i, k_j) straight from its definition, (B, H, N, M);
  * ``features(x)``: ψ(x) of the feature map φ(x) = [ψ(x), c] with φ(q)·φ(k) = w(q, k).
The constant feature c is a field of the Kernel (``constant``), so the linear path adds
c²·[Σ_j v_j; M] to every query's sums instead of appending a column of constants to every token.

Shapes: q (B, H, N, d), k (B, H, M, d), x (B, H, T, d) for any token axis length T.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .linear import linear_attention_core, needs_grad
from .registry import Kernel, register_kernel

Tensor = torch.Tensor

# ε of the normalised kernels' denominators and of qt's two normalisations (the released code's
# value). It is zero in fp16, which is why all kernel math runs in float32 (see functional.py).
EPS = 1e-15
# Floor on ‖x‖ when forming unit vectors (angular, taylor1, cosine): a zero vector maps to zero.
UNIT_EPS = 1e-12


# Floor of row_norm: the smallest power of ten whose square is a normal float32, so the squared
# norm can be clamped before its square root (the gradient of √s at s = 0 is infinite).
ROW_NORM_FLOOR = 1e-19


def row_norm(x: Tensor, floor: float = ROW_NORM_FLOOR) -> Tensor:
    """max(‖x‖₂, floor) over the last dim: (..., d) → (..., 1).

    ``torch.linalg.vector_norm`` is fast when the last dim is contiguous but ~30× slower than a
    square-and-sum when it is strided, as for q = qkv.transpose(-1, -2) in a conv backbone
    (memory (d, N)): there the sum is a vectorised reduction across contiguous token rows.
    """
    floor = max(floor, ROW_NORM_FLOOR)
    if x.stride(-1) == 1 or x.shape[-1] == 1:
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(floor)
    return (x * x).sum(-1, keepdim=True).clamp_min(floor * floor).sqrt()


def _unit(x: Tensor) -> Tensor:
    return x / row_norm(x, UNIT_EPS)


def _unit_cosine(q: Tensor, k: Tensor) -> Tensor:
    """q̂·k̂ for every pair, as (q·k)/(‖q‖‖k‖): (B, H, N, M)."""
    qn = row_norm(q, UNIT_EPS)  # (B, H, N, 1)
    kn = row_norm(k, UNIT_EPS).transpose(-1, -2)  # (B, H, 1, M)
    return (q @ k.transpose(-1, -2)) / (qn * kn)


@lru_cache(maxsize=64)
def _triu_pairs(m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (i, j), i ≤ j, of the upper triangle of an m×m matrix and the √2 weights of i<j."""
    i, j = torch.triu_indices(m, m, device=device)
    # float64 so that √2 is exact to the precision of whatever dtype it is cast to
    weight = torch.where(i == j, torch.tensor(1.0, dtype=torch.float64),
                         torch.tensor(math.sqrt(2.0), dtype=torch.float64)).to(device)
    return i, j, weight


def symmetric_outer(y: Tensor) -> Tensor:
    """Symmetric half of y⊗y: (..., m) → (..., m(m+1)/2), off-diagonal terms scaled by √2.

    sym(a)·sym(b) = Σ_ij a_i a_j b_i b_j = (a·b)², the same as vec(a⊗a)·vec(b⊗b) with about
    half the features.
    """
    i, j, weight = _triu_pairs(y.shape[-1], y.device)
    return y[..., i] * y[..., j] * weight.to(y.dtype)


def _sq_scores(q: Tensor, k: Tensor) -> Tensor:
    """s = q·k/√d for every pair: (B, H, N, M)."""
    return (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])


# ----------------------------------------------------------------------------------- softmax


def _softmax_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return torch.exp(_sq_scores(q, k))


def _softmax_sdpa(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    # Strided views (e.g. LiteMLA's q/k/v slices) make SDPA fall back to its math path, which
    # materialises the full N×M matrix; contiguous inputs get the fused kernels. SDPA subtracts
    # the row maximum, so it stays finite where exp(s) of the pairwise form overflows.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


register_kernel(Kernel(
    name="softmax",
    normalized=True,
    description="exp(q·k/√d), dense only (F.scaled_dot_product_attention)",
    pairwise=_softmax_pairwise,
    dense_impl=_softmax_sdpa,
    reference="79.8 (Table 2)",
))

# -------------------------------------------------------------------------------------- relu


def _relu_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return torch.einsum("bhnc,bhmc->bhnm", q.clamp_min(0), k.clamp_min(0))


def _relu_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return torch.relu(x)


register_kernel(Kernel(
    name="relu",
    normalized=True,
    description="φ(x)=ReLU(x) (EfficientViT)",
    pairwise=_relu_pairwise,
    features=_relu_features,
    feature_dim=lambda d: d,
    reference="79.4 (Table 2)",
))

# ------------------------------------------------------------------------------------ cosine


def _cosine_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return _unit(x)


register_kernel(Kernel(
    name="cosine",
    normalized=False,
    description="φ(x)=x/‖x‖ (Hydra); no normaliser, out = φ(Q)(φ(K)ᵀV)/M",
    pairwise=_unit_cosine,
    features=_cosine_features,
    feature_dim=lambda d: d,
    output_scale=lambda n_keys: 1.0 / n_keys,
    reference="79.1 (Table 2)",
))

# -------------------------------------------------------------------------------------- mean


def _mean_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return (q @ k.transpose(-1, -2)) / k.shape[-2]


def _mean_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return x / math.sqrt(n_keys)


register_kernel(Kernel(
    name="mean",
    normalized=False,
    description="φ(x)=x/√M (PolyNL); no normaliser, out = φ(Q)(φ(K)ᵀV)",
    pairwise=_mean_pairwise,
    features=_mean_features,
    feature_dim=lambda d: d,
    reference="78.8 (Table 2)",
))

# --------------------------------------------------------------------------- sigmoid_softmax


def _sigmoid_softmax_pairwise(q: Tensor, k: Tensor) -> Tensor:
    # softmax of each key channel over the token axis, written out as exp(k - logsumexp).
    k_soft = torch.exp(k - torch.logsumexp(k, dim=-2, keepdim=True))  # (B, H, M, d)
    return torch.einsum("bhnc,bhmc->bhnm", torch.sigmoid(q), k_soft)


def _sigmoid_softmax_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    if role == "q":
        return torch.sigmoid(x)
    return torch.softmax(x, dim=-2)


register_kernel(Kernel(
    name="sigmoid_softmax",
    normalized=True,
    description="φ(q)=σ(q), φ(k)=softmax of k over tokens (AFT-simple)",
    pairwise=_sigmoid_softmax_pairwise,
    features=_sigmoid_softmax_features,
    token_local=False,  # a key's features are a softmax over all keys
    feature_dim=lambda d: d,
    reference="78.9 (Table 2)",
))

# ----------------------------------------------------------------------------------- angular


def _angular_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return 0.5 + _unit_cosine(q, k) / math.pi


def _angular_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return _unit(x) / math.sqrt(math.pi)


register_kernel(Kernel(
    name="angular",
    normalized=True,
    description="w = 1/2 + q̂·k̂/π (Castling-ViT, linear part)",
    pairwise=_angular_pairwise,
    features=_angular_features,
    constant=math.sqrt(0.5),
    feature_dim=lambda d: d + 1,
    reference="79.1 (Table 2)",
))

# ----------------------------------------------------------------------------------- taylor1


def _taylor1_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return 1.0 + _unit_cosine(q, k) / math.sqrt(q.shape[-1])


def _taylor1_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return _unit(x) / x.shape[-1] ** 0.25


register_kernel(Kernel(
    name="taylor1",
    normalized=True,
    description="w = 1 + q̂·k̂/√d (ViTALiTy, 1st order)",
    pairwise=_taylor1_pairwise,
    features=_taylor1_features,
    constant=1.0,
    feature_dim=lambda d: d + 1,
    reference="78.5 (Table 2)",
))

# ------------------------------------------------------------------- taylor2 and its reductions
# All share w = 1 + s + Q(q, k)/2 with s = q·k/√d; they differ in the quadratic term Q, whose
# features are scaled by 1/√(2d) so that Q/2 keeps taylor2's scale.
# Feature map: ψ(x) = [quadratic features, x/d^¼], const = 1 (the constants 1/√2·1/√2 of the
# spec's φ and the 1·1 inside ϕ⊗ϕ add up to 1).


def _taylor2_family_features(quadratic: Tensor, x: Tensor) -> Tensor:
    """ψ = [quadratic features/√(2d), x/d^¼]; the family's constant feature is 1 (``constant=1.0``)."""
    d = x.shape[-1]
    return torch.cat([quadratic / math.sqrt(2 * d), x / d**0.25], dim=-1)


def _second_order_linear(q: Tensor, k: Tensor, v: Tensor, y_q: Tensor, y_k: Tensor, block: int,
                         eps: float = EPS) -> Tensor:
    """O(N) taylor2-family attention without materialising the quadratic features.

    w(q, k) = 1 + s + Σ_{a,b same block} y_q,a y_q,b · y_k,a y_k,b / (2d), with y = x (taylor2),
    pooled x (taylor2_pool) or x cut into blocks (taylor2_chunk). Rather than building the
    (B, H, N, m(m+1)/2) feature tensor, loop over the first index a and contract the key side
    T_a = Σ_j y_k,ja · y_k,j[a:end] ⊗ [v_j, 1] (off-diagonal pairs counted twice), then
    out += (y_q,a · y_q[a:end]) @ T_a. Temporaries are (tokens × block) at most, so peak memory
    stays O(N·d) for any head dim, and no gather/concatenate passes are needed.
    q (B, H, N, d), k (B, H, M, d), v (B, H, M, e), y_q (B, H, N, m), y_k (B, H, M, m).
    """
    d, e = q.shape[-1], v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, M, e+1)
    # constant and linear terms: Σ_j [v_j,1] + q·(Σ_j k_j ⊗ [v_j,1])/√d
    out = torch.baddbmm(v1.sum(-2, keepdim=True).flatten(0, 1), q.flatten(0, 1),
                        (k.transpose(-1, -2) @ v1).flatten(0, 1) / math.sqrt(d))  # (BH, N, e+1)
    m = y_q.shape[-1]
    for a in range(m):
        end = (a // block + 1) * block  # products pair a with b in [a, end): a's block
        pair_k = y_k[..., a:end] * y_k[..., a:a + 1]  # (B, H, M, end-a)
        t = pair_k.transpose(-1, -2) @ v1  # (B, H, end-a, e+1)
        t = torch.cat([t[..., :1, :], 2.0 * t[..., 1:, :]], dim=-2) / (2 * d)  # b≠a pairs count twice
        pair_q = y_q[..., a:end] * y_q[..., a:a + 1]  # (B, H, N, end-a)
        out = torch.baddbmm(out, pair_q.flatten(0, 1), t.flatten(0, 1))
    out = out.unflatten(0, q.shape[:2])  # (B, H, N, e+1)
    return out[..., :e] / (out[..., e:] + eps)


def _taylor2_pairwise(q: Tensor, k: Tensor) -> Tensor:
    s = _sq_scores(q, k)
    return 1.0 + s + 0.5 * s * s


def _taylor2_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return _taylor2_family_features(symmetric_outer(x), x)


register_kernel(Kernel(
    name="taylor2",
    normalized=True,
    description="w = 1 + s + s²/2 exactly (symmetric half of ϕ⊗ϕ), O(N·d³)",
    pairwise=_taylor2_pairwise,
    features=_taylor2_features,
    constant=1.0,
    feature_dim=lambda d: d * (d + 1) // 2 + d + 1,
    linear_impl=lambda q, k, v, eps: _second_order_linear(q, k, v, q, k, block=q.shape[-1], eps=eps),
    reference="79.7 (Table 3)",
))


def _check_divides(name: str, d: int, parts: int, what: str) -> None:
    if parts < 1 or d % parts:
        raise ValueError(f"kernel {name!r}: head dim d={d} must be divisible by {what}={parts}")


# The reductions' `scaling`. For q, k ~ N(0, I) with per-channel correlation ρ, the part of taylor2's
# E[Q] that grows with ρ — what makes w peak where q and k agree — is (d² + d)ρ²/(2d). "mean"
# (average pooling; chunk and sample sums as they fall) shrinks it to (d² + p·d)/p⁴, (d² + c·d)/c
# and (d + n)·d/d² of that (n: sampled squares x_a·x_a), about 1/p⁴, 1/c and 1/d, while the linear
# term s keeps its scale, so weights go negative. "preserve" multiplies the reduced quadratic term
# back by exactly that factor (sum pooling up to the (d+1)/(d+p) correction). `qtvit bench
# approximation` measures both; the evidence for the default is in the kernels README.
SCALINGS = ("mean", "preserve")
DEFAULT_SCALING = "mean"


def _quadratic_gain(name: str, scaling: str, shrink: float, d: int, kept_squares: float) -> float:
    """The factor on the reduced quadratic term: 1 for "mean"; for "preserve" the inverse of what the
    reduction does to E[Q]'s ρ-dependent part, ``shrink``·(d + 1)/(d + kept_squares)."""
    if scaling not in SCALINGS:
        raise ValueError(f"kernel {name!r}: unknown scaling {scaling!r}; valid: {', '.join(SCALINGS)}")
    return float(shrink) * (d + 1) / (d + kept_squares) if scaling == "preserve" else 1.0


def _pooled(x: Tensor, pool: int, scaling: str = "mean") -> Tensor:
    """Average- ("mean") or sum- ("preserve") pool the channel axis by ``pool``: (..., d) → (..., d/pool)."""
    _check_divides("taylor2_pool", x.shape[-1], pool, "pool")
    gain = _quadratic_gain("taylor2_pool", scaling, pool**4, x.shape[-1], pool) ** 0.25  # on y: Q ∝ y⁴
    return x.unflatten(-1, (x.shape[-1] // pool, pool)).mean(-1) * gain


def _taylor2_pool_pairwise(q: Tensor, k: Tensor, pool: int, scaling: str) -> Tensor:
    s = _sq_scores(q, k)
    sp = _pooled(q, pool, scaling) @ _pooled(k, pool, scaling).transpose(-1, -2)
    return 1.0 + s + sp * sp / (2 * q.shape[-1])


def _taylor2_pool_features(x: Tensor, role: str, n_keys: int, pool: int, scaling: str) -> Tensor:
    return _taylor2_family_features(symmetric_outer(_pooled(x, pool, scaling)), x)


def _pool_dim(d: int, pool: int, scaling: str = DEFAULT_SCALING) -> int:
    m = d // pool
    return m * (m + 1) // 2 + d + 1


register_kernel(Kernel(
    name="taylor2_pool",
    normalized=True,
    description="taylor2 with quadratic terms of x pooled to d/pool (sum: `scaling=preserve`, mean: `mean`)",
    params={"pool": 2, "scaling": DEFAULT_SCALING},
    pairwise=_taylor2_pool_pairwise,
    features=_taylor2_pool_features,
    constant=1.0,
    feature_dim=_pool_dim,
    linear_impl=lambda q, k, v, eps, pool, scaling: _second_order_linear(
        q, k, v, _pooled(q, pool, scaling), _pooled(k, pool, scaling), block=q.shape[-1] // pool, eps=eps),
    reference="79.3 (pool 2) / 79.1 (pool 4) (Table 3)",
))


def _chunked(x: Tensor, chunks: int) -> Tensor:
    """Split the channel axis into ``chunks`` equal slices: (..., d) → (..., chunks, d/chunks)."""
    _check_divides("taylor2_chunk", x.shape[-1], chunks, "chunks")
    return x.unflatten(-1, (chunks, x.shape[-1] // chunks))


def _chunk_gain(chunks: int, scaling: str, d: int) -> float:
    """Factor on x inside the quadratic term (Q ∝ x⁴): about chunks^¼ for "preserve", 1 for "mean"."""
    return _quadratic_gain("taylor2_chunk", scaling, chunks, d, chunks) ** 0.25


def _taylor2_chunk_pairwise(q: Tensor, k: Tensor, chunks: int, scaling: str) -> Tensor:
    s = _sq_scores(q, k)
    per_chunk = torch.einsum("bhncx,bhmcx->bhnmc", _chunked(q, chunks), _chunked(k, chunks))
    gain = _chunk_gain(chunks, scaling, q.shape[-1]) ** 4
    return 1.0 + s + per_chunk.pow(2).sum(-1) * gain / (2 * q.shape[-1])


def _taylor2_chunk_features(x: Tensor, role: str, n_keys: int, chunks: int, scaling: str) -> Tensor:
    y = _chunked(x * _chunk_gain(chunks, scaling, x.shape[-1]), chunks)
    quadratic = symmetric_outer(y).flatten(-2)  # (B, H, T, chunks·m(m+1)/2)
    return _taylor2_family_features(quadratic, x)


def _chunk_dim(d: int, chunks: int, scaling: str = DEFAULT_SCALING) -> int:
    m = d // chunks
    return chunks * m * (m + 1) // 2 + d + 1


register_kernel(Kernel(
    name="taylor2_chunk",
    normalized=True,
    description="taylor2 with quadratic terms = Kronecker products inside `chunks` slices of x (× chunks: "
                "`scaling=preserve`)",
    params={"chunks": 2, "scaling": DEFAULT_SCALING},
    pairwise=_taylor2_chunk_pairwise,
    features=_taylor2_chunk_features,
    constant=1.0,
    feature_dim=_chunk_dim,
    linear_impl=lambda q, k, v, eps, chunks, scaling: _second_order_linear(
        q, k, v, q * _chunk_gain(chunks, scaling, q.shape[-1]), k * _chunk_gain(chunks, scaling, q.shape[-1]),
        block=_chunked(q, chunks).shape[-1], eps=eps),
    reference="79.4 / 79.3 / 79.1 (chunks 2 / 4 / 8) (Table 3)",
))


_RANDOM_PAIRS: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}


@torch.compiler.assume_constant_result  # torch.compile: a constant of (d, seed), not traced
def random_product_pairs(d: int, seed: int) -> tuple[Tensor, Tensor]:
    """The d products x_a·x_b (a, b in [0, d)) that ``taylor2_random`` keeps, fixed by ``seed``."""
    key = (int(d), int(seed))
    if key not in _RANDOM_PAIRS:
        picked = torch.randperm(d * d, generator=torch.Generator().manual_seed(key[1]))[:d]
        _RANDOM_PAIRS[key] = (picked // d, picked % d)
    return _RANDOM_PAIRS[key]


def _random_gain(d: int, seed: int, scaling: str) -> float:
    """d of the d² products kept: about d for "preserve" (exactly, given how many are squares x_a·x_a)."""
    a, b = random_product_pairs(d, seed)
    return _quadratic_gain("taylor2_random", scaling, d, d, float((a == b).sum()))


def _taylor2_random_pairwise(q: Tensor, k: Tensor, seed: int, scaling: str) -> Tensor:
    d = q.shape[-1]
    a, b = random_product_pairs(d, seed)
    a, b = a.to(q.device), b.to(q.device)
    # Σ over the kept pairs (a, b) of (q_a q_b)(k_a k_b): the kept products of each side, matched
    quad = (q[..., a] * q[..., b]) @ (k[..., a] * k[..., b]).transpose(-1, -2)  # (B, H, N, M)
    return 1.0 + _sq_scores(q, k) + quad * _random_gain(d, seed, scaling) / (2 * d)


def _taylor2_random_features(x: Tensor, role: str, n_keys: int, seed: int, scaling: str) -> Tensor:
    d = x.shape[-1]
    a, b = random_product_pairs(d, seed)
    a, b = a.to(x.device), b.to(x.device)
    gain = _random_gain(d, seed, scaling) ** 0.5  # on both sides: Q gains about d
    return _taylor2_family_features(x[..., a] * x[..., b] * gain, x)


register_kernel(Kernel(
    name="taylor2_random",
    normalized=True,
    description="taylor2 with d randomly chosen (by `seed`) of the d² quadratic products; w may be < 0",
    params={"seed": 0, "scaling": DEFAULT_SCALING},
    pairwise=_taylor2_random_pairwise,
    features=_taylor2_random_features,
    constant=1.0,
    feature_dim=lambda d, **_: 2 * d + 1,
    reference="61.8 (Table 3)",
))

# ---------------------------------------------------------------------------------- qt_paper
# Paper Eq. 11: φ(x) = [α·x⊙x, β·(4/d)^¼·x, γ]/√2 ⊕ 1/√2, so
#   w = (α²⟨q⊙q, k⊙k⟩ + β²·(2/√d)·q·k + γ²)/2 + 1/2.
# Both constant features are merged into one, √((γ²+1)/2), shared by q and k.


def _qt_paper_pairwise(q: Tensor, k: Tensor, alpha, beta, gamma) -> Tensor:
    d = q.shape[-1]
    quad = (q * q) @ (k * k).transpose(-1, -2)
    lin = (q @ k.transpose(-1, -2)) * (2.0 / math.sqrt(d))
    return (alpha * alpha * quad + beta * beta * lin + gamma * gamma) / 2 + 0.5


def _qt_paper_features(x: Tensor, role: str, n_keys: int, alpha, beta, gamma) -> Tensor:
    d = x.shape[-1]
    return torch.cat([alpha * (x * x), (beta * (4.0 / d) ** 0.25) * x], dim=-1) / math.sqrt(2.0)


def _qt_paper_constant(alpha, beta, gamma):
    """The merged constant feature √((γ²+1)/2) (a tensor when γ is one, e.g. a learnable parameter)."""
    if isinstance(gamma, Tensor):
        return torch.sqrt((gamma * gamma + 1) / 2)
    return math.sqrt((gamma * gamma + 1) / 2)


register_kernel(Kernel(
    name="qt_paper",
    normalized=True,
    description="paper Eq. 11: [α·x⊙x, β(4/d)^¼x, γ]/√2 ⊕ 1/√2 with learnable α, β, γ",
    params={"alpha": 1.0, "beta": 0.0, "gamma": 1.0},
    learnable=("alpha", "beta", "gamma"),
    pairwise=_qt_paper_pairwise,
    features=_qt_paper_features,
    constant=_qt_paper_constant,
    feature_dim=lambda d, **_: 2 * d + 1,
    reference="79.6 (paper form)",
))

# ---------------------------------------------------------------------------------------- qt
# The released code's kernel (docs/DESIGN.md §qt): x̂ = n(n(x)²) with n(x) = x/(‖x‖+ε),
# w(q, k) = ⟨q̂, k̂⟩ + c², normalised. (APE and the GELU(BN(v)) shortcut belong to the layer.)


def qt_hat(x: Tensor) -> Tensor:
    """x/(‖x‖+ε), square, x/(‖x‖+ε), as the authors' code does (docs/DESIGN.md §qt): (..., d) → (..., d)."""
    x = x / (row_norm(x) + EPS)
    x = x * x
    return x / (row_norm(x) + EPS)


def _qt_pairwise(q: Tensor, k: Tensor, const) -> Tensor:
    return qt_hat(q) @ qt_hat(k).transpose(-1, -2) + const * const


def _qt_features(x: Tensor, role: str, n_keys: int, const) -> Tensor:
    return qt_hat(x)


# Floor on r(x) = ‖x⊙x‖ in the linear qt path: 1/r scales the keys, so it must stay finite. Its
# square (1e-38) is still a normal float32, so row_norm can clamp before its square root (finite
# gradients). It only binds for ‖x‖ < ~3e-10, where x⁴ underflows float32 anyway.
QT_NORM_FLOOR = 1e-19


def _qt_linear(q: Tensor, k: Tensor, v: Tensor, eps: float, const) -> Tensor:
    """O(N) qt attention with both normalisations and the constant feature folded algebraically.

    The authors' normalisation gives x̂ = x²/r(x), r(x) = ‖x²‖ (the first normalisation only rescales x;
    the released code's ε changes r by < ε·√d relative). With S = Σ_j [v_j; 1] and
    [KV; Kz] = Σ_j [v_j; 1] k̂_jᵀ, multiplying numerator and denominator by r(q_i):
        out_i = (KV·q_i² + r(q_i)·c²S_v) / (Kz·q_i² + r(q_i)·(c²M + ε)).
    So queries are never normalised (their norm only scales the constant column) and beyond ReLU
    attention the cost is two squares, two row norms and one in-place scaling of the keys.
    q (B, H, N, d), k (B, H, M, d), v (B, H, M, e) → (B, H, N, e) (a view of (B, H, e, N) memory).
    """
    d = k.shape[-1]
    grad = needs_grad(q, k, v, const)

    def key_features(k_c: Tensor) -> Tensor:  # k̂ = k²/r(k): (B, H, n, d)
        k2 = k_c * k_c
        r = row_norm(k2, QT_NORM_FLOOR)  # (B, H, n, 1)
        return k2 / r if grad else k2.div_(r)

    def query_features(q_c: Tensor) -> tuple[Tensor, Tensor]:  # q² and r(q), (B, H, n, d|1)
        q2 = q_c * q_c
        return q2, row_norm(q2, QT_NORM_FLOOR)

    # constant column c²·[Σ_j v_j; M], with ε inside the normaliser's entry (scaled by r(q) too)
    return linear_attention_core(q, k, v, key_features, query_features, width=d + 1,
                                 const_weight=const * const, eps=eps, grad_inputs=(const,))


register_kernel(Kernel(
    name="qt",
    normalized=True,
    description="QT-ViT released form: w = ⟨n(n(q)²), n(n(k)²)⟩ + c², learnable c (default)",
    params={"const": 1.0},
    learnable=("const",),
    pairwise=_qt_pairwise,
    features=_qt_features,
    constant=lambda const: const,
    feature_dim=lambda d, **_: d + 1,
    linear_impl=_qt_linear,
    reference="79.6 (Table 2)",
))

# -------------------------------------------------------------------------------------- none
# The ablation control "no attention": w = 0, so a LiteMLA keeps everything but global token
# mixing (its multi-scale aggregation, the GELU(BN(v)) shortcut and the projection still run).
# The zeros are products with q, k and v rather than constants, so gradients reach the inputs
# (as exact zeros) and every path (dense, linear, autograd) treats it like any other kernel.


def _none_pairwise(q: Tensor, k: Tensor) -> Tensor:
    return (q[..., :1] * 0.0) @ (k[..., :1] * 0.0).transpose(-1, -2)  # zeros, (B, H, N, M)


def _none_features(x: Tensor, role: str, n_keys: int) -> Tensor:
    return x[..., :1] * 0.0  # one zero feature per token: (B, H, T, 1)


register_kernel(Kernel(
    name="none",
    normalized=False,
    description="control: w = 0, attention output zero (LiteMLA keeps aggregation, shortcut, projection)",
    pairwise=_none_pairwise,
    features=_none_features,
    feature_dim=lambda d: 1,
    reference="",
))
