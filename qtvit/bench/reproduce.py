"""``qtvit reproduce kernels|reductions``: the paper's kernel ablations (Tables 2 and 3) on your data.

One run per (dataset, kernel, seed) on the project's trainer, nothing but the kernel changed, each
study ending with the ``none`` control; what is reported and how: docs/BENCHMARKS.md.
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
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import QtvitError
from ..io import write_atomic, write_json
from ..kernels import get_kernel
from ..train.classification import ClassificationTask
from . import env as bench_env
from .approximation import KernelCase, parse_case
from .cli import add_config_arguments, config_from_args, config_helps, field_kind, flag, flag_name, show_value
from .runner import Echo, check, error_text, format_grid

SCHEMA_VERSION = 2
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
        """The command-line form :meth:`parse` reads back."""
        return self.path if self.name == "folder" else self.name + (f":{self.path}" if self.path else "")

    @staticmethod
    def parse(text: str) -> Dataset:
        """``demo``, ``fashion-mnist``, ``fashion-mnist:/dir/with/idx`` or an image-folder path."""
        text = text.strip()
        name, sep, path = text.partition(":")
        key = name.replace("_", "-").lower()
        if key == "demo" and not sep:
            return Dataset("demo")
        if key == "fashion-mnist":
            return Dataset("fashion-mnist", path or None)
        if not Path(text).exists():
            raise FileNotFoundError(f"--data {text!r}: neither demo, fashion-mnist[:DIR] nor an existing "
                                    "folder")
        if not Path(text).is_dir():
            raise NotADirectoryError(f"--data {text!r} is not a folder (expected class folders, or train/ "
                                     "and val/)")
        return Dataset("folder", text)


@dataclass(frozen=True)
class ReproConfig:
    """Settings of one ``qtvit reproduce`` invocation (the CLI flags map onto these fields); ``None``
    means the recipe's value (``configs/ablation/``, or for a folder ``config`` or the model's)."""

    FLAG_NAMES: ClassVar[dict[str, str]] = {"variants": "kernels", "datasets": "data"}

    study: str = "kernels"
    variants: tuple[KernelCase, ...] | None = flag(  # None: the study's defaults
        None, "kernels, optionally with parameters as name:param=value;param=value")
    seeds: tuple[int, ...] = flag(DEFAULT_SEEDS, "training seeds")
    datasets: tuple[Dataset, ...] = flag((Dataset("demo"), Dataset("fashion-mnist")),
                                         "datasets: demo, fashion-mnist[:IDX_DIR], or an image folder")
    model: str | None = flag(None, f"registered model (default: the recipes' {DEFAULT_MODEL} layout for the "
                                   f"built-in data, {FOLDER_MODEL} with its recipe for a folder)")
    config: str | None = flag(None, "trainer YAML recipe for every dataset (default: configs/ablation/"
                                    "<dataset>.yaml for the built-in data, the model's recipe for a folder)")
    epochs: int | None = flag(None, "training epochs per run (default: the recipe's)")
    steps: int | None = flag(None, "cap on optimizer steps per epoch (default: the recipe's)")
    img_size: int | None = flag(None, "training and evaluation resolution (single-resolution)")
    batch_size: int | None = flag(None, "images per step and process")
    val_images: int | None = flag(None, "evaluate on the first N held-out images")
    threads: int | None = flag(None, "torch intra-op threads (default: 1 for the built-in datasets on a CPU, "
                                     "whatever the --config, else torch's)")
    ape: bool | None = flag(None, "use APE on the keys, for every kernel (default: the model builder's)")
    shortcut: bool | None = flag(None, "use the GELU(BN(v)) shortcut, for every kernel (default: the model "
                                       "builder's)")
    overrides: tuple[str, ...] = ()  # trainer config overrides section.key=value, applied last
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    output_dir: str | None = flag(None, "results folder (default: reproduce-<study>)")
    quick: bool = flag(False, "smoke test: 32 px, 2 steps of batch 8, 32 images")
    timing: bool = flag(True, "time one training step per kernel")
    timing_repeats: int = 5
    keep_checkpoints: bool = flag(False, "keep each run's last.pt")
    progress: bool = flag(True, "show progress bars")

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
        """Raise ``QtvitError``/``ValueError`` naming the first bad setting (unknown kernels and models
        list the valid ones)."""
        from ..models import resolve_model_name

        if self.study not in STUDIES:
            raise QtvitError(f"unknown study {self.study!r}; valid: {', '.join(STUDIES)}")
        labels = [v.label for v in self.variant_list()]
        if len(set(labels)) != len(labels) or not labels:
            raise QtvitError(f"a kernel is listed twice: {', '.join(labels)}" if labels
                             else "no kernels to compare")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise QtvitError(f"seeds must be distinct non-negative integers; got {list(self.seeds)}")
        if not self.datasets or len({d.slug for d in self.datasets}) != len(self.datasets):
            raise QtvitError(f"two datasets share a name: {', '.join(d.label for d in self.datasets)}"
                             if self.datasets else "no datasets")
        check(self, "≥ 1", "epochs", "steps", "batch_size", "val_images", "threads", "timing_repeats")
        check(self, "≥ 16", "img_size")
        if self.model is not None:
            resolve_model_name(self.model)  # raises, listing the valid models


QUICK = ReproConfig(quick=True, timing_repeats=1)


def resolve_threads(rc: ReproConfig, device: torch.device) -> int | None:
    """Intra-op threads: ``rc.threads``, else 1 when only built-in datasets train on a CPU, else None
    (torch's default). The built-in datasets' models are small (≈0.1–0.5 s per step on one core)
    and their studies are meant to run side by side, one per core; with a second process running,
    OpenMP's threads wait for each other (two 2-thread studies on 2 cores ran several times slower
    than two 1-thread ones). A ``--config`` recipe for those datasets keeps the rule: it is one of
    the same small studies."""
    if rc.threads is not None:
        return rc.threads
    builtin = all(d.builtin for d in rc.datasets)
    return 1 if builtin and device.type == "cpu" else None


def command_line(rc: ReproConfig) -> str:
    """The ``qtvit reproduce`` command that regenerates ``rc`` (flags that differ from the defaults)."""
    default, hints = QUICK if rc.quick else ReproConfig(), typing.get_type_hints(ReproConfig)
    parts = ["qtvit", "reproduce", rc.study]
    for name in config_helps(ReproConfig):
        value, kind, flag = getattr(rc, name), field_kind(hints[name]), flag_name(ReproConfig, name)
        if value != getattr(default, name) or (name == "quick" and value):
            parts.append(f"--{'' if value else 'no-'}{flag[2:]}" if kind == "bool" else
                         f"{flag} {show_value(value, kind)}")
    return " ".join(parts + list(rc.overrides))


def paper_top1(case: KernelCase) -> float | None:
    """The paper's ImageNet top-1 for ``case`` from its kernel's ``reference``: one number (``"79.4
    (Table 2)"``) or one per setting (``"79.3 (pool 2) / 79.1 (pool 4)"``, ``"79.4 / 79.3 / 79.1
    (chunks 2 / 4 / 8)"``); None for a setting the paper did not report."""
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
    """The trainer :class:`~qtvit.train.Config` for ``dataset`` before the kernel and seed are set: the
    recipe (``--config``, ``configs/ablation/<dataset>.yaml``, the model's) ← ``--quick`` ← flags ←
    overrides."""
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


class ReproTask(ClassificationTask):
    """Classification, for a study that trains many runs in one process: the built-in datasets are
    shared between the runs of one seed (every kernel reads the same images, the demo set renders
    each once; only the last key is kept, runs being seed-major); with ``aug.no_aug`` the transforms
    are deterministic, so each transformed image is kept after its first use and the seed's later
    runs read it from memory (float32 at the training size: ~50 KB an image at 64 px, ~0.5 GB for a
    demo seed); and evaluation does not crop either (``crop_pct`` 1.0: the plain ViTs' 0.875 would
    zoom in, which on the demo set moves the objects and can change the class)."""

    _shared: dict[tuple, tuple] = {}

    def load_data(self, seed: int) -> list[str]:
        d = self.cfg.data
        if d.dataset not in ("demo", "fashion_mnist"):
            self._memo = None
            return super().load_data(seed)
        key = (d.dataset, d.path, seed, d.demo_image_size, d.demo_train_size, d.demo_val_size, d.demo_cache)
        if key not in ReproTask._shared:
            ReproTask._shared.clear()
            classes = super().load_data(seed)
            ReproTask._shared[key] = (self.train_base, self.val_base, classes, {})
        self.train_base, self.val_base, classes, self._memo = ReproTask._shared[key]
        self._build_loss(len(classes))
        return classes

    def _memoised(self, dataset: torch.utils.data.Dataset, split: str) -> torch.utils.data.Dataset:
        if not self.cfg.aug.no_aug or getattr(self, "_memo", None) is None:
            return dataset
        # The transforms follow the model's data config (size, interpolation, mean/std); runs whose
        # configs differ get their own store.
        key = (split, repr(sorted(self.data_cfg.items())), tuple(self.train_sizes()), self.eval_size())
        return MemoisedDataset(dataset, self._memo.setdefault(key, {}))

    def train_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        return self._memoised(super().train_dataset(model), "train")

    def val_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        return self._memoised(super().val_dataset(model), "val")

    def build_model(self, num_classes: int):
        model = super().build_model(num_classes)
        cfg = getattr(model, "pretrained_cfg", None)
        if self.cfg.aug.no_aug and isinstance(cfg, dict) and cfg.get("crop_pct", 1.0) != 1.0:
            model.pretrained_cfg = {**cfg, "crop_pct": 1.0}
        return model


class MemoisedDataset(torch.utils.data.Dataset):
    """``dataset`` whose items are kept in ``store`` after the first read, for deterministic
    transforms only. Training keys ``(index, size, seed)`` are stored by ``(index, size)``: without
    augmentation the per-sample seed does not change the image. Items are returned as stored; the
    loader's collate copies them into the batch, so nothing downstream writes into the store."""

    def __init__(self, dataset: torch.utils.data.Dataset, store: dict) -> None:
        self.dataset, self.store = dataset, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        slot = key[:2] if isinstance(key, tuple) else key
        item = self.store.get(slot)
        if item is None:
            item = self.store[slot] = self.dataset[key]
        return item


def model_facts(cfg, num_classes: int) -> dict:
    """Parameters, attention token grids (``"8×8, 8×8"``) and MACs (as run; linear paths forced) of
    ``cfg.model`` at the training size."""
    from ..models.macs import count_macs
    from ..train.evaluate import build_model

    size = _train_size(cfg)
    with torch.device("meta"):
        net = build_model(cfg.model, num_classes)
    grids = [f"{-(-size // info['reduction'])}×{-(-size // info['reduction'])}"  # ⌈size / stride⌉
             for info, stage in zip(getattr(net, "feature_info", []), getattr(net, "stages", []),
                                    strict=False)
             if any(hasattr(m, "kernel") and hasattr(m, "impl") for m in stage.modules())]
    facts = {"params": sum(p.numel() for p in net.parameters()), "size": size, "macs_linear": None,
             "tokens": ", ".join(grids) or None, "macs": count_macs(net, (1, 3, size, size))}
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


def time_train_steps(cfgs: dict[str, object], num_classes: int, device: torch.device, repeats: int = 5
                     ) -> dict[str, dict]:
    """Time one training step per variant in interleaved rounds: forward + loss (BCE or cross-entropy,
    as configured) + backward + AdamW on one random batch of ``train.batch_size`` images at the
    training size, under the configured AMP and memory format. Returns label →
    :meth:`qtvit.bench.timing.Samples.stats` (``median_ms`` ...) or ``{"error": text}``."""
    import torch.nn.functional as F

    from ..train.evaluate import build_model
    from ..train.trainer import AMP_DTYPES
    from .timing import time_interleaved, train_step

    fns: dict[str, Callable[[], None]] = {}
    out: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(0)
    for label, cfg in cfgs.items():
        size, batch = _train_size(cfg), cfg.train.batch_size
        try:
            torch.manual_seed(0)
            net = build_model(cfg.model, num_classes).to(device).train()
        except (ValueError, TypeError, RuntimeError, QtvitError) as err:
            out[label] = {"error": error_text(err)}
            continue
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format  # as trained
        x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        target = F.one_hot(y, num_classes).float() if cfg.aug.bce else y
        loss_fn = F.binary_cross_entropy_with_logits if cfg.aug.bce else F.cross_entropy
        net = net.to(memory_format=fmt)
        fns[label] = train_step(net, x, target, loss_fn, AMP_DTYPES[cfg.train.amp], lr=1e-5)
    timed = time_interleaved(fns, device=device, warmup=2, repeats=repeats, min_repeats=min(3, repeats),
                             min_sample_seconds=0.0, variant_seconds=1e9)  # always `repeats` samples
    return {**out, **{label: {"error": error_text(err)} for label, err in timed.errors.items()},
            **{label: samples.stats() for label, samples in timed.samples.items()}}


def prepare_output(rc: ReproConfig, resume: bool, overwrite: bool) -> dict | None:
    """Check ``rc.out_dir()``: fresh, resumed (settings must match; returns the previous
    ``reproduce.json``) or overwritten, never silently reused."""
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


def _fmt_macs(macs: int | None) -> str:
    if macs is None:
        return "–"
    value, unit = next((macs / scale, unit) for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
                       if macs >= scale or scale == 1)
    return f"{value:#.3g}".rstrip(".") + unit  # three significant digits, trailing zeros kept


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
        mean, std, ms = v["top1_mean"], v["top1_std"], (v.get("step") or {}).get("median_ms")
        top1 = "–" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        paper = "–" if v["paper_top1"] is None else f"{v['paper_top1']:.1f}"
        rows.append([v["label"], top1, str(v["n"]), gap, paper,
                     _fmt_macs(v.get("macs")), _fmt_macs(v.get("macs_linear")),
                     "–" if ms is None else f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"])
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
    header = HEADER[:4] + ["paper", "MACs", "linear", "step ms"]
    return [line for entry in doc["datasets"] for line in [f"{entry['label']}: {_dataset_setup(entry)}"]
            + ["  " + row for row in format_grid(header, _table_rows(entry))]]


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
        # from 0: no false gaps
        ax.set(ylim=(0.0, min(100.0, max(seen, default=10.0)) * 1.25 + 2.0), ylabel="held-out top-1 % (ours)")
        ax.set_xticks(list(xs), [v["label"] for v in variants], rotation=35, ha="right")
        ax.set_title(entry["label"], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        paper = [(x, v["paper_top1"]) for x, v in zip(xs, variants, strict=True)
                 if v["paper_top1"] is not None]
        if paper:
            twin = ax.twinx()
            twin.plot(*zip(*paper, strict=True), "kD", markersize=6, label="paper (ImageNet)")
            low, high = min(p[1] for p in paper) - 1.0, max(p[1] for p in paper) + 1.0
            twin.set(ylabel="paper ImageNet top-1 %", ylim=(low, low + 1.3 * (high - low)))
            handles += twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left", ncol=3,
                  framealpha=0.9)
    study = STUDIES[doc["study"]]
    fig.suptitle(f"{study['table']}: {study['title']}, same model and budget per kernel")
    fig.tight_layout()
    return _save(fig, path)


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
                        left = _fmt_duration(statistics.fmean(done_here or [0.0]) * (total - index + 1))
                        self.echo(f"{where}: training" + (f" (about {left} left)" if done_here else ""))
                        cfg = variant_config(self.bases[dataset.slug], case, seed, run_dir)
                        result, fit = self._train(cfg, run_dir)
                        if result is None:
                            self._save()
                            why = "paused (train.epochs_per_run)" if fit.status == "paused" else "interrupted"
                            self.echo(f"{why}; finished runs are kept in {self.out}. Continue with: "
                                      f"{self.doc['command']} --resume"
                                      + ("" if rc.output_dir else f" --output-dir {self.out}"))
                            return 0 if fit.status == "paused" else 128 + (fit.signal or 2)
                        done_here.append(result["seconds"])
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
        from ..train.metrics import read_metrics
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
        rates = [r["images_per_s"] for r in read_metrics(run_dir, "step")
                 if isinstance(r.get("images_per_s"), float)]
        rates = rates[1:] or rates  # the first record is the warm-up
        result = {"seed": cfg.train.seed, "top1": m.get("top1"), "top5": m.get("top5"), "loss": m.get("loss"),
                  "val_images": m.get("images"), "epochs": fit.epoch, "steps": fit.global_step,
                  "seconds": round(time.perf_counter() - tick, 2), "resumed": resume,
                  "images_per_s": statistics.median(rates) if rates else None, "run_dir": str(run_dir)}
        if self.main:
            write_json(result, run_dir / "result.json")
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
        helps = config_helps(ReproConfig)
        helps["variants"] += f" (default: {','.join(spec['variants'])})"
        add_config_arguments(sp, ReproConfig, helps)
        sp.add_argument("--resume", action="store_true", help="continue the study in --output-dir")
        sp.add_argument("--overwrite", action="store_true", help="start over in an existing --output-dir")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="trainer config overrides section.key=value, applied last (e.g. optim.lr=1e-3)")
        sp.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit reproduce kernels|reductions``."""
    base = replace(QUICK if args.quick else ReproConfig(), study=args.study, overrides=tuple(args.overrides))
    return run_study(config_from_args(base, args), echo=print, resume=args.resume,
                     overwrite=args.overwrite)[0]

