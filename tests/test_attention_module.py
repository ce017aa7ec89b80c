"""KernelAttention: a drop-in for timm's ViT Attention with any registered kernel."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import case_id, kernel_cases

import qtvit
from qtvit.layers import KernelAttention


def test_softmax_kernel_reproduces_timm_attention():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    kwargs = dict(num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    ref = timm_vit.Attention(64, **kwargs).eval()
    ours = KernelAttention(64, **kwargs, kernel="softmax").eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and not missing
    x = torch.randn(2, 50, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", kernel_cases(), ids=case_id)
def test_every_kernel_trains_in_the_module(case):
    name, params = case
    attn = KernelAttention(32, num_heads=2, kernel=name, **params)
    x = torch.randn(2, 17, 32, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    learnable = qtvit.get_kernel(name).learnable
    assert sorted(n for n, _ in attn.kernel_params.named_parameters()) == sorted(learnable)
    for pname, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_module_matches_functional_api_and_owns_const():
    attn = KernelAttention(48, num_heads=3, kernel="qt", const=0.5).eval()
    assert float(attn.kernel_params.const) == 0.5
    x = torch.randn(1, 20, 48)
    q, k, v = attn.qkv(x).reshape(1, 20, 3, 3, 16).permute(2, 0, 3, 1, 4)
    expected = qtvit.attention(q, k, v, "qt", const=0.5).transpose(1, 2).reshape(1, 20, 48)
    torch.testing.assert_close(attn(x), attn.proj(expected))


def test_set_kernel_keeps_projection_weights():
    attn = KernelAttention(32, num_heads=4, kernel="relu")
    w = attn.qkv.weight.detach().clone()
    attn.set_kernel("qt_paper", gamma=2.0)
    assert attn.kernel == "qt_paper" and float(attn.kernel_params.gamma) == 2.0
    assert torch.equal(attn.qkv.weight, w)
    assert torch.isfinite(attn(torch.randn(1, 5, 32))).all()


def test_module_bad_inputs():
    with pytest.raises(ValueError, match="unknown attention kernel 'soft'"):
        KernelAttention(32, kernel="soft")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        KernelAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="expects x of shape \\(B, N, C\\)"):
        KernelAttention(32)(torch.randn(2, 32))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_scripted_module_keeps_fixed_kernel_parameters():
    """A scripted copy runs the kernel in Python with the fixed parameters stored as attributes."""
    attn = KernelAttention(32, num_heads=2, kernel="taylor2_pool", pool=4).eval()
    assert attn.kernel_params.pool == 4 and attn.kernel_params.as_kwargs()["pool"] == 4
    x = torch.randn(2, 11, 32)
    scripted = torch.jit.script(attn)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), attn(x))
        attn.set_kernel("taylor2_pool", pool=2)  # the eager module changed: the result must too
        assert not torch.allclose(attn(x), scripted(x))


def test_module_forward_has_no_keyword_expansion():
    """The kernel call in forward takes fixed arguments (what TorchScript and export need)."""
    import inspect

    from qtvit.layers import LiteMLA

    for cls in (KernelAttention, LiteMLA):
        source = inspect.getsource(cls.forward)
        assert "**" not in source and "kernel_params.attend(" in source, cls.__name__
