"""The training loop end to end on a tiny real QT-ViT: learning, exact resume, signals, NaN handling."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train_support import AUGMENTED, assert_state_equal, load, make_trainer, optimizer_tensors, run

from qtvit.errors import QtvitError
from qtvit.train.metrics import read_metrics
from qtvit.train.trainer import NonFiniteLossError


def test_loss_decreases_and_outputs_are_written(tmp_path):
    result = run(tmp_path / "r", "train.epochs=4", "optim.lr=5e-3")
    assert result.status == "done" and result.epoch == 4
    losses = [r["loss"] for r in read_metrics(tmp_path / "r", "step")]
    assert len(losses) == 4 * 8  # 64 images / batch 8, one record per step
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics_step.csv", "metrics_eval.csv",
            "metrics.json", "curves.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes leave no temporaries
    assert (tmp_path / "r" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = read_metrics(tmp_path / "r", "eval")
    assert [e["epoch"] for e in evals] == [1, 2, 3, 4] and all(e["images"] == 20 for e in evals)


def test_two_epochs_equal_one_plus_resume_plus_one(tmp_path):
    """Everything random on; the resumed run must reproduce weights, EMA, optimizer, schedule, RNG."""
    straight = run(tmp_path / "a", *AUGMENTED)
    first = run(tmp_path / "b", *AUGMENTED, "train.epochs_per_run=1")
    assert first.status == "paused" and first.epoch == 1
    resumed = run(tmp_path / "b", resume=True)
    assert straight.status == resumed.status == "done"
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    assert a["global_step"] == b["global_step"] == 16
    assert_state_equal(a, b, atol=1e-6)
    for ta, tb in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        assert torch.allclose(ta, tb, rtol=0, atol=1e-6)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng_per_rank"][0]["torch"], b["rng_per_rank"][0]["torch"])
    # The logged losses agree step for step (the same samples, sizes and augmentations).
    la = [r["loss"] for r in read_metrics(tmp_path / "a", "step")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b", "step")]
    assert la == pytest.approx(lb, abs=1e-5)
    sizes = {r["size"] for r in read_metrics(tmp_path / "a", "step")}
    assert sizes == {32, 48}  # multi-resolution really was on


def test_sigterm_mid_epoch_saves_and_resume_is_exact(tmp_path, monkeypatch):
    straight = run(tmp_path / "a", *AUGMENTED)
    trainer = make_trainer(tmp_path / "b", *AUGMENTED)
    cls = type(trainer.scheduler)
    step_update = cls.step_update

    def kill_at_step_3(self, num_updates, metric=None):
        step_update(self, num_updates, metric)
        if num_updates == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the step finishes

    monkeypatch.setattr(cls, "step_update", kill_at_step_3)
    stopped = trainer.fit()
    monkeypatch.undo()
    assert stopped.status == "interrupted" and stopped.signal == signal.SIGTERM
    ckpt = load(tmp_path / "b" / "last.pt")
    # The flag is read by the next step's collective: that step completes, then the run saves.
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, 4, 4)
    assert signal.getsignal(signal.SIGTERM) is not trainer._handle_signal  # handlers restored
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.status == straight.status == "done"
    assert_state_equal(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"), atol=1e-6)


def test_non_finite_loss_skips_then_stops_with_checkpoint_intact(tmp_path, capsys):
    run(tmp_path / "r", "train.epochs=3", "train.epochs_per_run=1", "train.max_bad_steps=3")
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    trainer = make_trainer(tmp_path / "r", resume=True)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss_fn = trainer.task.loss_fn
    calls = {"n": 0}

    def nan_after_one(out, target):
        calls["n"] += 1
        loss = loss_fn(out, target)
        return loss if calls["n"] == 1 else loss * float("nan")

    trainer.task.loss_fn = nan_after_one
    expected = r"3 consecutive steps.*last good checkpoint .*last.pt is untouched"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit()
    assert capsys.readouterr().out.count("non-finite loss") == 3  # one warning per skipped step
    assert last.read_bytes() == before
    # 8 steps of epoch 1, one finite step, two skipped; the third non-finite step stops the run.
    assert trainer.global_step == 8 + 1 + 2
    # The finite step changed the weights; a NaN step taken would have made them NaN.
    after = trainer.model.state_dict()
    assert not torch.equal(after["head.classifier.4.weight"], weights["head.classifier.4.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_existing_run_folder_is_never_reused_silently(tmp_path):
    run(tmp_path / "r", "train.epochs=1")
    with pytest.raises(QtvitError, match="already exists.*--resume.*--overwrite"):
        make_trainer(tmp_path / "r", "train.epochs=1")
    (tmp_path / "r" / "notes.txt").write_text("mine")
    make_trainer(tmp_path / "r", "train.epochs=1", overwrite=True)
    assert not (tmp_path / "r" / "last.pt").exists()  # the run's own files are gone ...
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # ... the user's are not
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        make_trainer(tmp_path / "none", resume=True)


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    """1 × batch 8 ≡ 1 × batch 4 × 2 accumulation steps, for a model without batch statistics."""
    vit = ["model.name=qtvit_vit_micro", "model.kwargs={img_size: 32, patch_size: 8}", "train.epochs=1",
           "train.ema=false", "train.bn_reestimate=false"]
    run(tmp_path / "big", *vit)
    run(tmp_path / "acc", *vit, "train.batch_size=4", "train.accum_steps=2")
    assert_state_equal(load(tmp_path / "big" / "last.pt"), load(tmp_path / "acc" / "last.pt"), atol=2e-6,
                       keys=("model",))


def test_ema_self_distillation_starts_at_its_fraction_of_training(tmp_path):
    trainer = make_trainer(tmp_path / "r", "train.distill_ratio=2.0", "train.distill_start=0.5")
    distill_fn, calls = trainer.task.distill_fn, []

    def spy(out, target):
        calls.append(trainer.global_step)
        assert target.min() >= 0 and target.max() <= 1  # sigmoid of the EMA's logits
        return distill_fn(out, target)

    trainer.task.distill_fn = spy
    trainer.fit()
    assert calls == list(range(8, 16))  # 2 epochs × 8 steps; from 50% of the 16 steps on


def test_resolved_config_is_written_and_reloads_identically(tmp_path):
    trainer = make_trainer(tmp_path / "r", "train.epochs=1")
    trainer.fit()
    from qtvit.train.config import load_config

    assert load_config(tmp_path / "r" / "config.yaml") == trainer.cfg
