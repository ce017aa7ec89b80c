"""Kernel correctness: identities in float64, dense vs linear, gradients, numerics, errors.

The references here are written from the formulas in docs/DESIGN.md (§kernels, §qt), independently of
``qtvit/kernels/definitions.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    SMALL_CHUNK_BYTES,
    case_id,
    chunked_linear_paths,
    counting_chunks,
    kernel_cases,
    path_id,
    run_linear_path,
)

import qtvit
from qtvit.kernels import functional as kfun
from qtvit.kernels import linear_attention_generic, symmetric_outer

LINEAR_CASES = kernel_cases(linear_only=True)
ALL_CASES = kernel_cases()
SPEC_NAMES = ["softmax", "relu", "cosine", "mean", "sigmoid_softmax", "angular", "taylor1", "taylor2",
              "taylor2_pool", "taylor2_chunk", "taylor2_random", "qt_paper", "qt",
              "none"]  # the ablation control (zero attention output)


def qkv(B=2, H=3, N=49, M=None, d=16, e=None, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = M or N
    e = e or d
    q = torch.randn(B, H, N, d, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, M, d, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, M, e, generator=g, dtype=dtype)
    return q, k, v


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


# ------------------------------------------------------------------------------ registry


def test_every_spec_kernel_is_registered_by_name():
    assert sorted(qtvit.list_kernels()) == sorted(SPEC_NAMES)
    assert qtvit.list_kernels(linear_only=True) == [n for n in qtvit.list_kernels() if n != "softmax"]


def test_unknown_kernel_lists_valid_names():
    with pytest.raises(ValueError, match="unknown attention kernel 'qtt'.*valid kernels: .*taylor2_pool"):
        qtvit.get_kernel("qtt")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention kernel"):
        qtvit.attention(q, k, v, "nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        qtvit.register_kernel(qtvit.get_kernel("qt"))


def test_unknown_kernel_parameter_is_named():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="unknown parameter\\(s\\) consts; valid: const"):
        qtvit.attention(q, k, v, "qt", consts=2.0)


# ------------------------------------------------------------------ float64 identities


@pytest.mark.parametrize("d", [16, 24, 32])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_feature_map_inner_product_equals_pairwise_weight(case, d):
    name, params = case
    q, k, _ = qkv(N=13, M=17, d=d)
    kern = qtvit.get_kernel(name)
    phi_q = qtvit.feature_map(q, name, "q", n_keys=17, **params)
    phi_k = qtvit.feature_map(k, name, "k", n_keys=17, **params)
    assert phi_q.shape[-1] == kern.feature_dim(d, **kern.resolve_params(params))
    w = kern.pairwise(q, k, **kern.resolve_params(params))
    torch.testing.assert_close(phi_q @ phi_k.transpose(-1, -2), w, rtol=1e-11, atol=1e-11)


def _full_kronecker_taylor2(x: torch.Tensor) -> torch.Tensor:
    """The taylor2 map literally (docs/DESIGN.md §kernels): φ(x) = [vec(ϕ⊗ϕ)/√2, 1/√2], ϕ(x) = [x/d^¼, 1]."""
    d = x.shape[-1]
    phi = torch.cat([x / d**0.25, torch.ones_like(x[..., :1])], -1)
    kron = (phi[..., :, None] * phi[..., None, :]).flatten(-2)
    return torch.cat([kron / math.sqrt(2), torch.full_like(x[..., :1], 1 / math.sqrt(2))], -1)


@pytest.mark.parametrize("d", [4, 16, 32])
def test_taylor2_symmetric_half_equals_full_kronecker_and_the_series(d):
    q, k, _ = qkv(N=11, M=9, d=d)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    series = 1 + s + s * s / 2
    full_q, full_k = _full_kronecker_taylor2(q), _full_kronecker_taylor2(k)
    half_q = qtvit.feature_map(q, "taylor2", "q")
    half_k = qtvit.feature_map(k, "taylor2", "k")
    torch.testing.assert_close(full_q @ full_k.transpose(-1, -2), series, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(half_q @ half_k.transpose(-1, -2), series, rtol=1e-12, atol=1e-12)
    assert full_q.shape[-1] == (d + 1) ** 2 + 1
    assert half_q.shape[-1] == d * (d + 1) // 2 + d + 1  # about half of the full map


def test_symmetric_outer_squares_inner_products():
    a, b = torch.randn(2, 7, 10, dtype=torch.float64).unbind(0)
    lhs = (symmetric_outer(a) * symmetric_outer(b)).sum(-1)
    torch.testing.assert_close(lhs, (a * b).sum(-1) ** 2)


def _spec_qt_reference(q, k, v, const):
    """qt as the authors compute it (docs/DESIGN.md §qt): normalise, square, normalise; append c;
    cat ones to v."""
    eps = 1e-15

    def prep(x):
        x = x / (x.norm(dim=-1, keepdim=True) + eps)
        x = x * x
        x = x / (x.norm(dim=-1, keepdim=True) + eps)
        return torch.cat([x, torch.full_like(x[..., :1], const)], -1)

    qt, kt = prep(q), prep(k)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, M, e+1)
    out = qt @ (kt.transpose(-1, -2) @ v1)
    e = v.shape[-1]
    return out[..., :e] / (out[..., e:] + eps)


@pytest.mark.parametrize("const", [1.0, 0.25])
@pytest.mark.parametrize("impl", ["linear", "dense"])
def test_qt_equals_spec_restatement(impl, const):
    q, k, v = qkv(N=49, M=33, d=16, e=20)
    expected = _spec_qt_reference(q, k, v, const)
    torch.testing.assert_close(qtvit.attention(q, k, v, "qt", impl=impl, const=const), expected,
                               rtol=1e-12, atol=1e-12)


def _dense_reference(weights: torch.Tensor, v: torch.Tensor, normalized: bool) -> torch.Tensor:
    out = weights @ v
    return out / weights.sum(-1, keepdim=True) if normalized else out


def test_taylor2_linear_equals_dense_series_formula():
    q, k, v = qkv(N=37, M=45, d=16)
    s = q @ k.transpose(-1, -2) / 4.0
    expected = _dense_reference(1 + s + s * s / 2, v, True)
    torch.testing.assert_close(qtvit.attention(q, k, v, "taylor2", impl="linear"), expected)


def _reduced_taylor2_weights(q, k, keep: torch.Tensor) -> torch.Tensor:
    """1 + s + Q/2 with Q = Σ_{a,b} keep[a, b]·(q_a q_b)(k_a k_b)/d: the quadratic term of taylor2
    restricted to the channel pairs that ``keep`` (d × d, 0/1 or weights) marks, by brute force."""
    d = q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    qq = q[..., :, None] * q[..., None, :]  # (B, H, N, d, d)
    kk = k[..., :, None] * k[..., None, :]  # (B, H, M, d, d)
    return 1 + s + torch.einsum("bhnxy,xy,bhmxy->bhnm", qq, keep, kk) / (2 * d)


@pytest.mark.parametrize("seed", [0, 7])
def test_taylor2_random_keeps_exactly_d_products_of_taylor2(seed):
    """Mean scaling: the d channel pairs picked by the seed, each once, nothing else rescaled."""
    from qtvit.kernels.definitions import random_product_pairs

    d = 16
    q, k, _ = qkv(N=9, M=7, d=d)
    a, b = random_product_pairs(d, seed)
    keep = torch.zeros(d, d, dtype=q.dtype)
    keep[a, b] = 1.0
    assert int(keep.sum()) == d  # d distinct pairs
    w = qtvit.get_kernel("taylor2_random").pairwise(q, k, seed=seed, scaling="mean")
    torch.testing.assert_close(w, _reduced_taylor2_weights(q, k, keep), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunks", [2, 4, 8])
def test_taylor2_chunk_keeps_the_block_diagonal_products(chunks):
    d = 16
    q, k, _ = qkv(N=9, M=7, d=d)
    block = torch.arange(d) // (d // chunks)
    keep = (block[:, None] == block[None, :]).double()
    w = qtvit.get_kernel("taylor2_chunk").pairwise(q, k, chunks=chunks, scaling="mean")
    torch.testing.assert_close(w, _reduced_taylor2_weights(q, k, keep), rtol=1e-12, atol=1e-12)


def test_unnormalised_kernels_follow_spec_scaling():
    q, k, v = qkv(N=20, M=30, d=8)
    cos = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
    torch.testing.assert_close(qtvit.attention(q, k, v, "cosine", impl="linear"), cos @ v / 30)
    torch.testing.assert_close(qtvit.attention(q, k, v, "mean", impl="linear"),
                               (q @ k.transpose(-1, -2) / 30) @ v)


def test_softmax_dense_matches_explicit_softmax():
    q, k, v = qkv(N=20, M=30, d=8)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(qtvit.attention(q, k, v, "softmax"), expected)


# --------------------------------------------------------------- dense vs linear paths


@pytest.mark.parametrize("shape", [(49, 49, 16, 16), (221, 49, 32, 24), (13, 221, 24, 40)],
                         ids=lambda s: "N{}-M{}-d{}-e{}".format(*s))
@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_dense_and_linear_agree_float64(case, shape):
    name, params = case
    N, M, d, e = shape
    q, k, v = qkv(N=N, M=M, d=d, e=e)
    dense = qtvit.attention(q, k, v, name, impl="dense", **params)
    linear = qtvit.attention(q, k, v, name, impl="linear", **params)
    generic = linear_attention_generic(q, k, v, name, **params)
    assert dense.shape == (2, 3, N, e)
    torch.testing.assert_close(linear, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(generic, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_dense_and_linear_agree_float32(case):
    name, params = case
    q, k, v = qkv(N=221, M=221, d=32, dtype=torch.float32)
    dense = qtvit.attention(q, k, v, name, impl="dense", **params)
    linear = qtvit.attention(q, k, v, name, impl="linear", **params)
    assert linear.dtype == torch.float32
    assert rel_rmse(linear, dense) < 1e-5


def _grads(fn, tensors):
    out = fn()
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, cot)


def _learnable(name: str, params: dict, dtype) -> dict:
    """Turn the kernel's learnable parameters into tensors requiring grad."""
    kern = qtvit.get_kernel(name)
    full = kern.resolve_params(params)
    return {**full, **{n: torch.tensor(float(full[n]), dtype=dtype, requires_grad=True)
                       for n in kern.learnable}}


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_dense_and_linear_gradients_agree(case):
    name, params = case
    q, k, v = (t.requires_grad_() for t in qkv(N=29, M=37, d=16, e=12))
    p = _learnable(name, params, torch.float64)
    inputs = [q, k, v] + [t for t in p.values() if isinstance(t, torch.Tensor)]
    g_dense = _grads(lambda: qtvit.attention(q, k, v, name, impl="dense", **p), inputs)
    g_linear = _grads(lambda: qtvit.attention(q, k, v, name, impl="linear", **p), inputs)
    for a, b in zip(g_linear, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", ["linear", "dense"])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_gradcheck_float64(case, impl):
    name, params = case
    if impl == "linear" and not qtvit.get_kernel(name).has_linear:
        pytest.skip("dense-only kernel")
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, N=6, M=5, d=8, e=3, seed=3))
    p = _learnable(name, params, torch.float64)
    names = [n for n, t in p.items() if isinstance(t, torch.Tensor)]
    fixed = {n: t for n, t in p.items() if n not in names}

    def fn(q, k, v, *learned):
        return qtvit.attention(q, k, v, name, impl=impl, **fixed, **dict(zip(names, learned, strict=True)))

    assert torch.autograd.gradcheck(fn, (q, k, v, *[p[n] for n in names]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_half_precision_inputs_match_float32(case, dtype):
    name, params = case
    q, k, v = (t.to(dtype) for t in qkv(N=49, M=49, d=16, dtype=torch.float32))
    out = qtvit.attention(q, k, v, name, **params)
    ref = qtvit.attention(q.float(), k.float(), v.float(), name, **params)
    assert out.dtype == dtype
    assert rel_rmse(out, ref) < (2e-3 if dtype == torch.float16 else 1.6e-2)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_finite_under_autocast_for_large_inputs(case, amp_dtype):
    name, params = case
    q, k, v = qkv(N=49, M=49, d=16, dtype=torch.float32, scale=1e4)
    v = v * 1e4
    for x in (q, k, v):
        x.clamp_(-1e4, 1e4)
    with torch.autocast("cpu", dtype=amp_dtype):
        out32 = qtvit.attention(q, k, v, name, **params)
        out_half = qtvit.attention(q.to(amp_dtype), k.to(amp_dtype), v.to(amp_dtype), name, **params)
    assert out32.dtype == torch.float32 and out_half.dtype == amp_dtype
    assert torch.isfinite(out32).all() and torch.isfinite(out_half).all()


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_autocast_is_disabled_inside_the_kernel(case):
    name, params = case
    q, k, v = qkv(N=33, d=16, dtype=torch.float32)
    plain = qtvit.attention(q, k, v, name, **params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = qtvit.attention(q, k, v, name, **params)
    torch.testing.assert_close(under_amp, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------- properties


def test_taylor2_approaches_softmax_cubically():
    q, k, v = qkv(N=31, M=31, d=16)
    errors = []
    for scale in (0.4, 0.2, 0.1):
        qs, ks = q * scale, k * scale
        errors.append(float((qtvit.attention(qs, ks, v, "taylor2") -
                             qtvit.attention(qs, ks, v, "softmax")).abs().max()))
    # s = q·k/√d grows like scale², so halving `scale` quarters s and an O(s³) error shrinks
    # ~64× (an O(s²) error would shrink only 16×). Accept 30–130.
    for big, small in zip(errors, errors[1:], strict=False):
        assert 30 < big / small < 130, errors
    assert errors[-1] < 1e-4


def test_taylor2_normaliser_is_at_least_half_the_key_count():
    q, k, v = qkv(N=64, M=50, d=16, scale=3.0)
    w = qtvit.get_kernel("taylor2").pairwise(q, k)
    assert float(w.sum(-1).min()) >= 50 / 2
    assert float(w.min()) >= 0.5 - 1e-12


@pytest.mark.parametrize("impl", ["linear", "dense"])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_zero_queries_and_keys_stay_finite(case, impl):
    name, params = case
    if impl == "linear" and not qtvit.get_kernel(name).has_linear:
        pytest.skip("dense-only kernel")
    for dtype in (torch.float32, torch.float16):
        q, k, v = qkv(N=16, M=16, d=8, dtype=torch.float32)
        q[:, :, :5] = 0
        k[:, :, :7] = 0
        out = qtvit.attention(q.to(dtype), k.to(dtype), v.to(dtype), name, impl=impl, **params)
        assert torch.isfinite(out).all(), (name, dtype)
    zero = torch.zeros(1, 1, 8, 8)
    out = qtvit.attention(zero, zero, torch.randn(1, 1, 8, 8), name, impl=impl, **params)
    assert torch.isfinite(out).all()


def test_qt_zero_query_attends_uniformly():
    """q̂ = 0 leaves only the constant c², so the output is the mean of the values."""
    q, k, v = qkv(N=4, M=9, d=8)
    q[:, :, 1] = 0
    out = qtvit.attention(q, k, v, "qt", impl="linear")
    torch.testing.assert_close(out[:, :, 1], v.mean(-2))


@pytest.mark.parametrize("impl", ["linear", "dense"])
@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if qtvit.get_kernel(c[0]).normalized], ids=case_id)
def test_eps_is_added_to_the_normaliser(case, impl):
    """attention(eps=ε) = Σ w v / (Σ w + ε), checked against the dense weights in float64."""
    name, params = case
    q, k, v = qkv(N=9, M=11, d=8)
    kern = qtvit.get_kernel(name)
    w = kern.pairwise(q, k, **kern.resolve_params(params))
    expected = (w @ v) / (w.sum(-1, keepdim=True) + 0.5)
    torch.testing.assert_close(qtvit.attention(q, k, v, name, impl=impl, eps=0.5, **params), expected)


def test_auto_picks_dense_only_when_it_is_cheaper():
    assert kfun.choose_impl("qt", 16, 16, 16, 16) == "dense"
    assert kfun.choose_impl("qt", 196, 196, 16, 16) == "linear"
    assert kfun.choose_impl("softmax", 4096, 4096, 16, 16) == "dense"
    q, k, v = qkv(N=4, d=16)
    torch.testing.assert_close(qtvit.attention(q, k, v, "qt"), qtvit.attention(q, k, v, "qt", impl="linear"))


@pytest.mark.parametrize("case", kernel_cases(), ids=case_id)
@pytest.mark.parametrize("impl", ["linear", "dense"])
def test_feature_major_inputs_match_contiguous_forward_and_backward(case, impl):
    """A conv backbone hands q, k, v over as transposed views (memory (d, N), as LiteMLA's
    qkv.transpose(-1, -2)); the strided branches (row norms as square-sums) must agree."""
    name, params = case
    if impl == "linear" and name not in qtvit.list_kernels(linear_only=True):
        pytest.skip("dense only")
    q, k, v = qkv(B=1, H=2, N=37, M=41, d=8)
    tq, tk, tv = (t.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for t in (q, k, v))
    assert tq.stride(-1) != 1  # really feature-major
    cq, ck, cv = (t.clone().requires_grad_() for t in (q, k, v))
    ref = qtvit.attention(cq, ck, cv, name, impl=impl, **params)
    out = qtvit.attention(tq, tk, tv, name, impl=impl, **params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), (tq, tk, tv))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (cq, ck, cv))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("strided", [False, True])
def test_row_norm_is_exact_floored_and_has_finite_gradients(strided):
    from qtvit.kernels.definitions import ROW_NORM_FLOOR, row_norm
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x[0, 0] = 0.0  # a zero row: floored, and its gradient must not be NaN (√s at s = 0)
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if strided else x
    x.requires_grad_()
    r = row_norm(x)
    assert r.shape == (3, 5, 1)
    torch.testing.assert_close(r[1:], x[1:].detach().pow(2).sum(-1, keepdim=True).sqrt())
    assert float(r[0, 0].detach()) == ROW_NORM_FLOOR
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and float(g[0, 0].abs().sum()) == 0.0


CHUNKED = chunked_linear_paths()
DENSE_CHUNKED = [(n, p, "dense") for n, p in ALL_CASES if qtvit.get_kernel(n).dense_impl is None]


def test_every_feature_map_path_is_among_the_chunking_cells():
    """The chunking cells are found by running the paths; none may drop out unnoticed."""
    generic = [(n, p) for n, p, path in CHUNKED if path == "generic"]
    assert generic == LINEAR_CASES
    assert ("qt", {}, "linear") in CHUNKED  # qt's specialised path runs on the shared core


def _chunked_passes_ran(counts: list[int], name: str) -> None:
    """Key sums and query blocks both split (only the query side for kernels whose key features
    depend on all keys)."""
    split = sum(c > 1 for c in counts)
    assert split >= (2 if qtvit.get_kernel(name).token_local else 1), counts


@pytest.mark.parametrize("cell", CHUNKED, ids=path_id)
def test_token_chunking_is_exact_forward_and_backward(cell):
    name, params, path = cell
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, N=70, M=90, d=8))
    p = _learnable(name, params, torch.float64)
    leaves = [q, k, v] + [p[n] for n in qtvit.get_kernel(name).learnable]
    cot = torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = run_linear_path(path, q, k, v, name, p)
    grads_whole = torch.autograd.grad(whole, leaves, cot)
    with counting_chunks(SMALL_CHUNK_BYTES) as counts:
        chunked = run_linear_path(path, q, k, v, name, p)
        grads_chunked = torch.autograd.grad(chunked, leaves, cot)
    _chunked_passes_ran(counts, name)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(grads_chunked, grads_whole, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", CHUNKED + DENSE_CHUNKED, ids=path_id)
def test_chunked_paths_without_autograd_fill_one_output(cell):
    """No autograd: chunks are written into one preallocated output (NaN-filled by conftest, so a
    chunk left unwritten fails)."""
    name, params, path = cell
    q, k, v = qkv(B=1, H=2, N=70, M=90, d=8, e=5)
    expected = qtvit.attention(q, k, v, name, impl="dense", **params)
    with counting_chunks(SMALL_CHUNK_BYTES, dense_bytes=2 * 4 * 90 * 8 * 16) as counts, torch.no_grad():
        out = run_linear_path(path, q, k, v, name, params)  # dense: 16 queries a chunk
    if path == "dense":
        assert max(counts) > 1, counts
    else:
        _chunked_passes_ran(counts, name)
    torch.testing.assert_close(out, expected)


# Relative RMSE bounds against float64 on the same (rounded) inputs. A scalar parameter's gradient
# is a sum over every output element whose terms largely cancel (weights are normalised), so its
# relative error is larger than that of the per-token tensors; bf16 rounds inputs, cotangent and
# results to 8 bits (≈2e-3 relative RMSE), while the kernel math runs in float32.
LOW_PRECISION_RMSE = {torch.float32: (3e-6, 1e-4), torch.bfloat16: (6e-3, 1e-2)}
PRECISION_CELLS = [(case, impl) for case in ALL_CASES
                   for impl in ["dense"] + (["linear"] if qtvit.get_kernel(case[0]).has_linear else [])]


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_RMSE), ids=str)
@pytest.mark.parametrize("cell", PRECISION_CELLS, ids=lambda c: f"{case_id(c[0])}-{c[1]}")
def test_float32_and_bfloat16_values_and_gradients_match_float64(cell, dtype):
    """Forward and gradients to q, k, v and the learnable parameters, by relative RMSE."""
    (name, params), impl = cell
    kern = qtvit.get_kernel(name)
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64).to(dtype) for n in (37, 41, 41)]
    cot = torch.randn(1, 2, 37, 8, generator=g, dtype=torch.float64).to(dtype)
    full = kern.resolve_params(params)

    def run(work: torch.dtype) -> list[torch.Tensor]:
        q, k, v = (t.to(work).requires_grad_() for t in inputs)
        learned = {n: torch.tensor(float(full[n]), dtype=dtype).to(work).requires_grad_()
                   for n in kern.learnable}
        out = qtvit.attention(q, k, v, name, impl=impl, **{**full, **learned})
        return [out, *torch.autograd.grad(out, [q, k, v, *learned.values()], cot.to(work))]

    low, ref = run(dtype), run(torch.float64)
    assert all(t.dtype == dtype for t in low)
    tensor_tol, param_tol = LOW_PRECISION_RMSE[dtype]
    for i, (a, b) in enumerate(zip(low, ref, strict=True)):
        assert rel_rmse(a, b) < (tensor_tol if i < 4 else param_tol), (i, rel_rmse(a, b))


MEMORY_SCRIPT = """
import resource, torch, qtvit
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 65536, 32) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = qtvit.attention(q, k, v, "taylor2")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (1, 4, 65536, 32) and bool(torch.isfinite(out).all())
print((after - before) / 1024)
"""


def test_taylor2_long_sequence_peak_memory_is_bounded():
    """B=1, H=4, N=65536, d=32: materialising φ(K) would take ~600 MB; the chunked path < 400 MB."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peak_increase_mb = float(res.stdout.strip().splitlines()[-1])
    assert peak_increase_mb < 400, peak_increase_mb


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "q must have shape"),
        ((torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 4)), ValueError,
         "same head dim"),
        ((torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4)), ValueError,
         "same number of tokens"),
        ((torch.randn(1, 2, 5, 4), torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)), ValueError,
         "share \\(B, H\\)"),
        ((torch.ones(1, 2, 5, 4, dtype=torch.long),) * 3, TypeError, "q has dtype torch.int64"),
        ((torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4).double(), torch.randn(1, 2, 5, 4)), TypeError,
         "one dtype"),
        ((torch.randn(1, 2, 5, 4), [1.0], torch.randn(1, 2, 5, 4)), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        qtvit.attention(*args, kernel="qt")


def test_bad_impl_and_dense_only_kernels():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        qtvit.attention(q, k, v, "qt", impl="fast")
    with pytest.raises(ValueError, match="'softmax' has no linear"):
        qtvit.attention(q, k, v, "softmax", impl="linear")


@pytest.mark.parametrize(("name", "params"),
                         [("taylor2_pool", {"pool": 3}), ("taylor2_chunk", {"chunks": 5})])
def test_indivisible_reductions_raise(name, params):
    q, k, v = qkv(d=16)
    with pytest.raises(ValueError, match="must be divisible"):
        qtvit.attention(q, k, v, name, impl="linear", **params)
