"""``qtvit seg demo``: train and evaluate a small QT-ViT + SegHead on the synthetic cue set, on CPU.

The recipe (:data:`DEMO_RECIPE`) runs the one Trainer with ``task: segmentation`` on
:mod:`~qtvit.tasks.segmentation.synthetic` images (32×128, 4 classes) and the narrow
``qtvit_seg_demo`` model (~0.15 M parameters). The run folder gets the Trainer's files
(``last.pt``/``best.pt``, ``metrics.json`` with ``miou``/``macc``/``aacc`` as fractions,
``metrics.jsonl``, ``curves.png``, ``config.yaml``) plus ``overlay.png``: validation images with
their ground truth and prediction.

The control ``--no-attention`` is the same recipe with the ``none`` kernel (attention output 0:
no global token mixing; every convolution stays): it finds the objects but cannot know their
class, so its mIoU stays far lower.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...io import write_json

# The demo recipe; every value explained. Sizes are for 2 CPU cores and about five minutes.
DEMO_RECIPE = {
    "task": "segmentation",
    "model": {
        "name": "qtvit_seg_demo",  # narrow B-style backbone (one block per stage) + one-block SegHead
        "kernel": "qt",  # QT-ViT's attention (the control swaps in "none")
        "ape": False,  # the cue can be anywhere: position embeddings are not needed
        "shortcut": False,
        "drop_path_rate": 0.0,  # short schedule: no regularisation needed
        "kwargs": {"img_size": [32, 128]},
    },
    "data": {
        "dataset": "synthetic",
        "synthetic_size": [32, 128],  # wide images: the cue is 32–120 px from the objects
        "synthetic_train": 1600,  # 100 steps per epoch at batch 16
        "synthetic_val": 100,
        "eval_scale": None,
        "num_workers": 0,  # generation is cheap; workers would compete for the 2 cores
        "pin_memory": False,
    },
    "optim": {
        "opt": "adamw",
        "lr": 0.004,  # a high rate: tiny model, few steps
        "weight_decay": 0.01,
        "sched": "poly",  # mmseg's schedule: linear (power 1) decay after the warm-up
        "warmup_epochs": 0.2,
        "warmup_lr": 0.0001,
        "min_lr": 0.0,
        "clip_grad": None,
    },
    "train": {
        "epochs": 2,  # 200 steps
        "batch_size": 16,
        "eval_batch_size": 50,
        "ema": False,
        "bn_reestimate": False,
        "device": "cpu",
        "seed": 0,
    },
    "run": {"log_interval": 20},
}
OVERLAY_SAMPLES = 4


def demo_config(no_attention: bool = False, overrides: list[str] | tuple[str, ...] = ()):
    """The resolved demo config (a :class:`~qtvit.tasks.segmentation.task.SegConfig`)."""
    from ...train.config import load_config

    extra = ["model.kernel=none"] if no_attention else []
    return load_config(None, [*extra, *overrides], base=DEMO_RECIPE, task="segmentation")


def run_demo(output: str | Path, no_attention: bool = False, overrides: list[str] | tuple[str, ...] = (),
             overwrite: bool = False, resume: bool = False) -> dict:
    """Train + evaluate; write the run folder (see the module docstring).

    Returns ``metrics.json``'s dict with ``status`` ``"done"``, or the Trainer's status
    (``"interrupted"``, ``"paused"``) and the last evaluation's metrics when it stopped early.
    """
    from ...train.trainer import Trainer

    cfg = demo_config(no_attention, overrides)
    cfg.run.output = str(output)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    start = time.perf_counter()
    result = Trainer(cfg, output, resume=resume, overwrite=overwrite, command="qtvit seg demo").fit()
    run_dir = Path(output)
    if result.status != "done":  # interrupted or paused: the Trainer said how to resume
        return {"status": result.status, **result.metrics}
    write_overlay(run_dir, cfg)
    summary = json.loads((run_dir / "metrics.json").read_text())
    # training + evaluation + overlay of this invocation (a resumed run counts its last part only)
    summary.update(wall_seconds=round(time.perf_counter() - start, 1), resumed=resume)
    write_json(summary, run_dir / "metrics.json")
    return {"status": "done", **summary}


def write_overlay(run_dir: Path, cfg) -> Path:
    """``overlay.png``: rows of (image, ground truth, prediction) for a few validation images."""
    from .synthetic import SyntheticCueSegmentation
    from .transforms import normalize
    from .visualize import save_overlay_grid

    model = load_run_model(run_dir / "best.pt", cfg)
    val = SyntheticCueSegmentation(OVERLAY_SAMPLES, cfg.train.seed + 7919, tuple(cfg.data.synthetic_size))
    images, masks = zip(*(val[i] for i in range(len(val))), strict=True)
    from .inference import predict

    pred = predict(model, normalize(torch.stack(images))).argmax(1)
    return save_overlay_grid(run_dir / "overlay.png", list(images), list(masks), list(pred),
                             model.num_classes)


def load_run_model(checkpoint: Path, cfg) -> torch.nn.Module:
    """The model of a training checkpoint written by the Trainer (``model`` weights), in eval mode."""
    from ...train.evaluate import build_model
    from ...train.state import load_training_checkpoint

    state = load_training_checkpoint(checkpoint)
    model = build_model(cfg.model, len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


__all__ = ["DEMO_RECIPE", "demo_config", "load_run_model", "run_demo", "write_overlay"]
