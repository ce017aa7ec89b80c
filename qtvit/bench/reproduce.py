"""``qtvit reproduce kernels|reductions``: the paper's kernel ablations (Tables 2 and 3) on your data.

Each study trains the same model on the same data once per (attention kernel, seed) with the
project's trainer, changing nothing but the kernel, and reports per kernel: held-out top-1
(mean ± sample std over the seeds), its gap to the ``none`` control, the paper's ImageNet top-1
beside it (parsed from :attr:`qtvit.kernels.Kernel.reference`), the model's MACs with that
kernel and the measured time of one training step.

* ``kernels`` (Table 2): softmax, relu, cosine, mean, sigmoid_softmax, angular, taylor1, qt.
* ``reductions`` (Table 3): taylor2, taylor2_pool (pool 2, 4), taylor2_chunk (chunks 2, 4, 8),
  taylor2_random, qt (the reductions in their default ``scaling``; both scalings are compared in
  ``qtvit bench approximation``).
* Both end with ``none``, the control: every LiteMLA's attention output is zero while its
  multi-scale aggregation, GELU(BN(v)) shortcut and projection stay, so only global token mixing
  is removed. A kernel that does not beat it has not shown that its attention does anything.

Defaults (a CPU budget of about 30 minutes per study on one core, both datasets in one command):
the recipes ``configs/ablation/demo.yaml`` and ``configs/ablation/fashion_mnist.yaml`` — a
0.18M-parameter QT-ViT layout whose two attention blocks see 8×8 tokens at 64 px, trained for
a few hundred steps on the built-in demo set (the class is the alignment of two distant objects)
and on Fashion-MNIST. The same command scales up::

    torchrun --nproc_per_node 8 -m qtvit reproduce kernels --model qtvit_1 --data /data/imagenet \\
        --epochs 300 --output-dir runs/table2

(a folder dataset uses the model's YAML recipe from ``configs/`` unless ``--config`` names
another; without ``--model`` it is QT-ViT-1's). On a CPU the built-in recipes run one intra-op
thread per process (:func:`resolve_threads`).

Outputs in ``--output-dir``: ``reproduce.json`` (settings, environment with the git commit,
every run, summaries; rewritten after each run), ``table.md`` (Markdown for docs/RESULTS.md),
``<study>.png`` and one trainer run folder per (dataset, kernel, seed) with its ``result.json``.
A finished (dataset, kernel, seed) is never trained again: ``--resume`` skips it and continues an
interrupted run from its checkpoint; an existing output folder is never reused without
``--resume`` or ``--overwrite``. The seed is the trainer's ``train.seed``: initial weights, data
order and, for the demo set, which images are drawn — one seed is one full replicate, and every
kernel sees the same replicate.

MACs are counted on the meta device for one image at the training size, as run (``impl=auto``)
and with every linear-capable kernel on its O(N) path; the step time is forward + loss +
backward + AdamW on one random batch, all kernels timed in interleaved rounds in one process.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import QtvitError
from ..io import write_atomic, write_json
from ..kernels import get_kernel
from ..train.classification import ClassificationTask
from . import env as bench_env
from .approximation import KernelCase, parse_case

SCHEMA_VERSION = 2
Echo = Callable[[str], None]
CONTROL = "none"

STUDIES: dict[str, dict] = {
    "kernels": {"table": "Table 2", "title": "attention kernels",
                "variants": ("softmax", "relu", "cosine", "mean", "sigmoid_softmax", "angular", "taylor1",
                             "qt", CONTROL)},
    "reductions": {"table": "Table 3", "title": "reductions of the quadratic Taylor kernel",
                   "variants": ("taylor2", "taylor2_pool:pool=2", "taylor2_pool:pool=4",
                                "taylor2_chunk:chunks=2", "taylor2_chunk:chunks=4", "taylor2_chunk:chunks=8",
                                "taylor2_random", "qt", CONTROL)},
}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_MODEL = "qtvit_b0"  # the recipes' model; another --model drops the recipes' layout kwargs
FOLDER_MODEL = "qtvit_b1"  # a folder (ImageNet) without --model: the paper's Table 2/3 model and recipe
RECIPES = {"demo": "ablation/demo", "fashion-mnist": "ablation/fashion_mnist"}  # under configs/
PLOT_INTERVAL_S = 60.0  # the PNG is redrawn at most this often while a study runs (and at its end)
OUTPUT_FILES = ("reproduce.json", "table.md", "kernels.png", "reductions.png")
# --quick: a smoke test that exercises everything in seconds.
QUICK_OVERRIDES = ("train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=2",
                   "data.demo_train_size=32", "data.demo_val_size=32", "data.max_val_images=32",
                   "optim.warmup_epochs=0.0", "run.log_interval=1", "train.ema=false",
                   "train.bn_reestimate=false", "data.num_workers=0")
QUICK_IMAGE_SIZE = 32


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Dataset:
    """One dataset of a study: ``demo``, ``fashion-mnist`` (optionally ``fashion-mnist:DIR``) or a folder."""

    name: str  # demo | fashion-mnist | folder
    path: str | None = None

    @property
    def slug(self) -> str:
        if self.name != "folder":
            return self.name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.path).resolve().name) or "data"

    @property
    def label(self) -> str:
        return self.name if self.path is None else f"{self.name} ({self.path})"

    @property
    def builtin(self) -> bool:
        return self.name in RECIPES

    @property
    def text(self) -> str:
        return self.path if self.name == "folder" else self.name + (f":{self.path}" if self.path else "")


def parse_dataset(text: str) -> Dataset:
    """``demo``, ``fashion-mnist``, ``fashion-mnist:/dir/with/idx`` or an image-folder path."""
    text = text.strip()
    name, sep, path = text.partition(":")
    key = name.replace("_", "-").lower()
    if key == "demo" and not sep:
        return Dataset("demo")
    if key == "fashion-mnist":
        return Dataset("fashion-mnist", path or None)
    if not Path(text).exists():
        raise FileNotFoundError(f"--data {text!r}: neither demo, fashion-mnist[:DIR] nor an existing folder")
    if not Path(text).is_dir():
        raise NotADirectoryError(f"--data {text!r} is not a folder (expected class folders, or train/ and "
                                 "val/)")
    return Dataset("folder", text)


@dataclass(frozen=True)
class ReproConfig:
    """Settings of one ``qtvit reproduce`` invocation (the CLI flags map onto these fields).

    ``None`` means "the recipe's value": ``configs/ablation/`` for the built-in datasets, the
    model's YAML recipe (or ``config``) for a folder.
    """

    study: str = "kernels"
    variants: tuple[KernelCase, ...] | None = None  # None: the study's defaults
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    datasets: tuple[Dataset, ...] = (Dataset("demo"), Dataset("fashion-mnist"))
    model: str | None = None
    config: str | None = None  # YAML recipe for every dataset (default: the built-in or the model's)
    epochs: int | None = None
    steps: int | None = None  # cap on steps per epoch
    img_size: int | None = None
    batch_size: int | None = None
    val_images: int | None = None
    ape: bool | None = None
    shortcut: bool | None = None
    overrides: tuple[str, ...] = ()  # trainer config overrides section.key=value, applied last
    quick: bool = False
    output_dir: str | None = None  # None: reproduce-<study>
    device: str = "auto"
    threads: int | None = None  # None: 1 for the built-in recipes on a CPU, else torch's
    timing: bool = True
    timing_repeats: int = 5
    keep_checkpoints: bool = False
    progress: bool = True

    FLAGS = ("model", "config", "epochs", "steps", "img_size", "batch_size", "val_images", "threads")

    def variant_list(self) -> list[KernelCase]:
        if self.variants is not None:
            return list(self.variants)
        return [parse_case(v) for v in STUDIES[self.study]["variants"]]

    def out_dir(self) -> Path:
        return Path(self.output_dir or f"reproduce-{self.study}")

    def fingerprint(self) -> dict:
        """The settings that change results: a resumed study must match them."""
        keys = ("model", "config", "epochs", "steps", "img_size", "batch_size", "val_images", "ape",
                "shortcut", "overrides", "quick")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}

    def validate(self) -> None:
        """Raise QtvitError naming the first bad setting (unknown kernels list the valid ones)."""
        if self.study not in STUDIES:
            raise QtvitError(f"unknown study {self.study!r}; valid: {', '.join(STUDIES)}")
        labels = [v.label for v in self.variant_list()]
        if not labels:
            raise QtvitError("no kernels to compare")
        if len(set(labels)) != len(labels):
            raise QtvitError(f"a kernel is listed twice: {', '.join(labels)}")
        if not self.seeds:
            raise QtvitError("no seeds")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise QtvitError(f"seeds must be distinct non-negative integers; got {list(self.seeds)}")
        if not self.datasets:
            raise QtvitError("no datasets")
        if len({d.slug for d in self.datasets}) != len(self.datasets):
            raise QtvitError(f"two datasets share a name: {', '.join(d.label for d in self.datasets)}")
        for name in (*self.FLAGS[2:], "timing_repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise QtvitError(f"--{name.replace('_', '-')} must be at least 1; got {value}")
        if self.img_size is not None and self.img_size < 16:
            raise QtvitError(f"--img-size must be at least 16 pixels; got {self.img_size}")


QUICK = ReproConfig(quick=True, timing_repeats=1)


def resolve_threads(rc: ReproConfig, device: torch.device) -> int | None:
    """Intra-op threads: ``rc.threads``, else 1 when the built-in recipes train on a CPU.

    Why 1: the study model is small (≈0.1 s per step of 32 images on one core), so a second
    thread gains little, and when anything else runs on the machine (the other study, say) OpenMP's
    threads wait for each other. None leaves torch's default.
    """
    if rc.threads is not None:
        return rc.threads
    builtin = rc.config is None and all(d.builtin for d in rc.datasets)
    return 1 if builtin and device.type == "cpu" else None


def command_line(rc: ReproConfig) -> str:
    """The ``qtvit reproduce`` command that regenerates ``rc`` (flags that differ from the defaults)."""
    default = QUICK if rc.quick else ReproConfig()
    parts = ["qtvit", "reproduce", rc.study]
    defaults = [parse_case(v).label for v in STUDIES[rc.study]["variants"]]
    if [v.label for v in rc.variant_list()] != defaults:
        parts.append("--kernels " + ",".join(_case_text(v) for v in rc.variant_list()))
    if rc.seeds != default.seeds:
        parts.append("--seeds " + ",".join(map(str, rc.seeds)))
    if rc.datasets != default.datasets:
        parts.append("--data " + ",".join(d.text for d in rc.datasets))
    parts += [f"--{n.replace('_', '-')} {getattr(rc, n)}" for n in rc.FLAGS if getattr(rc, n) is not None]
    parts += [f"--{'' if getattr(rc, n) else 'no-'}{n}" for n in ("ape", "shortcut")
              if getattr(rc, n) is not None]
    parts += [f"--device {rc.device}"] if rc.device != "auto" else []
    parts += ["--quick"] if rc.quick else []
    parts += [f"--output-dir {rc.output_dir}"] if rc.output_dir is not None else []
    return " ".join(parts + list(rc.overrides))


def _case_text(case: KernelCase) -> str:
    return case.kernel + (":" + ";".join(f"{k}={v}" for k, v in case.params.items()) if case.params else "")


def paper_top1(case: KernelCase) -> float | None:
    """The paper's ImageNet top-1 for ``case``, read from its kernel's ``reference`` text.

    The text holds one number (``"79.4 (Table 2)"``) or one per setting of a parameter
    (``"79.3 (pool 2) / 79.1 (pool 4) (Table 3)"``, ``"79.4 / 79.3 / 79.1 (chunks 2 / 4 / 8)"``);
    a setting the paper did not report gives None.
    """
    kern = get_kernel(case.kernel)
    text = kern.reference or ""
    numbers = [float(x) for x in re.findall(r"(?<![\w.])(\d{2,3}\.\d+)", text)]
    if len(numbers) <= 1:
        return numbers[0] if numbers else None
    groups = [(n, g) for n, g in re.findall(r"\((\w+) ([\d /]+)\)", text) if n.lower() != "table"]
    names = {n for n, _ in groups}
    values = [int(v) for _, g in groups for v in g.split("/") if v.strip()]
    if len(names) != 1 or len(values) != len(numbers):
        return None
    value = kern.resolve_params(case.params).get(names.pop())
    return numbers[values.index(value)] if value in values else None


# ------------------------------------------------------------------------------ trainer configs


def _recipe_for(model: str) -> str | None:
    """The YAML recipe named after ``model`` or its paper alias (``qtvit_b1`` → ``qtvit_1``), if any."""
    from ..models import list_models, resolve_model_name
    from ..train.config import find_config

    canonical = resolve_model_name(model)
    aliases = [a for a in list_models(include_aliases=True) if resolve_model_name(a) == canonical]
    for name in (model, *aliases):
        try:
            return str(find_config(name))
        except FileNotFoundError:
            continue
    return None


def base_config(rc: ReproConfig, dataset: Dataset):
    """The trainer :class:`~qtvit.train.Config` for ``dataset`` before the kernel and seed are set.

    The recipe (``--config``, else ``configs/ablation/<dataset>.yaml`` for the built-in data, else
    the model's YAML recipe) ← ``--quick`` ← flags ← overrides.
    """
    from ..train.config import load_config, merge_dict, parse_override, validate

    recipe = rc.config or RECIPES.get(dataset.name) or _recipe_for(rc.model or FOLDER_MODEL)
    cfg = load_config(recipe, QUICK_OVERRIDES if rc.quick else ())
    if rc.model and rc.model != cfg.model.name:
        cfg.model.name = rc.model
        if dataset.builtin:  # the recipe's layout belongs to its model; keep only the image size
            cfg.model.kwargs = {k: v for k, v in cfg.model.kwargs.items() if k == "img_size"}
    size = rc.img_size or (QUICK_IMAGE_SIZE if rc.quick else None)
    if size:
        merge_dict(cfg, {"model": {"kwargs": {**cfg.model.kwargs, "img_size": size}},
                         "aug": {"multi_res": False, "train_sizes": [size]},
                         "data": {"demo_image_size": size}},
                   "--img-size")
    data = {"dataset": {"folder": "folder", "fashion-mnist": "fashion_mnist"}.get(dataset.name, "demo")}
    if dataset.path:
        data["path"] = dataset.path
    flags = {"data": {**data, "max_val_images": rc.val_images},
             "train": {"epochs": rc.epochs, "batch_size": rc.batch_size, "max_steps_per_epoch": rc.steps,
                       "device": rc.device},
             "model": {"ape": rc.ape, "shortcut": rc.shortcut}}
    for section, values in flags.items():
        merge_dict(cfg, {section: {k: v for k, v in values.items() if v is not None}}, "flags")
    if cfg.optim.warmup_epochs >= cfg.train.epochs:  # e.g. --epochs 1 with the paper's 20 warm-up epochs
        cfg.optim.warmup_epochs = 0.1 * cfg.train.epochs
    if dataset.builtin and rc.config is None:
        cfg.train.eval_interval = cfg.train.epochs  # evaluate once, after the last epoch
    for text in rc.overrides:
        section, key, value = parse_override(text)
        merge_dict(cfg, {section: {key: value}}, f"override {text!r}")
    cfg.run.progress = rc.progress and sys.stderr.isatty()
    validate(cfg)
    return cfg


@functools.lru_cache(maxsize=16)
def _takes_kernel_params_dict(model: str) -> bool:
    from ..models import create_model

    with torch.device("meta"):
        net = create_model(model, num_classes=2)
    param = inspect.signature(type(net).__init__).parameters.get("kernel_params")
    return param is not None and param.kind is not inspect.Parameter.VAR_KEYWORD


def variant_config(base, case: KernelCase, seed: int, run_dir: Path):
    """``base`` with the kernel (and its parameters, as the model family takes them), seed and run folder."""
    from ..train.config import config_from_dict

    cfg = config_from_dict(base.to_dict())
    cfg.model.kernel = case.kernel
    if case.params:
        kwargs = dict(cfg.model.kwargs)
        if _takes_kernel_params_dict(cfg.model.name):  # EfficientViT: one dict; the plain ViT: keywords
            kwargs["kernel_params"] = {**kwargs.get("kernel_params", {}), **case.params}
        else:
            kwargs.update(case.params)
        cfg.model.kwargs = kwargs
    cfg.train.seed = seed
    cfg.run.output = str(run_dir)
    return cfg


def case_slug(case: KernelCase) -> str:
    """A folder name for ``case``: ``taylor2_pool(pool=4)`` → ``taylor2_pool-pool4``."""
    return re.sub(r"[^A-Za-z0-9_]+", "", case.label.replace("(", "-").replace(", ", "-").replace("=", ""))


# ------------------------------------------------------------------------------ the task


class ReproTask(ClassificationTask):
    """Classification, with two differences for a study that trains many runs in one process:

    * the built-in datasets are shared between the runs of one seed (every kernel reads the
      same images, and the demo set renders each image once); only the last key is kept, runs
      being ordered seed-major;
    * with ``aug.no_aug`` evaluation does not crop either (``crop_pct`` 1.0): a model whose card
      says 0.875 (the plain ViTs) would otherwise be evaluated zoomed in, which on the demo set
      moves the objects and can change the class.
    """

    _shared: dict[tuple, tuple] = {}

    def load_data(self, seed: int) -> list[str]:
        d = self.cfg.data
        if d.dataset not in ("demo", "fashion_mnist"):
            return super().load_data(seed)
        key = (d.dataset, d.path, seed, d.demo_image_size, d.demo_train_size, d.demo_val_size, d.demo_cache)
        if key not in ReproTask._shared:
            ReproTask._shared.clear()
            classes = super().load_data(seed)
            ReproTask._shared[key] = (self.train_base, self.val_base, classes)
        self.train_base, self.val_base, classes = ReproTask._shared[key]
        self._build_loss(len(classes))
        return classes

    def build_model(self, num_classes: int):
        model = super().build_model(num_classes)
        cfg = getattr(model, "pretrained_cfg", None)
        if self.cfg.aug.no_aug and isinstance(cfg, dict) and cfg.get("crop_pct", 1.0) != 1.0:
            model.pretrained_cfg = {**cfg, "crop_pct": 1.0}
        return model


# ------------------------------------------------------------------------------ measurements


def model_facts(cfg, num_classes: int) -> dict:
    """Parameters and MACs (as run; linear paths forced) of ``cfg.model`` at the training size."""
    from ..models.macs import count_macs
    from ..train.evaluate import build_model

    size = _train_size(cfg)
    with torch.device("meta"):
        net = build_model(cfg.model, num_classes)
    facts = {"params": sum(p.numel() for p in net.parameters()), "size": size,
             "macs": count_macs(net, (1, 3, size, size)), "macs_linear": None}
    forced = [m for m in net.modules() if isinstance(getattr(m, "kernel", None), str) and hasattr(m, "impl")
              and get_kernel(m.kernel).has_linear]
    for module in forced:
        module.impl = "linear"
    if forced:
        facts["macs_linear"] = count_macs(net, (1, 3, size, size))
    return facts


def _train_size(cfg) -> int:
    """The resolution training runs at (single-resolution) or is evaluated at (multi-resolution)."""
    if cfg.train.eval_size:
        return int(cfg.train.eval_size)
    if cfg.aug.multi_res:
        return int(max(cfg.aug.train_sizes))
    size = cfg.model.kwargs.get("img_size")
    if size is None:
        from ..models import get_model_card

        size = get_model_card(cfg.model.name).pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return int(size if isinstance(size, int) else max(size))


def time_train_steps(cfgs: dict[str, object], num_classes: int, device: torch.device, repeats: int = 5,
                     echo: Echo | None = None) -> dict[str, dict]:
    """Median time of one training step per variant, timed in interleaved rounds.

    A step is forward + loss (BCE or cross-entropy, as configured) + backward + AdamW step on one
    random batch of ``train.batch_size`` images at the training size, under the configured AMP.
    Returns label → :meth:`qtvit.bench.timing.Samples.stats` (``median_ms`` ...) or ``{"error": text}``.
    """
    import torch.nn.functional as F

    from ..train.evaluate import autocast, build_model
    from ..train.trainer import AMP_DTYPES
    from .timing import time_interleaved

    fns: dict[str, Callable[[], None]] = {}
    out: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(0)
    for label, cfg in cfgs.items():
        size, batch = _train_size(cfg), cfg.train.batch_size
        try:
            torch.manual_seed(0)
            net = build_model(cfg.model, num_classes).to(device).train()
        except (ValueError, TypeError, RuntimeError, QtvitError) as err:
            out[label] = {"error": str(err).splitlines()[0]}
            continue
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        target = F.one_hot(y, num_classes).float() if cfg.aug.bce else y
        loss_fn = F.binary_cross_entropy_with_logits if cfg.aug.bce else F.cross_entropy

        def step(net=net, opt=opt, x=x, target=target, loss_fn=loss_fn,
                 amp=AMP_DTYPES[cfg.train.amp]) -> None:
            with autocast(device, amp):
                loss = loss_fn(net(x).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[label] = step
    timed = time_interleaved(fns, device=device, warmup=2, repeats=repeats, min_repeats=min(3, repeats),
                             min_sample_seconds=0.0, variant_seconds=1e9,  # always `repeats` samples
                             on_progress=(lambda s: echo(f"  timing training steps: {s}")) if echo else None)
    out.update({label: {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
                for label, err in timed.errors.items()})
    out.update({label: samples.stats() for label, samples in timed.samples.items()})
    return out


def _throughput(run_dir: Path) -> float | None:
    """Median training images/s the trainer logged in ``run_dir`` (first record dropped: warm-up)."""
    from ..train.metrics import read_metrics

    rates = [r["images_per_s"] for r in read_metrics(run_dir, "step")
             if isinstance(r.get("images_per_s"), float)]
    rates = rates[1:] or rates
    return statistics.median(rates) if rates else None


# ------------------------------------------------------------------------------ output folder


def prepare_output(rc: ReproConfig, resume: bool, overwrite: bool) -> dict | None:
    """Check ``rc.out_dir()``: fresh, resumed (settings must match) or overwritten, never silently reused.

    Returns the previous ``reproduce.json`` when resuming, else None.
    """
    out = rc.out_dir()
    doc_path = out / "reproduce.json"
    if resume and overwrite:
        raise QtvitError("--resume and --overwrite contradict each other; pass one")
    if out.exists() and not out.is_dir():
        raise QtvitError(f"output path exists and is not a folder: {out}")
    previous = None
    if doc_path.is_file():
        try:
            previous = json.loads(doc_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise QtvitError(f"{doc_path} is not valid JSON ({err}); move it away or choose another "
                             "--output-dir") from None
    if resume:
        if previous is None:
            raise FileNotFoundError(f"nothing to resume: {doc_path} does not exist")
        if previous.get("study") != rc.study:
            raise QtvitError(f"{out} holds a '{previous.get('study')}' study, not '{rc.study}'")
        old, new = previous.get("settings", {}).get("fingerprint", {}), rc.fingerprint()
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
            raise QtvitError(f"--resume with other settings than {out} was started with ({detail}); "
                             "resume with the same flags or choose another --output-dir")
        return previous
    if out.is_dir() and any(out.iterdir()):
        if previous is None:
            raise QtvitError(f"output folder {out} exists and is not a qtvit reproduce folder; choose "
                             "another --output-dir")
        if not overwrite:
            raise QtvitError(f"output folder {out} already holds results; pass --resume to continue it, "
                             "--overwrite to start over, or choose another --output-dir")
        slugs = {d.get("slug") for d in previous.get("datasets", [])} | {d.slug for d in rc.datasets}
        for slug in filter(None, slugs):
            if (out / slug).is_dir():
                shutil.rmtree(out / slug)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


# ------------------------------------------------------------------------------ summaries


def summarize(runs: Sequence[dict]) -> dict:
    """Mean and sample standard deviation (n−1) of top-1 over finished runs; std None for one run."""
    top1 = [r["top1"] for r in runs if r.get("top1") is not None]
    if not top1:
        return {"n": 0, "top1_mean": None, "top1_std": None, "top1_min": None, "top1_max": None}
    return {"n": len(top1), "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "top1_min": min(top1), "top1_max": max(top1)}


def control_gaps(entry: dict) -> None:
    """Set each variant's ``gap``: its mean top-1 minus the ``none`` control's (None without both)."""
    control = next((v for v in entry["variants"] if v["kernel"] == CONTROL), None)
    base = control["top1_mean"] if control else None
    for v in entry["variants"]:
        v["gap"] = None if base is None or v["top1_mean"] is None or v is control else v["top1_mean"] - base


def _fmt_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _fmt_macs(macs: int | None) -> str:
    if macs is None:
        return "–"
    value, unit = next((macs / scale, unit) for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
                       if macs >= scale or scale == 1)
    return f"{value:#.3g}".rstrip(".") + unit  # three significant digits, trailing zeros kept


def _fmt_ms(stats: dict | None) -> str:
    ms = (stats or {}).get("median_ms")
    return "–" if ms is None else (f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


def _dataset_setup(entry: dict) -> str:
    s = entry.get("setup", {})
    if not s.get("classes"):
        return ""
    steps = s.get("steps_per_epoch")
    budget = f"{s.get('epochs')} epoch(s) × {steps} steps" if steps else f"{s.get('epochs')} epoch(s)"
    params = s.get("params") or 0
    return (f"{s.get('model')} ({params / 1e6:.2f}M params, attention on {s.get('tokens')} tokens), "
            f"{s.get('size')} px, {budget} of batch {s.get('batch_size')}, lr {s.get('lr')}, held-out "
            f"{s.get('val_images')} images, {s['classes']} classes (chance {100 / s['classes']:.1f}%)")


def _table_rows(entry: dict) -> list[list[str]]:
    rows = []
    for v in entry["variants"]:
        gap = "control" if v["kernel"] == CONTROL else ("–" if v.get("gap") is None else f"{v['gap']:+.2f}")
        rows.append([v["label"], _fmt_pm(v["top1_mean"], v["top1_std"]), str(v["n"]), gap,
                     "–" if v["paper_top1"] is None else f"{v['paper_top1']:.1f}", _fmt_macs(v.get("macs")),
                     _fmt_macs(v.get("macs_linear")), _fmt_ms(v.get("step"))])
    return rows


HEADER = ["kernel", "top-1 % (mean ± std)", "seeds", "vs none (points)", "paper ImageNet top-1 %",
          "MACs (as run)", "MACs (linear path)", "train step (ms)"]


def format_markdown(doc: dict) -> str:
    """The study as Markdown: a heading, the regenerating command, one table per dataset, notes."""
    study, env = STUDIES[doc["study"]], doc["env"]
    loads = "".join(f"; {'run' if i == 0 else 'resumed'} {inv['started']}, load at start "
                    f"{bench_env.format_load(inv.get('load_start') or {})}, at end "
                    f"{bench_env.format_load(inv.get('load_end') or {})}"
                    for i, inv in enumerate(doc.get("invocations", [])))
    lines = [f"### {study['table']}: {study['title']} (measured here)", "",
             f"Regenerate: `{doc['command']}` ({bench_env.describe_commit(env)})", "",
             f"Environment: {env.get('cpu_model')} ({env.get('cpu_usable')} CPUs usable), device "
             f"{env.get('device')}, torch {env.get('torch')}, {env.get('threads')} thread(s); wall time "
             f"{_fmt_duration(doc.get('wall_seconds'))}{'' if doc.get('complete') else ' (incomplete)'}"
             f"{loads}.", ""]
    for entry in doc["datasets"]:
        lines += [f"**{entry['label']}** — {_dataset_setup(entry)}", "", "| " + " | ".join(HEADER) + " |",
                  "|---|" + "---:|" * (len(HEADER) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in _table_rows(entry)]
        lines.append("")
    lines += ["Top-1: held-out accuracy after the same training budget per kernel, mean ± sample std over "
              "the seeds (each seed fixes the initial weights, data order and, for the demo set, the "
              "images). "
              "vs none: mean top-1 minus the `none` control's (attention output zero, everything else kept). "
              "Paper: ImageNet-1k top-1 of EfficientViT-B1-sized models, 300 epochs (a different scale: "
              "compare orderings, not values). MACs: one image at the training size; *as run* lets "
              "`impl=auto` pick dense weights where N² is cheaper, *linear path* forces the O(N) feature "
              "map. Train step: median of interleaved timings of forward + loss + backward + AdamW on one "
              "batch.", ""]
    return "\n".join(lines)


def format_text(doc: dict) -> list[str]:
    """A compact console table per dataset."""
    lines = []
    for entry in doc["datasets"]:
        rows = [HEADER[:4] + ["paper", "MACs", "linear", "step ms"], *_table_rows(entry)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        lines.append(f"{entry['label']}: {_dataset_setup(entry)}")
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(r, widths, strict=True))) for r in rows]
    return lines


def plot_study(doc: dict, path: str | Path) -> Path:
    """Bars of our top-1 (mean, error bar = std, dots = seeds) per kernel, one panel per dataset; the
    ``none`` control as a dashed line, chance as a dotted one, the paper's top-1 as diamonds."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    entries = doc["datasets"]
    n_var = max(len(e["variants"]) for e in entries)
    fig, axes = plt.subplots(1, len(entries), figsize=(max(6.0, 0.9 * n_var + 2) * len(entries), 4.8),
                             squeeze=False)
    for ax, entry in zip(axes[0], entries, strict=True):
        variants = entry["variants"]
        xs = range(len(variants))
        colours = ["tab:red" if v["kernel"] == "qt" else "tab:gray" if v["kernel"] == CONTROL else "tab:blue"
                   for v in variants]
        ax.bar(xs, [v["top1_mean"] or 0.0 for v in variants], yerr=[v["top1_std"] or 0.0 for v in variants],
               capsize=4, color=colours, alpha=0.75, label="ours: mean ± std")
        for x, v in zip(xs, variants, strict=True):
            seeds = [r["top1"] for r in v["runs"] if r.get("top1") is not None]
            ax.plot([x] * len(seeds), seeds, "k.", markersize=4)
        control = next((v for v in variants if v["kernel"] == CONTROL and v["top1_mean"] is not None), None)
        if control:
            ax.axhline(control["top1_mean"], color="tab:gray", linestyle="--", linewidth=1,
                       label="none (control)")
        if entry.get("setup", {}).get("classes"):
            ax.axhline(100.0 / entry["setup"]["classes"], color="k", linestyle=":", linewidth=1,
                       label="chance")
        seen = [r["top1"] for v in variants for r in v["runs"] if r.get("top1") is not None]
        ax.set_ylim(0.0, min(100.0, max(seen, default=10.0)) * 1.25 + 2.0)  # from 0: no false gaps
        ax.set_xticks(list(xs), [v["label"] for v in variants], rotation=35, ha="right")
        ax.set_ylabel("held-out top-1 % (ours)")
        ax.set_title(entry["label"], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        paper = [(x, v["paper_top1"]) for x, v in zip(xs, variants, strict=True)
                 if v["paper_top1"] is not None]
        if paper:
            twin = ax.twinx()
            twin.plot([p[0] for p in paper], [p[1] for p in paper], "kD", markersize=6,
                      label="paper (ImageNet)")
            twin.set_ylabel("paper ImageNet top-1 %")
            values = [p[1] for p in paper]
            low, span = min(values) - 1.0, max(values) - min(values) + 2.0
            twin.set_ylim(low, low + 1.3 * span)
            handles += twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left", ncol=3,
                  framealpha=0.9)
    study = STUDIES[doc["study"]]
    fig.suptitle(f"{study['table']}: {study['title']}, same model and budget per kernel")
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the study


class Study:
    """Runs one study; :meth:`run` trains what is missing and keeps the outputs current."""

    def __init__(self, rc: ReproConfig, echo: Echo = print, resume: bool = False, overwrite: bool = False,
                 command: str | None = None) -> None:
        from ..train import distributed as du

        rc.validate()
        self.rc, self.echo, self.out = rc, echo, rc.out_dir()
        self.info = du.setup(rc.device)
        self.main = self.info.is_main
        if not self.main:  # one voice under torchrun
            self.echo = lambda _text: None
        # Everything that can fail on a bad setting fails here, before the output folder is touched.
        self.variants = rc.variant_list()
        self.bases = {d.slug: base_config(rc, d) for d in rc.datasets}
        self.probes = {d.slug: _probe_dataset(self.bases[d.slug]) for d in rc.datasets}
        self.facts = {d.slug: self._model_facts(d) for d in rc.datasets}
        error, previous = None, None
        if self.main:
            try:
                previous = prepare_output(rc, resume, overwrite)
            except (QtvitError, OSError) as err:
                error = err
        error = du.broadcast_object(error, self.info)
        if error is not None:
            raise error
        self.previous = previous
        self.invocation = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0,
                           "load_start": bench_env.machine_load(), "load_end": None}
        self.previous_threads = torch.get_num_threads()
        threads = resolve_threads(rc, self.info.device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.doc = {
            "benchmark": "reproduce", "study": rc.study, "schema_version": SCHEMA_VERSION,
            "table": STUDIES[rc.study]["table"], "command": command or command_line(rc),
            "env": bench_env.collect_environment(self.info.device, torch.float32),
            "settings": {"fingerprint": rc.fingerprint(), "variants": [v.label for v in self.variants],
                         "seeds": list(rc.seeds), "datasets": [d.label for d in rc.datasets]},
            "invocations": [*(previous or {}).get("invocations", []), self.invocation],
            "wall_seconds": 0.0, "complete": False,
            "datasets": [self._dataset_entry(d, previous) for d in rc.datasets],
        }
        self.start = self.last_plot = time.perf_counter()
        self.previous_seconds = float((previous or {}).get("wall_seconds") or 0.0)
        self.worked = False  # trained or timed anything in this invocation

    def _dataset_entry(self, dataset: Dataset, previous: dict | None) -> dict:
        old = next((e for e in (previous or {}).get("datasets", []) if e.get("slug") == dataset.slug), {})
        old_steps = {v["label"]: v.get("step") for v in old.get("variants", [])}
        cfg = self.bases[dataset.slug]
        t = cfg.train
        classes, n_val = self.probes[dataset.slug]
        facts = self.facts[dataset.slug]
        first = facts[self.variants[0].label]
        entry = {"slug": dataset.slug, "label": dataset.label, "dataset": dataset.name, "path": dataset.path,
                 "config": cfg.to_dict(),
                 "setup": {"model": cfg.model.name, "params": first["params"], "size": first["size"],
                           "tokens": first.get("tokens"), "epochs": t.epochs,
                           "steps_per_epoch": _steps_per_epoch(cfg, dataset, self.info.world_size),
                           "batch_size": t.batch_size * self.info.world_size * t.accum_steps,
                           "lr": cfg.optim.lr, "classes": classes, "val_images": n_val}, "variants": []}
        for case in self.variants:
            f = facts[case.label]
            entry["variants"].append({
                "label": case.label, "kernel": case.kernel, "params": dict(case.params),
                "paper_top1": paper_top1(case), "paper_reference": get_kernel(case.kernel).reference,
                "slug": case_slug(case), "macs": f["macs"], "macs_linear": f["macs_linear"],
                "params_count": f["params"], "step": old_steps.get(case.label), "runs": [], **summarize([])})
        control_gaps(entry)
        return entry

    def _model_facts(self, dataset: Dataset) -> dict[str, dict]:
        """Parameters, MACs and attention grid per kernel (a kernel the model cannot take fails here)."""
        base, (classes, _) = self.bases[dataset.slug], self.probes[dataset.slug]
        out = {}
        for case in self.variants:
            try:
                out[case.label] = model_facts(variant_config(base, case, 0, self.out), classes)
            except (ValueError, TypeError, RuntimeError, QtvitError) as err:
                raise QtvitError(f"kernel {case.label} does not work in model {base.model.name}: "
                                 f"{str(err).splitlines()[0]}") from None
            out[case.label]["tokens"] = _attention_grids(base)
        return out

    def run(self) -> int:
        """Train every missing (dataset, kernel, seed); 0 when complete, 128+signal if interrupted."""
        rc = self.rc
        total = len(rc.datasets) * len(rc.seeds) * len(self.variants)
        done_here: list[float] = []
        index = 0
        self.echo(f"qtvit reproduce {rc.study}: {len(self.variants)} kernels × {len(rc.seeds)} seeds × "
                  f"{len(rc.datasets)} dataset(s) = {total} runs → {self.out}")
        for dataset, entry in zip(rc.datasets, self.doc["datasets"], strict=True):
            for seed in rc.seeds:
                for case, v in zip(self.variants, entry["variants"], strict=True):
                    index += 1
                    run_dir = self.out / dataset.slug / v["slug"] / f"seed{seed}"
                    where = f"[{index}/{total}] {dataset.slug} · {case.label} · seed {seed}"
                    result = self._finished(run_dir)
                    if result is None:
                        if v.get("step") is None:
                            self._time_steps(dataset, entry)
                        left = statistics.fmean(done_here or [0.0]) * (total - index + 1)
                        left = f" (about {_fmt_duration(left)} left)"
                        self.echo(f"{where}: training{left if done_here else ''}")
                        tick = time.perf_counter()
                        cfg = variant_config(self.bases[dataset.slug], case, seed, run_dir)
                        result, fit = self._train(cfg, run_dir)
                        if result is None:
                            self._save()
                            why = "paused (train.epochs_per_run)" if fit.status == "paused" else "interrupted"
                            self.echo(f"{why}; finished runs are kept in {self.out}. Continue with: "
                                      f"{self.doc['command']} --resume"
                                      + ("" if rc.output_dir else f" --output-dir {self.out}"))
                            return 0 if fit.status == "paused" else 128 + (fit.signal or 2)
                        done_here.append(time.perf_counter() - tick)
                        self.echo(f"{where}: top-1 {result['top1']:.2f}% in {result['seconds']:.0f} s")
                    else:
                        self.echo(f"{where}: done before, top-1 {result['top1']:.2f}%")
                    v["runs"] = [r for r in v["runs"] if r["seed"] != seed] + [result]
                    v.update(summarize(v["runs"]))
                    control_gaps(entry)
                    if done_here and result is not None:
                        self._save()
            if any(v.get("step") is None for v in entry["variants"]):
                self._time_steps(dataset, entry)
        self.doc["complete"] = True
        self._save(final=True)
        for line in format_text(self.doc):
            self.echo(line)
        self.echo(f"wrote {self.out / 'reproduce.json'}, {self.out / 'table.md'}, "
                  f"{self.out / (rc.study + '.png')}")
        return 0

    def _finished(self, run_dir: Path) -> dict | None:
        from ..train import distributed as du

        result = None
        if self.main and (run_dir / "result.json").is_file():
            result = json.loads((run_dir / "result.json").read_text())
        return du.broadcast_object(result, self.info)

    def _train(self, cfg, run_dir: Path):
        """Train one (kernel, seed), resuming its checkpoint if an earlier invocation was interrupted."""
        from ..train.trainer import Trainer

        self.worked = True
        resume = (run_dir / "last.pt").is_file()
        overwrite = not resume and run_dir.is_dir() and any(run_dir.iterdir())
        tick = time.perf_counter()
        fit = Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, command="qtvit reproduce",
                      task=ReproTask).fit()
        if fit.status != "done":
            return None, fit
        m = fit.metrics
        result = {"seed": cfg.train.seed, "top1": m.get("top1"), "top5": m.get("top5"), "loss": m.get("loss"),
                  "val_images": m.get("images"), "epochs": fit.epoch, "steps": fit.global_step,
                  "seconds": round(time.perf_counter() - tick, 2), "resumed": resume,
                  "images_per_s": _throughput(run_dir), "run_dir": str(run_dir)}
        if self.main:
            write_atomic(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
            if not self.rc.keep_checkpoints:
                for name in ("last.pt", "best.pt"):
                    (run_dir / name).unlink(missing_ok=True)
        return result, fit

    def _time_steps(self, dataset: Dataset, entry: dict) -> None:
        """Training-step time of every kernel (interleaved), or a note that --no-timing skipped it."""
        if not self.rc.timing:
            for v in entry["variants"]:
                v["step"] = {"skipped": "--no-timing"}
            return
        self.worked = True
        base = self.bases[dataset.slug]
        cfgs = {case.label: variant_config(base, case, 0, self.out) for case in self.variants}
        self.echo(f"{dataset.slug}: timing one training step per kernel (batch {base.train.batch_size}, "
                  f"{_train_size(base)} px)")
        steps = time_train_steps(cfgs, entry["setup"]["classes"], self.info.device, self.rc.timing_repeats)
        for v in entry["variants"]:
            v["step"] = steps.get(v["label"])
        self._save()

    def _save(self, final: bool = False) -> None:
        """Rewrite the JSON and Markdown; the plot too when final or a minute has passed since the last."""
        if not self.main:
            return
        prior = (self.previous or {}).get("invocations", [])
        if self.worked or not prior:
            seconds = time.perf_counter() - self.start
            self.invocation.update(seconds=round(seconds, 1), load_end=bench_env.machine_load())
            self.doc["invocations"] = [*prior, self.invocation]
            self.doc["wall_seconds"] = round(self.previous_seconds + seconds, 1)
        else:  # a resume that found everything done only re-renders: it is not a run of the study
            self.doc.update(invocations=prior, wall_seconds=self.previous_seconds,
                            env=self.previous.get("env", self.doc["env"]))
        write_json(self.doc, self.out / "reproduce.json")
        write_atomic(self.out / "table.md", format_markdown(self.doc))
        due = time.perf_counter() - self.last_plot > PLOT_INTERVAL_S
        if final or (due and any(v["n"] for e in self.doc["datasets"] for v in e["variants"])):
            try:
                plot_study(self.doc, self.out / f"{self.rc.study}.png")
            except ImportError as err:
                if final:
                    self.echo(f"no plot: {err}")
            self.last_plot = time.perf_counter()

    def close(self) -> None:
        """Free the shared datasets, restore the thread count, leave the process group."""
        from ..train import distributed as du

        ReproTask._shared.clear()
        torch.set_num_threads(self.previous_threads)
        du.cleanup()


def _attention_grids(cfg) -> str | None:
    """The token grids the attention blocks see at the training size, e.g. ``"8×8, 8×8"``."""
    from ..train.evaluate import build_model

    with torch.device("meta"):
        net = build_model(cfg.model, 2)
    size = _train_size(cfg)
    grids = [f"{-(-size // info['reduction'])}×{-(-size // info['reduction'])}"
             for info, stage in zip(getattr(net, "feature_info", []), getattr(net, "stages", []),
                                    strict=False)
             if any(hasattr(m, "kernel") and hasattr(m, "impl") for m in stage.modules())]
    return ", ".join(grids) or None


def _steps_per_epoch(cfg, dataset: Dataset, world_size: int) -> int | None:
    """Optimizer steps per epoch of ``cfg`` (the sampler's rule: full global batches, capped)."""
    n = {"demo": cfg.data.demo_train_size, "fashion-mnist": 60_000}.get(dataset.name)
    if n is None:
        return cfg.train.max_steps_per_epoch
    steps = n // (cfg.train.batch_size * world_size * cfg.train.accum_steps)
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def _probe_dataset(cfg) -> tuple[int, int]:
    """Classes and evaluated held-out images; fails before any training if the data cannot be read."""
    from ..data import build_datasets

    d = cfg.data
    _, val, classes = build_datasets(d.dataset, d.path, train_split=d.train_split, val_split=d.val_split,
                                     val_fraction=d.val_fraction, seed=cfg.train.seed, demo_train_size=16,
                                     demo_val_size=d.demo_val_size, demo_image_size=16)
    return len(classes), len(val) if d.max_val_images is None else min(len(val), d.max_val_images)


def run_study(rc: ReproConfig, echo: Echo = print, resume: bool = False, overwrite: bool = False,
              command: str | None = None) -> tuple[int, dict]:
    """Run (or resume) a study; returns the exit code and the result document."""
    study = Study(rc, echo, resume, overwrite, command)
    try:
        code = study.run()
    finally:
        study.close()
    return code, study.doc


# ------------------------------------------------------------------------------ CLI

FLAG_HELP = {
    "kernels": "kernels, optionally with parameters as name:param=value;param=value",
    "seeds": "training seeds (default: 0,1,2)",
    "data": "datasets: demo, fashion-mnist[:IDX_DIR], or an image folder (default: demo,fashion-mnist)",
    "model": f"registered model (default: the recipes' {DEFAULT_MODEL} layout for the built-in data, "
             f"{FOLDER_MODEL} with its recipe for a folder)",
    "config": "trainer YAML recipe for every dataset (default: configs/ablation/<dataset>.yaml for demo "
              "and fashion-mnist, the model's recipe for a folder)",
    "epochs": "training epochs per run (default: the recipe's)",
    "steps": "cap on optimizer steps per epoch (default: the recipe's)",
    "img_size": "training and evaluation resolution (single-resolution)",
    "batch_size": "images per step and process",
    "val_images": "evaluate on the first N held-out images",
    "threads": "torch intra-op threads (default: 1 for the built-in recipes on a CPU, else torch's)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit reproduce`` with ``kernels`` and ``reductions``."""
    p = subparsers.add_parser("reproduce", help="the paper's kernel ablations (Tables 2 and 3) on your data",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    for name, spec in STUDIES.items():
        sp = studies.add_parser(name, help=f"{spec['table']}: {spec['title']}",
                                description=f"{spec['table']} of the paper ({spec['title']}) and the 'none' "
                                            "control: train the same model and data with each kernel, "
                                            "several seeds; write JSON, Markdown and PNG.")
        for flag, text in FLAG_HELP.items():
            kind = int if flag in ReproConfig.FLAGS[2:] else str
            extra = f" (default: {','.join(spec['variants'])})" if flag == "kernels" else ""
            sp.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=text + extra)
        for flag, text in (("ape", "APE on the keys"), ("shortcut", "GELU(BN(v)) shortcut")):
            sp.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"{text} for every kernel (default: the model builder's)")
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        sp.add_argument("--output-dir", help=f"results folder (default: reproduce-{name})")
        for flag, text in (("resume", "continue the study in --output-dir"),
                           ("overwrite", "start over in an existing --output-dir"),
                           ("quick", "smoke test: 32 px, 2 steps of batch 8, 32 images"),
                           ("no-timing", "skip the training-step timing"),
                           ("keep-checkpoints", "keep each run's last.pt"),
                           ("no-progress", "no progress bars")):
            sp.add_argument(f"--{flag}", action="store_true", help=text)
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="trainer config overrides section.key=value, applied last (e.g. optim.lr=1e-3)")
        sp.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _items(flag: str, text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise QtvitError(f"{flag}: empty list")
    return items


def config_from_args(args: argparse.Namespace) -> ReproConfig:
    """Resolve the flags into a validated :class:`ReproConfig`."""
    over: dict[str, object] = {"study": args.study}
    if args.kernels is not None:
        try:
            over["variants"] = tuple(parse_case(s) for s in _items("--kernels", args.kernels))
        except (ValueError, TypeError) as err:
            raise QtvitError(f"--kernels: {err}") from None
    if args.seeds is not None:
        try:
            over["seeds"] = tuple(int(s) for s in _items("--seeds", args.seeds))
        except ValueError:
            raise QtvitError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    if args.data is not None:
        over["datasets"] = tuple(parse_dataset(s) for s in _items("--data", args.data))
    over.update({flag: getattr(args, flag) for flag in (*ReproConfig.FLAGS, "ape", "shortcut", "output_dir")
                 if getattr(args, flag) is not None})
    if args.model is not None:
        from ..models import resolve_model_name

        resolve_model_name(args.model)  # raises, listing the valid models
    over.update(overrides=tuple(args.overrides), device=args.device, timing=not args.no_timing,
                keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress)
    rc = replace(QUICK if args.quick else ReproConfig(), **over)
    rc.validate()
    return rc


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit reproduce kernels|reductions``."""
    code, _ = run_study(config_from_args(args), echo=print, resume=args.resume, overwrite=args.overwrite)
    return code


__all__ = ["CONTROL", "Dataset", "QUICK", "RECIPES", "ReproConfig", "ReproTask", "STUDIES", "Study",
           "base_config", "case_slug", "command_line", "config_from_args", "control_gaps", "format_markdown",
           "format_text", "model_facts", "paper_top1", "parse_dataset", "plot_study", "prepare_output",
           "register", "run", "run_study", "summarize", "time_train_steps", "variant_config"]
