"""The trainer's task interface: a task written only against the public :class:`Task` API trains,
evaluates, picks ``best.pt`` by its own metric, resumes exactly, and is selected by a recipe's
``task:`` key; unknown or duplicate task names are one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train_support import assert_state_equal, load

from qtvit.errors import QtvitError
from qtvit.train.config import BaseDataConfig, Config, check_common, load_config
from qtvit.train.task import Task, get_task, list_tasks, register_task
from qtvit.train.trainer import Trainer


@dataclass
class BrightnessData(BaseDataConfig):
    """A toy dense task: predict each pixel's brightness class (dark/bright) of random images."""

    num_workers: int = 0
    train_images: int = 48
    val_images: int = 16
    size: int = 16


@dataclass
class BrightnessConfig(Config):
    task: ClassVar[str] = "toy_brightness"
    data: BrightnessData = field(default_factory=BrightnessData)

    def check(self) -> None:
        check_common(self)
        if self.data.size < 4:
            raise QtvitError(f"data.size must be at least 4; got {self.data.size}")


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, split: int) -> None:
        self.n, self.size, self.split = n, size, split

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, seed = (key, 0) if isinstance(key, int) else (key[0], key[2])
        g = torch.Generator().manual_seed(self.split * 10**6 + index)
        x = torch.rand(1, self.size, self.size, generator=g)
        noise = 0.05 * torch.randn(1, self.size, self.size, generator=torch.Generator().manual_seed(seed))
        return x + noise, (x[0] > 0.5).long()


@register_task
class BrightnessTask(Task):
    name = "toy_brightness"
    metric = "pixel_acc"
    config_class = BrightnessConfig

    def load_data(self, seed: int) -> list[str]:
        return ["dark", "bright"]

    def build_model(self, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, num_classes, 1))

    def train_dataset(self, model):
        return Pixels(self.cfg.data.train_images, self.cfg.data.size, 0)

    def val_dataset(self, model):
        return Pixels(self.cfg.data.val_images, self.cfg.data.size, 1)

    def train_sizes(self) -> list[int]:
        return [self.cfg.data.size]

    def training_loss(self, net, batch, step):
        x, y = batch
        return F.cross_entropy(net(x), y)

    @torch.no_grad()
    def evaluate(self, model, loader, amp_dtype):
        model.eval()
        hits = total = 0
        for batch in loader:
            x, y = self.to_device(batch, self.device)
            hits += int((model(x).argmax(1) == y).sum())
            total += y.numel()
        return {"pixel_acc": hits / total, "pixels": total}


TOY_RUN = ["train.epochs=3", "train.batch_size=8", "train.ema=false", "train.bn_reestimate=false",
           "optim.lr=3e-2", "optim.warmup_epochs=0", "run.progress=false", "run.log_interval=1"]


def test_a_public_api_task_trains_and_picks_best_by_its_metric(tmp_path):
    cfg = load_config(None, TOY_RUN, task="toy_brightness")
    assert isinstance(cfg, BrightnessConfig) and cfg.to_dict()["task"] == "toy_brightness"
    result = Trainer(cfg, tmp_path / "r").fit()
    assert result.status == "done"
    assert result.metrics["pixel_acc"] > 0.8  # chance is 0.5; a threshold is learnable in 18 steps
    assert (tmp_path / "r" / "curves.png").stat().st_size > 0  # plotted with the task's metric
    ckpt = load(tmp_path / "r" / "best.pt")
    assert ckpt["task"] == "toy_brightness" and ckpt["best_metric"] >= result.metrics["pixel_acc"]
    import json

    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["task"] == "toy_brightness" and summary["metric"] == "pixel_acc"
    # The saved config names its task, so it reloads as the task's config class.
    assert load_config(tmp_path / "r" / "config.yaml") == cfg


def test_a_task_run_resumes_exactly(tmp_path):
    Trainer(load_config(None, TOY_RUN, task="toy_brightness"), tmp_path / "full").fit()
    cfg = load_config(None, [*TOY_RUN, "train.epochs_per_run=1"], task="toy_brightness")
    assert Trainer(cfg, tmp_path / "parts").fit().status == "paused"
    from qtvit.train.trainer import resume_config

    cfg, ckpt = resume_config(tmp_path / "parts", ["train.epochs_per_run=null"])
    assert isinstance(cfg, BrightnessConfig)
    Trainer(cfg, tmp_path / "parts", resume=True, checkpoint=ckpt).fit()
    assert_state_equal(load(tmp_path / "full" / "last.pt"), load(tmp_path / "parts" / "last.pt"),
                       keys=("model",))


def test_trainer_takes_a_task_class_directly(tmp_path):
    class Shallow(BrightnessTask):  # a study changes one piece by subclassing, not by reaching in
        def build_model(self, num_classes):
            return nn.Conv2d(1, num_classes, 1)

    cfg = load_config(None, [*TOY_RUN, "train.epochs=1"], task="toy_brightness")
    trainer = Trainer(cfg, tmp_path / "r", task=Shallow)
    assert isinstance(trainer.model, nn.Conv2d) and trainer.task.name == "toy_brightness"


def test_task_names_errors():
    assert {"classification", "segmentation", "detection", "toy_brightness"} <= set(list_tasks())
    assert get_task("classification").metric == "top1"
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: .*classification"):
        get_task("nope")
    with pytest.raises(QtvitError, match="unknown task 'nope'"):
        load_config(None, task="nope")

    class Other(Task):
        name = "toy_brightness"

    with pytest.raises(ValueError, match="a task named 'toy_brightness' is already registered"):
        register_task(Other)


def test_task_config_errors_are_one_line(tmp_path):
    with pytest.raises(QtvitError, match="data.size must be at least 4; got 2"):
        load_config(None, ["data.size=2"], task="toy_brightness")
    with pytest.raises(QtvitError, match=r"unknown key data.dataset; valid keys in data: .*train_images"):
        load_config(None, ["data.dataset=demo"], task="toy_brightness")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: toy_brightness\ndata: {size: 8}\n")
    assert load_config(recipe).data.size == 8
    with pytest.raises(QtvitError, match="task 'toy_brightness' does not match this classification config"):
        load_config(recipe, task="classification")
