"""``qtvit export`` and ``qtvit predict``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_export(subparsers)
    _register_predict(subparsers)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="weights in any layout qtvit reads; a training checkpoint (last.pt/best.pt) also "
                        "gives the model settings and class names")
    p.add_argument("--no-ema", dest="use_ema", action="store_false",
                   help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a trusted .pt file")


# ------------------------------------------------------------------------------------ export
def _register_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX, torch.export (.pt2) or a hub folder",
                              description="Export with dynamic batch, height and width; preprocessing, class "
                                          "names and accepted sizes go into the file's metadata.")
    p.add_argument("model", nargs="?", default=None,
                   help="registered model name or a save_pretrained folder "
                        "(optional with a training checkpoint)")
    _add_model_args(p)
    p.add_argument("--format", required=True, choices=("onnx", "torch-export", "hub"))
    p.add_argument("--output", required=True, help="file (.onnx / .pt2) or folder (hub)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fold BatchNorms and export the inference attention (default for onnx and "
                        "torch-export, exact; hub folders always hold the unfused weights)")
    p.add_argument("--fp16", action="store_true",
                   help="float16 weights and input (the attention still runs in float32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (≥ 18)")
    p.add_argument("--size", type=int, default=None, help="tracing sample size (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import QtvitError
    from .loading import load_model

    out = Path(args.output)
    if out.exists() and not args.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise QtvitError(f"{out} already exists; pass --overwrite to replace it")
    model, classes = load_model(args.model, args.checkpoint, use_ema=args.use_ema,
                                trust_pickle=args.trust_pickle)
    if args.format == "hub":
        from ..models.hub import save_pretrained

        if args.fuse or args.fp16:
            raise QtvitError("--format hub saves the unfused float32 weights; drop --fuse/--fp16 "
                             "(fuse after loading)")
        save_pretrained(model, out, class_names=classes, overwrite=args.overwrite)
        print(f"wrote {out}/ (model.safetensors, config.json)")
        return 0
    if args.fuse is False:
        raise QtvitError("--no-fuse: ONNX and torch.export use the fused inference graph (it equals the "
                         "model's logits and is the form that traces with dynamic height and width)")
    from .export import export_onnx, export_program

    if args.format == "onnx":
        export_onnx(model, out, fp16=args.fp16, opset=args.opset, sample_size=args.size, class_names=classes)
    else:
        export_program(model, out, fp16=args.fp16, sample_size=args.size, class_names=classes)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; dynamic batch, height and width)")
    return 0


# ----------------------------------------------------------------------------------- predict
def _register_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict",
                              help="classify images (files or folders) with a model or an ONNX file")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="registered model name or a save_pretrained folder")
    src.add_argument("--onnx", default=None, help="an ONNX file written by `qtvit export`")
    _add_model_args(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--fuse", action="store_true", help="fuse the model first (faster, same logits)")
    p.add_argument("--json", default=None, help="also write the predictions to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-image lines")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..io import write_json
    from .predict import OnnxClassifier, format_predictions, predict

    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    if args.onnx:
        if args.checkpoint:
            raise ValueError("--checkpoint goes with --model; an ONNX file holds its own weights")
        classifier, classes = OnnxClassifier(args.onnx), None
    else:
        from .fuse import fuse
        from .loading import load_model

        classifier, classes = load_model(args.model, args.checkpoint, use_ema=args.use_ema,
                                         trust_pickle=args.trust_pickle)
        if args.fuse:
            classifier = fuse(classifier)
    result = predict(args.inputs, classifier, class_names=classes, topk=args.topk, batch_size=args.batch_size,
                     num_workers=args.workers, progress=not args.quiet)
    if not args.quiet:
        for line in format_predictions(result):
            print(line)
    if args.json:
        write_json(result.as_dict(), args.json)
    print(f"{len(result.predictions)} images predicted, {len(result.skipped)} skipped"
          + (f"; wrote {args.json}" if args.json else ""))
    return 0 if result.predictions else 1
