"""`qtvit demo` with its default recipe (configs/demo.yaml) at a reduced budget; `qtvit eval` on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qtvit
from qtvit.cli import main
from qtvit.train.cli import _demo_run_dir
from qtvit.train.config import load_config

# The default demo, only smaller: same model, data rule, resolution and recipe.
REDUCED = ["data.demo_train_size=128", "data.demo_val_size=32", "train.bn_images=32", "train.batch_size=32",
           "run.progress=false"]


def test_demo_default_recipe_at_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "2", *REDUCED]) == 0
    printed = capsys.readouterr().out
    for name in ("best.pt", "last.pt", "metrics.json", "curves.png"):
        assert str(out / name) in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["accuracy"] == summary["top1"] / 100
    assert summary["chance"] == 1 / 4 and summary["epochs"] == 2 and summary["wall_seconds"] > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # The checkpoint is an ordinary qtvit checkpoint: the registry loads its EMA weights directly.
    cfg = load_config("demo")
    model = qtvit.create_model(cfg.model.name, checkpoint=str(out / "last.pt"), num_classes=4,
                               **cfg.model.kwargs)
    from qtvit.layers import KernelParams

    kernels = [m.kernel for m in model.modules() if isinstance(m, KernelParams)]
    assert len(kernels) >= 2 and set(kernels) == {"qt"}  # QT attention in stages 3 and 4

    # `qtvit eval` on the EMA weights reproduces the demo's final held-out accuracy.
    result = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--ema", "--dataset", "demo", "--workers", "0",
                 "--output", str(result)]) == 0
    evaluated = json.loads(result.read_text())
    assert evaluated["images"] == 32 and evaluated["top1"] == summary["top1"]
    assert evaluated["image_size"] == cfg.data.demo_image_size and evaluated["model"] == cfg.model.name


def test_demo_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "d" / split / c / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["demo", "--data", str(tmp_path / "d"), "--output", str(out), "--epochs", "1",
                 "train.batch_size=8", "train.bn_images=8", "run.progress=false"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["classes"] == 2 and summary["images"] == 4 and summary["dataset"] == str(tmp_path / "d")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["classes"] == ["blue", "red"]


def test_default_demo_folder_is_never_an_existing_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(_demo_run_dir(None, False, False)) == "demo_output/run-1"
    (tmp_path / "demo_output" / "run-1").mkdir(parents=True)
    assert str(_demo_run_dir(None, False, False)) == "demo_output/run-1"  # empty: fine to use
    (tmp_path / "demo_output" / "run-1" / "last.pt").write_bytes(b"")
    (tmp_path / "demo_output" / "run-2").mkdir()
    (tmp_path / "demo_output" / "run-2" / "x").write_bytes(b"")
    assert str(_demo_run_dir(None, False, False)) == "demo_output/run-3"
    assert str(_demo_run_dir("mine", False, False)) == "mine"  # explicit: the trainer refuses a used one
    with pytest.raises(ValueError, match="need --output"):
        _demo_run_dir(None, False, True)
