"""``qtvit train``, ``qtvit eval`` and ``qtvit demo``.

Examples::

    qtvit demo                                          # ~5 min on a laptop CPU
    qtvit train --config qtvit_1 --data /data/imagenet  # the paper's recipe for QT-ViT-1
    torchrun --nproc_per_node 8 -m qtvit train --config qtvit_1 --data /data/imagenet
    qtvit train --output runs/x --resume                # continue an interrupted run
    qtvit train --config qtvit_1 --data /d optim.lr=1e-3 train.amp=bf16 aug.train_sizes=[224]
    qtvit eval --model qtvit_1 --checkpoint qtvit_b1.pt --data /data/imagenet
    qtvit eval --checkpoint runs/x/best.pt --ema --data /data/imagenet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OVERRIDE_HELP = "config overrides section.key=value (YAML values), e.g. optim.lr=1e-3 train.amp=bf16"
EPOCHS_HELP = "shortcut for train.epochs=N"
RUN_DIR_HELP = "run folder (default: runs/<model>-<date>-<time>)"
RESUME_HELP = "continue the run in --output from its last.pt"
OVERWRITE_HELP = "start over in an existing run folder"


def add_run_arguments(p: argparse.ArgumentParser, output: str, *, data: str | None = None,
                      model: bool = False, epochs: str | None = EPOCHS_HELP,
                      resume: str = "continue the run in --output",
                      overwrite: str = "start over in an existing --output", required: bool = False) -> None:
    """The flags every training command shares (train, demo; seg and det): run folder, the data/model/
    epochs shortcuts, --resume, --overwrite and the KEY=VALUE overrides."""
    p.add_argument("--output", required=required, help=output)
    if data:
        p.add_argument("--data", help=data)
    if model:
        p.add_argument("--model", help="shortcut for model.name=NAME")
    if epochs:
        p.add_argument("--epochs", type=int, help=epochs)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model (YAML recipe + overrides; torchrun for many GPUs)",
                              description="Train a model from a YAML recipe in configs/ (or a file), with "
                                          "section.key=value overrides. Launch with torchrun for several "
                                          "processes/GPUs/nodes.")
    p.add_argument("--config", help="recipe name (qtvit_1 ... qtvit_6, demo) or YAML path")
    p.add_argument("--skip-bad-images", action="store_true", help="count and skip unreadable images")
    add_run_arguments(p, RUN_DIR_HELP, data="shortcut for data.path=PATH", model=True, resume=RESUME_HELP,
                      overwrite=OVERWRITE_HELP)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("eval", help="top-1/top-5 of a model or checkpoint on a validation folder",
                              description="Evaluate a model (random init, any checkpoint layout, or a qtvit "
                                          "training checkpoint) with the model's own crop, interpolation and "
                                          "normalisation.")
    p.add_argument("--model", help="registered model name (default: the training checkpoint's)")
    p.add_argument("--checkpoint", help="weights: .pt/.pth/.safetensors in any supported layout")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--data", help="validation folder (or a folder holding val/); the demo/fashion_mnist path")
    p.add_argument("--dataset", default="folder", choices=("folder", "demo", "fashion_mnist"))
    p.add_argument("--image-size", type=int, help="evaluate at this size instead of the model's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--max-images", type=int, help="evaluate on the first N images only")
    p.add_argument("--skip-bad-images", action="store_true", help="count and skip unreadable images")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of a trusted checkpoint")
    p.add_argument("--output", help="JSON results path (default: eval-<model>.json)")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("demo", help="train and evaluate a small QT-ViT on CPU in minutes",
                              description="Train a small QT-ViT on the built-in relational-shapes dataset "
                                          "(or --data FOLDER), evaluate it, and write a checkpoint, "
                                          "metrics.json and a training-curve PNG.")
    add_run_arguments(p, "run folder (default: the first free demo_output/run-N)",
                      data="train on this image folder instead of the built-in demo set",
                      epochs="training epochs (default: the demo recipe's)")
    p.set_defaults(func=run_demo)


def _exit_code(result) -> int:
    return 128 + result.signal if result.status == "interrupted" and result.signal else 0


def _default_run_dir(model: str, info) -> Path:
    from . import distributed as du

    name = f"runs/{model}-{time.strftime('%Y%m%d-%H%M%S')}" if info.is_main else None
    return Path(du.broadcast_object(name, info))  # ranks must agree on one folder


def run_train(args: argparse.Namespace) -> int:
    from . import distributed as du
    from .config import load_config
    from .trainer import Trainer, resume_config

    overrides = list(args.overrides)
    shortcuts = {"data.path": args.data, "model.name": args.model, "train.epochs": args.epochs}
    overrides += [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    checkpoint = None
    if args.resume:
        if not args.output:
            raise ValueError("--resume needs --output RUN_FOLDER (the run to continue)")
        if args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        cfg, checkpoint = resume_config(args.output, overrides)
    else:
        cfg = load_config(args.config, overrides)
    info = du.setup(cfg.train.device)
    try:
        run_dir = Path(args.output or cfg.run.output or _default_run_dir(cfg.model.name, info))
        cfg.run.output = str(run_dir)
        trainer = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, checkpoint=checkpoint)
        result = trainer.fit()
        if info.is_main and result.status == "done":
            m = result.metrics
            print(f"done: top-1 {m.get('top1', float('nan')):.2f}%  top-5 {m.get('top5', float('nan')):.2f}%"
                  f"  → {run_dir}/metrics.json, checkpoints {run_dir}/last.pt and best.pt")
        elif info.is_main and result.status == "paused":
            print(f"paused after epoch {result.epoch} (train.epochs_per_run); continue with: "
                  f"qtvit train --output {run_dir} --resume")
        return _exit_code(result)
    finally:
        du.cleanup()


def _read_training_checkpoint(path: str | None) -> dict | None:
    """The checkpoint at ``path`` if it is a qtvit training checkpoint, else None."""
    if not path or Path(path).suffix not in (".pt", ".pth", ".bin"):
        return None
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours (or needs pickle): load_checkpoint reports it later
        return None
    return raw if isinstance(raw, dict) and raw.get("qtvit_train_checkpoint") else None


def _eval_model(args: argparse.Namespace, training: dict | None, num_classes: int):
    """The model to evaluate with its weights, and its name."""
    from ..errors import QtvitError
    from ..models import resolve_model_name
    from .config import ModelConfig, config_from_dict
    from .evaluate import build_model, load_weights

    if training is None:
        if not args.model:
            raise ValueError("--model is required unless --checkpoint is a qtvit training checkpoint")
        model = build_model(ModelConfig(name=args.model, drop_path_rate=0.0), num_classes)
        if args.checkpoint:
            load_weights(model, args.checkpoint, trust_pickle=args.trust_pickle, use_ema=args.ema)
        return model, args.model
    saved = config_from_dict(training["config"]).model
    if args.model and resolve_model_name(args.model) != resolve_model_name(saved.name):
        raise QtvitError(f"checkpoint {args.checkpoint} is for model {saved.name}, not {args.model}")
    saved.drop_path_rate = 0.0
    model = build_model(saved, len(training["classes"]))
    weights = training["model"]
    if args.ema:
        if training.get("ema") is None:
            raise QtvitError(f"--ema: checkpoint {args.checkpoint} has no EMA weights "
                             "(trained with train.ema=false)")
        weights = training["ema"]
    load_weights(model, weights)
    return model, saved.name


def _eval_dataset(args: argparse.Namespace, training: dict | None):
    """The validation set (PIL images) and its class names."""
    from ..data import build_datasets, image_folder
    from .config import config_from_dict

    if args.dataset != "folder":
        kw = {}
        if training is not None and args.dataset == "demo":  # the demo set exactly as it was trained on
            saved = config_from_dict(training["config"])
            d = saved.data
            kw = dict(demo_image_size=d.demo_image_size, demo_train_size=d.demo_train_size,
                      demo_val_size=d.demo_val_size, seed=saved.train.seed)
        _, val, classes = build_datasets(args.dataset, args.data, **kw)
        return val, classes
    if not args.data:
        raise ValueError("--data VAL_FOLDER is required (or --dataset demo / fashion_mnist)")
    root = Path(args.data)
    if (root / "val").is_dir():
        root = root / "val"
    ds = image_folder(root, "validation data")
    return ds, ds.classes


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import AugmentedDataset, ShardSampler, data_config, eval_transform
    from ..errors import QtvitError
    from . import distributed as du
    from .evaluate import evaluate
    from .trainer import AMP_DTYPES

    info = du.setup(args.device)
    try:
        training = _read_training_checkpoint(args.checkpoint)
        val, classes = _eval_dataset(args, training)
        if training is not None and list(training["classes"]) != list(classes):
            from ..data import check_same_classes

            check_same_classes(training["classes"], classes, f"checkpoint {args.checkpoint}",
                               args.data or args.dataset)
        model, name = _eval_model(args, training, len(classes))
        n_out = getattr(model, "num_classes", None)
        if n_out is not None and n_out != len(classes):
            raise QtvitError(f"the model predicts {n_out} classes but {args.data} has {len(classes)}")
        cfg = data_config(model)
        size = args.image_size or int(cfg["input_size"][-1])
        ds = AugmentedDataset(val, eval_transform(cfg, size), args.skip_bad_images)
        sampler = ShardSampler(len(ds), info.world_size, info.rank, args.max_images)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                             sampler=sampler, pin_memory=info.device.type == "cuda")
        model.to(info.device)
        from tqdm import tqdm

        with tqdm(total=len(loader), desc="eval", unit="batch", disable=not info.is_main) as bar:
            result = evaluate(model, loader, info.device, info, AMP_DTYPES[args.amp], progress=bar.update)
        result.update(model=name, checkpoint=args.checkpoint, ema=args.ema, data=args.data or args.dataset,
                      image_size=size, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                      accuracy=result["top1"] / 100.0)
        if info.is_main:
            from ..io import write_atomic

            out = write_atomic(args.output or f"eval-{name}.json", json.dumps(result, indent=2) + "\n")
            skipped = f", {result['bad_images']} unreadable skipped" if result["bad_images"] else ""
            print(f"{name}{' (EMA)' if args.ema else ''}: top-1 {result['top1']:.2f}%  "
                  f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f} on {result['images']} images at "
                  f"{size}px (crop {cfg['crop_pct']}, {cfg['interpolation']}){skipped} → {out}")
        return 0
    finally:
        du.cleanup()


def _demo_run_dir(output: str | None, resume: bool, overwrite: bool) -> Path:
    """``--output`` as given; by default the first free ``demo_output/run-N`` (never an existing run)."""
    if output or resume or overwrite:
        if not output:
            raise ValueError("--resume/--overwrite need --output RUN_FOLDER (the demo run to reuse)")
        return Path(output)
    n = 1
    while (candidate := Path("demo_output") / f"run-{n}").exists() and (
            not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
    return candidate


def run_demo(args: argparse.Namespace) -> int:
    from ..io import write_atomic
    from .config import load_config
    from .trainer import Trainer, resume_config

    start = time.perf_counter()
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.dataset=folder", f"data.path={args.data}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    run_dir = _demo_run_dir(args.output, args.resume, args.overwrite)
    checkpoint = None
    if args.resume:
        cfg, checkpoint = resume_config(run_dir, overrides)
    else:
        cfg = load_config("demo", overrides)
    cfg.run.output = str(run_dir)
    result = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, checkpoint=checkpoint,
                     command="qtvit demo").fit()
    if result.status != "done":
        return _exit_code(result)
    wall = time.perf_counter() - start
    summary_path = run_dir / "metrics.json"
    summary = json.loads(summary_path.read_text())
    summary.update(wall_seconds=round(wall, 1), chance=1.0 / summary["classes"],
                   dataset=cfg.data.dataset if not args.data else str(args.data))
    write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    minutes, seconds = divmod(int(round(wall)), 60)
    print(f"\ndemo finished in {minutes}m{seconds:02d}s: held-out accuracy {100 * summary['accuracy']:.1f}% "
          f"(chance {100 * summary['chance']:.1f}%)\n"
          f"  checkpoint: {run_dir / 'best.pt'} (final: {run_dir / 'last.pt'})\n"
          f"  metrics:    {summary_path}\n"
          f"  curves:     {run_dir / 'curves.png'}\n"
          f"  evaluate:   qtvit eval --checkpoint {run_dir / 'last.pt'} --ema --dataset "
          f"{'demo' if not args.data else 'folder --data ' + str(args.data)}")
    return 0

