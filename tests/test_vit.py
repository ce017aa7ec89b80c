"""The plain-ViT family: registry/cards, forward/backward, timm weight parity, kernels, resizing, AMP.

Independent references: timm's VisionTransformer (same weights → same logits, also at another input
size through timm's own position-embedding resampling), a closed-form parameter count, and
``torch.utils.flop_counter`` for MACs.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import qtvit
from qtvit.layers import KernelAttention
from qtvit.models import create_model, get_model_card, list_models
from qtvit.models.vit import VisionTransformer, resize_pos_embed, vit_macs

VIT_MODELS = list_models("qtvit_vit_*")
EXPECTED = {  # name: (embed_dim, depth, heads); DeiT widths, micro ours
    "qtvit_vit_micro": (96, 4, 3),
    "qtvit_vit_tiny": (192, 12, 3),
    "qtvit_vit_small": (384, 12, 6),
    "qtvit_vit_base": (768, 12, 12),
}


def randomize_(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Fill every tensor with non-trivial values (init leaves biases 0 and norms 1, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if t.dim() <= 1:
                r = (1 + 0.1 * r) if name.endswith("weight") else 0.1 * r
            else:
                r = scale * r / math.sqrt(math.prod(t.shape[1:]))
            t.copy_(r.to(t.dtype))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def vit_params(C: int, depth: int, heads: int, patch: int, tokens: int, classes: int = 1000) -> int:
    """Closed-form parameter count of a class-token ViT with one learnable qt ``const`` per block."""
    patch_embed = 3 * patch * patch * C + C
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 1
    return patch_embed + C + tokens * C + depth * block + 2 * C + C * classes + classes


# ------------------------------------------------------------------------------ registry and cards


def test_family_is_registered():
    assert set(EXPECTED) <= set(VIT_MODELS)
    with pytest.raises(ValueError, match="already registered"):
        qtvit.models.register_model("qtvit_vit_tiny")(lambda **kw: None)


@pytest.mark.parametrize("name", VIT_MODELS)
def test_params_match_card_and_closed_form(name):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == get_model_card(name).params
    C, depth, heads = EXPECTED[name]
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (C, depth, heads)
    tokens = 1 + model.grid_size[0] * model.grid_size[1]
    assert n == vit_params(C, depth, heads, model.patch_size, tokens)


@pytest.mark.parametrize("name", VIT_MODELS)
def test_macs_match_card_and_flop_counter(name):
    for kernel in ("qt", "softmax"):
        with torch.device("meta"):
            model = create_model(name, kernel=kernel, img_size=224).eval()
            x = torch.randn(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        counted = counter.get_total_flops() // 2  # FLOPs = 2·MACs
        C, depth, heads = EXPECTED[name]
        assert vit_macs(C, depth, heads, 224, model.patch_size, kernel=kernel) == counted, kernel
        if kernel == "qt":
            assert get_model_card(name).macs_224 == counted


def test_pretrained_cfg_follows_img_size():
    cfg = get_model_card("qtvit_vit_tiny").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    model = create_model("qtvit_vit_micro", img_size=(32, 48), patch_size=8, num_classes=7)
    assert model.pretrained_cfg["input_size"] == (3, 32, 48)
    assert model.pretrained_cfg["num_classes"] == 7


def test_efficientvit_pretrained_cfg_follows_img_size():
    model = create_model("qtvit_1", img_size=(256, 288), num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 256, 288)
    assert model.pretrained_cfg["num_classes"] == 10
    assert create_model("qtvit_1").pretrained_cfg["input_size"] == (3, 224, 224)


def test_architecture_arguments_override_the_named_size():
    model = create_model("qtvit_vit_micro", embed_dim=48, depth=2, num_heads=2, num_classes=3)
    assert model.embed_dim == 48 and len(model.blocks) == 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# ------------------------------------------------------------------------------ forward / backward


@pytest.mark.parametrize("name", VIT_MODELS)
def test_forward_backward_gives_every_parameter_a_gradient(name):
    patch = 16 if name == "qtvit_vit_base" else 8  # base: shape/params only, at 2×2 patches
    model = create_model(name, num_classes=10, img_size=32, patch_size=patch)
    assert isinstance(model, VisionTransformer)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("kernel", qtvit.list_kernels())
def test_every_kernel_runs_in_micro(kernel):
    model = create_model("qtvit_vit_micro", num_classes=5, kernel=kernel, img_size=32)
    assert model.kernel == kernel and all(b.attn.kernel == kernel for b in model.blocks)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    learnable = qtvit.get_kernel(kernel).learnable
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    kparams = [n for n, _ in model.named_parameters() if ".kernel_params." in n]
    assert len(kparams) == len(learnable) * len(model.blocks)


@pytest.mark.parametrize("kernel", qtvit.list_kernels(linear_only=True))
def test_dense_and_linear_paths_agree_float64(kernel):
    # Same weights, both paths; qkv scaled up so the kernels see non-trivial q·k (not near-uniform).
    linear = create_model("qtvit_vit_micro", num_classes=5, kernel=kernel, img_size=40, impl="linear")
    randomize_(linear, scale=3.0)
    linear = linear.double().eval()
    dense = create_model("qtvit_vit_micro", num_classes=5, kernel=kernel, img_size=40, impl="dense").double()
    dense.load_state_dict(linear.state_dict())
    dense.eval()
    assert {m.impl for m in dense.modules() if isinstance(m, KernelAttention)} == {"dense"}
    assert {m.impl for m in linear.modules() if isinstance(m, KernelAttention)} == {"linear"}
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        a, b = linear(x), dense(x)
    assert rel_err(a, b) < 1e-10
    assert a.std() > 1e-3  # the logits are not degenerate


def test_set_kernel_switches_every_block_and_keeps_weights():
    model = create_model("qtvit_vit_micro", num_classes=5, img_size=32)
    w = model.blocks[0].attn.qkv.weight
    model.set_kernel("taylor2_pool", pool=4)
    assert all(b.attn.kernel == "taylor2_pool" for b in model.blocks)
    assert model.blocks[0].attn.qkv.weight is w
    # the given pool, every other fixed parameter at the kernel's default
    assert model.blocks[0].attn.kernel_params.fixed == {**qtvit.get_kernel("taylor2_pool").params, "pool": 4}


def test_kernel_params_reach_every_block():
    model = create_model("qtvit_vit_micro", kernel="qt", const=0.25, img_size=32)
    consts = [b.attn.kernel_params.const.item() for b in model.blocks]
    assert consts == [0.25] * len(model.blocks)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'.*valid kernels"):
        create_model("qtvit_vit_micro", kernel="nope")
    with pytest.raises(TypeError, match="unknown parameter.*bogus"):
        create_model("qtvit_vit_micro", kernel="qt", bogus=1)
    with pytest.raises(ValueError, match="unknown global_pool"):
        create_model("qtvit_vit_micro", global_pool="max")
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        create_model("qtvit_vit_micro", img_size=36)
    model = create_model("qtvit_vit_micro", img_size=32)
    with pytest.raises(ValueError, match="input size 36×32 is not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 36, 32))


def test_global_avg_pool_head_and_classifier_reset():
    model = create_model("qtvit_vit_micro", num_classes=4, img_size=32, global_pool="avg")
    assert model.cls_token is None and model.pos_embed.shape == (1, 16, 96)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 96)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(1))
    model.reset_classifier(0)
    assert model(x).shape == (2, 96)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)


def test_drop_path_is_linear_over_depth_and_train_only():
    model = create_model("qtvit_vit_micro", num_classes=4, img_size=32, drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


def test_grad_checkpointing_same_output_and_grads():
    model = create_model("qtvit_vit_micro", num_classes=4, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    g_ref = model.blocks[1].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight.grad, g_ref)


# ------------------------------------------------------------------------------ timm parity


def test_timm_vit_weights_give_timm_logits():
    timm = pytest.importorskip("timm")
    ref = randomize_(timm.create_model("vit_tiny_patch16_224")).eval()
    ours = create_model("qtvit_vit_tiny", kernel="softmax")
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert b.std() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_other_input_size_matches_timm_dynamic_resize():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True)
    randomize_(ref).eval()
    ours = create_model("qtvit_vit_tiny", kernel="softmax", img_size=64)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    for size in ((96, 128), (48, 48)):  # larger non-square, and smaller (antialiased) grids
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ position embedding


def test_resize_pos_embed_properties():
    pos = torch.randn(1, 1 + 4 * 6, 8)
    assert resize_pos_embed(pos, (4, 6), (4, 6)) is pos
    out = resize_pos_embed(pos, (4, 6), (8, 3))
    assert out.shape == (1, 1 + 24, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])  # class token row untouched
    const = torch.ones(1, 1 + 16, 8) * torch.arange(8.0)  # a grid constant per channel stays constant
    expected = torch.ones(1, 1 + 35, 8) * torch.arange(8.0)
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (7, 5)), expected)
    with pytest.raises(ValueError, match="not the grid 5×5"):
        resize_pos_embed(pos, (5, 5), (2, 2))


def test_checkpoint_at_other_resolution_loads_resized():
    small = randomize_(create_model("qtvit_vit_micro", num_classes=4, img_size=32)).eval()
    large = create_model("qtvit_vit_micro", num_classes=4, img_size=56)
    large.load_state_dict(small.state_dict())  # (1, 17, C) → (1, 50, C)
    large.eval()
    assert large.pos_embed.shape == (1, 1 + 49, 96)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():  # the loaded model equals the original run at 56 px (on-the-fly resize)
        torch.testing.assert_close(large(x), small(x), rtol=1e-6, atol=1e-6)
    wrong = {**small.state_dict(), "pos_embed": torch.zeros(1, 1 + 15, 96)}  # not a square grid
    with pytest.raises(RuntimeError, match="size mismatch for pos_embed"):
        large.load_state_dict(wrong)


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_autocast_is_finite_and_close_to_fp32(dtype, tol):
    model = randomize_(create_model("qtvit_vit_micro", num_classes=10, img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < tol


def test_imports_with_torch_alone():
    code = (
        "import sys; sys.modules['timm'] = None\n"  # any `import timm` now raises ImportError
        "import torch, qtvit\n"
        "from qtvit.models import create_model, swap_attention\n"
        "m = create_model('qtvit_vit_micro', img_size=32)\n"
        "m, n = swap_attention(m, 'relu', return_count=True)\n"
        "assert n == len(m.blocks) and m.kernel == 'relu'\n"
        "try:\n"
        "    swap_attention(torch.nn.Linear(2, 2))\n"
        "except ValueError as e:\n"
        "    assert 'timm is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
