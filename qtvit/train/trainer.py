"""The training loop: one code path for every task, from one CPU process to many GPUs on many nodes.

What differs between tasks (data, model, loss, metrics) comes from a :class:`~qtvit.train.task.Task`
(classification by default; the recipe's ``task:`` key or ``Trainer(task=...)`` picks another).

Per optimizer step: ``accum_steps`` micro-batches (all at the step's resolution) → the task's
forward and loss under autocast → backward (gradients all-reduced by DDP on the last micro-batch
only) → unscale → clip → optimizer → EMA update with warm-up → per-step schedule. Per epoch: BN
re-estimation on training images (optional), the task's evaluation, checkpoint (``last.pt``;
``best.pt`` on a new best value of the task's metric).

Robustness: a non-finite loss skips the step with a warning; ``train.max_bad_steps`` in a row stop
the run, the last checkpoint untouched. SIGTERM/SIGINT finish the step, save ``last.pt`` with the
position inside the epoch and return; ``resume=True`` continues exactly where it stopped (same
samples, resolutions, augmentations, random streams, schedule and EMA).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import QtvitError
from ..io import write_atomic
from . import distributed as du
from .config import Config
from .evaluate import autocast
from .metrics import MetricsLogger
from .state import CHECKPOINT_VERSION, capture_rng, load_training_checkpoint, restore_rng, save_atomic
from .task import StepContext, Task, get_task

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files a run writes; --overwrite removes exactly these (never the folder: it may hold the user's files).
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics_step.csv", "metrics_eval.csv",
             "metrics.json", "curves.png", "tensorboard")


class NonFiniteLossError(QtvitError):
    """Too many consecutive non-finite losses (the message says where and what to try)."""


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended: ``status`` is ``done``, ``paused`` or ``interrupted``."""

    status: str
    run_dir: Path
    metrics: dict
    epoch: int
    global_step: int
    signal: int | None = None


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check the run folder: an existing run is never reused silently."""
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir / 'last.pt'} does not exist")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise QtvitError(f"run path exists and is not a folder: {run_dir}")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise QtvitError(f"run folder {run_dir} already exists and is not empty; pass --resume to "
                             "continue it, --overwrite to start over, or choose another --output")
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def resume_config(run_dir: str | os.PathLike,
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """The config to resume ``run_dir`` with (the checkpoint's, plus ``overrides``) and the checkpoint."""
    from .config import load_config

    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    ckpt = load_training_checkpoint(path)
    return load_config(None, overrides, base=ckpt["config"]), ckpt


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (timm's mixup draws from numpy's global generator)
    torch.manual_seed(seed)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; workers must let the main process save and exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Trainer:
    """Builds everything from a :class:`Config`; :meth:`fit` runs it.

    Args:
        cfg: the resolved configuration (for a resume see :func:`resume_config`).
        run_dir: the run folder (checkpoints, logs, resolved config).
        resume: continue from ``run_dir/last.pt``.
        overwrite: start over in an existing ``run_dir`` (removes only the files a run writes).
        checkpoint: ``run_dir/last.pt`` already read by :func:`resume_config` (read once, not twice).
        command: the command that resumes this run, for messages (``qtvit train`` or ``qtvit demo``).
        task: the task class (or any ``(cfg, info) -> Task`` factory); default: the one the
            config names (``cfg.task``, classification unless the recipe says otherwise).
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, resume: bool = False,
                 overwrite: bool = False, checkpoint: dict | None = None,
                 command: str = "qtvit train", task: Callable[..., Task] | None = None) -> None:
        self.cfg, self.run_dir, self.resume, self.command = cfg, Path(run_dir), resume, command
        self.info = du.setup(cfg.train.device)
        self.task: Task = (task or get_task(cfg.task))(cfg, self.info)
        self.main = self.info.is_main
        self.device = self.info.device
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        error = None
        if self.main:
            try:
                prepare_run_dir(self.run_dir, resume, overwrite)
            except (QtvitError, OSError) as err:
                error = err
        error = du.broadcast_object(error, self.info)  # every rank fails the same way
        if error is not None:
            raise error
        ckpt = checkpoint
        if resume and ckpt is None:
            ckpt = load_training_checkpoint(self.run_dir / "last.pt")
        self.stop_signal: int | None = None
        self.classes = list(self.task.load_data(cfg.train.seed))
        if ckpt is not None and list(ckpt["classes"]) != self.classes:
            raise QtvitError(f"the data's classes differ from the checkpoint's ({len(self.classes)} vs "
                             f"{len(ckpt['classes'])}): resume with the data the run started with")
        self._build_model()
        self._build_loaders()
        self._build_optimization()
        # Position (the next step to take) and bookkeeping.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_metric, self.last_metrics = -math.inf, {}
        rank_rng = self._restore(ckpt) if ckpt is not None else None
        if rank_rng is None:
            # Each rank its own stream for dropout, drop-path and mixup (after the shared init).
            _seed_everything(cfg.train.seed * 1000 + self.info.rank + 1)

    # ------------------------------------------------------------------------------------ setup
    def _build_model(self) -> None:
        from .ema import WarmupEma

        t = self.cfg.train
        _seed_everything(t.seed)  # the same initial weights on every rank
        model = self.task.build_model(len(self.classes))
        if t.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: what is saved, averaged and evaluated
        # The EMA copy is made before DDP wraps the model.
        self.ema = WarmupEma(model, t.ema_decay, t.ema_warmup_steps) if t.ema else None
        net: nn.Module = model
        if self.info.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=t.find_unused_parameters)
        self.net = torch.compile(net) if t.compile else net

    def _build_loaders(self) -> None:
        """The task's datasets, the global-batch sampler (resolution per step) and the loaders."""
        from ..data import GlobalBatchSampler, ShardSampler

        d, t, info = self.cfg.data, self.cfg.train, self.info
        self.train_set = self.task.train_dataset(self.model)
        self.val_set = self.task.val_dataset(self.model)
        sizes = self.task.train_sizes()
        self.sampler = GlobalBatchSampler(len(self.train_set), t.batch_size, info.world_size, info.rank,
                                          t.accum_steps, sizes, shuffle=True, seed=t.seed,
                                          max_steps=t.max_steps_per_epoch)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * t.epochs
        self.loader_kw = dict(
            num_workers=d.num_workers, pin_memory=d.pin_memory and self.device.type == "cuda",
            worker_init_fn=_ignore_sigint, collate_fn=self.task.collate,
            # The loader's own generator: making an iterator must not draw from the global RNG,
            # or a resumed run's dropout and mixup streams would shift.
            generator=torch.Generator().manual_seed(t.seed))
        persistent = dict(persistent_workers=d.num_workers > 0)
        self.train_loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=self.sampler,
                                                        **self.loader_kw, **persistent)
        self.eval_batch = t.eval_batch_size or 2 * t.batch_size
        val_sampler = ShardSampler(len(self.val_set), info.world_size, info.rank, d.max_val_images)
        self.val_loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.eval_batch,
                                                      sampler=val_sampler, **self.loader_kw, **persistent)
        self.eval_size = self.task.eval_size()
        # BN re-estimation: a fixed subset of training images, this rank's share.
        n_bn = min(t.bn_images, len(self.train_set)) if t.bn_reestimate else 0
        perm = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(t.seed + 1))
        self.bn_indices = perm[:n_bn][info.rank::info.world_size].tolist()

    def _build_optimization(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from .optim import param_groups

        t, o = self.cfg.train, self.cfg.optim
        global_batch = t.batch_size * self.info.world_size * t.accum_steps
        self.lr = o.lr if o.lr is not None else o.base_lr * global_batch / o.base_batch
        groups = param_groups(self.model, o.weight_decay, o.decay_rule)
        self.optimizer = create_optimizer_v2(groups, opt=o.opt, lr=self.lr, weight_decay=o.weight_decay,
                                             betas=tuple(o.betas), eps=o.eps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=o.sched, num_epochs=t.epochs - o.warmup_epochs,
            warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr, min_lr=o.min_lr, warmup_prefix=True,
            decay_rate=o.decay_rate, decay_milestones=o.decay_milestones or (90, 180, 270),
            step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")

    def _restore(self, ckpt: dict) -> dict | None:
        """Load the training state; return this rank's RNG state (None if the world size changed)."""
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise QtvitError(f"{self.run_dir / 'last.pt'} has no EMA weights but train.ema is on")
            self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        # "best_top1": checkpoints written before tasks existed (classification only).
        self.best_metric = float(ckpt.get("best_metric", ckpt.get("best_top1", -math.inf)))
        self.last_metrics = dict(ckpt.get("metrics") or {})
        states = ckpt.get("rng_per_rank") or []
        if len(states) != self.info.world_size:
            if self.main:
                warnings.warn(f"resuming with {self.info.world_size} processes a run saved with "
                              f"{len(states)}: the random streams are reseeded", stacklevel=3)
            return None
        restore_rng(states[self.info.rank])
        return states[self.info.rank]

    # ------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict | None:
        """The full training state on rank 0 (the others contribute their RNG state, get None)."""
        rng = capture_rng()
        states = [rng]
        if self.info.distributed:
            states = [None] * self.info.world_size
            dist.all_gather_object(states, rng)
        if not self.main:
            return None
        return {
            "qtvit_train_checkpoint": CHECKPOINT_VERSION,
            "model_name": self.cfg.model.name,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_per_rank": states,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "task": self.task.name, "best_metric": self.best_metric, "metrics": self.last_metrics,
            "classes": list(self.classes), "config": self.cfg.to_dict(),
        }

    def save(self, best: bool = False) -> Path:
        """Write ``last.pt`` (and ``best.pt``) atomically on rank 0; all ranks must call it."""
        ckpt = self._checkpoint()
        if ckpt is not None:
            save_atomic(ckpt, self.run_dir / "last.pt")
            if best:
                save_atomic(ckpt, self.run_dir / "best.pt")
        du.barrier(self.info)
        return self.run_dir / "last.pt"

    # ---------------------------------------------------------------------------------- running
    def _handle_signal(self, signum, _frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.main:
            print(f"\n{self.command}: caught {signal.Signals(signum).name}; saving a checkpoint after this "
                  "step (press Ctrl-C again to abort without saving)", flush=True)

    def fit(self) -> FitResult:
        """Train to ``train.epochs`` (or for ``train.epochs_per_run`` epochs, or until a signal)."""
        logger = MetricsLogger(self.run_dir, self.cfg.run.tensorboard) if self.main else None
        if self.main:
            write_atomic(self.run_dir / "config.yaml", self.cfg.to_yaml())
            self._announce()
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._handle_signal)
        try:
            return self._fit(logger)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if logger is not None:
                logger.close()

    def _announce(self) -> None:
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.model.parameters())
        global_batch = t.batch_size * self.info.world_size * t.accum_steps
        resuming = f" (resuming at epoch {self.epoch + 1}, step {self.step_in_epoch})" if self.resume else ""
        print(f"{self.command}: {self.task.name}, {self.cfg.model.name} ({n_params / 1e6:.2f}M params, "
              f"{len(self.classes)} "
              f"classes) on {self.info.world_size}× {self.device}; {len(self.train_set)} train / "
              f"{len(self.val_set)} val images; global batch {global_batch}, lr {self.lr:.3g}, "
              f"{t.epochs} epochs × {self.steps_per_epoch} steps; run folder {self.run_dir}{resuming}",
              flush=True)

    def _fit(self, logger: MetricsLogger | None) -> FitResult:
        t = self.cfg.train
        epochs_this_run = 0
        while self.epoch < t.epochs:
            if du.any_rank_each([self.stop_signal is not None], self.info)[0]:
                return self._interrupted()
            if not self._train_epoch(logger):
                return self._interrupted()
            done = self.epoch + 1  # epochs completed
            metrics = self.validate(self.epoch) if done == t.epochs or done % t.eval_interval == 0 else {}
            self.epoch, self.step_in_epoch = done, 0
            best = bool(metrics) and metrics[self.task.metric] > self.best_metric
            if best:
                self.best_metric = metrics[self.task.metric]
            if metrics:
                self.last_metrics = metrics
                if logger is not None:
                    logger.log("eval", epoch=done, global_step=self.global_step, **metrics)
            self.save(best=best and self.cfg.run.save_best)
            epochs_this_run += 1
            if t.epochs_per_run and epochs_this_run >= t.epochs_per_run and self.epoch < t.epochs:
                return FitResult("paused", self.run_dir, self.last_metrics, self.epoch, self.global_step)
        if self.main:
            self._write_summary()
        return FitResult("done", self.run_dir, self.last_metrics, self.epoch, self.global_step)

    def _interrupted(self) -> FitResult:
        path = self.save()
        signum = self.stop_signal
        if self.main:
            by = signal.Signals(signum).name if signum else "request"
            print(f"{self.command}: stopped by {by} at epoch {self.epoch + 1}, step {self.step_in_epoch}; "
                  f"saved {path}. Continue with: {self.command} --output {self.run_dir} --resume", flush=True)
        return FitResult("interrupted", self.run_dir, self.last_metrics, self.epoch, self.global_step, signum)

    def _provenance(self) -> dict:
        """Where the numbers came from: the code's git commit (and whether the tree was dirty),
        the command line, torch and the CPU threads, so a results file can be traced to a run."""
        from ..bench.env import git_commit

        return {"git": git_commit(), "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(self.device)}

    def _write_summary(self) -> None:
        """``metrics.json`` (the last evaluation, the best value of the task's metric) and ``curves.png``."""
        summary = {**self.task.summary(self.last_metrics), **self.last_metrics, "task": self.task.name,
                   "metric": self.task.metric, "best_metric": self.best_metric, "epochs": self.epoch,
                   "global_step": self.global_step, "model": self.cfg.model.name,
                   "classes": len(self.classes), **self._provenance()}
        write_atomic(self.run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        try:
            from .plot import plot_curves

            plot_curves(self.run_dir, self.run_dir / "curves.png",
                        metrics=self.task.curve_metrics or (self.task.metric,))
        except ImportError as err:  # matplotlib is optional for training
            warnings.warn(f"no training-curve plot: {err}", stacklevel=2)

    def _train_epoch(self, logger: MetricsLogger | None) -> bool:
        """Run the rest of the current epoch; False if a stop signal ended it early."""
        from timm.utils import dispatch_clip_grad
        from tqdm import tqdm

        t, o = self.cfg.train, self.cfg.optim
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        self.net.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, unit="step", dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   disable=not (self.main and self.cfg.run.progress))
        params = [p for p in self.model.parameters() if p.requires_grad]
        window = torch.zeros(2, dtype=torch.float64)  # loss sum and finite steps since the last record
        micro_losses: list[torch.Tensor] = []
        bad_in_a_row = bad_images = images = 0
        tick = time.perf_counter()
        size = 0
        try:
            for batch in self.train_loader:
                batch = self.task.to_device(batch, self.device)
                info = self.task.batch_info(batch)
                bad_images += info["bad"]
                images += info["images"] * self.info.world_size
                size = info["size"]
                last_micro = len(micro_losses) == t.accum_steps - 1
                # DDP all-reduces gradients on the last micro-batch of a step only.
                no_sync = self.info.distributed and not last_micro
                with self.net.no_sync() if no_sync else contextlib.nullcontext():
                    step = StepContext(self.global_step, self.total_steps, self.epoch,
                                       self.ema.module if self.ema is not None else None)
                    with autocast(self.device, self.amp_dtype):
                        loss = self.task.training_loss(self.net, batch, step)
                    # Backward even for a non-finite loss: every rank must join DDP's all-reduce;
                    # the step is dropped below if any rank saw one.
                    self.scaler.scale(loss / t.accum_steps).backward()
                micro_losses.append(loss.detach().float())
                if not last_micro:
                    continue
                losses = torch.stack(micro_losses)
                micro_losses = []
                # One collective per step answers both: a non-finite loss or a stop signal anywhere?
                nonfinite, stop = du.any_rank_each(
                    [not bool(torch.isfinite(losses).all()), self.stop_signal is not None], self.info)
                if nonfinite:
                    bad_in_a_row += 1
                    self._non_finite(bar, bad_in_a_row)
                else:
                    bad_in_a_row = 0
                    if o.clip_grad is not None:
                        self.scaler.unscale_(self.optimizer)
                        dispatch_clip_grad(params, o.clip_grad, mode=o.clip_mode)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.ema is not None:
                        self.ema.update(self.model, step=self.global_step)
                    window += torch.tensor([float(losses.mean()), 1.0], dtype=torch.float64)
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                self.step_in_epoch += 1
                self.scheduler.step_update(num_updates=self.global_step)
                bar.update(1)
                epoch_end = self.step_in_epoch == self.steps_per_epoch
                if self.global_step % self.cfg.run.log_interval == 0 or epoch_end:
                    elapsed = time.perf_counter() - tick
                    self._log_steps(logger, bar, window, images / max(elapsed, 1e-9), size, bad_images)
                    window.zero_()
                    images, tick = 0, time.perf_counter()
                if stop:
                    return False
        finally:
            bar.close()
        return True

    def _non_finite(self, bar, in_a_row: int) -> None:
        """Warn about a skipped step; raise after ``train.max_bad_steps`` in a row."""
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}"
        if self.main:
            bar.write(f"warning: non-finite loss at {where}; step skipped ({in_a_row}/"
                      f"{self.cfg.train.max_bad_steps} in a row)")
        if in_a_row >= self.cfg.train.max_bad_steps:
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint {last} is untouched" if last.exists() else "nothing was saved"
            raise NonFiniteLossError(f"loss was not finite for {in_a_row} consecutive steps ({where}); "
                                     f"stopped, {kept}. Try a lower optim.lr, train.amp=none, or check the "
                                     "data")

    def _log_steps(self, logger: MetricsLogger | None, bar, window: torch.Tensor, images_per_s: float,
                   size: int, bad_images: int) -> None:
        """One ``step`` record: mean loss over all ranks since the last record, lr, throughput."""
        if self.info.distributed:
            window = du.all_reduce_sum(window.to(self.device), self.info).cpu()
        record = {"epoch": self.epoch + 1, "step": self.step_in_epoch, "global_step": self.global_step,
                  "loss": float(window[0] / window[1]) if window[1] else float("nan"),
                  "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": images_per_s, "size": int(size),
                  "bad_images": bad_images}
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.0f}")
        if logger is not None:
            logger.log("step", **record)

    def _bn_batches(self, epoch: int):
        """Training images at the eval size, augmented like training (seeded), for BN re-estimation."""
        from ..data import sample_seed

        seed = self.cfg.train.seed
        keys = [(i, self.eval_size, sample_seed(seed, 10**6 + epoch, i)) for i in self.bn_indices]
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.eval_batch, sampler=keys,
                                             **self.loader_kw)
        for batch in loader:
            yield self.task.inputs(self.task.to_device(batch, self.device))

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated: the EMA's when EMA and ``train.eval_ema`` are on."""
        return self.ema.module if self.ema is not None and self.cfg.train.eval_ema else self.model

    def validate(self, epoch: int) -> dict:
        """BN re-estimation (if on), then the task's evaluation of :meth:`eval_model` (validation set)."""
        from .bn import reestimate_bn

        model, t = self.eval_model(), self.cfg.train
        n_bn = 0
        if t.bn_reestimate:
            with autocast(self.device, self.amp_dtype):
                n_bn = reestimate_bn(model, self._bn_batches(epoch), len(self.bn_indices), self.info,
                                     t.channels_last)
        metrics = self.task.evaluate(model, self.val_loader, self.amp_dtype)
        if self.task.metric not in metrics:
            raise QtvitError(f"task {self.task.name!r}: evaluate() returned no {self.task.metric!r} "
                             f"(got {', '.join(metrics)})")
        metrics["bn_images"] = n_bn * self.info.world_size
        metrics["ema"] = model is not self.model
        if self.main:
            which = " (EMA weights)" if metrics["ema"] else ""
            print(f"epoch {epoch + 1}/{t.epochs}: {self.task.describe(metrics)}{which}", flush=True)
        return metrics
