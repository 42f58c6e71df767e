"""``--target qnn+context``: the compiled QNN context (EPContext) model written beside OUT and checked
on the HTP simulator; the option's parsing; all or nothing when the context cannot be made."""

from __future__ import annotations

import onnx
import pytest

from onnxshrink import optimize, targets
from onnxshrink.errors import BudgetError, UsageError
from onnxshrink.pipeline import manager
from onnxshrink.targets.profiles import get_target, with_options
from onnxshrink.targets.qnn import context_path
from tests.helpers import conv_gap_model, normal_samples

needs_qnn = pytest.mark.skipif(not targets.qnn_available(),
                               reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")


def _float_model():
    return conv_gap_model("Relu")


def _samples(n, seed):
    return normal_samples(n, seed, shape=(1, 3, 16, 16))


def test_context_option_parsing():
    assert get_target("qnn+context").context and not get_target("qnn").context
    assert with_options(get_target("qnn"), {"context": "true"}).context
    assert get_target({"name": "qnn", "context": True}).context
    with pytest.raises(UsageError, match="context .* is for the qnn target, not openvino"):
        get_target("openvino+context")
    assert context_path("/a/b/model.small.onnx").as_posix() == "/a/b/model.small_ctx.onnx"


@needs_qnn
def test_context_model_is_written_beside_out_and_matches(tmp_path):
    out = tmp_path / "q.onnx"
    _, rep = optimize(_float_model(), out, passes=[{"quantize": {"guard": False}}], data=_samples(12, 0),
                      val_data=_samples(2, 1), target="qnn+context", budget="none")
    ctx = rep.target_report["context"]
    assert ctx["ok"] and ctx["path"] == str(tmp_path / "q_ctx.onnx") and out.exists()
    assert ctx["cosine_min"] >= 1 - 1e-5 and ctx["max_rel_err"] <= 1e-3 and ctx["samples"] == 2
    m = onnx.load(ctx["path"])
    assert [n.op_type for n in m.graph.node] == ["EPContext"]
    assert ctx["bytes"] == (tmp_path / "q_ctx.onnx").stat().st_size


def test_a_context_that_fails_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(manager, "qnn_available", lambda: True)
    monkeypatch.setattr(manager, "save_qnn_context", lambda p, **k: {"ok": False, "error": "stubbed compile failure"})
    monkeypatch.setattr(targets.prepare, "qnn_htp_check", lambda *a, **k: {"available": False, "reason": "stub"})
    out = tmp_path / "q.onnx"
    with pytest.raises(BudgetError, match="target qnn\\+context: stubbed compile failure"):
        optimize(_float_model(), out, passes=[{"quantize": {"guard": False}}], data=_samples(12, 0),
                 val_data=_samples(2, 1), target="qnn+context", budget="none")
    assert list(tmp_path.iterdir()) == []


def test_context_without_onnxruntime_qnn_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(manager, "qnn_available", lambda: False)
    with pytest.raises(UsageError, match="needs onnxruntime-qnn"):
        optimize(_float_model(), tmp_path / "q.onnx", passes=["cleanup"], target="qnn+context", budget="none")
