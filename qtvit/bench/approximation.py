"""``qtvit bench approximation``: how close is each kernel's attention to softmax's?

For queries/keys/values q, k, v (B, H, N, d) the reference is softmax attention: rows
p_i = softmax_j(q_i·k_j/√d), output PV. Each kernel gives coefficient rows a_i, the weights
with which v_j enters its output:
  * normalised kernels (all but cosine and mean): a_ij = w_ij / Σ_j w_ij, w from the kernel's
    dense reference ``get_kernel(name).pairwise``. A row whose total weight is ≤ 0 (ReLU with
    no overlap) has no distribution; it is counted in ``degenerate_fraction`` and taken as
    uniform for KL and TV (the layer itself outputs ≈ 0 there, which the output error sees);
  * unnormalised kernels (cosine: a = w/M; mean: a = q·k/M): a_ij = scale · w_ij, as in the
    kernel's output; these rows are not distributions (they can be negative, need not sum to 1).

Metrics, averaged over all rows (images, heads, queries):
  * ``tv``: ½ Σ_j |p_ij − a_ij| — the total-variation distance when a_i is a distribution; for
    signed or unnormalised rows the same formula (half the L1 distance of the coefficients);
  * ``kl``: KL(p_i ‖ a_i) = Σ_j p_ij log(p_ij / a_ij), only where every a_i is a distribution
    (normalised and no negative weight in this data): ``kl`` is null for cosine and mean, and for
    kernels whose weights went negative here (taylor2_random; the reduced taylor2 variants and
    qt_paper with β ≠ 0 can too), with ``kl_note`` saying why. a_ij is floored at 1e-12 so an
    exact zero (ReLU) gives a large finite value instead of infinity;
  * ``out_rel_err``: ‖out − PV‖ / ‖PV‖ with out = ``qtvit.attention(q, k, v, kernel,
    impl="dense")``, the kernel's real output: defined for every kernel;
  * ``negative_fraction``: share of weights w_ij < 0.

Two sources of q/k/v:
  (a) ``random``: i.i.d. normal q, k with variance √(scale), so the scores s = q·k/√d have std
      ``scale`` (taylor2 = 1 + s + s²/2 matches exp(s) up to O(s³): close at small scale,
      apart at large), v standard normal; float64.
  (b) ``trained``: a tiny softmax ViT (``qtvit_vit_micro`` with ``kernel="softmax"``, 32 px,
      patch 4) trained for a short run on a synthetic task that needs attention (or loaded with
      ``checkpoint``); forward hooks on every block's ``attn.qkv`` give its q, k, v on
      validation images, compared per block in float64. The task (:func:`pair_images`): two
      coloured patch-sized squares at random cells of a noisy image; the label says whether
      their colours match. Neither square alone tells, and they can be anywhere, so the model
      must relate two distant tokens — what attention is for. It reaches ~100% validation
      accuracy within the default 500 steps (a couple of minutes on 2 CPU cores).
The kernels' learnable parameters (qt's ``const``, qt_paper's α, β, γ) are at their initial
values: the question is how well each kernel, as defined, imitates softmax on the same q/k.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtvitError
from ..io import write_json
from ..kernels import attention, get_kernel, list_kernels
from ..models import create_model
from ..train.task import Task
from . import env as bench_env

SCHEMA_VERSION = 1
KL_FLOOR = 1e-12  # floor on a_ij inside KL(p‖a): an exact zero gives a large finite value
Echo = Callable[[str], None]


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
        if not fixed:
            return self.kernel
        return self.kernel + "(" + ", ".join(f"{n}={v}" for n, v in fixed.items()) + ")"


REDUCTION_SETTINGS = {"taylor2_pool": ({"pool": 2}, {"pool": 4}),
                      "taylor2_chunk": ({"chunks": 2}, {"chunks": 4}, {"chunks": 8}), "taylor2_random": ({},)}


def default_cases() -> list[KernelCase]:
    """Every registered kernel but the ``none`` control at its defaults; the taylor2 reductions at each
    Table-3 setting (pool 2, 4; chunks 2, 4, 8) in both scalings (``mean`` and ``preserve``)."""
    out = []
    for name in list_kernels():
        if name == "none":  # zero rows: nothing to compare
            continue
        out += [KernelCase(name, {**p, "scaling": sc}) for p in REDUCTION_SETTINGS.get(name, ())
                for sc in ("mean", "preserve")] or [KernelCase(name)]
    return out


def parse_case(text: str) -> KernelCase:
    """``"taylor2_chunk"`` or ``"taylor2_chunk:chunks=4"`` → a :class:`KernelCase` (unknown names raise)."""
    name, _, rest = text.partition(":")
    kern = get_kernel(name.strip())  # raises, listing the valid kernels
    params: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"kernel parameter {item!r}: use name=value (e.g. taylor2_pool:pool=4)")
        try:
            value = value.strip()
            params[key.strip()] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:  # a word (scaling=preserve)
            params[key.strip()] = value
    kern.resolve_params(params)  # unknown parameters raise
    return KernelCase(kern.name, params)


# ------------------------------------------------------------------------------------ metrics


@torch.no_grad()
def attention_distances(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: KernelCase) -> dict:
    """Distances between ``case``'s attention and softmax's on q, k (B, H, N, d), v (B, H, N, e).

    Computed in float64. Returns ``kl`` (None unless every row is a distribution), ``kl_note``,
    ``tv``, ``tv_max``, ``out_rel_err``, ``negative_fraction``, ``degenerate_fraction`` and
    ``kind`` (``distribution``, ``signed`` or ``unnormalised``); see the module docstring.
    """
    q, k, v = q.double(), k.double(), v.double()
    kern = get_kernel(case.kernel)
    params = kern.resolve_params(case.params)
    M = k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, M)
    p = torch.softmax(scores, dim=-1)
    reference = p @ v
    if kern.name == "softmax":
        w = p  # exp(s) normalised; the same rows without overflowing exp at large scales
    else:
        w = kern.pairwise(q, k, **params)
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
    kl, note = None, None
    if kind == "distribution":
        kl_rows = (p * (torch.log(p.clamp_min(1e-300)) - torch.log(a.clamp_min(KL_FLOOR)))).sum(-1)
        kl = float(kl_rows.mean())
    elif kind == "signed":
        note = f"not a distribution: {negative:.2%} of the weights are negative"
    else:
        note = "unnormalised kernel: its coefficient rows are not distributions"
    out = attention(q, k, v, case.kernel, impl="dense", **params)
    norm = torch.linalg.vector_norm
    err = float(norm(out - reference) / norm(reference).clamp_min(1e-300))
    return {"kind": kind, "kl": kl, "kl_note": note, "tv": float(tv.mean()), "tv_max": float(tv.max()),
            "out_rel_err": err, "negative_fraction": negative, "tv_taylor2": float(tv_taylor2.mean()),
            "degenerate_fraction": float(degenerate.double().mean())}


def _case_entry(case: KernelCase) -> dict:
    return {"case": case.label, "kernel": case.kernel, "params": case.params}


def _safe_distances(q, k, v, case: KernelCase) -> dict:
    try:
        return attention_distances(q, k, v, case)
    except (ValueError, RuntimeError, TypeError) as err:  # e.g. pool/chunks not dividing the head dim
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"error": f"{type(err).__name__}: {text[:200]}"}


def random_study(cases: Sequence[KernelCase], scales: Sequence[float], batch: int = 2, heads: int = 4,
                 tokens: int = 196, head_dim: int = 32, seed: int = 0) -> list[dict]:
    """Distances on random normal q, k whose scores have std ``scale``, for every case and scale."""
    rows = []
    for scale in scales:
        g = torch.Generator().manual_seed(seed + int(scale * 1000))
        sigma = math.sqrt(scale)  # Var(q·k/√d) = σ⁴ for i.i.d. N(0, σ²) entries, so std(s) = σ²
        shape = (batch, heads, tokens, head_dim)
        q = torch.randn(shape, generator=g, dtype=torch.float64) * sigma
        k = torch.randn(shape, generator=g, dtype=torch.float64) * sigma
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        score_std = float((q @ k.transpose(-1, -2) / math.sqrt(head_dim)).std())
        for case in cases:
            rows.append({**_case_entry(case), "scale": scale, "score_std": score_std,
                         **_safe_distances(q, k, v, case)})
    return rows


# ------------------------------------------------------------------------------ trained model


# Colours of the squares (RGB in the normalised input scale); the background is N(0, 0.3²) noise.
PAIR_COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]) * 1.5
PAIR_CLASSES = 2


def pair_images(n: int, image_size: int, patch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic relation task: images (n, 3, S, S) and labels (n,), 1 = the two squares match.

    Each image is noise with two squares of side ``patch_size`` on distinct cells of the patch
    grid, coloured from :data:`PAIR_COLOURS`; labels alternate 0, 1 (exactly balanced). The same
    (n, size, seed) always gives the same tensors.
    """
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
    """The pair task (:func:`pair_images`) for the project's Trainer: tensors in memory, cross-entropy,
    validation accuracy. ``approx`` is the study's :class:`ApproximationConfig`."""

    name = "approximation-pairs"
    metric = "top1"

    def __init__(self, cfg, info, approx: ApproximationConfig) -> None:
        super().__init__(cfg, info)
        self.approx = approx

    def load_data(self, seed: int) -> list[str]:
        a = self.approx
        self.train = pair_images(a.train_images, a.image_size, a.patch_size, seed)
        self.val = pair_images(a.eval_images, a.image_size, a.patch_size, seed + 1)
        return ["differ", "match"]

    def build_model(self, num_classes: int) -> nn.Module:
        a = self.approx
        return create_model(a.model, kernel="softmax", num_classes=num_classes, img_size=a.image_size,
                            patch_size=a.patch_size)

    def train_dataset(self, model: nn.Module):
        x, y = self.train
        return _KeyedPairs(x, y)

    def val_dataset(self, model: nn.Module):
        return torch.utils.data.TensorDataset(*self.val)

    def train_sizes(self) -> list[int]:
        return [self.approx.image_size]

    def training_loss(self, net: nn.Module, batch, step) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, amp_dtype) -> dict:
        hits = total = 0
        for x, y in loader:
            hits += int((model(x.to(self.device)).argmax(-1).cpu() == y).sum())
            total += len(y)
        return {"top1": 100.0 * hits / max(1, total), "images": total}


class _KeyedPairs(torch.utils.data.Dataset):
    """Tensors indexed by the Trainer's sampler keys (index, size, seed); no augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.x[index], self.y[index]


def train_softmax_vit(config: ApproximationConfig, log: Echo | None = None) -> tuple[nn.Module, dict]:
    """Train ``config.model`` with softmax attention on :func:`pair_images` for ``train_steps`` AdamW steps
    with the project's Trainer (warm-up over the first 10%, then cosine decay; run folder in a
    temporary directory)."""
    import tempfile

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
    from ..models import read_state_dict

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
    """(q, k, v) of every block's attention, each (B, H, T, d), via forward hooks on ``attn.qkv``.

    Follows ``KernelAttention``/timm's layout: qkv(x) (B, T, 3·H·d) → (3, B, H, T, d), then the
    module's ``q_norm``/``k_norm``.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise ValueError(f"{type(model).__name__} has no blocks[i].attn.qkv to hook")
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = []

    def hook(attn: nn.Module):
        def fn(_module, _inputs, out: torch.Tensor) -> None:
            B, T, _ = out.shape
            qkv = out.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, H, T, d)
            captured.append((attn.q_norm(q), attn.k_norm(k), v))
        return fn

    for blk in blocks:
        handles.append(blk.attn.qkv.register_forward_hook(hook(blk.attn)))
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
    summary = []
    for j, case in enumerate(cases):
        per_block = [b["cases"][j] for b in blocks]
        entry = {**_case_entry(case)}
        if any("error" in e for e in per_block):
            entry["error"] = next(e["error"] for e in per_block if "error" in e)
        else:
            for key in ("tv", "tv_taylor2", "out_rel_err", "negative_fraction", "degenerate_fraction"):
                entry[key] = sum(e[key] for e in per_block) / len(per_block)
            entry["tv_max"] = max(e["tv_max"] for e in per_block)
            kls = [e["kl"] for e in per_block]
            entry["kl"] = None if any(x is None for x in kls) else sum(kls) / len(kls)
            entry["kl_note"] = next((e["kl_note"] for e in per_block if e["kl_note"]), None)
            kinds = {e["kind"] for e in per_block}
            entry["kind"] = kinds.pop() if len(kinds) == 1 else "signed"
        summary.append(entry)
    stds = [b["score_std"] for b in blocks]
    return {"blocks": blocks, "summary": summary, "score_std_mean": sum(stds) / len(stds) if stds else None}


# ----------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class ApproximationConfig:
    """Settings of one approximation study (the CLI flags map onto these fields)."""

    cases: tuple[KernelCase, ...] | None = None  # None: default_cases()
    scales: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # std of the scores q·k/√d
    batch: int = 2
    heads: int = 4
    tokens: int = 196
    head_dim: int = 32
    trained: bool = True
    model: str = "qtvit_vit_micro"
    checkpoint: str | None = None
    train_steps: int = 500
    train_batch: int = 64
    train_images: int = 8000
    image_size: int = 32
    patch_size: int = 4
    lr: float = 2e-3
    eval_images: int = 64
    seed: int = 0
    progress: bool = True

    def case_list(self) -> list[KernelCase]:
        return list(self.cases) if self.cases is not None else default_cases()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        for case in self.case_list():
            get_kernel(case.kernel).resolve_params(case.params)
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales!r}")
        for name in ("batch", "heads", "tokens", "head_dim", "train_batch", "train_images", "eval_images",
                     "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.train_steps < 0:
            raise ValueError(f"train_steps must be ≥ 0, got {self.train_steps}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of "
                             f"patch_size {self.patch_size}")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist")


QUICK = ApproximationConfig(scales=(0.1, 1.0, 4.0), tokens=64, head_dim=16, train_steps=20, train_batch=32,
                            train_images=200, eval_images=16)


def run_approximation_study(config: ApproximationConfig | None = None, echo: Echo | None = None,
                            save_checkpoint: str | Path | None = None) -> dict:
    """Run the study and return its document: ``env``, ``config``, ``random``, ``trained``."""
    config = config or ApproximationConfig()
    config.validate()
    cases = config.case_list()

    def log(text: str) -> None:
        if config.progress:
            print(f"[bench approximation] {text}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    doc = {"benchmark": "approximation", "schema_version": SCHEMA_VERSION,
           "env": bench_env.collect_environment(torch.device("cpu"), torch.float64),
           "config": {**asdict(config), "cases": [_case_entry(c) for c in cases], "kl_floor": KL_FLOOR},
           "random": [], "trained": None, "elapsed_seconds": 0.0}
    log(f"random q/k: {len(cases)} kernels × {len(config.scales)} scales")
    doc["random"] = random_study(cases, config.scales, config.batch, config.heads, config.tokens,
                                 config.head_dim, config.seed)
    if config.trained:
        if config.checkpoint:
            log(f"loading {config.checkpoint}")
            model, info = load_softmax_vit(config, config.checkpoint)
            info["source"] = "checkpoint"
        else:
            log(f"training {config.model} (softmax) for {config.train_steps} steps on the pair task")
            model, info = train_softmax_vit(config, log)
            info["source"] = "trained here"
            if save_checkpoint is not None:
                Path(save_checkpoint).parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), save_checkpoint)
                info["saved_to"] = str(save_checkpoint)
        images, _ = pair_images(config.eval_images, info["image_size"], info["patch_size"], config.seed + 1)
        log(f"comparing kernels on its q/k ({config.eval_images} validation images)")
        doc["trained"] = {"model": config.model, **info, **trained_study(cases, model, images)}
    doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    if echo:
        for line in format_tables(doc):
            echo(line)
    return doc


# ------------------------------------------------------------------------------------ output


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if x < 1e-2 or x >= 100 else f"{x:.3f}"


def format_tables(doc: dict) -> list[str]:
    """Random study (TV and output error per scale) and trained study (all metrics) as text."""
    lines = ["qtvit bench approximation: distance of each kernel's attention from softmax's", ""]
    rows = doc["random"]
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    width = max(len(c) for c in cases) if cases else 10
    for metric, title in (("tv", "total variation ½Σ|p−a| from softmax (L1/2 for signed/unnormalised rows)"),
                          ("tv_taylor2", "the same distance from taylor2's rows"),
                          ("negative_fraction", "fraction of negative weights"),
                          ("out_rel_err", "relative output error ‖out−PV‖/‖PV‖")):
        lines.append(f"random q/k, {title}; columns: std of the scores q·k/√d")
        lines.append(f"  {'kernel':<{width}} " + " ".join(f"{s:>9g}" for s in scales))
        for case in cases:
            cells = []
            for s in scales:
                r = next(x for x in rows if x["case"] == case and x["scale"] == s)
                cells.append(f"{'error' if 'error' in r else _fmt(r[metric]):>9}")
            lines.append(f"  {case:<{width}} " + " ".join(cells))
        lines.append("")
    trained = doc.get("trained")
    if trained:
        acc = trained.get("val_accuracy")
        if trained.get("source") == "trained here":
            where = (f"trained here, {trained['steps']} steps, val accuracy {acc:.1%} "
                     f"(chance {trained['chance']:.0%})")
        else:
            where = f"from {trained.get('checkpoint')}"
        lines.append(f"trained softmax {trained['model']} ({where}); mean over {len(trained['blocks'])} "
                     f"blocks, score std ≈ {trained['score_std_mean']:.3g}")
        lines.append(f"  {'kernel':<{width}} {'KL':>9} {'TV':>9} {'TV max':>9} {'TV t2':>9} {'out err':>9} "
                     f"{'neg w':>7} {'degen':>7}")
        for r in trained["summary"]:
            if "error" in r:
                lines.append(f"  {r['case']:<{width}} error: {r['error']}")
                continue
            lines.append(f"  {r['case']:<{width}} {_fmt(r['kl']):>9} {_fmt(r['tv']):>9} "
                         f"{_fmt(r['tv_max']):>9} {_fmt(r['tv_taylor2']):>9} {_fmt(r['out_rel_err']):>9} "
                         f"{r['negative_fraction']:7.1%} {r['degenerate_fraction']:7.1%}")
        lines.append("  KL is '-' where rows are not distributions (unnormalised kernels, negative weights).")
    return lines


# ------------------------------------------------------------------------------------ CLI


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = ApproximationConfig()
    p.add_argument("--kernels", metavar="K1,K2",
                   help="kernels, optionally with parameters: taylor2_pool:pool=4 "
                        "(default: all + Table-3 settings)")
    p.add_argument("--scales", metavar="S1,S2", help=f"score stds of the random study (default "
                   f"{','.join(f'{s:g}' for s in d.scales)})")
    p.add_argument("--tokens", type=int, help=f"tokens of the random study (default {d.tokens})")
    p.add_argument("--head-dim", type=int, help=f"head dim of the random study (default {d.head_dim})")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="a trained softmax qtvit_vit_* state dict (skips training)")
    p.add_argument("--save-checkpoint", metavar="FILE", help="save the model trained here")
    p.add_argument("--train-steps", type=int,
                   help=f"training steps of the softmax ViT (default {d.train_steps})")
    p.add_argument("--no-trained", action="store_true", help="random q/k only")
    p.add_argument("--output", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write the plot")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 scales, 64 tokens, 20 training steps")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench approximation``."""
    p = bench_subparsers.add_parser(
        "approximation", help="distance of each kernel's attention rows from softmax's",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    _add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ApproximationConfig:
    """Resolve the flags (explicit value > ``--quick`` > default) into a validated config."""
    base = QUICK if args.quick else ApproximationConfig()
    over: dict[str, object] = {}
    if args.kernels is not None:
        items = [s.strip() for s in args.kernels.split(",") if s.strip()]
        if not items:
            raise QtvitError("--kernels: empty list")
        try:
            over["cases"] = tuple(parse_case(s) for s in items)
        except (ValueError, TypeError) as err:
            raise QtvitError(f"--kernels: {err}") from None
    if args.scales is not None:
        try:
            over["scales"] = tuple(float(s) for s in args.scales.split(",") if s.strip())
        except ValueError:
            raise QtvitError(f"--scales: {args.scales!r} is not a list of numbers") from None
    for flag in ("tokens", "head_dim", "checkpoint", "train_steps"):
        if getattr(args, flag) is not None:
            over[flag] = getattr(args, flag)
    over.update(trained=not args.no_trained, progress=not args.no_progress)
    config = replace(base, **over)
    try:
        config.validate()
    except (ValueError, TypeError) as err:
        raise QtvitError(f"bad setting: {err}") from None
    return config


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit bench approximation``."""
    config = config_from_args(args)
    doc = run_approximation_study(config, echo=print, save_checkpoint=args.save_checkpoint)
    if args.output:
        write_json(doc, args.output)
        print(f"\nwrote {args.output}")
    if args.plot:
        from .plots import plot_approximation

        print(f"wrote {plot_approximation(doc, args.plot)}")
    return 0


__all__ = ["ApproximationConfig", "KL_FLOOR", "KernelCase", "QUICK", "attention_distances", "capture_qkv",
           "config_from_args", "default_cases", "format_tables", "parse_case", "random_study", "register",
           "run", "run_approximation_study", "trained_study", "train_softmax_vit"]
