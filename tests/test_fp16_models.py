"""float16 models (the fp16 pass's output: float16 weights and compute, float32 I/O) through prune,
svd, quantize and share: valid, runnable, within the default budget against the float16 model's own
outputs (what the pipeline compares against). prune, svd and share keep float16 weight storage;
quantize upcasts the compute to float32 (graph/precision.py) and stores int8 weights with float32
scales. A bfloat16 graph is upcast the same way."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from models.build import mlp, mobilenet_small, resnet_small, smooth_images, transformer_block, vit_encoder
from onnxshrink.graph.precision import upcast_low_float
from tests.helpers import check, run_ort

BUILDERS = {"mlp": mlp, "mobilenet": mobilenet_small, "resnet": resnet_small, "transformer_block": transformer_block,
            "vit": vit_encoder}


def _samples(model: onnx.ModelProto, n: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    i = model.graph.input[0]
    shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
    if i.name == "pixel_values":  # the ViT: image-like inputs
        x = smooth_images(n, tuple(shape[2:]), seed=5)
        return [{i.name: x[k:k + 1]} for k in range(n)]
    return [{i.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def fp16_model(name: str) -> onnx.ModelProto:
    m32 = BUILDERS[name]()
    m, report = onnxshrink.optimize(m32, None, passes=["fp16"], budget="none", data=_samples(m32, 4))
    assert report.passes[0].status == "applied"
    return m


def _weight_dtypes(model: onnx.ModelProto) -> set:
    return {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}


@pytest.mark.parametrize("name,pass_spec", [
    ("transformer_block", {"prune": {"mode": "importance", "ratio": 0.2}}),
    ("vit", {"prune": {"mode": "importance", "ratio": 0.3}}),
    ("mlp", {"prune": {"mode": "importance", "ratio": 0.1}}),
    ("transformer_block", "svd"), ("mobilenet", "svd"),
    ("transformer_block", "share"), ("resnet", "share"),
])
def test_fp16_model_keeps_float16_storage(name, pass_spec):
    m = fp16_model(name)
    assert _weight_dtypes(m) == {TensorProto.FLOAT16}
    samples = _samples(m)
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", pass_spec], data=samples)
    rec = report.passes[-1]
    assert rec.status in ("applied", "backed off"), (rec.status, rec.reason)
    assert report.fidelity["cosine"] >= 0.99
    assert report.after["weight_bytes"] < report.before["weight_bytes"]
    check(out)
    assert np.isfinite(run_ort(out, samples[0], optimize=True)[0]).all()
    # rewritten weights stay float16 (share's codebooks are float16 tensors beside the int8 codes)
    if name == "vit" and rec.name == "prune":  # heads and MLP neurons of a float16 transformer
        assert {g["kind"] for g in rec.stats["per_group"]} == {"heads", "neurons"}
    floats = {t.data_type for t in out.graph.initializer
              if len(t.dims) >= 2 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}
    assert floats == {TensorProto.FLOAT16}


@pytest.mark.parametrize("name", ["transformer_block", "mobilenet"])
def test_fp16_model_quantizes(name):
    m = fp16_model(name)
    samples = _samples(m)
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "quantize"], data=samples)
    rec = report.passes[-1]
    assert rec.status == "applied", rec.reason
    assert rec.stats["prepared"]["upcast_from_float16"]["constants"] > 0
    assert report.fidelity["cosine"] >= 0.99
    check(out)
    assert TensorProto.INT8 in _weight_dtypes(out) and TensorProto.FLOAT16 not in _weight_dtypes(out)
    # int8 weights are half the float16 ones; with the QDQ plan the biases become int32 and the
    # per-channel scales float32 (mobilenet: 0.705x on an AVX-512 VNNI CPU, where the guard keeps
    # the plan), and with float activations (where integer kernels are not faster) it is under 0.6x
    assert report.after["weight_bytes"] < 0.75 * report.before["weight_bytes"]
    ref = run_ort(m, samples[3])[0]
    got = run_ort(out, samples[3], optimize=True)[0]
    assert float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) >= 0.99


def test_upcast_bfloat16_graph_with_half_precision_io():
    """bfloat16 weights and a float16 graph input/output: upcast keeps the interface (boundary
    Casts), widens the constants exactly and drops the Casts that became float -> float."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w_bf = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, w.ravel().tolist())
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x32", "w32"], ["y32"]),
             helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16)]
    g = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])], [w_bf])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph = gs.import_onnx(m)
    stats = upcast_low_float(graph)
    assert stats["constants"] == 1 and stats["casts_removed"] == 1
    up = gs.export_onnx(graph)
    check(up)
    assert [i.type.tensor_type.elem_type for i in up.graph.input] == [TensorProto.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in up.graph.output] == [TensorProto.FLOAT16]
    assert {t.data_type for t in up.graph.initializer} == {TensorProto.FLOAT}
    x = rng.standard_normal((2, 8)).astype(np.float16)
    w_exact = numpy_helper.to_array(w_bf).astype(np.float32)
    np.testing.assert_allclose(run_ort(up, {"x": x})[0], (x.astype(np.float32) @ w_exact).astype(np.float16),
                               rtol=2e-3, atol=2e-3)
