"""qtvit.deploy.fuse: BN folding and the inference attention give the unfused model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from deploy_helpers import classification_models, perturb

import qtvit
from qtvit.deploy import FusedLiteMLA, FusedModelError, fold_bn, fuse
from qtvit.layers import LiteMLA

EVIT = [n for n in classification_models() if not n.startswith("qtvit_vit")]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_every_efficientvit_size_is_covered():
    assert {n.removeprefix("qtvit_") for n in EVIT} >= {"b0", "b1", "b2", "b3", "l1", "l2", "l3"}


@pytest.mark.parametrize("name", classification_models())
def test_fused_logits_equal_unfused(name):
    torch.manual_seed(0)
    model = perturb(qtvit.create_model(name, num_classes=10))
    size = 64 if name.startswith("qtvit_vit") else 96
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        fused = fuse(model)
        out = fused(x)
    assert _rel_err(out, ref) <= 1e-5
    assert not any(isinstance(m, (nn.BatchNorm2d, LiteMLA)) for m in fused.modules())
    # the original is untouched (fuse works on a copy by default)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (name in EVIT)


@pytest.mark.parametrize("kernel,ape,shortcut", [("relu", False, False), ("qt", True, False),
                                                  ("cosine", True, True)])
def test_fused_variants(kernel, ape, shortcut):
    """The ReLU twin, QT without the shortcut, and a kernel fused attention hands to qtvit.attention."""
    model = perturb(qtvit.create_model("qtvit_b0", num_classes=5, kernel=kernel, ape=ape, shortcut=shortcut))
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        assert _rel_err(fuse(model)(x), model(x)) <= 1e-5


def test_ape_cache_and_other_sizes():
    model = perturb(qtvit.create_model("qtvit_b0", num_classes=5))
    fused = fuse(model, ape_size=96)
    caches = [m.ape_cache_size for m in fused.modules() if isinstance(m, FusedLiteMLA)]
    assert caches and all(c is not None for c in caches)
    assert caches[0] == (6, 6) and caches[-1] == (3, 3)  # strides 16 and 32 at 96 px
    with torch.no_grad():
        for size in (96, 128):  # the cached size and one that still resizes
            x = torch.randn(1, 3, size, size)
            assert _rel_err(fused(x), model(x)) <= 1e-5


def test_ape_at_its_own_grid_is_used_as_stored():
    """At the APE's own token grid the bicubic resize is the identity, so the fused model skips it
    (bitwise the same values) and a compiled graph holds no interpolation (inductor would redo it
    for every image of the batch); another size still resizes."""
    fused = fuse(perturb(qtvit.create_model("qtvit_b0", num_classes=5)))
    mla = next(m for m in fused.modules() if isinstance(m, FusedLiteMLA))
    gh, gw = mla.ape.shape[-2:]
    used = mla._ape_tokens(gh, gw)
    assert used.data_ptr() == mla.ape.data_ptr()
    assert torch.equal(used, mla._ape_tokens_resized(gh, gw))
    assert not torch.equal(mla._ape_tokens(gh + 1, gw)[..., :gh * gw], used)  # resized: other values

    def interpolations(h, w):
        x = torch.randn(1, mla.qkv.in_channels, h, w)
        with torch.no_grad():
            explain = torch._dynamo.explain(mla)(x)
        return sum("interpolate" in str(n.target) for g in explain.graphs for n in g.graph.nodes)

    assert interpolations(gh, gw) == 0
    assert interpolations(gh + 2, gw) == 1


def test_fold_bn_matches_eval_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    bn = perturb(nn.Sequential(conv, nn.BatchNorm2d(6)))[1]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-6)


def test_fused_model_refuses_training():
    fused = fuse(qtvit.create_model("qtvit_b0", num_classes=3))
    with pytest.raises(FusedModelError, match="fused for inference"):
        fused.train()
    fused.eval()  # still allowed
    assert not fused.training
    assert not any(p.requires_grad for p in fused.parameters())
    assert fuse(fused) is fused  # fusing twice is a no-op


def test_fused_fp16_attention_stays_float32():
    model = perturb(qtvit.create_model("qtvit_b0", num_classes=5))
    half = fuse(model).half()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    for m in half.modules():
        if isinstance(m, FusedLiteMLA):
            m.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad():
        ref = model(x)
        try:
            out = half(x.half()).float()
        except RuntimeError as err:  # CPU builds without half convolutions
            pytest.skip(f"no float16 convolution on this build: {err}")
    assert torch.isfinite(out).all()
    assert seen and all(d == torch.float16 for d in seen)  # cast back only for the projection
    rmse = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rmse <= 1e-2
