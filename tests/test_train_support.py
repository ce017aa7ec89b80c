"""Shared helpers for the training tests: a tiny real QT-ViT, tiny demo data, a runner.

(Named test_train_* so it sits with the tests it serves; it defines no tests itself.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtvit.train.config import load_config
from qtvit.train.trainer import FitResult, Trainer

# A real EfficientViT/QT-ViT (qt kernel, APE, shortcut, attention in stages 3–4) small enough
# for a CPU test: ~40k parameters, 32 px inputs.
TINY_MODEL = [
    "model.name=qtvit_b0",
    "model.kwargs={widths: [8, 8, 16, 16, 32], depths: [1, 1, 1, 1, 1], head_dim: 8, head_widths: [32, 32], "
    "img_size: 32}",
    "model.drop_path_rate=0.0",
]

# Tiny demo data, one process, no augmentation, no mixup: the deterministic baseline.
TINY_RUN = TINY_MODEL + [
    "data.dataset=demo", "data.demo_image_size=32", "data.demo_train_size=64", "data.demo_val_size=20",
    "data.num_workers=0", "aug.multi_res=false", "aug.no_aug=true", "aug.randaug=false",
    "aug.mixup_alpha=0", "aug.cutmix_alpha=0", "train.epochs=2", "train.batch_size=8",
    "train.bn_images=16", "train.ema_warmup_steps=4", "optim.warmup_epochs=0.5", "optim.lr=2e-3",
    "run.progress=false", "run.log_interval=1",
]

# Everything random switched on (RandAugment, crops, flips, erasing, mixup/cutmix, drop-path,
# multi-resolution): what an exact resume must reproduce.
AUGMENTED = [
    "aug.no_aug=false", "aug.randaug=true", "aug.re_prob=0.25", "aug.mixup_alpha=0.2", "aug.cutmix_alpha=0.2",
    "aug.multi_res=true", "aug.train_sizes=[32, 48]", "model.drop_path_rate=0.1",
]


def make_trainer(run_dir: Path, *overrides: str, resume: bool = False, overwrite: bool = False) -> Trainer:
    if resume:
        from qtvit.train.trainer import resume_config

        cfg, ckpt = resume_config(run_dir, list(overrides))
        return Trainer(cfg, run_dir, resume=True, checkpoint=ckpt)
    return Trainer(load_config(None, TINY_RUN + list(overrides)), run_dir, overwrite=overwrite)


def run(run_dir: Path, *overrides: str, resume: bool = False) -> FitResult:
    return make_trainer(run_dir, *overrides, resume=resume).fit()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_state_equal(a: dict, b: dict, atol: float = 0.0, keys: tuple[str, ...] = ("model", "ema")) -> None:
    """Two checkpoints hold the same tensors under ``keys`` (exactly, or to ``atol``)."""
    for key in keys:
        sa, sb = a[key], b[key]
        assert sa.keys() == sb.keys(), key
        for name in sa:
            ta, tb = sa[name], sb[name]
            if ta.is_floating_point():
                gap = (ta - tb).abs().max()
                assert torch.allclose(ta, tb, rtol=0, atol=atol), f"{key}.{name} differs by {gap}"
            else:
                assert torch.equal(ta, tb), f"{key}.{name}"


def optimizer_tensors(ckpt: dict) -> list[torch.Tensor]:
    return [v for s in ckpt["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
