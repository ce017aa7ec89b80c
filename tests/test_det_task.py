"""Detection on the Trainer: synthetic set, training-time resize/flip, config checks, and a
reduced-budget ``qtvit det demo`` followed by ``det eval`` and ``det predict`` on its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")

from qtvit.cli import main  # noqa: E402
from qtvit.errors import QtvitError  # noqa: E402
from qtvit.tasks.detection.data import DetectionTrainSet, hflip_sample, resize_sample  # noqa: E402
from qtvit.tasks.detection.synthetic import SyntheticShapes  # noqa: E402
from qtvit.train.config import load_config  # noqa: E402
from qtvit.train.task import get_task  # noqa: E402

# The demo recipe cut to two steps on 64-px images and four validation images.
TINY_DEMO = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=2",
             "data.synthetic_val_size=4", "data.synthetic_image_size=64", "aug.train_sizes=[64]",
             "aug.test_size=64", "aug.max_size=64", "run.progress=false"]


def test_synthetic_set_is_deterministic_and_boxes_enclose_masks():
    a, b = SyntheticShapes(4, 64, seed=3), SyntheticShapes(4, 64, seed=3)
    other = SyntheticShapes(4, 64, seed=4)
    for i in range(4):
        (x, t), (y, u) = a[i], b[i]
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(t["boxes"], u["boxes"])
        assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1
        for box, mask in zip(t["boxes"], t["masks"], strict=True):
            ys, xs = torch.where(mask > 0)
            extent = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert box.tolist() == extent
        assert set(t["labels"].tolist()) <= {1, 2, 3}
    assert not torch.equal(a[0][0], other[0][0])
    gt = a.coco()
    assert len(gt["images"]) == 4 and len(gt["annotations"]) == sum(len(a[i][1]["boxes"]) for i in range(4))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SyntheticShapes(4, 64, split="dev")


def test_training_samples_are_resized_and_flipped_consistently():
    base = SyntheticShapes(2, 64)
    image, target = base[0]
    big, big_t = resize_sample(image, target, 96, 200)
    assert big.shape == (3, 96, 96) and big_t["masks"].shape[-2:] == (96, 96)
    torch.testing.assert_close(big_t["boxes"], target["boxes"] * 1.5)
    capped, _ = resize_sample(torch.rand(3, 50, 100), {"boxes": torch.zeros(0, 4)}, 80, 120)
    assert capped.shape == (3, 60, 120)  # the long side caps the scale
    flipped, flipped_t = hflip_sample(image, target)
    torch.testing.assert_close(flipped.flip(-1), image)
    for box, mask in zip(flipped_t["boxes"], flipped_t["masks"], strict=True):
        xs = torch.where(mask.any(0))[0]
        assert box[0] == xs.min() and box[2] == xs.max() + 1
    train = DetectionTrainSet(base, max_size=200, hflip=0.5)
    flips = [bool(np.random.default_rng(s).random() < 0.5) for s in range(8)]
    assert any(flips) and not all(flips)
    for seed, flip in enumerate(flips):
        x, t = train[(0, 64, seed)]
        torch.testing.assert_close(x, image.flip(-1) if flip else image)
        torch.testing.assert_close(train[(0, 64, seed)][1]["boxes"], t["boxes"])  # same key, same sample


def test_config_checks_name_the_bad_value():
    assert get_task("detection").__name__ == "DetectionTask"
    with pytest.raises(QtvitError, match="data.dataset='voc' is not valid"):
        load_config("det/demo", ["data.dataset=voc"])
    with pytest.raises(QtvitError, match="data.path must name the COCO root"):
        load_config("det/qtvit_1_3x")
    with pytest.raises(QtvitError, match="train.bn_reestimate must be false"):
        load_config("det/demo", ["train.bn_reestimate=true"])
    with pytest.raises(QtvitError, match="model.norm='gn' is not valid"):
        load_config("det/demo", ["model.norm=gn"])
    cfg = load_config("det/qtvit_1_1x", ["data.path=/coco"])
    assert cfg.train.epochs == 12 and cfg.aug.train_sizes == [800] and cfg.model.norm == "sync_bn"
    assert cfg.optim.sched == "multistep" and cfg.optim.decay_milestones == [8, 11]
    assert load_config("det/qtvit_1_3x", ["data.path=/coco"]).optim.decay_milestones == [27, 33]


def test_reduced_demo_then_eval_and_predict_on_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["det", "demo", "--output", str(run), *TINY_DEMO]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("bbox_ap", "bbox_ap50", "segm_ap"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (run / "predictions.png").stat().st_size > 0 and (run / "last.pt").is_file()
    # evaluating the checkpoint reproduces the run's own evaluation
    assert main(["det", "eval", str(run / "last.pt"), "--device", "cpu"]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["bbox_ap"] == pytest.approx(metrics["bbox_ap"])
    assert evaluated["segm_ap"] == pytest.approx(metrics["segm_ap"])
    # predict draws on image files
    from PIL import Image

    image = (SyntheticShapes(1, 64, split="test")[0][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    out = tmp_path / "pred"
    assert main(["det", "predict", str(tmp_path / "x.png"), "--checkpoint", str(run / "last.pt"), "--output",
                 str(out), "--score-thresh", "0.0", "--device", "cpu"]) == 0
    assert Image.open(out / "x_pred.png").size == (64, 64)
    assert json.loads((out / "predictions.json").read_text())["images"][0]["detections"]
    # user errors are one line, not tracebacks
    capsys.readouterr()
    assert main(["det", "predict", str(tmp_path / "missing.png"), "--checkpoint", str(run / "last.pt"),
                 "--output", str(out)]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["det", "eval", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["det", "demo", "--output", str(run), *TINY_DEMO]) == 2  # never overwrites silently
    assert "already" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_reaches_ap50_one_half(tmp_path):
    """The documented demo (configs/det/demo.yaml): box AP50 ≥ 0.5 on the synthetic validation set."""
    assert main(["det", "demo", "--output", str(tmp_path / "demo"), "run.progress=false"]) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["bbox_ap50"] >= 0.5, metrics


def test_coco_folder_round_trip_and_task_evaluation(tmp_path):
    """The synthetic set written as a COCO folder reads back identically, and the task evaluates on it."""
    from PIL import Image

    from qtvit.models.detection import build_detector
    from qtvit.tasks.detection.data import collate
    from qtvit.tasks.detection.task import DetectionTask
    from qtvit.train.distributed import DistInfo

    synthetic = SyntheticShapes(3, 64, split="val")
    gt = synthetic.coco()
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        for i, entry in enumerate(gt["images"]):
            pixels = (synthetic[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / entry["file_name"])
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(gt))
    cfg = load_config("det/demo", [f"data.path={tmp_path}", "data.dataset=coco"])
    task = DetectionTask(cfg, DistInfo())
    assert task.load_data(0) == ["square", "disc", "triangle"]
    val = task.val_dataset(None)
    for i in range(3):
        (x, t), (y, u) = val[i], synthetic[i]
        torch.testing.assert_close(x, y, atol=1 / 255, rtol=0)
        torch.testing.assert_close(t["boxes"], u["boxes"])
        assert torch.equal(t["masks"], u["masks"]) and torch.equal(t["labels"], u["labels"])
    torch.manual_seed(0)
    model = build_detector("cascade_mask_rcnn", "qtvit_b0", 3, fpn_channels=16, representation=32,
                           mask_layers=(16,), min_size=64, max_size=64)
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate)
    metrics = task.evaluate(model, loader, None)
    assert metrics["images"] == 3 and 0.0 <= metrics["bbox_ap"] <= 1.0 and "segm_ap75" in metrics
