"""Typed training configuration: dataclasses, YAML recipes with ``_base_`` layering, overrides.

A config has six sections (``model``, ``data``, ``aug``, ``optim``, ``train``, ``run``) and names
its task with a top-level ``task:`` key (default ``classification``; see
:mod:`qtvit.train.task`). Other tasks use a subclass of :class:`Config` whose ``data``/``aug``
sections are their own dataclasses (their ``data`` extends :class:`BaseDataConfig`). The
dataclass defaults are the paper's recipe for QT-ViT-1 (docs/DESIGN.md §recipe) on ImageNet; the YAML files in
``configs/`` restate the recipe per model with the reason for every value. Values can be
overridden with ``section.key=value`` strings (parsed as YAML: ``aug.train_sizes=[160,224]``,
``model.kernel=null``). Unknown sections or keys and badly typed values raise
:class:`~qtvit.errors.QtvitError` with one line listing the valid choices.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import QtvitError

# Recipes: packaged beside the code (qtvit/configs) or in the repository's configs/ folder.
_HERE = Path(__file__).resolve()
CONFIG_DIRS = (_HERE.parents[1] / "configs", _HERE.parents[2] / "configs")


@dataclass
class ModelConfig:
    """Which network to train.

    ``kernel``/``ape``/``shortcut`` left at ``None`` keep the builder's defaults (QT-ViT: ``qt``,
    APE on, GELU(BN(v)) shortcut on). ``kwargs`` go to the builder unchanged (e.g. a custom
    width/depth for the demo). ``init_checkpoint`` initialises the weights from any layout
    :func:`qtvit.models.checkpoint.load_checkpoint` reads (fine-tuning; the classifier is kept
    fresh when the number of classes differs).
    """

    name: str = "qtvit_b1"
    kernel: str | None = None
    ape: bool | None = None
    shortcut: bool | None = None
    drop_path_rate: float = 0.05  # B1/B2 in the paper; 0.1 for larger models
    kwargs: dict = field(default_factory=dict)
    init_checkpoint: str | None = None


@dataclass
class BaseDataConfig:
    """Loader settings every task's ``data`` section has (the Trainer reads these)."""

    num_workers: int = 8
    pin_memory: bool = True
    max_val_images: int | None = None  # evaluate on a prefix (quick checks); None = all


@dataclass
class DataConfig(BaseDataConfig):
    """Where the images come from.

    ``dataset``: ``folder`` (``path`` holds ``train/`` and ``val/`` class folders, or only class
    folders, of which ``val_fraction`` is held out), ``demo`` (the built-in relational-shapes
    set, :mod:`qtvit.data.demo`) or ``fashion_mnist`` (IDX files in ``path``, default Debian's).
    """

    dataset: str = "folder"
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.1
    skip_bad_images: bool = False
    demo_image_size: int = 96
    demo_train_size: int = 10_000
    demo_val_size: int = 2_000
    demo_cache: bool = False  # keep rendered demo images in memory (fast epochs, ~12 KB per 64 px image)


@dataclass
class AugConfig:
    """Training-time data augmentation and the loss targets (all switchable)."""

    multi_res: bool = True  # a random resolution per batch, same on every rank
    train_sizes: list[int] = field(default_factory=lambda: [128, 160, 192, 224])
    no_aug: bool = False  # only resize + centre crop (overrides everything below except mixup)
    crop_scale: list[float] | None = field(default_factory=lambda: [0.08, 1.0])  # None: no random crop
    hflip: float = 0.5
    randaug: bool = True
    randaug_n: int = 1
    randaug_m: int = 3
    randaug_mstd: float = 0.5
    color_jitter: float = 0.0
    train_interpolation: str = "bicubic"
    re_prob: float = 0.0  # random erasing (0.2 for the L models)
    mixup_alpha: float = 0.1
    cutmix_alpha: float = 0.1
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    bce: bool = True  # binary cross-entropy (the paper) instead of softmax cross-entropy


@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule and gradient clipping.

    The learning rate is ``lr`` if set, else ``base_lr × global_batch / base_batch`` (the
    paper scales 2.5e-4 per 128 images linearly with the number of GPUs).
    """

    opt: str = "adamw"
    lr: float | None = None
    base_lr: float = 2.5e-4
    base_batch: int = 128
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # "authors": decay all but biases and norm layers, so the APE, the kernel constant and the value
    # shortcut's BN weight are decayed, as in the released recipe; "timm": no decay on any tensor
    # with <= 1 dim nor on the APEs (qtvit.train.optim).
    decay_rule: str = "authors"
    sched: str = "cosine"
    # timm's decay_rate: the power of the "poly" schedule (mmseg's poly uses 1.0, i.e. linear decay),
    # the factor of "step"/"multistep"; the cosine schedule ignores it.
    decay_rate: float = 0.1
    decay_milestones: list[int] | None = None  # "multistep": epochs at which lr is multiplied by decay_rate
    warmup_epochs: float = 20
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    clip_grad: float | None = 2.0
    clip_mode: str = "value"  # the paper clips each gradient element, not the norm


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, EMA, BN re-estimation, self-distillation, robustness."""

    epochs: int = 320  # total, warm-up included (paper: 300 + 20)
    batch_size: int = 128  # per process and micro-batch; global = × processes × accum_steps
    accum_steps: int = 1
    seed: int = 0
    device: str = "auto"  # auto: the local CUDA device under torchrun, else cuda:0, else cpu
    amp: str = "none"  # none | bf16 | fp16 (the attention kernels stay in fp32 either way)
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    ema: bool = True
    ema_decay: float = 0.9998
    ema_warmup_steps: int | None = 4000  # decay·(1 − exp(−step/4000)); None: constant decay
    eval_ema: bool = True  # evaluate (and pick `best` by) the EMA weights when EMA is on
    bn_reestimate: bool = True
    bn_images: int = 16_000
    distill_ratio: float = 0.0  # EMA self-distillation weight r (L models: 2.0 / 2.75 / 3.5)
    distill_start: float = 0.25  # fraction of training after which it starts
    eval_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    eval_batch_size: int | None = None  # None: 2 × batch_size
    eval_size: int | None = None  # None: the model's pretrained_cfg input size
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    max_steps_per_epoch: int | None = None  # cap steps per epoch (quick runs); None: all
    epochs_per_run: int | None = None  # stop after this many epochs in one invocation (job limits)
    find_unused_parameters: bool = False


@dataclass
class RunConfig:
    """Outputs and reporting (only rank 0 writes)."""

    output: str | None = None  # run folder; None: runs/<model>-<date>-<time>
    log_interval: int = 50  # steps between JSONL/CSV step records
    progress: bool = True  # tqdm bars
    tensorboard: bool = False
    save_best: bool = True


@dataclass
class Config:
    """The whole run, as written to ``<run>/config.yaml`` (with its ``task`` key)."""

    task: ClassVar[str] = "classification"

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return {"task": self.task, **asdict(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check(self) -> None:
        """Cross-field checks (raise QtvitError naming the value); subclasses extend this."""
        check_common(self)
        check_classification(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Config))


def sections(cfg: Config) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cfg))


def _check_value(where: str, hint: Any, value: Any) -> Any:
    """Return ``value`` converted to ``hint`` (int → float, list → tuple-free list) or raise QtvitError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, option, value)
            except QtvitError:
                continue
        raise QtvitError(f"{where}: expected {_hint_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise QtvitError(f"{where}: expected a list of {_hint_name(typing.get_args(hint)[0])}, "
                             f"got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise QtvitError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    raise QtvitError(f"{where}: expected {_hint_name(hint)}, got {value!r}")


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _hint_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_hint_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _check_section(cfg: Config, section: str, source: str) -> None:
    if section not in sections(cfg):
        raise QtvitError(f"{source}: unknown config section {section!r}; valid sections: "
                         f"{', '.join(sections(cfg))}")


def _set(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    _check_section(cfg, section, source)
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise QtvitError(f"{source}: unknown key {section}.{key}; valid keys in {section}: "
                         f"{', '.join(hints)}")
    setattr(obj, key, _check_value(f"{source}: {section}.{key}", hints[key], value))


def merge_dict(cfg: Config, data: dict, source: str) -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping to ``cfg`` in place (and return it)."""
    if not isinstance(data, dict):
        raise QtvitError(f"{source}: expected a mapping of sections ({', '.join(sections(cfg))}), "
                         f"got {type(data).__name__}")
    for section, values in data.items():
        if section == "task":
            if values != cfg.task:
                raise QtvitError(f"{source}: task {values!r} does not match this {cfg.task} config")
            continue
        _check_section(cfg, section, source)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise QtvitError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set(cfg, section, str(key), value, source)
    return cfg


def find_config(name_or_path: str) -> Path:
    """Resolve a recipe: an existing path, else ``<name>[.yaml]`` in the package/repo ``configs/``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    filename = name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
    for candidate in (d / filename for d in CONFIG_DIRS):
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")
                    if not p.stem.startswith("_")})
    raise FileNotFoundError(f"config not found: {name_or_path} (not a file; known recipes: "
                            f"{', '.join(known) or 'none'})")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path``, resolving ``_base_`` (a path relative to the file) recursively."""
    if path in seen:
        raise QtvitError(f"config {path}: _base_ cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise QtvitError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QtvitError(f"config {path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base).resolve(), (*seen, path))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=1e-3"`` → ``("optim", "lr", 0.001)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise QtvitError(f"bad override {text!r}: expected section.key=value, e.g. optim.lr=1e-3")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise QtvitError(f"bad override {text!r}: expected section.key=value with one dot; "
                         f"sections: {', '.join(SECTIONS)}")
    section, key = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def config_class(task: str | None) -> type[Config]:
    """The config dataclass of ``task`` (None: classification's :class:`Config`)."""
    if task is None or task == Config.task:
        return Config
    from .task import get_task

    try:
        cls = get_task(task).config_class
    except ValueError as err:
        raise QtvitError(str(err)) from None
    return cls or Config


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None, task: str | None = None) -> Config:
    """Build a config: defaults ← ``base`` mapping ← ``recipe`` YAML ← ``overrides``.

    The config class follows the task: ``task`` if given, else the recipe's (or ``base``'s)
    top-level ``task:`` key, else classification.
    """
    layers = [(dict(base), "saved config")] if base else []
    if recipe is not None:
        path = find_config(str(recipe))
        layers.append((_read_yaml(path.resolve()), str(path)))
    for data, _ in layers:
        task = task or data.get("task")
    cfg = config_class(task)()
    for data, source in layers:
        merge_dict(cfg, data, source)
    for text in overrides:
        section, key, value = parse_override(text)
        _set(cfg, section, key, value, f"override {text!r}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that one-key type checks cannot make; raise QtvitError naming the value."""
    cfg.check()


def check_classification(cfg: Config) -> None:
    """Checks of the classification ``data``/``aug`` sections."""
    t, a, d = cfg.train, cfg.aug, cfg.data
    if d.dataset not in ("folder", "demo", "fashion_mnist"):
        raise QtvitError(f"data.dataset={d.dataset!r} is not valid; choose from folder, demo, fashion_mnist")
    if not a.train_sizes or any(s < 8 for s in a.train_sizes):
        raise QtvitError(f"aug.train_sizes must list image sizes of at least 8 pixels; got {a.train_sizes}")
    scale = a.crop_scale
    if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
        raise QtvitError(f"aug.crop_scale must be [min, max] with 0 < min <= max <= 1; got {a.crop_scale}")
    mixup = a.mixup_alpha > 0 or a.cutmix_alpha > 0
    if mixup and t.batch_size % 2:
        raise QtvitError(f"train.batch_size={t.batch_size} must be even when mixup/cutmix is on "
                         "(timm mixes each batch with its reverse)")
    if not 0 < d.val_fraction < 1:
        raise QtvitError(f"data.val_fraction must be in (0, 1); got {d.val_fraction}")


def check_common(cfg: Config) -> None:
    """Checks of the sections every task shares (model, optim, train, run)."""
    t, o = cfg.train, cfg.optim
    from .optim import DECAY_RULES

    choices = {"train.amp": (t.amp, ("none", "bf16", "fp16")),
               "optim.clip_mode": (o.clip_mode, ("value", "norm", "agc")),
               "optim.decay_rule": (o.decay_rule, DECAY_RULES)}
    for where, (value, valid) in choices.items():
        if value not in valid:
            raise QtvitError(f"{where}={value!r} is not valid; choose from {', '.join(valid)}")
    positive = {"train.epochs": t.epochs, "train.batch_size": t.batch_size,
                "train.accum_steps": t.accum_steps, "train.max_bad_steps": t.max_bad_steps,
                "train.eval_interval": t.eval_interval, "optim.base_batch": o.base_batch}
    for where, value in positive.items():
        if value < 1:
            raise QtvitError(f"{where} must be at least 1; got {value}")
    if len(o.betas) != 2:
        raise QtvitError(f"optim.betas must be two numbers; got {o.betas}")
    if not 0 <= o.warmup_epochs < t.epochs:
        raise QtvitError(f"optim.warmup_epochs={o.warmup_epochs} must be in [0, train.epochs={t.epochs})")
    if not 0 <= t.distill_start <= 1:
        raise QtvitError(f"train.distill_start must be a fraction in [0, 1]; got {t.distill_start}")
    if t.distill_ratio > 0 and not t.ema:
        raise QtvitError("train.distill_ratio > 0 needs train.ema=true (the EMA model is the teacher)")


def config_from_dict(data: dict) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output (e.g. a checkpoint's), of its task's class."""
    return merge_dict(config_class(data.get("task"))(), data, "saved config")

