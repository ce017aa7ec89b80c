"""Segmentation models: Table 6 param parity, model cards, shapes, auxiliary head, backbone checkpoints."""

import pytest
import torch

import qtvit
from qtvit.models.macs import count_macs
from qtvit.models.segmentation import (
    SEGHEAD_CONFIGS,
    TWIN_PARAMS,
    EfficientViTSeg,
    UperNetSeg,
    segmentation_models,
)

pytest.importorskip("segmentation_models_pytorch")

TWIN = dict(kernel="relu", ape=False, shortcut=False)
# QT-ViT paper, Table 6 (ADE20K, UperNet): params in M, QT-ViT-k and its EfficientViT twin.
TABLE6 = {1: (32.76, 32.50), 2: (44.28, 43.75), 3: (69.73, 68.68)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return qtvit.create_model(name, **kwargs)


@pytest.mark.parametrize("k", sorted(TABLE6))
def test_upernet_params_equal_the_papers_table6(k):
    qt, twin = TABLE6[k]
    name = f"qtvit_{k}_upernet_ade20k"
    # the paper prints M to two decimals (B1's twin, 32.505 M, is printed 32.50): within one unit
    assert abs(n_params(meta(name)) / 1e6 - qt) < 0.01
    assert abs(n_params(meta(name, **TWIN)) / 1e6 - twin) < 0.01
    assert n_params(meta(name, **TWIN)) == TWIN_PARAMS[name]


def test_seghead_b1_ade20k_twin_is_efficientvits_4_79m():
    model = meta("qtvit_1_seghead_ade20k", **TWIN)
    assert round(n_params(model) / 1e6, 2) == 4.79
    assert round(n_params(model.backbone) / 1e6, 3) == 4.644  # backbone alone (features_only count)


def test_registry_lists_every_segmentation_model():
    assert len(segmentation_models()) == 6 + len(SEGHEAD_CONFIGS) + 1  # UperNet 1..6, SegHeads, the demo


# Derived from the registry; the large ones (slow to build even on the meta device) run with -m slow.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if qtvit.get_model_card(n).params > 45e6 else n
    for n in segmentation_models()])
def test_registered_segmentation_model_matches_its_card(name):
    card = qtvit.get_model_card(name)
    model = meta(name)  # shapes only
    assert model.num_classes == card.pretrained_cfg["num_classes"]
    assert n_params(model) == card.params
    assert count_macs(model, (1, 3, 224, 224)) == card.macs_224  # exact, as the registry's cards


def test_seghead_widths_follow_the_backbone_and_dataset():
    m = meta("qtvit_4_seghead_ade20k")
    assert m.head.in_channels == (128, 256, 512)
    assert m.head.classifier.in_channels == 128 * 8  # L ADE20K: final expansion 8
    assert meta("qtvit_4_seghead_cityscapes").head.classifier.in_channels == 256  # no expansion
    assert qtvit.create_model("qtvit_b0_seghead_cityscapes").num_classes == 19
    assert qtvit.create_model("qtvit_b0_seghead_cityscapes", num_classes=5).num_classes == 5


def test_forward_shapes_non_square_and_output_stride():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    seg = qtvit.create_model("qtvit_seg_demo", num_classes=3, img_size=(64, 96)).eval()
    assert isinstance(seg, EfficientViTSeg)
    assert seg(x).shape == (2, 3, 64 // 8, 96 // 8)
    up = qtvit.create_model("qtvit_1_upernet_ade20k", num_classes=7, aux_head=True, channels=32)
    assert isinstance(up, UperNetSeg)
    main, aux = up(x)  # training mode: main + auxiliary logits
    assert main.shape == (2, 7, 16, 24) and aux.shape == (2, 7, 4, 6)
    assert up.eval()(x).shape == (2, 7, 16, 24)


def test_input_not_a_multiple_of_32_names_the_fix():
    seg = qtvit.create_model("qtvit_seg_demo").eval()
    with pytest.raises(ValueError, match="not a multiple of 32.*pad_to_multiple"):
        seg(torch.randn(1, 3, 64, 100))


def test_twin_has_relu_attention_and_no_qt_extras():
    m = meta("qtvit_1_seghead_ade20k", **TWIN)
    kernels = {mod.kernel for mod in m.modules() if hasattr(mod, "kernel") and isinstance(mod.kernel, str)}
    assert kernels == {"relu"}
    assert not any(k.endswith(".ape") or ".v_norm." in k for k in m.state_dict())


@pytest.mark.parametrize("name", ["qtvit_1_seghead_ade20k", "qtvit_1_upernet_ade20k"])
def test_backbone_checkpoint_from_a_classifier(tmp_path, name):
    torch.manual_seed(0)
    cls = qtvit.create_model("qtvit_1", num_classes=10)
    with torch.no_grad():
        for p in cls.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "cls.pt"
    torch.save({"state_dict": cls.state_dict()}, path)
    seg = qtvit.create_model(name, backbone_checkpoint=str(path), channels=32) if "upernet" in name else \
        qtvit.create_model(name, backbone_checkpoint=str(path))
    source = {k: v for k, v in cls.state_dict().items() if not k.startswith("head.")}
    target = seg.backbone.state_dict() if "seghead" in name else seg.net.encoder.model.state_dict()
    assert len(source) == len(target)
    for (_, a), (_, b) in zip(source.items(), target.items(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow  # the mismatch message names the closest registered model: builds them all
def test_backbone_checkpoint_of_another_model_fails_in_one_line(tmp_path):
    path = tmp_path / "b0.pt"
    torch.save(qtvit.create_model("qtvit_b0").state_dict(), path)
    with pytest.raises(Exception, match="missing|mismatch|shape") as info:
        qtvit.create_model("qtvit_1_seghead_ade20k", backbone_checkpoint=str(path))
    assert isinstance(info.value, (ValueError, qtvit.errors.QtvitError, RuntimeError))


def test_sync_bn_option_converts_every_batchnorm():
    m = qtvit.create_model("qtvit_b0_seghead_cityscapes", sync_bn=True)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(mod, torch.nn.SyncBatchNorm) for mod in norms)


def test_import_qtvit_stays_light():
    import subprocess
    import sys

    code = ("import sys, qtvit; qtvit.create_model('qtvit_seg_demo'); "
            "print(any(m in sys.modules for m in ('timm', 'segmentation_models_pytorch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
