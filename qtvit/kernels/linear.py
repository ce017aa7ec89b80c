"""The O(N) path shared by every feature-map kernel (relu, cosine, qt, …).

For a normalised kernel with features ψ (and an optional constant feature folded into one column),

    out_i = (ψ(q_i)·KVᵀ + s_i·c_v) / (ψ(q_i)·Kz + s_i·c_z [+ ε]),
    KV = Σ_j v_j ψ(k_j)ᵀ  (e, D),   Kz = Σ_j ψ(k_j)  (D,),

where [c_v; c_z] is the constant column (the constant features' contribution, e.g. c²·[Σ_j v_j; M]
for qt) and s_i a per-query scale of it (qt folds its query normalisation there; 1 otherwise).

Layout, because it decides the speed on CPUs: the key sums are kept as one (e+1, D) matrix
A = [KV; Kz] and the queries are contracted as A @ ψ(q)ᵀ, which yields the result transposed,
(B, H, e+1, n). Products whose output rows are e+1 = 17 floats wide are ~1.5× slower in
BLAS than this orientation (the wide axis is the token axis), the ones column is never
concatenated onto V (Kz is a plain sum over tokens), and the final division reads and writes
contiguous rows. The result is returned as a (B, H, N, e) *view* of a (B, H, e, N) tensor, which
is exactly the layout a conv backbone wants next ((B, H·e, h, w) is then a free reshape).

Tokens are processed in chunks of about CHUNK_BYTES, so the temporaries of one chunk stay in
cache and peak memory is O(chunk·D) beyond the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

# Bytes of one chunk's (B, H, tokens, width) temporaries: a few MiB keeps a chunk's passes in a
# core's L2/L3 (2-core EPYC, 8 heads × 17 floats: 2–3 MiB chunks ran qt 1.5× faster at N=65536
# than 8 MiB ones with the old layout, and 1–8 MiB are within 10% in this one). Never fewer than
# MIN_CHUNK_TOKENS tokens, to bound per-op overhead.
CHUNK_BYTES = 3 * 2**20
MIN_CHUNK_TOKENS = 256


def tokens_per_chunk(rows: int, width: int, itemsize: int, budget: int | None = None,
                     minimum: int = MIN_CHUNK_TOKENS) -> int:
    """Tokens per chunk so that a (rows, tokens, width) tensor stays under ``budget`` (CHUNK_BYTES)."""
    return max(minimum, (budget or CHUNK_BYTES) // max(1, rows * width * itemsize))


def balanced(n: int, chunk: int) -> int:
    """The chunk length that splits n tokens into equal parts no longer than ``chunk``."""
    parts = -(-n // max(1, chunk))
    return -(-n // parts)


def over_chunks(fn, n: int, chunk: int, out_shape: tuple[int, ...], like: Tensor, grad: bool,
                dim: int = -2) -> Tensor:
    """Assemble ``fn(s, t, out)`` for token ranges [s, t) of length ``chunk`` along ``dim``.

    With autograd, or under ``torch.compile`` (which cannot trace ``out=`` into a strided slice
    and plans the buffers itself), the pieces are concatenated. Otherwise they go straight into one
    preallocated output: ``out`` is its slice, which ``fn`` may write
    (``torch.div(..., out=out)``) or ignore (the result is copied in). Freed chunk temporaries
    are then reused instead of fragmenting the heap behind a growing list.
    """
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(ranges) == 1:
        return fn(0, n, None)
    if grad or torch.compiler.is_compiling():
        return torch.cat([fn(s, t, None) for s, t in ranges], dim=dim)
    out = like.new_empty(out_shape)
    for s, t in ranges:
        dst = out.narrow(dim, s, t - s)
        piece = fn(s, t, dst)
        if piece.data_ptr() != dst.data_ptr():
            dst.copy_(piece)
    return out


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def linear_attention_core(q: Tensor, k: Tensor, v: Tensor,
                          key_features: Callable[[Tensor], Tensor],
                          query_features: Callable[[Tensor], tuple[Tensor, Tensor | None]],
                          *, width: int, normalized: bool = True, const_weight=None,
                          eps: float = 0.0, eps_in_const: bool = False, scale: float = 1.0,
                          key_chunk: int | None = None, grad_inputs: tuple = (),
                          recompute: bool = False) -> Tensor:
    """out = ψ(Q)[ψ(K)ᵀ[V, 1]] (+ constant column), chunked over tokens, never building N×M.

    Args:
        q, k, v: (B, H, N, d), (B, H, M, d), (B, H, M, e), any strides.
        key_features: ψ for a chunk of keys, (B, H, n, d) → (B, H, n, D).
        query_features: ψ for a chunk of queries, (B, H, n, d) → ((B, H, n, D), s) with s the
            per-query scale (B, H, n, 1) of the constant column or None (scale 1).
        width: D, only used to size the chunks.
        normalized: divide by the last row (the normaliser) instead of returning the sums.
        const_weight: the constant features' weight w (a float or a scalar tensor, e.g. c² for
            qt); adds the column w·[Σ_j v_j; M] (w·Σ_j v_j unnormalised) to every query's sums,
            times s. None if the kernel has no constant feature. Σ_j v_j is summed chunk by
            chunk while v is in cache.
        eps: added to the normaliser: after the constant column, or inside it (times s) if
            ``eps_in_const``.
        scale: multiplies an unnormalised result (e.g. mean's 1/M).
        key_chunk: tokens per key chunk (keys whose features depend on all keys need M).
        grad_inputs: tensors besides q, k, v that may require grad (kernel parameters).
        recompute: checkpoint each chunk (large feature maps: recompute ψ in backward instead
            of storing it, so gradients stay O(N·d)).

    Returns:
        (B, H, N, e): a transposed view of a contiguous (B, H, e, N) tensor.
    """
    B, H, N, _ = q.shape
    M, e = k.shape[-2], v.shape[-1]
    grad = needs_grad(q, k, v, const_weight, *grad_inputs)
    chunk = tokens_per_chunk(B * H, max(width, e + 1), q.element_size())

    with_const = const_weight is not None

    def key_sums(k_c: Tensor, v_c: Tensor) -> Tensor:  # (B, H, e', D [+1])
        psi = key_features(k_c)  # (B, H, n, D)
        parts = [v_c.transpose(-1, -2) @ psi]  # (B, H, e, D)
        if normalized:
            parts.append(psi.sum(-2, keepdim=True))  # (B, H, 1, D)
        out = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        if with_const:  # Σ_j v_j as one more column, summed while v_c is in cache
            v_sum = v_c.sum(-2).unsqueeze(-1)  # (B, H, e, 1)
            if normalized:
                v_sum = torch.cat([v_sum, torch.full_like(v_sum[..., :1, :], v_c.shape[-2])], dim=-2)
            out = torch.cat([out, v_sum], dim=-1)
        return out

    step = key_chunk or balanced(M, chunk)
    chunk = balanced(N, chunk)
    sums = None
    for s in range(0, M, step):
        args = (k[..., s:s + step, :], v[..., s:s + step, :])
        part = checkpoint(key_sums, *args, use_reentrant=False) if recompute and grad else key_sums(*args)
        sums = part if sums is None else (sums + part if grad else sums.add_(part))
    const_col = None  # (B, H, e', 1): w·[Σ_j v_j; M] (+ ε in the normaliser's entry)
    if with_const:
        sums, const_col = sums[..., :-1], sums[..., -1:] * const_weight
        if eps_in_const and normalized and eps:
            const_col = torch.cat([const_col[..., :e, :], const_col[..., e:, :] + eps], dim=-2)
        eps = 0.0 if eps_in_const else eps

    def query_block(q_c: Tensor, sums: Tensor, const_col: Tensor | None,
                    out: Tensor | None = None) -> Tensor:  # (B, H, e, n)
        psi, s_q = query_features(q_c)  # (B, H, n, D), (B, H, n, 1) | None
        o = sums @ psi.transpose(-1, -2)  # (B, H, e', n)
        if const_col is not None:
            if s_q is None:
                o = o + const_col if grad else o.add_(const_col)
            else:
                o = torch.addcmul(o, const_col, s_q.transpose(-1, -2)) if grad else \
                    o.addcmul_(const_col, s_q.transpose(-1, -2))
        if normalized:
            den = o[..., e:, :]
            if eps:
                den = den + eps if grad else den.add_(eps)
            return torch.div(o[..., :e, :], den, out=out)
        if out is not None:
            return torch.mul(o, scale, out=out)
        return o * scale if scale != 1.0 else o

    def block(s: int, t: int, out: Tensor | None = None) -> Tensor:
        args = (q[..., s:t, :], sums, const_col)
        if recompute and grad:
            return checkpoint(query_block, *args, use_reentrant=False)
        return query_block(*args, out=out)

    return over_chunks(block, N, chunk, (B, H, e, N), q, grad, dim=-1).transpose(-1, -2)


__all__ = ["CHUNK_BYTES", "MIN_CHUNK_TOKENS", "linear_attention_core", "needs_grad", "over_chunks",
           "tokens_per_chunk"]
