"""The one Conv/Gemm affine fold (onnxshrink/passes/cleanup/affine.py), reached through the cleanup
pass and through quantize's ``prepare_float_graph``: right-aligned ONNX broadcasting decides what is
per channel. A constant added to or multiplied with a Conv output [N, C, *spatial] folds into the
Conv only when, right-aligned against that shape, every axis but the channel axis has size 1;
scalars always fold. A [C] constant after a 1-D Conv ([N, C, L] output) applies to the last axis
(length L), never to the channels, whether or not C == L."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import check, run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.passes import create_pass
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize.prepare import prepare_float_graph

F = TensorProto.FLOAT


def conv_affine_model(spatial: tuple, c: int, op: str, const_shape: tuple, seed: int = 0) -> onnx.ModelProto:
    """x [1, 3, *spatial] -> Conv (3 -> c, kernel 1, bias) -> ``op`` with a constant of ``const_shape``."""
    rng = np.random.default_rng(seed)
    k = (1,) * len(spatial)
    w = rng.standard_normal((c, 3) + k).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    const = (rng.uniform(0.5, 2.0, const_shape) * rng.choice([-1, 1], const_shape)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=list(k)),
             helper.make_node(op, ["y", "k"], ["z"], name="affine")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.asarray(const), "k")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, *spatial])],
                              [helper.make_tensor_value_info("z", F, None)], initializer=inits)
    return with_output_shape(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def with_output_shape(m: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its output's shape from shape inference (the full checker wants one)."""
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    m.graph.output[0].type.CopyFrom(inferred.graph.output[0].type)
    check(m)
    return m


def gemm_affine_model(n: int, op: str, const_shape: tuple, seed: int = 0) -> onnx.ModelProto:
    """x [2, 5] -> Gemm (5 -> n, transB) -> ``op`` with a constant of ``const_shape``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, 5)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    const = rng.uniform(0.5, 2.0, const_shape).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1),
             helper.make_node(op, ["y", "k"], ["z"], name="affine")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.asarray(const), "k")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 5])],
                              [helper.make_tensor_value_info("z", F, None)], initializer=inits)
    return with_output_shape(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def via_cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    res = create_pass("cleanup").run(model_to_graph(model), Context(template=model))
    return graph_to_model(res.graph, model)


def via_prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model_to_graph(model)
    prepare_float_graph(graph)
    return graph_to_model(graph, model)


REWRITES = {"cleanup": via_cleanup, "prepare": via_prepare}


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    check(rewritten)
    shape = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    (ref,), (out,) = run_ort(original, {"x": x}), run_ort(rewritten, {"x": x})
    assert ref.shape == out.shape, (ref.shape, out.shape)
    err = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), f"max abs error {err:.3e}"


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# (spatial sizes, channels C, constant shape, folds as per-channel/scalar). A shape that broadcasts
# only because a spatial size is 1 expands the output ([1, C, 1] + [C] is [1, C, C]).
CONV_CASES = [
    # 1-D Conv, output [1, C, L]
    ((1,), 4, (4,), False),          # [C], C != L = 1: last axis, output grows to [1, C, C]
    ((4,), 4, (4,), False),          # [C], C == L: still the last axis, must not fold as bias
    ((7,), 4, (7,), False),          # [L]: last axis
    ((7,), 4, (4, 1), True),         # [C, 1]: channels
    ((7,), 4, (1, 4, 1), True),
    ((7,), 4, (1,), True),           # one element broadcasts everywhere
    ((7,), 4, (), True),             # scalar
    ((7,), 4, (1, 7), False),        # last axis
    ((7,), 4, (4, 7), False),        # per element
    ((1,), 4, (2, 4, 1), False),     # a batch dim > 1 grows the output
    # 2-D Conv, output [1, C, H, W]
    ((5, 1), 4, (4,), False),        # [C] on the last axis (W=1)
    ((5, 4), 4, (4,), False),        # C == W: last axis, must not fold
    ((1, 6), 4, (4, 1), False),      # [C, 1] right-aligns to (H, W): the H axis (H=1)
    ((4, 6), 4, (4, 1), False),      # C == H: still the H axis
    ((5, 6), 4, (4, 1, 1), True),
    ((5, 6), 4, (1, 4, 1, 1), True),
    ((5, 6), 4, (1,), True),
    ((5, 6), 4, (), True),
    ((5, 6), 4, (6,), False),        # [W]
    ((5, 6), 4, (1, 1, 1, 6), False),
    # 3-D Conv, output [1, C, D, H, W]
    ((3, 5, 1), 4, (4,), False),
    ((3, 5, 4), 4, (4,), False),
    ((1, 5, 6), 4, (4, 1, 1), False),  # right-aligned to (D, H, W): the D axis
    ((4, 5, 6), 4, (4, 1, 1), False),  # C == D: still the D axis
    ((3, 5, 6), 4, (4, 1, 1, 1), True),
    ((3, 5, 6), 4, (1, 4, 1, 1, 1), True),
    ((3, 5, 6), 4, (1,), True),
    ((3, 5, 6), 4, (), True),
    ((3, 5, 6), 4, (6,), False),
]


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("spatial,c,const_shape,folds", CONV_CASES)
def test_conv_affine_fold_follows_broadcasting(rewrite, op, spatial, c, const_shape, folds):
    m = conv_affine_model(spatial, c, op, const_shape)
    out = REWRITES[rewrite](m)
    assert_same_outputs(m, out)
    if folds:
        assert ops(out) == ["Conv"], ops(out)
    else:
        assert op in ops(out), ops(out)


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("const_shape,folds", [((3,), True), ((1, 3), True), ((1,), True), ((), True),
                                               ((2, 1), False), ((2, 3), False)])
def test_gemm_affine_fold_follows_broadcasting(rewrite, op, const_shape, folds):
    m = gemm_affine_model(3, op, const_shape)
    out = REWRITES[rewrite](m)
    assert_same_outputs(m, out)
    if folds:
        assert ops(out) == ["Gemm"], ops(out)
    else:
        assert op in ops(out), ops(out)


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 5, 6)])
def test_batchnorm_folds_into_conv_of_every_rank(rewrite, spatial):
    rng = np.random.default_rng(3)
    c = 4
    k = (1,) * len(spatial)
    inits = {"w": rng.standard_normal((c, 3) + k), "s": rng.uniform(0.5, 2, c), "bb": rng.standard_normal(c),
             "mu": rng.standard_normal(c), "var": rng.uniform(0.5, 2, c),
             "k": rng.standard_normal((c,) + (1,) * len(spatial))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=list(k)),
             helper.make_node("BatchNormalization", ["y", "s", "bb", "mu", "var"], ["n"], name="bn"),
             helper.make_node("Add", ["n", "k"], ["z"], name="bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, *spatial])],
                              [helper.make_tensor_value_info("z", F, [1, c, *spatial])],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), n)
                                           for n, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = REWRITES[rewrite](m)
    assert_same_outputs(m, out)
    assert ops(out) == ["Conv"], ops(out)
