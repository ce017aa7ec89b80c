"""Hub layout: save_pretrained → timm.create_model("local-dir:…") and qtvit.create_model(DIR)."""

from __future__ import annotations

import json

import pytest
import torch
from deploy_helpers import perturb

import qtvit
from qtvit.errors import QtvitError
from qtvit.models.hub import load_pretrained, save_pretrained

timm = pytest.importorskip("timm", reason="the hub round trip through timm needs timm")

CLASSES = ["cat", "dog", "eel"]


@pytest.mark.parametrize("name,kwargs,size", [
    ("qtvit_b0", {}, 64),
    ("qtvit_b0", {"kernel": "relu", "ape": False, "shortcut": False, "img_size": 160}, 96),
    ("qtvit_vit_micro", {"global_pool": "avg"}, 64),
])
def test_round_trip_through_timm_and_qtvit(tmp_path, name, kwargs, size):
    model = perturb(qtvit.create_model(name, num_classes=len(CLASSES), **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not the initial weights
    out_dir = save_pretrained(model, tmp_path / "model", class_names=CLASSES)
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == len(CLASSES)
    assert config["label_names"] == CLASSES
    assert config["model_args"]["kernel"] == kwargs.get("kernel", "qt")
    assert config["pretrained_cfg"]["input_size"] == list(model.pretrained_cfg["input_size"])

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        via_timm = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
        via_qtvit = qtvit.create_model(str(out_dir))
        torch.testing.assert_close(via_timm(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(via_qtvit(x), ref, rtol=0, atol=0)
    assert via_timm.pretrained_cfg["label_names"] == CLASSES
    assert via_qtvit.pretrained_cfg["label_names"] == CLASSES
    data_cfg = timm.data.resolve_data_config({}, model=via_timm)
    assert tuple(data_cfg["input_size"]) == tuple(model.pretrained_cfg["input_size"])


def test_save_pretrained_refuses_overwrite_and_fused(tmp_path):
    from qtvit.deploy import fuse

    model = qtvit.create_model("qtvit_b0", num_classes=3)
    target = tmp_path / "m"
    save_pretrained(model, target)
    with pytest.raises(QtvitError, match="not empty"):
        save_pretrained(model, target)
    save_pretrained(model, target, overwrite=True)
    with pytest.raises(QtvitError, match="unfused"):
        save_pretrained(fuse(model), tmp_path / "f")
    with pytest.raises(QtvitError, match="3 classes"):
        save_pretrained(model, tmp_path / "c", class_names=["a"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_cli_export_hub_takes_ema_weights_and_class_names(tmp_path, capsys):
    from qtvit.cli import main

    model = perturb(qtvit.create_model("qtvit_b0", num_classes=len(CLASSES), img_size=64))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    ckpt = tmp_path / "last.pt"
    config = {"model": {"name": "qtvit_b0", "kwargs": {"img_size": 64}}}
    torch.save({"qtvit_train_checkpoint": 1, "model_name": "qtvit_b0", "model": raw, "ema": ema,
                "classes": CLASSES, "config": config}, ckpt)
    out = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hub", "--output", str(out)]) == 0
    loaded = qtvit.create_model(str(out))
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)  # the EMA weights, not the raw ones
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hub", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--no-ema", "--format", "hub", "--output",
                 str(out), "--overwrite"]) == 0
    with torch.no_grad():
        assert not torch.equal(qtvit.create_model(str(out))(x), model(x))
