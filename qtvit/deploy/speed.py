"""Side-by-side inference latency: fused qtvit vs its unfused form, its ReLU twin and timm's EfficientViT.

    python -m qtvit.deploy.speed --model qtvit_1 --batch 1 32 --onnx \
        --output docs/results/deploy_speed_cpu.json

Every variant is timed in one process, interleaved round by round (so machine load hits all of
them alike), each round taking the median of ``--iters`` calls after warm-up, a short pause and
one untimed call (so no thread pool left spinning by the variant before competes for the cores);
the reported figure is the median over rounds. With ``--onnx`` the fused qtvit model and timm's
model are also exported (same exporter, same opset) and timed in onnxruntime. The JSON records
the machine load average before and after, so a noisy run can be recognised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Pause before each variant's calls in a round (see _time).
SETTLE_S = 0.2


def _time(fn, x, iters: int) -> float:
    """Median of ``iters`` calls, after a pause and one untimed call.

    Thread pools the previous variant left spinning would otherwise take cores from this variant's
    calls: onnxruntime's intra-op threads spin after every run, so on 2 cores the session timed
    right after another one ran slower (it made qtvit's ONNX model look faster than its ReLU twin,
    which ran second).
    """
    time.sleep(SETTLE_S)
    fn(x)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _variants(model_name: str, timm_name: str) -> dict[str, torch.nn.Module]:
    """qtvit eager and fused, its ReLU twin (EfficientViT of the same size in qtvit) fused, timm's model."""
    import timm

    import qtvit
    from qtvit.deploy import fuse

    model = qtvit.create_model(model_name).eval()
    relu = qtvit.create_model(model_name, kernel="relu", ape=False, shortcut=False).eval()
    return {f"{model_name} eager": model, f"{model_name} fused": fuse(model),
            f"{model_name} relu twin fused": fuse(relu),
            f"timm {timm_name} eager": timm.create_model(timm_name, pretrained=False).eval()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qtvit_1")
    p.add_argument("--timm-model", default="efficientvit_b1", help="timm's model of the same size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--onnx", action="store_true",
                   help="also time qtvit (fused export), its ReLU twin and timm's model in onnxruntime")
    p.add_argument("--compile", action="store_true",
                   help="also time the fused qtvit model, its fused ReLU twin and timm's model under "
                        "torch.compile (inductor, default mode)")
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import qtvit  # noqa: F401
    from qtvit.bench.env import collect_environment, machine_load
    from qtvit.io import write_json

    load_before = machine_load()
    models = _variants(args.model, args.timm_model)
    runners = {name: (lambda x, m=m: m(x)) for name, m in models.items()}
    twin, timm_eager = f"{args.model} relu twin fused", f"timm {args.timm_model} eager"
    if args.compile:  # the same treatment for all three; compiled once per batch size (static shapes)
        for name in (f"{args.model} fused", twin, timm_eager):
            label = name.replace(" eager", "").replace(" fused", "") + " compiled"
            runners[label] = torch.compile(models[name])
    if args.onnx:
        import onnxruntime as ort

        from qtvit.deploy.export import export_onnx

        tmp = Path(tempfile.mkdtemp())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        for name in (f"{args.model} fused", twin, timm_eager):
            path = tmp / (name.replace(" ", "_") + ".onnx")
            if name.startswith("timm"):  # timm's model through the same exporter, dynamic batch only
                x = torch.randn(2, 3, args.size, args.size)
                torch.onnx.export(models[name], (x,), str(path), dynamo=True, opset_version=18,
                                  input_names=["x"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
            else:  # export_onnx fuses the model itself (fusing a fused model changes nothing)
                export_onnx(models[name], path)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            label = name.replace(" eager", "").replace(" fused", "") + " onnxruntime"
            runners[label] = lambda x, s=sess: s.run(None, {"x": x.numpy()})
    results = []
    with torch.inference_mode():
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            for run in runners.values():  # warm-up
                run(x)
            per_round = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, run in runners.items():
                    per_round[name].append(_time(run, x, args.iters))
            for name, ts in per_round.items():
                ms = statistics.median(ts) * 1e3
                results.append({"variant": name, "batch": batch, "size": args.size, "ms": round(ms, 3)})
                print(f"batch {batch:3d}  {name:40s} {ms:9.2f} ms")
    cli_args = argv if argv is not None else sys.argv[1:]
    env = collect_environment(torch.device("cpu"), torch.float32)  # git commit + dirty flag, machine
    env.update(load_start=load_before, load_end=machine_load())
    doc = {"command": "python -m qtvit.deploy.speed " + " ".join(cli_args),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "env": env, "results": results}
    if args.output:
        write_json(doc, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
