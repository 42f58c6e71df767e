"""graph/cost.py: recurrent MACs and the share of MACs onnxruntime runs in integer kernels."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxshrink
from models.build import crnn_small, resnet_small
from models.real import preprocess, text_lines
from onnxshrink.graph.cost import INTEGER_OPS, model_cost, model_stats


def test_lstm_macs_count_both_products_per_step_and_direction():
    m = crnn_small(hw=(32, 64), hidden=16, widths=(8, 8, 8, 8, 8))
    per = model_cost(m)["per_node"]
    # T = 64 / 4 steps, batch 1, 2 directions, 4 gates x 16, input 8 + hidden 16
    assert per["/rnn/LSTM"] == 16 * 1 * 2 * 64 * (8 + 16)


def _optimized_ops(model: onnx.ModelProto) -> collections.Counter:
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_integer_share_matches_what_onnxruntime_fuses():
    m = crnn_small(hw=(32, 64), hidden=16, widths=(8, 8, 8, 8, 8))
    xs = [{"x": x} for x in preprocess(text_lines(8, (32, 64)), "crnn")]
    out, rep = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"guard": False, "dynamic": "off"}}],
                                   data=xs, budget="none", speed="off")
    ops = _optimized_ops(out)
    n_int = sum(v for k, v in ops.items() if k in INTEGER_OPS)
    assert n_int == 6 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 0, ops  # 5 convs and the head
    st = model_stats(out)
    lstm = model_cost(m)["per_node"]["/rnn/LSTM"]
    assert st["integer_macs"] == st["macs"] - lstm  # everything but the float LSTM
    assert rep.after["integer_macs"] == st["integer_macs"] and rep.before["integer_macs"] == 0
    # a float model: none
    assert model_stats(resnet_small())["integer_macs"] == 0


def _chained_reshapes(out_features: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, H, 8] -> Reshape to (N, 12, -1), N read off Shape(x) -> Reshape to (N, 12, 2, 4), its
    head read off the first Reshape's output -> MatMul by W [4, out_features]: the second target
    shape is known only once the first Reshape's output is (PP-OCRv4 rec's SVTR blocks do this)."""
    def const(name, v):
        return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64), name))
    nodes = [
        const("s0", [0]), const("s1", [1]), const("s2", [2]), const("t1", [12, -1]), const("t2", [2, 4]),
        h.make_node("Sigmoid", ["x"], ["xs"]),
        h.make_node("Shape", ["xs"], ["sh0"]), h.make_node("Slice", ["sh0", "s0", "s1"], ["n0"]),
        h.make_node("Concat", ["n0", "t1"], ["shape1"], axis=0), h.make_node("Reshape", ["xs", "shape1"], ["y1"]),
        h.make_node("Relu", ["y1"], ["y1r"]),
        h.make_node("Shape", ["y1r"], ["sh1"]), h.make_node("Slice", ["sh1", "s0", "s2"], ["n1"]),
        h.make_node("Concat", ["n1", "t2"], ["shape2"], axis=0), h.make_node("Reshape", ["y1r", "shape2"], ["y2"]),
        h.make_node("MatMul", ["y2", "W"], ["z"]),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", 8])],
                     [h.make_tensor_value_info("z", TensorProto.FLOAT, [None] * 4)],
                     [nh.from_array(np.random.default_rng(seed).normal(size=(4, out_features)).astype(np.float32),
                                    "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def test_macs_behind_shapes_read_off_earlier_reshapes_are_known():
    c = model_cost(_chained_reshapes(), {"x": [1, 3, 4, 8]})
    assert c["macs_known"] and c["macs"] == 1 * 12 * 2 * 5 * 4  # the MatMul [1, 12, 2, 4] x [4, 5]
    assert c["integer_macs"] == 0


def test_the_values_after_a_dynamic_int8_lstm_have_shapes_and_their_macs_count():
    """onnx's shape inference knows no com.microsoft op: without the DynamicQuantizeLSTM's output
    shapes, the head MatMul after it had no MACs and the model's integer share was unknown.
    ``dynamic=on`` without the guard: the LSTM and the head dynamic int8, the convolutions float."""
    from onnxshrink.graph.shapes import fix_input_shapes, infer_shapes, value_shapes
    m = crnn_small(hw=(32, 64), hidden=16, widths=(8, 8, 8, 8, 8))
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"  # a text line of any width
    del m.graph.value_info[:]
    xs = [{"x": x} for x in preprocess(text_lines(8, (32, 64)), "crnn")]
    out, _ = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"guard": False, "dynamic": "on"}}],
                                 data=xs, budget="none", speed="off")
    lstm = next(n for n in out.graph.node if n.op_type == "DynamicQuantizeLSTM")
    shapes = value_shapes(infer_shapes(fix_input_shapes(out, {"x": [1, 3, 32, 64]})))
    assert shapes[lstm.output[0]] == [16, 2, 1, 16]  # Y: [T = 64 / 4, directions, batch, hidden]
    st, per = model_stats(out, {"x": [1, 3, 32, 64]}), model_cost(m, {"x": [1, 3, 32, 64]})["per_node"]
    assert st["macs"] == sum(per.values())
    assert st["integer_macs"] == per["/rnn/LSTM"] + per["/head/MatMul"]  # dynamic int8; the convs float


def test_a_model_is_folded_once_per_shape_and_without_its_weights(monkeypatch):
    """The fold that resolves the shapes copies the model each round: it gets a copy without weight
    data (the weights as graph inputs of their dims), and the same structure at the same shapes is
    costed once (a pass's result is costed for its record, by the quantize pass and for the report)."""
    from onnxshrink.graph import cost
    monkeypatch.setattr(cost, "_COST_MEMO", {})
    folded = []

    def spy(model, shapes):
        folded.append(max((t.ByteSize() for t in model.graph.initializer), default=0))
        return fold(model, shapes)
    fold = cost._fold_shape_arithmetic
    monkeypatch.setattr(cost, "_fold_shape_arithmetic", spy)
    a = model_cost(_chained_reshapes(out_features=100), {"x": [1, 3, 4, 8]})
    b = model_cost(_chained_reshapes(out_features=100, seed=1), {"x": [1, 3, 4, 8]})  # other weight values
    assert a == b and a["macs"] == 1 * 12 * 2 * 100 * 4
    assert len(folded) == 1 and folded[0] < 100 * 4 * 4  # W (1600 bytes) is not in the folded copy
    c = model_cost(_chained_reshapes(out_features=100), {"x": [2, 3, 4, 8]})  # another batch: costed again
    assert c["macs"] == 2 * a["macs"] and len(folded) == 2


def test_the_shape_arithmetic_alone_is_evaluated_not_the_graph(monkeypatch):
    """The fold runs only the Shape-rooted arithmetic (a Shape or Size of known dims is a constant) in
    onnxruntime (PaddlePaddle's opset-12 Reshape to a shape sliced off a Shape, as in PP-OCRv4 rec):
    the data path (Sigmoid, Reshape, MatMul) stays, no graph is imported into onnx-graphsurgeon, and
    a big tensor computed from a shape (ConstantOfShape) is left alone."""
    import onnx_graphsurgeon as gs

    from onnxshrink.graph import cost
    from onnxshrink.graph.shapes import fix_input_shapes, infer_shapes, value_shapes

    def const(name, v):
        return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64), name))
    nodes = [
        const("t", [-1]), const("one", [1]), const("s1", [1]), const("s3", [3]),
        h.make_node("Sigmoid", ["x"], ["xs"]),
        h.make_node("Shape", ["xs"], ["dims"]),
        h.make_node("Slice", ["dims", "s1", "s3"], ["mid"]),  # [3, H]: onnx's data propagation stops at Slice-12
        h.make_node("Size", ["xs"], ["n"]), h.make_node("Reshape", ["n", "one"], ["n1"]),
        h.make_node("Concat", ["t", "mid"], ["target"], axis=0),  # (-1, 3, H)
        h.make_node("Reshape", ["xs", "target"], ["y"]),
        h.make_node("ConstantOfShape", ["n1"], ["big"], value=nh.from_array(np.array([0.5], np.float32))),
        h.make_node("MatMul", ["y", "W"], ["z"]),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", 8])],
                     [h.make_tensor_value_info("z", TensorProto.FLOAT, None),
                      h.make_tensor_value_info("big", TensorProto.FLOAT, None)],
                     [nh.from_array(np.ones((6, 5), np.float32), "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 12)])
    light = fix_input_shapes(cost._strip_weights(m), {"x": [2, 3, 6, 8]})
    light = infer_shapes(light)
    assert not cost._macs(light, value_shapes(light))[1]  # onnx alone does not resolve the target

    def no_import(*a, **k):
        raise AssertionError("the fold imported the graph into onnx-graphsurgeon")
    monkeypatch.setattr(gs, "import_onnx", no_import)
    folded = cost._fold_shape_arithmetic(cost._weights_as_inputs(light), value_shapes(light))
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Shape") == 0 and "Slice" not in ops and "Concat" not in ops and "Size" not in ops
    assert ["Sigmoid", "Reshape", "ConstantOfShape", "MatMul"] == [o for o in ops if o != "Constant"]
    inits = {t.name: nh.to_array(t) for t in folded.graph.initializer}
    assert inits["target"].tolist() == [-1, 3, 6] and inits["n1"].tolist() == [2 * 3 * 6 * 8]
    assert "big" not in inits  # 288 elements computed from a shape: the data path, not folded
    assert model_cost(m, {"x": [2, 3, 6, 8]})["macs"] == 16 * 3 * 6 * 5  # y [16, 3, 6] x W [6, 5]
    # opset 15's Shape(start, end) folds to its slice of the dims
    shape15 = h.make_graph([const("t", [-1]), h.make_node("Shape", ["x"], ["d"], start=1, end=-1),
                            h.make_node("Concat", ["t", "d"], ["td"], axis=0),
                            h.make_node("Reshape", ["x", "td"], ["r"])],
                           "s", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 8])],
                           [h.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    m15 = infer_shapes(h.make_model(shape15, opset_imports=[h.make_opsetid("", 15)]))
    f15 = cost._fold_shape_arithmetic(m15, value_shapes(m15))
    assert {t.name: nh.to_array(t).tolist() for t in f15.graph.initializer} == {"td": [-1, 3, 6]}


def test_a_shape_value_read_inside_a_subgraph_is_kept_for_it():
    """A value of the shape arithmetic that only an If branch reads (outer scope, not an input of any
    main-graph node) is made a constant, not dropped with the nodes that computed it."""
    from onnxshrink.graph import cost
    from onnxshrink.graph.shapes import infer_shapes, value_shapes

    def const(name, v):
        return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64), name))
    branch = h.make_graph([h.make_node("Reshape", ["x", "target"], ["yb"])], "b", [],
                          [h.make_tensor_value_info("yb", TensorProto.FLOAT, None)])
    nodes = [const("s1", [1]), const("s3", [3]), const("t", [-1]),
             h.make_node("Shape", ["x"], ["dims"]), h.make_node("Slice", ["dims", "s1", "s3"], ["mid"]),
             h.make_node("Concat", ["t", "mid"], ["target"], axis=0),
             h.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 8]),
                                  h.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 12)]))
    folded = cost._fold_shape_arithmetic(m, value_shapes(m))
    assert {t.name: nh.to_array(t).tolist() for t in folded.graph.initializer} == {"target": [-1, 3, 6]}
    out = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 3, 6, 8), np.float32), "cond": np.array(True)})[0]
    assert out.shape == (16, 3, 6)
