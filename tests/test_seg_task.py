"""Segmentation on the Trainer: a reduced demo run, recipes, config errors, the synthetic set, the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qtvit.cli import main
from qtvit.errors import QtvitError
from qtvit.tasks.segmentation.synthetic import CUE_COLOURS, SyntheticCueSegmentation, make_sample
from qtvit.tasks.segmentation.task import pixel_cross_entropy
from qtvit.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic_train=32", "data.synthetic_val=8", "train.epochs=1", "run.progress=false"]


def test_reduced_budget_demo_writes_metrics_overlay_and_checkpoint(tmp_path):
    from qtvit.tasks.segmentation.demo import demo_config, load_run_model, run_demo

    out = tmp_path / "demo"
    metrics = run_demo(out, overrides=TINY)
    saved = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done"
    for key in ("miou", "macc", "aacc"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == metrics[key]
    assert saved["task"] == "segmentation" and saved["global_step"] == 2
    assert saved["wall_seconds"] > 0 and saved["torch"] == torch.__version__  # provenance of the numbers
    assert saved["git"] is None or set(saved["git"]) == {"commit", "dirty", "source"}
    overlay = Image.open(out / "overlay.png")
    assert overlay.size[0] > 3 * 128 and overlay.mode == "RGB"
    model = load_run_model(out / "best.pt", demo_config(overrides=TINY))
    assert model(torch.zeros(1, 3, 32, 128)).shape == (1, 4, 4, 16)
    with pytest.raises(QtvitError):  # an existing run folder is never overwritten silently
        run_demo(out, overrides=TINY)


def test_no_attention_control_uses_the_none_kernel():
    from qtvit.tasks.segmentation.demo import demo_config

    assert demo_config().model.kernel == "qt"
    assert demo_config(no_attention=True).model.kernel == "none"


@pytest.mark.parametrize("recipe", sorted((REPO / "configs/seg").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_seg_recipe_loads(recipe):
    cfg = load_config(str(recipe), ["data.path=/data"])
    assert type(cfg).__name__ == "SegConfig" and cfg.data.dataset in ("ade20k", "cityscapes")


def test_config_errors_are_one_line():
    with pytest.raises(QtvitError, match="data.dataset='voc' is not valid"):
        load_config(None, ["data.dataset=voc"], task="segmentation")
    with pytest.raises(QtvitError, match="data.path is required"):
        load_config(None, [], task="segmentation")
    with pytest.raises(QtvitError, match="eval_stride"):
        load_config(None, ["data.dataset=synthetic", "data.eval_stride=600"], task="segmentation")


def test_pixel_cross_entropy_resizes_logits_and_ignores():
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 8, 8), 255, dtype=torch.long)
    target[0, 0, 0] = 2
    loss = pixel_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(np.log(3), rel=1e-5)  # only the one labelled pixel counts
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_synthetic_label_is_decided_by_the_distant_cue():
    for i in range(20):
        image, mask = make_sample(i, seed=3)
        H, W = mask.shape
        left = image[:, :, : W // 4].reshape(3, -1).T.tolist()
        colour = next(c for c, rgb in enumerate(CUE_COLOURS) if list(rgb) in left)
        objects = mask[mask > 0]
        assert objects.numel() > 0 and (objects == 1 + colour).all()
        assert (mask[:, : W // 2] == 0).all()  # objects only in the right half, far from the cue
    ds = SyntheticCueSegmentation(4, seed=1)
    assert torch.equal(ds[2][0], ds[(2, 128, 99)][0])  # deterministic, the trainer's keys accepted


def test_cli_predict_writes_overlays_and_raw_masks(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name, (h, w) in {"a.png": (40, 70), "b.jpg": (64, 32)}.items():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / name)
    out = tmp_path / "out"
    args = ["seg", "predict", str(src), "--model", "qtvit_seg_demo", "--output", str(out),
            "--scale", "0", "0"]
    assert main(args) == 0
    mask = np.asarray(Image.open(out / "a_mask.png"))
    assert mask.shape == (40, 70) and mask.max() < 4
    assert Image.open(out / "b_overlay.png").size == (32, 64)
    assert main(args) == 2  # outputs exist: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["seg", "predict", str(tmp_path / "missing.png"), "--model", "qtvit_seg_demo",
                 "--output", str(out)]) == 2


def test_seg_ablation_tables_every_kernel_and_seed_and_resumes(tmp_path, capsys):
    """Two kernels × two seeds at a reduced budget: the JSON's summary is computed from its runs, the
    control's gap is zero by definition, the table lists every seed, and a finished study is reused
    by --resume (no retraining) while a second start without it is refused."""
    import statistics

    out = tmp_path / "abl"
    assert main(["seg", "ablation", "--kernels", "qt,none", "--seeds", "0,1", "--output-dir", str(out),
                 *TINY]) == 0
    doc = json.loads((out / "seg_ablation.json").read_text())
    assert set(doc["runs"]) == {"qt", "none"} and set(doc["runs"]["qt"]) == {"0", "1"}
    for kernel, by_seed in doc["runs"].items():
        values = [by_seed[s]["miou"] for s in ("0", "1")]
        row = doc["summary"][kernel]
        assert row["miou_mean"] == pytest.approx(statistics.fmean(values))
        assert row["miou_std"] == pytest.approx(statistics.stdev(values))
        assert row["vs_none"] == pytest.approx(row["miou_mean"] - statistics.fmean(
            [doc["runs"]["none"][s]["miou"] for s in ("0", "1")]))
        # each run trained its own kernel and seed
        config = (out / kernel / "seed1" / "config.yaml").read_text()
        assert f"kernel: {kernel}" in config and "seed: 1" in config
    assert doc["summary"]["none"]["vs_none"] == 0.0 and "git" in doc["env"]
    table = (out / "seg_ablation.md").read_text()
    assert "| none |" in table and "control" in table and "--seeds 0,1" in table
    stamp = (out / "qt" / "seed0" / "last.pt").stat().st_mtime_ns
    assert main(["seg", "ablation", "--kernels", "qt,none", "--seeds", "0,1", "--output-dir", str(out),
                 "--resume", *TINY]) == 0
    assert (out / "qt" / "seed0" / "last.pt").stat().st_mtime_ns == stamp  # reused, not retrained
    assert "done before" in capsys.readouterr().out
    # one-line errors, nothing trained: a used folder without --resume, an unknown kernel
    assert main(["seg", "ablation", "--kernels", "qt", "--seeds", "0", "--output-dir", str(out), *TINY]) != 0
    assert "is not empty; pass --resume" in capsys.readouterr().err
    fresh = str(tmp_path / "x")
    assert main(["seg", "ablation", "--kernels", "nope", "--seeds", "0", "--output-dir", fresh]) != 0
    assert "unknown attention kernel 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
