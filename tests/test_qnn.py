"""Real QNN HTP checks (the HTP backend runs as a simulator on x86-64 Linux).

Skipped with a reason when onnxruntime-qnn is not installed (``pip install onnxruntime-qnn``, or
``ONNXSHRINK_QNN_PYTHON=/path/to/venv/bin/python`` pointing at a Python that has it)."""

from __future__ import annotations

import os
import tempfile

import onnx
import pytest

from onnxshrink import targets
from onnxshrink.targets.profiles import get_target
from tests.helpers import conv_gap_model, normal_samples

pytestmark = pytest.mark.skipif(not targets.qnn_available(),
                                reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")


def _float_model():
    return conv_gap_model("HardSwish")


def _samples(n, seed):
    return normal_samples(n, seed, shape=(1, 3, 16, 16))


def _qnn_qdq(m):
    from onnxruntime.quantization import CalibrationDataReader, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_samples(8, 0))

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(m, src)
        quantize(src, dst, get_qnn_qdq_config(src, R()))
        return onnx.load(dst)


def _ref(m, samples):
    from tests.helpers import run_ort
    return [run_ort(m, s) for s in samples]


def test_qdq_model_runs_entirely_on_htp_close_to_fp32():
    f = _float_model()
    q = _qnn_qdq(f)
    val = _samples(3, 1)
    res = targets.qnn_htp_check(q, val, _ref(f, val))
    assert res["available"] and res["accepted"], res
    assert not res.get("nodes_on_cpu")
    assert res["fidelity"]["cosine"] >= 0.99


def test_float_model_runs_on_htp_simulator_and_coverage_flags_float_ops():
    """The x86 HTP simulator takes float graphs (a device runs them in fp16 on v73+ only): the
    real check accepts it and the static coverage reports the float nodes."""
    f = _float_model()
    val = _samples(1, 1)
    res = targets.qnn_htp_check(f, val, _ref(f, val))
    assert res["available"] and res["accepted"]
    cov = targets.coverage(f, get_target("qnn"))
    assert cov["float_nodes"] == 3


def test_dynamic_shape_model_is_rejected_with_cpu_fallback_disabled():
    f = _float_model()
    f.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    x = f.graph.input[0].type.tensor_type.shape.dim[0]
    x.ClearField("dim_value")
    x.dim_param = "N"
    val = _samples(1, 1)
    res = targets.qnn_htp_check(f, val, _ref(f, val))
    assert res["available"] and not res["accepted"], res
    assert res.get("error")
    # the EP's own reasons, per node unit: a dynamic dimension leaves it without a shape
    units = {v["unit"]: v["reason"] for v in res["ep_validation_failed"]}
    assert {"Conv", "GlobalAveragePool"} <= set(units) and units["Conv"] == "Cannot get shape"


def test_emit_for_qnn_reports_real_check():
    f = _float_model()
    q = _qnn_qdq(f)

    class Ctx:
        val = None
        reference = None

    out, info = targets.emit_for_target(q, get_target("qnn"), Ctx())
    assert info["coverage"]["accepted"]
    assert info["qnn_htp"]["accepted"]


def _project_qdq(m, target="qnn", **opts):
    from onnxshrink.pipeline.manager import optimize
    out, rep = optimize(m, passes=[{"quantize": {"guard": False, **opts}}], data=_samples(12, 0),
                        val_data=_samples(2, 1), target=get_target(target), debug=True)
    return out, rep


def test_a16w8_model_runs_entirely_on_htp():
    """The quantize pass's uint16 activations (com.microsoft Q/DQ at opset 17) on HTP, CPU fallback off."""
    f = _float_model()
    q, rep = _project_qdq(f, activation_dtype="uint16")
    assert {n.domain for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"com.microsoft"}
    res = rep.target_report["qnn_htp"]
    assert res["accepted"] and not res.get("nodes_on_cpu"), res
    assert res["fidelity"]["cosine"] >= 0.99


def test_channel_last_io_runs_entirely_on_htp():
    """NHWC input and output (Transposes on the integer side of the boundary Q/DQ) stay on HTP and
    give the NCHW model's outputs (compared in NCHW)."""
    q, rep = _project_qdq(_float_model(), target="qnn+channels_last")
    assert rep.target_report["channels_last"]["changed"]
    assert [d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim] == [1, 16, 16, 3]
    res = rep.target_report["qnn_htp"]
    assert res["accepted"] and not res.get("nodes_on_cpu"), res
    assert res["fidelity"]["cosine"] >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("arch", [None, "v68"])
@pytest.mark.parametrize("name", ["yolov8n", "ppocr_det", "ppocr_cls"])
def test_real_model_on_htp(name, arch, real_model_path, monkeypatch):
    """Issue 16's done-when: ``--passes cleanup,quantize --target qnn`` with no budget (the default one)
    runs with every node on QNN HTP (the simulator as v73 with fp16, or ``-o target.htp_arch=v68``: SM8350,
    no fp16, and no float compute node), CPU fallback disabled, at cosine >= 0.98 against fp32 on the
    worst of 8 samples held out of calibration, measured on HTP. PP-OCR cls is PP-OCR's MobileNetV3
    direction classifier (HardSwish + squeeze-excite). 16 calibration samples keep the run short."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from targets_bench import run_one
    monkeypatch.setenv("ONNXSHRINK_QNN_SAMPLES", "8")
    real_model_path(name)
    r = run_one(name, "qnn", "onnxshrink", 16, 16, arch)
    htp = r["qnn_htp"]
    assert r["exit_4"] is None, r
    assert htp["accepted"] and not htp.get("nodes_on_cpu"), r
    assert r["accepted_static"], r
    assert htp["samples"] == 8 and htp["fidelity"]["cosine_min"] >= 0.98, r
    assert htp["provider_options"]["htp_arch"] == ("68" if arch else "73")
    if arch:
        assert htp["provider_options"]["enable_htp_fp16_precision"] == "0" and r["float_nodes"] == 0, r
    assert r["precision_regions"], r


def _has_quantize():
    from onnxshrink.passes.registry import registry
    return "quantize" in registry()


def test_a_transformer_with_the_exact_gelu_runs_entirely_on_htp():
    """A ViT block exported with erf GELU: QNN has no Erf (its check rejected every such transformer);
    the target's preparation writes Gelu, and the quantized model runs whole on the HTP simulator."""
    from onnxshrink.pipeline.manager import optimize
    from tests.helpers import model_samples, small_vit
    model = small_vit(1)
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model, 16),
                        target=get_target("qnn"), budget="cosine>=0.98")
    ops = {(n.op_type, n.domain) for n in out.graph.node}
    assert ("Gelu", "com.microsoft") in ops and not any(op == "Erf" for op, _ in ops)
    tr = rep.target_report
    assert tr["coverage"]["accepted"] and tr["coverage"]["not_taken"] == 0
    assert tr["qnn_htp"]["accepted"] and tr["qnn_htp"]["fidelity"]["cosine"] > 0.98


def test_an_einsum_attention_block_runs_entirely_on_htp():
    """maxvit's attention (``BGHID,BGHJD->BGHIJ``, upper case, 5-D) between EinsumDense projections:
    QNN's Einsum builder refuses those equations (torchvision's maxvit_t failed on the simulator) and
    the quantizer found no weights in them; written as MatMul, the quantized block runs whole on HTP."""
    from onnxshrink.pipeline.manager import optimize
    from tests.helpers import einsum_attention, model_samples
    model = einsum_attention()
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model, 16),
                        target=get_target("qnn"), budget="cosine>=0.98")
    assert "Einsum" not in {n.op_type for n in out.graph.node}
    tr = rep.target_report
    assert tr["coverage"]["accepted"] and tr["coverage"]["not_taken"] == 0, tr["coverage"]
    assert tr["qnn_htp"]["accepted"] and tr["qnn_htp"]["fidelity"]["cosine"] > 0.98, tr["qnn_htp"]


def test_a_rank_six_window_partition_runs_entirely_on_htp():
    """Swin's 6-D window partition around a MatMul: written at rank 4 by the target's preparation
    (QNN takes rank 5 at most), the quantized block runs whole on the HTP simulator."""
    from onnxshrink.pipeline.manager import optimize
    from tests.helpers import model_samples, window_partition_block
    model = window_partition_block()
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model, 16),
                        target=get_target("qnn"), budget="cosine>=0.98")
    assert max(len(n.attribute[0].ints) for n in out.graph.node if n.op_type == "Transpose") == 4
    tr = rep.target_report
    assert tr["coverage"]["accepted"] and tr["coverage"]["not_taken"] == 0, tr["coverage"]
    assert tr["qnn_htp"]["accepted"] and tr["qnn_htp"]["fidelity"]["cosine"] > 0.98, tr["qnn_htp"]
