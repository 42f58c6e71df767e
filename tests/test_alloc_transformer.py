"""The allocation on transformers: quantize's per-node dynamic int8 (knob strength 0.75,
``quantize.dynamic_nodes``), the closure's dynamic variant, and the proxy sensitivity
(``pipeline/proxy.py``) against the measured one on a small ViT-style encoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from scipy.stats import spearmanr

from models.build import mobilenet_small
from onnxshrink.cache import MeasurementCache
from onnxshrink.data import ListSource
from onnxshrink.metrics import Budget, fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize.knob import DYNAMIC, DYNAMIC_NARROW, QDQ, WEIGHTS_INT8, QuantizeKnob
from onnxshrink.pipeline.manager import optimize
from onnxshrink.pipeline.proxy import use_proxy
from onnxshrink.pipeline.sensitivity import SensitivityData, apply_pass, measure_sensitivity
from tests.helpers import check, model_samples, run_ort, small_vit

DYNAMIC_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")


def _data(model, n_cal=8, n_val=6):
    xs = model_samples(model, n_cal + n_val, 0)
    calib, val = xs[:n_cal], xs[n_cal:]
    budget = Budget.parse("cosine>=0.99")
    return SensitivityData(calib, val, [run_ort(model, s) for s in val], None, budget, None,
                           {"pixel_values": [1, 3, 32, 32]}, 0)


def test_quantize_knob_offers_dynamic_int8_to_matmuls_only():
    model = mobilenet_small()
    knob = QuantizeKnob()
    strengths = {u: knob.unit_strengths(model, u) for u, _ in knob.units(model, None)}
    convs = [u for u in strengths if "conv" in u.lower()]
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    assert convs and gemms
    assert all(strengths[u] == (WEIGHTS_INT8, QDQ) for u in convs)
    assert all(strengths[u] == (WEIGHTS_INT8, DYNAMIC, QDQ, DYNAMIC_NARROW) for u in gemms)


def test_dynamic_nodes_quantize_those_nodes_and_nothing_else():
    model = small_vit(2)
    knob = QuantizeKnob()
    units = [u for u, _ in knob.units(model, None)]
    mm = [u for u in units if DYNAMIC in knob.unit_strengths(model, u)]
    dyn = mm[:3]
    choices = {**{u: DYNAMIC for u in dyn}, **{u: WEIGHTS_INT8 for u in units if u not in dyn}}
    opts = knob.options(model, choices)
    assert opts["dynamic_nodes"] == sorted(dyn) and not set(dyn) & set(opts["exclude"])
    xs = model_samples(model, 4, 0)
    ctx = Context(calib=ListSource(xs), val=ListSource(xs), template=model)
    out, reason = apply_pass(model, "quantize", opts, ctx)
    assert not reason
    check(out)
    ops = [n.op_type for n in out.graph.node]
    assert sum(op in DYNAMIC_OPS for op in ops) == 3
    # the other layers keep float compute with int8-stored weights (Cast x Mul): no QDQ
    assert "QuantizeLinear" not in ops and "Cast" in ops
    ref = [run_ort(model, s) for s in xs]
    assert fidelity(ref, [run_ort(out, s) for s in xs])["cosine"] > 0.99
    # a node the user excluded is not made dynamic
    merged = knob.merge({"exclude": [dyn[0]]}, opts)
    assert dyn[0] not in merged["dynamic_nodes"] and dyn[0] in merged["exclude"]


def test_proxy_ranks_units_like_the_measured_sweep():
    """Every (unit, strength) of prune, svd and quantize on a 1-block encoder, by the proxy and by
    running each pass: the proxy's losses rank like the measured ones and its savings match."""
    model = small_vit(1)
    data = _data(model, n_cal=8, n_val=4)
    kw = dict(cache=MeasurementCache(enabled=False))
    measured = measure_sensitivity(model, ["prune", "svd", "quantize"], data, data.budget, **kw)
    proxy = measure_sensitivity(model, ["prune", "svd", "quantize"], data, data.budget, proxy=True, **kw)
    assert proxy.info["mode"] == "proxy" and proxy.info["proxied"] == len(proxy.rows) == len(measured.rows)
    by = {(r["pass"], r["unit"], r["strength"]): r for r in measured.rows}
    pairs = [(r["loss"], by[(r["pass"], r["unit"], r["strength"])]["loss"]) for r in proxy.rows
             if np.isfinite(r["loss"]) and np.isfinite(by[(r["pass"], r["unit"], r["strength"])]["loss"])]
    assert len(pairs) > 20
    rho = spearmanr(*zip(*pairs))[0]
    assert rho > 0.8, rho
    for r in proxy.rows:
        m = by[(r["pass"], r["unit"], r["strength"])]
        if r["pass"] == "svd" and np.isfinite(r["loss"]):
            assert r["saving"]["params"] == m["saving"]["params"]
        if r["pass"] == "quantize" and r["strength"] == WEIGHTS_INT8:
            assert r["saving"]["weight_bytes"] == pytest.approx(m["saving"]["weight_bytes"], rel=0.02)


def test_a_proxy_table_does_not_depend_on_what_the_cache_measured(tmp_path):
    """With the proxy, a row an earlier run measured end to end (``allocate.verify_boundary`` measures
    the rows nearest the decision, and caches them) still comes from the proxy in the next table, so
    the table, and the allocation made from it, is the same whatever the cache's history (PP-OCRv4 rec
    at 0.15 read 0.229 to 0.999 as its smallest size within the budget from run to run on one cache)."""
    model = small_vit(1)
    data = _data(model, n_cal=8, n_val=4)
    cache = MeasurementCache(tmp_path)
    passes = ["prune", "svd", "quantize"]
    first = measure_sensitivity(model, passes, data, data.budget, proxy=True, cache=cache)
    proxied = [r for r in first.rows if r.get("proxy") and np.isfinite(r["loss"])][:4]
    keys = {f"{r['pass']}:{r['unit']}@{r['strength']:g}" for r in proxied}
    measured = measure_sensitivity(model, passes, data, data.budget, cache=cache, only=keys)
    by = {(r["pass"], r["unit"], r["strength"]): r["loss"] for r in measured.rows}
    # the measurements differ from the proxy's estimates, so a table that took them would differ
    assert len(by) == 4 and any(by[(r["pass"], r["unit"], r["strength"])] != r["loss"] for r in proxied)
    again = measure_sensitivity(model, passes, data, data.budget, proxy=True, cache=cache)
    strip = [[{k: v for k, v in r.items() if k != "cached"} for r in t.rows] for t in (first, again)]
    assert strip[0] == strip[1]
    assert again.info["measured"] == 0 and again.info["proxied"] == first.info["proxied"]


def test_auto_takes_the_proxy_on_large_models_only():
    small = small_vit(2)
    assert not use_proxy("auto", small, latency=False)
    assert use_proxy("proxy", small, latency=False) and not use_proxy("proxy", small, latency=True)
    w = onnx.numpy_helper.from_array(np.zeros((1024, 2304), np.float32), "w")  # 9 MiB of weights
    large = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1024])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2304])], [w]))
    assert use_proxy("auto", large, latency=False) and not use_proxy("auto", large, latency=True)
    assert not use_proxy("measured", large, latency=False)


def _proxy_allocation_at_0_35():
    """The allocation with the proxy on a 2-block ViT at --target-size 0.35: the report, after checking
    the model written is valid, within the target and within the budget on its samples."""
    model = small_vit(2)
    xs = model_samples(model, 24, 3)
    out, rep = optimize(model, passes=["cleanup", "prune", "svd", "quantize"], data=xs, budget="cosine>=0.99",
                        target_size=0.35, sensitivity="proxy", executor="serial", cache=False, speed="off")
    check(out)
    assert rep.after["weight_bytes"] <= 0.35 * rep.before["weight_bytes"]
    ref = [run_ort(model, s) for s in xs]
    assert fidelity(ref, [run_ort(out, s) for s in xs])["cosine"] >= 0.99
    return rep


def test_allocation_with_the_proxy_writes_a_valid_model_within_the_budget():
    a = _proxy_allocation_at_0_35().allocation
    assert a["sensitivity"]["mode"] == "proxy" and a["sensitivity"]["boundary"]["verified"] > 0


def test_closure_tries_dynamic_int8_when_qdq_breaks_the_budget(monkeypatch):
    """Every unit in QDQ int8 breaks the budget at any prefix; the MatMul units in dynamic int8 keep
    it and time faster: the closure keeps that variant."""
    import onnxshrink.pipeline.allocate as al
    from onnxshrink.pipeline.sensitivity import SensitivityTable

    rows = []
    for u in "abc":
        for s, loss in ((WEIGHTS_INT8, 0.0), (DYNAMIC, 0.001), (QDQ, 0.01)):
            rows.append({"pass": "quantize", "unit": u, "strength": s, "loss": loss, "saving": {"weight_bytes": 75}})
    table = SensitivityTable(base_cost={"weight_bytes": 1000.0}, base_scores={}, rows=rows,
                             layer_cost={u: {"macs": 10} for u in "abc"})
    chosen = {("quantize", u): WEIGHTS_INT8 for u in "abc"}
    extra, timed = {}, []

    def verify(label, materialize=False, decide_on_cost=False):
        conf = extra.get(label, chosen)
        ok = not any(s == QDQ for s in conf.values())
        return {"n": label, "budget_ok": ok, "target_met": True, "model": label, "cost": {}}

    def verdict(a, b, feeds):
        timed.append((a, b))
        return {"speedup": 1.7, "interval": [1.6, 1.8], "ms": [1.7, 1.0], "rounds": 15, "faster": True}

    monkeypatch.setattr(al, "speed_verdict", verdict)
    alloc = {}
    best = al.quantize_closure({"n": 5}, chosen, table, extra, verify, "weight_bytes", alloc, None,
                               MeasurementCache(enabled=False), "k")
    assert best["n"] == "5+s0.75:3"
    assert extra["5+s0.75:3"] == {("quantize", u): DYNAMIC for u in "abc"}
    assert timed == [(5, "5+s0.75:3")]
    assert "no prefix at strength 1 keeps the budget" in alloc["closure"]


def test_a_search_failing_on_the_verified_order_searches_the_proxys_own(monkeypatch):
    """The boundary's verification redoes the greedy order; when no prefix of that order meets the
    target within the budget, the proxy's own order is searched before failing closed. Here the
    verified table is made misleading (every loss inverted: the most harmful choices first), so the
    verified order cannot meet the target, and the proxy's order does."""
    import onnxshrink.pipeline.allocate as al

    real = al.verify_boundary

    def misleading(*args, **kw):
        assert real(*args, **kw)
        table = args[7]
        table.rows = [{**r, "loss": 1.0 / (abs(r["loss"]) + 1e-6)} for r in table.rows]
        return True
    monkeypatch.setattr(al, "verify_boundary", misleading)
    a = _proxy_allocation_at_0_35().allocation
    first = [t for t in a["trials"] if t.get("order") == "verified"]
    second = [t for t in a["trials"] if t.get("order") == "proxy"]
    assert first and not any(t["budget_ok"] and t["target_met"] for t in first)
    assert len(first) + len(second) == len(a["trials"]) and "second_order" in a
    assert a["chosen_order"] == "proxy" and any(t["n"] == a["chosen_n"] and t["budget_ok"] and t["target_met"]
                                                for t in second)
    # the reports mark the chosen configuration once, naming its order
    from onnxshrink.pipeline.report import is_chosen, trial_label
    assert [trial_label(t) for t in a["trials"] if is_chosen(t, a)] == [f"{a['chosen_n']} (proxy order)"]
