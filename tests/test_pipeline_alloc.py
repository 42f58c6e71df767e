"""Shared sensitivity and allocation: the greedy order and its cost estimate, the on-disk cache
(a second identical run measures nothing and takes under a third of the first run's time), and
the process pool giving the same table and decisions as a serial run."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from models.build import resnet_small, smooth_images
from onnxshrink.cache import MeasurementCache
from onnxshrink.metrics import Budget
from onnxshrink.pipeline.executor import ProcessExecutor, SerialExecutor
from onnxshrink.pipeline.manager import optimize
from onnxshrink.pipeline.sensitivity import (
    SensitivityData,
    SensitivityTable,
    estimate_cost,
    greedy_order,
    knobs,
    measure_sensitivity,
)
from tests.digits_cnn import digits_model, digits_split
from tests.helpers import check, run_ort


def _table(rows, layer_cost=None):
    return SensitivityTable(base_cost={"weight_bytes": 1000.0, "macs": 100.0}, base_scores={}, rows=rows,
                            layer_cost=layer_cost or {})


def _row(p, u, s, loss, saving):
    return {"pass": p, "unit": u, "strength": s, "loss": loss, "saving": {"weight_bytes": saving}}


def test_greedy_order_by_loss_per_saving_with_upgrades():
    rows = [_row("prune", "a", 0.25, 0.010, 100), _row("prune", "a", 0.5, 0.020, 300),
            _row("quantize", "b", 1.0, 0.001, 200), _row("svd", "c", 0.5, math.inf, 500),
            _row("svd", "d", 0.5, 0.5, 0)]
    steps = greedy_order(_table(rows), "weight_bytes")
    # b (5e-6 per byte), a@0.5 (6.7e-5), then a@0.25 is weaker than what a has: skipped; inf / 0 never
    assert [(s["row"]["unit"], s["row"]["strength"]) for s in steps] == [("b", 1.0), ("a", 0.5)]
    assert steps[-1]["chosen"] == {("quantize", "b"): 1.0, ("prune", "a"): 0.5}
    assert steps[-1]["estimated"] == pytest.approx(1000 - 200 - 300)


def test_cost_estimate_combines_passes_on_one_layer_multiplicatively():
    rows = [_row("prune", "L", 0.5, 0.0, 50), _row("quantize", "L", 1.0, 0.0, 75)]
    t = _table(rows, {"L": {"weight_bytes": 100}})
    chosen = {("prune", "L"): rows[0], ("quantize", "L"): rows[1]}
    # half the layer pruned, the rest at a quarter of the bytes: 100 * (1 - 0.5 * 0.25) saved
    assert estimate_cost(t, chosen, "weight_bytes") == pytest.approx(1000 - 87.5)


def test_quantize_closure_raises_the_longest_harmless_prefix(monkeypatch):
    """All units in QDQ int8 breaks the budget; the closure bisects the units ordered by marginal loss
    per MAC and keeps the longest prefix that holds, when it measures faster."""
    import onnxshrink.pipeline.allocate as al
    rows = [_row("quantize", u, s, loss, 75) for u, s, loss in
            [("a", 0.5, 0.0), ("a", 1.0, 0.001), ("b", 0.5, 0.0), ("b", 1.0, 0.002),
             ("c", 0.5, 0.0), ("c", 1.0, 0.5), ("d", 1.0, 0.003)]]
    t = _table(rows, {u: {"macs": 10} for u in "abcd"})
    for r in rows:
        r["saving"]["macs"] = 0
    chosen = {("quantize", "a"): 0.5, ("quantize", "b"): 0.5, ("quantize", "c"): 0.5}
    extra, seen = {}, []

    def verify(label, materialize=False, decide_on_cost=False):
        conf = extra.get(label, chosen)
        seen.append(label)
        ok = conf.get(("quantize", "c"), 0) < 1.0  # c in int8 breaks the budget
        return {"n": label, "budget_ok": ok, "target_met": True, "model": None, "cost": {}}

    monkeypatch.setattr(al, "speed_verdict", lambda a, b, feeds: {"speedup": 2.0, "interval": [1.8, 2.2],
                                                                   "ms": [2.0, 1.0], "rounds": 15, "faster": True})
    alloc = {}
    best = al.quantize_closure({"n": 7}, chosen, t, extra, verify, "weight_bytes", alloc, None,
                                MeasurementCache(enabled=False), "k")
    # order a, b, d (marginal 1e-4, 2e-4, 3e-4 per MAC), c last: 4 broke, 2 held, 3 held
    assert best["n"] == "7+q3"
    assert extra["7+q3"] == {**chosen, ("quantize", "a"): 1.0, ("quantize", "b"): 1.0, ("quantize", "d"): 1.0}
    assert "7+q4" in seen and "3 units raised to int8" in alloc["closure"]


def _digits_data(n_val=64):
    xtr, _, xte, yte = digits_split()
    model = digits_model()
    calib = [{"image": x[None]} for x in xtr[:16]]
    val = [{"image": x[None]} for x in xte[:n_val]]
    ref = [run_ort(model, s) for s in val]
    return model, SensitivityData(calib, val, ref, [int(y) for y in yte[:n_val]], Budget.parse("accuracy>=-1%"), None,
                        None, 0)


def test_process_pool_gives_the_serial_table_and_decisions():
    model, data = _digits_data(16)
    kw = dict(cache=MeasurementCache(enabled=False))
    serial = measure_sensitivity(model, ["prune", "svd", "quantize"], data, data.budget,
                                 executor=SerialExecutor(), **kw)
    with ProcessExecutor(2) as ex:
        pooled = measure_sensitivity(model, ["prune", "svd", "quantize"], data, data.budget, executor=ex, **kw)
    assert serial.info["measured"] == pooled.info["measured"] == len(serial.rows) > 8
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cached"} for r in rows]  # noqa: E731
    assert strip(serial.rows) == strip(pooled.rows)
    for kind in ("weight_bytes", "macs"):
        assert [s["chosen"] for s in greedy_order(serial, kind)] == [s["chosen"] for s in greedy_order(pooled, kind)]


def test_every_knob_applies_each_unit_alone():
    model, data = _digits_data(16)
    t = measure_sensitivity(model, list(knobs()), data, data.budget, cache=MeasurementCache(enabled=False))
    by = {(r["pass"], r["unit"], r["strength"]): r for r in t.rows}
    assert by[("quantize", "fc1", 1.0)]["saving"]["weight_bytes"] > 0.7 * 512 * 64 * 4
    assert by[("svd", "fc1", 0.25)]["saving"]["params"] > by[("svd", "fc1", 0.5)]["saving"]["params"] > 0
    assert by[("prune", "fc1", 0.5)]["saving"]["macs"] > by[("prune", "fc1", 0.25)]["saving"]["macs"] > 0
    # a stronger strength of the same unit loses at least as much (losses are measured, not assumed)
    assert by[("svd", "fc1", 0.25)]["loss"] >= by[("svd", "fc1", 0.5)]["loss"]
    assert by[("quantize", "fc1", 1.0)]["loss"] > 0


@pytest.fixture(scope="module")
def resnet_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("resnet")
    p = d / "resnet.onnx"
    onnx.save(resnet_small(), str(p))
    imgs = smooth_images(16, (32, 32), seed=7)
    calib = [{"input": im[None].astype(np.float32)} for im in imgs]
    return p, calib


def test_second_run_reuses_the_cache(resnet_case, tmp_path):
    """The second run measures nothing (every sensitivity row from the cache) and writes the same
    bytes. (How much time that saves depends on the machine: no timed assertion here.)"""
    path, calib = resnet_case
    cache = tmp_path / "cache"
    kw = dict(passes=["cleanup", "prune", "svd", "quantize"], data=calib, budget="cosine>=0.99", target_size=0.35,
              executor="serial", cache=str(cache), max_units=3)
    m1, r1 = optimize(str(path), tmp_path / "a.onnx", **kw)
    m2, r2 = optimize(str(path), tmp_path / "b.onnx", **kw)
    s1, s2 = r1.allocation["sensitivity"], r2.allocation["sensitivity"]
    assert s1["measured"] == s1["candidates"] > 10 and s1["cached"] == 0
    assert s2["measured"] == 0 and s2["cached"] == s1["candidates"]
    assert r2.allocation["decisions"] == [{**d, "cached": True} for d in r1.allocation["decisions"]]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert r1.budget_met and r1.after["weight_bytes"] <= 0.35 * r1.before["weight_bytes"]
    check(m1)


def test_latency_target_measures_every_candidate(tmp_path):
    """--target-latency: savings are measured latencies (noisy, so the outcome may be either way);
    the run either meets the target within the budget or fails closed with how close it came."""
    from onnxshrink.errors import BudgetError
    _, _, xte, _ = digits_split()
    calib = [{"image": x[None]} for x in xte[:16]]
    try:
        _, rep = optimize(digits_model(), None, passes=["cleanup", "svd", "quantize"], data=calib,
                          budget="cosine>=0.98", target_latency=0.9, executor="serial", cache=False)
        ok = True
    except BudgetError as e:
        rep, ok = e.report, False
    a = rep.allocation
    assert a["target"]["cost"] == "latency_ms" and a["target"]["of_input"] > 0
    measured = [r for r in a["table"] if r.get("saving")]
    assert measured and all("latency_ms" in r["saving"] for r in measured)
    assert a["trials"] and all(t["cost"]["latency_ms"] > 0 for t in a["trials"])
    assert (a["chosen_n"] is not None) == ok


def test_a_rebuilt_cached_trial_is_judged_again(resnet_case, tmp_path, monkeypatch):
    """The second run takes the chosen configuration from the cache and rebuilds it: when the rebuilt
    model no longer meets the target (here the size is inflated tenfold on rebuild), nothing is
    written and the run exits with BudgetError, never shipping the cached verdict."""
    import onnxshrink.pipeline.allocate as al
    from onnxshrink.errors import BudgetError
    path, calib = resnet_case
    kw = dict(passes=["cleanup", "prune", "svd", "quantize"], data=calib, budget="cosine>=0.99", target_size=0.35,
              executor="serial", cache=str(tmp_path / "cache"), max_units=3)
    optimize(str(path), tmp_path / "a.onnx", **kw)
    real = al.cost_of

    def inflated(model, *a, **k):
        cost = real(model, *a, **k)
        return {**cost, "weight_bytes": cost["weight_bytes"] * 10}

    monkeypatch.setattr(al, "cost_of", inflated)
    with pytest.raises(BudgetError, match="rebuilt from the measurement cache, no longer meets the cost target"):
        optimize(str(path), tmp_path / "b.onnx", **kw)
    assert not (tmp_path / "b.onnx").exists()
