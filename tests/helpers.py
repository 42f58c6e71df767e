"""Test helpers: run models on onnxruntime with graph optimizations disabled, compare, check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def run_ort(model: onnx.ModelProto, feeds: dict, optimize: bool = False) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_outputs_close(a: list, b: list, rtol_scale: float = 1e-4) -> None:
    """Every output equal within ``rtol_scale`` of the output's scale (max |a|)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-6)
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        assert err <= rtol_scale * scale, f"max abs diff {err:.3e} > {rtol_scale:g} x scale {scale:.3e}"


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def normal_samples(n: int = 12, seed: int = 1, name: str = "x", shape=(1, 3, 16, 16)) -> list[dict]:
    """``n`` seeded standard-normal float32 input dicts for a single-input test model."""
    r = np.random.default_rng(seed)
    return [{name: r.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def model_samples(model: onnx.ModelProto, n: int = 8, seed: int = 0) -> list[dict]:
    """``n`` seeded standard-normal float32 feeds for every input of ``model`` (symbolic dims as 1)."""
    rng = np.random.default_rng(seed)
    specs = [(i.name, [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in specs} for _ in range(n)]


def small_vit(depth: int = 1) -> onnx.ModelProto:
    """``models.build.vit_encoder`` at test size: ``depth`` blocks, width 64, 4 heads, 32x32 photos in
    8x8 patches (input ``pixel_values`` [1, 3, 32, 32]; feeds from ``model_samples``)."""
    from models.build import vit_encoder
    return vit_encoder(depth=depth, dim=64, heads=4, hw=32, patch=8)


def einsum_attention(seed: int = 0, batch: int | str = 1) -> onnx.ModelProto:
    """A windowed attention block spelled with Einsum as torchvision's maxvit exports it
    (``BGHID,BGHJD->BGHIJ`` and ``BGHIJ,BGHJD->BGHID``, 5-D, upper case) between projections spelled as
    tf2onnx spells Keras' EinsumDense (``bgnc,ce->bgne`` in; ``bghnd,hdc->bgnc`` out, two letters summed), at opset 17:
    x [batch, 4 windows, 16 tokens, 32] -> q/k/v -> 2 heads of 16 -> softmax attention -> out
    projection -> + x. ``batch`` a string: a symbolic batch dimension."""
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(seed)
    g_, n_, c_, h_, d_ = 4, 16, 32, 2, 16

    def w(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
    inits = [w("wq", c_, c_), w("wk", c_, c_), w("wv", c_, c_), w("wo", h_, d_, c_),
             numpy_helper.from_array(np.array([0, 0, 0, h_, d_], np.int64), "heads"),
             numpy_helper.from_array(np.array(1 / np.sqrt(d_), np.float32), "scale")]
    nodes = []
    for t in ("q", "k", "v"):  # EinsumDense: [b, g, n, c] x [c, c] -> split into heads -> B G H N D
        nodes += [helper.make_node("Einsum", ["x", f"w{t}"], [f"{t}_flat"], equation="bgnc,ce->bgne"),
                  helper.make_node("Reshape", [f"{t}_flat", "heads"], [f"{t}_heads"]),
                  helper.make_node("Transpose", [f"{t}_heads"], [t], perm=[0, 1, 3, 2, 4])]
    nodes += [helper.make_node("Einsum", ["q", "k"], ["scores"], equation="B G H I D, B G H J D -> B G H I J"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["att"], axis=-1),
              helper.make_node("Einsum", ["att", "v"], ["ctx"], equation="B G H I J, B G H J D -> B G H I D"),
              helper.make_node("Einsum", ["ctx", "wo"], ["proj"], equation="bghnd,hdc->bgnc"),
              helper.make_node("Add", ["proj", "x"], ["y"])]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, g_, n_, c_])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, g_, n_, c_])
    graph = helper.make_graph(nodes, "einsum_attention", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def window_partition_block(seed: int = 0) -> onnx.ModelProto:
    """Swin's window partition around a MatMul, at opset 17: x [1, 8, 8, 16] -> Reshape to 6-D
    [1, 2, 4, 2, 4, 16] -> Transpose (0, 1, 3, 2, 4, 5) -> [8, 16, 16] tokens per window -> MatMul
    [16, 16] -> back through the 6-D Reshape/Transpose -> + x: two 6-D Transposes, above QNN's and
    CoreML's rank limit of 5."""
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 2, 4, 2, 4, 16], np.int64), "win6"),
             numpy_helper.from_array(np.array([-1, 16, 16], np.int64), "tokens"),
             numpy_helper.from_array(np.array([1, 2, 2, 4, 4, 16], np.int64), "grid6"),
             numpy_helper.from_array(np.array([1, 8, 8, 16], np.int64), "image")]
    nodes = [helper.make_node("Reshape", ["x", "win6"], ["w6"]),
             helper.make_node("Transpose", ["w6"], ["wt"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["wt", "tokens"], ["tok"]),
             helper.make_node("MatMul", ["tok", "w"], ["mixed"]),
             helper.make_node("Reshape", ["mixed", "grid6"], ["g6"]),
             helper.make_node("Transpose", ["g6"], ["gt"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["gt", "image"], ["back"]),
             helper.make_node("Add", ["back", "x"], ["y"])]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 8, 16])
    graph = helper.make_graph(nodes, "window_partition", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def hardswish_as_exported(opset: int = 11) -> onnx.ModelProto:
    """Conv -> x * Clip(x + 3, 0, 6) / 6 -> Conv: hard-swish as PaddlePaddle and PyTorch before opset 14
    export it."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["clip"]),
             helper.make_node("Mul", ["c1", "clip"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["hs"]),
             helper.make_node("Conv", ["hs", "w2"], ["y"])]
    g = helper.make_graph(nodes, "hardswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])],
                          [w1, w2, *consts])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv_gap_model(activation: str = "Relu", seed: int = 0) -> onnx.ModelProto:
    """x [1,3,16,16] -> Conv 3x3 (8 channels, bias) -> ``activation`` -> GlobalAveragePool -> y [1,8,1,1]
    at opset 17: the smallest model a target's quantized path can place end to end."""
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node(activation, ["c"], ["a"]),
                           helper.make_node("GlobalAveragePool", ["a"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 1, 1])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m
