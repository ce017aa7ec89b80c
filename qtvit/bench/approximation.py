"""``qtvit bench approximation``: how close is each kernel's attention to softmax's? (docs/BENCHMARKS.md)"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtvitError
from ..io import atomic_output, write_json
from ..kernels import attention, get_kernel, list_kernels
from ..models import create_model, read_state_dict
from ..train.evaluate import evaluate as evaluate_classifier
from ..train.task import Task
from . import env as bench_env
from .cli import add_benchmark, flag
from .plots import plot_approximation
from .runner import Echo, check, error_text, format_grid

SCHEMA_VERSION = 1
KL_FLOOR = 1e-12  # floor on a_ij inside KL(p‖a): an exact zero gives a large finite value


@dataclass(frozen=True)
class KernelCase:
    """A kernel with fixed parameters, as compared in the study (e.g. taylor2_chunk with chunks=4)."""

    kernel: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        kern = get_kernel(self.kernel)
        # the seed of taylor2_random and a reduction's default scaling stay out of the label
        fixed = {n: v for n, v in kern.resolve_params(self.params).items() if n not in kern.learnable
                 and n != "seed" and not (n == "scaling" and v == kern.params[n])}
        return self.kernel + ("(" + ", ".join(f"{n}={v}" for n, v in fixed.items()) + ")" if fixed else "")

    @property
    def text(self) -> str:
        """The command-line form :meth:`parse` reads back, e.g. ``taylor2_chunk:chunks=4``."""
        params = ";".join(f"{k}={v}" for k, v in self.params.items())
        return self.kernel + (f":{params}" if params else "")

    @staticmethod
    def parse(text: str) -> KernelCase:
        """``"taylor2_chunk"`` or ``"taylor2_chunk:chunks=4"`` → a case (unknown names, parameters raise)."""
        name, _, rest = text.partition(":")
        kern = get_kernel(name.strip())  # raises, listing the valid kernels
        params: dict[str, object] = {}
        for item in filter(None, (s.strip() for s in rest.split(";"))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq:
                raise ValueError(f"kernel parameter {item!r}: use name=value (e.g. taylor2_pool:pool=4)")
            try:
                params[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:  # a word (scaling=preserve)
                params[key] = value
        kern.resolve_params(params)  # unknown parameters raise
        return KernelCase(kern.name, params)


parse_case = KernelCase.parse
REDUCTION_SETTINGS = {"taylor2_pool": ({"pool": 2}, {"pool": 4}),
                      "taylor2_chunk": ({"chunks": 2}, {"chunks": 4}, {"chunks": 8}), "taylor2_random": ({},)}


def default_cases() -> list[KernelCase]:
    """Every registered kernel but the ``none`` control, and Table 3's taylor2 reductions in both scalings."""
    out = []
    for name in list_kernels():
        if name == "none":  # zero rows: nothing to compare
            continue
        out += [KernelCase(name, {**p, "scaling": sc}) for p in REDUCTION_SETTINGS.get(name, ())
                for sc in ("mean", "preserve")] or [KernelCase(name)]
    return out


@torch.no_grad()
def attention_distances(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: KernelCase) -> dict:
    """Distances (docs/BENCHMARKS.md) between ``case``'s attention and softmax's on q, k (B, H, N, d),
    v (B, H, N, e), in float64; ``kind`` is ``distribution``, ``signed`` or ``unnormalised``."""
    q, k, v = q.double(), k.double(), v.double()
    kern = get_kernel(case.kernel)
    params = kern.resolve_params(case.params)
    M = k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, M)
    p = torch.softmax(scores, dim=-1)
    reference = p @ v
    # softmax: p itself, exp(s) normalised without overflowing exp at large scales
    w = p if kern.name == "softmax" else kern.pairwise(q, k, **params)
    negative = float((w < 0).double().mean())
    degenerate = torch.zeros(w.shape[:-1], dtype=torch.bool)
    if kern.normalized:
        total = w.sum(-1, keepdim=True)
        bad = total <= 0
        a = torch.where(bad, torch.full_like(w, 1.0 / M), w / torch.where(bad, torch.ones_like(total), total))
        degenerate = bad.squeeze(-1)
        kind = "distribution" if negative == 0 else "signed"
    else:
        a = w * (kern.output_scale(M) if kern.output_scale is not None else 1.0)
        kind = "unnormalised"
    tv = 0.5 * (p - a).abs().sum(-1)  # (B, H, N)
    t2 = get_kernel("taylor2").pairwise(q, k)  # taylor2's rows: positive, so distributions
    tv_taylor2 = 0.5 * (t2 / t2.sum(-1, keepdim=True) - a).abs().sum(-1)
    notes = {"signed": f"not a distribution: {negative:.2%} of the weights are negative",
             "unnormalised": "unnormalised kernel: its coefficient rows are not distributions"}
    kl = (float((p * (torch.log(p.clamp_min(1e-300)) - torch.log(a.clamp_min(KL_FLOOR)))).sum(-1).mean())
          if kind == "distribution" else None)
    out = attention(q, k, v, case.kernel, impl="dense", **params)
    norm = torch.linalg.vector_norm
    err = float(norm(out - reference) / norm(reference).clamp_min(1e-300))
    return {"kind": kind, "kl": kl, "kl_note": notes.get(kind), "tv": float(tv.mean()),
            "tv_max": float(tv.max()), "out_rel_err": err, "negative_fraction": negative,
            "tv_taylor2": float(tv_taylor2.mean()), "degenerate_fraction": float(degenerate.double().mean())}


def _case_entry(case: KernelCase) -> dict:
    return {"case": case.label, "kernel": case.kernel, "params": case.params}


def _safe_distances(q, k, v, case: KernelCase) -> dict:
    try:
        return attention_distances(q, k, v, case)
    except (ValueError, RuntimeError, TypeError) as err:  # e.g. pool/chunks not dividing the head dim
        return {"error": error_text(err)}


def random_study(cases: Sequence[KernelCase], scales: Sequence[float], batch: int = 2, heads: int = 4,
                 tokens: int = 196, head_dim: int = 32, seed: int = 0) -> list[dict]:
    """Distances on random normal q, k whose scores have std ``scale``, for every case and scale."""
    rows = []
    for scale in scales:
        g = torch.Generator().manual_seed(seed + int(scale * 1000))
        sigma = math.sqrt(scale)  # Var(q·k/√d) = σ⁴ for i.i.d. N(0, σ²) entries, so std(s) = σ²
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g, dtype=torch.float64) * std
                   for std in (sigma, sigma, 1.0))
        score_std = float((q @ k.transpose(-1, -2) / math.sqrt(head_dim)).std())
        rows += [{**_case_entry(case), "scale": scale, "score_std": score_std,
                  **_safe_distances(q, k, v, case)} for case in cases]
    return rows


# Colours of the squares (RGB in the normalised input scale); the background is N(0, 0.3²) noise.
PAIR_COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]) * 1.5
PAIR_CLASSES = 2


def pair_images(n: int, image_size: int, patch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The relation task: images (n, 3, S, S) of noise with two squares on distinct patch cells, coloured
    from :data:`PAIR_COLOURS`, and labels (n,), 1 = same colour, alternating 0, 1; deterministic."""
    g = torch.Generator().manual_seed(seed)
    grid = image_size // patch_size
    if grid * grid < 2:
        raise ValueError(f"image_size {image_size} with patch {patch_size} leaves fewer than 2 cells")
    x = 0.3 * torch.randn(n, 3, image_size, image_size, generator=g)
    cells = torch.rand(n, grid * grid, generator=g).argsort(dim=1)[:, :2]  # (n, 2) distinct cells
    k = len(PAIR_COLOURS)
    colour_a = torch.randint(0, k, (n,), generator=g)
    same = torch.arange(n) % PAIR_CLASSES
    colour_b = torch.where(same.bool(), colour_a, (colour_a + torch.randint(1, k, (n,), generator=g)) % k)
    for which, colours in ((0, colour_a), (1, colour_b)):
        rows, cols = (cells[:, which] // grid).tolist(), (cells[:, which] % grid).tolist()
        for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
            x[i, :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = (
                PAIR_COLOURS[colours[i]].view(3, 1, 1))
    return x, same


class PairTask(Task):
    """The pair task (:func:`pair_images`) for the project's Trainer; ``approx``: the study's config."""

    name = "approximation-pairs"
    metric = "top1"

    def __init__(self, cfg, info, approx: ApproximationConfig) -> None:
        super().__init__(cfg, info)
        self.approx = approx

    def load_data(self, seed: int) -> list[str]:
        self.train, self.val = (pair_images(n, self.approx.image_size, self.approx.patch_size, seed + i)
                                for i, n in enumerate((self.approx.train_images, self.approx.eval_images)))
        return ["differ", "match"]

    def build_model(self, num_classes: int) -> nn.Module:
        return create_model(self.approx.model, kernel="softmax", num_classes=num_classes,
                            img_size=self.approx.image_size, patch_size=self.approx.patch_size)

    def train_dataset(self, model: nn.Module):
        return _KeyedPairs(*self.train)

    def val_dataset(self, model: nn.Module):  # (image, label, bad) as the Trainer's evaluate() reads
        return torch.utils.data.TensorDataset(*self.val, torch.zeros(len(self.val[1]), dtype=torch.long))

    def train_sizes(self) -> list[int]:
        return [self.approx.image_size]

    def training_loss(self, net: nn.Module, batch, step) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y)

    def evaluate(self, model: nn.Module, loader, amp_dtype) -> dict:
        return evaluate_classifier(model, loader, self.device, self.info, amp_dtype)


class _KeyedPairs(torch.utils.data.TensorDataset):
    """Tensors indexed by the Trainer's sampler keys (index, size, seed); no augmentation."""

    def __getitem__(self, key):
        return super().__getitem__(key[0] if isinstance(key, tuple) else key)


def train_softmax_vit(config: ApproximationConfig) -> tuple[nn.Module, dict]:
    """Train ``config.model`` with softmax attention on :func:`pair_images` with the project's Trainer."""
    from ..train.config import load_config
    from ..train.trainer import Trainer

    per_epoch = max(1, config.train_images // config.train_batch)  # the sampler's full batches
    epochs = max(1, math.ceil(config.train_steps / per_epoch))
    steps = max(1, math.ceil(config.train_steps / epochs))  # per epoch
    cfg = load_config(None, [
        f"model.name={config.model}", "model.kernel=softmax", f"train.seed={config.seed}",
        f"train.epochs={epochs}", f"train.eval_interval={epochs}", f"train.batch_size={config.train_batch}",
        f"train.max_steps_per_epoch={steps}",
        "train.ema=false", "train.bn_reestimate=false", "train.device=cpu", f"optim.lr={config.lr}",
        "optim.weight_decay=0.05", "optim.warmup_epochs=0.1", "optim.clip_grad=0", "data.num_workers=0",
        "run.save_best=false", f"run.progress={str(config.progress and sys.stderr.isatty()).lower()}",
        f"run.log_interval={max(1, epochs * steps // 5)}"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qtvit-approximation-") as run_dir:
        trainer = Trainer(cfg, run_dir, command="qtvit bench approximation",
                          task=lambda c, info: PairTask(c, info, config))
        fit = trainer.fit()
        if fit.status != "done":  # a signal: no study on a half-trained model
            raise QtvitError(f"training the softmax ViT was {fit.status} at step {fit.global_step}")
        model = trainer.model.eval()
    return model, {"steps": fit.global_step, "batch": config.train_batch, "lr": config.lr,
                   "train_images": config.train_images, "image_size": config.image_size,
                   "patch_size": config.patch_size, "val_accuracy": fit.metrics.get("top1", 0.0) / 100.0,
                   "chance": 1 / PAIR_CLASSES, "seconds": round(time.perf_counter() - start, 1)}


def load_softmax_vit(config: ApproximationConfig, path: str | Path) -> tuple[nn.Module, dict]:
    """A softmax ViT from a state dict; class count, patch and image size are read from its shapes."""
    sd = read_state_dict(path)
    try:
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
        classes = int(sd["head.weight"].shape[0])
        n_prefix = 1 if "cls_token" in sd else 0
        grid = math.isqrt(int(sd["pos_embed"].shape[1]) - n_prefix)
    except KeyError as err:
        raise ValueError(f"{path}: not a plain-ViT state dict (no {err.args[0]!r})") from None
    model = create_model(config.model, kernel="softmax", num_classes=classes, img_size=grid * patch,
                         patch_size=patch, **({} if n_prefix else {"global_pool": "avg"}))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {config.model} with softmax attention: missing "
                         f"{', '.join(missing[:5]) or 'none'}; "
                         f"unexpected {', '.join(unexpected[:5]) or 'none'}")
    return model.eval(), {"checkpoint": str(path), "image_size": grid * patch, "patch_size": patch}


@torch.no_grad()
def capture_qkv(model: nn.Module, images: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) of every block's attention, each (B, H, T, d), via forward hooks on ``attn.qkv`` (the
    ``KernelAttention``/timm layout: (B, T, 3·H·d) → (3, B, H, T, d), then ``q_norm``/``k_norm``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise ValueError(f"{type(model).__name__} has no blocks[i].attn.qkv to hook")
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(_module, _inputs, out: torch.Tensor, attn: nn.Module) -> None:
        B, T, _ = out.shape
        q, k, v = out.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        captured.append((attn.q_norm(q), attn.k_norm(k), v))

    handles = [blk.attn.qkv.register_forward_hook(functools.partial(hook, attn=blk.attn)) for blk in blocks]
    try:
        model.eval()
        model(images)
    finally:
        for h in handles:
            h.remove()
    return captured


def trained_study(cases: Sequence[KernelCase], model: nn.Module, images: torch.Tensor) -> dict:
    """Per block and case distances on the model's own q/k/v, plus the mean over blocks per case."""
    blocks = []
    for i, (q, k, v) in enumerate(capture_qkv(model, images)):
        score_std = float((q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).std())
        blocks.append({"block": i, "score_std": score_std,
                       "cases": [{**_case_entry(c), **_safe_distances(q, k, v, c)} for c in cases]})
    summary = [_summarise(case, [b["cases"][j] for b in blocks]) for j, case in enumerate(cases)]
    stds = [b["score_std"] for b in blocks]
    return {"blocks": blocks, "summary": summary, "score_std_mean": fmean(stds) if stds else None}


def _summarise(case: KernelCase, per_block: list[dict]) -> dict:
    """One case over the blocks: means (KL only where every block has one), worst TV, the first error."""
    errors = [e["error"] for e in per_block if "error" in e]
    if errors:
        return {**_case_entry(case), "error": errors[0]}
    kls, kinds = [e["kl"] for e in per_block], {e["kind"] for e in per_block}
    means = ("tv", "tv_taylor2", "out_rel_err", "negative_fraction", "degenerate_fraction")
    return {**_case_entry(case), **{key: fmean(e[key] for e in per_block) for key in means},
            "tv_max": max(e["tv_max"] for e in per_block), "kl": None if None in kls else fmean(kls),
            "kl_note": next((e["kl_note"] for e in per_block if e["kl_note"]), None),
            "kind": kinds.pop() if len(kinds) == 1 else "signed"}


@dataclass(frozen=True)
class ApproximationConfig:
    """Settings of one approximation study (the CLI flags map onto these fields)."""

    FLAG_NAMES: ClassVar[dict[str, str]] = {"cases": "kernels"}

    cases: tuple[KernelCase, ...] | None = flag(None, "kernels, optionally with parameters: "
                                                 "taylor2_pool:pool=4 (default: all + Table 3's)")
    scales: tuple[float, ...] = flag((0.1, 0.25, 0.5, 1.0, 2.0, 4.0), "score stds of the random study")
    batch: int = 2
    heads: int = 4
    tokens: int = flag(196, "tokens of the random study")
    head_dim: int = flag(32, "head dim of the random study")
    trained: bool = flag(True, "compare on a trained ViT's q/k too")
    model: str = "qtvit_vit_micro"
    checkpoint: str | None = flag(None, "a trained softmax qtvit_vit_* state dict (skips training)")
    train_steps: int = flag(500, "training steps of the softmax ViT")
    train_batch: int = 64
    train_images: int = 8000
    image_size: int = 32
    patch_size: int = 4
    lr: float = 2e-3
    eval_images: int = 64
    seed: int = 0
    progress: bool = flag(True, "show progress lines on stderr")

    def case_list(self) -> list[KernelCase]:
        return list(self.cases) if self.cases is not None else default_cases()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        for case in self.case_list():
            get_kernel(case.kernel).resolve_params(case.params)
        check(self, "> 0", "scales")
        check(self, "≥ 1", "batch", "heads", "tokens", "head_dim", "train_batch", "train_images",
              "eval_images", "image_size", "patch_size")
        check(self, "≥ 0", "train_steps")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist")


# `--quick`: 3 scales, 64 tokens, 20 training steps
QUICK = ApproximationConfig(scales=(0.1, 1.0, 4.0), tokens=64, head_dim=16, train_steps=20, train_batch=32,
                            train_images=200, eval_images=16)

def run_approximation_study(config: ApproximationConfig | None = None, echo: Echo | None = None,
                            output: str | Path | None = None, save_checkpoint: str | Path | None = None
                            ) -> dict:
    """Run the study and return its document (``env``, ``config``, ``random``, ``trained``); with ``output``
    also write it there (JSON)."""
    config = config or ApproximationConfig()
    config.validate()
    cases = config.case_list()

    def log(text: str) -> None:
        if config.progress:
            print(f"[bench approximation] {text}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    log(f"random q/k: {len(cases)} kernels × {len(config.scales)} scales")
    doc = {"benchmark": "approximation", "schema_version": SCHEMA_VERSION,
           "env": bench_env.collect_environment(torch.device("cpu"), torch.float64),
           "config": {**asdict(config), "cases": [_case_entry(c) for c in cases], "kl_floor": KL_FLOOR},
           "random": random_study(cases, config.scales, config.batch, config.heads, config.tokens,
                                  config.head_dim, config.seed), "trained": None, "elapsed_seconds": 0.0}
    if config.trained:
        if config.checkpoint:
            log(f"loading {config.checkpoint}")
            model, info = load_softmax_vit(config, config.checkpoint)
            info["source"] = "checkpoint"
        else:
            log(f"training {config.model} (softmax) for {config.train_steps} steps on the pair task")
            model, info = train_softmax_vit(config)
            info["source"] = "trained here"
            if save_checkpoint is not None:
                with atomic_output(save_checkpoint) as tmp:
                    torch.save(model.state_dict(), tmp)
                info["saved_to"] = str(save_checkpoint)
        images, _ = pair_images(config.eval_images, info["image_size"], info["patch_size"], config.seed + 1)
        log(f"comparing kernels on its q/k ({config.eval_images} validation images)")
        doc["trained"] = {"model": config.model, **info, **trained_study(cases, model, images)}
    doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    if output:
        write_json(doc, output)
    for line in format_tables(doc) if echo else []:
        echo(line)
    return doc


def _fmt(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.2e}" if x < 1e-2 or x >= 100 else f"{x:.3f}"


def format_tables(doc: dict) -> list[str]:
    """Random study (TV and output error per scale) and trained study (all metrics) as text."""
    lines = ["qtvit bench approximation: distance of each kernel's attention from softmax's", ""]
    rows = {(r["case"], r["scale"]): r for r in doc["random"]}
    scales = list(dict.fromkeys(s for _, s in rows))
    cases = list(dict.fromkeys(c for c, _ in rows))
    for metric, title in (("tv", "total variation ½Σ|p−a| from softmax (L1/2 for signed/unnormalised rows)"),
                          ("tv_taylor2", "the same distance from taylor2's rows"),
                          ("negative_fraction", "fraction of negative weights"),
                          ("out_rel_err", "relative output error ‖out−PV‖/‖PV‖")):
        lines.append(f"random q/k, {title}; columns: std of the scores q·k/√d")
        lines += ["  " + line for line in format_grid(["kernel"] + [f"{s:g}" for s in scales], [
            [case] + ["error" if "error" in rows[case, s] else _fmt(rows[case, s][metric]) for s in scales]
            for case in cases])] + [""]
    trained = doc.get("trained")
    if trained:
        where = (f"trained here, {trained['steps']} steps, val accuracy {trained['val_accuracy']:.1%} "
                 f"(chance {trained['chance']:.0%})" if trained.get("source") == "trained here"
                 else f"from {trained.get('checkpoint')}")
        lines.append(f"trained softmax {trained['model']} ({where}); mean over {len(trained['blocks'])} "
                     f"blocks, score std ≈ {trained['score_std_mean']:.3g}")
        lines += ["  " + line for line in format_grid(
            ["kernel", "KL", "TV", "TV max", "TV t2", "out err", "neg w", "degen"],
            [[r["case"], f"error: {r['error']}", *[""] * 6] if "error" in r else
             [r["case"], *(_fmt(r[k]) for k in ("kl", "tv", "tv_max", "tv_taylor2", "out_rel_err")),
              f"{r['negative_fraction']:.1%}", f"{r['degenerate_fraction']:.1%}"]
             for r in trained["summary"]])]
        lines.append("  KL is '-' where rows are not distributions (unnormalised kernels, negative weights).")
    return lines


def register(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qtvit bench approximation``."""
    p = add_benchmark(bench_subparsers, "approximation", help="distance of each kernel's attention rows from "
                      "softmax's", doc=__doc__, config_class=ApproximationConfig, quick=QUICK,
                      run=lambda config, args: run_approximation_study(config, print, args.output,
                                                                       args.save_checkpoint),
                      plot=("write the plot", plot_approximation))
    p.add_argument("--save-checkpoint", metavar="FILE", help="save the model trained here")
    return p
