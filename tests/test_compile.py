"""torch.compile: every kernel traces as one graph, and compiled results equal eager ones.

Tracing (backend="eager") checks for graph breaks without a C++ compiler; one inductor case
checks the fused code that ``qtvit bench attention --compile`` times, forward and gradients.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from kernel_cases import case_id, kernel_cases

import qtvit
from qtvit.kernels import linear as klin
from qtvit.layers.attention import KernelAttention


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _inputs(n=49, d=16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, n, d, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("case", kernel_cases(), ids=case_id)
def test_every_kernel_traces_as_one_graph(case, monkeypatch):
    name, params = case
    kern = qtvit.get_kernel(name)
    impls = ["dense"] + (["linear"] if kern.has_linear else [])
    monkeypatch.setattr(klin, "CHUNK_BYTES", 2 * 3 * 20 * 4 * 40)  # several token chunks
    monkeypatch.setattr(klin, "MIN_CHUNK_TOKENS", 1)
    q, k, v = _inputs()
    for impl in impls:
        def fn(q, k, v, impl=impl):
            return qtvit.attention(q, k, v, name, impl=impl, **params)
        compiled = torch.compile(fn, backend="eager", fullgraph=True)  # raises on a graph break
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)


def test_attention_module_traces_with_gradients():
    module = KernelAttention(32, num_heads=2, kernel="qt")
    x = torch.randn(2, 37, 32, requires_grad=True)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grad, x.grad = x.grad, None
    module.zero_grad()
    ref = module(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler on CPU")
@pytest.mark.parametrize("name", ["qt", "relu"])
def test_inductor_matches_eager_forward_and_backward(name, monkeypatch):
    monkeypatch.setattr(klin, "CHUNK_BYTES", 2 * 3 * 17 * 4 * 64)  # 4 chunks of 64 tokens
    monkeypatch.setattr(klin, "MIN_CHUNK_TOKENS", 1)
    q, k, v = _inputs(n=256, grad=True)
    params = {"const": torch.tensor(0.7, requires_grad=True)} if name == "qt" else {}

    def fn(q, k, v):
        return qtvit.attention(q, k, v, name, impl="linear", **params)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
    grads = []
    for f in (compiled, fn):
        leaves = [q, k, v, *params.values()]
        grads.append(torch.autograd.grad(f(q, k, v).square().sum(), leaves))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), [("qtvit_b0", (160, 192)), ("qtvit_vit_micro", (96, 96))])
def test_models_trace_as_one_graph(name, size):
    """QT-ViT (APE resize, LiteMLA's layouts, the shortcut) and the plain ViT: same logits, no break."""
    model = qtvit.create_model(name, img_size=size[0]).eval() if "vit_" in name else \
        qtvit.create_model(name).eval()
    x = torch.randn(1, 3, *size)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_qt_under_autocast_matches_eager_and_is_finite(dtype):
    q, k, v = (1e4 * t for t in _inputs(n=64))

    def fn(q, k, v):
        with torch.autocast("cpu", dtype=dtype):
            return qtvit.attention(q.to(dtype), k.to(dtype), v.to(dtype), "qt", impl="linear")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v), fn(q, k, v)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
