"""16-bit activations in the quantize pass (A16W8) and the qnn target's automatic 8/16-bit choice."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from helpers import check, normal_samples, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh
from rich.console import Console

from onnxshrink import targets
from onnxshrink.metrics import fidelity
from onnxshrink.pipeline.manager import optimize
from onnxshrink.targets import prepare as target_prepare


def wide_range_net(opset=13, spread=300.0):
    """conv1's channel 0 is 300x larger than its other channels and conv2 reads mostly those others:
    one per-tensor 8-bit grid for conv1's output leaves the small channels ~1 level (u8 fails),
    a 16-bit grid 256x finer keeps them."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w1[0] *= spread
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    w2[:, 0] /= spread
    inits = [nh.from_array(w1, "w1"), nh.from_array(np.zeros(8, np.float32), "b1"),
             nh.from_array(w2, "w2"), nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2")]
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             oh.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"),
             oh.make_node("Sigmoid", ["c2"], ["s"], name="sig"),
             oh.make_node("Mul", ["c2", "s"], ["silu"], name="silu"),
             oh.make_node("GlobalAveragePool", ["silu"], ["y"], name="gap")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 1, 1])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 8
    check(m)
    return m


def branch_net(spread=300.0):
    """``wide_range_net``'s conv1 -> conv2 (conv2 needs conv1's output at 16 bits) added to an ordinary
    branch conv3(x), then a SiLU and a global pool: the Add reads one 16-bit and one 8-bit unit."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w1[0] *= spread
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    w2[:, 0] /= spread
    inits = [nh.from_array(w1, "w1"), nh.from_array(np.zeros(8, np.float32), "b1"), nh.from_array(w2, "w2"),
             nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"),
             nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w3"),
             nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b3")]
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             oh.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"),
             oh.make_node("Conv", ["x", "w3", "b3"], ["c3"], pads=[1] * 4, name="conv3"),
             oh.make_node("Add", ["c2", "c3"], ["a"], name="add"),
             oh.make_node("Sigmoid", ["a"], ["s"], name="sig"),
             oh.make_node("Mul", ["a", "s"], ["silu"], name="silu"),
             oh.make_node("GlobalAveragePool", ["silu"], ["y"], name="gap")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 1, 1])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)])
    m.ir_version = 8
    check(m)
    return m


def samples(n=12, seed=1):
    return normal_samples(n, seed)


def _quantize(model, calib, **opts):
    # budget none: the raw 8- and 16-bit grids are compared here, not the default budget's float fallback
    out, rep = optimize(model, passes=[{"quantize": {"guard": False, **opts}}], data=calib, val_data=samples(4, 7),
                        debug=True, budget="none")
    return out, rep.passes[0]


def _cos(a, b, val):
    return fidelity([run_ort(a, s) for s in val], [run_ort(b, s) for s in val])["cosine"]


def _init(model, name):
    return next(nh.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("opset,domain", [(13, "com.microsoft"), (21, "")])
def test_uint16_activations_valid_and_finer(opset, domain):
    f = wide_range_net(opset)
    calib, val = samples(12, 1), samples(4, 7)
    q8, _ = _quantize(f, calib, activation_dtype="uint8")
    q16, rec = _quantize(f, calib, activation_dtype="uint16")
    onnx.checker.check_model(q16, full_check=True)
    qdq = [n for n in q16.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and {n.domain for n in qdq} == {domain}
    assert rec.stats["scheme"]["activations"] == "uint16" and rec.stats["scheme"]["weights"].startswith("int8")
    # activations on a 16-bit grid (minmax over the calibration samples), weights int8, bias int32
    x = np.concatenate([s["x"].ravel() for s in calib])  # with --val given, every sample calibrates
    assert _init(q16, "x_zero_point").dtype == np.uint16
    assert _init(q16, "x_scale") == pytest.approx((x.max() - x.min()) / 65535, rel=1e-5)
    assert _init(q16, "conv1_W_quantized").dtype == np.int8
    assert _init(q16, "conv1_B_quantized").dtype == np.int32
    c8, c16 = _cos(f, q8, val), _cos(f, q16, val)
    assert c16 > 0.995 and c16 > c8 + 0.1, (c8, c16)


def test_int16_activations_and_16bit_sigmoid_encoding():
    f = wide_range_net(13)
    q, rec = _quantize(f, samples(), activation_dtype="int16")
    onnx.checker.check_model(q, full_check=True)
    assert _init(q, "x_zero_point").dtype == np.int16
    assert _cos(f, q, samples(4, 7)) > 0.995
    qu, _ = _quantize(f, samples(), activation_dtype="uint16")
    # 16-bit Sigmoid outputs carry the fixed encoding QNN HTP requires: [0, 1) on 1/65536 steps
    assert float(_init(qu, "s_scale")) == pytest.approx(1 / 65536) and int(_init(qu, "s_zero_point")) == 0
    assert float(_init(q, "s_scale")) == pytest.approx(1 / 32768) and int(_init(q, "s_zero_point")) == 0


def test_coverage_sees_through_contrib_qdq():
    from onnxshrink.targets.profiles import get_target
    q, _ = _quantize(wide_range_net(13), samples(), activation_dtype="uint16")
    cov = targets.coverage(q, get_target("qnn"))
    assert cov["accepted"] and cov["taken"] == cov["nodes"], cov["unsupported"][:3]
    nn = targets.coverage(q, get_target("nnapi"))
    assert not nn["accepted"] and any("uint16 activations" in u["reason"] for u in nn["unsupported"])


@pytest.fixture
def no_htp(monkeypatch):
    monkeypatch.setattr(target_prepare, "qnn_htp_check",
                        lambda *a, **k: {"available": False, "reason": "stubbed in this test"})


def test_qnn_target_runs_the_sensitive_region_at_uint16(no_htp):
    """conv2 reads conv1's outlier-channel output: at uint8 the plan misses the budget; conv2 (the most
    sensitive unit) and conv1 (its input's producer) run at uint16, conv3 and the Add/Sigmoid/Mul tail
    (the Add reads conv3 at 8 bits) at uint8, with a DQ(uint16) -> Q(uint8) conversion at the border
    (what the QNN EP runs as one Convert op)."""
    out, rep = optimize(branch_net(), passes=["quantize"], data=samples(16, 1), val_data=samples(4, 7),
                        target="qnn", budget="cosine>=0.99", debug=True)
    st = rep.passes[0].stats
    assert st["scheme"]["activations"] == "mixed uint8/uint16" and "activation_choice" not in st
    assert st["fidelity_search"][0]["cosine"] < 0.99 and st["fidelity_search"][-1]["wide_units"] == 2
    regions = {r["precision"]: r for r in st["precision_regions"]}
    assert set(regions["uint16"]["nodes"]) == {"conv1", "conv2"} and "conv2" in regions["uint16"]["why"]
    assert {"conv3", "add", "sig", "silu"} <= set(regions["uint8"]["nodes"])
    zp = {t.name: t.data_type for t in out.graph.initializer}
    prod = {o: n for n in out.graph.node for o in n.output}
    converts = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in prod and
                prod[n.input[0]].op_type == "DequantizeLinear"]
    # x (read by conv1 at 16 bits and conv3 at 8) and c2 (conv2's output, read by the 8-bit Add) go down
    assert sorted((q.name, zp[prod[q.input[0]].input[2]], zp[q.input[2]]) for q in converts) == [
        ("c2_convert_QuantizeLinear", TP.UINT16, TP.UINT8), ("x_convert_QuantizeLinear", TP.UINT16, TP.UINT8)]
    assert rep.fidelity["cosine"] >= 0.99
    assert set(rep.target_report["scheme"]["activations_in_model"]) == {"uint8", "uint16"}
    assert rep.target_report["coverage"]["accepted"]
    # the regions are in the report's target section and its terminal table
    assert rep.target_report["precision_regions"] == st["precision_regions"]
    console = Console(file=io.StringIO(), width=200)
    rep.render(console)
    assert "activation precision per region" in console.file.getvalue()


def test_qnn_target_chooses_uint16_when_no_region_holds(no_htp, monkeypatch):
    """With no mixed plan holding (regions stubbed empty: every plan stays 8-bit), the whole model is
    quantized again A16W8, plain and bias-corrected, and the best holding plan is kept."""
    from onnxshrink.passes.quantize import guard
    monkeypatch.setattr(guard, "wide_region", lambda seeds, units: set())
    f = wide_range_net(13)
    out, rep = optimize(f, passes=["quantize"], data=samples(16, 1), val_data=samples(4, 7), target="qnn",
                        budget="cosine>=0.99", debug=True)
    st = rep.passes[0].stats
    choice = st["activation_choice"]
    assert choice["chosen"].startswith("uint16") and st["scheme"]["activations"] == "uint16"
    assert set(choice["candidates"]) == {"uint8", "uint16", "uint16+bias_correction"}
    assert not choice["candidates"]["uint8"]["holds"] or choice["candidates"]["uint8"]["kept_float"] > 0
    assert choice["candidates"][choice["chosen"]]["holds"]
    assert rep.fidelity["cosine"] >= 0.99
    assert rep.target_report["scheme"]["activations_in_model"] == ["uint16"]
    assert rep.target_report["coverage"]["accepted"]
    (region,) = rep.target_report["precision_regions"]
    assert region["precision"] == "uint16" and "uint8 misses the fidelity floor" in region["why"]


def test_qnn_target_keeps_uint8_when_it_holds(no_htp):
    f = wide_range_net(13, spread=1.0)
    _, rep = optimize(f, passes=["quantize"], data=samples(16, 1), val_data=samples(4, 7), target="qnn",
                      budget="cosine>=0.99", debug=True)
    st = rep.passes[0].stats
    assert st["scheme"]["activations"] == "uint8" and "activation_choice" not in st
    (region,) = st["precision_regions"]
    assert region["precision"] == "uint8" and region["why"].startswith("the whole model holds")


def test_cpu_target_never_widens():
    f = wide_range_net(13)
    _, rep = optimize(f, passes=[{"quantize": {"guard": False}}], data=samples(16, 1), target="cpu", debug=True)
    assert rep.passes[0].stats["scheme"]["activations"] == "uint8"
