"""``qtvit det train | eval | predict | demo``: detection and instance segmentation.

Examples::

    qtvit det demo --output runs/det-demo                       # CPU, minutes, synthetic shapes
    qtvit det train --config det/qtvit_1_3x --data /data/coco \\
        model.backbone_checkpoint=qtvit_1.pt                    # the COCO recipe (torchrun for GPUs)
    qtvit det train --output runs/det --resume                   # continue an interrupted run
    qtvit det eval runs/det/best.pt --data /data/coco            # box + mask AP on val2017
    qtvit det predict a.jpg b.jpg --checkpoint runs/det/best.pt --output preds/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ...io import write_json
from ...train.cli import OVERWRITE_HELP, RESUME_HELP, add_run_arguments

DEMO_RECIPE = "det/demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    det = subparsers.add_parser("det", description=__doc__.splitlines()[0],
                                help="object detection / instance segmentation (train, eval, predict, demo)")
    sub = det.add_subparsers(dest="det_command", metavar="SUBCOMMAND")
    det.set_defaults(func=lambda args: det.print_help() or 2)

    p = sub.add_parser("train", help="train a detector from a YAML recipe (configs/det/)")
    p.add_argument("--config", default="det/qtvit_1_3x",
                   help="recipe name or YAML path (default det/qtvit_1_3x)")
    add_run_arguments(p, "run folder (default: runs/det-<model>-<date>-<time>)",
                      data="shortcut for data.path=COCO_ROOT", resume=RESUME_HELP, overwrite=OVERWRITE_HELP)
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="COCO box and mask AP of a trained detector")
    p.add_argument("checkpoint", help="a qtvit det training checkpoint (last.pt / best.pt)")
    p.add_argument("--data", help="COCO root (default: the path the run trained on)")
    p.add_argument("--split", help="validation split folder name (default: the run's, val2017)")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--max-images", type=int, help="evaluate on the first N images only")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="JSON results path (default: <checkpoint folder>/eval.json)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("predict", help="draw a detector's boxes and masks on images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a qtvit det training checkpoint")
    p.add_argument("--output", required=True, help="folder for the drawn PNGs and predictions.json")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_predict)

    p = sub.add_parser("params",
                       help="parameter counts of the registered detectors and their EfficientViT twins")
    p.add_argument("--output", help="also write them to this JSON file")
    p.set_defaults(func=run_params)

    p = sub.add_parser("bench", help="backbone + FPN forward at COCO size: qt vs its ReLU and softmax twins")
    p.add_argument("--backbone", default="qtvit_b1")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (interleaved)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("demo",
                       help="train and evaluate a small detector on CPU (synthetic shapes)")
    add_run_arguments(p, "run folder (default: the first free demo_output/det-run-N)",
                      epochs="training epochs (default: the demo recipe's)")
    p.set_defaults(func=run_demo)


def _device(name: str):
    from ...train.distributed import resolve_device

    return resolve_device(name)


def _fit(cfg, run_dir: Path, resume: bool, overwrite: bool, checkpoint, command: str):
    from ...train.trainer import Trainer

    cfg.run.output = str(run_dir)
    trainer = Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, checkpoint=checkpoint,
                      command=command)
    return trainer, trainer.fit()


def _config(recipe: str | None, overrides: list[str], args) -> tuple[object, dict | None]:
    from ...train.config import load_config
    from ...train.trainer import resume_config

    if args.resume:
        if not args.output:
            raise ValueError("--resume needs --output RUN_FOLDER (the run to continue)")
        if args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        return resume_config(args.output, overrides)
    return load_config(recipe, overrides, task="detection"), None


def run_train(args: argparse.Namespace) -> int:
    from ...train import distributed as du

    overrides = list(args.overrides)
    shortcuts = {"data.path": args.data, "train.epochs": args.epochs}
    overrides += [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    cfg, checkpoint = _config(args.config, overrides, args)
    info = du.setup(cfg.train.device)
    try:
        name = f"runs/det-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}" if info.is_main else None
        run_dir = Path(args.output or cfg.run.output or du.broadcast_object(name, info))
        _, result = _fit(cfg, run_dir, args.resume, args.overwrite, checkpoint, "qtvit det train")
        if info.is_main and result.status == "done":
            m = result.metrics
            nan = float("nan")
            print(f"done: box AP {m.get('bbox_ap', nan):.3f}  mask AP {m.get('segm_ap', nan):.3f}"
                  f"  → {run_dir}/metrics.json, checkpoints {run_dir}/last.pt and best.pt")
        return 128 + result.signal if result.status == "interrupted" and result.signal else 0
    finally:
        du.cleanup()


def evaluate_checkpoint(path: str | os.PathLike, data: str | None = None, split: str | None = None,
                        use_ema: bool = False, max_images: int | None = None, batch_size: int = 2,
                        device: str = "auto") -> dict:
    """COCO metrics of a trained detector on its validation data (or ``data``/``split``)."""
    import torch

    from ...train.config import config_from_dict
    from ...train.distributed import DistInfo
    from .data import collate
    from .predict import load_trained_detector
    from .task import DetectionTask

    dev = _device(device)
    model, ckpt = load_trained_detector(path, use_ema=use_ema, device=dev)
    cfg = config_from_dict(ckpt["config"])
    if data:
        cfg.data.path = data
    if split:
        cfg.data.val_split = split
    task = DetectionTask(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=dev))
    classes = task.load_data(cfg.train.seed)
    if classes != list(ckpt["classes"]):
        raise ValueError(f"the data's {len(classes)} classes differ from the checkpoint's "
                         f"{len(ckpt['classes'])}")
    val = task.val_dataset(model)
    indices = list(range(len(val) if max_images is None else min(max_images, len(val))))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, indices), batch_size=batch_size,
                                         collate_fn=collate)
    return task.evaluate(model, loader, None)


def run_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.ema, args.max_images,
                                  args.batch_size, args.device)
    out = Path(args.output or Path(args.checkpoint).parent / "eval.json")
    write_json({"checkpoint": str(args.checkpoint), "ema": args.ema, **metrics}, out)
    print(f"box AP {metrics['bbox_ap']:.3f} AP50 {metrics['bbox_ap50']:.3f} AP75 {metrics['bbox_ap75']:.3f}  "
          f"mask AP {metrics['segm_ap']:.3f}  ({metrics['images']} images) → {out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from .predict import draw_predictions, load_trained_detector, read_image, save_png

    images = [read_image(p) for p in args.images]  # every file is checked before the model loads
    dev = _device(args.device)
    model, ckpt = load_trained_detector(args.checkpoint, use_ema=args.ema, device=dev)
    out_dir = Path(args.output)
    records = []
    for path, image in zip(args.images, images, strict=True):
        with torch.no_grad():
            pred = {k: v.cpu() for k, v in model([image.to(dev)])[0].items()}
        target = save_png(draw_predictions(image, pred, ckpt["classes"], args.score_thresh), out_dir /
                          f"{Path(path).stem}_pred.png")
        keep = pred["scores"] >= args.score_thresh
        records.append({"image": str(path), "drawn": str(target), "detections": [
            {"label": ckpt["classes"][label - 1], "score": round(score, 4), "box": [round(v, 1) for v in box]}
            for label, score, box in zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist(),
                                         pred["boxes"][keep].tolist(), strict=True)]})
        print(f"{path}: {int(keep.sum())} detections → {target}")
    write_json({"checkpoint": str(args.checkpoint), "images": records}, out_dir / "predictions.json")
    return 0


def detector_params() -> list[dict]:
    """Parameters of every registered detector, QT-ViT and EfficientViT twin (built on the meta device)."""
    import torch

    from ...models import get_model_card, list_models
    from ...models.registry import create_model

    rows = []
    for name in list_models("qtvit_*_mask_rcnn_coco"):
        counts = {}
        twin = dict(kernel="relu", ape=False, shortcut=False)
        for variant, kwargs in (("qtvit", {}), ("efficientvit", twin)):
            with torch.device("meta"):
                model = create_model(name, **kwargs)
            counts[variant] = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "paper_name": get_model_card(name).paper_name,
                     "params_qtvit": counts["qtvit"], "params_efficientvit": counts["efficientvit"]})
    return rows


def run_params(args: argparse.Namespace) -> int:
    rows = detector_params()
    print(f"{'model':34s} {'QT-ViT (M)':>11s} {'EfficientViT (M)':>17s}")
    for r in rows:
        print(f"{r['model']:34s} {r['params_qtvit'] / 1e6:11.2f} {r['params_efficientvit'] / 1e6:17.2f}")
    if args.output:
        write_json({"command": f"qtvit det params --output {args.output}", "detectors": rows},
                   Path(args.output))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import sys

    from ...bench.env import format_load
    from ...bench.timing import fmt_mb
    from .bench import benchmark

    result = benchmark(args.backbone, tuple(args.size), args.repeats, device=args.device)
    result["command"] = "qtvit " + " ".join(sys.argv[1:])
    print(f"{args.backbone} + FPN at {args.size[0]}×{args.size[1]} on {result['device']} "
          f"({result['threads']} threads, load {format_load(result['env']['load_start'])} → "
          f"{format_load(result['env']['load_end'])})")
    for name, row in result["variants"].items():
        print(f"  {name:8s} {row['median_s'] * 1e3:9.1f} ms  ×{row['ratio_to_relu']:.3f} of relu  "
              f"peak {fmt_mb(row['peak_mib'])} MiB")
    if args.output:
        write_json(result, Path(args.output))
    return 0


def _free_demo_dir() -> Path:
    n = 1
    while Path(f"demo_output/det-run-{n}").exists():
        n += 1
    return Path(f"demo_output/det-run-{n}")


def run_demo(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg, checkpoint = _config(DEMO_RECIPE, overrides, args)
    run_dir = Path(args.output) if args.output else _free_demo_dir()
    start = time.perf_counter()
    trainer, result = _fit(cfg, run_dir, args.resume, args.overwrite, checkpoint, "qtvit det demo")
    if result.status != "done":
        return 128 + result.signal if result.status == "interrupted" and result.signal else 0
    png = demo_predictions(trainer, run_dir / "predictions.png")
    m = result.metrics
    summary = {"bbox_ap": m["bbox_ap"], "bbox_ap50": m["bbox_ap50"], "segm_ap": m["segm_ap"],
               "seconds": round(time.perf_counter() - start, 1)}
    metrics_path = run_dir / "metrics.json"
    full = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    write_json({**full, **summary}, metrics_path)
    print(f"det demo: box AP {m['bbox_ap']:.3f}  AP50 {m['bbox_ap50']:.3f}  mask AP {m['segm_ap']:.3f} in "
          f"{summary['seconds']:.0f} s → {metrics_path}, {png}, {run_dir / 'last.pt'}")
    return 0


def demo_predictions(trainer, path: Path, count: int = 8) -> Path:
    """Draw the evaluated model's predictions on the first validation images as one grid PNG."""
    import torch
    from torchvision.utils import make_grid

    from .predict import draw_predictions, save_png

    model = trainer.eval_model().eval()
    val = trainer.val_set
    drawn = []
    with torch.no_grad():
        for i in range(min(count, len(val))):
            image, _ = val[i]
            pred = {k: v.cpu() for k, v in model([image.to(trainer.device)])[0].items()}
            drawn.append(draw_predictions(image, pred, trainer.classes, score_thresh=0.5))
    return save_png(make_grid(drawn, nrow=4, padding=2), path)


__all__ = ["evaluate_checkpoint", "register"]
