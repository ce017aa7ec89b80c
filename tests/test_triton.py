"""The fused Triton kernels (qtvit.kernels.triton), run on CPU tensors through Triton's interpreter.

Every value and gradient is compared with the dense reference (the N×M weight matrix from each
kernel's pairwise formula, differentiated by autograd, run in float64 on the same inputs) by
relative RMSE. Shapes are kept small: the interpreter executes each block operation in Python.
"""

import logging

import pytest
import torch

import qtvit
from qtvit.kernels import triton as fused

pytest.importorskip("triton")

KERNELS = fused.KERNELS
HEAD_DIMS = (8, 16, 32, 64)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# ∂c is one scalar summed over B·H·N·e terms of both signs: float32 summation leaves ~1e-5 of
# it (the dense float32 path itself is off by up to 7e-5 against float64 on these inputs).
CONST_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Triton's interpreter on for every test (read by the kernels at each launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def qkv(B, H, N, d, e=None, dtype=torch.float32, scale=1.0):
    q, k, v = (scale * torch.randn(B, H, N, n) for n in (d, d, e or d))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def run(kernel, q, k, v, impl, const=None, grad=None):
    """Output and gradients (q, k, v[, const]) of qtvit.attention with ``impl``."""
    params = {} if kernel == "relu" else {"const": const}
    out = qtvit.attention(q, k, v, kernel, impl=impl, **params)
    inputs = (q, k, v) if kernel == "relu" else (q, k, v, const)
    grad = torch.randn(out.shape).to(out.dtype) if grad is None else grad
    return out, torch.autograd.grad(out, inputs, grad), grad


def fused_run(kernel, q, k, v, const=None, grad=None):
    params = {} if kernel == "relu" else {"const": const}
    out = fused.fused_attention(q, k, v, kernel, **params)
    inputs = (q, k, v) if kernel == "relu" else (q, k, v, const)
    grad = torch.randn(out.shape).to(out.dtype) if grad is None else grad
    return out, torch.autograd.grad(out, inputs, grad), grad


def assert_matches_dense(kernel, q, k, v, tol, const=None, reference="dense"):
    """Fused output and gradients against the dense reference run in float64 on the same inputs."""
    const = torch.tensor(0.7, requires_grad=True) if const is None else const
    out, grads, g = fused_run(kernel, q, k, v, const)
    q64, k64, v64, c64 = (t.detach().double().requires_grad_() for t in (q, k, v, const))
    ref, ref_grads, _ = run(kernel, q64, k64, v64, reference, c64, g.double())
    assert out.shape == ref.shape and out.dtype == q.dtype
    names = ("out", "dq", "dk", "dv", "dconst")[:len(grads) + 1]
    for name, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        assert a.shape == b.shape and a.dtype == (const.dtype if name == "dconst" else q.dtype), name
        assert torch.isfinite(a).all(), name
        limit = CONST_TOLERANCE[q.dtype] if name == "dconst" else tol
        assert rel_rmse(a, b) <= limit, f"{name}: relative RMSE {rel_rmse(a, b):.2e} > {limit}"
    return out, grads


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("kernel", KERNELS)
def test_values_and_gradients_match_dense(kernel, dtype):
    # N=300: three splits of the token axis (two full 128-token blocks and a partial one)
    q, k, v = qkv(1, 2, 300, 16, dtype=dtype)
    out, grads = assert_matches_dense(kernel, q, k, v, TOLERANCE[dtype])
    again, grads_again, _ = fused_run(kernel, q, k, v, torch.tensor(0.7, requires_grad=True),
                                      torch.zeros_like(out))
    assert torch.equal(out, again)  # deterministic: the split reduction has a fixed order


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_every_head_dim(d):
    # value dim differs from the key dim (e = 24, not a power of two: padded lanes masked), and
    # 7 queries attend to 10 keys (cross-attention)
    for kernel in KERNELS:
        q, _, _ = qkv(1, 1, 7, d)
        _, k, v = qkv(1, 1, 10, d, e=24)
        assert_matches_dense(kernel, q, k, v, TOLERANCE[torch.float32])


def test_smallest_gpu_block(monkeypatch):
    # The GPU's width-64 backward uses 16-token blocks: several blocks per split, the last partial
    from qtvit.kernels.triton import ops

    smallest = min(block for block, _ in ops.GPU_BLOCKS["backward"].values())
    monkeypatch.setattr(ops, "INTERPRETER_BLOCK_TOKENS", smallest)
    q, k, v = qkv(1, 1, 150, 64)
    assert_matches_dense("qt", q, k, v, TOLERANCE[torch.float32])


def test_single_token_returns_the_value():
    # N = M = 1: out = v whatever q, k and c are, so every gradient but dv is exactly zero
    for kernel in KERNELS:
        q, k, v = qkv(2, 2, 1, 16)
        const = torch.tensor(1.3, requires_grad=True)
        out, grads, g = fused_run(kernel, q, k, v, const)
        torch.testing.assert_close(out, v.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[2], g, rtol=1e-6, atol=1e-6)
        for grad in (grads[0], grads[1], *grads[3:]):
            assert grad.abs().max() <= 1e-5


def test_long_odd_sequence():
    # 4097 tokens: 33 blocks in 4 splits, the last block holding one token
    # reference: the float64 linear path (itself checked against dense in test_kernels.py); the
    # float64 N×N reference alone would take most of this file's time budget
    q, k, v = qkv(1, 1, 4097, 8)
    assert_matches_dense("qt", q, k, v, TOLERANCE[torch.float32], reference="linear")


def test_strided_views_of_a_qkv_tensor():
    """LiteMLA's layout: q, k, v are (B, h, N, d) views of one (B, h·3d, N) tensor (token axis
    contiguous). Same numbers as contiguous copies, bit for bit, and the gradient reaches qkv."""
    B, h, d, N = 1, 2, 16, 150
    base = torch.randn(B, h * 3 * d, N, requires_grad=True)
    qkv_t = base.reshape(B, h, 3 * d, N).transpose(-1, -2)  # (B, h, N, 3d), strides (…, 1, N)
    q, k, v = qkv_t.chunk(3, dim=-1)
    assert q.stride()[-2:] == (1, N)
    const = torch.tensor(0.9, requires_grad=True)
    for kernel in KERNELS:
        out, grads, g = fused_run(kernel, q, k, v, const)
        copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
        ref, ref_grads, _ = fused_run(kernel, *copies, const, g)
        assert torch.equal(out, ref)
        for a, b in zip(grads[:3], ref_grads[:3], strict=True):
            assert torch.equal(a, b)
        dense, _, _ = run(kernel, q, k, v, "dense", const, g)
        assert rel_rmse(out, dense) <= TOLERANCE[torch.float32]
    # KernelAttention's layout: (B, N, 3, H, d) permuted to three (B, H, N, d) views
    x = torch.randn(2, 40, 3, 2, 8)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(fused.fused_attention(q, k, v, "qt"),
                               qtvit.attention(q, k, v, "qt", impl="dense"), rtol=1e-5, atol=1e-6)


def test_zero_rows_and_large_magnitudes():
    for kernel in KERNELS:
        q, k, v = qkv(1, 2, 20, 16, scale=1e4)  # |x| ≈ 1e4: squares ≈ 1e8, sums over tokens larger
        with torch.no_grad():
            q[:, :, ::3] = 0
            k[:, :, 1::3] = 0
        assert_matches_dense(kernel, q, k, v, TOLERANCE[torch.float32])
    # every key zero: qt weighs all keys by c² (mean of v); relu has only ε left (output 0)
    q, k, v = qkv(1, 1, 9, 8)
    with torch.no_grad():
        k.zero_()
    out, grads, _ = fused_run("qt", q, k, v, torch.tensor(1.0, requires_grad=True))
    torch.testing.assert_close(out, v.detach().mean(-2, keepdim=True).expand_as(out))
    assert all(torch.isfinite(g).all() for g in grads)
    out, grads, _ = fused_run("relu", q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and all(torch.isfinite(g).all() for g in grads)


def test_const_gradient_and_plain_float_const():
    q, k, v = qkv(1, 2, 30, 16)
    const = torch.tensor(1.5, requires_grad=True)
    _, grads, g = fused_run("qt", q, k, v, const)
    # finite difference of L = Σ g·out in float64 through the dense reference
    dense = [t.detach().double() for t in (q, k, v)]
    step = 1e-4

    def loss(c):
        return (qtvit.attention(*dense, "qt", impl="dense", const=c) * g.double()).sum()

    numeric = (loss(1.5 + step) - loss(1.5 - step)) / (2 * step)
    assert abs(grads[3].item() - numeric.item()) <= 1e-4 * max(1.0, abs(numeric.item()))
    # a Python float const works and gives the same output as the tensor
    torch.testing.assert_close(fused.fused_attention(q, k, v, "qt", const=1.5),
                               fused.fused_attention(q, k, v, "qt", const=const), rtol=0, atol=0)


def test_opcheck():
    from qtvit.kernels.triton.ops import feature_attention_op

    q, k, v = qkv(1, 2, 9, 8, e=16)
    # one kernel: relu runs the same op with another feature-map id
    torch.library.opcheck(feature_attention_op, (q, k, v, torch.tensor(0.8, requires_grad=True), "qt", 1e-15))


def test_traces_as_one_op():
    """torch.compile (fullgraph) and torch.export see the custom op, not Triton: same numbers."""
    q, k, v = qkv(1, 1, 20, 8)
    const = torch.tensor(0.6, requires_grad=True)

    def fn(q, k, v, c):
        return qtvit.attention(q, k, v, "qt", impl="triton", const=c)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, const)
    ref = fn(q, k, v, const)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn(out.shape)
    inputs = (q, k, v, const)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return qtvit.attention(q, k, v, "relu", impl="triton")

    exported = torch.export.export(Attend(), (q.detach(), k.detach(), v.detach()))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "qtvit.feature_attention.default" in targets


def test_failed_self_check_falls_back_with_one_warning(monkeypatch, caplog):
    """A forced self-check failure: impl="auto" takes the PyTorch path, same numbers, one warning.

    Auto only picks the kernels for CUDA tensors; the test lets it consider CPU ones (interpreted).
    """
    from qtvit.kernels.triton import ops

    monkeypatch.setattr(fused, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fused, "_VERDICTS", {})
    real_forward = ops._forward

    def wrong_forward(*args):  # a miscompiled kernel: outputs off by 1 %
        out, stats = real_forward(*args)
        return out * 1.01, stats

    monkeypatch.setattr(ops, "_forward", wrong_forward)
    q, k, v = qkv(1, 2, 50, 16)
    with caplog.at_level(logging.WARNING, logger="qtvit.kernels.triton"):
        first = qtvit.attention(q, k, v, "qt", impl="auto")
        second = qtvit.attention(q, k, v, "relu", impl="auto")
    warnings = [r for r in caplog.records if "self-check" in r.getMessage()]
    assert len(warnings) == 1 and "out differs" in warnings[0].getMessage()
    torch.testing.assert_close(first, qtvit.attention(q, k, v, "qt", impl="linear"), rtol=0, atol=0)
    torch.testing.assert_close(second, qtvit.attention(q, k, v, "relu", impl="linear"), rtol=0, atol=0)
    assert fused._VERDICTS == {("cpu", torch.float32): False}


def test_self_check_passes_and_auto_uses_the_kernels(monkeypatch):
    """Passed self-check: impl="auto" runs the fused op, eagerly and inside a compiled graph."""
    from qtvit.kernels.triton import ops

    monkeypatch.setattr(fused, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fused, "_VERDICTS", {})
    calls = []
    real_forward = ops._forward
    monkeypatch.setattr(ops, "_forward", lambda *a: calls.append(a[4]) or real_forward(*a))
    q, k, v = qkv(1, 1, 20, 8)
    out = qtvit.attention(q, k, v, "qt", impl="auto")
    assert fused._VERDICTS == {("cpu", torch.float32): True}
    assert calls == [*fused.KERNELS, "qt"]  # the self-check ran each kernel once, then the call
    torch.testing.assert_close(out, qtvit.attention(q, k, v, "qt", impl="dense"), rtol=1e-5, atol=1e-6)
    compiled = torch.compile(lambda q, k, v: qtvit.attention(q, k, v, "relu", impl="auto"),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), qtvit.attention(q, k, v, "relu", impl="dense"),
                               rtol=1e-5, atol=1e-6)
    assert calls[-1] == "relu" and len(calls) == 4  # no second self-check

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return qtvit.attention(q, k, v, "qt", impl="auto")

    # an exported graph keeps plain PyTorch ops (portable to ONNX and to machines without qtvit)
    exported = torch.export.export(Attend(), (q.detach(), k.detach(), v.detach()))
    assert not any("qtvit" in str(n.target) for n in exported.graph.nodes)


def test_lite_mla_runs_the_fused_kernels():
    """LiteMLA with impl="triton" (q/k/v are strided views of the qkv tensor, k + APE, the
    GELU(BN(v)) shortcut): output and every gradient match the float64 PyTorch linear path.

    Eval mode: train-mode BatchNorm's backward is so ill-conditioned here that every float32
    path (linear, dense, triton) is ~1e-3 off float64, which would test nothing about the kernels.
    """
    import copy

    from qtvit.layers.lite_mla import LiteMLA

    layer = LiteMLA(16, 16, head_dim=8, kernel="qt", ape=True, ape_size=(5, 5), shortcut=True, impl="triton")
    reference = copy.deepcopy(layer).double()
    reference.impl = "linear"
    x = torch.randn(1, 16, 5, 5)
    results = []
    for module, inputs in ((layer.eval(), x), (reference.eval(), x.double())):
        inputs = inputs.clone().requires_grad_()
        out = module(inputs)
        out.square().sum().backward()
        grads = [(name, p.grad) for name, p in module.named_parameters()]
        results.append([("out", out), ("x", inputs.grad), *grads])
    for (name, a), (_, b) in zip(*results, strict=True):
        limit = CONST_TOLERANCE[torch.float32] if name.endswith("const") else TOLERANCE[torch.float32]
        assert rel_rmse(a, b) <= limit, f"{name}: relative RMSE {rel_rmse(a, b):.2e}"


def test_bench_attention_triton_rows(monkeypatch):
    """``qtvit bench attention --impl triton``: rows for qt and relu; on CPU they run only under the
    interpreter and are skipped (code ``triton``, reason given) otherwise."""
    from qtvit.bench.attention import AttentionBenchConfig, format_table, run_attention_benchmark

    config = AttentionBenchConfig(kernels=("relu", "qt", "taylor2"), impls=("triton",), tokens=(16,),
                                  head_dims=(8,), heads=1, warmup=0, repeats=1, min_repeats=1,
                                  min_sample_seconds=1e-6, variant_seconds=0.01, memory=False, progress=False)
    doc = run_attention_benchmark(config)
    rows = [(r["variant"], r["status"]) for r in doc["results"]]
    assert rows == [("relu/triton", "ok"), ("qt/triton", "ok")]  # taylor2 has no fused kernel: no row
    assert all(r["median_ms"] > 0 for r in doc["results"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    doc = run_attention_benchmark(config)
    assert {(r["status"], r["skip"]) for r in doc["results"]} == {("skipped", "triton")}
    assert all("TRITON_INTERPRET=1" in r["reason"] for r in doc["results"])
    assert "skip:triton" in "\n".join(format_table(doc))


def test_unsupported_inputs_give_one_line_errors(monkeypatch):
    q, k, v = qkv(1, 1, 5, 8)
    with pytest.raises(ValueError, match="no fused Triton kernel"):
        fused.fused_attention(q, k, v, "taylor2")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        fused.fused_attention(q.double(), k.double(), v.double(), "qt")
    big = torch.randn(1, 1, 5, 128)
    with pytest.raises(ValueError, match="head dims up to 64"):
        fused.fused_attention(big, big, big, "qt")
    assert fused.unavailable_reason("cpu") is None  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        qtvit.attention(q, k, v, "qt", impl="triton")
    assert "TRITON_INTERPRET=1" in fused.unavailable_reason("cpu")


IO_POINTERS = ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "out_ptr", "dq_ptr", "dk_ptr", "dv_ptr")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_kernels_compile_for_hopper(dtype, monkeypatch, tmp_path):
    """The compiled (GPU) branch, including the tensor-core products the interpreter never runs,
    goes through Triton's front end, LLVM and ptxas for sm_90 without a GPU; no register spills
    (except the 40 bytes documented for the width-64 backward)."""
    import subprocess
    from pathlib import Path

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from qtvit.kernels.triton import ops

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("Triton's bundled CUDA tools are missing")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mod = ops.kernels(False)
    for width in (16, 64):
        for direction, names in (("forward", ("key_stats_kernel", "query_kernel")),
                                 ("backward", ("query_backward_kernel", "key_backward_kernel"))):
            block, warps = ops.GPU_BLOCKS[direction][width]
            consts = {"D": width, "E": width, "BN": block, "BD": width, "BE": width,
                      "FEATURE": ops.FEATURES["qt"], "FAST_DOT": dtype != "fp32",
                      "DOT_DTYPE": {"fp32": tl.float32, "bf16": tl.bfloat16}[dtype]}
            for name in names:
                fn = getattr(mod, name)
                signature = {}
                for arg, param in zip(fn.arg_names, fn.params, strict=True):
                    if param.is_constexpr:
                        signature[arg] = "constexpr"
                    elif arg.endswith("_ptr"):
                        signature[arg] = f"*{dtype}" if arg in IO_POINTERS else "*fp32"
                    else:
                        signature[arg] = "fp32" if arg == "eps" else "i32"
                if name == "query_kernel":
                    consts["CLAMP_FP16"] = False
                source = triton.compiler.ASTSource(fn, signature, constexprs=dict(consts))
                consts.pop("CLAMP_FP16", None)
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps})
                cubin = tmp_path / f"{name}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True,
                                       text=True, check=True).stdout
                stack = int(usage.split("STACK:")[1].split()[0])
                assert stack <= (40 if (direction, width) == ("backward", 64) else 0), f"{name}: {usage}"
                if dtype == "bf16" and name == "key_stats_kernel":
                    assert "mma" in compiled.asm["ptx"]  # the half-precision tensor-core product
