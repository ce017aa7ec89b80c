"""EfficientViT / QT-ViT layers: conv blocks, drop-path, LiteMLA (kernels, APE, shortcut), head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qtvit
from qtvit.layers import (
    ClsHead,
    ConvNormAct,
    DropPath,
    DSConv,
    EfficientViTBlock,
    FusedMBConv,
    LiteMLA,
    MBConv,
    ResBlock,
    ResidualBlock,
    drop_path,
    get_act_layer,
    resize_ape,
)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN statistics (defaults make BN an identity and hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                r = 0.5 + r.abs()
            elif t.dim() <= 1:
                r = 1.0 + 0.2 * r if name.endswith(("weight", "const")) else 0.2 * r
            else:
                fan_in = math.prod(t.shape[1:]) if t.dim() > 1 else 1
                r = r / math.sqrt(fan_in) if not name.endswith("ape") else 0.5 * r
            t.copy_(r.to(t.dtype))
    return module


# ------------------------------------------------------------------------------ conv blocks
@pytest.mark.parametrize("stride, size, out",
                         [(1, (9, 14), (9, 14)), (2, (9, 14), (5, 7)), (2, (8, 8), (4, 4))])
def test_conv_blocks_shapes(stride, size, out):
    x = torch.randn(2, 8, *size)
    for block in (DSConv(8, 12, stride), MBConv(8, 12, stride, 4), MBConv(8, 12, stride, 4, fewer_norm=True),
                  FusedMBConv(8, 12, stride, 4), ResBlock(8, 12, stride)):
        assert block(x).shape == (2, 12, *out), type(block).__name__


def test_mbconv_norm_forms_and_widths():
    full, fewer = MBConv(8, 16, 1, 4), MBConv(8, 16, 1, 4, fewer_norm=True)
    assert full.inverted_conv.conv.out_channels == 32 and full.depth_conv.conv.groups == 32
    assert full.inverted_conv.conv.bias is None and isinstance(full.inverted_conv.norm, nn.BatchNorm2d)
    # fewer-norm: biases instead of norms on the first two convs, BN only on the projection
    assert fewer.inverted_conv.conv.bias is not None and isinstance(fewer.inverted_conv.norm, nn.Identity)
    assert fewer.depth_conv.conv.bias is not None and isinstance(fewer.depth_conv.norm, nn.Identity)
    assert fewer.point_conv.conv.bias is None and isinstance(fewer.point_conv.norm, nn.BatchNorm2d)
    assert all(isinstance(b.point_conv.act, nn.Identity) for b in (full, fewer))


def test_mbconv_matches_functional_reference():
    """Fewer-norm MBConv (eval) against a hand-written conv chain."""
    m = randomize_(MBConv(6, 10, 2, 3, fewer_norm=True, act_layer=nn.Hardswish)).eval().double()
    x = torch.randn(2, 6, 11, 7, dtype=torch.float64)
    a = F.hardswish(F.conv2d(x, m.inverted_conv.conv.weight, m.inverted_conv.conv.bias))
    a = F.hardswish(F.conv2d(a, m.depth_conv.conv.weight, m.depth_conv.conv.bias, stride=2, padding=1,
                             groups=18))
    a = F.conv2d(a, m.point_conv.conv.weight)
    bn = m.point_conv.norm
    want = (a - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    want = want * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(m(x), want)


def test_conv_norm_act_padding_and_none_parts():
    c = ConvNormAct(4, 6, 5, 2, norm_layer=None, act_layer=None)
    assert c.conv.padding == (2, 2) and isinstance(c.norm, nn.Identity) and isinstance(c.act, nn.Identity)
    assert c(torch.randn(1, 4, 10, 10)).shape == (1, 6, 5, 5)


def test_act_names():
    assert isinstance(get_act_layer("hardswish")(), nn.Hardswish)
    gelu = get_act_layer("gelu_tanh")()
    assert isinstance(gelu, nn.GELU) and gelu.approximate == "tanh"
    with pytest.raises(ValueError, match="unknown activation 'swishy'.*hardswish"):
        get_act_layer("swishy")


# ------------------------------------------------------------------------------ drop path
def test_drop_path_per_sample_and_unbiased():
    x = torch.ones(4000, 3, 2, 2, dtype=torch.float64)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    # every sample is either all zero or all 1/(1-p)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.04
    assert abs(y.mean().item() - 1.0) < 0.06
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    assert torch.equal(drop_path(x, 1.0, training=True), torch.zeros_like(x))  # no 0/0


def test_drop_path_module_and_residual():
    dp = DropPath(0.5)
    x = torch.randn(64, 8)
    assert torch.equal(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)
    block = ResidualBlock(nn.Linear(8, 8), drop_path=0.5).train()
    y = block(x)
    dropped = torch.isclose(y, x).all(1)
    assert 0 < dropped.sum() < 64  # some samples kept only the shortcut, others not
    with pytest.raises(ValueError, match="needs a shortcut"):
        ResidualBlock(nn.Identity(), shortcut=False, drop_path=0.1)


# ------------------------------------------------------------------------------ LiteMLA
def lite_mla_reference(m: LiteMLA, x: torch.Tensor) -> torch.Tensor:
    """LiteMLA written out per head with pairwise weights (an independent reading of docs/DESIGN.md §litemla).

    Handles relu (EfficientViT) and qt (QT-ViT) kernels; float64; eval-mode BN.
    """
    B, C, H, W = x.shape
    d, h = m.head_dim, m.heads
    base = F.conv2d(x, m.qkv.conv.weight)  # (B, 3hd, H, W)
    branches = [base] + [agg[1](agg[0](base)) for agg in m.aggreg]
    ape = None
    if m.ape is not None:
        ape = F.interpolate(m.ape, size=(H, W), mode="bicubic", align_corners=False) if (
            tuple(m.ape.shape[-2:]) != (H, W)) else m.ape
    outs = []
    for s, qkv in enumerate(branches):
        for i in range(h):
            head = s * h + i  # heads of branch s follow those of branch s-1
            blk = qkv[:, 3 * d * i: 3 * d * (i + 1)].flatten(2)  # (B, 3d, N)
            q, k, v = blk[:, :d], blk[:, d:2 * d], blk[:, 2 * d:]  # (B, d, N) each
            if ape is not None:
                k = k + ape[:, head * d:(head + 1) * d].flatten(2)
            if m.kernel == "relu":
                w = torch.einsum("bdn,bdm->bnm", q.relu(), k.relu())
            else:  # qt: ⟨n(n(q)²), n(n(k)²)⟩ + c²
                def hat(t):
                    t = t / (t.norm(dim=1, keepdim=True) + 1e-15)
                    t = t * t
                    return t / (t.norm(dim=1, keepdim=True) + 1e-15)
                w = torch.einsum("bdn,bdm->bnm", hat(q), hat(k)) + m.kernel_params.const ** 2
            out = torch.einsum("bnm,bdm->bdn", w, v) / (w.sum(-1)[:, None, :] + 1e-15)  # (B, d, N)
            if m.v_norm is not None:
                bn = m.v_norm
                vn = (v - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
                out = out + F.gelu(vn * bn.weight[:, None] + bn.bias[:, None])
            outs.append(out)
    y = torch.cat(outs, dim=1).reshape(B, -1, H, W)
    return m.proj(y)


@pytest.mark.parametrize("kernel, ape, shortcut",
                         [("relu", False, False), ("qt", True, True), ("qt", True, False)])
@pytest.mark.parametrize("size", [(6, 6), (5, 9)])  # (6, 6) = APE grid; (5, 9) resizes it, non-square
def test_lite_mla_matches_reference(kernel, ape, shortcut, size):
    m = LiteMLA(32, 24, head_dim=8, kernel=kernel, ape=ape, ape_size=(6, 6), shortcut=shortcut)
    m = randomize_(m, seed=1).double().eval()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    with torch.no_grad():
        want = lite_mla_reference(m, x)
        for impl in ("linear", "dense"):
            m.impl = impl
            torch.testing.assert_close(m(x), want, rtol=1e-9, atol=1e-10)


def test_lite_mla_matches_timm():
    """kernel=relu, no APE, no shortcut is timm's LiteMLA (same state-dict keys, same output)."""
    timm = pytest.importorskip("timm")
    from timm.models.efficientvit_mit import LiteMLA as TimmLiteMLA

    theirs = TimmLiteMLA(32, 32, dim=8, norm_layer=(None, nn.BatchNorm2d)).eval()
    theirs.eps = 1e-15  # timm uses 1e-5, EfficientViT/QT-ViT 1e-15
    ours = LiteMLA(32, 32, head_dim=8).eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()]
    randomize_(theirs, seed=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert timm  # imported for the skip


def test_lite_mla_qt_extras_shapes_and_init():
    m = LiteMLA(64, 64, head_dim=16, kernel="qt", ape=True, ape_size=(14, 14), shortcut=True)
    assert m.num_attn_heads == 8
    assert m.ape.shape == (1, 2 * 4 * 16, 14, 14) and not m.ape.any()  # zero-init: 2·heads·d channels
    assert m.v_norm.num_features == 16  # one BN over d, shared by all heads
    assert m.kernel_params.const.item() == 1.0
    keys = list(m.state_dict())
    assert keys[:2] == ["ape", "kernel_params.const"] and "v_norm.running_var" in keys
    with pytest.raises(ValueError, match="ape_size"):
        LiteMLA(64, 64, head_dim=16, ape=True)
    with pytest.raises(ValueError, match="in_channels=60 must be a positive multiple of head_dim=16"):
        LiteMLA(60, 60, head_dim=16)
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        LiteMLA(64, 64, head_dim=16, kernel="nope")


def test_lite_mla_ape_is_used_and_resized():
    m = LiteMLA(16, 16, head_dim=8, kernel="qt", ape=True, ape_size=(4, 4)).eval()
    x = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        y0 = m(x)
        m.ape.normal_()
        y1 = m(x)
    assert not torch.allclose(y0, y1)  # the APE reaches the keys
    ramp = torch.arange(4.0).reshape(1, 1, 4, 1).expand(1, 3, 4, 4)  # varies along H only
    r = resize_ape(ramp, (4, 6))
    assert r.shape == (1, 3, 4, 6) and resize_ape(ramp, (4, 4)) is ramp
    # same H: rows are kept exactly; constant along W: stays constant when W is resized
    torch.testing.assert_close(r, ramp[..., :1].expand(1, 3, 4, 6))


def test_lite_mla_loads_ape_of_another_grid():
    src = LiteMLA(16, 16, head_dim=8, kernel="qt", ape=True, ape_size=(8, 8))
    with torch.no_grad():
        src.ape.normal_()
    dst = LiteMLA(16, 16, head_dim=8, kernel="qt", ape=True, ape_size=(4, 4))
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst.ape, resize_ape(src.ape.detach(), (4, 4)))


@pytest.mark.parametrize("kernel", qtvit.list_kernels())
def test_lite_mla_every_kernel_and_set_kernel(kernel):
    m = LiteMLA(32, 32, head_dim=8, kernel="qt", ape=True, ape_size=(4, 4), shortcut=True)
    x = torch.randn(2, 32, 4, 5)
    proj = m.proj.conv.weight
    m.set_kernel(kernel)
    assert m.kernel == kernel and m.proj.conv.weight is proj  # weights kept
    y = m(x)
    assert y.shape == (2, 32, 4, 5) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    built = LiteMLA(32, 32, head_dim=8, kernel=kernel)
    assert built.kernel == kernel
    with pytest.raises(ValueError, match="unknown attention kernel"):
        m.set_kernel("not_a_kernel")
    assert m.kernel == kernel  # a failed switch changes nothing


def test_lite_mla_set_kernel_params():
    m = LiteMLA(32, 32, head_dim=8).double()
    m.set_kernel("qt", const=0.5)
    assert m.kernel_params.const.dtype == torch.float64 and m.kernel_params.const.item() == 0.5
    m.set_kernel("taylor2_pool", pool=4)
    assert m.kernel_params.as_kwargs() == {**qtvit.get_kernel("taylor2_pool").params, "pool": 4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lite_mla_autocast_runs_kernel_in_fp32(dtype):
    m = randomize_(LiteMLA(32, 32, head_dim=8, kernel="qt", ape=True, ape_size=(4, 4), shortcut=True)).eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        want = m(x)
        with torch.autocast("cpu", dtype=dtype):
            got = m(x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - want).norm() / want.norm() < 0.05


def test_efficientvit_block_and_head():
    blk = EfficientViTBlock(32, head_dim=8, expand_ratio=4, kernel="qt", ape=True, ape_size=(4, 4),
                            shortcut=True, drop_path=0.1)
    x = torch.randn(2, 32, 4, 4)
    assert blk(x).shape == x.shape
    assert blk.local_module.main.inverted_conv.conv.bias is not None  # the FFN is fewer-norm
    assert blk.context_module.drop_path.drop_prob == 0.1 == blk.local_module.drop_path.drop_prob
    head = ClsHead(32, (48, 64), num_classes=7, dropout=0.1)
    assert head(x).shape == (2, 7) and head(x, pre_logits=True).shape == (2, 64)
    head.reset(0)
    assert head.eval()(x).shape == (2, 64)
    head.reset(3, reset_other=True)
    assert head(x).shape == (2, 3) and head.num_features == 32
    with pytest.raises(ValueError, match="two widths"):
        ClsHead(32, (48,))
