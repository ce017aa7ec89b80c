"""``qtvit convert``: rewrite a checkpoint (official QT-ViT, MIT EfficientViT, timm or qtvit) as a
native ``.safetensors`` file."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint to qtvit's native .safetensors layout",
        description="Read SRC in any supported layout (official QT-ViT, MIT EfficientViT, timm "
                    "efficientvit_*, qtvit), check it strictly against the model and write DST "
                    "(.safetensors, atomically) in qtvit's native layout.")
    p.add_argument("src", metavar="SRC", help="checkpoint (.pt/.pth/.bin/.safetensors)")
    p.add_argument("dst", metavar="DST", help="output path, must end in .safetensors")
    p.add_argument("--model", metavar="NAME",
                   help="model name or alias (default: inferred from the checkpoint's shapes)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of SRC when weights-only loading refuses it; only "
                        "for files you trust")
    p.add_argument("--ema", action="store_true",
                   help="take the EMA weights when SRC holds both EMA and plain weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    result = convert_checkpoint(args.src, args.dst, args.model, trust_pickle=args.trust_pickle,
                                use_ema=args.ema)
    report = result.report
    kwargs = ", ".join(f"{k}={v!r}" for k, v in result.model_kwargs.items())
    print(f"{args.src} ({report.layout}) -> {result.path}: {result.model}({kwargs}), "
          f"{len(report.loaded)} tensors")
    if report.resized:
        _, old, new = report.resized[0]
        print(f"  note: {len(report.resized)} position grids keep their trained size (e.g. "
              f"{list(old[-2:])}); loading resizes them to the model's (e.g. {list(new[-2:])})")
    return 0
