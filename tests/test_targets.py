"""Target profiles, emission (opset, static-shape folding, exact rewrites), coverage, fp16, ORT format."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, numpy_helper

from onnxshrink import targets
from onnxshrink.errors import UsageError
from onnxshrink.targets.profiles import TARGETS, get_target
from tests.helpers import assert_outputs_close, check, run_ort

RNG = np.random.default_rng(0)


def _model(text: str, inits: dict | None = None, opset: int = 17) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text.replace("OPSET", str(opset)))
    for name, v in (inits or {}).items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    return m


def _ops(m):
    return [n.op_type for n in m.graph.node]


# ------------------------------------------------------------------------------------ profiles
def test_profiles_exist_and_carry_qdq_scheme():
    assert set(TARGETS) == {"cpu", "xnnpack", "nnapi", "coreml", "qnn", "openvino"}
    for p in TARGETS.values():
        assert p.activation_dtype in ("uint8", "int8", "uint16", "int16")
        assert p.weight_dtype in ("uint8", "int8")
        assert p.opset_min <= p.opset_max
    x = get_target("xnnpack")
    assert x.per_channel and x.activation_dtype == "int8" and x.weight_dtype == "int8" and x.symmetric_weights
    q = get_target("qnn")
    assert q.static_shapes and q.activation_dtype in ("uint8", "uint16") and not q.float_ops_run
    assert "Shape" not in q.ops and "Range" not in q.ops and "Conv" in q.ops
    n = get_target("nnapi")
    assert n.static_shapes and n.activation_dtype == "uint8" and not n.per_channel
    with pytest.raises(UsageError):
        get_target("tpu")


# ------------------------------------------------------------------------------------ rewrites
def test_hardswish_decomposed_exactly_for_nnapi():
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) { h = HardSwish(x)  y = Relu(h) }""")
    out, done = targets.apply_rewrites(m, (), get_target("nnapi"))
    assert done == {"decompose_hardswish": 1, "decompose_hardsigmoid": 1}
    assert "HardSwish" not in _ops(out) and "HardSigmoid" not in _ops(out) and "Clip" in _ops(out)
    check(out)
    x = (RNG.standard_normal((1, 4, 5, 5)) * 4).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-6)


def test_hardswish_fused_back_exactly():
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[2,8] x) => (float[2,8] y) { h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)  y = Mul(x, h) }""")
    out, done = targets.apply_rewrites(m, ("fuse_hardswish",))
    assert done == {"fuse_hardswish": 1} and _ops(out) == ["HardSwish"]
    check(out)
    x = (RNG.standard_normal((2, 8)) * 5).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-6)


@pytest.mark.parametrize("attrs", ["", "<transB = 1>", "<transA = 1, alpha = 0.5, beta = 2.0>"])
def test_gemm_to_matmul_add_exact(attrs):
    ta = "transA" in attrs
    tb = "transB" in attrs
    a_shape = "[6,3]" if ta else "[3,6]"
    w = RNG.standard_normal((5, 6) if tb else (6, 5)).astype(np.float32)
    c = RNG.standard_normal((5,)).astype(np.float32)
    m = _model(f"""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float{a_shape} a) => (float[3,5] y) {{ y = Gemm {attrs} (a, w, c) }}""", {"w": w, "c": c})
    out, done = targets.apply_rewrites(m, ("gemm_to_matmul",))
    assert done == {"gemm_to_matmul": 1} and "Gemm" not in _ops(out) and "MatMul" in _ops(out)
    check(out)
    a = RNG.standard_normal((6, 3) if ta else (3, 6)).astype(np.float32)
    assert_outputs_close(run_ort(m, {"a": a}), run_ort(out, {"a": a}), 1e-5)


def test_matmul_add_to_gemm_exact():
    w = RNG.standard_normal((6, 5)).astype(np.float32)
    b = RNG.standard_normal((5,)).astype(np.float32)
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[3,6] a) => (float[3,5] y) { t = MatMul(a, w)  y = Add(t, b) }""", {"w": w, "b": b})
    out, done = targets.apply_rewrites(m, ("matmul_add_to_gemm",))
    assert done == {"matmul_add_to_gemm": 1} and _ops(out) == ["Gemm"]
    check(out)
    a = RNG.standard_normal((3, 6)).astype(np.float32)
    assert_outputs_close(run_ort(m, {"a": a}), run_ort(out, {"a": a}), 1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_convtranspose_to_conv_depthtospace_exact(bias):
    w = RNG.standard_normal((6, 4, 2, 2)).astype(np.float32)
    inits = {"w": w}
    args = "x, w"
    if bias:
        inits["b"] = RNG.standard_normal(4).astype(np.float32)
        args += ", b"
    m = _model(f"""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,6,5,7] x) => (float[1,4,10,14] y) {{
            y = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 0, 0]> ({args}) }}""", inits)
    out, done = targets.apply_rewrites(m, (), get_target("nnapi"))
    assert done == {"convtranspose_to_conv_depthtospace": 1} and _ops(out) == ["Conv", "DepthToSpace"]
    check(out)
    x = RNG.standard_normal((1, 6, 5, 7)).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-5)


def test_empty_resize_inputs_filled_for_the_usability_checker():
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,2,4,4] x) => (float[1,2,8,8] y) { y = Resize <mode = "nearest"> (x, , sc) }""",
               {"sc": np.array([1, 1, 2, 2], np.float32)})
    m = onnx.shape_inference.infer_shapes(m)
    before = targets.coverage(m, get_target("nnapi"))["usability_checker"]
    assert before["unsupported_dynamic_shape"] == 1
    out, done = targets.apply_rewrites(m, get_target("nnapi").rewrites, get_target("nnapi"))
    assert done == {"fill_empty_resize_inputs": 1}
    check(out)
    cov = targets.coverage(out, get_target("nnapi"))
    assert cov["usability_checker"]["unsupported_dynamic_shape"] == 0 and cov["accepted"]
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 0)


def test_rewrite_never_splits_a_quantized_node():
    m = _qdq_model("HardSwish")
    out, done = targets.apply_rewrites(m, (), get_target("nnapi"))
    assert done == {} and "HardSwish" in _ops(out)


# ------------------------------------------------------------------------------------ folding
def _shape_model():
    """YOLO-head-like shape arithmetic: reshape x to [N, C, H*W] from its own Shape."""
    return _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[N,4,6,6] x) => (float[N,4,36] y) {
            s = Shape(x)
            n = Gather <axis = 0> (s, i0)
            c = Gather <axis = 0> (s, i1)
            nu = Unsqueeze(n, ax0)
            cu = Unsqueeze(c, ax0)
            shp = Concat <axis = 0> (nu, cu, m1)
            r = Reshape(x, shp)
            y = Sigmoid(r)
        }""", {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
               "m1": np.array([-1], np.int64)})


def test_static_shape_folding_removes_shape_arithmetic():
    from onnxshrink.graph.shapes import fix_input_shapes
    m = fix_input_shapes(_shape_model(), {"x": [1, 4, 6, 6]})
    out, info = targets.fold_static_shapes(m)
    assert info["changed"] and sorted(_ops(out)) == ["Reshape", "Sigmoid"]
    assert info["removed"]["Shape"] == 1
    check(out)
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-7)
    cov = targets.coverage(out, get_target("qnn"))
    assert "Shape" not in cov["unsupported_ops"]


def test_dynamic_model_keeps_shape_ops_and_qnn_coverage_says_why():
    m = _shape_model()
    cov = targets.coverage(m, get_target("qnn"))
    assert cov["unsupported_ops"].get("Shape") == 1 and not cov["accepted"]
    assert any("dynamic" in u["reason"] for u in cov["unsupported"])
    assert any("no qnn kernel for Shape" in u["reason"] for u in cov["unsupported"])


def _qdq_model(op: str = "Conv") -> onnx.ModelProto:
    """x -> Q -> DQ -> op (-> Q -> DQ) -> y; Conv weights int8 per-channel through a DequantizeLinear."""
    w = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    inits = {"w_q": w, "w_s": np.full((4,), 0.01, np.float32), "w_z": np.zeros((4,), np.int8),
             "x_s": np.array(0.05, np.float32), "x_z": np.array(128, np.uint8),
             "y_s": np.array(0.05, np.float32), "y_z": np.array(128, np.uint8),
             "b_q": RNG.integers(-1000, 1000, (4,)).astype(np.int32), "b_s": np.full((4,), 0.0005, np.float32),
             "b_z": np.zeros((4,), np.int32)}
    body = ("bd = DequantizeLinear <axis = 0> (b_q, b_s, b_z)\n            t = Conv <pads = [1, 1, 1, 1]> (xd, wd, bd)"
            if op == "Conv" else f"t = {op}(xd)")
    return _model(f"""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,3,8,8] x) => (float y) {{
            xq = QuantizeLinear(x, x_s, x_z)
            xd = DequantizeLinear(xq, x_s, x_z)
            wd = DequantizeLinear <axis = 0> (w_q, w_s, w_z)
            {body}
            tq = QuantizeLinear(t, y_s, y_z)
            y = DequantizeLinear(tq, y_s, y_z)
        }}""", inits)


def test_folding_keeps_quantized_weights():
    m = _qdq_model()
    out, info = targets.fold_static_shapes(m)
    assert _ops(out).count("DequantizeLinear") == 4
    assert any(t.data_type == TensorProto.INT8 for t in out.graph.initializer)


# ------------------------------------------------------------------------------------ coverage
def test_qnn_coverage_counts_float_ops_and_accepts_qdq():
    f = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,3,8,8] x) => (float[1,3,8,8] y) { y = Sigmoid(x) }""")
    cov = targets.coverage(f, get_target("qnn"))
    assert cov["accepted"] and cov["float_nodes"] == 1 and cov["float_ops"] == {"Sigmoid": 1}
    q = _qdq_model()
    cov = targets.coverage(q, get_target("qnn"))
    assert cov["accepted"] and cov["taken"] == cov["nodes"] == 7 and cov["partitions"] == 1
    assert cov["float_nodes"] == 0


def test_xnnpack_coverage_checks_the_qdq_scheme():
    cov = targets.coverage(_qdq_model(), get_target("xnnpack"))
    # uint8 activations with per-channel int8 weights: XNNPACK does not take u8s8
    assert cov["heavy_ops"] == {"total": 1, "taken": 0, "cpu_integer": 0} and not cov["accepted"]
    m = _qdq_model()
    for t in m.graph.initializer:  # int8 activations: the qc8 scheme XNNPACK fuses
        if t.name in ("x_z", "y_z"):
            t.CopyFrom(numpy_helper.from_array(np.array(0, np.int8), t.name))
    cov = targets.coverage(m, get_target("xnnpack"))
    assert cov["heavy_ops"] == {"total": 1, "taken": 1, "cpu_integer": 0} and cov["accepted"]
    # the QDQ group (DQ x, DQ w, DQ bias, Conv, Q y) runs on XNNPACK; the graph-boundary Q of x and DQ of y do not
    assert cov["taken"] == 5 and cov["nodes"] == 7


def test_xnnpack_leaves_integer_matmuls_and_attention_to_the_cpu_ep_by_design():
    """A transformer for XNNPACK: its weighted MatMuls become integer kernels on the CPU EP (XNNPACK fuses
    no QDQ MatMul) and its attention MatMuls (activation x activation, no XNNPACK kernel) run there too;
    the check accepts that and says where each runs. It rejected every quantized transformer (exit 4)."""
    from onnxshrink.pipeline.manager import PassManager
    from tests.helpers import model_samples, small_vit
    model = small_vit(1)
    out, rep = PassManager(["cleanup", "quantize"], data=model_samples(model, 16), target="xnnpack",
                           budget="none").run(model)
    cov = rep.target_report["coverage"]
    assert cov["accepted"] and cov["rejected_because"] == []
    kinds = {u["node"]: u["reason"] for u in cov["unsupported"]}
    assert kinds["/blocks.0.mlp.fc1/MatMul"].startswith("an integer MatMul on the CPU EP")
    assert "constant weight initializer" in kinds["/blocks.0.attn/MatMul_1"]  # reads the float Softmax
    assert cov["cpu_integer"] >= 6 and cov["reasons"]["integer on the CPU EP"] == cov["cpu_integer"]
    assert "/patch_embed/proj/Conv" not in kinds  # the patch convolution runs on XNNPACK
    import io

    from rich.console import Console
    console = Console(file=io.StringIO(), width=250)
    rep.render(console)
    heavy = cov["heavy_ops"]
    assert (f"placement on XnnpackExecutionProvider (static analysis): {cov['taken']}/{cov['nodes']} nodes, "
            f"{heavy['taken']}/{heavy['total']} Conv/ConvTranspose/MatMul/Gemm (+{heavy['cpu_integer']} integer on "
            f"the CPU EP by design)") in console.file.getvalue()
    assert heavy["cpu_integer"] == 7  # q, k, v, proj, fc1, fc2 and one attention MatMul


def test_xnnpack_rejects_a_weighted_gemm_its_kernel_cannot_run():
    """XNNPACK's Gemm kernel takes alpha = beta = 1 only; a float Gemm with alpha 0.5 runs on the CPU EP
    in float, and the check says so (it counted every Gemm in XNNPACK's op list as taken)."""
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[2,8] x) => (float[2,4] y) { y = Gemm <alpha = 0.5> (x, w, b) }""",
               {"w": RNG.standard_normal((8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)})
    cov = targets.coverage(m, get_target("xnnpack"))
    assert not cov["accepted"] and cov["heavy_ops"] == {"total": 1, "taken": 0, "cpu_integer": 0}
    assert cov["rejected_because"] == ["Gemm_0 (Gemm): XNNPACK runs Gemm only with alpha = beta = 1"]
    m.graph.node[0].ClearField("attribute")
    cov = targets.coverage(m, get_target("xnnpack"))
    assert cov["accepted"] and cov["heavy_ops"] == {"total": 1, "taken": 1, "cpu_integer": 0}
    del m.graph.node[0].input[2]  # XNNPACK's support check reads the bias's shape: none, not taken
    cov = targets.coverage(m, get_target("xnnpack"))
    assert cov["rejected_because"] == ["Gemm_0 (Gemm): XNNPACK runs Gemm only with a bias input"]


def test_nnapi_coverage_uses_onnxruntime_usability_checker():
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) { h = HardSwish(x)  y = Relu(h) }""")
    cov = targets.coverage(m, get_target("nnapi"))
    assert cov["usability_checker"]["unsupported_ops"] == ["ai.onnx:HardSwish"]
    assert cov["unsupported_ops"] == {"HardSwish": 1}
    out, _ = targets.apply_rewrites(m, (), get_target("nnapi"))
    cov = targets.coverage(out, get_target("nnapi"))
    assert cov["accepted"] and cov["usability_checker"]["suitability"] == "YES" and cov["not_taken"] == 0


# ------------------------------------------------------------------------------------ emission
def test_emit_converts_opset_and_reports():
    m = _model("""<ir_version: 7, opset_import: ["" : OPSET]>
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) { h = HardSwish(x)  y = Relu(h) }""", opset=14)
    out, info = targets.emit_for_target(m, get_target("nnapi"), None)
    assert info["opset"] == 14 and info["coverage"]["accepted"]
    old = _model("""<ir_version: 7, opset_import: ["" : OPSET]>
        g (float[1,4] x) => (float[1,4] y) { y = Relu(x) }""", opset=11)
    out, info = targets.emit_for_target(old, get_target("qnn"), None, qnn=False)
    assert info["emission"]["opset"]["changed"] and info["opset"] == 13
    check(out)


def test_manager_prepares_and_reports_target(tmp_path):
    from onnxshrink.graph.shapes import fix_input_shapes  # noqa: F401
    from onnxshrink.pipeline.manager import PassManager
    m = _shape_model()
    samples = [{"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    pm = PassManager([], data=samples, target="nnapi")
    out, report = pm.run(m)
    assert "Shape" not in _ops(out)
    tr = report.target_report
    assert tr["prepare"]["fold"]["changed"] and tr["coverage"]["accepted"]
    assert report.fidelity["max_abs"] <= 1e-6


# ------------------------------------------------------------------------------------ fp16
def test_fp16_keeps_io_types_and_blocked_ops():
    import onnx_graphsurgeon as gs

    from onnxshrink.passes.base import Context
    from onnxshrink.passes.registry import create_pass
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,3,8,8] x) => (float[1,8,8,8] y) """
               """{ c = Conv <pads = [1, 1, 1, 1]> (x, w)  e = Exp(c)  y = Relu(e) }""",
               {"w": w})
    p = create_pass("fp16")
    res = p.run(gs.import_onnx(m), Context(template=m))
    out = Context(template=m).to_model(res.graph)
    assert res.modified and "Exp" in res.stats["kept_float32_ops"]
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)
    check(out)
    # Exp runs in float32: its input comes through a Cast to float
    exp = next(n for n in out.graph.node if n.op_type == "Exp")
    cast = next(n for n in out.graph.node if exp.input[0] in n.output)
    assert cast.op_type == "Cast" and next(a.i for a in cast.attribute if a.name == "to") == TensorProto.FLOAT
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    a, b = run_ort(m, {"x": x}), run_ort(out, {"x": x})
    assert b[0].dtype == np.float32
    assert np.max(np.abs(a[0] - b[0])) <= 2e-3 * np.max(np.abs(a[0]))


# ------------------------------------------------------------------------------------ ORT format
def test_save_ort_format(tmp_path):
    import onnxruntime as ort
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4] x) => (float[1,4] y) { y = Relu(x) }""")
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    o = targets.save_ort_format(p)
    assert o.suffix == ".ort" and o.exists()
    s = ort.InferenceSession(str(o), providers=["CPUExecutionProvider"])
    x = np.array([[-1, 2, -3, 4]], np.float32)
    assert np.array_equal(s.run(None, {"x": x})[0], np.maximum(x, 0))


def test_target_plus_ort_writes_ort_format(tmp_path):
    from onnxshrink.pipeline.manager import optimize
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4] x) => (float[1,4] y) { y = Relu(x) }""")
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    samples = [{"x": RNG.standard_normal((1, 4)).astype(np.float32)} for _ in range(2)]
    _, report = optimize(str(src), tmp_path / "out.onnx", passes=[], data=samples, target="nnapi+ort")
    ort_path = report.target_report["ort_format"]["path"]
    from pathlib import Path
    assert ort_path.endswith(".ort") and Path(ort_path).exists() and Path(ort_path).parent == tmp_path
    assert report.target_report["ort_format"]["optimization_style"] == "Runtime"


@pytest.mark.parametrize("opset,domain", [(17, "com.microsoft"), (20, "")])
@pytest.mark.parametrize("spelling", [
    "d = Div(x, r2)  e = Erf(d)  a = Add(e, one)  m = Mul(x, a)  y = Mul(m, half)",
    "d = Mul(r2inv, x)  e = Erf(d)  a = Add(one, e)  m = Mul(a, half)  y = Mul(x, m)",
    "h = Mul(x, half)  d = Div(x, r2)  e = Erf(d)  a = Add(e, one)  y = Mul(h, a)",
])
def test_the_exact_gelu_becomes_one_gelu_node(spelling, opset, domain):
    """x * 0.5 * (1 + erf(x / sqrt 2)), as exporters spell it, becomes Gelu (ONNX from opset 20,
    onnxruntime's com.microsoft one below): the same outputs; QNN HTP has Gelu and no Erf."""
    consts = {"r2": np.array(np.sqrt(2), np.float32), "r2inv": np.array(1 / np.sqrt(2), np.float32),
              "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    m = _model(f"""<ir_version: 9, opset_import: ["" : OPSET]>
        g (float[2,16] x) => (float[2,16] y) {{ {spelling} }}""", consts, opset=opset)
    out, done = targets.apply_rewrites(m, (), get_target("qnn"))
    assert done == {"fuse_gelu": 1}
    assert [(n.op_type, n.domain) for n in out.graph.node] == [("Gelu", domain)]
    x = {"x": RNG.standard_normal((2, 16)).astype(np.float32) * 3}
    assert_outputs_close(run_ort(m, x), run_ort(out, x))


@pytest.mark.parametrize("elsewhere", ["e", "d"])
def test_a_gelu_whose_intermediate_is_read_elsewhere_is_left_alone(elsewhere):
    m = _model(f"""<ir_version: 9, opset_import: ["" : OPSET]>
        g (float[2,16] x) => (float[2,16] y, float[2,16] z) {{
            d = Div(x, r2)  e = Erf(d)  a = Add(e, one)  m = Mul(x, a)  y = Mul(m, half)  z = Neg({elsewhere}) }}""",
               {"r2": np.array(np.sqrt(2), np.float32), "one": np.array(1.0, np.float32),
                "half": np.array(0.5, np.float32)})
    out, done = targets.apply_rewrites(m, (), get_target("qnn"))
    assert done == {} and out is m


def test_shape_folding_repeats_until_inference_sees_every_shape():
    """A Pad whose pads come from the input's shape through Mod (which onnx's data propagation does not
    evaluate), and a Reshape to the padded tensor's shape: the first round folds the pads, only the
    next one knows the padded shape (Swin-T's window padding; one round left 295 Shape nodes there)."""
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,3,6,6] x) => (float[1,3,8,8] y) {
            s = Shape(x)  h = Gather <axis = 0> (s, two)  r = Mod(h, eight)  p = Sub(eight, r)
            pm = Mod(p, eight)  pads = Concat <axis = 0> (zeros6, pm, pm)  xp = Pad(x, pads)
            sp = Shape(xp)  y = Reshape(xp, sp) }""",
               {"two": np.array([2], np.int64), "eight": np.array([8], np.int64),
                "zeros6": np.zeros(6, np.int64)})
    out, info = targets.fold_static_shapes(m)
    assert [n.op_type for n in out.graph.node] == ["Pad", "Reshape"] and info["rounds"] == 3
    x = {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert_outputs_close(run_ort(m, x), run_ort(out, x))


def test_where_the_qnn_htp_ran_its_verdict_overrules_the_static_analysis():
    """Swin-T's 6-D window Reshape/Transpose: the static check's rank limit (5) flags them, the HTP
    simulator takes every node with CPU fallback disabled; the run is the authority (exit 0, a
    warning), and without it the static check decides (exit 4)."""
    from onnxshrink.targets.prepare import target_verdict
    cov = {"accepted": False, "taken": 1347, "nodes": 1439, "accepted_means": "every node is taken"}
    ran = target_verdict({"coverage": cov, "qnn_htp": {"available": True, "accepted": True}}, get_target("qnn"))
    assert ran["ok"] and ran["notes"][0].endswith("the QNN HTP run takes every node with CPU fallback "
                                                   "disabled, and its verdict stands")
    alone = target_verdict({"coverage": cov, "qnn_htp": {"available": False}}, get_target("qnn"))
    assert not alone["ok"] and alone["problems"][0].startswith("the QNNExecutionProvider check rejects")


def test_a_static_rejection_names_its_first_problem():
    """The exit-4 message says what the check requires and the first node it does not take (it
    printed the requirement as if it were the reason)."""
    from onnxshrink.targets.prepare import target_verdict
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4] x) => (float[1,4] y) { n = NonZero(x)  y = Relu(x) }""")
    cov = targets.coverage(m, get_target("nnapi"))
    v = target_verdict({"coverage": cov}, get_target("nnapi"))
    assert not v["ok"] and "it requires that onnxruntime's mobile usability checker rates the model YES" in \
        v["problems"][0] and "first problem: the usability checker rates it" in v["problems"][0]
    cov = targets.coverage(m, get_target("qnn"))
    v = target_verdict({"coverage": cov, "qnn_htp": {"available": False}}, get_target("qnn"))
    assert v["problems"][0].endswith("first problem: NonZero_0 (NonZero): no qnn kernel for NonZero)")


# ------------------------------------------------------------------ CoreML's missing Gather / Flatten / Pad
@pytest.mark.parametrize("body, inits, x_shape, y_shape, done_key", [
    # a scalar index (the class token x[:, 0]), a negative one, a run of indices (q/k/v split), opset 17
    ("t = Gather <axis = 1> (x, i)  y = Relu(t)", {"i": np.array(0, np.int64)}, [2, 5, 3], [2, 3], "gather_to_slice"),
    ("t = Gather <axis = 1> (x, i)  y = Relu(t)", {"i": np.array(-1, np.int64)}, [2, 5, 3], [2, 3], "gather_to_slice"),
    ("t = Gather <axis = 0> (x, i)  y = Relu(t)", {"i": np.array([1, 2], np.int64)}, [4, 5, 3], [2, 5, 3],
     "gather_to_slice"),
    ("t = Flatten <axis = 2> (x)  y = Relu(t)", {}, [2, 3, 4, 5], [6, 20], "flatten_to_reshape"),
    ("t = Flatten (x)  y = Relu(t)", {}, [2, 3, 4, 5], [2, 60], "flatten_to_reshape"),
    ("t = Pad (x, p, v)  y = Relu(t)", {"p": np.array([0, 1, 0, 2, 0, 0, 3, 1], np.int64),
                                        "v": np.array(0.5, np.float32)}, [1, 2, 3, 4], [1, 3, 6, 7], "pad_to_concat"),
])
def test_ops_coreml_lacks_become_ops_it_has_exactly(body, inits, x_shape, y_shape, done_key):
    """CoreML's ML Program list has no Gather, Flatten or Pad: torchvision's ViT-B (37 Gathers),
    ConvNeXt-T (a Flatten) and Swin-T (12 Pads of its window padding besides) were refused (exit 4).
    Each becomes Slice(+Squeeze), Reshape or Concat with filled blocks, with the same outputs."""
    m = _model(f"""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float{x_shape} x) => (float{y_shape} y) {{ {body} }}""", inits)
    out, done = targets.apply_rewrites(m, (), get_target("coreml"))
    assert done.get(done_key) == 1, done
    assert not {"Gather", "Flatten", "Pad"} & set(_ops(out))
    check(out)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    assert np.array_equal(run_ort(m, {"x": x})[0], run_ort(out, {"x": x})[0])
    assert targets.coverage(out, get_target("coreml"))["not_taken"] == 0


def test_a_pad_of_zero_amounts_is_removed_by_cleanup():
    """torchvision's Swin pads its patch merging by H % 2: zero once shapes fold, a Pad that pads nothing."""
    from tests.test_cleanup import cleanup
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4,4,3] x) => (float[1,4,4,3] y) { t = Pad(x, p)  y = Relu(t) }""",
               {"p": np.zeros(8, np.int64)})
    res, out = cleanup(m)
    assert res.stats["identity_removed"] == 1 and _ops(out) == ["Relu"]


def test_a_usability_checker_refusal_names_the_ops_the_ep_lacks():
    """The refusal said only "rates it NO (561/1407 nodes, 278 partitions)" for a quantized ViT-B on
    CoreML; which ops were missing (its Q/DQ: CoreML computes in float) was in the JSON report only."""
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) { q = QuantizeLinear(x, s, z)  d = DequantizeLinear(q, s, z)
                                                     y = Relu(d) }""",
               {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8)})
    cov = targets.coverage(m, get_target("coreml"))
    assert not cov["accepted"]
    first = cov["rejected_because"][0]
    assert "; ops not in its list: " in first, first
    listed = first.split("ops not in its list: ")[1].rstrip(")").split(", ")
    assert {"QuantizeLinear x1", "DequantizeLinear x1"} <= set(listed), first


def test_hardswish_and_hardsigmoid_together_decompose_for_nnapi():
    """A model with both (MobileNetV3's segmentation heads: lraspp, deeplabv3): the HardSigmoid
    decomposition was queued twice and its second run read the nodes the first had replaced
    (IndexError; the preparation gave up and NNAPI refused 28 nodes). Its nodes unnamed, the new
    nodes were also named alike (``_mul`` twice), which onnxruntime refuses."""
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) { h = HardSwish(x)  s = HardSigmoid(x)  y = Mul(h, s) }""")
    out, done = targets.apply_rewrites(m, (), get_target("nnapi"))
    assert done == {"decompose_hardswish": 1, "decompose_hardsigmoid": 2}
    assert not {"HardSwish", "HardSigmoid"} & set(_ops(out))
    check(out)
    x = (RNG.standard_normal((1, 4, 5, 5)) * 4).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-6)


def test_a_batchnorm_becomes_a_scale_and_shift_for_coreml():
    """CoreML's list has no BatchNormalization: DenseNet-121's 62 pre-activation BatchNorms, which fold
    into no convolution, kept it off CoreML (exit 4). x * s + t per channel, to float round-off."""
    c = 3
    stats = {"sc": RNG.uniform(0.5, 2, c).astype(np.float32), "b": RNG.standard_normal(c).astype(np.float32),
             "mu": RNG.standard_normal(c).astype(np.float32), "var": RNG.uniform(0.1, 3, c).astype(np.float32)}
    m = _model("""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[2,3,4,5] x) => (float[2,3,4,5] y) { t = BatchNormalization <epsilon = 0.001> (x, sc, b, mu, var)
                                                     y = Relu(t) }""", stats)
    out, done = targets.apply_rewrites(m, (), get_target("coreml"))
    assert done == {"batchnorm_to_scale_shift": 1} and "BatchNormalization" not in _ops(out)
    check(out)
    x = (RNG.standard_normal((2, 3, 4, 5)) * 3).astype(np.float32)
    assert_outputs_close(run_ort(m, {"x": x}), run_ort(out, {"x": x}), 1e-5)
    assert targets.coverage(out, get_target("coreml"))["not_taken"] == 0


def test_cleanup_keeps_hard_sigmoid_chains_for_a_target_without_hard_sigmoid():
    """NNAPI has no HardSigmoid: the preparation decomposes it, but cleanup then fused the exporter's
    ``Clip(x + 3, 0, 6) / 6`` chains back into HardSigmoid, which quantization put inside QDQ groups
    the emission cannot split (PP-OCRv4 det on nnapi: 10 HardSigmoids, exit 4)."""

    from onnxshrink.pipeline.manager import optimize
    from tests.helpers import hardswish_as_exported, model_samples
    model = hardswish_as_exported(13)
    out, rep = optimize(model, passes=["cleanup", {"quantize": {"guard": False}}], data=model_samples(model, 16),
                        target=get_target("nnapi"), budget="none")
    assert "HardSigmoid" not in _ops(out)
    assert rep.target_report["coverage"]["accepted"], rep.target_report["coverage"].get("rejected_because")
