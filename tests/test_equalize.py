"""Cross-layer equalization (onnxshrink/passes/equalize.py): exact, equal ranges, eligibility."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_outputs_close, check, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxshrink.passes.base import Context
from onnxshrink.passes.equalize import EqualizePass, find_pairs
from onnxshrink.pipeline.manager import optimize

RNG = np.random.default_rng(5)


def sep_stack(act="Relu", c=8):
    """conv 3x3 -> act -> depthwise 3x3 -> act -> pointwise 1x1, per-channel weight ranges spread 100x."""
    spread = np.exp(RNG.uniform(-2.3, 2.3, c)).astype(np.float32)
    w1 = (RNG.standard_normal((c, 4, 3, 3)) * spread[:, None, None, None]).astype(np.float32)
    w2 = (RNG.standard_normal((c, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32)
    w3 = RNG.standard_normal((6, c, 1, 1)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (w2, "w2"), (w3, "w3"), (RNG.standard_normal(c).astype(np.float32), "b1"),
              (RNG.standard_normal(c).astype(np.float32), "b2"), (RNG.standard_normal(6).astype(np.float32), "b3"))]
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["y1"], pads=[1] * 4, name="c1")]

    def activation(i, src):
        if act == "Relu6":
            inits.extend([onnx.numpy_helper.from_array(np.array(0, np.float32), f"lo{i}"),
                          onnx.numpy_helper.from_array(np.array(6, np.float32), f"hi{i}")])
            nodes.append(oh.make_node("Clip", [src, f"lo{i}", f"hi{i}"], [f"a{i}"], name=f"act{i}"))
        elif act == "LeakyRelu":
            nodes.append(oh.make_node("LeakyRelu", [src], [f"a{i}"], alpha=0.1, name=f"act{i}"))
        else:
            nodes.append(oh.make_node(act, [src], [f"a{i}"], name=f"act{i}"))
        return f"a{i}"

    a1 = activation(1, "y1")
    nodes.append(oh.make_node("Conv", [a1, "w2", "b2"], ["y2"], pads=[1] * 4, group=c, name="c2"))
    a2 = activation(2, "y2")
    nodes.append(oh.make_node("Conv", [a2, "w3", "b3"], ["y"], name="c3"))
    g = oh.make_graph(nodes, "sep", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4, 10, 10])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 6, 10, 10])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    check(m)
    return m


def _feeds(n=3):
    return [{"x": RNG.standard_normal((1, 4, 10, 10)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "Identity"])
def test_equalize_is_exact_and_evens_the_ranges(act):
    m = sep_stack(act)
    g = gs.import_onnx(m)
    res = EqualizePass().run(g, Context())
    assert res.modified and res.stats["pairs"] == 2
    out = gs.export_onnx(res.graph)
    out.opset_import[0].version = 17
    check(out)
    for f in _feeds():
        assert_outputs_close(run_ort(m, f), run_ort(out, f), 1e-5)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    r1 = np.abs(w["c1_W_equalized"]).reshape(8, -1).max(axis=1)
    r2 = np.abs(w["c2_W_equalized"]).reshape(8, -1).max(axis=1)
    r3 = np.abs(w["c3_W_equalized"]).max(axis=(0, 2, 3))
    # after the iteration settles each shared channel has one range on both sides of the middle conv
    assert np.allclose(r1, r2, rtol=0.05) and np.allclose(r2, r3, rtol=0.05)
    assert res.stats["first_layer_range_spread"]["after"] < res.stats["first_layer_range_spread"]["before"]


def test_shared_weights_get_one_tensor_per_conv():
    """Two identical branches share their initializers (as cleanup leaves them): each conv gets its own."""
    m = sep_stack("Relu")
    g = m.graph
    nodes = list(g.node)
    for n in nodes:  # a second copy of the stack on the same weights, summed into the output
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = n.name + "_b"
        c.input[:] = [i if i in {t.name for t in g.initializer} or i == "x" else i + "_b" for i in n.input]
        c.output[:] = [o + "_b" for o in n.output]
        g.node.append(c)
    g.node.append(oh.make_node("Add", ["y", "y_b"], ["sum"], name="sum"))
    g.output[0].name = "sum"
    check(m)
    res = EqualizePass().run(gs.import_onnx(m), Context())
    assert res.stats["pairs"] == 4
    out = gs.export_onnx(res.graph)
    out.opset_import[0].version = 17
    check(out)
    f = _feeds(1)[0]
    assert_outputs_close(run_ort(m, f), run_ort(out, f), 1e-5)


def test_relu6_and_hardswish_pairs_are_skipped():
    for act in ("Relu6", "HardSwish"):
        pairs, skipped = find_pairs(gs.import_onnx(sep_stack(act)))
        assert not pairs and any(act.replace("Relu6", "Clip") in k for k in skipped), skipped


def test_equalize_under_the_pass_manager_and_as_a_quantize_step():
    m = sep_stack("Relu")
    data = _feeds(6)
    out, rep = optimize(m, passes=["equalize"], data=data)
    assert rep.passes[0].status == "applied"
    for f in data[:2]:
        assert_outputs_close(run_ort(m, f), run_ort(out, f), 1e-4)
    q, rep = optimize(m, passes=[{"quantize": {"guard": False, "equalize": True}}], data=data)
    check(q)
    assert rep.passes[0].stats["equalize"]["pairs"] == 2
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_det"])
def test_equalize_real_models_pass_the_lossless_check(name, real_model_path):
    from models.real import real_samples
    s = real_samples(name, 6, seed=0)
    out, rep = optimize(str(real_model_path(name)), passes=["cleanup", "equalize"], data=s[:2], val_data=s[2:])
    rec = rep.passes[-1]
    assert rec.status == "applied", rec.reason  # the manager checked it to 1e-4 of the output scale
    assert rec.stats["pairs"] >= 10
