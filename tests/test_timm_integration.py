"""qtvit models as timm models: registration, names, features_only, pretrained configs and files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qtvit
from qtvit.errors import QtvitError
from qtvit.models.checkpoint import native_to_official
from qtvit.models.timm_integration import _HOOK, enable_timm_integration, register_with_timm

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]
MODULE = "timm_integration"  # timm files our entrypoints under this module name


def test_every_qtvit_classifier_is_registered_without_collisions():
    ours = set(qtvit.list_models(include_aliases=True, task="classification"))
    assert {"qtvit_1", "qtvit_6", "qtvit_b0", "qtvit_l3", "qtvit_vit_tiny"} <= ours
    assert set(timm.list_models(module=MODULE)) == ours
    # segmentation and detection models are qtvit-only (timm's contract is a classifier's)
    dense = set(qtvit.list_models(task="segmentation")) | set(qtvit.list_models(task="detection"))
    assert {"qtvit_1_upernet_ade20k", "qtvit_1_cascade_mask_rcnn_coco"} <= dense
    assert not dense & set(timm.list_models())
    timm_own = {n for m in timm.list_modules() if m != MODULE for n in timm.list_models(module=m)}
    assert not ours & timm_own
    assert register_with_timm() == []  # idempotent
    with pytest.raises(QtvitError, match="timm already has a model of that name"):
        register_with_timm(["resnet18"])


def test_import_is_lazy_and_either_order_registers():
    # qtvit first: timm is not imported, and the import hook registers once it is
    code = ("import sys, qtvit; assert 'timm' not in sys.modules, 'qtvit imported timm'; "
            "import importlib.util; assert importlib.util.find_spec('timm'); "  # a look-up alone is harmless
            "import timm; assert timm.is_model('qtvit_1') and timm.is_model('qtvit_vit_tiny')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    # timm already imported (this process): registration is immediate, no hook left behind
    enable_timm_integration()
    assert _HOOK not in sys.meta_path and timm.is_model("qtvit_b3")


def test_create_model_through_timm():
    m = timm.create_model("qtvit_1", pretrained=False, num_classes=10).eval()
    assert type(m).__name__ == "EfficientViT" and m.num_classes == 10
    assert sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for p in qtvit.create_model("qtvit_b1", num_classes=10).parameters())
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    cfg = timm.data.resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.95  # B1's eval crop (docs/DESIGN.md §recipe); 1.0 for the others
    assert timm.data.resolve_data_config({}, model=timm.create_model("qtvit_b0"))["crop_pct"] == 1.0
    plain = timm.create_model("qtvit_b0", kernel="relu", ape=False, shortcut=False)
    assert not any(".ape" in k for k in plain.state_dict())


def test_features_only():
    x = torch.randn(2, 3, 96, 128)
    f = timm.create_model("qtvit_b0", features_only=True).eval()
    assert f.feature_info.reduction() == [4, 8, 16, 32]
    assert f.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        feats = f(x)
    assert [tuple(t.shape) for t in feats] == [(2, c, 96 // s, 128 // s) for c, s in
                                               zip([16, 32, 64, 128], [4, 8, 16, 32], strict=True)]
    f2 = timm.create_model("qtvit_b0", features_only=True, out_indices=(1, 3)).eval()
    f2.load_state_dict(f.state_dict())
    with torch.no_grad():
        feats2 = f2(x)
    assert f2.feature_info.reduction() == [8, 32]
    for a, b in zip(feats2, (feats[1], feats[3]), strict=True):
        torch.testing.assert_close(a, b)


def test_pretrained_from_a_local_file_in_official_layout(tmp_path):
    src = qtvit.create_model("qtvit_b0")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    torch.save({"state_dict": native_to_official(src.state_dict())}, tmp_path / "b0.pt")
    overlay = dict(file=str(tmp_path / "b0.pt"))
    m = timm.create_model("qtvit_b0", pretrained=True, pretrained_cfg_overlay=overlay)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
