"""ONNX and torch.export: dynamic batch/H/W, parity with eager PyTorch, clean graphs, metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_helpers import perturb

import qtvit
from qtvit.deploy.export import (
    ExportError,
    check_input_size,
    export_onnx,
    export_program,
    load_program,
    onnx_metadata,
)

onnx = pytest.importorskip("onnx", reason="ONNX export needs the [deploy] extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="ONNX parity needs the [deploy] extra (onnxruntime)")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs the [deploy] extra (onnxscript)")

SIZES = [(224, 224), (256, 320), (512, 512)]
CLASSES = [f"class {i}" for i in range(7)]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(qtvit.create_model(name, num_classes=len(CLASSES)))


def _ort_session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def b0_onnx(tmp_path_factory):
    model = _model("qtvit_b0")
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "b0.onnx", class_names=CLASSES)
    return model, path


@pytest.mark.parametrize("name", ["qtvit_b0", "qtvit_b1", pytest.param("qtvit_l1", marks=pytest.mark.slow)])
def test_onnx_parity_dynamic_sizes(name, tmp_path, b0_onnx):
    model, path = b0_onnx if name == "qtvit_b0" else (None, None)
    if path is None:
        model = _model(name)
        path = export_onnx(model, tmp_path / f"{name}.onnx", class_names=CLASSES)
    session = _ort_session(path)
    gen = torch.Generator().manual_seed(1)
    for batch, (h, w) in zip((1, 2, 1), SIZES, strict=True):  # batch varies too
        x = torch.randn(batch, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), (name, h, w)


def test_onnx_file_is_self_contained_and_checked(b0_onnx):
    _, path = b0_onnx
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert sum(int(np.prod(i.dims)) for i in proto.graph.initializer) > 1_000_000  # the weights are inside
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


def test_onnx_graph_has_no_runtime_pads_or_foldable_shape_math(b0_onnx):
    import onnxscript.optimizer

    _, path = b0_onnx
    proto = onnx.load(str(path))
    graph = proto.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    for node in graph.node:  # TensorRT rejects Pad whose pads are computed at run time
        if node.op_type == "Pad":
            assert len(node.input) < 2 or node.input[1] in constants, node.name
    # Shapes are read from the input only (batch, H, W), never from intermediate tensors
    shape_sources = {n.input[0] for n in graph.node if n.op_type == "Shape"}
    assert shape_sources <= {"x"}, shape_sources
    # constant folding finds nothing left to fold
    folded = onnxscript.optimizer.optimize(onnx.load(str(path)))
    assert len(folded.graph.node) == len(graph.node)
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 4  # the APE of each of b0's 4 attention blocks, resized in the graph


def test_onnxruntime_fuses_the_qt_extras(b0_onnx, tmp_path):
    """The exported qt attention is spelled for onnxruntime's fusions: per attention block the value
    shortcut is one BatchNormalization and one Gelu after the session's optimisation (no Erf left),
    and the constant column rides in the products (no product is followed by an Add of it)."""
    _, path = b0_onnx
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    blocks = ops.count("Resize")  # one APE per attention block
    assert ops.count("BatchNormalization") == blocks
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert optimized.count("Gelu") == blocks and "Erf" not in optimized
    products = {n.output[0] for n in graph.node if n.op_type == "MatMul"}
    assert not any(n.op_type == "Add" and set(n.input) & products for n in graph.node)


def test_onnx_metadata(b0_onnx):
    _, path = b0_onnx
    meta = onnx_metadata(path)
    assert meta["qtvit.model"] == "qtvit_b0"
    assert json.loads(meta["qtvit.class_names"]) == CLASSES
    pre = json.loads(meta["qtvit.preprocessing"])
    assert pre["input_size"] == [3, 224, 224] and pre["interpolation"] == "bicubic"
    assert pre["crop_pct"] == 1.0 and len(pre["mean"]) == len(pre["std"]) == 3
    sizes = json.loads(meta["qtvit.input_sizes"])
    assert sizes == {"min": 64, "multiple_of": 32}
    check_input_size(256, 320, sizes)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_input_size(250, 320, sizes)
    with pytest.raises(ValueError, match="at least 64"):
        check_input_size(32, 320, sizes)


@pytest.mark.slow
def test_onnx_fp16_attention_stays_float32(tmp_path):
    model = _model("qtvit_b0")
    path = export_onnx(model, tmp_path / "b0_fp16.onnx", fp16=True)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # the attention's matmuls run on float32 tensors: every MatMul input is produced in float32
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    matmul_types = {types.get(i) for n in proto.graph.node if n.op_type == "MatMul" for i in n.input}
    assert matmul_types == {onnx.TensorProto.FLOAT}
    try:
        session = _ort_session(path)
    except Exception as err:  # noqa: BLE001 - an onnxruntime build without float16 kernels
        pytest.skip(f"onnxruntime cannot run float16 here: {err}")
    x = torch.randn(2, 3, 256, 320)
    with torch.no_grad():
        ref = model(x).numpy()
    out = session.run(None, {"x": x.half().numpy()})[0].astype(np.float32)
    assert np.isfinite(out).all()
    assert np.sqrt(np.mean((out - ref) ** 2)) <= 1e-2 * np.sqrt(np.mean(ref ** 2))


def test_torch_export_parity_dynamic_sizes(tmp_path):
    model = _model("qtvit_b0")
    path = export_program(model, tmp_path / "b0.pt2", class_names=CLASSES)
    program, meta = load_program(path)
    assert json.loads(meta["qtvit.class_names"]) == CLASSES
    net = program.module()
    for batch, (h, w) in zip((1, 3, 1), SIZES, strict=True):
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            ref, out = model(x), net(x)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_export_refuses_bad_requests(tmp_path):
    model = qtvit.create_model("qtvit_b0", num_classes=3)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, tmp_path / "m.onnx", sample_size=100)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("name, sizes", [
    ("qtvit_seg_demo", [(64, 128), (96, 160)]),  # fast: the demo's segmentation model, non-square
    pytest.param("qtvit_1_seghead_ade20k", [(512, 1024)], marks=pytest.mark.slow),  # the case
])
def test_segmentation_onnx_parity(name, sizes, tmp_path):
    """A SegHead model exports with dynamic H, W; onnxruntime's masks logits equal eager PyTorch's."""
    torch.manual_seed(0)
    model = perturb(qtvit.create_model(name))
    path = export_onnx(model, tmp_path / f"{name}.onnx", sample_size=sizes[0])
    session = _ort_session(path)
    gen = torch.Generator().manual_seed(2)
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape and out.shape[-2:] == (h // 8, w // 8)  # stride-8 logits
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), (name, h, w)
