"""``swap_attention``: timm ViT/EfficientViT and qtvit models get another kernel in place.

References: timm's own modules (fused and manual softmax paths, ReLU LiteMLA) on the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import qtvit
from qtvit.models import create_model, list_models, swap_attention
from qtvit.models.swap import KernelLiteMLA, TimmKernelAttention


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN statistics (default init hides swapped or missing modules)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                r = 1 + 0.1 * r.abs()
            elif t.dim() <= 1:
                r = (1 + 0.1 * r) if name.endswith("weight") else 0.1 * r
            else:
                r = r / math.sqrt(math.prod(t.shape[1:]))
            t.copy_(r.to(t.dtype))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def trains(model: nn.Module, x: torch.Tensor, classes: int, steps: int = 4) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    model.train()
    y = torch.arange(x.shape[0]) % classes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------ timm ViT


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit_softmax_swap_keeps_logits(timm, fused):
    model = randomize_(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)).eval()
    Attention = timm.layers.Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused  # False: timm's manual softmax, an independent reference path
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    qkv_weight = model.blocks[3].attn.qkv.weight
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    out_model, count = swap_attention(model, "softmax", return_count=True)
    assert out_model is model and count == n_attn == 12
    assert not any(isinstance(m, Attention) for m in model.modules())
    assert all(isinstance(b.attn, TimmKernelAttention) for b in model.blocks)
    assert model.blocks[3].attn.qkv.weight is qkv_weight  # the same Parameter: optimizers stay valid
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_timm_vit_qt_swap_trains(timm):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=4)
    swap_attention(model, "qt")
    consts = [n for n, _ in model.named_parameters() if n.endswith("kernel_params.const")]
    assert len(consts) == 12
    before = model.blocks[0].attn.kernel_params.const.detach().clone()
    losses = trains(model, torch.randn(4, 3, 64, 64), classes=4)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert not torch.equal(model.blocks[0].attn.kernel_params.const.detach(), before)


def test_reswap_goes_through_set_kernel_and_back_to_softmax(timm):
    model = randomize_(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    swap_attention(model, "taylor2", impl="dense")
    assert {b.attn.kernel for b in model.blocks} == {"taylor2"} and model.blocks[0].attn.impl == "dense"
    with torch.no_grad():
        assert rel_err(model(x), ref) > 1e-3  # a different kernel computes something else
    model, count = swap_attention(model, "softmax", return_count=True)
    assert count == 12
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_timm_attention_options_and_masks(timm):
    # scale_norm, gate, qk_norm, explicit head dim and dim_out: one standalone module (the root case).
    src = timm.layers.Attention(dim=32, num_heads=4, attn_head_dim=12, dim_out=24, qkv_bias=True,
                                qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)
    randomize_(src).eval()
    src.fused_attn, src.scale = False, 0.2  # timm's manual path honours a non-default scale
    x = torch.randn(2, 7, 32)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        refs = [src(x), src(x, attn_mask=mask), src(x, is_causal=True)]
    new = swap_attention(src, "softmax")
    assert isinstance(new, TimmKernelAttention) and new.gate is src.gate and new.norm is src.norm
    with torch.no_grad():
        outs = [new(x), new(x, attn_mask=mask), new(x, is_causal=True)]
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == (2, 7, 24)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    new.set_kernel("qt")
    assert torch.isfinite(new(x)).all()
    with pytest.raises(ValueError, match="kernel 'qt' does not support attn_mask/is_causal"):
        new(x, attn_mask=mask)


def test_swap_keeps_dtype_and_validates_before_changing(timm):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).double()
    with pytest.raises(ValueError, match="unknown attention kernel 'qtt'"):
        swap_attention(model, "qtt")
    with pytest.raises(TypeError, match="unknown parameter.*cnst"):
        swap_attention(model, "qt", cnst=2.0)
    assert isinstance(model.blocks[0].attn, timm.layers.Attention)  # untouched after the errors
    swap_attention(model, "qt_paper", alpha=0.5)
    kp = model.blocks[0].attn.kernel_params
    assert kp.alpha.dtype == torch.float64 and kp.alpha.item() == 0.5
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_subclass_with_own_forward_is_refused(timm):
    class Odd(timm.layers.Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 16), Odd(16, num_heads=2))
    with pytest.raises(TypeError, match=r"cannot swap 1 \(Odd\): .* own forward is unsupported"):
        swap_attention(model)


# ------------------------------------------------------------------------------ timm EfficientViT


def _effvit(timm, eps: float | None = None) -> nn.Module:
    model = randomize_(timm.create_model("efficientvit_b0", num_classes=10)).eval()
    if eps is not None:
        for m in model.modules():
            if isinstance(m, timm.models.efficientvit_mit.LiteMLA):
                m.eps = eps
    return model


def test_timm_efficientvit_relu_swap_keeps_logits(timm):
    # timm adds ε = 1e-5 to the normaliser, qtvit 1e-15: with timm's ε set to 1e-15 the swap is exact.
    model = _effvit(timm, eps=1e-15)
    LiteMLA = timm.models.efficientvit_mit.LiteMLA
    n_mla = sum(isinstance(m, LiteMLA) for m in model.modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    model, count = swap_attention(model, "relu", return_count=True)
    assert count == n_mla == 4
    assert sum(isinstance(m, KernelLiteMLA) for m in model.modules()) == 4
    with torch.no_grad():
        out = model(x)
    assert ref.std() > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_timm_efficientvit_default_eps_difference_is_small(timm):
    model = _effvit(timm)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        out = swap_attention(model, "relu")(x)
    assert 0 < rel_err(out, ref) < 5e-3


def test_timm_efficientvit_qt_swap_trains(timm):
    model = timm.create_model("efficientvit_b0", num_classes=4)
    model = swap_attention(model, "qt")
    assert all(m.kernel == "qt" for m in model.modules() if isinstance(m, KernelLiteMLA))
    before = [p.detach().clone() for n, p in model.named_parameters() if "kernel_params" in n]
    assert len(before) == 4
    losses = trains(model, torch.randn(4, 3, 64, 64), classes=4, steps=3)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    after = [p.detach() for n, p in model.named_parameters() if "kernel_params" in n]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("kernel", qtvit.list_kernels(linear_only=True))
def test_timm_efficientvit_any_kernel_runs(timm, kernel):
    model = swap_attention(timm.create_model("efficientvit_b0", num_classes=3), kernel)
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------ qtvit models


def test_qtvit_vit_swap_counts_attention_modules_not_containers():
    model = create_model("qtvit_vit_micro", num_classes=3, img_size=32)
    model, count = swap_attention(model, "taylor2_chunk", chunks=4, return_count=True)
    assert count == len(model.blocks)  # the model's own set_kernel (a container) is not counted
    fixed = {**qtvit.get_kernel("taylor2_chunk").params, "chunks": 4}  # other parameters at their defaults
    assert all(b.attn.kernel == "taylor2_chunk" and b.attn.kernel_params.fixed == fixed for b in model.blocks)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_swaps(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost, even for the large models
        model = create_model(name)
    model, count = swap_attention(model, "relu", return_count=True)
    assert count >= 1
    kernels = {m.kernel for m in model.modules() if hasattr(m, "set_kernel") and hasattr(m, "kernel")}
    assert kernels == {"relu"}


# ------------------------------------------------------------------------------ errors


def test_unsupported_model_raises_naming_what_it_found():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)
            self.fc = nn.Linear(16, 2)

    with pytest.raises(ValueError, match="found nothing to swap in Net.*found: MultiheadAttention"):
        swap_attention(Net())
    with pytest.raises(ValueError, match="found nothing to swap in Sequential"):
        swap_attention(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        swap_attention(create_model("qtvit_vit_micro", img_size=32), impl="fast")
