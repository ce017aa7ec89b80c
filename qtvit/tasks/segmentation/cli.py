"""``qtvit seg train|eval|predict|demo|bench``: semantic segmentation from the command line.

* ``train``: the one Trainer with a segmentation recipe (``--config configs/seg/ade20k_upernet.yaml``).
* ``eval``: mIoU / mAcc / aAcc of a model or checkpoint on a dataset (whole image or sliding window).
* ``predict IMAGES --output DIR``: colour overlays (``NAME_overlay.png``) and raw masks
  (``NAME_mask.png``, one class id per pixel) for image files or folders.
* ``demo --output DIR``: the CPU demo on the synthetic cue set (``--no-attention`` for the control).
* ``bench``: time QT-ViT-1 + SegHead / UperNet at up to 1024×2048 against the ReLU and softmax twins.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ...errors import QtvitError
from ...train.cli import OVERWRITE_HELP, RESUME_HELP, RUN_DIR_HELP, add_run_arguments
from .ablation import DEFAULT_KERNELS, DEFAULT_SEEDS


def register(subparsers: argparse._SubParsersAction) -> None:
    seg = subparsers.add_parser("seg", help="semantic segmentation: train, eval, predict, demo",
                                description=__doc__.splitlines()[0])
    sub = seg.add_subparsers(dest="seg_command", metavar="SEG_COMMAND")
    seg.set_defaults(func=lambda args: seg.print_help() or 2)

    p = sub.add_parser("train", help="train with a segmentation recipe (torchrun for many GPUs)")
    p.add_argument("--config", required=True, help="recipe: configs/seg/NAME.yaml or seg/NAME")
    add_run_arguments(p, RUN_DIR_HELP, data="shortcut for data.path=PATH", model=True, resume=RESUME_HELP,
                      overwrite=OVERWRITE_HELP)
    p.set_defaults(func=run_train, skip_bad_images=False)

    p = sub.add_parser("eval", help="mIoU / mAcc / aAcc of a model on a dataset")
    _model_args(p)
    p.add_argument("--dataset", default="ade20k", choices=("ade20k", "cityscapes", "folder", "synthetic"))
    p.add_argument("--data", help="dataset root (not needed for synthetic)")
    p.add_argument("--split", default="val")
    p.add_argument("--num-classes", type=int, help="folder datasets without classes.txt")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--output", help="JSON results path (default: print only)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("predict", help="colour overlays and raw masks for images")
    _model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--output", required=True, help="folder for NAME_overlay.png and NAME_mask.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_predict)

    p = sub.add_parser("demo", help="train + evaluate a small QT-ViT segmenter on CPU in minutes")
    p.add_argument("--no-attention", action="store_true",
                   help="the control: kernel 'none' (no global token mixing), same recipe")
    add_run_arguments(p, "run folder", epochs=None, required=True)
    p.set_defaults(func=run_demo_cli)

    p = sub.add_parser("ablation", help="the kernel ablation (Table 2) on the cue set: every kernel × seed",
                       description="Train the `seg demo` recipe once per kernel and seed (the 'none' "
                                   "control included) and write seg_ablation.{json,md} with mIoU mean ± std "
                                   "and each kernel's gap to the control.")
    p.add_argument("--kernels", default=",".join(DEFAULT_KERNELS), help="comma-separated kernel names")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    p.add_argument("--output-dir", required=True,
                   help="folder for KERNEL/seedN/ runs and seg_ablation.{json,md}")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs in --output-dir, train the rest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, applied to every run")
    p.set_defaults(func=run_ablation_cli)

    p = sub.add_parser("params", help="parameters of every segmentation model and its EfficientViT twin")
    p.add_argument("--output", help="JSON path (default: print only)")
    p.set_defaults(func=run_params)

    from .bench import register as register_bench

    register_bench(sub)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered segmentation model (default: the training checkpoint's)")
    p.add_argument("--checkpoint", help="a run's best.pt/last.pt, or model weights in any layout qtvit reads")
    p.add_argument("--kernel", help="attention kernel of the model (default: the model's / checkpoint's)")
    p.add_argument("--num-classes-model", type=int, dest="model_classes",
                   help="classes of the model (default: the dataset's / checkpoint's)")
    p.add_argument("--mode", default="whole", choices=("whole", "slide"), help="inference mode")
    p.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="resize images to fit LONG×SHORT before inference (0 0: keep)")
    p.add_argument("--crop", type=int, default=512, help="sliding-window size")
    p.add_argument("--stride", type=int, default=341, help="sliding-window stride")
    p.add_argument("--flip", action="store_true", help="average with the flipped image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale factors")
    p.add_argument("--device", default="cpu")


def run_params(args: argparse.Namespace) -> int:
    """Count (on the meta device: no memory) every segmentation model and its twin (relu, no APE/shortcut)."""
    import torch

    from ...bench.env import git_commit
    from ...models import create_model, get_model_card
    from ...models.segmentation import segmentation_models

    rows = []
    print(f"{'model':30s} {'params':>13s} {'twin params':>13s}")
    for name in segmentation_models():
        with torch.device("meta"):
            qt = sum(p.numel() for p in create_model(name).parameters())
            twin_model = create_model(name, kernel="relu", ape=False, shortcut=False)
            twin = sum(p.numel() for p in twin_model.parameters())
        rows.append({"model": name, "params": qt, "twin_params": twin,
                     "macs_224": get_model_card(name).macs_224})
        print(f"{name:30s} {qt:>13,d} {twin:>13,d}", flush=True)
    if args.output:
        from ...io import write_atomic

        doc = {"env": {"git": git_commit(), "torch": torch.__version__}, "rows": rows,
               "note": "twin: kernel='relu', ape=False, shortcut=False; dataset's classes; no auxiliary head"}
        write_atomic(args.output, json.dumps(doc, indent=2) + "\n")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ...train.cli import run_train as train

    return train(args)


def run_demo_cli(args: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(args.output, no_attention=args.no_attention, overrides=args.overrides,
                       overwrite=args.overwrite, resume=args.resume)
    if metrics["status"] != "done":
        return 1
    print(f"demo: mIoU {metrics['miou']:.3f}  mAcc {metrics['macc']:.3f}  aAcc {metrics['aacc']:.3f} → "
          f"{args.output}/metrics.json, overlay.png, best.pt")
    return 0


def run_ablation_cli(args: argparse.Namespace) -> int:
    from .ablation import run_ablation

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise QtvitError(f"--seeds must be comma-separated integers; got {args.seeds!r}") from None
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    command = shlex.join(["qtvit", "seg", "ablation", "--kernels", ",".join(kernels), "--seeds",
                          ",".join(map(str, seeds)), "--output-dir", str(args.output_dir), *args.overrides])
    doc = run_ablation(args.output_dir, kernels, seeds, overrides=args.overrides, resume=args.resume,
                       command=command)
    print(f"→ {args.output_dir}/seg_ablation.json, seg_ablation.md")
    return 0 if doc["summary"] else 1


def load_model(args: argparse.Namespace, default_classes: int | None = None):
    """(model in eval mode, class names or None) from --model/--checkpoint/--kernel."""
    import torch

    from ...errors import QtvitError
    from ...models import create_model

    training = None
    if args.checkpoint and Path(args.checkpoint).suffix in (".pt", ".pth"):
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if isinstance(ckpt, dict) and ckpt.get("qtvit_train_checkpoint"):
            training = ckpt
    name = args.model or (training or {}).get("model_name")
    if not name:
        raise QtvitError("give --model NAME (e.g. qtvit_1_seghead_ade20k) or a training --checkpoint")
    classes = (training or {}).get("classes")
    num_classes = args.model_classes or (len(classes) if classes else default_classes)
    kwargs = {}
    if training:
        m = training["config"]["model"]
        kwargs = dict(m.get("kwargs", {}))
        kwargs.update({k: m[k] for k in ("kernel", "ape", "shortcut") if m.get(k) is not None})
    if args.kernel:
        kwargs["kernel"] = args.kernel
    model = create_model(name, num_classes=num_classes, **kwargs)
    if not hasattr(model, "output_stride"):
        raise QtvitError(f"{name} is not a segmentation model (see: qtvit models '*seghead*' / '*upernet*')")
    if training:
        model.load_state_dict(training["model"])
    elif args.checkpoint:
        from ...models.checkpoint import read_state_dict

        model.load_state_dict(read_state_dict(args.checkpoint))
    return model.to(args.device).eval(), classes


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import SegmentationDataset, read_dataset
    from .metrics import format_metrics
    from .task import evaluate_segmentation
    from .transforms import EvalTransform, collate_pairs

    scale = None if args.scale == [0, 0] else args.scale
    if args.dataset == "synthetic":
        from .synthetic import CLASSES, SyntheticCueSegmentation

        dataset = SyntheticCueSegmentation(args.max_images or 200, 7919, transform=EvalTransform(None))
        classes = list(CLASSES)
    else:
        if not args.data:
            raise ValueError(f"--data ROOT is required for --dataset {args.dataset}")
        samples, classes, lut = read_dataset(args.dataset, args.data, args.split, args.num_classes)
        samples = samples[: args.max_images] if args.max_images else samples
        dataset = SegmentationDataset(samples, len(classes), lut, EvalTransform(scale))
    model, _ = load_model(args, len(classes))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_pairs, num_workers=2)
    metrics = evaluate_segmentation(model, loader, torch.device(args.device), model.num_classes,
                                    mode=args.mode, crop=args.crop, stride=args.stride, flip=args.flip,
                                    scales=tuple(args.scales), progress=True)
    print(f"{format_metrics(metrics)}  ({metrics['images']} images)")
    if args.output:
        from ...io import write_atomic

        write_atomic(args.output, json.dumps(metrics, indent=2) + "\n")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ...errors import QtvitError
    from .data import IMAGE_SUFFIXES, load_image
    from .inference import predict
    from .transforms import normalize, rescale_size
    from .visualize import blend, save_png

    files: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"image or folder not found: {item}")
    if not files:
        raise QtvitError(f"no images found in {', '.join(args.images)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    clashes = [f for f in files if (out / f"{f.stem}_mask.png").exists()]
    if clashes and not args.overwrite:
        first = out / f"{clashes[0].stem}_mask.png"
        raise QtvitError(f"{first} exists; pass --overwrite to replace outputs")
    model, _ = load_model(args, None)
    device = torch.device(args.device)
    scale = None if args.scale == [0, 0] else args.scale
    for path in tqdm(files, unit="image", desc="predict"):
        image = load_image(str(path))
        x = image
        if scale:
            from torchvision.transforms.v2 import functional as TF

            x = TF.resize(image, list(rescale_size(image.shape[-2:], scale)), antialias=True)
        with torch.no_grad():
            scores = predict(model, normalize(x)[None].to(device), out_size=image.shape[-2:], mode=args.mode,
                             crop=args.crop, stride=args.stride, flip=args.flip, scales=tuple(args.scales))
        mask = scores.argmax(1)[0].cpu()
        if model.num_classes > 256:
            raise QtvitError(f"{model.num_classes} classes do not fit an 8-bit mask PNG")
        save_png(out / f"{path.stem}_mask.png", mask.to(torch.uint8).numpy())
        save_png(out / f"{path.stem}_overlay.png", blend(image, mask, model.num_classes))
    print(f"predict: {len(files)} images → {out}/*_overlay.png (colour) and *_mask.png (class ids)")
    return 0


__all__ = ["register"]
