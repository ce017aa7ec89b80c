"""GPU checks (skipped without CUDA): QT-ViT-1 training throughput under bf16 autocast + channels_last,
and the trainer's GPU path (autocast, fp16 grad scaler, pinned memory) end to end.

Run on a GPU machine with ``pytest -q -s tests/test_train_gpu.py`` (``-s`` shows the numbers).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from test_train_support import TINY_RUN

from qtvit.train.config import load_config

pytestmark = pytest.mark.gpu


def _throughput(steps: int = 300, batch: int = 128, size: int = 224, warmup: int = 30) -> dict:
    """Images/s and peak memory of the QT-ViT-1 recipe's training step on random data."""
    from timm.loss import BinaryCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import dispatch_clip_grad

    from qtvit.train.ema import WarmupEma
    from qtvit.train.evaluate import build_model

    cfg = load_config("qtvit_1")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg.model, 1000).to(device).to(memory_format=torch.channels_last)
    ema = WarmupEma(model, cfg.train.ema_decay, cfg.train.ema_warmup_steps)
    opt = create_optimizer_v2(model, opt="adamw", lr=2.5e-4, weight_decay=0.1, betas=(0.9, 0.999))
    loss_fn = BinaryCrossEntropy(smoothing=0.1)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    losses = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + warmup):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        dispatch_clip_grad(model.parameters(), 2.0, mode="value")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step=step)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu()
    return {"model": "qtvit_1", "device": torch.cuda.get_device_name(), "batch": batch, "size": size,
            "steps": steps, "images_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": float(losses[:10].mean()), "last_loss": float(losses[-10:].mean()),
            "finite": bool(torch.isfinite(losses).all()), "torch": torch.__version__}


def test_qtvit_1_bf16_channels_last_training_throughput():
    result = _throughput()
    print("\nGPU", json.dumps(result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_throughput.json"), "w") as f:
            json.dump(result, f, indent=2)
    assert result["finite"]
    assert result["last_loss"] < result["first_loss"]  # one fixed batch: the step must learn it


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_runs_on_gpu_with_amp_and_channels_last(tmp_path, amp):
    from qtvit.train.trainer import Trainer

    cfg = load_config(None, TINY_RUN + [f"train.amp={amp}", "train.channels_last=true", "train.device=cuda",
                                        "data.num_workers=2", "train.epochs=2"])
    result = Trainer(cfg, tmp_path / "r").fit()
    assert result.status == "done" and result.metrics["images"] == 20
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (ckpt["scaler"].get("scale") is not None) == (amp == "fp16")
