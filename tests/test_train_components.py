"""The recipe's parts in isolation: EMA warm-up, BN re-estimation, multi-resolution global batches,
optimizer groups, learning-rate scaling, and the per-model YAML recipes against docs/DESIGN.md §recipe."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from test_train_support import TINY_MODEL

from qtvit.data.sampling import GlobalBatchSampler, sample_seed, step_size
from qtvit.errors import QtvitError
from qtvit.train.bn import reestimate_bn
from qtvit.train.config import load_config
from qtvit.train.ema import WarmupEma, ema_decay


def test_ema_decay_follows_the_efficientvit_warmup():
    assert ema_decay(0, 0.9998, 4000) == 0.0  # the first update copies the model
    assert ema_decay(4000, 0.9998, 4000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    assert ema_decay(10**7, 0.9998, 4000) == pytest.approx(0.9998)
    assert ema_decay(5, 0.9998, None) == 0.9998


def test_ema_update_applies_that_decay_to_every_float_tensor():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WarmupEma(model, decay=0.9, warmup_steps=10)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model, step=7)
    d = 0.9 * (1 - math.exp(-0.7))
    for name, value in ema.module.state_dict().items():
        new = model.state_dict()[name]
        if value.is_floating_point():
            assert torch.allclose(value, d * old[name] + (1 - d) * new, atol=1e-6), name
        else:
            assert torch.equal(value, new), name


def test_bn_reestimation_averages_batch_statistics_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.9), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    model[0].running_mean.fill_(5.0)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(5)]
    used = reestimate_bn(model, iter(batches), max_images=12)  # three batches of four
    assert used == 12

    def per_batch_mean_var(xs):
        return (torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0),
                torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0))

    mean0, var0 = per_batch_mean_var(batches[:3])
    assert torch.allclose(model[0].running_mean, mean0, atol=1e-5)
    assert torch.allclose(model[0].running_var, var0, atol=1e-4)
    # The second BN saw conv(BN-with-batch-stats(x)) with dropout OFF: the network ran in eval mode.
    with torch.no_grad():
        bn0 = model[0]
        inner = [model[2](nn.functional.batch_norm(b, None, None, bn0.weight, bn0.bias, training=True))
                 for b in batches[:3]]
    mean3, var3 = per_batch_mean_var(inner)
    assert torch.allclose(model[3].running_mean, mean3, atol=1e-5)
    assert torch.allclose(model[3].running_var, var3, atol=1e-4)
    assert model.training and model[1].training  # modes restored
    assert model[0].momentum == 0.1 and model[3].momentum == 0.1  # momentum restored


def test_multi_resolution_sizes_are_shared_by_ranks_and_uniform():
    sizes = (128, 160, 192, 224)
    picks = [step_size(sizes, seed=3, epoch=1, step=s) for s in range(800)]
    assert set(picks) == set(sizes)
    counts = Counter(picks)
    assert all(150 < counts[s] < 250 for s in sizes), counts  # ~200 each
    assert picks == [step_size(sizes, seed=3, epoch=1, step=s) for s in range(800)]  # deterministic
    assert picks != [step_size(sizes, seed=3, epoch=2, step=s) for s in range(800)]  # new per epoch
    ranks = [list(GlobalBatchSampler(96, 4, world_size=3, rank=r, accum_steps=2, sizes=sizes, seed=3))
             for r in range(3)]
    for micro in zip(*ranks, strict=True):  # the r-th element of every rank's stream is the same step
        assert len({key[1] for batch in micro for key in batch}) == 1


def test_global_batches_do_not_depend_on_how_they_are_split():
    """2 ranks × batch 4 ≡ 1 rank × batch 4 × 2 accumulation ≡ 1 rank × batch 8, sample for sample."""
    def steps(world, accum, batch):
        streams = [list(GlobalBatchSampler(50, batch, world, r, accum, sizes=(32, 48), seed=1))
                   for r in range(world)]
        out = []
        for s in range(len(streams[0]) // accum):
            keys = []
            for a in range(accum):
                for r in range(world):
                    keys += streams[r][s * accum + a]
            out.append(keys)
        return out

    a, b, c = steps(2, 1, 4), steps(1, 2, 4), steps(1, 1, 8)
    assert a == b == c and len(a) == 50 // 8
    assert len({k[0] for step in a for k in step}) == 6 * 8  # no index twice in an epoch
    assert a[0][0][2] == sample_seed(1, 0, a[0][0][0])  # augmentation seed from (seed, epoch, index)


def test_sampler_resumes_mid_epoch_and_caps_steps():
    full = list(GlobalBatchSampler(40, 4, seed=5))
    sampler = GlobalBatchSampler(40, 4, seed=5)
    sampler.set_epoch(0, start_step=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3
    assert len(list(GlobalBatchSampler(40, 4, seed=5, max_steps=2))) == 2


def _decay_groups(trainer) -> tuple[list[str], list[str]]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups}
    assert set(groups) == {0.0, 0.1}
    assert len(groups[0.0]) + len(groups[0.1]) == len(names)  # every parameter in exactly one group
    return groups[0.1], groups[0.0]


def test_weight_decay_follows_the_authors_rule_by_default(tmp_path):
    """Released recipe: all but biases and norm layers, so APE, const and the shortcut BN weight decay."""
    from test_train_support import TINY_RUN

    from qtvit.train.trainer import Trainer

    trainer = Trainer(load_config(None, TINY_RUN + ["train.epochs=1"]), tmp_path / "r")
    decay, no_decay = _decay_groups(trainer)
    assert any(n.endswith(".ape") for n in decay) and any("kernel_params.const" in n for n in decay)
    assert any(n.endswith("v_norm.weight") for n in decay)
    assert any(n.endswith("v_norm.bias") for n in no_decay)
    modules = dict(trainer.model.named_modules())
    for n in no_decay:
        owner = modules[n.rsplit(".", 1)[0]]
        assert n.endswith(".bias") or "Norm" in type(owner).__name__, n
    for n in decay:
        assert not n.endswith(".bias") and (n.endswith("v_norm.weight") or "Norm" not in
                                            type(modules[n.rsplit(".", 1)[0]]).__name__), n
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.999)


def test_timm_decay_rule_excludes_norms_biases_apes_and_kernel_scalars(tmp_path):
    from test_train_support import TINY_RUN

    from qtvit.train.trainer import Trainer

    cfg = load_config(None, TINY_RUN + ["train.epochs=1", "optim.decay_rule=timm"])
    trainer = Trainer(cfg, tmp_path / "r")
    decay, no_decay = _decay_groups(trainer)
    assert any(n.endswith(".ape") for n in no_decay) and any("kernel_params.const" in n for n in no_decay)
    params = dict(trainer.model.named_parameters())
    for n in decay:
        assert params[n].ndim >= 2 and not n.endswith(".ape"), n


def test_unknown_decay_rule_is_a_one_line_error():
    with pytest.raises(QtvitError, match="optim.decay_rule='none' is not valid; choose from authors, timm"):
        load_config(None, ["optim.decay_rule=none"])


def test_lr_scales_with_the_global_batch(tmp_path):
    from test_train_support import TINY_RUN

    from qtvit.train.trainer import Trainer

    cfg = load_config(None, TINY_RUN + ["optim.lr=null", "train.batch_size=4", "train.accum_steps=2",
                                        "train.epochs=1"])
    trainer = Trainer(cfg, tmp_path / "r")
    assert trainer.lr == pytest.approx(2.5e-4 * 8 / 128)


# docs/DESIGN.md §recipe, per model: mixup α, RandAugment (n, m), drop path, random erasing, lr per 128,
# distill r
RECIPE_TABLE = {
    "qtvit_1": ("qtvit_b1", 0.1, (1, 3), 0.05, 0.0, 2.5e-4, 0.0),
    "qtvit_2": ("qtvit_b2", 0.1, (1, 3), 0.05, 0.0, 2.5e-4, 0.0),
    "qtvit_3": ("qtvit_b3", 0.3, (2, 6), 0.1, 0.0, 2.5e-4, 0.0),
    "qtvit_4": ("qtvit_l1", 0.2, (2, 5), 0.1, 0.2, 1.5e-4, 2.0),
    "qtvit_5": ("qtvit_l2", 0.4, (2, 5), 0.1, 0.2, 1.5e-4, 2.75),
    "qtvit_6": ("qtvit_l3", 0.6, (2, 6), 0.1, 0.2, 1.5e-4, 3.5),
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_TABLE))
def test_recipes_state_the_papers_values(recipe):
    name, alpha, (n, m), drop_path, re_prob, base_lr, distill = RECIPE_TABLE[recipe]
    cfg = load_config(recipe)
    assert cfg.model.name == name and cfg.model.drop_path_rate == drop_path
    assert cfg.aug.mixup_alpha == cfg.aug.cutmix_alpha == alpha
    assert (cfg.aug.randaug_n, cfg.aug.randaug_m) == (n, m) and cfg.aug.randaug
    assert cfg.aug.re_prob == re_prob and cfg.aug.label_smoothing == 0.1 and cfg.aug.bce
    assert cfg.aug.train_sizes == [128, 160, 192, 224] and cfg.aug.multi_res
    assert cfg.optim.base_lr == base_lr and cfg.optim.base_batch == 128 and cfg.optim.lr is None
    assert (cfg.optim.opt, cfg.optim.betas, cfg.optim.weight_decay) == ("adamw", [0.9, 0.999], 0.1)
    assert (cfg.optim.clip_grad, cfg.optim.clip_mode, cfg.optim.sched) == (2.0, "value", "cosine")
    assert (cfg.train.epochs, cfg.optim.warmup_epochs) == (320, 20)
    assert (cfg.train.ema_decay, cfg.train.ema_warmup_steps, cfg.train.bn_images) == (0.9998, 4000, 16000)
    assert cfg.train.distill_ratio == distill and (distill == 0 or cfg.train.distill_start == 0.25)


def test_tiny_model_override_is_a_real_qt_vit():
    cfg = load_config(None, TINY_MODEL)
    from qtvit.train.evaluate import build_model

    model = build_model(cfg.model, 16)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert any(n.endswith(".ape") for n, _ in model.named_parameters())
    assert any("kernel_params.const" in n for n, _ in model.named_parameters())


def test_poly_schedule_takes_the_configured_power(tmp_path):
    """mmseg's poly schedule has power 1.0 (linear decay); timm's default power is 0.1."""
    from test_train_support import TINY_RUN

    from qtvit.train.trainer import Trainer

    cfg = load_config(None, TINY_RUN + ["optim.sched=poly", "optim.decay_rate=1.0", "optim.warmup_epochs=0",
                                        "optim.min_lr=0", "train.epochs=4"])
    trainer = Trainer(cfg, tmp_path / "r")
    total = trainer.total_steps
    lrs = [trainer.scheduler._get_lr(step)[0] for step in (0, total // 2, total)]
    assert lrs[0] == pytest.approx(trainer.lr)
    assert lrs[1] == pytest.approx(trainer.lr / 2, rel=0.05)  # halfway: half the lr at power 1
    assert lrs[2] == pytest.approx(0.0, abs=1e-9)
