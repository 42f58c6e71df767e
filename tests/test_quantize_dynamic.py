"""quantize's dynamic int8 MatMul (passes/quantize/dynamic.py): onnxruntime's quantize_dynamic, tried
first on MatMul-dominated models. The auto decision's timing is stubbed where the test is about the
rule (a stand-in ``compare_speeds``), so no test depends on this machine's load."""

from __future__ import annotations

import onnx
import pytest

from models.build import mlp, mobilenet_small, transformer_block
from onnxshrink import runtime
from onnxshrink.errors import InputError
from onnxshrink.metrics import fidelity
from onnxshrink.pipeline import manager
from onnxshrink.pipeline.manager import optimize
from onnxshrink.runtime import SpeedComparison
from tests.fail_closed_models import conv1d_add_last_axis
from tests.helpers import model_samples, run_ort

DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _timing(monkeypatch, speedup: float) -> None:
    """Every candidate timed by a pass (``Context.compare_speeds``: the manager's timing, else runtime's)
    measures ``speedup`` against its base."""
    def stand_in(models, feeds, pairs, **kw):
        return [SpeedComparison(speedup=speedup, low=speedup * 0.95, high=speedup * 1.05, t_a=1.0, t_b=1 / speedup,
                                rounds=30) for _ in pairs]
    monkeypatch.setattr(runtime, "compare_speeds", stand_in)  # compare_candidates
    monkeypatch.setattr(manager, "compare_speeds", stand_in)


def test_dynamic_on_quantizes_every_constant_matmul_and_gemm():
    model = transformer_block()
    data = model_samples(model)
    out, rep = optimize(model, passes=["cleanup", {"quantize": {"dynamic": "on"}}], data=data, budget="none")
    q = rep.passes[-1]
    assert q.status == "applied" and _ops(out) & DYNAMIC_OPS and "QuantizeLinear" not in _ops(out)
    # the q/k/v/out projections (MatMul) and the two MLP layers (Gemm, rewritten as MatMul first)
    assert q.stats["dynamic_matmuls"] == 6
    ref = [run_ort(model, s) for s in data]
    assert fidelity(ref, [run_ort(out, s) for s in data])["cosine"] > 0.999


def test_dynamic_on_without_a_constant_matmul_is_an_input_error():
    model = conv1d_add_last_axis()
    with pytest.raises(InputError, match="no MatMul/Gemm with constant weights"):
        optimize(model, passes=[{"quantize": {"dynamic": "on"}}], data=model_samples(model), budget="none",
                 debug=True)


def test_auto_keeps_dynamic_when_it_holds_and_is_clearly_faster(monkeypatch):
    _timing(monkeypatch, 1.8)
    model = mlp()
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model))
    q = rep.passes[-1]
    assert q.status == "applied" and _ops(out) & DYNAMIC_OPS
    assert q.stats["dynamic"]["chosen"] is True and "static QDQ not tried" in q.reason
    assert q.stats["dynamic"]["matmul_share"] > 0.99  # three Gemms and nothing else


def test_auto_falls_back_to_static_when_dynamic_is_not_clearly_faster(monkeypatch):
    _timing(monkeypatch, 1.01)
    model = mlp()
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model))
    q = rep.passes[-1]
    assert not _ops(out) & DYNAMIC_OPS
    assert q.stats["dynamic"]["chosen"] is False and q.stats["dynamic"]["reason"].startswith("not clearly faster")


def test_auto_is_not_tried_on_a_convolutional_model():
    model = mobilenet_small(hw=32)
    _, rep = optimize(model, passes=["cleanup", {"quantize": {"min_speedup": 0.0}}], data=model_samples(model),
                      budget="none")
    trial = rep.passes[-1].stats["dynamic"]
    assert trial["chosen"] is False and trial["matmul_share"] < 0.1 and "dynamic is tried from 50%" in trial["reason"]


def test_auto_is_off_without_the_guard_and_on_other_targets():
    model = mlp()
    for extra in ({"passes": ["cleanup", {"quantize": {"guard": False}}]},
                  {"passes": ["cleanup", "quantize"], "target": "xnnpack"}):
        _, rep = optimize(model, data=model_samples(model), budget="none", **extra)
        assert rep.passes[-1].name == "quantize" and "dynamic" not in rep.passes[-1].stats


def _small_crnn():
    from models.build import crnn_small
    return crnn_small(hw=(32, 64), hidden=32, num_classes=11, widths=(8, 16, 16, 16, 16))


def test_auto_quantizes_the_lstm_dynamically_when_it_holds_and_is_clearly_faster(monkeypatch):
    """A conv + bidirectional LSTM model: after the static plan, the LSTM becomes onnxruntime's
    DynamicQuantizeLSTM (int8 W and R) when the result with it holds the floor and is faster."""
    _timing(monkeypatch, 1.5)
    model = _small_crnn()
    data = model_samples(model, 12)
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=data, budget="cosine>=0.99")
    q = rep.passes[-1]
    trial = q.stats["dynamic_lstm"]
    assert trial["chosen"] and trial["nodes"] == ["/rnn/LSTM"], trial
    assert "DynamicQuantizeLSTM" in _ops(out) and "LSTM" not in _ops(out)
    lstm = next(n for n in out.graph.node if n.op_type == "DynamicQuantizeLSTM")
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[lstm.input[1]].data_type == onnx.TensorProto.INT8  # W stored int8
    assert "LSTM dynamic int8" in q.reason and rep.budget_met
    # its MACs are still counted (W is held transposed), and counted as integer
    from onnxshrink.graph.cost import model_cost, model_stats
    assert model_cost(out)["macs"] == model_cost(model)["macs"]
    assert model_stats(out)["integer_macs"] >= model_cost(model)["per_node"]["/rnn/LSTM"] > 0
    ref = [run_ort(model, s) for s in data]
    assert fidelity(ref, [run_ort(out, s) for s in data])["cosine"] > 0.99


def test_the_input_is_timed_only_beside_the_lstm_trial_whose_result_the_contract_reads(monkeypatch):
    """The static plan of a conv + LSTM model is not the pass's result (the LSTM trial follows and
    changes it): its timing has no input beside it. The LSTM trial's candidate is the result: timed
    with the input, and the speed contract reads that comparison instead of timing the pair again."""
    timed = []

    def stand_in(models, feeds, pairs, **kw):
        timed.append((len(models), [p[:2] for p in pairs]))
        return [SpeedComparison(speedup=1.5, low=1.45, high=1.55, t_a=1.0, t_b=1 / 1.5, rounds=12) for _ in pairs]

    def no_timing(*a, **k):
        raise AssertionError("the contract timed the pair again")
    monkeypatch.setattr(runtime, "compare_speeds", stand_in)
    monkeypatch.setattr(manager, "compare_speeds", stand_in)
    monkeypatch.setattr(manager, "compare_speed", no_timing)
    model = _small_crnn()
    out, rep = optimize(model, passes=["cleanup", "quantize"], data=model_samples(model, 12), budget="cosine>=0.99",
                        speed="never-slower")
    assert rep.passes[-1].stats["dynamic_lstm"]["chosen"]
    # the guard: its candidate against the float model alone; the LSTM trial: with the input beside it
    assert timed == [(2, [(0, 1)]), (3, [(0, 1), (2, 1)])]
    assert rep.speed["vs_input"]["speedup"] == 1.5 and rep.speed["verdict"] == "not slower"


@pytest.mark.parametrize("speedup, dynamic", [(1.0, "auto"), (1.5, "off")])
def test_lstm_stays_float_when_not_faster_or_dynamic_off(monkeypatch, speedup, dynamic):
    _timing(monkeypatch, speedup)
    model = _small_crnn()
    out, rep = optimize(model, passes=["cleanup", {"quantize": {"dynamic": dynamic}}], data=model_samples(model, 12),
                        budget="cosine>=0.99")
    q = rep.passes[-1]
    assert "LSTM" in _ops(out) and "DynamicQuantizeLSTM" not in _ops(out)
    if dynamic == "off":
        assert "dynamic_lstm" not in q.stats
    else:
        assert not q.stats["dynamic_lstm"]["chosen"] and "not clearly faster" in q.stats["dynamic_lstm"]["reason"]


def test_dynamic_on_also_quantizes_the_lstm_without_timing_it(monkeypatch):
    _timing(monkeypatch, 0.5)  # slower: on does not ask
    model = _small_crnn()
    out, rep = optimize(model, passes=["cleanup", {"quantize": {"dynamic": "on"}}], data=model_samples(model, 12),
                        budget="none")
    q = rep.passes[-1]
    assert {"DynamicQuantizeLSTM"} <= _ops(out) and _ops(out) & DYNAMIC_OPS  # the head MatMul too
    assert q.stats["dynamic_lstm"] == {"nodes": ["/rnn/LSTM"], "chosen": True, "reason": "dynamic=on"}
