"""Fused Triton kernels for qt and relu attention (forward and backward), as one custom op.

``fused_attention(q, k, v, kernel, const=..., eps=...)`` is what ``qtvit.attention(...,
impl="triton")`` calls. It runs on CUDA tensors, and on CPU tensors when Triton's interpreter is
switched on (``TRITON_INTERPRET=1``), which is how the tests check the kernels without a GPU.

``use_fused(q, k, v, kernel)`` is ``impl="auto"``'s question: a CUDA tensor the kernels support,
Triton importable, and a one-time self-check against the PyTorch path passed for this device and
dtype (cached; on failure one logged warning and the PyTorch path from then on).

Nothing here imports Triton at module import: ``import qtvit`` stays light, and the custom ops
(``qtvit::feature_attention``) are registered when :mod:`.ops` is first imported.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from ..definitions import EPS

Tensor = torch.Tensor

logger = logging.getLogger(__name__)

KERNELS = ("qt", "relu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 64

# Device types on which impl="auto" considers the kernels (the interpreter is for checking only).
AUTO_DEVICES = ("cuda",)

# Self-check tolerance (relative RMSE against the PyTorch linear path), by input dtype.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """Whether Triton's interpreter is switched on now (``TRITON_INTERPRET=1``)."""
    if not triton_installed():
        return False
    from .ops import interpreting

    return interpreting()


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> str | None:
    """Why the fused kernels cannot run these inputs, or None if they can (one line, for errors)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D (B, H, tokens, dim)"
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return "q, k and v must share one dtype and one device"
    if 0 in (*q.shape, *k.shape, *v.shape):
        return "q, k and v must not have an empty dimension"
    return _unsupported(kernel, q.dtype, q.device.type, q.shape[-1], v.shape[-1])


@torch.compiler.assume_constant_result
def _unsupported(kernel: str, dtype: torch.dtype, device_type: str, d: int, e: int) -> str | None:
    # Constant for torch.compile: evaluated once while tracing (it reads the environment and
    # imports Triton, which Dynamo cannot trace), never part of the graph.
    if kernel not in KERNELS:
        return f"kernel {kernel!r} has no fused Triton kernel (available: {', '.join(KERNELS)})"
    if not triton_installed():
        return "Triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernels (float32, bfloat16, float16)"
    if d > MAX_HEAD_DIM or e > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} are supported by the Triton kernels; got d={d}, e={e}"
    if device_type != "cuda" and not interpreter_on():
        return (f"the Triton kernels need CUDA tensors (got {device_type}); set TRITON_INTERPRET=1 to "
                "run them on CPU tensors through Triton's interpreter (slow, for checking)")
    return None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``impl="triton"`` cannot run on ``device`` now, or None (for benchmarks and CLIs)."""
    device = torch.device(device)
    if not triton_installed():
        return "Triton is not installed"
    if device.type == "cuda" or interpreter_on():
        return None
    return (f"the Triton kernels need CUDA (device {device}); TRITON_INTERPRET=1 runs them on CPU "
            "through Triton's interpreter, for checking only (its timings mean nothing)")


def fused_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "qt", *, const: float | Tensor = 1.0,
                    eps: float = EPS) -> Tensor:
    """Fused normalised feature-map attention: out_i = Σ_j w_ij v_j / (Σ_j w_ij + ε).

    Args:
        q, k, v: (B, H, N, d), (B, H, M, d), (B, H, M, e); any strides (e.g. views of a qkv
            tensor); float32, bfloat16 or float16 (one dtype); d, e ≤ 64.
        kernel: ``"qt"`` (w = ⟨n(n(q)²), n(n(k)²)⟩ + c²) or ``"relu"`` (w = ReLU(q)·ReLU(k)).
        const: qt's constant feature c (a float or a scalar tensor that may require grad);
            ignored by relu.
        eps: added to the normaliser in float32.

    Returns:
        (B, H, N, e) in the input dtype: a view of (B, H, e, N) memory (as the PyTorch linear
        path returns). Computed with float32 accumulation; differentiable in q, k, v and const.
    """
    reason = unsupported_reason(q, k, v, kernel)
    if reason is not None:
        raise ValueError(f"impl='triton': {reason}")
    from .ops import feature_attention_op

    if kernel == "qt":
        c = const
        if not (isinstance(c, Tensor) and c.dtype == torch.float32 and c.dim() == 0 and c.device == q.device):
            c = torch.as_tensor(const, device=q.device).to(torch.float32).reshape(())
    else:  # relu has no constant feature: c = 0 makes the same kernels compute it
        c = torch.zeros((), dtype=torch.float32, device=q.device)
    out, _ = feature_attention_op(q, k, v, c, kernel, float(eps))
    return out


def _rrmse(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run both kernels, forward and backward, on a small input against the PyTorch linear path.

    The reference runs in float64 on the same inputs (so a TF32 setting of the user's cannot
    make it the inaccurate side). Returns None if they agree, else a one-line description of the
    failure (an exception, or which output or gradient differs and by how much).
    """
    from ..functional import attention

    gen = torch.Generator().manual_seed(0)
    # B=2, H=3, N=77 (not a multiple of the block), d=16, e=32: masking, head offsets, d ≠ e
    shapes = ((2, 3, 77, 16), (2, 3, 77, 16), (2, 3, 77, 32))
    try:
        for kernel in KERNELS:
            base = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
            grad = torch.randn(2, 3, 77, 32, generator=gen).to(dtype).to(device)
            q, k, v = (t.clone().requires_grad_() for t in base)
            q64, k64, v64 = (t.double().requires_grad_() for t in base)
            c = torch.tensor(0.8, device=device, requires_grad=True)
            c64 = torch.tensor(0.8, device=device, dtype=torch.float64, requires_grad=True)
            inputs, ref_inputs = [q, k, v], [q64, k64, v64]
            if kernel == "qt":
                inputs.append(c)
                ref_inputs.append(c64)
            fused = fused_attention(q, k, v, kernel, const=c)
            params = {"const": c64} if kernel == "qt" else {}
            ref = attention(q64, k64, v64, kernel, impl="linear", **params)
            fused_grads = torch.autograd.grad(fused, inputs, grad)
            ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
            names = ("out", "dq", "dk", "dv", "dconst")[:len(inputs) + 1]
            for name, a, b in zip(names, (fused, *fused_grads), (ref, *ref_grads), strict=True):
                err = _rrmse(a, b)
                if not err <= CHECK_TOLERANCE[dtype]:  # also catches NaN
                    return f"{kernel} {name} differs from the PyTorch path (relative RMSE {err:.2e})"
    except Exception as exc:  # noqa: BLE001  (any failure means: do not use the kernels)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


_VERDICTS: dict[tuple[str, torch.dtype], bool] = {}


def verified(device: torch.device, dtype: torch.dtype) -> bool:
    """The cached self-check verdict for (device, dtype); runs the check on first use.

    A failure logs one warning and returns False, so callers take the PyTorch path.
    """
    key = (str(device), dtype)
    if key not in _VERDICTS:
        device_type = torch.device(device).type
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            problem = self_check(torch.device(device), dtype)
        if problem is not None:
            logger.warning("qtvit: the fused Triton attention kernels failed their self-check on %s/%s "
                           "(%s); using the PyTorch path instead", device, str(dtype).removeprefix("torch."),
                           problem)
        _VERDICTS[key] = problem is None
    return _VERDICTS[key]


def use_fused(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> bool:
    """``impl="auto"``'s choice: CUDA tensors the kernels support, and a passed self-check."""
    if q.device.type not in AUTO_DEVICES or unsupported_reason(q, k, v, kernel) is not None:
        return False
    return _verified_constant(str(q.device), q.dtype)


@torch.compiler.assume_constant_result
def _verified_constant(device: str, dtype: torch.dtype) -> bool:
    # While torch.compile traces, this runs eagerly (outside the graph) and its result is baked in.
    return verified(torch.device(device), dtype)


__all__ = ["KERNELS", "fused_attention", "interpreter_on", "self_check", "unavailable_reason",
           "unsupported_reason", "use_fused", "verified"]
