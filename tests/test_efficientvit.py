"""EfficientViT / QT-ViT models: authors' logits, registry facts, timm layout, numerics, interfaces."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qtvit
from qtvit.layers import DropPath, LiteMLA, ResidualBlock
from qtvit.models.efficientvit import EfficientViT
from qtvit.models.macs import count_macs

FIXTURE = Path(__file__).parent / "fixtures" / "official_qtvit_b1.json"
EVIT = dict(kernel="relu", ape=False, shortcut=False)  # plain EfficientViT

# The paper's figures (docs/DESIGN.md §architecture), restated here as the independent reference:
# (params QT, params EfficientViT, GMACs@224 as the paper prints them; B0's is EfficientViT-B0's)
PAPER_COUNTS = {
    "qtvit_b0": (3_485_404, 3_410_008, 0.10),
    "qtvit_b1": (9_353_135, 9_102_024, 0.52),
    "qtvit_b2": (24_858_210, 24_330_712, 1.60),
    "qtvit_b3": (49_700_727, 48_646_056, 3.97),
    "qtvit_l1": (52_955_534, 52_654_088, 5.26),
    "qtvit_l2": (64_108_944, 63_707_016, 6.96),
    "qtvit_l3": (246_840_624, 246_037_288, 27.60),
}
PAPER = {"qtvit_1": ("qtvit_b1", 79.6, 94.7), "qtvit_2": ("qtvit_b2", 82.5, 95.9),
         "qtvit_3": ("qtvit_b3", 83.9, 96.7), "qtvit_4": ("qtvit_l1", 84.7, 96.7),
         "qtvit_5": ("qtvit_l2", 85.2, 97.0), "qtvit_6": ("qtvit_l3", 86.0, 97.3)}


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes only: counting L3 costs nothing
        return qtvit.create_model(name, **kwargs)


# Derived from the registry: every registered model of this family.
FAMILY = [n for n in qtvit.list_models() if isinstance(meta_model(n), EfficientViT)]
BIG = 100_000_000  # models above this many parameters run their full forward/backward only with -m slow


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights, BN statistics, APEs and kernel constants (defaults hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                r = 0.5 + r.abs()
            elif name.endswith(".ape"):
                r = 0.5 * r
            elif t.dim() <= 1:
                r = 1.0 + 0.2 * r if name.endswith(("weight", "const")) else 0.2 * r
            else:
                r = r / math.sqrt(math.prod(t.shape[1:]))
            t.copy_(r.to(t.dtype))
    return model


@pytest.fixture(scope="module")
def b0() -> EfficientViT:
    return randomize_(qtvit.create_model("qtvit_b0"), seed=1).eval()


# ------------------------------------------------- the authors' logits (docs/DESIGN.md §fixture)
def fixture_state(keys: list) -> dict[str, torch.Tensor]:
    """The official-layout state dict filled by the fixture's crc32 rule."""
    dtypes = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
    sd = {}
    for key, shape, dtype in keys:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if key.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.float64)
        elif key.endswith("running_var"):
            t = 1 + 0.1 * t.abs()
        elif key.endswith(("running_mean", "bias", "positional_encoding")):
            t = 0.1 * t
        elif len(shape) <= 1:
            t = 1 + 0.1 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        sd[key] = t.to(dtypes[dtype])
    return sd


def official_to_native_b(key: str) -> str:
    """Minimal official → native key map for B models (docs/DESIGN.md §checkpoints + the QT extras)."""
    key = key.replace("backbone.input_stem.op_list.0.", "stem.in_conv.")
    key = re.sub(r"^backbone\.input_stem\.op_list\.(\d+)\.", lambda m: f"stem.res{int(m[1]) - 1}.", key)
    key = re.sub(r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.", r"stages.\1.blocks.\2.", key)
    for old, new in (("head.op_list.0.", "head.in_conv."), ("head.op_list.2.linear.", "head.classifier.0."),
                     ("head.op_list.2.norm.", "head.classifier.1."),
                     ("head.op_list.3.linear.", "head.classifier.4."),
                     ("main.ones_scale1", "main.kernel_params.const"),
                     ("main.positional_encoding", "main.ape"), ("main.bn.", "main.v_norm.")):
        key = key.replace(old, new)
    return key


def check_fixture_outputs(model: nn.Module, outputs: dict) -> float:
    worst = 0.0
    for res, ref in outputs.items():
        r = int(res)
        x = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(1234 + r))
        with torch.no_grad():
            y = model(x).double()
        first8 = torch.tensor(ref["logits_first8"], dtype=torch.float64)
        scale = first8.abs().max()
        err = ((y[:, :8] - first8).abs().max() / scale).item()
        worst = max(worst, err)
        assert err < 1e-4, f"{r}px: first logits off by {err:.2e} relative"
        torch.testing.assert_close(y.sum(1), torch.tensor(ref["logits_sum"], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-4 * y.abs().sum().item() / 2)
        torch.testing.assert_close((y * y).sum(1), torch.tensor(ref["logits_sq_sum"], dtype=torch.float64),
                                   rtol=1e-4, atol=0)
        assert y.argmax(1).tolist() == ref["argmax"]
        assert y.std().item() == pytest.approx(ref["std"], rel=1e-4)
    return worst


def test_official_fixture_logits():
    """The authors' code's logits for the crc32-filled QT-ViT-1 at 224 and 160 px (APE resized)."""
    fx = json.loads(FIXTURE.read_text())
    assert fx["num_params"] == PAPER_COUNTS["qtvit_b1"][0]
    official = fixture_state(fx["keys"])
    native = {official_to_native_b(k): v for k, v in official.items()}
    model = qtvit.create_model("qtvit_b1").eval()
    # the native layout is the official one with renamed keys, tensor for tensor (in order, except
    # that a module's own ``ape`` precedes its child ``kernel_params.const``, the reverse of official)
    assert sorted(model.state_dict()) == sorted(native)
    model.load_state_dict(native, strict=True)
    assert set(fx["outputs"]) == {"224", "160"}
    check_fixture_outputs(model, fx["outputs"])


def test_official_fixture_through_the_converter():
    fx = json.loads(FIXTURE.read_text())
    model = qtvit.create_model("qtvit_1", checkpoint=fixture_state(fx["keys"])).eval()
    check_fixture_outputs(model, fx["outputs"])


# ------------------------------------------------------------------ registry facts
def test_family_and_aliases():
    assert FAMILY == list(PAPER_COUNTS)
    for alias, (name, top1, top5) in PAPER.items():
        assert qtvit.models.resolve_model_name(alias) == name
        card = qtvit.get_model_card(alias)
        assert (card.top1, card.top5, card.paper_name) == (top1, top5, f"QT-ViT-{alias[-1]}")
    assert qtvit.get_model_card("qtvit_b0").top1 is None


@pytest.mark.parametrize("name", FAMILY)
def test_params_exact(name):
    qt, evit, _ = PAPER_COUNTS[name]
    assert qtvit.get_model_card(name).params == qt
    assert n_params(meta_model(name)) == qt
    assert n_params(meta_model(name, **EVIT)) == evit
    # extras: per EfficientViT block, APE (2·C·(224/s)²) + const + v_norm (2·d)
    assert n_params(meta_model(name, kernel="qt", ape=False, shortcut=False)) == evit + sum(
        1 for n, _ in meta_model(name).named_parameters() if n.endswith("kernel_params.const"))


@pytest.mark.parametrize("name", FAMILY)
def test_macs_at_224(name):
    """The card's MACs are the exact count (one attention matmul more or less changes it; the
    attention is ~1.6% of B1's MACs), and within 1% of the figure the paper prints."""
    _, _, gmacs = PAPER_COUNTS[name]
    card = qtvit.get_model_card(name)
    assert isinstance(card.macs_224, int)
    assert count_macs(meta_model(name)) == card.macs_224
    assert card.paper_gmacs_224 == (gmacs if card.paper_name else None)
    assert abs(card.gmacs_224 - gmacs) / gmacs < 0.01, f"{name}: {card.gmacs_224:.3f} G vs {gmacs} G"


def test_count_macs_counts_attention_matmuls():
    """MACs of one relu LiteMLA = its convs + N·d·(2d+1) per head, recomputed by hand.

    Notes §6 count 2·N·d·(d+1) (k̂ᵀ[v, 1] and q̂·[kv, kz]); our layout sums Σψ(k) as a reduction
    instead of a matmul column, so the key side is N·d·d MACs and the query side N·d·(d+1)."""
    C, d, H, W = 64, 16, 7, 9
    m = LiteMLA(C, C, head_dim=d)
    m.impl = "linear"
    N, h2 = H * W, 2 * C // d
    convs = N * C * 3 * C + N * 3 * C * 25 + N * 3 * C * d + N * 2 * C * C  # qkv, dw 5×5, grouped 1×1, proj
    assert count_macs(m, (1, C, H, W)) == convs + h2 * N * d * (2 * d + 1)
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10)) == 2 * 8 * 100 * 27


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if PAPER_COUNTS[n][0] > BIG else n
                                  for n in FAMILY])
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = qtvit.create_model(name, num_classes=10, drop_path_rate=0.1).train()
    y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/non-finite gradient for {missing[:5]}"
    assert any(isinstance(m, DropPath) for m in model.modules())


# ------------------------------------------------------------------ timm layout and math
@pytest.mark.parametrize("size", ["b0", "b1", "b2", "b3", "l1", "l2", "l3"])
def test_state_dict_layout_is_timms(size):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        theirs = timm.create_model(f"efficientvit_{size}")
    ours = meta_model(f"qtvit_{size}", **EVIT)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()]
    assert len(ours.state_dict()) == EVIT_KEYS[size]  # the counts docs/DESIGN.md §checkpoints states
    qt_extra = set(meta_model(f"qtvit_{size}").state_dict()) - set(ours.state_dict())
    assert qt_extra and all(re.search(r"\.context_module\.main\.(ape|v_norm\.\w+|kernel_params\.const)$", k)
                            for k in qt_extra)


# EfficientViT state-dict entries per size, BatchNorm num_batches_tracked included
EVIT_KEYS = {"b0": 197, "b1": 272, "b2": 365, "b3": 514, "l1": 271, "l2": 353, "l3": 353}


def _timm_eps_1e15(model: nn.Module) -> nn.Module:
    from timm.models.efficientvit_mit import LiteMLA as TimmLiteMLA

    for m in model.modules():
        if isinstance(m, TimmLiteMLA):
            m.eps = 1e-15  # timm changed EfficientViT's ε to 1e-5; compare the same math
    return model


def test_relu_model_is_timms_efficientvit_b():
    timm = pytest.importorskip("timm")
    theirs = _timm_eps_1e15(randomize_(timm.create_model("efficientvit_b0"), seed=3).eval())
    ours = qtvit.create_model("qtvit_b0", **EVIT).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_relu_model_is_timms_efficientvit_l_layout():
    """A tiny L-style model against timm's EfficientVitLarge class with the same config."""
    pytest.importorskip("timm")
    from timm.models.efficientvit_mit import EfficientVitLarge

    cfg = dict(widths=(8, 16, 16, 32, 64), depths=(1, 1, 1, 2, 2), head_dim=16, head_widths=(48, 64))
    theirs = _timm_eps_1e15(randomize_(EfficientVitLarge(**cfg, num_classes=7), seed=4).eval())
    ours = EfficientViT(**cfg, style="l", act_layer="gelu_tanh", norm_eps=1e-7, num_classes=7, **EVIT).eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_dense_and_linear_attention_agree_float64():
    model = randomize_(qtvit.create_model("qtvit_b1"), seed=5).double().eval()
    x = torch.randn(2, 3, 128, 96, dtype=torch.float64)
    outs = {}
    with torch.no_grad():
        for impl in ("linear", "dense"):
            model.set_attention_impl(impl)
            outs[impl] = model(x)
    torch.testing.assert_close(outs["linear"], outs["dense"], rtol=1e-10, atol=1e-10)
    assert outs["linear"].std() > 0.1  # not a degenerate comparison


# ------------------------------------------------------------------ sizes and the APE
def test_non_square_and_ape_resize(b0):
    """At 96×160 the 224-grid APE is resized bicubically; a model whose APE grid *is* 96×160,
    loaded from the same weights (APE resized on load), gives the same logits."""
    x = torch.randn(2, 3, 96, 160)
    native = qtvit.create_model("qtvit_b0", img_size=(96, 160)).eval()
    native.load_state_dict(b0.state_dict())
    ape = native.stages[2].blocks[1].context_module.main.ape
    assert ape.shape[-2:] == (6, 10)
    with torch.no_grad():
        torch.testing.assert_close(native(x), b0(x), rtol=1e-5, atol=1e-5)
        ref = b0(x)
        saved = b0.stages[3].blocks[1].context_module.main.ape.clone()
        b0.stages[3].blocks[1].context_module.main.ape.zero_()
        changed = b0(x)
        b0.stages[3].blocks[1].context_module.main.ape.copy_(saved)
    assert not torch.allclose(ref, changed)  # the APE matters at this size


@pytest.mark.parametrize("size", [(224, 320), (512, 1024), (100, 70)])
def test_input_sizes(b0, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = b0(x)
        feats = b0.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]


def test_bad_inputs(b0):
    with pytest.raises(ValueError, match=r"unknown model 'qtvit_b9'.*qtvit_b1"):
        qtvit.create_model("qtvit_b9")
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\), got \(3, 64, 64\)"):
        b0(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        b0(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="input size 16×48 is too small.*at least 32×32"):
        b0(torch.randn(1, 3, 16, 48))
    # the smallest input follows the layout's total stride (here 8), not the default 32
    stride8 = EfficientViT(widths=(8, 16, 16, 16, 16), depths=(1, 1, 1, 1, 1), head_dim=8, num_classes=2,
                           strides=(2, 2, 2, 1, 1), img_size=16).eval()
    assert stride8(torch.randn(1, 3, 16, 48)).shape == (1, 2)
    with pytest.raises(ValueError, match="input size 4×48 is too small.*at least 8×8"):
        stride8(torch.randn(1, 3, 4, 48))
    with pytest.raises(ValueError, match="unknown style 'x'"):
        EfficientViT(style="x")
    with pytest.raises(ValueError, match="not a multiple of head_dim=24"):
        EfficientViT(head_dim=24)
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        qtvit.create_model("qtvit_b0", kernel="nope")


# ------------------------------------------------------------------ stochastic depth
def test_drop_path_rates_linear_over_blocks():
    model = qtvit.create_model("qtvit_b1", drop_path_rate=0.1)
    sites = [m for m in model.modules() if isinstance(m, ResidualBlock) and m.shortcut is not None]
    # B1: stem 1 DSConv + stage 1: 1 + stage 2: 2 MBConvs + (3 + 4) EfficientViT blocks × 2 residuals
    assert len(sites) == 1 + 1 + 2 + 2 * (3 + 4)
    rates = [m.drop_path.drop_prob for m in sites]
    assert rates == pytest.approx([0.1 * (i + 1) / 18 for i in range(18)])
    entry = model.stages[0].blocks[0]
    assert entry.shortcut is None and isinstance(entry.drop_path, nn.Identity)
    none = qtvit.create_model("qtvit_b1")
    assert not any(isinstance(m, DropPath) for m in none.modules())
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # stochastic in training
        model.eval()
        torch.testing.assert_close(model(x), model(x))


# ------------------------------------------------------------------ numerics and deployment
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_finite(b0, dtype):
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        want = b0(x)
        with torch.autocast("cpu", dtype=dtype):
            got = b0(x)
    assert torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()).item() < 0.05


def test_channels_last(b0):
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        want = b0(x)
        cl = copy.deepcopy(b0).to(memory_format=torch.channels_last)
        got = cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_jit_trace_and_export(b0):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = b0(x)
        with warnings.catch_warnings():
            # TracerWarnings: the trace is specialised to this input size, as intended
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(b0, x)
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(b0, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)


def test_compile_graph_captures_whole_model(b0):
    """Dynamo captures the model in one graph (no breaks); aot_eager keeps it fast on CPU."""
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(b0, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), b0(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor(b0):
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(b0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), b0(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ timm-style interface
def test_forward_intermediates_with_and_without_grad_checkpointing():
    base = randomize_(qtvit.create_model("qtvit_b0", drop_path_rate=0.2), seed=6).train()
    x = torch.randn(2, 3, 64, 96)
    results = []
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(ckpt)
        calls: list[int] = []
        model.stages[2].blocks[1].context_module.main.register_forward_hook(
            lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(7)  # same drop-path masks in both runs
        final, feats = model.forward_intermediates(x)
        (final.square().mean() + sum(f.mean() for f in feats)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("head.")}
        results.append((final, feats, grads))
        assert len(calls) == (2 if ckpt else 1)  # checkpointed blocks are recomputed in backward
    (f0, i0, g0), (f1, i1, g1) = results
    torch.testing.assert_close(f1, f0)
    for a, b in zip(i1, i0, strict=True):
        torch.testing.assert_close(a, b)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_forward_intermediates_options(b0):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = b0.forward_intermediates(x)
        torch.testing.assert_close(final, b0.forward_features(x))
        assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
        last2 = b0.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = b0.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        early, early_feats = b0.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(last2[0], feats[2])
    torch.testing.assert_close(picked[1], feats[3])
    torch.testing.assert_close(early, feats[1])
    assert len(early_feats) == 1
    with pytest.raises(ValueError, match="only 'NCHW'"):
        b0.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices"):
        b0.forward_intermediates(x, indices=[4])


def test_timm_interface():
    model = qtvit.create_model("qtvit_b0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (16, 4, "stages.0"), (32, 8, "stages.1"), (64, 16, "stages.2"), (128, 32, "stages.3")]
    assert model.num_features == 128 and model.head_hidden_size == 1280
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 1280)
        assert model.forward_head(feats).shape == (2, 10)
    assert model.get_classifier() is model.head.classifier[4]
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)
    nwd = model.no_weight_decay()
    assert "stages.2.blocks.1.context_module.main.ape" in nwd
    assert "stages.3.blocks.2.context_module.main.kernel_params.const" in nwd
    assert all(n.endswith(".ape") or "kernel_params" in n for n in nwd) and len(nwd) == 2 * 4
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["first_conv"] == "stem.in_conv.conv" and cfg["classifier"] == "head.classifier.4"
    assert model.default_cfg is cfg
    model.default_cfg = {"crop_pct": 0.5}  # timm's builder assigns the alias
    assert model.pretrained_cfg == {"crop_pct": 0.5}
    assert [qtvit.get_model_card(n).pretrained_cfg["crop_pct"] for n in FAMILY] == [
        0.95 if n == "qtvit_b1" else 1.0 for n in FAMILY]


def test_timm_feature_extraction_wrappers():
    pytest.importorskip("timm")
    from timm.layers import register_notrace_module
    from timm.models import build_model_with_cfg

    from qtvit.models.efficientvit import CONFIGS

    register_notrace_module(LiteMLA)  # fx extraction: LiteMLA's reshapes need concrete shapes (as timm's)
    x = torch.randn(2, 3, 64, 96)
    outs = []
    for feature_cls in ("list", "getter", "fx"):
        torch.manual_seed(0)
        feature_cfg = dict(flatten_sequential=True, feature_cls=feature_cls, out_indices=(0, 1, 2, 3))
        fm = build_model_with_cfg(EfficientViT, "qtvit_b0", False, pretrained_cfg=dict(num_classes=1000),
                                  features_only=True, feature_cfg=feature_cfg, **CONFIGS["b0"])
        assert fm.feature_info.reduction() == [4, 8, 16, 32]
        with torch.no_grad():
            outs.append(fm.eval()(x))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(a, b)


def test_models_cli(capsys):
    from qtvit.cli import main

    assert main(["models", "qtvit_b*"]) == 0
    out = capsys.readouterr().out
    assert "qtvit_b1" in out and "qtvit_1" in out and "QT-ViT-1" in out and "9,353,135" in out
    assert "79.6" in out and "0.519G" in out and "qtvit_l1" not in out
    assert main(["models", "qtvit_l3", "--recount"]) == 0
    assert "246,840,624" in capsys.readouterr().out.split("\n")[1].split("QT-ViT-6")[1]


def test_models_cli_into_a_closed_pipe():
    """``qtvit models | head -1`` ends quietly: exit status 0 and no BrokenPipeError traceback."""
    piped = subprocess.run(f"{shlex.quote(sys.executable)} -m qtvit models | head -1", shell=True,
                           capture_output=True, text=True, timeout=120)
    lines = piped.stdout.splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == "model"  # the table's header line
    assert piped.stderr == ""
    # A reader that has already gone makes the first write fail every time (a race with ``head``).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        gone = subprocess.run([sys.executable, "-m", "qtvit", "models"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (gone.returncode, gone.stderr) == (0, "")


# ------------------------------------------------------------------ the test harness itself
def test_conftest_fills_uninitialised_memory_with_nan():
    """tests/conftest.py: memory that code allocates and never writes reads as NaN in every test."""
    ref = torch.zeros(2, 3, dtype=torch.float64)
    for t in (torch.empty(2, 3), torch.empty((4,), dtype=torch.bfloat16), torch.empty_like(ref),
              ref.new_empty((5, 2)), ref.new_empty(3, dtype=torch.float16)):
        assert t.isnan().all(), (t.dtype, t.shape)
    assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integers are left as they come
    leaf = torch.empty(3, requires_grad=True)  # still a leaf that can train
    assert leaf.isnan().all() and leaf.requires_grad and leaf.grad_fn is None
    assert torch.empty(2, 2, device="meta").is_meta


def test_design_doc_sections_cited_in_the_code_exist():
    """Every "docs/DESIGN.md §<section>" cited in the package, tests, configs and docs is an anchor there."""
    root = Path(__file__).resolve().parents[1]
    design = (root / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', design))
    assert {"kernels", "qt", "architecture", "litemla", "recipe", "checkpoints", "fixture"} <= anchors
    cited = {}
    for folder, pattern in (("qtvit", "*.py"), ("qtvit", "*.md"), ("tests", "*.py"), ("configs", "*.yaml"),
                            ("docs", "*.md")):
        for path in (root / folder).rglob(pattern):
            for name in re.findall(r"DESIGN\.md §([\w-]+)", path.read_text(encoding="utf-8")):
                cited.setdefault(name, path.relative_to(root).as_posix())
    missing = {name: where for name, where in cited.items() if name not in anchors}
    assert not missing, f"sections cited but not in docs/DESIGN.md: {missing}"


def test_golden_fixture_says_where_it_came_from():
    readme = (FIXTURE.parent / "README.md").read_text(encoding="utf-8")
    assert FIXTURE.name in readme and "AMD-AIG-AIMA/AMD_QTViT" in readme and "commit" in readme
    assert "zlib.crc32(key.encode())" in readme and "manual_seed(1234 + r)" in readme  # fill and input rules
