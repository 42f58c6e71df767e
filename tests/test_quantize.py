"""The quantize pass: placement for onnxruntime's integer kernels, numerics, opset handling,
refusal of quantized inputs, Constant-node weights, bias correction, sensitivity fallback."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from helpers import check, normal_samples, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxshrink.errors import InputError
from onnxshrink.metrics import fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize import QuantizePass
from onnxshrink.pipeline.manager import optimize

RNG = np.random.default_rng(0)


def _conv(nodes, inits, name, x, cin, cout, k=3, act="Relu", group=1, stride=1, scale=0.3, const_node=False):
    w = (RNG.standard_normal((cout, cin // group, k, k)) * scale).astype(np.float32)
    b = (RNG.standard_normal(cout) * 0.1).astype(np.float32)
    if const_node:  # PaddlePaddle style: weights held in Constant nodes
        nodes.append(oh.make_node("Constant", [], [name + "_w"], value=onnx.numpy_helper.from_array(w)))
        nodes.append(oh.make_node("Constant", [], [name + "_b"], value=onnx.numpy_helper.from_array(b)))
    else:
        inits += [onnx.numpy_helper.from_array(w, name + "_w"), onnx.numpy_helper.from_array(b, name + "_b")]
    nodes.append(oh.make_node("Conv", [x, name + "_w", name + "_b"], [name + "_y"], pads=[k // 2] * 4,
                              group=group, strides=[stride, stride], name=name))
    out = name + "_y"
    if act == "Relu":
        nodes.append(oh.make_node("Relu", [out], [name + "_r"], name=name + "_relu"))
        out = name + "_r"
    return out


def small_net(opset=13, const_node=False, size=32):
    """conv-relu, depthwise-relu, pointwise-relu, maxpool, conv, SiLU (Sigmoid*x), GAP, Gemm."""
    nodes, inits = [], []
    o = _conv(nodes, inits, "c1", "x", 3, 16, const_node=const_node)
    o = _conv(nodes, inits, "c2", o, 16, 16, group=16, const_node=const_node)
    o = _conv(nodes, inits, "c3", o, 16, 32, k=1, const_node=const_node)
    nodes.append(oh.make_node("MaxPool", [o], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="mp"))
    o = _conv(nodes, inits, "c4", "mp", 32, 32, act=None, const_node=const_node)
    nodes.append(oh.make_node("Sigmoid", [o], ["sg"], name="sg"))
    nodes.append(oh.make_node("Mul", [o, "sg"], ["silu"], name="silu"))
    nodes.append(oh.make_node("GlobalAveragePool", ["silu"], ["gap"], name="gap"))
    nodes.append(oh.make_node("Flatten", ["gap"], ["fl"], name="fl"))
    inits.append(onnx.numpy_helper.from_array((RNG.standard_normal((32, 10)) * 0.3).astype(np.float32), "fc_w"))
    inits.append(onnx.numpy_helper.from_array((RNG.standard_normal(10) * 0.1).astype(np.float32), "fc_b"))
    nodes.append(oh.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["logits"], name="fc"))
    g = oh.make_graph(nodes, "net", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, size, size])],
                      [oh.make_tensor_value_info("logits", TP.FLOAT, [1, 10])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 7
    check(m)
    return m


def samples(n=12, size=32, seed=1):
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(n)]


NO_GUARD = {"guard": False}


def quantize(model, data=None, budget=None, **opts):
    out, rep = optimize(model, passes=[{"quantize": {**NO_GUARD, **opts}}], data=data or samples(), debug=True,
                        budget=budget)
    return out, rep.passes[0]


def optimized_ops(model) -> collections.Counter:
    """Op types of the graph onnxruntime runs after its own optimizations (QDQ fusion)."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_placement_runs_integer_kernels():
    m = small_net()
    q, rec = quantize(m)
    check(q)
    assert rec.status == "applied"
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    opt = optimized_ops(q)
    # every conv becomes QLinearConv (Relu folded away), SiLU and GAP run on integers, MaxPool on uint8
    assert opt["QLinearConv"] == 4 and opt["Conv"] == 0 and opt["FusedConv"] == 0
    assert opt["QLinearSigmoid"] == 1 and opt["QLinearMul"] == 1 and opt["QLinearGlobalAveragePool"] == 1
    assert opt["Relu"] == 0
    assert opt["MaxPool"] + opt["NhwcMaxPool"] == 1
    # the Gemm produces the graph output: kept float (onnxruntime does not fuse such a unit)
    assert rec.stats["nodes"]["fc"].startswith("kept float")
    assert rec.stats["nodes"]["c1_relu"].startswith("folded")
    # numerics: close to the float model
    feeds = samples(4, seed=7)
    ref = [run_ort(m, f) for f in feeds]
    out = [run_ort(q, f, optimize=True) for f in feeds]
    assert fidelity(ref, out)["cosine"] > 0.995


def test_numerics_symmetric_weights_int32_bias():
    q, _ = quantize(small_net())
    init = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    wq = init["c1_W_quantized"]
    assert wq.dtype == np.int8 and np.abs(wq).max() <= 127 and init["c1_W_zero_point"].any() == False  # noqa: E712
    assert init["c1_W_scale"].shape == (16,)  # per output channel
    bq, bs = init["c1_B_quantized"], init["c1_B_scale"]
    assert bq.dtype == np.int32
    # bias scale = input scale x weight scale
    np.testing.assert_allclose(bs, init["x_scale"] * init["c1_W_scale"], rtol=1e-6)
    assert init["x_zero_point"].dtype == np.uint8


def test_int8_activations_option():
    q, rec = quantize(small_net(), activation_dtype="int8")
    check(q)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    assert init["x_zero_point"].dtype == np.int8
    # onnxruntime converts s8 activations to u8 on x86; a Q feeding two DQs is not converted,
    # so the conv whose output fans out stays float there (uint8 is the default for that reason)
    assert optimized_ops(q)["QLinearConv"] >= 3


def test_per_tensor_option():
    q, rec = quantize(small_net(), per_channel=False)
    check(q)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    assert init["c1_W_scale"].shape == ()
    assert optimized_ops(q)["QLinearConv"] == 4


def test_weights_in_constant_nodes_are_quantized():
    m = small_net(const_node=True)
    q, rec = quantize(m)
    check(q)
    assert rec.stats["prepared"]["constants_to_initializers"] == 8
    assert optimized_ops(q)["QLinearConv"] == 4


@pytest.mark.parametrize("upgrade", [True, False])
def test_opset11_upgraded_or_per_tensor(upgrade):
    m = small_net(opset=11)
    q, rec = quantize(m, upgrade_opset=upgrade)
    check(q)  # never an invalid model
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    has_axis = any(a.name == "axis" for n in dqs for a in n.attribute)
    if upgrade:
        assert opset == 13 and has_axis and rec.stats["opset"] == "upgraded 11 -> 13"
    else:
        assert opset == 11 and not has_axis and "per-tensor" in rec.stats["opset"]
    ref = [run_ort(m, f) for f in samples(3, seed=5)]
    out = [run_ort(q, f, optimize=True) for f in samples(3, seed=5)]
    assert fidelity(ref, out)["cosine"] > 0.99


def _qdq_model():
    q, _ = quantize(small_net())
    return q


def test_refuses_qdq_model():
    with pytest.raises(InputError, match="already quantized"):
        optimize(_qdq_model(), passes=["quantize"], data=samples(4))


def test_refuses_qoperator_and_dynamic_models():
    # QOperator: a QLinearConv graph (the form onnxruntime's optimizer writes)
    m = small_net()
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        ort.InferenceSession(_qdq_model().SerializeToString(), so, providers=["CPUExecutionProvider"])
        qop = onnx.load(so.optimized_model_filepath)
    assert any(n.op_type == "QLinearConv" for n in qop.graph.node)
    g = gs.import_onnx(qop)
    with pytest.raises(InputError, match="already quantized"):
        QuantizePass(guard=False).run(g, Context(calib=samples(2)))
    # dynamically quantized MatMul
    nodes = [oh.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             oh.make_node("MatMulInteger", ["xq", "w", "xz"], ["y"])]
    g2 = oh.make_graph(nodes, "d", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
                       [oh.make_tensor_value_info("y", TP.INT32, [2, 3])],
                       [onnx.numpy_helper.from_array(np.ones((4, 3), np.uint8), "w")])
    dyn = oh.make_model(g2, opset_imports=[oh.make_opsetid("", 13)])
    with pytest.raises(InputError, match="already quantized"):
        QuantizePass(guard=False).run(gs.import_onnx(dyn), Context(calib=[{"x": np.ones((2, 4), np.float32)}]))
    del m


def test_refuses_model_without_float_weights():
    g = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "r", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)])
    with pytest.raises(InputError, match="no float"):
        optimize(m, passes=["quantize"], data=[{"x": np.ones((1, 4), np.float32)}] * 2)


def test_cli_refusal_is_one_line_and_nonzero(tmp_path):
    import subprocess
    import sys

    from models.real import write_samples
    p = tmp_path / "q.onnx"
    onnx.save(_qdq_model(), p)
    calib = write_samples(samples(2), tmp_path / "calib")
    r = subprocess.run([sys.executable, "-m", "onnxshrink", "optimize", str(p), str(tmp_path / "o.onnx"),
                        "--passes", "quantize", "--calib", str(calib)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 3
    err = (r.stderr + r.stdout).strip()
    assert "already quantized" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "already quantized" in ln]) == 1
    assert not (tmp_path / "o.onnx").exists()


def _biased_conv_model():
    """One conv over positive inputs where each output channel has one large weight and many small
    ones: the large one sets the channel's scale, the small ones round coarsely, and E[x] > 0 turns
    their rounding errors into a mean shift per channel."""
    cout, cin = 16, 32
    r = np.random.default_rng(11)
    w = r.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.01
    for c in range(cout):
        w[c, c % cin, 1, 1] = 1.5
    nodes = [oh.make_node("Relu", ["x"], ["xr"], name="r0"),
             oh.make_node("Conv", ["xr", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["y"], ["out"], name="r1")]
    g = oh.make_graph(nodes, "bc", [oh.make_tensor_value_info("x", TP.FLOAT, [1, cin, 16, 16])],
                      [oh.make_tensor_value_info("out", TP.FLOAT, [1, cout, 16, 16])],
                      [onnx.numpy_helper.from_array(w, "w"),
                       onnx.numpy_helper.from_array(np.zeros(cout, np.float32), "b")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)])


def test_bias_correction_reduces_the_mean_shift():
    m = _biased_conv_model()
    r = np.random.default_rng(3)
    data = [{"x": (r.random((1, 32, 16, 16)) * 2 + 0.5).astype(np.float32)} for _ in range(16)]
    held = [{"x": (r.random((1, 32, 16, 16)) * 2 + 0.5).astype(np.float32)} for _ in range(8)]
    errs = {}
    for bc in (False, True):
        q, _ = quantize(m, data=data, bias_correction=bc)
        check(q)
        ref = np.stack([run_ort(m, h)[0] for h in held])
        out = np.stack([run_ort(q, h, optimize=True)[0] for h in held])
        errs[bc] = (float(np.abs((out - ref).mean(axis=(0, 2, 3))).mean()), float(np.mean((out - ref) ** 2)))
    assert errs[True][0] < 0.5 * errs[False][0]   # per-channel mean shift
    assert errs[True][1] < errs[False][1]         # and the total error


def test_budget_keeps_sensitive_units_float():
    m = _biased_conv_model()
    r = np.random.default_rng(4)
    data = [{"x": (r.random((1, 32, 16, 16)) * 2).astype(np.float32)} for _ in range(12)]
    out, rep = optimize(m, passes=[{"quantize": {"guard": False, "per_channel": False}}], data=data,
                        budget="cosine>=0.99999")
    rec = rep.passes[0]
    assert rep.budget_met
    # the single conv cannot hold that budget quantized: it stays float, with the reason
    assert rec.stats["nodes"]["conv"].startswith("kept float: sensitive")
    assert rec.status == "not applicable" and "kept float to hold it" in rec.reason


def test_float_fallback_checks_against_the_outputs_the_calibration_run_kept():
    """A budget only the float model holds: the pass calibrates, keeps every unit float, and checks
    the stored weight on the calibration samples against the float outputs the MinMax calibration
    run kept (no second run of the float model)."""
    m = _biased_conv_model()
    r = np.random.default_rng(4)
    data = [{"x": (r.random((1, 32, 16, 16)) * 2).astype(np.float32)} for _ in range(12)]
    out, rep = optimize(m, passes=[{"quantize": {"per_channel": False}}], data=data, budget="cosine>=0.99999")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["also_checked_on"].endswith("; the float outputs kept by the calibration run"), fw


def test_guard_skips_timing_when_every_weighted_unit_stays_float():
    """With the guard on, a budget only the float model holds keeps every weighted unit float: nothing
    integer is left, so nothing is timed and the pass keeps the float model, with the reason."""
    m = _biased_conv_model()
    r = np.random.default_rng(4)
    data = [{"x": (r.random((1, 32, 16, 16)) * 2).astype(np.float32)} for _ in range(12)]
    out, rep = optimize(m, passes=[{"quantize": {"per_channel": False, "fallback": "float"}}], data=data,
                        budget="cosine>=0.99999")
    rec = rep.passes[0]
    assert rep.budget_met and rec.status == "not applicable", rec.reason
    assert rec.stats["speed_search"] == [{"config": "skipped: no weighted unit left integer"}]
    assert "nothing integer left to time" in rec.reason
    # no integer elementwise op in the plan: the plan without them is the same, not measured again
    assert rec.stats["fidelity_search"][1] == {"keep_float": 0, "elementwise": False,
                                               "skipped": "the same plan (no integer elementwise op)"}
    # the search reached the plan with every weighted unit float and kept it without measuring it
    assert rec.stats["fidelity_search"][-1] == {"keep_float": 1,
                                                "skipped": "no weighted unit left integer: the float model"}
    assert "QuantizeLinear" not in [n.op_type for n in out.graph.node]


def test_weaker_keeps_more_units_float():
    p = QuantizePass()
    w1 = p.weaker()
    w2 = w1.weaker()
    assert (w1.options.keep_float, w2.options.keep_float) == (1, 2)


def test_speed_guard_never_returns_a_slower_model():
    m = small_net(size=32)
    out, rep = optimize(m, passes=[{"quantize": {"min_speedup": 50.0, "fallback": "float"}}], data=samples(6))
    rec = rep.passes[0]
    assert rec.status == "not applicable" and "faster than fp32" in rec.reason
    check(out)


def test_float_fallback_stores_weights_int8_at_float_speed():
    """No integer placement is faster: activations stay float, the weights are stored int8 (Cast x
    Mul), which onnxruntime folds at load; the outputs stay within the guard's floor."""
    m = small_net(size=32)
    out, rep = optimize(m, passes=[{"quantize": {"min_speedup": 50.0}}], data=samples(6))
    rec = rep.passes[0]
    assert rec.status == "applied", rec.reason
    ops = [n.op_type for n in out.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("Cast") >= 1
    fw = rec.stats["float_weights"]
    assert fw["stored"] == ops.count("Cast") and fw["bytes_saved"] > 0
    assert "faster than fp32" in rec.stats["activations"]
    inits = {t.name: t for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type == "Cast":
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
    assert rep.after["weight_bytes"] < 0.5 * rep.before["weight_bytes"]
    x = samples(2)[1]
    a, b = run_ort(m, x)[0].ravel(), run_ort(out, x)[0].ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    check(out)


def test_stored_weights_are_checked_on_calibration_samples_first_and_as_emitted(monkeypatch):
    """The float fallback's check of a stored set runs the calibration samples first (a set that breaks
    there never runs the selection samples), and judges the model as the pass emits it (Cast x Mul):
    the set kept is checked last, so the manager's validation of the pass's result reads the
    selection outputs that check kept instead of running them again."""
    from onnxshrink.passes.quantize import fallback as fb
    from onnxshrink.pipeline import manager as mgr

    events = []  # ("calibration", digest, holds) / ("selection", digest) / ("validation", digest)
    cal_call, screen, sets = fb._CalibrationCheck.__call__, mgr.PassManager._screen, mgr.PassManager._outputs_of_sets

    def on_calibration(self, m):
        ok = cal_call(self, m)
        events.append(("calibration", mgr._digest(m), ok))
        return ok

    def on_selection(self, m, val, reference):
        events.append(("selection", mgr._digest(m)))
        return screen(self, m, val, reference)

    def on_sets(model, sample_sets, optimize):
        if isinstance(model, onnx.ModelProto):
            events.append(("validation", mgr._digest(model)))
        return sets(model, sample_sets, optimize)

    monkeypatch.setattr(fb._CalibrationCheck, "__call__", on_calibration)
    monkeypatch.setattr(mgr.PassManager, "_screen", on_selection)
    monkeypatch.setattr(mgr.PassManager, "_outputs_of_sets", staticmethod(on_sets))
    out, rep = optimize(small_net(size=32), passes=[{"quantize": {"min_speedup": 50.0}}], data=samples(12),
                        budget="cosine>=0.99999")
    fw = rep.passes[0].stats["float_weights"]
    assert rep.budget_met and fw["bisection"][0] == {"stored": 4, "holds": False} and 0 < fw["stored"] < 4, fw
    checked = {e[1]: e[2] for e in events if e[0] == "calibration"}
    assert False in checked.values()  # some set broke the check on the calibration samples
    screened = [e[1] for e in events if e[0] == "selection" and e[1] in checked]
    assert screened and all(checked[d] for d in screened)  # only sets that held there ran the selection
    result = mgr._digest(out)
    assert result in screened  # the result itself was checked (as emitted) ...
    assert ("validation", result) not in events  # ... and its selection outputs were not run again


def test_calibrators_all_produce_valid_models():
    for c in ("minmax", "percentile", "entropy", "mse"):
        q, rec = quantize(small_net(), calibrator=c)
        check(q)
        assert rec.status == "applied"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec", "yolov8n", "ppocr_det"])
def test_real_models_valid_and_not_slower(name, real_model_path):
    from models.real import real_samples
    path = real_model_path(name)
    s = real_samples(name, 20, seed=0)
    out, rep = optimize(str(path), passes=["quantize"], data=s[:12], val_data=s[12:])
    check(out)
    rec = rep.passes[0]
    ops = optimized_ops(out)
    if rec.status == "applied" and "activations" in rec.stats:
        # no integer placement kept (too slow or too lossy): float activations, int8-stored weights,
        # which onnxruntime folds back to float constants at load
        assert rec.stats["float_weights"]["stored"] > 0 and ops.get("QLinearConv", 0) == 0
        # the int8-stored weights' Casts are folded at load: only the float model's own Casts remain
        assert ops.get("Cast", 0) == optimized_ops(onnx.load(str(path))).get("Cast", 0)
    elif rec.status == "applied":
        speed = rec.stats["speed_search"]
        assert any(x["speedup"] >= 1.0 for x in speed)
        assert ops.get("QLinearConv", 0) > 0
    else:
        pytest.fail(f"quantize {rec.status} on {name}: {rec.reason}")


def _hardswish_net():
    """conv -> x * clip(x + 3, 0, 6) / 6 (PaddlePaddle's hard-swish) -> conv."""
    nodes, inits = [], []
    o = _conv(nodes, inits, "c1", "x", 3, 16, act=None)
    inits += [onnx.numpy_helper.from_array(np.array(3.0, np.float32), "three"),
              onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              onnx.numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes += [oh.make_node("Add", [o, "three"], ["a"], name="hs_add"),
              oh.make_node("Clip", ["a", "zero", "six"], ["c"], name="hs_clip"),
              oh.make_node("Mul", [o, "c"], ["m"], name="hs_mul"),
              oh.make_node("Div", ["m", "six"], ["hs"], name="hs_div")]
    o = _conv(nodes, inits, "c2", "hs", 16, 16)
    o = _conv(nodes, inits, "c3", o, 16, 8, act=None)
    g = oh.make_graph(nodes, "hs", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                      [oh.make_tensor_value_info(o, TP.FLOAT, [1, 8, 16, 16])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)])


def test_hardswish_fused_and_float_unless_div_to_mul():
    """Run without cleanup, quantize's own canonicalization fuses the hard-swish into x * HardSigmoid(x)
    (cleanup's step), which stays float; div_to_mul keeps the chain and runs it on integers."""
    m = _hardswish_net()
    data = [{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)} for i in range(8)]
    q, rec = quantize(m, data=data)
    assert rec.stats["prepared"]["hard_activations_fused"] == 1
    hs = [n for n in q.graph.node if n.op_type == "HardSigmoid"]
    assert len(hs) == 1 and rec.stats["nodes"][hs[0].name].startswith("kept float")
    ops = optimized_ops(q)
    assert ops["Div"] == 0 and ops["Clip"] == 0 and ops["QLinearConv"] == 2
    q2, rec2 = quantize(m, data=data, div_to_mul=True)
    assert "hard_activations_fused" not in rec2.stats["prepared"]
    check(q2)
    ops2 = optimized_ops(q2)
    assert ops2["Div"] == 0 and ops2["QLinearMul"] == 2 and ops2["QLinearAdd"] == 1 and ops2["QLinearConv"] == 2
    assert ops2["Clip"] == 0  # folded into the QLinearAdd's output range
    ref = [run_ort(m, d) for d in data[:3]]
    assert fidelity(ref, [run_ort(q2, d, optimize=True) for d in data[:3]])["cosine"] > 0.99


def test_speed_guard_applies_only_to_the_cpu_target():
    """On a model too small for int8 to win on this CPU, the cpu target declines by measured speed,
    while an edge target (whose kernels this machine cannot time) is quantized."""
    import sys
    from pathlib import Path

    from onnxshrink import PassManager

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from models.build import demo_model, demo_samples

    data = [{"input": x} for x in demo_samples(12)]
    _, rep = PassManager(["cleanup", "quantize"], data=data, target="xnnpack").run(demo_model())
    q = rep.passes[-1]
    assert q.status == "applied", q.reason
    assert "skipped" in q.stats["speed_search"][0]["config"]


def test_excluding_a_folded_activation_quantizes_the_unit_before_it():
    """``exclude`` naming a Relu that quantize would fold into its Conv's range: the Conv is quantized
    at its own output and the Relu runs in float (before: "no calibration range", rolled back)."""
    from models.build import resnet_small
    from onnxshrink.pipeline.manager import optimize

    m = resnet_small()
    cleaned, _ = optimize(m, passes=["cleanup"], data=normal_samples(4, name="input", shape=(1, 3, 32, 32)),
                          budget="none")
    relu = next(n for n in cleaned.graph.node if n.op_type == "Relu")
    conv = next(n for n in cleaned.graph.node if relu.input[0] in n.output)
    out, rep = optimize(cleaned, passes=[{"quantize": {"exclude": [relu.name], "guard": False}}],
                        data=normal_samples(8, name="input", shape=(1, 3, 32, 32)), budget="none")
    q = rep.passes[0]
    assert q.status == "applied", q.reason
    assert q.stats["nodes"][relu.name].startswith("kept float")  # not "folded into ..."
    assert q.stats["nodes"][conv.name].startswith("quantized")
    quantized_tensors = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert conv.output[0] in quantized_tensors


def test_bias_on_a_tiny_scale_saturates_without_overflow():
    """``b / s_b`` with a tiny ``s_b`` overflowed float32 in the unit analysis (a RuntimeWarning on
    PP-OCRv4 rec and an inf bias in its sensitivity model): one int32 grid for the QDQ graph and the
    analysis, saturating."""
    import warnings

    from onnxshrink.passes.quantize.qdq import bias_int32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = bias_int32(np.array([1e10, -3.0, 0.5], np.float32), np.array([1e-30, 1.0, 0.25], np.float32))
    assert q.dtype == np.int32 and q.tolist() == [2 ** 31 - 1, -3, 2]


def test_speed_search_times_the_small_conv_variants_together(monkeypatch):
    """When the chosen placement is not clearly faster, the variants with small convolutions in float
    are timed against the float model in one interleaved measurement (the float model runs once
    per round for all of them) and taken in turn: the first clearly faster one that holds is kept."""
    from onnxshrink import runtime as runtime_mod
    from onnxshrink.pipeline import manager as manager_mod
    from onnxshrink.runtime import SpeedComparison
    calls = []

    def stand_in(models, feeds, pairs, **kw):
        calls.append([p[:2] for p in pairs])
        ratio = {(0, 1): 0.9 if len(calls) == 1 else 1.2, (0, 2): 1.5, (2, 1): 1.0}
        return [SpeedComparison(ratio[p[:2]], ratio[p[:2]] * 0.98, ratio[p[:2]] * 1.02, 1.0, 1.0, 12) for p in pairs]

    monkeypatch.setattr(runtime_mod, "compare_speeds", stand_in)  # compare_candidates
    monkeypatch.setattr(manager_mod, "compare_speeds", stand_in)  # the manager's ctx.timing
    monkeypatch.setattr(manager_mod, "compare_speed",  # the speed contract's own timing
                        lambda *a, **k: SpeedComparison(1.1, 1.08, 1.12, 1.0, 1.0, 12))
    q, rep = optimize(small_net(), passes=[{"quantize": {"guard": True}}], data=samples(), speed="never-slower")
    rec = rep.passes[0]
    # the chosen placement with the input beside it (for the speed contract), then both variants
    # against the float model once per round
    assert calls == [[(0, 1), (2, 1)], [(0, 1), (0, 2)]]
    speed = rec.stats["speed_search"]
    assert [s["config"] for s in speed] == ["0 sensitive units in float", "only convs with >= 2048 weights"]
    ops = optimized_ops(q)
    assert ops.get("QLinearConv", 0) == 1  # only c4 (9216 weights) runs in int8
    # the result is that variant, not the candidate timed beside the input: the contract timed it itself
    assert rep.speed["vs_input"]["speedup"] == 1.1


def test_speed_contract_reads_the_timing_taken_beside_the_guards_candidate(monkeypatch):
    """The guard's candidate is timed with the input in the same rounds; when the pass keeps that
    candidate, the speed contract reads that comparison and does not time the pair again."""
    from onnxshrink import runtime as runtime_mod
    from onnxshrink.pipeline import manager as manager_mod
    from onnxshrink.runtime import SpeedComparison

    def stand_in(models, feeds, pairs, **kw):
        ratio = {(0, 1): 1.2, (2, 1): 1.37}
        return [SpeedComparison(ratio[p[:2]], ratio[p[:2]] * 0.98, ratio[p[:2]] * 1.02, 1.0, 1.0, 12) for p in pairs]

    def no_timing(*a, **k):
        raise AssertionError("the contract timed the pair again")

    monkeypatch.setattr(runtime_mod, "compare_speeds", stand_in)  # compare_candidates
    monkeypatch.setattr(manager_mod, "compare_speeds", stand_in)
    monkeypatch.setattr(manager_mod, "compare_speed", no_timing)
    # fallback=float: the float-kept first conv's weights stay as they are, so the result is the candidate
    q, rep = optimize(small_net(), passes=[{"quantize": {"guard": True, "fallback": "float"}}], data=samples(),
                      speed="never-slower")
    assert rep.passes[0].stats["speed_search"][0]["speedup"] == 1.2
    assert rep.speed["vs_input"]["speedup"] == 1.37 and rep.speed["verdict"] == "not slower"
    assert optimized_ops(q).get("QLinearConv", 0) > 0


def test_a_unit_kept_float_between_integer_units_stays_float_in_onnxruntime():
    """onnxruntime's WeightBiasQuantization makes ``DQ(scalar) -> Conv(float weight) -> Q`` an integer
    unit with the weight quantized per tensor: a kept-float conv reads its own per-axis DQ instead
    (``QdqBuilder._float_weighted_reader``), so onnxruntime runs it float, as the plan says."""
    m = small_net()
    q, rec = quantize(m, exclude=["c2"])
    check(q)
    assert rec.stats["nodes"]["c2"].startswith("kept float")
    reader = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
                  next(c for c in q.graph.node if c.name == "c2").input)
    assert [a.i for a in reader.attribute if a.name == "axis"] == [1]
    opt = optimized_ops(q)
    assert opt["QLinearConv"] == 3 and opt["Conv"] + opt["FusedConv"] == 1
    feeds = samples(4, seed=7)
    plain = [run_ort(q, f, optimize=True) for f in feeds]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    sess = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    without = [sess.run(None, f) for f in feeds]
    for a, b in zip(plain, without):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


def test_a_cosine_budget_holds_with_the_spread_of_the_samples_measured():
    """``FidelityCheck.holds`` under an absolute cosine budget: the mean must reach it, and so must the
    95 % lower prediction bound of the verdict's test mean (8 test samples) from the samples measured
    (``metrics.mean_lower_bound``): a plan at 0.9905 with a spread of 0.01 over 8 selection samples is
    refused, the same mean with a spread of 0.0005 holds; a relative budget, a figure without its
    spread and a floor without a budget take the mean alone."""
    from onnxshrink.metrics import Budget, mean_lower_bound
    from onnxshrink.passes.quantize.guard import FidelityCheck

    ctx = Context(val=list(range(8)), budget=Budget.parse("cosine>=0.99"), verdict_samples=8)
    check = FidelityCheck(ctx, None, None, 0.99)
    assert not check.holds({"cosine": 0.9905, "cosine_sd": 0.01})
    assert check.holds({"cosine": 0.9905, "cosine_sd": 0.0005})
    assert check.holds({"cosine": 0.9905})
    assert not check.holds({"cosine": 0.9895, "cosine_sd": 0.0})
    assert check.bound({"cosine": 0.9905, "cosine_sd": 0.01}) == mean_lower_bound(0.9905, 0.01, 8, 8)
    # 16 samples measured (the stored weights' calibration check) narrow the bound
    assert check.holds({"cosine": 0.9935, "cosine_sd": 0.004}, samples=16)
    assert not check.holds({"cosine": 0.9935, "cosine_sd": 0.004}, samples=2)
    relative = FidelityCheck(Context(val=list(range(8)), budget=Budget.parse("cosine>=-1%"),
                                     baseline={"cosine": 1.0}), None, None, 0.99)
    assert relative.holds({"cosine": 0.9905, "cosine_sd": 0.01})
    no_budget = FidelityCheck(Context(val=list(range(8))), None, None, 0.99)
    assert no_budget.holds({"cosine": 0.9905, "cosine_sd": 0.01})
