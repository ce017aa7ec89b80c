"""timm's model contract for every qtvit classification model registered with timm.

The same checks timm's own model tests make (default cfgs, forward/backward, classifier resets
incl. unpooled output, forward_features/forward_head(pre_logits), features_only, forward_intermediates
+ prune_intermediate_layers, TorchScript, FX tracing for feature extraction), on small inputs. The
small representatives of each family run by default; the larger sizes (same code, more blocks) run
under ``make test-slow``.
"""

from __future__ import annotations

import pytest
import torch
from deploy_helpers import classification_models

timm = pytest.importorskip("timm", reason="the timm contract needs timm")

import qtvit  # noqa: E402,F401  (registers the models with timm)

FAST = {"qtvit_b0", "qtvit_b1", "qtvit_l1", "qtvit_vit_micro", "qtvit_vit_tiny"}
MODELS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in classification_models()]


def _size(model) -> int:
    return 64 if model.pretrained_cfg["input_size"][-1] <= 64 else 96


def _is_vit(name: str) -> bool:
    return name.startswith("qtvit_vit")


def _spatial(model, size: int) -> tuple[int, int]:
    r = model.feature_info[-1]["reduction"]
    return -(-size // r), -(-size // r)


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_forward_and_heads(name):
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert set(cfg) >= {"input_size", "interpolation", "mean", "std", "crop_pct", "num_classes"}
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    size = _size(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats), logits)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert pre.shape == (2, model.head_hidden_size)
    channel_dim = -1 if _is_vit(name) else 1
    assert feats.shape[channel_dim] == model.num_features

    model.reset_classifier(0)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(out, pre)

    model.reset_classifier(0, global_pool="")  # unpooled features
    with torch.no_grad():
        out = model(x)
    if _is_vit(name):
        assert out.shape == feats.shape  # (B, tokens, C)
    else:
        assert out.dim() == 4 and tuple(out.shape[-2:]) == _spatial(model, size)

    unpooled = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert unpooled(x).dim() == (3 if _is_vit(name) else 4)

    model.reset_classifier(7, global_pool="avg")
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, pretrained=False, num_classes=5).train()
    size = _size(model)
    model(torch.randn(2, 3, size, size)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS)
def test_features_intermediates_and_prune(name):
    size = _size(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, size, size)
    feat = timm.create_model(name, pretrained=False, features_only=True).eval()
    channels = feat.feature_info.channels()
    with torch.no_grad():
        outs = feat(x)
    assert len(outs) == len(channels) >= 4
    for c, r, o in zip(channels, feat.feature_info.reduction(), outs, strict=True):
        assert o.shape[:2] == (1, c) and tuple(o.shape[-2:]) == (-(-size // r), -(-size // r))

    model = timm.create_model(name, pretrained=False).eval()
    n = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(inter) == n and all(t.dim() == 4 for t in inter)
    for a, b in zip(only, inter[-2:], strict=True):
        torch.testing.assert_close(a, b)
    kept = model.prune_intermediate_layers(indices=[0, 1], prune_head=True)
    assert kept == [0, 1]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(pruned, inter[:2], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name, pretrained=False).eval()
    scripted = torch.jit.script(model)
    size = _size(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extraction(name):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    size = _size(model)
    x = torch.randn(1, 3, size, size)
    _, eval_nodes = get_graph_node_names(model)
    last = eval_nodes[-1]
    extractor = create_feature_extractor(model, return_nodes=[last])
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)[last], model(x))
    # torchvision's own extractor, given timm's leaf modules and functions
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models import feature_extraction as tv

    tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    _, tv_nodes = tv.get_graph_node_names(model, tracer_kwargs=tracer)
    tv_extractor = tv.create_feature_extractor(model, return_nodes=[tv_nodes[-1]], tracer_kwargs=tracer)
    with torch.no_grad():
        torch.testing.assert_close(tv_extractor(x)[tv_nodes[-1]], model(x))
    # FX backward through the traced graph
    model.train()
    traced = create_feature_extractor(model, return_nodes=[last])
    traced(x)[last].mean().backward()
    assert all(p.grad is not None for p in model.parameters())
