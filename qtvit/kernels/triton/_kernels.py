"""Triton kernels of the fused feature-map attention (qt and relu), forward and backward.

Never import this module directly: :func:`qtvit.kernels.triton.ops.kernels` loads it once per
execution mode (compiled for GPUs, or under Triton's interpreter for CPU tensors), because
``@triton.jit`` decides between the two when it decorates a function.

Per (batch·head) the math is (φ = feature map, c = the constant feature, 0 for relu):

    A = Σ_j [φ(k_j); 1] [v_j; 1]ᵀ            (D+1, E+1): [KV, kz; Σv, M]
    o_i = (φ(q_i)·KV + c²Σv) / (φ(q_i)·kz + c²M + ε)

Buffers of key statistics, (BH, splits, D+1, E+1) float32 contiguous: rows 0..D-1 are the
feature channels, row D the constant channel; columns 0..E-1 the value channels, column E the
ones column. Every program of a pass covers one contiguous range of tokens (a *split*); the
partial sums of the splits are reduced by whoever needs them, always in split order, so the
result does not depend on scheduling (deterministic, no atomics).

Shapes in comments: BN tokens per block, BD ≥ D and BE ≥ E the padded head dims (powers of two,
at least 16 because ``tl.dot`` needs that; padded lanes load as 0 and are never stored).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Feature-map ids (constexpr): must match ops.FEATURES.
RELU = 0
QT = 1


@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum of a float32 block, spelled as the reduction it is.

    ``tl.sum`` and ``tl.zeros`` are themselves ``@triton.jit`` functions, decorated in whichever
    mode Triton was imported; an interpreted kernel cannot call compiled ones. ``tl.reduce`` with
    Triton's own sum combiner and ``tl.full`` are builtins, valid in both modes (and the
    interpreter runs this reduction as one numpy sum).
    """
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _qt_norms(x):
    """Forward of qt's map for a (BN, BD) block: n(n(x)²) with n(w) = w/(max(‖w‖, 1e-19) + 1e-15).

    Returns φ and the intermediates the backward needs: y = x/n1, z = y², the norms a = ‖x‖,
    b = ‖z‖ and the divisors n1, n2 (all (BN,) except φ, y, z).
    """
    a = tl.sqrt(_sum(x * x, 1))
    n1 = tl.maximum(a, 1e-19) + 1e-15
    y = x / n1[:, None]
    z = y * y
    b = tl.sqrt(_sum(z * z, 1))
    n2 = tl.maximum(b, 1e-19) + 1e-15
    return z / n2[:, None], y, z, a, b, n1, n2


@triton.jit
def _features(x, FEATURE: tl.constexpr):
    """φ(x) for a (BN, BD) float32 block: qt's n(n(x)²) or ReLU."""
    if FEATURE == 1:
        phi, _, _, _, _, _, _ = _qt_norms(x)
        return phi
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _normalise_backward(w, g, norm, divisor):
    """Gradient of u = w/(max(‖w‖, 1e-19) + 1e-15) given g = ∂L/∂u, rows of a (BN, BD) block.

    ∂L/∂w = g/n − (g·w) w/(n²‖w‖) (the second term only where ‖w‖ is above the floor), written
    with the unit vector w/‖w‖ and the ratio ‖w‖/n ≤ 1 so no intermediate under- or overflows.
    """
    unit = w / tl.maximum(norm, 1e-19)[:, None]
    ratio = tl.where(norm > 1e-19, norm / divisor, 0.0)
    proj = _sum(g * unit, 1) * ratio
    return (g - unit * proj[:, None]) / divisor[:, None]


@triton.jit
def _features_backward(x, g, FEATURE: tl.constexpr):
    """∂L/∂x given g = ∂L/∂φ(x) for a (BN, BD) float32 block; φ is recomputed from x."""
    if FEATURE == 1:
        _, y, z, a, b, n1, n2 = _qt_norms(x)
        g_z = _normalise_backward(z, g, b, n2)
        return _normalise_backward(x, 2.0 * y * g_z, a, n1)
    else:
        return tl.where(x > 0.0, g, 0.0)


@triton.jit
def _dot(a, b, FAST_DOT: tl.constexpr):
    """a @ b of float32 blocks with float32 accumulation.

    FAST_DOT (GPU only, for fp16/bf16 inputs): TF32 tensor-core products. Their 10-bit mantissa
    is finer than the inputs' own rounding and their range is float32's, so sums such as KV
    (which can exceed fp16's 65504 at large N) are safe. Otherwise IEEE float32 products: the
    path the interpreter checks and the one fp32 inputs get (no TF32 behind the user's back).
    """
    if FAST_DOT:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dot_inputs(a, b, FAST_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """a @ b where both operands are bounded by the inputs (φ(k) and v in the key pass).

    FAST_DOT (GPU only): operands rounded to the input's half dtype (DOT_DTYPE) for fp16/bf16
    tensor cores with float32 accumulation; v and relu(k) convert exactly, qt's φ(k) ∈ [0, 1]
    to the input's precision. The interpreter never takes this branch: it holds bf16 as integers
    and its half-precision dot is unreliable, so what CI verifies is the float32 branch.
    """
    if FAST_DOT:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _block(ptr, offs_n, offs_c, mask_n, stride_n, stride_c, C: tl.constexpr):
    """Load a (BN, BC) block of a (tokens, C) strided matrix as float32; padding reads 0."""
    mask = mask_n[:, None] & (offs_c[None, :] < C)
    ptrs = ptr + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_stats(ptr, offs_d, offs_e, E: tl.constexpr, D: tl.constexpr):
    """One (D+1, E+1) statistics matrix at ptr → (KV (BD, BE), kz (BD,), sv (BE,), count ())."""
    row = E + 1
    mask_d = offs_d < D
    mask_e = offs_e < E
    kv = tl.load(ptr + offs_d[:, None] * row + offs_e[None, :], mask=mask_d[:, None] & mask_e[None, :],
                 other=0.0)
    kz = tl.load(ptr + offs_d * row + E, mask=mask_d, other=0.0)
    sv = tl.load(ptr + D * row + offs_e, mask=mask_e, other=0.0)
    count = tl.load(ptr + D * row + E)
    return kv, kz, sv, count


@triton.jit
def _store_stats(ptr, kv, kz, sv, count, offs_d, offs_e, E: tl.constexpr, D: tl.constexpr):
    row = E + 1
    mask_d = offs_d < D
    mask_e = offs_e < E
    tl.store(ptr + offs_d[:, None] * row + offs_e[None, :], kv, mask=mask_d[:, None] & mask_e[None, :])
    tl.store(ptr + offs_d * row + E, kz, mask=mask_d)
    tl.store(ptr + D * row + offs_e, sv, mask=mask_e)
    tl.store(ptr + D * row + E, count)


@triton.jit
def _reduce_splits(ptr, n_splits, offs_d, offs_e, E: tl.constexpr, D: tl.constexpr,
                   BD: tl.constexpr, BE: tl.constexpr):
    """Sum the (D+1, E+1) partials of n_splits consecutive splits at ptr, in split order."""
    kv = tl.full((BD, BE), 0.0, tl.float32)
    kz = tl.full((BD,), 0.0, tl.float32)
    sv = tl.full((BE,), 0.0, tl.float32)
    count = _sum(tl.full((1,), 0.0, tl.float32), 0)
    for s in range(0, n_splits):
        p_kv, p_kz, p_sv, p_count = _load_stats(ptr + s * (D + 1) * (E + 1), offs_d, offs_e, E, D)
        kv += p_kv
        kz += p_kz
        sv += p_sv
        count += p_count
    return kv, kz, sv, count


@triton.jit
def key_stats_kernel(
    k_ptr, v_ptr, part_ptr, H, M, tokens_per_split,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_ve,
    D: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    FEATURE: tl.constexpr, FAST_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Forward pass 1, grid (B·H, key splits): partial A over this split's keys → part[bh, split]."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    kv = tl.full((BD, BE), 0.0, tl.float32)
    kz = tl.full((BD,), 0.0, tl.float32)
    sv = tl.full((BE,), 0.0, tl.float32)
    count = tl.full((BN,), 0.0, tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, M)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < end
        phi = _features(_block(k_base, offs_n, offs_d, mask_n, s_kn, s_kd, D), FEATURE)  # (BN, BD)
        vals = _block(v_base, offs_n, offs_e, mask_n, s_vn, s_ve, E)  # (BN, BE)
        kv += _dot_inputs(tl.trans(phi), vals, FAST_DOT, DOT_DTYPE)
        kz += _sum(phi, 0)
        sv += _sum(vals, 0)
        count += mask_n.to(tl.float32)
    out = part_ptr + (bh.to(tl.int64) * tl.num_programs(1) + split) * (D + 1) * (E + 1)
    _store_stats(out, kv, kz, sv, _sum(count, 0), offs_d, offs_e, E, D)


@triton.jit
def query_kernel(
    q_ptr, part_ptr, stats_ptr, const_ptr, out_ptr, H, N, tokens_per_split, key_splits, eps,
    s_qb, s_qh, s_qn, s_qd, s_ob, s_oh, s_on, s_oe,
    D: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    FEATURE: tl.constexpr, FAST_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, CLAMP_FP16: tl.constexpr,
):
    """Forward pass 2, grid (B·H, query splits): reduce the key partials, then o for this split.

    The program of split 0 also writes the reduced statistics (the backward's only saved state).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    stats = part_ptr + bh.to(tl.int64) * key_splits * (D + 1) * (E + 1)
    kv, kz, sv, count = _reduce_splits(stats, key_splits, offs_d, offs_e, E, D, BD, BE)
    if split == 0:
        _store_stats(stats_ptr + bh.to(tl.int64) * (D + 1) * (E + 1), kv, kz, sv, count, offs_d, offs_e, E, D)
    c = tl.load(const_ptr).to(tl.float32)
    const_v = c * c * sv  # (BE,)
    const_z = c * c * count + eps
    q_base = q_ptr + b * s_qb + h * s_qh
    o_base = out_ptr + b * s_ob + h * s_oh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < end
        phi = _features(_block(q_base, offs_n, offs_d, mask_n, s_qn, s_qd, D), FEATURE)  # (BN, BD)
        num = _dot(phi, kv, FAST_DOT) + const_v[None, :]  # (BN, BE)
        den = _sum(phi * kz[None, :], 1) + const_z  # (BN,)
        o = num / den[:, None]
        if CLAMP_FP16:  # saturate rather than overflow to inf
            o = tl.minimum(tl.maximum(o, -65504.0), 65504.0)
        ptrs = o_base + offs_n[:, None] * s_on + offs_e[None, :] * s_oe
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_e[None, :] < E))


@triton.jit
def query_backward_kernel(
    q_ptr, g_ptr, stats_ptr, const_ptr, dq_ptr, dpart_ptr, H, N, tokens_per_split, eps,
    s_qb, s_qh, s_qn, s_qd, s_gb, s_gh, s_gn, s_ge, s_db, s_dh, s_dn, s_dd,
    D: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    FEATURE: tl.constexpr, FAST_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Backward pass 1, grid (B·H, query splits): dq, and partial sums for the key side.

    With num = φ(q)·KV + c²Σv, den = φ(q)·kz + c²M + ε, o = num/den and g = ∂L/∂o:
        ∂num = g/den,  ∂den = −(g·o)/den,  ∂φ(q) = KV ∂num + kz ∂den,
    and the partials [Σ φ(q)∂numᵀ, Σ φ(q)∂den; Σ ∂num, Σ ∂den] go to dpart[bh, split].
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    kv, kz, sv, count = _load_stats(stats_ptr + bh.to(tl.int64) * (D + 1) * (E + 1), offs_d, offs_e, E, D)
    c = tl.load(const_ptr).to(tl.float32)
    const_v = c * c * sv
    const_z = c * c * count + eps
    q_base = q_ptr + b * s_qb + h * s_qh
    g_base = g_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_db + h * s_dh
    d_kv = tl.full((BD, BE), 0.0, tl.float32)
    d_kz = tl.full((BD,), 0.0, tl.float32)
    d_sv = tl.full((BE,), 0.0, tl.float32)
    d_count = tl.full((BN,), 0.0, tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < end
        x = _block(q_base, offs_n, offs_d, mask_n, s_qn, s_qd, D)  # (BN, BD)
        g = _block(g_base, offs_n, offs_e, mask_n, s_gn, s_ge, E)  # (BN, BE)
        phi = _features(x, FEATURE)
        den = _sum(phi * kz[None, :], 1) + const_z  # (BN,)
        o = (_dot(phi, kv, FAST_DOT) + const_v[None, :]) / den[:, None]
        g_num = g / den[:, None]  # (BN, BE)
        g_den = -_sum(g * o, 1) / den  # (BN,)
        g_phi = _dot(g_num, tl.trans(kv), FAST_DOT) + g_den[:, None] * kz[None, :]
        d_kv += _dot(tl.trans(phi), g_num, FAST_DOT)
        d_kz += _sum(phi * g_den[:, None], 0)
        d_sv += _sum(g_num, 0)
        d_count += g_den
        dx = _features_backward(x, g_phi, FEATURE)
        ptrs = dq_base + offs_n[:, None] * s_dn + offs_d[None, :] * s_dd
        tl.store(ptrs, dx.to(dq_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_d[None, :] < D))
    out = dpart_ptr + (bh.to(tl.int64) * tl.num_programs(1) + split) * (D + 1) * (E + 1)
    _store_stats(out, d_kv, d_kz, d_sv, _sum(d_count, 0), offs_d, offs_e, E, D)


@triton.jit
def key_backward_kernel(
    k_ptr, v_ptr, dpart_ptr, dstats_ptr, const_ptr, dk_ptr, dv_ptr, H, M, tokens_per_split, query_splits,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_ve,
    s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dve,
    D: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    FEATURE: tl.constexpr, FAST_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Backward pass 2, grid (B·H, key splits): reduce the query partials, then dk and dv.

    ∂φ(k_j) = ∂KV v_j + ∂kz,  dv_j = ∂KVᵀ φ(k_j) + c² Σ_i ∂num_i. The program of split 0 writes
    the reduced partials to dstats (the host turns them into ∂c).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    parts = dpart_ptr + bh.to(tl.int64) * query_splits * (D + 1) * (E + 1)
    d_kv, d_kz, d_sv, d_count = _reduce_splits(parts, query_splits, offs_d, offs_e, E, D, BD, BE)
    if split == 0:
        _store_stats(dstats_ptr + bh.to(tl.int64) * (D + 1) * (E + 1), d_kv, d_kz, d_sv, d_count,
                     offs_d, offs_e, E, D)
    c = tl.load(const_ptr).to(tl.float32)
    dv_const = c * c * d_sv  # (BE,)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    dk_base = dk_ptr + b * s_dkb + h * s_dkh
    dv_base = dv_ptr + b * s_dvb + h * s_dvh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, M)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < end
        x = _block(k_base, offs_n, offs_d, mask_n, s_kn, s_kd, D)  # (BN, BD)
        vals = _block(v_base, offs_n, offs_e, mask_n, s_vn, s_ve, E)  # (BN, BE)
        phi = _features(x, FEATURE)
        g_phi = _dot(vals, tl.trans(d_kv), FAST_DOT) + d_kz[None, :]  # (BN, BD)
        dv = _dot(phi, d_kv, FAST_DOT) + dv_const[None, :]  # (BN, BE)
        dx = _features_backward(x, g_phi, FEATURE)
        mask_k = mask_n[:, None] & (offs_d[None, :] < D)
        tl.store(dk_base + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd, dx.to(dk_ptr.dtype.element_ty),
                 mask=mask_k)
        mask_v = mask_n[:, None] & (offs_e[None, :] < E)
        tl.store(dv_base + offs_n[:, None] * s_dvn + offs_e[None, :] * s_dve, dv.to(dv_ptr.dtype.element_ty),
                 mask=mask_v)
