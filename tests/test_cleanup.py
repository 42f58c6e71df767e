"""Unit tests of the lossless cleanup pass: one small graph per sub-step, numerically compared
with the original on onnxruntime (graph optimizations off), checked with the full ONNX checker,
and the ``modified`` flag and statistics asserted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_outputs_close, check, run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.passes import create_pass, registry
from onnxshrink.passes.base import Context
from onnxshrink.passes.cleanup import CleanupPass

F = TensorProto.FLOAT


def _rng(seed=0):
    return np.random.default_rng(seed)


def make(nodes, inputs, outputs, inits=None, opset=17, ir=None, value_info=None, name="g"):
    """A model from nodes, (name, dtype, shape) inputs/outputs and {name: array} initializers."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
        value_info=value_info or [])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    if any(s is None for _, _, s in outputs):  # take the outputs' shapes from shape inference
        inferred = onnx.shape_inference.infer_shapes(m)
        for o, io in zip(m.graph.output, inferred.graph.output):
            o.type.CopyFrom(io.type)
    return m


def const_node(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name + "_v"))


def cleanup(model, **opts):
    res = CleanupPass(**opts).run(model_to_graph(model), Context(template=model))
    out = graph_to_model(res.graph, model) if res.modified else model
    return res, out


def feeds_for(model, seed=0):
    rng = _rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dt) if np.dtype(dt).kind == "f" else \
            rng.integers(0, 3, shape).astype(dt)
    return feeds


def assert_same(model, out, feeds=None, tol=1e-5):
    check(out)
    feeds = feeds or feeds_for(model)
    assert_outputs_close(run_ort(model, feeds), run_ort(out, feeds), tol)
    io = lambda m: ([(i.name, i.type) for i in m.graph.input], [(o.name, o.type) for o in m.graph.output])  # noqa: E731
    assert io(model) == io(out)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == \
        [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]


def ops(model):
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------------------------------- registry


def test_registered_with_options():
    cls = registry()["cleanup"]
    assert cls is CleanupPass and cls.lossless and not cls.needs_data
    p = create_pass({"cleanup": {"fold_batchnorm": "false"}})
    assert p.options.fold_batchnorm is False and p.options.fold_constants is True


# ---------------------------------------------------------------------------------------- constants


def test_constant_nodes_to_initializers_paddle_like():
    """Paddle exports (opset 11) keep weights in Constant nodes."""
    rng = _rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        const_node("w", w), const_node("b", b), const_node("six", np.array(6.0, np.float32)),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "six"], ["y"]),
    ]
    m = make(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 8, 8])], opset=11)
    res, out = cleanup(m, fold_scale_bias=False)
    assert res.modified
    assert res.stats["constants_to_initializers"] == 3
    assert "Constant" not in ops(out)
    assert {t.name for t in out.graph.initializer} == {"w", "b", "six"}
    assert_same(m, out)


def test_constant_node_feeding_graph_output_stays_a_node():
    m = make([const_node("y", np.arange(3, dtype=np.float32)), helper.make_node("Relu", ["x"], ["z"])],
             [("x", F, [3])], [("y", F, [3]), ("z", F, [3])])
    res, out = cleanup(m)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert "y" not in {t.name for t in out.graph.initializer}
    assert_same(m, out)


def test_constant_folding_and_size_guard():
    nodes = [
        const_node("a", np.float32(2.0)), const_node("b", np.float32(3.0)),
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["x", "ab"], ["x1"]),
        # a big tensor materialised from a 2-element shape: folded only under the size limit
        const_node("shape", np.array([256, 1024], np.int64)),
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x1", "big"], ["y"]),
    ]
    m = make(nodes, [("x", F, [1, 1024])], [("y", F, [256, 1024])])
    res, out = cleanup(m, fold_size_limit=1 << 16)
    assert res.modified and res.stats["folded_nodes"] >= 1
    assert "ConstantOfShape" in ops(out) and "Mul" not in ops(out)
    assert_same(m, out)
    res2, out2 = cleanup(m, fold_size_limit=1 << 21)
    assert "ConstantOfShape" not in ops(out2)
    assert_same(m, out2)


def test_random_ops_are_never_folded():
    nodes = [helper.make_node("RandomUniform", [], ["r"], shape=[4], seed=1.0),
             helper.make_node("Add", ["x", "r"], ["y"])]
    m = make(nodes, [("x", F, [4])], [("y", F, [4])])
    res, out = cleanup(m)
    assert "RandomUniform" in ops(out)


def test_shape_folding_static_and_partial():
    shape4 = np.array([1, -1], np.int64)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),      # channel dim: static
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),      # batch dim: dynamic
        helper.make_node("Unsqueeze", ["c", "ax0"], ["c1"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "c1", "m1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["y"]),
    ]
    inits = {"i1": np.array(1, np.int64), "i0": np.array(0, np.int64), "ax0": np.array([0], np.int64),
             "m1": np.array([-1], np.int64)}
    m = make(nodes, [("x", F, ["N", 3, 4, 4])], [("y", F, ["N", 3, 16])], inits)
    res, out = cleanup(m)
    assert res.stats["shapes_folded"] == 1
    assert ops(out).count("Gather") == 1
    assert_same(m, out, {"x": _rng().standard_normal((2, 3, 4, 4)).astype(np.float32)})

    # fully static input: the whole shape computation folds away
    m2 = make(nodes, [("x", F, [2, 3, 4, 4])], [("y", F, [2, 3, 16])], inits)
    res2, out2 = cleanup(m2)
    assert ops(out2) == ["Reshape"]
    assert_same(m2, out2)
    del shape4


# ---------------------------------------------------------------------------------------- BatchNorm


def _bn_inits(c, rng, prefix="bn"):
    return {f"{prefix}_s": rng.uniform(0.5, 2, c).astype(np.float32),
            f"{prefix}_b": rng.standard_normal(c).astype(np.float32),
            f"{prefix}_m": rng.standard_normal(c).astype(np.float32),
            f"{prefix}_v": rng.uniform(0.1, 2, c).astype(np.float32)}


def _bn(x, y, prefix="bn", eps=1e-3):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            epsilon=eps)


@pytest.mark.parametrize("group,bias", [(1, True), (2, False), (4, True)])
def test_bn_folds_into_conv(group, bias):
    rng = _rng(group)
    inits = {"w": rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32), **_bn_inits(8, rng)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(8).astype(np.float32)
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["c"], pads=[1, 1, 1, 1], group=group), _bn("c", "y")]
    m = make(nodes, [("x", F, [2, 8, 6, 6])], [("y", F, [2, 8, 6, 6])], inits)
    res, out = cleanup(m)
    assert res.modified and res.stats["bn_folded"] == 1
    assert ops(out) == ["Conv"] and out.graph.output[0].name == "y"
    assert_same(m, out)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_conv_transpose(group):
    rng = _rng(10 + group)
    cin, cout = 4, 6
    inits = {"w": rng.standard_normal((cin, cout // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(cout).astype(np.float32), **_bn_inits(cout, rng)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2], group=group), _bn("c", "y")]
    m = make(nodes, [("x", F, [1, cin, 5, 5])], [("y", F, None)], inits)
    res, out = cleanup(m)
    assert res.stats["bn_folded"] == 1 and ops(out) == ["ConvTranspose"]
    assert_same(m, out)


@pytest.mark.parametrize("trans_b,with_c", [(0, True), (1, True), (1, False)])
def test_bn_folds_into_gemm(trans_b, with_c):
    rng = _rng(20 + trans_b)
    k, n = 5, 7
    inits = {"B": rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32), **_bn_inits(n, rng)}
    ins = ["x", "B"]
    if with_c:
        inits["C"] = rng.standard_normal((1, n)).astype(np.float32)
        ins.append("C")
    nodes = [helper.make_node("Gemm", ins, ["g"], transB=trans_b, alpha=0.7, beta=1.3), _bn("g", "y")]
    m = make(nodes, [("x", F, [3, k])], [("y", F, [3, n])], inits)
    res, out = cleanup(m)
    assert res.stats["bn_folded"] == 1 and ops(out) == ["Gemm"]
    assert_same(m, out)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_following_unpadded_conv(group):
    rng = _rng(30 + group)
    inits = {"w": rng.standard_normal((6, 4 // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(6).astype(np.float32), **_bn_inits(4, rng)}
    nodes = [_bn("x", "n"), helper.make_node("Conv", ["n", "w", "b"], ["y"], group=group, strides=[2, 2])]
    m = make(nodes, [("x", F, [1, 4, 9, 9])], [("y", F, None)], inits)
    res, out = cleanup(m)
    assert res.stats["bn_folded_forward"] == 1 and ops(out) == ["Conv"]
    assert_same(m, out)


def test_bn_not_folded_into_padded_following_conv_or_shared_tensor():
    rng = _rng(40)
    inits = {"w": rng.standard_normal((6, 4, 3, 3)).astype(np.float32), **_bn_inits(4, rng)}
    nodes = [_bn("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], pads=[1, 1, 1, 1])]
    m = make(nodes, [("x", F, [1, 4, 5, 5])], [("y", F, None)], inits)
    res, out = cleanup(m)
    assert "BatchNormalization" in ops(out)  # padding zeros are not transformed: not exact
    # Conv output read twice: the BN cannot fold backwards
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y", "bn2"), helper.make_node("Relu", ["c"], ["z"])]
    inits2 = {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32), **_bn_inits(4, rng, "bn2")}
    m2 = make(nodes, [("x", F, [1, 4, 5, 5])], [("y", F, None), ("z", F, None)], inits2)
    res2, out2 = cleanup(m2)
    assert res2.stats["bn_folded"] == 0 and "BatchNormalization" in ops(out2)
    assert_same(m2, out2)


def test_standalone_bn_stays():
    rng = _rng(41)
    m = make([_bn("x", "y")], [("x", F, [1, 4, 3, 3])], [("y", F, None)], _bn_inits(4, rng))
    res, out = cleanup(m)
    assert not res.modified and ops(out) == ["BatchNormalization"]


# ---------------------------------------------------------------------------------------- Mul/Add


@pytest.mark.parametrize("op,shape,swap", [("Mul", [], False), ("Mul", [4, 1, 1], True), ("Add", [1, 4, 1, 1], False),
                                           ("Add", [], True), ("Sub", [4, 1, 1], False), ("Div", [1], False)])
def test_scale_bias_fold_into_conv(op, shape, swap):
    rng = _rng(50)
    c = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "k": c}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["k", "c"] if swap else ["c", "k"], ["y"])]
    m = make(nodes, [("x", F, [1, 3, 5, 5])], [("y", F, [1, 4, 5, 5])], inits)
    res, out = cleanup(m)
    assert res.stats["scale_bias_folded"] == 1 and ops(out) == ["Conv"]
    assert_same(m, out)


def test_scale_bias_chain_into_gemm():
    rng = _rng(51)
    inits = {"B": rng.standard_normal((5, 6)).astype(np.float32), "C": rng.standard_normal(6).astype(np.float32),
             "s": rng.uniform(0.5, 2, 6).astype(np.float32), "t": rng.standard_normal((1, 6)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], beta=0.5),
             helper.make_node("Mul", ["g", "s"], ["g2"]), helper.make_node("Add", ["g2", "t"], ["y"])]
    m = make(nodes, [("x", F, [2, 5])], [("y", F, [2, 6])], inits)
    res, out = cleanup(m)
    assert res.stats["scale_bias_folded"] == 2 and ops(out) == ["Gemm"]
    assert_same(m, out)


def test_scale_not_folded_when_not_exact():
    rng = _rng(52)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    # a per-position (not per-channel) constant, an intermediate read twice, and a graph output
    cases = [
        ([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])],
         {"k": rng.standard_normal((1, 1, 5, 5)).astype(np.float32)}, [("y", F, None)]),
        ([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"]),
          helper.make_node("Relu", ["c"], ["z"])], {"k": np.float32(2.0)}, [("y", F, None), ("z", F, None)]),
        ([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])],
         {"k": np.float32(2.0)}, [("y", F, None), ("c", F, None)]),
    ]
    for nodes, extra, outs in cases:
        m = make(nodes, [("x", F, [1, 3, 5, 5])], outs, {"w": w, **extra})
        res, out = cleanup(m)
        assert res.stats.get("scale_bias_folded", 0) == 0
        assert "Mul" in ops(out)
        assert_same(m, out)


# ---------------------------------------------------------------------------------------- Identity/Dropout


def test_identity_and_dropout_removed_output_names_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"], ratio=0.3),
             helper.make_node("Sigmoid", ["d"], ["s"]),
             helper.make_node("Identity", ["s"], ["y"]),            # feeds a graph output
             helper.make_node("Identity", ["x"], ["x_copy"])]       # graph input straight to output: kept
    m = make(nodes, [("x", F, [2, 3])], [("y", F, [2, 3]), ("x_copy", F, [2, 3])], opset=11)
    res, out = cleanup(m)
    assert res.stats["identity_removed"] == 2 and res.stats["dropout_removed"] == 1
    assert sorted(ops(out)) == ["Identity", "Relu", "Sigmoid"]
    assert [o.name for o in out.graph.output] == ["y", "x_copy"]
    assert_same(m, out)


def test_dropout_with_used_mask_or_training_mode_stays():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y", "mask"])]
    m = make(nodes, [("x", F, [2, 3]), ("train", TensorProto.BOOL, [])],
             [("y", F, [2, 3]), ("mask", TensorProto.BOOL, [2, 3])], {"ratio": np.float32(0.5)})
    res, out = cleanup(m)
    assert "Dropout" in ops(out)


# ---------------------------------------------------------------------------------------- dead code, merging


def test_dead_nodes_unused_and_duplicate_initializers():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Add", ["x", "a1"], ["p"]), helper.make_node("Mul", ["p", "a2"], ["y"]),
             helper.make_node("Exp", ["x"], ["dead"])]
    m = make(nodes, [("x", F, [2, 3])], [("y", F, [2, 3])], {"a1": a, "a2": a.copy(), "unused": a + 1})
    res, out = cleanup(m)
    assert res.modified and res.stats["initializers_merged"] == 1
    assert ops(out) == ["Add", "Mul"]
    assert [t.name for t in out.graph.initializer] == ["a1"]
    assert_same(m, out)


def test_already_clean_graph_is_not_modified():
    rng = _rng(60)
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
             [("x", F, [1, 3, 5, 5])], [("y", F, None)], {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32)})
    res, _ = cleanup(m)
    assert not res.modified and res.stats["nodes_before"] == res.stats["nodes_after"] == 2


def test_each_step_can_be_disabled():
    rng = _rng(61)
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), **_bn_inits(4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "b"), helper.make_node("Identity", ["b"], ["y"])]
    m = make(nodes, [("x", F, [1, 3, 5, 5])], [("y", F, None)], inits)
    _, out = cleanup(m, fold_batchnorm=False, fold_batchnorm_forward=False, remove_identity=False)
    assert ops(out) == ["Conv", "BatchNormalization", "Identity"]
    res, out = cleanup(m)
    assert ops(out) == ["Conv"]
    assert_same(m, out)


# ---------------------------------------------------------------------------------------- interface, IR, domains


def test_ir3_initializers_listed_as_inputs_stay_valid():
    rng = _rng(70)
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), **_bn_inits(4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    m = make(nodes, [("x", F, [1, 3, 4, 4])], [("y", F, [1, 4, 4, 4])], inits, opset=9, ir=3)
    for name, v in inits.items():
        m.graph.input.append(helper.make_tensor_value_info(name, F, list(v.shape)))
    res, out = cleanup(m)
    assert res.stats["bn_folded"] == 1
    check(out)
    assert out.graph.input[0].name == "x"
    assert {i.name for i in out.graph.input} >= {t.name for t in out.graph.initializer}
    feeds = feeds_for(m)
    assert_outputs_close(run_ort(m, feeds), run_ort(out, feeds), 1e-5)


def test_overridable_initializer_inputs_are_not_folded():
    """IR >= 4: an initializer that is also a graph input is a default the caller may override."""
    rng = _rng(71)
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), **_bn_inits(4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    m = make(nodes, [("x", F, [1, 3, 4, 4]), ("bn_s", F, [4])], [("y", F, None)], inits)
    res, out = cleanup(m)
    assert "BatchNormalization" in ops(out)
    assert [i.name for i in out.graph.input] == ["x", "bn_s"]
    feeds = {**feeds_for(m), "bn_s": np.full(4, 3.0, np.float32)}
    assert_outputs_close(run_ort(m, feeds), run_ort(out, feeds), 1e-5)


def test_custom_domain_ops_left_alone():
    nodes = [const_node("k", np.float32(2.0)), helper.make_node("Mul", ["x", "k"], ["m"]),
             helper.make_node("MyOp", ["m", "k"], ["y"], domain="com.example")]
    m = make(nodes, [("x", F, [2])], [("y", F, [2])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    res, out = cleanup(m)
    assert any(n.op_type == "MyOp" and n.domain == "com.example" for n in out.graph.node)
    assert any(o.domain == "com.example" for o in out.opset_import)
    onnx.checker.check_model(out)


def test_metadata_kept():
    m = make([helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])],
             [("x", F, [2])], [("y", F, [2])])
    m.producer_name, m.doc_string = "paddle2onnx", "doc"
    helper.set_model_props(m, {"author": "me"})
    res, out = cleanup(m)
    assert res.modified and out.producer_name == "paddle2onnx" and out.doc_string == "doc"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me"}


# ---------------------------------------------------------------------------------------- subgraphs


def _if_model(opset=13):
    """An If whose branches hold Constant nodes, Identity, a Conv+BN and outer-scope references."""
    rng = _rng(80)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    bn = _bn_inits(4, rng)
    then_nodes = [const_node("t_w", w)] + [const_node("t_" + k, v) for k, v in bn.items()] + [
        helper.make_node("Conv", ["r", "t_w"], ["t_c"]),
        helper.make_node("BatchNormalization", ["t_c", "t_bn_s", "t_bn_b", "t_bn_m", "t_bn_v"], ["t_bn"]),
        helper.make_node("Identity", ["t_bn"], ["t_out"])]
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", F, None)])
    else_nodes = [const_node("e_k", np.full((1, 4, 1, 1), 0.5, np.float32)),
                  helper.make_node("Conv", ["r", "w_outer"], ["e_c"]),   # outer-scope weight
                  helper.make_node("Mul", ["e_c", "e_k"], ["e_out"])]
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info("e_out", F, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make(nodes, [("x", F, [1, 3, 4, 4]), ("cond", TensorProto.BOOL, [])], [("y", F, None)],
             {"w_outer": w}, opset=opset)
    return m


def test_if_subgraphs_processed_without_breaking_outer_references():
    m = _if_model()
    res, out = cleanup(m)
    assert res.modified
    assert res.stats["constants_to_initializers"] >= 6 and res.stats["bn_folded"] == 1
    assert res.stats["scale_bias_folded"] == 1
    then_g = next(a.g for a in out.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["Conv"]
    for cond in (True, False):
        feeds = {**feeds_for(m), "cond": np.array(cond)}
        assert_same(m, out, feeds)


def test_if_subgraphs_left_alone_when_disabled():
    m = _if_model()
    res, out = cleanup(m, subgraphs=False, constants_to_initializers=False)
    then_g = next(a.g for a in out.graph.node[-1].attribute if a.name == "then_branch")
    assert "BatchNormalization" in [n.op_type for n in then_g.node]
    for cond in (True, False):
        feeds = {**feeds_for(m), "cond": np.array(cond)}
        assert_same(m, out, feeds)


def test_if_with_constant_condition_flattened_when_asked():
    m = _if_model()
    m.graph.input.pop()  # cond becomes a constant
    m.graph.initializer.append(numpy_helper.from_array(np.array(False), "cond"))
    res, out = cleanup(m, flatten_if=True)
    assert res.stats["if_flattened"] == 1 and "If" not in ops(out)
    assert out.graph.output[0].name == "y"
    assert_same(m, out)


# ---------------------------------------------------------------------------------------- whole models


def test_pytorch_like_block():
    """Conv-BN-ReLU, Conv-BN + residual, global pool, Flatten, Gemm; Identity from the exporter."""
    rng = _rng(90)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, **_bn_inits(8, rng, "b1"),
             "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, **_bn_inits(8, rng, "b2"),
             "fc_w": rng.standard_normal((10, 8)).astype(np.float32),
             "fc_b": rng.standard_normal(10).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), _bn("c1", "n1", "b1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), _bn("c2", "n2", "b2"),
        helper.make_node("Add", ["n2", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Identity", ["logits"], ["y"]),
    ]
    m = make(nodes, [("x", F, [2, 3, 8, 8])], [("y", F, [2, 10])], inits, opset=13)
    res, out = cleanup(m)
    assert res.stats["bn_folded"] == 2 and res.stats["identity_removed"] == 1
    assert "BatchNormalization" not in ops(out) and len(out.graph.node) == 8
    assert_same(m, out)


def test_paddle_like_model_opset11():
    """Weights in Constant nodes, BN after Conv, hardswish-like arithmetic, shape ops on constants."""
    rng = _rng(91)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    bn = _bn_inits(6, rng)
    nodes = [const_node("w", w)] + [const_node(k, v) for k, v in bn.items()] + [
        const_node("three", np.float32(3.0)), const_node("six", np.float32(6.0)),
        const_node("zero", np.float32(0.0)), const_node("shp", np.array([0, -1], np.int64)),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "n"),
        helper.make_node("Add", ["n", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
        helper.make_node("Mul", ["n", "cl"], ["m"]), helper.make_node("Div", ["m", "six"], ["hs"]),
        helper.make_node("Reshape", ["hs", "shp"], ["y"]),
    ]
    m = make(nodes, [("x", F, [1, 3, 6, 6])], [("y", F, None)], opset=11)
    res, out = cleanup(m)
    assert res.stats["constants_to_initializers"] == 9 and res.stats["bn_folded"] == 1
    assert "Constant" not in ops(out) and "BatchNormalization" not in ops(out)
    assert res.stats["nodes_after"] < res.stats["nodes_before"]
    assert_same(m, out)


# ---------------------------------------------------------------------------------------- extra folds


def test_duplicate_nodes_merged():
    nodes = [helper.make_node("Shape", ["x"], ["s1"]), helper.make_node("Shape", ["x"], ["s2"]),
             helper.make_node("Gather", ["s1", "i"], ["g1"], axis=0),
             helper.make_node("Gather", ["s2", "i2"], ["g2"], axis=0),
             helper.make_node("Add", ["g1", "g2"], ["y"]),
             helper.make_node("RandomUniformLike", ["x"], ["r1"]), helper.make_node("RandomUniformLike", ["x"], ["r2"]),
             helper.make_node("Sub", ["r1", "r2"], ["z"])]
    m = make(nodes, [("x", F, ["N", 3])], [("y", TensorProto.INT64, []), ("z", F, ["N", 3])],
             {"i": np.array(0, np.int64), "i2": np.array(0, np.int64)})
    res, out = cleanup(m)
    assert res.stats["duplicate_nodes_merged"] == 2  # Shape and Gather (after the indices merged)
    assert ops(out).count("Shape") == 1 and ops(out).count("Gather") == 1
    assert ops(out).count("RandomUniformLike") == 2  # random ops are never merged
    check(out)
    feeds = {"x": np.ones((4, 3), np.float32)}
    assert run_ort(m, feeds)[0] == run_ort(out, feeds)[0]


def test_equal_tables_are_merged_and_each_is_hashed_once(monkeypatch):
    """Two equal weights (not loaded: hashed from their tensors) are merged, and cleanup's two merges
    hash each of them once (the second reads the first's digests): a 2 GiB model's tables took
    2.6 s per hash."""
    from onnxshrink.passes.cleanup import dedup
    hashed = []
    real = dedup.hashlib.sha1

    def counting(data=b""):
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(dedup.hashlib, "sha1", counting)
    rng = _rng()
    W, W2 = (rng.standard_normal((64, 96)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["x", "B"], ["b"]),
             helper.make_node("MatMul", ["x", "C"], ["c"]), helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Add", ["ab", "c"], ["y"])]
    m = make(nodes, [("x", F, [2, 64])], [("y", F, [2, 96])], {"A": W, "B": W.copy(), "C": W2})
    res, out = cleanup(m)
    assert res.stats["initializers_merged"] == 1
    assert sorted(t.name for t in out.graph.initializer) == ["A", "C"]
    assert hashed == [W.nbytes] * 3, hashed  # A, B and C once each, over both merges
    assert_same(m, out, {"x": _rng().standard_normal((2, 64)).astype(np.float32)}, tol=0)


def test_constant_of_shape_arithmetic_folded_with_dynamic_shape():
    """YOLOv8's stride tensors: ConstantOfShape(dynamic shape, 1.0) * 8.0."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Mul", ["ones", "eight"], ["st"]), helper.make_node("Sub", ["st", "half"], ["st2"]),
             helper.make_node("Add", ["x", "st2"], ["y"])]
    m = make(nodes, [("x", F, ["N", 3])], [("y", F, ["N", 3])],
             {"eight": np.float32(8.0), "half": np.array([0.5], np.float32)})
    res, out = cleanup(m)
    assert res.stats["constant_of_shape_folded"] == 2
    assert sorted(ops(out)) == ["Add", "ConstantOfShape", "Shape"]
    assert_same(m, out, {"x": _rng().standard_normal((5, 3)).astype(np.float32)}, tol=0)


def test_constant_chains_merged():
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Div", ["m", "six"], ["d"]),
             helper.make_node("Mul", ["s", "d"], ["e"]),            # constant first operand
             helper.make_node("Add", ["e", "b"], ["f"]), helper.make_node("Sub", ["f", "c"], ["y"]),
             helper.make_node("Div", ["six", "y"], ["z"])]          # constant numerator: not a chain
    rng = _rng(100)
    m = make(nodes, [("x", F, [2, 4])], [("z", F, [2, 4])],
             {"a": rng.uniform(1, 2, (1, 4)).astype(np.float32), "six": np.float32(6.0), "s": np.float32(0.7),
              "b": rng.standard_normal(4).astype(np.float32), "c": np.float32(0.25)})
    res, out = cleanup(m)
    assert res.stats["constant_chains_folded"] == 3
    assert ops(out) == ["Mul", "Add", "Div"]
    assert_same(m, out)


def test_stale_value_info_does_not_fold_shapes():
    """An exporter's value_info claiming a static shape for a dynamic tensor is not trusted."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=F)]
    m = make(nodes, [("x", F, ["N", 3])], [("y", F, [2])],
             value_info=[helper.make_tensor_value_info("r", F, [2, 3])])
    res, out = cleanup(m)
    assert "Shape" in ops(out)
    feeds = {"x": np.ones((5, 3), np.float32)}
    assert run_ort(out, feeds)[0].tolist() == [5.0, 3.0]


def test_tensorflow_like_model():
    """tf2onnx style: NHWC input transposed, Identity nodes, Constant shapes, Cast of constant
    shape arithmetic, Conv + Add bias + Mul scale, MatMul + Add dense head."""
    rng = _rng(92)
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Identity", ["xt"], ["xt_id"]),
        const_node("k", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        helper.make_node("Identity", ["k"], ["k_read"]),                      # TF "read" of a variable
        helper.make_node("Conv", ["xt_id", "k_read"], ["c"], pads=[1, 1, 1, 1]),
        const_node("bias", rng.standard_normal((1, 4, 1, 1)).astype(np.float32)),
        helper.make_node("Add", ["c", "bias"], ["cb"]),
        const_node("scale", rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)),
        helper.make_node("Mul", ["cb", "scale"], ["cs"]),
        helper.make_node("Relu", ["cs"], ["r"]),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 3, 1]),
        const_node("two", np.array([2], np.int64)), const_node("eight", np.array([8], np.int64)),
        helper.make_node("Mul", ["two", "eight"], ["flat"]), const_node("m1", np.array([-1], np.int64)),
        helper.make_node("Mul", ["flat", "eight"], ["flat2"]),
        helper.make_node("Concat", ["m1", "flat2"], ["shape"], axis=0),
        helper.make_node("Reshape", ["rt", "shape"], ["f"]),
        const_node("w", rng.standard_normal((128, 5)).astype(np.float32)),
        helper.make_node("MatMul", ["f", "w"], ["mm"]),
        const_node("b", rng.standard_normal(5).astype(np.float32)),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Identity", ["logits"], ["y"]),
    ]
    m = make(nodes, [("x", F, [1, 8, 4, 3])], [("y", F, [1, 5])], opset=13)
    res, out = cleanup(m)
    assert res.stats["identity_removed"] == 2 and res.stats["scale_bias_folded"] == 2  # Identity(k) folds
    assert sorted(ops(out)) == ["Add", "Conv", "MatMul", "Relu", "Reshape", "Transpose", "Transpose"]
    assert_same(m, out)


def test_unused_overridable_input_kept():
    m = make([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Exp", ["opt"], ["dead"])],
             [("x", F, [2]), ("opt", F, [2])], [("y", F, [2])], {"opt": np.ones(2, np.float32)})
    res, out = cleanup(m)
    assert res.modified and ops(out) == ["Relu"]
    assert [i.name for i in out.graph.input] == ["x", "opt"]
    check(out)


def test_outer_constant_read_by_both_branches_stays_outer():
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", F, [2])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", F, [2])])
    m = make([const_node("k", np.full(2, 2.0, np.float32)),
              helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
             [("x", F, [2]), ("c", TensorProto.BOOL, [])], [("y", F, [2])])
    res, out = cleanup(m)
    assert [t.name for t in out.graph.initializer] == ["k"]
    for a in out.graph.node[0].attribute:
        assert not a.g.initializer
    for c in (True, False):
        assert_same(m, out, {"x": np.ones(2, np.float32), "c": np.array(c)})


@pytest.mark.parametrize("group", [1, 2])
def test_scale_bias_fold_into_following_unpadded_conv(group):
    """PP-LCNet's learnable affine (x * a + b) before a pointwise conv."""
    rng = _rng(110 + group)
    inits = {"a": np.float32(1.7), "t": rng.standard_normal((4, 1, 1)).astype(np.float32),
             "w": rng.standard_normal((6, 4 // group, 1, 1)).astype(np.float32),
             "b": rng.standard_normal(6).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["a", "r"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["p"]), helper.make_node("Conv", ["p", "w", "b"], ["y"], group=group)]
    m = make(nodes, [("x", F, [1, 4, 5, 5])], [("y", F, None)], inits)
    res, out = cleanup(m)
    assert res.stats["scale_bias_folded_forward"] == 2 and ops(out) == ["Relu", "Conv"]
    assert_same(m, out)


def test_scale_bias_not_folded_into_padded_or_broadcasting_conv():
    rng = _rng(120)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    padded = make([helper.make_node("Add", ["x", "t"], ["p"]),
                   helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 1, 1, 1])],
                  [("x", F, [1, 4, 5, 5])], [("y", F, None)], {"t": np.float32(0.5), "w": w})
    res, out = cleanup(padded)
    assert "Add" in ops(out)
    assert_same(padded, out)
    # x has rank 3: the constant broadcasts it to rank 4, so the Add cannot go
    bcast = make([helper.make_node("Add", ["x", "t"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"])],
                 [("x", F, [4, 5, 5])], [("y", F, None)], {"t": np.zeros((1, 4, 1, 1), np.float32) + 0.5, "w": w})
    res, out = cleanup(bcast)
    assert "Add" in ops(out)
    assert_same(bcast, out)


# ---------------------------------------------------------------------------------------- hard activations


def _hard_swish_nodes(x, y, tag, six_first=False, by_mul=False, x_first=True):
    """x * Clip(x + 3, 0, 6) / 6 as PaddlePaddle writes it below opset 14 (Add, Clip, Mul, Div)."""
    mul_in = [x, f"{tag}_c"] if x_first else [f"{tag}_c", x]
    scale = helper.make_node("Mul", [f"{tag}_m", "sixth"], [y]) if by_mul else \
        helper.make_node("Div", [f"{tag}_m", "six"], [y])
    return [helper.make_node("Add", ["three", x] if six_first else [x, "three"], [f"{tag}_a"]),
            helper.make_node("Clip", [f"{tag}_a", "zero", "six"], [f"{tag}_c"]),
            helper.make_node("Mul", mul_in, [f"{tag}_m"]), scale]


HARD_INITS = {"three": np.float32(3.0), "zero": np.float32(0.0), "six": np.float32(6.0),
              "sixth": np.array([1.0 / 6.0], np.float32)}


def test_hard_swish_and_hard_sigmoid_chains_fused():
    """Paddle's decomposed hard-swish (both Mul orders, Div by 6 or Mul by 1/6) becomes
    x * HardSigmoid(x), its hard-sigmoid Clip(x + 3, 0, 6) / 6 a HardSigmoid, before the scale
    folds could move the / 6 into the following Conv; outputs equal to float round-off."""
    rng = _rng(90)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]),
             *_hard_swish_nodes("c1", "h1", "a"),
             helper.make_node("Conv", ["h1", "w2"], ["c2"]),                       # the / 6 would fold here
             *_hard_swish_nodes("c2", "h2", "b", six_first=True, by_mul=True, x_first=False),
             helper.make_node("Add", ["h2", "three"], ["s_a"]),
             helper.make_node("Clip", ["s_a", "zero", "six"], ["s_c"]),
             helper.make_node("Div", ["s_c", "six"], ["y"])]                        # hard-sigmoid
    m = make(nodes, [("x", F, [1, 3, 6, 6])], [("y", F, None)],
             {**HARD_INITS, "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)}, opset=11)
    res, out = cleanup(m)
    assert res.stats["hard_activations_fused"] == 3
    assert ops(out) == ["Conv", "HardSigmoid", "Mul", "Conv", "HardSigmoid", "Mul", "HardSigmoid"]
    hs = [n for n in out.graph.node if n.op_type == "HardSigmoid"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in hs]
    assert all(abs(a["alpha"] - 1 / 6) < 1e-7 and a["beta"] == 0.5 for a in attrs), attrs
    feeds = {"x": (4 * _rng(91).standard_normal((1, 3, 6, 6))).astype(np.float32)}  # crosses -3 and 3
    assert_same(m, out, feeds)


@pytest.mark.parametrize("change", ["bounds", "shift", "scale", "shared", "other_mul", "widening"])
def test_hard_chain_not_fused_when_not_exact(change):
    """Other bounds, shift or scale, an intermediate read elsewhere, a Mul by another tensor, or a
    one-element constant of higher rank than x (it broadcasts the shape): left as they are."""
    inits = dict(HARD_INITS)
    nodes = _hard_swish_nodes("x", "y", "a")
    outputs = [("y", F, None)]
    if change == "bounds":
        inits["six"] = np.float32(5.0)
    elif change == "shift":
        inits["three"] = np.float32(2.0)
    elif change == "scale":
        nodes[3] = helper.make_node("Div", ["a_m", "seven"], ["y"])
        inits["seven"] = np.float32(7.0)
    elif change == "shared":
        outputs.append(("a_c", F, None))
    elif change == "other_mul":
        nodes[2] = helper.make_node("Mul", ["z", "a_c"], ["a_m"])
    elif change == "widening":
        inits["three"] = np.full((1, 1, 1, 1, 1), 3.0, np.float32)
    else:
        raise AssertionError(change)
    inputs = [("x", F, [2, 4, 3, 3])] + ([("z", F, [2, 4, 3, 3])] if change == "other_mul" else [])
    m = make(nodes, inputs, outputs, inits, opset=11)
    res, out = cleanup(m)
    assert res.stats["hard_activations_fused"] == 0
    assert "HardSigmoid" not in ops(out) and "Clip" in ops(out)
    assert_same(m, out)


def test_hard_activation_fusion_can_be_disabled():
    m = make(_hard_swish_nodes("x", "y", "a"), [("x", F, [2, 4])], [("y", F, [2, 4])], HARD_INITS, opset=11)
    _, out = cleanup(m, fuse_hard_activations=False)
    assert "HardSigmoid" not in ops(out)
    _, out = cleanup(m)
    assert ops(out) == ["HardSigmoid", "Mul"]


# ---------------------------------------------------------------------------------------- fold_pad


def _pad_model(pads, user="Conv", value=None, mode=None, opset=17, user_attrs=None, extra_reader=False,
               producer="Relu"):
    """x [1, 3, 9, 9] -> ``producer`` -> Pad(pads[, value]) -> user (Conv 3x3 stride 2 / a pool) -> y."""
    rng = _rng(5)
    inits = {"pads": np.array(pads, np.int64)}
    pad_inputs = ["r", "pads"]
    if value is not None:
        inits["pv"] = np.array(value, np.float32)
        pad_inputs.append("pv")
    pad_attrs = {"mode": mode} if mode else {}
    if opset < 11:
        pad_inputs = ["r"]
        pad_attrs = {"pads": list(pads), **({"value": float(value)} if value is not None else {}), **pad_attrs}
        del inits["pads"]
        inits.pop("pv", None)
    nodes = [helper.make_node(producer, ["x"], ["r"]), helper.make_node("Pad", pad_inputs, ["p"], **pad_attrs)]
    if user == "Conv":
        inits["w"] = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["p", "w"], ["y"], strides=[2, 2], **(user_attrs or {})))
    else:
        nodes.append(helper.make_node(user, ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], **(user_attrs or {})))
    outputs = [("y", F, None)]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["p"], ["z"]))
        outputs.append(("z", F, None))
    return make(nodes, [("x", F, [1, 3, 9, 9])], outputs, inits=inits, opset=opset)


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 0, 0, 0, 0, 1, 1]),                                        # Keras' "same", stride 2
    dict(pads=[0, 0, 1, 2, 0, 0, 2, 1], user_attrs={"pads": [1, 0, 0, 1]}),      # added to the Conv's own pads
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0),                              # an explicit zero value
    dict(pads=[0, 0, 0, 0, 0, 0, 1, 1], opset=10),                               # the attribute form
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], user="AveragePool", user_attrs={"count_include_pad": 1}),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], user="MaxPool"),                         # of a Relu's output: >= 0
])
def test_a_zero_pad_folds_into_the_conv_or_counting_average_pool_reading_it(case):
    m = _pad_model(**case)
    res, out = cleanup(m)
    assert res.stats["pads_folded"] == 1 and "Pad" not in ops(out)
    assert_same(m, out)


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5),                              # not zero
    dict(pads=[0, 1, 0, 0, 0, 0, 0, 0], user="AveragePool", user_attrs={"count_include_pad": 1}),  # channels
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], user="MaxPool", producer="Neg"),          # MaxPool of values < 0
    dict(pads=[0, 0, 3, 3, 0, 0, 3, 3], user="MaxPool"),                         # a window all padding
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], user="AveragePool"),                     # padding not counted
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], extra_reader=True),                      # another node reads the Pad
])
def test_a_pad_the_conv_cannot_take_stays(case):
    m = _pad_model(**case)
    res, out = cleanup(m)
    assert res.stats["pads_folded"] == 0 and "Pad" in ops(out)
    assert_same(m, out)
