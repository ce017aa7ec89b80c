"""The trainer's task interface: what a kind of training job supplies to the one :class:`Trainer`.

The Trainer owns everything that does not depend on the task: the run folder, torchrun/DDP, AMP,
model placement, EMA, the optimiser and schedule, gradient accumulation and clipping, skipping
non-finite losses, exact resume, atomic checkpoints, signals, progress bars, metric logs and
curves. A :class:`Task` supplies what differs between classification, segmentation, detection
(and studies such as ``qtvit reproduce``): the data, the model, the loss and the evaluation.

A task is chosen by the recipe's top-level ``task:`` key (default ``classification``) or passed
to the Trainer directly (``Trainer(cfg, run_dir, task=MyTask)``), so a study can change one
piece (say, the model) by subclassing a task instead of reaching into the Trainer.

Data contract: the training set is indexed by the sampler's keys ``(index, size, seed)`` —
``size`` is the step's resolution (one of :meth:`Task.train_sizes`, the same on every rank),
``seed`` the per-sample augmentation seed (so a resumed run sees the same augmentations) — and
the validation set by plain integers. Batches are whatever :meth:`Task.collate` makes of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .config import Config
    from .distributed import DistInfo


@dataclass
class StepContext:
    """What a training step may need besides the batch.

    Attributes:
        global_step: optimizer steps taken so far in the run.
        total_steps: optimizer steps in the whole run.
        epoch: the current epoch (0-based).
        ema: the EMA model (eval mode, no grad) or None; a task may use it as a teacher.
    """

    global_step: int
    total_steps: int
    epoch: int
    ema: nn.Module | None


class Task:
    """Base class of a training task; subclasses override what differs.

    Class attributes:
        name: the value of the recipe's ``task:`` key.
        metric: the key of :meth:`evaluate`'s result that selects ``best.pt`` (higher is better).
        curve_metrics: the evaluation metrics drawn in ``curves.png`` (default: ``metric``).
        config_class: the typed config this task reads (:class:`qtvit.train.config.Config` or a
            subclass that replaces the ``data``/``aug`` sections with the task's own).

    Instances are made by the Trainer as ``task_class(cfg, info)`` once ``info`` (the process's
    rank, world size and device) is known; ``self.device`` is ``info.device``.
    """

    name: ClassVar[str] = "task"
    metric: ClassVar[str] = "loss"
    curve_metrics: ClassVar[tuple[str, ...]] = ()  # evaluation metrics plotted in curves.png (() = metric)
    config_class: ClassVar[type] = None  # set by subclasses (None: qtvit.train.config.Config)

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device

    # ------------------------------------------------------------------------------------ data
    def load_data(self, seed: int) -> list[str]:
        """Read or prepare the raw datasets (not yet transformed); return the class names."""
        raise NotImplementedError

    def build_model(self, num_classes: int) -> nn.Module:
        """The network, on the CPU; the Trainer moves it and wraps it (DDP, compile, EMA).

        The default builds ``cfg.model`` through qtvit's registry and, if set, loads
        ``cfg.model.init_checkpoint`` (any layout qtvit reads; a classifier of another class count
        is left fresh).
        """
        from .evaluate import build_model, load_weights

        model = build_model(self.cfg.model, num_classes)
        if self.cfg.model.init_checkpoint:
            load_weights(model, self.cfg.model.init_checkpoint, new_classifier_ok=True)
        return model

    def train_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        """The training set, indexed by sampler keys ``(index, size, seed)``."""
        raise NotImplementedError

    def val_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        """The validation set, indexed by integers."""
        raise NotImplementedError

    def train_sizes(self) -> list[int]:
        """Candidate resolutions, one drawn per optimizer step (one entry: a fixed size)."""
        raise NotImplementedError

    def eval_size(self) -> int:
        """The resolution of BN re-estimation batches (classification: the evaluation size)."""
        return max(self.train_sizes())

    collate: Callable[[list], Any] | None = None  # None: torch's default_collate

    def to_device(self, batch, device: torch.device):
        """Move a batch to ``device`` (default: every tensor of a tuple/list batch)."""
        return type(batch)(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
                           for x in batch)

    def inputs(self, batch) -> torch.Tensor:
        """The input images of a batch (used for BN re-estimation); default ``batch[0]``."""
        return batch[0]

    def batch_info(self, batch) -> dict[str, int]:
        """``images`` in the batch, its ``size`` (side) and ``bad`` (unreadable, replaced) images."""
        x = self.inputs(batch)
        return {"images": int(x.shape[0]), "size": int(x.shape[-1]), "bad": 0}

    # ---------------------------------------------------------------------------------- train
    def training_loss(self, net: nn.Module, batch, step: StepContext) -> torch.Tensor:
        """Forward and loss of one micro-batch (called under autocast); a scalar tensor."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- eval
    def evaluate(self, model: nn.Module, loader, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """Metrics of ``model`` over ``loader`` (the validation loader), reduced over ranks.

        Must contain :attr:`metric`. Called on every rank (collectives inside are fine).
        """
        raise NotImplementedError

    def describe(self, metrics: dict[str, Any]) -> str:
        """One line printed after each evaluation."""
        return f"{self.metric} {metrics[self.metric]:.4g}"

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Extra keys for the run's ``metrics.json`` (besides the last evaluation's metrics)."""
        return {}


# ------------------------------------------------------------------------------------- registry
_TASKS: dict[str, type[Task]] = {}
# Tasks that live in optional subpackages are imported the first time their name is asked for.
_LAZY = {"classification": "qtvit.train.classification",
         "segmentation": "qtvit.tasks.segmentation",
         "detection": "qtvit.tasks.detection"}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``task: <cls.name>`` in recipes."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered ({_TASKS[cls.name].__qualname__})")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; unknown names raise listing the valid ones."""
    if name not in _TASKS and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as err:
            raise ValueError(f"task {name!r} needs a module that is not available ({err.name}); "
                             "install qtvit with the matching extra, e.g. pip install 'qtvit[seg]'") from None
    if name not in _TASKS:
        valid = sorted(set(_TASKS) | set(_LAZY))
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(set(_TASKS) | set(_LAZY))


__all__ = ["StepContext", "Task", "get_task", "list_tasks", "register_task"]
