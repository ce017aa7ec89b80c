"""Launchers of the fused Triton kernels and their ``torch.library`` custom ops.

Two ops, both with fake (meta) implementations so ``torch.compile``/``torch.export`` see one
opaque op each and never trace into Triton:

* ``qtvit::feature_attention(q, k, v, const, kernel, eps) -> (out, stats)``
* ``qtvit::feature_attention_backward(grad_out, q, k, v, const, stats, kernel, eps)
  -> (dq, dk, dv, dconst)``, wired in as the first op's autograd formula.

``stats`` (B·H, D+1, E+1) float32 holds the reduced key statistics [KV, kz; Σv, M]; it is the
only state the backward keeps besides q, k, v (feature maps are recomputed from them).

Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, e), any strides; out (B, H, N, e) in the
input dtype, returned as a view of (B, H, e, N) memory like the PyTorch linear path.

Execution mode: Triton decides between compiling and interpreting when ``@triton.jit`` decorates a
function, so the kernel module is loaded once per mode (see :func:`kernels`) and the mode is read
from ``triton.knobs.runtime.interpret`` (the ``TRITON_INTERPRET`` environment variable) at every
launch: CPU tensors run under the interpreter whenever it is switched on, whatever the import order.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

Tensor = torch.Tensor

# Feature maps the fused kernels implement (ids must match _kernels.RELU / _kernels.QT).
FEATURES = {"relu": 0, "qt": 1}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 64  # the (d, e) statistics tile lives in registers: 64×64 floats per program
# Tokens per block and warps per program on a GPU, by pass and padded head width max(BD, BE).
# Chosen so no kernel spills registers when compiled for sm_90 (ptxas resource usage; compiled
# without a GPU, see the README): the FMA products of the float32 path keep whole blocks in
# registers, and the qt backward holds the feature map's intermediates too. Not timed.
GPU_BLOCKS = {
    "forward": {16: (64, 4), 32: (64, 4), 64: (64, 8)},
    "backward": {16: (64, 8), 32: (32, 8), 64: (16, 8)},  # width 64: 40 bytes of spill remain
}
# Under the interpreter each block costs Python overhead per operation, nearly independent of
# its size: bigger blocks make the CPU checks ~2x faster and change no arithmetic but the order
# of the token sums.
INTERPRETER_BLOCK_TOKENS = 128
INTERPRETER_SPLITS = 4  # splits per (batch·head) under the interpreter: exercises the reduction

_MODULES: dict[bool, object] = {}


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``), read now."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def kernels(interpret: bool):
    """The kernel module decorated for one mode (compiled or interpreted), loaded once per mode."""
    if interpret not in _MODULES:
        import triton

        name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with triton.knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET afterwards
            triton.knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        if interpret:
            _inline_device_functions(module)
        _MODULES[interpret] = module
    return _MODULES[interpret]


def _inline_device_functions(module) -> None:
    """Interpreter only: call the helper (device) functions as plain Python.

    The interpreter re-patches ``triton.language`` on every device-function call (about 2 ms
    each on this CPU, most of a small launch's time). While a kernel runs, the language is already
    patched, so the undecorated helpers behave the same: the kernels (the launch entry points,
    names ending in ``_kernel``) stay interpreted functions and only their helpers are unwrapped.
    """
    from triton.runtime.interpreter import InterpretedFunction

    for name, value in list(vars(module).items()):
        if isinstance(value, InterpretedFunction) and not name.endswith("_kernel"):
            setattr(module, name, value.fn)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _plan(q: Tensor, v: Tensor, kernel: str, direction: str) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of the ``direction`` ("forward"/"backward") kernels."""
    interpret = interpreting()
    d, e = q.shape[-1], v.shape[-1]
    BD, BE = _pow2(d), _pow2(e)
    block, warps = GPU_BLOCKS[direction][max(BD, BE)]
    if interpret:
        block, opts = INTERPRETER_BLOCK_TOKENS, {}
    else:
        opts = {"num_warps": warps}
    half = q.dtype in (torch.float16, torch.bfloat16)
    consts = {
        "D": d, "E": e, "BN": block, "BD": BD, "BE": BE, "FEATURE": FEATURES[kernel],
        # Tensor-core products for fp16/bf16 inputs: GPU only (the interpreter's bf16 dot is
        # unreliable, and the float32 path is what CI verifies). See _kernels._dot/_dot_inputs.
        "FAST_DOT": half and not interpret,
        "DOT_DTYPE": _triton_dtype(q.dtype),
    }
    return consts, opts


def _splits(tokens: int, rows: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split) of one pass: enough programs to fill the GPU, whole blocks each.

    rows = B·H programs already in the grid; on a GPU aim for ~4 programs per SM.
    """
    blocks = -(-tokens // block)
    if device.type != "cuda" or interpreting():
        wanted = INTERPRETER_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = -(-4 * sms // rows)
    splits = max(1, min(wanted, blocks))
    per_split = -(-blocks // splits) * block
    return -(-tokens // per_split), per_split


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _forward(q: Tensor, k: Tensor, v: Tensor, const: Tensor, kernel: str,
             eps: float) -> tuple[Tensor, Tensor]:
    B, H, N, d = q.shape
    M, e = k.shape[-2], v.shape[-1]
    mod = kernels(interpreting())
    cfg, opts = _plan(q, v, kernel, "forward")
    key_splits, key_tokens = _splits(M, B * H, cfg["BN"], q.device)
    query_splits, query_tokens = _splits(N, B * H, cfg["BN"], q.device)
    f32 = {"dtype": torch.float32, "device": q.device}
    part = torch.empty((B * H, key_splits, d + 1, e + 1), **f32)
    stats = torch.empty((B * H, d + 1, e + 1), **f32)
    out = torch.empty((B, H, e, N), dtype=q.dtype, device=q.device).transpose(-1, -2)
    mod.key_stats_kernel[(B * H, key_splits)](
        k, v, part, H, M, key_tokens, *k.stride(), *v.stride(), **cfg, **opts)
    mod.query_kernel[(B * H, query_splits)](
        q, part, stats, const, out, H, N, query_tokens, key_splits, float(eps), *q.stride(), *out.stride(),
        **cfg, CLAMP_FP16=q.dtype == torch.float16, **opts)
    return out, stats


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, const: Tensor, stats: Tensor, kernel: str,
              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, N, d = q.shape
    M, e = k.shape[-2], v.shape[-1]
    mod = kernels(interpreting())
    cfg, opts = _plan(q, v, kernel, "backward")
    key_splits, key_tokens = _splits(M, B * H, cfg["BN"], q.device)
    query_splits, query_tokens = _splits(N, B * H, cfg["BN"], q.device)
    f32 = {"dtype": torch.float32, "device": q.device}
    dpart = torch.empty((B * H, query_splits, d + 1, e + 1), **f32)
    dstats = torch.empty((B * H, d + 1, e + 1), **f32)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mod.query_backward_kernel[(B * H, query_splits)](
        q, grad_out, stats, const, dq, dpart, H, N, query_tokens, float(eps),
        *q.stride(), *grad_out.stride(), *dq.stride(), **cfg, **opts)
    mod.key_backward_kernel[(B * H, key_splits)](
        k, v, dpart, dstats, const, dk, dv, H, M, key_tokens, query_splits,
        *k.stride(), *v.stride(), *dk.stride(), *dv.stride(), **cfg, **opts)
    # ∂c: c enters as c²·[Σv; M] in every query's numerator and denominator, so
    # ∂c = 2c Σ_bh ([Σv, M] · [Σ_i ∂num_i, Σ_i ∂den_i]) (row D of both statistics matrices).
    dconst = 2 * const.float() * (stats[:, d, :] * dstats[:, d, :]).sum()
    return dq, dk, dv, dconst.to(const.dtype)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("qtvit::feature_attention", mutates_args=())
def feature_attention_op(q: Tensor, k: Tensor, v: Tensor, const: Tensor, kernel: str,
                         eps: float) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, const, kernel, eps)


@feature_attention_op.register_fake
def _(q, k, v, const, kernel, eps):
    B, H, N, d = q.shape
    e = v.shape[-1]
    out = q.new_empty((B, H, e, N)).transpose(-1, -2)
    return out, q.new_empty((B * H, d + 1, e + 1), dtype=torch.float32)


@torch.library.custom_op("qtvit::feature_attention_backward", mutates_args=())
def feature_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, const: Tensor,
                                  stats: Tensor, kernel: str, eps: float
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, const, stats, kernel, eps)


@feature_attention_backward_op.register_fake
def _(grad_out, q, k, v, const, stats, kernel, eps):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(const)


def _setup_context(ctx, inputs, output):
    q, k, v, const, kernel, eps = inputs
    _, stats = output
    ctx.save_for_backward(q, k, v, const, stats)
    ctx.kernel, ctx.eps = kernel, eps
    ctx.mark_non_differentiable(stats)


def _autograd_backward(ctx, grad_out, grad_stats):
    q, k, v, const, stats = ctx.saved_tensors
    dq, dk, dv, dconst = feature_attention_backward_op(grad_out, q, k, v, const, stats, ctx.kernel, ctx.eps)
    return dq, dk, dv, dconst, None, None


feature_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)
