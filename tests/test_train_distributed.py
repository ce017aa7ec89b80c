"""A real 2-process gloo run under torchrun equals the single-process run of the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train_support import TINY_RUN, assert_state_equal, load, run


def _parameters_only(ckpt: dict, names: set[str]) -> dict:
    """Model and EMA parameters (BN running statistics legitimately differ: see the test)."""
    return {k: {n: v for n, v in ckpt[k].items() if n in names} for k in ("model", "ema")}


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # 2 processes × batch 4 vs 1 process × batch 4 × 2 accumulation steps: the global sampler
    # gives both the same micro-batches, so even BatchNorm sees the same samples.
    overrides = [*TINY_RUN, "train.epochs=2", "train.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qtvit", "train", "--output", str(tmp_path / "ddp"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("qtvit train: classification, qtvit_b0") == 1  # only rank 0 talks
    assert "on 2× cpu" in proc.stdout

    # Same thread count as the torchrun workers: AdamW's first steps move parameters whose
    # gradient is ~0 by ±lr·sign(g), so summation-order noise from other thread counts would
    # show up as ~1e-3 differences that say nothing about the distributed semantics.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tmp_path / "one", *overrides, "train.accum_steps=2")
    finally:
        torch.set_num_threads(threads)
    ddp, one = load(tmp_path / "ddp" / "last.pt"), load(tmp_path / "one" / "last.pt")
    assert ddp["global_step"] == one["global_step"] == 2 * 64 // 8
    assert len(ddp["rng_per_rank"]) == 2 and len(one["rng_per_rank"]) == 1
    import qtvit  # noqa: F401  (the parameter names come from the model itself)
    from qtvit.train.config import config_from_dict
    from qtvit.train.evaluate import build_model

    names = {n for n, _ in build_model(config_from_dict(one["config"]).model, 16).named_parameters()}
    # DDP averages (g0 + g1)/2, accumulation sums g0/2 + g1/2: equal up to float rounding.
    assert_state_equal(_parameters_only(ddp, names), _parameters_only(one, names), atol=2e-5)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "step" for r in records) == 16  # written once, by rank 0
    assert sum(r["kind"] == "eval" for r in records) == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
