"""The O(N) path shared by every feature-map kernel (relu, cosine, qt, …).

For a normalised kernel with features ψ (and an optional constant feature folded into one column),

    out_i = (ψ(q_i)·KVᵀ + s_i·c_v) / (ψ(q_i)·Kz + s_i·c_z [+ ε]),
    KV = Σ_j v_j ψ(k_j)ᵀ  (e, D),   Kz = Σ_j ψ(k_j)  (D,),

where [c_v; c_z] is the constant column (the constant features' contribution, e.g. c²·[Σ_j v_j; M]
for qt) and s_i a per-query scale of it (qt folds its query normalisation there; 1 otherwise).
ε goes into c_z when there is a constant column (so s_i scales it too), else onto the normaliser.

Layout, because it decides the speed on CPUs: the key sums are kept as one (e+1, D) matrix
A = [KV; Kz] and the queries are contracted as A @ ψ(q)ᵀ, which yields the result transposed,
(B, H, e+1, n). Products whose output rows are e+1 = 17 floats wide are ~1.5× slower in
BLAS than this orientation (the wide axis is the token axis), the ones column is never
concatenated onto V (Kz is a plain sum over tokens), and the final division reads and writes
contiguous rows. The result is returned as a (B, H, N, e) *view* of a (B, H, e, N) tensor, which
is exactly the layout a conv backbone wants next ((B, H·e, h, w) is then a free reshape).

Tokens are processed in chunks of about CHUNK_BYTES, so the temporaries of one chunk stay in
cache and peak memory is O(chunk·D) beyond the inputs. Two implementations share the key sums
and the constant column: ``_forward_inplace`` (no autograd: in-place accumulation, each query
chunk divided straight into one output buffer) and ``_forward_autograd`` (out-of-place, chunks
concatenated, optionally checkpointed).

Token counts that are not plain ints (symbolic under ``torch.export`` or dynamic
``torch.compile``) or that a ``torch.jit`` trace would bake in are never chunked: the graph
then holds one pass over all tokens, valid for every size.
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

KeyFeatures = Callable[[Tensor], Tensor]
QueryFeatures = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]


def tokens_per_chunk(rows: int, width: int, itemsize: int, budget: int | None = None,
                     minimum: int | None = None) -> int:
    """Tokens per chunk so that a (rows, tokens, width) tensor stays under ``budget`` (CHUNK_BYTES),
    and at least ``minimum`` (MIN_CHUNK_TOKENS; both read at call time, so tests can shrink them)."""
    minimum = MIN_CHUNK_TOKENS if minimum is None else minimum
    return max(minimum, (budget or CHUNK_BYTES) // max(1, rows * width * itemsize))


def balanced(n: int, chunk: int) -> int:
    """The chunk length that splits n tokens into equal parts no longer than ``chunk``."""
    parts = -(-n // max(1, chunk))
    return -(-n // parts)


def concrete(*sizes) -> bool:
    """Whether Python may branch on these token counts: plain ints outside a ``torch.jit`` trace.

    Under ``torch.export`` and dynamic ``torch.compile`` sizes are symbolic (``torch.SymInt``), and
    a ``torch.jit.trace`` would bake a branch taken for one size into the graph for all sizes.
    """
    return not torch.jit.is_tracing() and all(isinstance(n, int) for n in sizes)


def token_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """[s, t) ranges of at most ``chunk`` tokens covering n; one range when n is not ``concrete``."""
    if not concrete(n) or chunk >= n:
        return [(0, n)]
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def over_chunks(fn, n: int, chunk: int, out_shape: tuple[int, ...], like: Tensor, grad: bool,
                dim: int = -2) -> Tensor:
    """Assemble ``fn(s, t, out)`` for token ranges [s, t) of length ``chunk`` along ``dim``.

    With autograd, or under ``torch.compile`` (which cannot trace ``out=`` into a strided slice
    and plans the buffers itself), the pieces are concatenated. Otherwise they go straight into one
    preallocated output: ``out`` is its slice, which ``fn`` may write
    (``torch.div(..., out=out)``) or ignore (the result is copied in). Freed chunk temporaries
    are then reused instead of fragmenting the heap behind a growing list.
    """
    ranges = token_ranges(n, chunk)
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


def linear_attention_core(q: Tensor, k: Tensor, v: Tensor, key_features: KeyFeatures,
                          query_features: QueryFeatures, *, width: int, normalized: bool = True,
                          const_weight=None, eps: float = 0.0, scale: float | None = None,
                          token_local: bool = True, grad_inputs: tuple = (),
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
        eps: added to the normaliser; inside the constant column when there is one (so s
            scales it too, as qt's algebra needs), after the product otherwise.
        scale: multiplies an unnormalised result (e.g. cosine's 1/M); None for 1.
        token_local: ψ of a key depends on that key only; False keeps all M keys in one chunk.
        grad_inputs: tensors besides q, k, v that may require grad (kernel parameters).
        recompute: checkpoint each chunk (large feature maps: recompute ψ in backward instead
            of storing it, so gradients stay O(N·d)).

    Returns:
        (B, H, N, e): a transposed view of a contiguous (B, H, e, N) tensor.
    """
    B, H, N, _ = q.shape
    M, e = k.shape[-2], v.shape[-1]
    chunk = tokens_per_chunk(B * H, max(width, e + 1), q.element_size())
    key_ranges = token_ranges(M, balanced(M, chunk) if concrete(M) else M) if token_local else [(0, M)]
    query_chunk = balanced(N, chunk) if concrete(N) else N
    with_const = const_weight is not None

    def key_sums(k_c: Tensor, v_c: Tensor) -> Tensor:  # (B, H, e', D [+1])
        psi = key_features(k_c)  # (B, H, n, D)
        parts = [v_c.transpose(-1, -2) @ psi]  # (B, H, e, D)
        if normalized:
            parts.append(psi.sum(-2, keepdim=True))  # (B, H, 1, D)
        if with_const:  # Σ_j v_j [; n] as one more column, summed while v_c is in cache
            v_sum = v_c.sum(-2).unsqueeze(-1)  # (B, H, e, 1)
            if normalized:
                v_sum = torch.cat([v_sum, torch.full_like(v_sum[..., :1, :], v_c.shape[-2])], dim=-2)
            return torch.cat([torch.cat(parts, dim=-2), v_sum], dim=-1)
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def split_constant(sums: Tensor) -> tuple[Tensor, Tensor | None, float]:
        """(A, constant column w·[Σ_j v_j; M] (+ ε in the normaliser's entry), ε still to add)."""
        if not with_const:
            return sums, None, eps if normalized else 0.0
        const_col = sums[..., -1:] * const_weight  # (B, H, e', 1)
        if normalized and eps:
            const_col = torch.cat([const_col[..., :e, :], const_col[..., e:, :] + eps], dim=-2)
        return sums[..., :-1], const_col, 0.0

    args = (q, k, v, key_sums, split_constant, query_features, key_ranges, query_chunk, e,
            normalized, scale)
    if needs_grad(q, k, v, const_weight, *grad_inputs):
        return _forward_autograd(*args, recompute=recompute)
    return _forward_inplace(*args)


def _forward_inplace(q, k, v, key_sums, split_constant, query_features, key_ranges, query_chunk, e,
                     normalized, scale) -> Tensor:
    """No autograd: key sums accumulated in place, each query chunk's products scaled, shifted and
    divided in place, straight into its slice of one (B, H, e, N) output."""
    sums = None
    for s, t in key_ranges:
        part = key_sums(k[..., s:t, :], v[..., s:t, :])
        sums = part if sums is None else sums.add_(part)
    sums, const_col, eps = split_constant(sums)

    def block(s: int, t: int, out: Tensor | None) -> Tensor:  # (B, H, e, t - s)
        psi, s_q = query_features(q[..., s:t, :])  # (B, H, n, D), (B, H, n, 1) | None
        o = sums @ psi.transpose(-1, -2)  # (B, H, e', n), a fresh tensor
        if const_col is not None:
            if s_q is None:
                o.add_(const_col)
            else:
                o.addcmul_(const_col, s_q.transpose(-1, -2))
        if not normalized:
            return o if scale is None else torch.mul(o, scale, out=out)
        den = o[..., e:, :]
        if eps:
            den.add_(eps)
        return torch.div(o[..., :e, :], den, out=out)

    B, H, N, _ = q.shape
    return over_chunks(block, N, query_chunk, (B, H, e, N), q, False, dim=-1).transpose(-1, -2)


def _forward_autograd(q, k, v, key_sums, split_constant, query_features, key_ranges, query_chunk, e,
                      normalized, scale, *, recompute: bool) -> Tensor:
    """With autograd: out-of-place ops, chunks concatenated; ``recompute`` checkpoints every chunk."""

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

    parts = [run(key_sums, k[..., s:t, :], v[..., s:t, :]) for s, t in key_ranges]
    sums = parts[0]
    for part in parts[1:]:
        sums = sums + part
    sums, const_col, eps = split_constant(sums)

    def query_block(q_c: Tensor, sums: Tensor, const_col: Tensor | None) -> Tensor:  # (B, H, e, n)
        psi, s_q = query_features(q_c)  # (B, H, n, D), (B, H, n, 1) | None
        o = sums @ psi.transpose(-1, -2)  # (B, H, e', n)
        if const_col is not None:
            o = o + const_col if s_q is None else torch.addcmul(o, const_col, s_q.transpose(-1, -2))
        if not normalized:
            return o if scale is None else o * scale
        den = o[..., e:, :] + eps if eps else o[..., e:, :]
        return o[..., :e, :] / den

    B, H, N, _ = q.shape
    return over_chunks(lambda s, t, _: run(query_block, q[..., s:t, :], sums, const_col), N, query_chunk,
                       (B, H, e, N), q, True, dim=-1).transpose(-1, -2)


__all__ = ["CHUNK_BYTES", "MIN_CHUNK_TOKENS", "concrete", "linear_attention_core", "needs_grad",
           "over_chunks", "token_ranges", "tokens_per_chunk"]
