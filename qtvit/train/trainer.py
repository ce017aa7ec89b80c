"""The training loop: one code path from one CPU process to many GPUs on many nodes.

Per optimizer step: ``accum_steps`` micro-batches (all at the step's resolution) → mixup/cutmix →
forward under autocast → BCE (+ EMA self-distillation late in training, L models) → backward
(gradients all-reduced by DDP on the last micro-batch only) → unscale → clip by value → AdamW →
EMA update with warm-up → per-step schedule. Per epoch: BN re-estimation on training images,
evaluation, checkpoint (``last.pt``; ``best.pt`` on a new best top-1).

Robustness: a non-finite loss skips the step with a warning; ``train.max_bad_steps`` in a row stop
the run, the last checkpoint untouched. SIGTERM/SIGINT finish the step, save ``last.pt`` with the
position inside the epoch and return; ``resume=True`` continues exactly where it stopped (same
samples, resolutions, augmentations, random streams, schedule and EMA).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import QtvitError
from . import distributed as du
from .config import Config
from .evaluate import autocast, build_model, evaluate, load_weights
from .metrics import MetricsLogger
from .state import CHECKPOINT_VERSION, capture_rng, load_training_checkpoint, restore_rng, save_atomic

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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, resume: bool = False,
                 overwrite: bool = False, checkpoint: dict | None = None,
                 command: str = "qtvit train") -> None:
        self.cfg, self.run_dir, self.resume, self.command = cfg, Path(run_dir), resume, command
        self.info = du.setup(cfg.train.device)
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
        train_base, val_base = self._load_datasets()
        if ckpt is not None and list(ckpt["classes"]) != list(self.classes):
            raise QtvitError(f"the data's classes differ from the checkpoint's ({len(self.classes)} vs "
                             f"{len(ckpt['classes'])}): resume with the data the run started with")
        self._build_model()
        self._build_loaders(train_base, val_base)
        self._build_optimization()
        # Position (the next step to take) and bookkeeping.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1, self.last_metrics = -1.0, {}
        rank_rng = self._restore(ckpt) if ckpt is not None else None
        if rank_rng is None:
            # Each rank its own stream for dropout, drop-path and mixup (after the shared init).
            _seed_everything(cfg.train.seed * 1000 + self.info.rank + 1)

    # ------------------------------------------------------------------------------------ setup
    def _load_datasets(self):
        """The train/val sets of PIL images (sets ``self.classes``)."""
        from ..data import build_datasets

        d, t = self.cfg.data, self.cfg.train
        train_base, val_base, self.classes = build_datasets(
            d.dataset, d.path, train_split=d.train_split, val_split=d.val_split, val_fraction=d.val_fraction,
            seed=t.seed, demo_image_size=d.demo_image_size, demo_train_size=d.demo_train_size,
            demo_val_size=d.demo_val_size, demo_cache=d.demo_cache)
        return train_base, val_base

    def _build_model(self) -> None:
        from .ema import WarmupEma

        cfg, t = self.cfg, self.cfg.train
        _seed_everything(t.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, len(self.classes))
        if cfg.model.init_checkpoint:
            load_weights(model, cfg.model.init_checkpoint, new_classifier_ok=True)
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

    def _build_loaders(self, train_base, val_base) -> None:
        """Transforms from the model's pretrained_cfg, the global-batch sampler and the loaders."""
        from ..data import (
            AugmentedDataset,
            GlobalBatchSampler,
            ShardSampler,
            TrainAugment,
            data_config,
            eval_transform,
            train_transforms,
        )

        d, a, t, info = self.cfg.data, self.cfg.aug, self.cfg.train, self.info
        self.data_cfg = data_config(self.model)
        self.eval_size = t.eval_size or int(self.data_cfg["input_size"][-1])
        sizes = list(a.train_sizes) if a.multi_res else [self.eval_size]
        augment = TrainAugment(
            scale=tuple(a.crop_scale) if a.crop_scale else None, hflip=a.hflip,
            randaug=f"rand-m{a.randaug_m}-n{a.randaug_n}-mstd{a.randaug_mstd}" if a.randaug else None,
            color_jitter=a.color_jitter, interpolation=a.train_interpolation, re_prob=a.re_prob,
            no_aug=a.no_aug)
        # One training transform per resolution, plus the eval size for BN re-estimation.
        tfs = train_transforms(self.data_cfg, sorted(set(sizes) | {self.eval_size}), augment)
        self.train_set = AugmentedDataset(train_base, tfs, d.skip_bad_images, seed_transforms=not a.no_aug)
        self.val_set = AugmentedDataset(val_base, eval_transform(self.data_cfg, self.eval_size),
                                        d.skip_bad_images)
        self.sampler = GlobalBatchSampler(len(self.train_set), t.batch_size, info.world_size, info.rank,
                                          t.accum_steps, sizes, shuffle=True, seed=t.seed,
                                          max_steps=t.max_steps_per_epoch)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * t.epochs
        self.loader_kw = dict(
            num_workers=d.num_workers, pin_memory=d.pin_memory and self.device.type == "cuda",
            worker_init_fn=_ignore_sigint,
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
        # BN re-estimation: a fixed subset of training images, this rank's share.
        n_bn = min(t.bn_images, len(self.train_set)) if t.bn_reestimate else 0
        perm = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(t.seed + 1))
        self.bn_indices = perm[:n_bn][info.rank::info.world_size].tolist()

    def _build_optimization(self) -> None:
        from timm.data import Mixup
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        t, o, a = self.cfg.train, self.cfg.optim, self.cfg.aug
        global_batch = t.batch_size * self.info.world_size * t.accum_steps
        self.lr = o.lr if o.lr is not None else o.base_lr * global_batch / o.base_batch
        # timm groups the parameters: no weight decay on 1-d tensors (norms, biases, scalars) and
        # on the model's no_weight_decay() names (the APEs).
        self.optimizer = create_optimizer_v2(self.model, opt=o.opt, lr=self.lr, weight_decay=o.weight_decay,
                                             betas=tuple(o.betas), eps=o.eps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=o.sched, num_epochs=t.epochs - o.warmup_epochs,
            warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr, min_lr=o.min_lr, warmup_prefix=True,
            step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.mixup = None
        if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                               num_classes=len(self.classes))
        if a.bce:
            # Integer targets are smoothed here; mixup's dense targets arrive smoothed already.
            self.loss_fn = BinaryCrossEntropy(smoothing=a.label_smoothing)
        elif self.mixup is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif a.label_smoothing:
            self.loss_fn = LabelSmoothingCrossEntropy(a.label_smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.distill_fn = BinaryCrossEntropy(smoothing=0.0)

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
        self.best_top1 = float(ckpt.get("best_top1", -1.0))
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
            "best_top1": self.best_top1, "metrics": self.last_metrics,
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
            write_text_atomic(self.run_dir / "config.yaml", self.cfg.to_yaml())
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
        print(f"qtvit train: {self.cfg.model.name} ({n_params / 1e6:.2f}M params, {len(self.classes)} "
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
            best = bool(metrics) and metrics["top1"] > self.best_top1
            if best:
                self.best_top1 = metrics["top1"]
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

    def _write_summary(self) -> None:
        """``metrics.json`` (``accuracy`` = final top-1 as a fraction) and ``curves.png``."""
        summary = {"accuracy": self.last_metrics.get("top1", 0.0) / 100.0, **self.last_metrics,
                   "best_top1": self.best_top1, "epochs": self.epoch, "global_step": self.global_step,
                   "model": self.cfg.model.name, "classes": len(self.classes)}
        write_text_atomic(self.run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        try:
            from .plot import plot_curves

            plot_curves(self.run_dir, self.run_dir / "curves.png")
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
        distill_from = int(t.distill_start * self.total_steps)
        try:
            for x, y, bad in self.train_loader:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                bad_images += int(bad.sum())
                images += x.shape[0] * self.info.world_size
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                target = y
                if self.mixup is not None:
                    x, target = self.mixup(x, y)
                last_micro = len(micro_losses) == t.accum_steps - 1
                # DDP all-reduces gradients on the last micro-batch of a step only.
                no_sync = self.info.distributed and not last_micro
                with self.net.no_sync() if no_sync else contextlib.nullcontext():
                    with autocast(self.device, self.amp_dtype):
                        out = self.net(x)
                        loss = self.loss_fn(out, target)
                        if t.distill_ratio > 0 and self.global_step >= distill_from:
                            with torch.no_grad():
                                teacher = self.ema.module(x)
                            loss = loss + t.distill_ratio * self.distill_fn(out, teacher.float().sigmoid())
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
                    self._log_steps(logger, bar, window, images / max(elapsed, 1e-9), x.shape[-1], bad_images)
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
        for x, _, _ in loader:
            yield x.to(self.device, non_blocking=True)

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated: the EMA's when EMA and ``train.eval_ema`` are on."""
        return self.ema.module if self.ema is not None and self.cfg.train.eval_ema else self.model

    def validate(self, epoch: int) -> dict:
        """BN re-estimation (if on), then top-1/top-5 on the validation set, of :meth:`eval_model`."""
        from .bn import reestimate_bn

        model, t = self.eval_model(), self.cfg.train
        n_bn = 0
        if t.bn_reestimate:
            with autocast(self.device, self.amp_dtype):
                n_bn = reestimate_bn(model, self._bn_batches(epoch), len(self.bn_indices), self.info,
                                     t.channels_last)
        metrics = evaluate(model, self.val_loader, self.device, self.info, self.amp_dtype, t.channels_last)
        metrics["bn_images"] = n_bn * self.info.world_size
        metrics["ema"] = model is not self.model
        if self.main:
            which = ", EMA" if metrics["ema"] else ""
            print(f"epoch {epoch + 1}/{t.epochs}: val top-1 {metrics['top1']:.2f}%  top-5 "
                  f"{metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['images']} images{which})",
                  flush=True)
        return metrics
