"""qtvit predict: folders with a corrupt image, checkpoint class names, ONNX metadata, JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_helpers import perturb

import qtvit
from qtvit.cli import main
from qtvit.deploy.predict import OnnxClassifier, collect_images, predict

pytest.importorskip("timm", reason="predict resolves the eval transform with timm")
Image = pytest.importorskip("PIL.Image")

CLASSES = ["apple", "bear", "cloud", "dolphin"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for name, size in [("a.png", (40, 50)), ("b.jpg", (64, 64)), ("sub/c.png", (90, 70))]:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")  # ignored: not an image extension
    return root


@pytest.fixture(scope="module")
def small_model():
    model = perturb(qtvit.create_model("qtvit_b0", num_classes=len(CLASSES), img_size=64))
    model.pretrained_cfg["label_names"] = CLASSES
    return model


def test_collect_images(image_folder):
    found = [p.relative_to(image_folder).as_posix() for p in collect_images([image_folder])]
    assert found == ["a.png", "b.jpg", "broken.jpg", "sub/c.png"]
    with pytest.raises(FileNotFoundError, match="no such image"):
        collect_images([image_folder / "missing"])


def test_predict_skips_corrupt_images_and_matches_the_model(image_folder, small_model):
    lines = []
    result = predict([image_folder], small_model, topk=3, batch_size=2, progress=False, report=lines.append)
    assert [s[0].endswith("broken.jpg") for s in result.skipped] == [True]
    assert len(lines) == 1 and lines[0].startswith("skipped ") and "broken.jpg" in lines[0]
    assert len(result.predictions) == 3
    # the reported top-3 are the model's own softmax top-3 on the timm eval transform
    from qtvit.deploy.predict import transform_for_model

    transform = transform_for_model(small_model)
    for p in result.predictions:
        x = transform(Image.open(p.path).convert("RGB"))[None]
        assert tuple(x.shape[-2:]) == (64, 64)
        with torch.no_grad():
            probs, idx = small_model(x).softmax(-1)[0].topk(3)
        assert p.indices == idx.tolist()
        np.testing.assert_allclose(p.probs, probs.numpy(), rtol=1e-5)
        assert p.names == [CLASSES[i] for i in idx.tolist()]


def test_cli_predict_with_training_checkpoint_and_json(image_folder, small_model, tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    ema = {k: v.clone() for k, v in small_model.state_dict().items()}
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    config = {"model": {"name": "qtvit_b0", "kwargs": {"img_size": 64}}}
    torch.save({"qtvit_train_checkpoint": 1, "model_name": "qtvit_b0", "model": raw, "ema": ema,
                "classes": CLASSES, "config": config}, ckpt)
    out = tmp_path / "pred.json"
    code = main(["predict", str(image_folder), "--model", "qtvit_b0", "--checkpoint", str(ckpt),
                 "--topk", "2", "--json", str(out), "--quiet", "--fuse"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "3 images predicted, 1 skipped" in captured.out
    doc = json.loads(out.read_text())
    reference = predict([image_folder], small_model, topk=2, progress=False, report=lambda _: None)
    assert [p["path"] for p in doc["predictions"]] == [p.path for p in reference.predictions]
    for got, want in zip(doc["predictions"], reference.predictions, strict=True):  # EMA weights were used
        assert [t["index"] for t in got["topk"]] == want.indices
        assert [t["name"] for t in got["topk"]] == want.names
    assert doc["skipped"][0]["path"].endswith("broken.jpg")


def test_predict_from_onnx_uses_stored_preprocessing_and_names(image_folder, small_model, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the [deploy] extra")
    pytest.importorskip("onnxscript", reason="needs the [deploy] extra")
    from qtvit.deploy.export import export_onnx

    path = export_onnx(small_model, tmp_path / "m.onnx")
    onnx_model = OnnxClassifier(path)
    assert onnx_model.class_names == CLASSES and onnx_model.preprocessing["input_size"] == [3, 64, 64]
    got = predict([image_folder], onnx_model, topk=2, progress=False, report=lambda _: None)
    want = predict([image_folder], small_model, topk=2, progress=False, report=lambda _: None)
    assert [p.indices for p in got.predictions] == [p.indices for p in want.predictions]
    assert [p.names for p in got.predictions] == [p.names for p in want.predictions]
    with pytest.raises(ValueError, match="not accepted"):  # declared sizes are checked before running
        onnx_model(torch.zeros(1, 3, 64, 70))


def test_imagenet_names_for_1000_classes():
    from qtvit.deploy.export import class_names_of

    names = class_names_of(qtvit.create_model("qtvit_b0"))
    assert len(names) == 1000 and names[1].startswith("goldfish")
