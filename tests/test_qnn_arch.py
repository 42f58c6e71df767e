"""Pure-integer QNN HTP (``-o target.htp_arch=v68``): the option, the simulator's provider options per
architecture, the every-op placement (no float compute node) and failing closed.

The simulator runs (onnxruntime-qnn) are on a 9-node net of 16x16 images (about a second each); the
others need no simulator (the check is stubbed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnxshrink import targets
from onnxshrink.errors import BudgetError, UsageError
from onnxshrink.pipeline.manager import optimize
from onnxshrink.targets import prepare as target_prepare
from onnxshrink.targets.profiles import get_target, with_options
from onnxshrink.targets.qnn import qnn_provider_options
from tests.helpers import check, normal_samples
from tests.reliability_helpers import run_cli, write_npy_dir

needs_qnn = pytest.mark.skipif(not targets.qnn_available(),
                               reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def mixed_ops_net():
    """x -> Conv -> Relu -> ConvTranspose(k=s=2) -> HardSigmoid -> Mul(const) -> Resize(0.5) -> Clip
    -> Add(skip from the Relu) -> Sigmoid -> y: ops the CPU-kernel placement keeps float (ConvTranspose,
    HardSigmoid, Resize after a float op, Clip, a Sigmoid producing the graph output)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
             nh.from_array((rng.standard_normal((8, 8, 2, 2)) * 0.3).astype(np.float32), "wt"),
             nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "bt"),
             nh.from_array(np.array(2.0, np.float32), "two"),
             nh.from_array(np.array([], np.float32), "roi"),
             nh.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "half"),
             nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(1.5, np.float32), "hi")]
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1] * 4, name="conv"),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             oh.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], strides=[2, 2], name="up"),
             oh.make_node("HardSigmoid", ["t"], ["h"], name="hsig"),
             oh.make_node("Mul", ["h", "two"], ["m"], name="mul"),
             oh.make_node("Resize", ["m", "roi", "half"], ["z"], mode="nearest", name="down"),
             oh.make_node("Clip", ["z", "lo", "hi"], ["k"], name="clip"),
             oh.make_node("Add", ["k", "r"], ["a"], name="add"),
             oh.make_node("Sigmoid", ["a"], ["y"], name="sig")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 16, 16])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    check(m)
    return m


@pytest.fixture
def no_htp(monkeypatch):
    monkeypatch.setattr(target_prepare, "qnn_htp_check",
                        lambda *a, **k: {"available": False, "reason": "stubbed in this test"})


def float_compute_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes (not Q/DQ) with a float input not produced by a DequantizeLinear (constant parameters
    such as Clip's bounds and Resize's scales aside) or a float output not read only by QuantizeLinear,
    except a Relu/Clip fused into the Conv before it (DQ -> Conv -> Relu -> Q)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    cons: dict = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    inits = {t.name for t in model.graph.initializer}
    params = {"Clip": (1, 2), "Resize": (1, 2, 3)}
    bad = []
    for n in model.graph.node:
        if n.op_type in QDQ:
            continue
        ins = [i for k, i in enumerate(n.input) if i and k not in params.get(n.op_type, ())]
        fused_in = n.op_type in ("Relu", "Clip") and prod.get(n.input[0]) is not None and \
            prod[n.input[0]].op_type == "Conv"
        fused_out = n.op_type == "Conv" and [c.op_type for c in cons.get(n.output[0], [])] in (["Relu"], ["Clip"])
        if not fused_in and any(i in inits or prod.get(i) is None or prod[i].op_type != "DequantizeLinear"
                                for i in ins):
            bad.append(n.name)
        elif not fused_out and any(not cons.get(o) or any(c.op_type != "QuantizeLinear" for c in cons[o])
                                   for o in n.output):
            bad.append(n.name)
    return bad


def test_htp_arch_option_parsing():
    t = with_options(get_target("qnn"), {"htp_arch": "v68"})
    assert t.htp_arch == 68 and t.integer_only
    assert get_target("qnn").htp_arch == 73 and not get_target("qnn").integer_only
    assert get_target({"name": "qnn", "htp_arch": 69}).integer_only  # the recipe form
    assert not with_options(get_target("qnn"), {"htp_arch": "V75"}).integer_only
    with pytest.raises(UsageError, match="expected one of v68, v69, v73, v75, v79"):
        with_options(get_target("qnn"), {"htp_arch": "v70"})
    with pytest.raises(UsageError, match="for the qnn target, not nnapi"):
        with_options(get_target("nnapi"), {"htp_arch": "v68"})


def test_provider_options_follow_the_architecture(monkeypatch):
    monkeypatch.delenv("ONNXSHRINK_QNN_OPTIONS", raising=False)
    assert qnn_provider_options(68) == {"backend_type": "htp", "htp_arch": "68", "soc_model": "30",
                                        "enable_htp_fp16_precision": "0"}
    v73 = qnn_provider_options(73)
    assert v73["soc_model"] == "43" and v73["enable_htp_fp16_precision"] == "1"
    assert qnn_provider_options(None)["soc_model"] == "43" and "htp_arch" not in qnn_provider_options(None)


def test_v73_placement_keeps_float_nodes_and_v68_has_none(no_htp):
    """The same net: the default qnn target (v73, fp16 float nodes) keeps float nodes, v68 none, within the
    budget; the coverage report agrees with a direct reading of the graph."""
    f = mixed_ops_net()
    data, val = normal_samples(16, 0), normal_samples(4, 1)
    q73, r73 = optimize(f, passes=["quantize"], data=data, val_data=val, target="qnn", debug=True)
    assert float_compute_nodes(q73) and r73.target_report["coverage"]["float_nodes"] > 0
    q68, r68 = optimize(f, passes=["quantize"], data=data, val_data=val, target={"name": "qnn", "htp_arch": "v68"},
                        debug=True)
    assert float_compute_nodes(q68) == [] and r68.target_report["coverage"]["float_nodes"] == 0
    assert r68.fidelity["cosine"] >= 0.99 and r68.target_report["verdict"]["ok"]
    ops = {n.op_type for n in q68.graph.node}
    assert {"ConvTranspose", "HardSigmoid", "Resize", "Clip", "Sigmoid"} <= ops
    assert "every op between Q/DQ" in r68.passes[0].stats["placement"]
    # the graph output keeps its name and is the output of a DequantizeLinear
    assert next(n for n in q68.graph.node if "y" in n.output).op_type == "DequantizeLinear"


def test_v68_fails_closed_when_no_integer_plan_holds(no_htp, tmp_path):
    """A budget neither uint8 nor uint16 reaches: nothing is kept float (weaker() has nothing to offer),
    the pass is rolled back, and the float model is refused on v68 (exit 4, nothing written)."""
    out = tmp_path / "o.onnx"
    with pytest.raises(BudgetError, match="HTP v68 has no float unit") as e:
        optimize(mixed_ops_net(), out, passes=["quantize"], data=normal_samples(16, 0), val_data=normal_samples(4, 1),
                 target={"name": "qnn", "htp_arch": "v68"}, budget="cosine>=0.9999999")
    assert not out.exists()
    rec = e.value.report.passes[0]
    assert rec.status != "applied"


@needs_qnn
def test_v68_model_finalizes_on_the_simulator_without_fp16(tmp_path):
    """Through the CLI: -o target.htp_arch=v68; the simulator is configured as HTP v68 (SM8350, no fp16),
    every node on HTP with CPU fallback disabled, the budget met on its outputs."""
    src, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(mixed_ops_net(), src)
    calib = write_npy_dir(tmp_path / "calib", [s["x"] for s in normal_samples(16, 0)])
    res = run_cli("optimize", src, tmp_path / "o.onnx", "--calib", calib, "-p", "quantize", "--target", "qnn",
                  "-o", "target.htp_arch=v68", "--report", rep)
    assert res.code == 0, res.err
    tr = json.loads(rep.read_text())["target_report"]
    htp = tr["qnn_htp"]
    assert htp["accepted"] and not htp.get("nodes_on_cpu")
    assert htp["provider_options"]["htp_arch"] == "68" and htp["provider_options"]["enable_htp_fp16_precision"] == "0"
    assert tr["coverage"]["float_nodes"] == 0 and htp["fidelity"]["cosine"] >= 0.99
    assert float_compute_nodes(onnx.load(tmp_path / "o.onnx")) == []


@needs_qnn
@pytest.mark.parametrize("arch", ["v73", "v68"])
def test_mixed_regions_run_on_the_simulator(arch):
    """A mixed uint8/uint16 plan (conversions at the borders) loads with CPU fallback disabled on the
    simulator and its HTP outputs are compared with fp32."""
    from tests.test_targets_a16 import branch_net
    q, rep = optimize(branch_net(), passes=["quantize"], data=normal_samples(16, 1), val_data=normal_samples(4, 7),
                      target={"name": "qnn", "htp_arch": arch}, budget="cosine>=0.98", debug=True)
    assert rep.passes[0].stats["scheme"]["activations"] == "mixed uint8/uint16"
    htp = rep.target_report["qnn_htp"]
    assert htp["accepted"] and not htp.get("nodes_on_cpu"), htp
    assert htp["provider_options"]["htp_arch"] == arch[1:] and htp["fidelity"]["cosine"] >= 0.98
