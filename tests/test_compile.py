"""Tracing and export: torch.compile, torch.export, TorchScript and torch.fx give eager's numbers.

Tracing (backend="eager") checks for graph breaks without a C++ compiler; one inductor case
checks the fused code that ``qtvit bench attention --compile`` times, forward and gradients.

The modules (LiteMLA, KernelAttention) and QT-ViT must trace on every export path: no keyword
expansion and no branching on the token count in ``forward`` (``impl="auto"`` resolves to the
linear path when the sizes are symbolic), checked at two input sizes each.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from kernel_cases import (
    chunked_linear_paths,
    counting_chunks,
    kernel_cases,
    path_id,
)
from torch.export import Dim

import qtvit
from qtvit.layers import LiteMLA
from qtvit.layers.attention import KernelAttention


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _inputs(n=49, d=16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, n, d, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


# Cells whose path splits tokens into chunks (compiled: concatenated) and those that never do.
_LINEAR_CHUNKED = {(n, tuple(p.items())) for n, p, path in chunked_linear_paths()
                   if path == "linear" or qtvit.get_kernel(n).linear_impl is None}
CHUNKED_CELLS = [(n, p, impl) for n, p in kernel_cases() for impl in ("dense", "linear")
                 if (impl == "dense" and qtvit.get_kernel(n).dense_impl is None)
                 or (impl == "linear" and (n, tuple(p.items())) in _LINEAR_CHUNKED)]
WHOLE_CELLS = [(n, p, impl) for n, p in kernel_cases() for impl in ("dense", "linear")
               if (n, p, impl) not in CHUNKED_CELLS and (impl == "dense" or qtvit.get_kernel(n).has_linear)]


def _mismatch(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Worst element of |out − ref| / (atol + rtol·|ref|): ≤ 1 is assert_close's criterion."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs() / (atol + rtol * ref.abs())).max().item()


def _compiled_vs_eager(name: str, params: dict, impl: str) -> float:
    """``_mismatch`` of the fullgraph-compiled attention call against eager."""
    q, k, v = _inputs()

    def fn(q, k, v):
        return qtvit.attention(q, k, v, name, impl=impl, **params)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)  # raises on a graph break
    with torch.no_grad():
        return _mismatch(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("cell", CHUNKED_CELLS, ids=path_id)
def test_chunked_paths_trace_as_one_graph(cell):
    name, params, impl = cell
    # B·H = 6 rows of float32: 2 chunks of relu's 17-float rows, more for wider maps; 16 dense queries
    with counting_chunks(6 * 17 * 4 * 47, dense_bytes=6 * 4 * 49 * 4 * 16) as counts:
        mismatch = _compiled_vs_eager(name, params, impl)
    assert max(counts) > 1, counts
    assert mismatch <= 1.0


@pytest.mark.parametrize("cell", WHOLE_CELLS, ids=path_id)
def test_unchunked_paths_trace_as_one_graph(cell):
    assert _compiled_vs_eager(*cell) <= 1.0


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
def test_inductor_matches_eager_forward_and_backward(name):
    q, k, v = _inputs(n=256, grad=True)
    params = {"const": torch.tensor(0.7, requires_grad=True)} if name == "qt" else {}

    def fn(q, k, v):
        return qtvit.attention(q, k, v, name, impl="linear", **params)

    with counting_chunks(2 * 3 * 17 * 4 * 64) as counts:  # 4 chunks of 64 tokens
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
        grads = []
        for f in (compiled, fn):
            leaves = [q, k, v, *params.values()]
            grads.append(torch.autograd.grad(f(q, k, v).square().sum(), leaves))
    assert max(counts) == 4, counts
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


# ---------------------------------------------------------------- TorchScript, FX, torch.export


def _lite_mla(kernel: str) -> LiteMLA:
    extras = dict(ape=True, ape_size=(6, 6), shortcut=True) if kernel == "qt" else {}
    m = LiteMLA(32, 24, head_dim=8, kernel=kernel, **extras).eval()
    with torch.no_grad():  # non-trivial APE, constant and shortcut statistics
        for name, t in m.named_parameters():
            if name in ("ape", "kernel_params.const"):
                t.copy_(0.5 + 0.3 * torch.randn_like(t))
        if m.v_norm is not None:
            m.v_norm.running_mean.normal_()
            m.v_norm.running_var.uniform_(0.5, 2.0)
    return m


# (module, its inputs at two sizes): LiteMLA at the APE grid, at another non-square grid and at 4×4
# (where eager impl="auto" takes the dense path); KernelAttention at two token counts.
MODULE_CASES = {
    "lite_mla-qt": (lambda: _lite_mla("qt"), [(2, 32, 6, 6), (3, 32, 5, 9), (2, 32, 4, 4)]),
    "lite_mla-relu": (lambda: _lite_mla("relu"), [(2, 32, 7, 5), (3, 32, 4, 4)]),
    "attention-qt": (lambda: KernelAttention(32, num_heads=2, kernel="qt", const=0.7).eval(),
                     [(2, 17, 32), (3, 50, 32)]),
    "attention-relu": (lambda: KernelAttention(32, num_heads=2, kernel="relu").eval(),
                       [(2, 17, 32), (3, 9, 32)]),
}


def _worst_mismatch(traced, module, shapes) -> float:
    """Largest ``_mismatch`` of a traced/exported module against eager over inputs of ``shapes``."""
    worst = 0.0
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            worst = max(worst, _mismatch(traced(x), module(x)))
    return worst


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_modules_script_and_fx_trace_equal_eager(case):
    build, shapes = MODULE_CASES[case]
    module = build()
    assert _worst_mismatch(torch.jit.script(module), module, shapes) <= 1.0
    graph = torch.fx.symbolic_trace(module)
    assert any(n.op == "call_function" and n.target.__name__ == "kernel_attention" for n in graph.graph.nodes)
    assert _worst_mismatch(graph, module, shapes) <= 1.0


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_modules_export_with_dynamic_batch_and_size(case):
    """One exported graph for every batch and token grid (the APE resize inside it)."""
    build, shapes = MODULE_CASES[case]
    module = build()
    dims = {0: Dim("batch", min=2, max=64)}
    if len(shapes[0]) == 4:
        dims.update({2: Dim("height", min=2, max=256), 3: Dim("width", min=2, max=256)})
    else:
        dims[1] = Dim("tokens", min=2, max=4096)
    program = torch.export.export(module, (torch.randn(shapes[0]),), dynamic_shapes=(dims,))
    assert _worst_mismatch(program.module(), module, shapes) <= 1.0


def test_qtvit_b0_fx_trace_equals_eager():
    model = qtvit.create_model("qtvit_b0", img_size=64).eval()
    graph = torch.fx.symbolic_trace(model)
    assert _worst_mismatch(graph, model, [(2, 3, 64, 64), (1, 3, 96, 64)]) <= 1.0


@pytest.mark.slow
def test_qtvit_b0_exports_with_dynamic_batch_height_and_width():
    model = qtvit.create_model("qtvit_b0", img_size=64).eval()
    dims = {0: Dim("batch", min=2, max=64), 2: Dim("height", min=64, max=1024),
            3: Dim("width", min=64, max=1024)}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=(dims,))
    assert _worst_mismatch(program.module(), model, [(2, 3, 64, 64), (3, 3, 96, 128)]) <= 1.0
