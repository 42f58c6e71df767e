"""Work the allocation shares between its measurements, and that sharing it changes nothing: the
proxy capture's batched Gram products (``proxy.GramRows``), the trials' chain memo
(``allocate.ChainMemo``: a step an earlier trial ran is taken from it) and quantize's calibration and
SmoothQuant maxima kept in ``ctx.cache`` for the same float model (``quantize_pass.cached_ranges``),
and the evaluation's batched runs (``sensitivity.batched_outputs``)."""

from __future__ import annotations

import numpy as np
import onnx

import onnxshrink.passes.quantize.quantize_pass as qp
import onnxshrink.pipeline.allocate as al
import onnxshrink.pipeline.sensitivity as sens
from models.build import vit_encoder
from onnxshrink.data import ListSource
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize.calibrate import CalibrationSamples, calibrate_ranges
from onnxshrink.passes.quantize.quantize_pass import QuantizeOptions, cached_ranges
from onnxshrink.pipeline.manager import optimize
from onnxshrink.pipeline.proxy import GRAM_ROWS, GramRows, capture_layer_stats
from onnxshrink.pipeline.sensitivity import apply_pass
from onnxshrink.runtime import capture_activations, make_session
from tests.helpers import model_samples, small_vit


def _samples(n, seed=3):
    return model_samples(small_vit(), n, seed)


def test_gram_rows_sum_every_row_once():
    """Blocks of 17 rows (a few per product, one left over at the end): the sum of x x^T of every
    row, to float64 round-off."""
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((17, 40)).astype(np.float32) for _ in range(2 * GRAM_ROWS // 17 + 3)]
    g = GramRows()
    for b in blocks:
        g.add(b)
    want = sum(b.astype(np.float64).T @ b.astype(np.float64) for b in blocks)
    assert g.result().dtype == np.float64
    np.testing.assert_allclose(g.result(), want, rtol=1e-12, atol=1e-9)
    assert GramRows().result() is None


def test_proxy_capture_covariance_is_the_per_sample_sum():
    """The captured input covariance of every MatMul equals the mean of x x^T over every token of
    every sample, computed directly from the captured activations."""
    model, xs = small_vit(), _samples(6)
    stats = capture_layer_stats(model, xs, None)
    mm = {k: L for k, L in stats.items() if L.node.op_type == "MatMul"}
    assert len(mm) >= 4
    names = [L.node.input[0] for L in mm.values()]
    sums = {n: 0.0 for n in names}
    rows = {n: 0 for n in names}
    for acts in capture_activations(model, names, xs):
        for n in names:
            x = np.asarray(acts[n], np.float64).reshape(-1, acts[n].shape[-1])
            sums[n] = sums[n] + x.T @ x
            rows[n] += x.shape[0]
    for L in mm.values():
        np.testing.assert_allclose(L.cov, sums[L.node.input[0]] / rows[L.node.input[0]], rtol=1e-10, atol=1e-12)


def _allocated(monkeypatch, memo: bool):
    with monkeypatch.context() as mp:
        mp.setattr(al, "speed_verdict", lambda a, b, feeds: {
            "speedup": 2.0, "interval": [2.0, 2.0], "ms": [2.0, 1.0], "rounds": 0, "faster": True})
        if not memo:
            mp.setattr(al.ChainMemo, "step", lambda self, chain: None)
            mp.setattr(al.ChainMemo, "pass_cache", lambda self, step_input, pass_name: {})
        out, rep = optimize(small_vit(), passes=["cleanup", "prune", "svd", "quantize"], data=_samples(16),
                            budget="cosine>=0.98", target_size=0.25, sensitivity="proxy", executor="serial",
                            cache=False, speed="off")
    a = rep.allocation
    trials = [(t["n"], t["cost"]["weight_bytes"], t["cosine"], t["budget_ok"], t["target_met"]) for t in a["trials"]]
    return trials, a["reused_steps"], out.SerializeToString(deterministic=True)


def test_chain_memo_gives_the_bytes_of_running_every_step(monkeypatch):
    """The allocated pipeline on a 1-block encoder (proxy sensitivity, the quantize closure timed as
    faster so its variant is written): with the chain memo the closure's variants take the prune
    and svd steps of the configuration they extend (``reused_steps``); the trials' figures and the
    written bytes are those of running every step of every trial (the memo switched off)."""
    trials, reused, written = _allocated(monkeypatch, memo=True)
    assert any("+" in str(t[0]) for t in trials), trials  # the closure ran variants
    assert reused >= 1  # the memo took a step (which ones depend on the configurations the closure extends)
    trials0, reused0, written0 = _allocated(monkeypatch, memo=False)
    assert reused0 == 0
    assert trials == trials0
    assert written == written0


def test_cached_ranges_calibrate_each_tensor_once(monkeypatch):
    """Ranges of a superset, then of a subset and a new tensor, of the same float model through one
    ``ctx.cache``: only the new tensor is calibrated again, and every range equals a fresh
    calibration's; a changed model (other weights) misses."""
    model, xs = small_vit(), _samples(4)
    tensors = sorted({n.output[0] for n in model.graph.node if n.op_type in ("MatMul", "Add")})[:8]
    calls = []

    def counting(m, names, *args, **kw):
        calls.append(list(names))
        return calibrate_ranges(m, names, *args, **kw)

    monkeypatch.setattr(qp, "calibrate_ranges", counting)
    ctx = Context(calib=ListSource(xs), val=ListSource(xs), template=model)
    samples = CalibrationSamples(ctx.calib, ctx.val)
    o = QuantizeOptions()
    first = cached_ranges(ctx, model, tensors[:6], samples, o, 256)
    second = cached_ranges(ctx, model, tensors[2:], samples, o, 256)
    assert calls == [tensors[:6], tensors[6:]]
    fresh = calibrate_ranges(model, tensors, samples, o.calibrator, levels=256)
    assert {**first, **second} == fresh
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = other.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 2, w.name))
    cached_ranges(ctx, other, tensors[:2], samples, o, 256)
    assert calls[-1] == tensors[:2]


def test_quantize_again_on_the_same_graph_reuses_its_calibration(monkeypatch):
    """quantize (QDQ and SmoothQuant on a LayerNorm encoder) run twice through one ``ctx.cache``, as
    a closure's variants are: the second run calibrates nothing and captures nothing, and both write
    the bytes a run with a fresh cache writes."""
    model, xs = small_vit(), _samples(4)
    captured = []
    real_capture = qp.capture_activations
    monkeypatch.setattr(qp, "capture_activations", lambda *a, **k: (captured.append(1), real_capture(*a, **k))[1])
    calls = []
    real_cal = qp.calibrate_ranges
    monkeypatch.setattr(qp, "calibrate_ranges", lambda *a, **k: (calls.append(1), real_cal(*a, **k))[1])
    opts = {"guard": False, "smooth": 0.5}

    source = ListSource(xs)  # the allocation's trials share the context's samples

    def run(cache):
        ctx = Context(calib=source, val=source, template=model, cache=cache)
        out, reason = apply_pass(model, "quantize", opts, ctx)
        assert not reason
        return out.SerializeToString(deterministic=True)

    shared: dict = {}
    a = run(shared)
    n_cal, n_cap = len(calls), len(captured)
    assert n_cal == 1 and n_cap == 1
    b = run(shared)
    assert (len(calls), len(captured)) == (n_cal, n_cap)
    assert a == b == run({})


class _CountingSession:
    def __init__(self, sess):
        self.sess, self.runs = sess, 0

    def __getattr__(self, name):
        return getattr(self.sess, name)

    def run(self, names, feeds):
        self.runs += 1
        return self.sess.run(names, feeds)


def _batched(monkeypatch, model, xs):
    made = []

    def counting(m, **kw):
        made.append(_CountingSession(make_session(m, **kw)))
        return made[-1]

    monkeypatch.setattr(sens, "make_session", counting)
    out = sens.batched_outputs(model, iter(xs))
    return out, made[0].runs


def _one_by_one(model, xs):
    sess = make_session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, x) for x in xs]


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(p, q) for x, y in zip(a, b) for p, q in zip(x, y))


def test_batched_outputs_are_the_one_by_one_outputs(monkeypatch):
    """A ViT exported with a symbolic batch: 20 samples in 5 runs (2 alone, the pair stacked as the
    check, then 16 and 2 stacked), bit for bit the outputs of 20 single runs; the same ViT with its
    batch fixed at 1 runs them one by one (20 runs), with the same outputs."""
    xs = _samples(20)
    dyn = vit_encoder(depth=1, dim=64, heads=4, hw=32, patch=8, dynamic_batch=True)
    out, runs = _batched(monkeypatch, dyn, xs)
    assert runs == 5 and _equal(out, _one_by_one(dyn, xs))
    fixed = small_vit()
    out, runs = _batched(monkeypatch, fixed, xs)
    assert runs == 20 and _equal(out, _one_by_one(fixed, xs))


def test_batched_outputs_check_the_stacked_run_before_trusting_it(monkeypatch):
    """A model that mixes its samples when stacked (it subtracts the batch mean: 0 for one sample
    alone) declares a symbolic batch: the check of the first pair sees the difference and every
    sample runs alone (2 + 1 + 18 runs), giving the one-by-one outputs."""
    from onnx import TensorProto, helper
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
         helper.make_node("Sub", ["x", "m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    xs = [{"x": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32)} for i in range(20)]
    out, runs = _batched(monkeypatch, model, xs)
    assert runs == 21 and _equal(out, _one_by_one(model, xs))
    assert all(not np.any(o[0]) for o in out)  # each sample alone: minus its own mean


def test_a_closure_trial_missing_the_target_by_its_bytes_is_not_measured(monkeypatch):
    """``Trials.verify(decide_on_cost=True)`` (the closure's question: budget kept *and* target met)
    on a built model whose weight bytes miss the target: decided without running its fidelity or its
    latency, reported as not measured; a configuration meeting the target, and any
    trial asked without ``decide_on_cost``, is measured in full."""
    from onnxshrink.metrics import Budget
    from onnxshrink.pipeline.report import PassRecord
    from onnxshrink.pipeline.sensitivity import SensitivityTable

    model, xs = small_vit(), _samples(4)
    ref = _one_by_one(model, xs)
    nbytes = sum(t.ByteSize() for t in model.graph.initializer)
    config = al.AllocationConfig(targets=[("weight_bytes", 0.5)], passes=[], budget=Budget.parse("cosine>=0.99"),
                                 cache=False)
    runner = al.Runner(run_pass=None, labels=None)
    table = SensitivityTable(base_cost={"weight_bytes": float(nbytes)}, base_scores={}, rows=[])

    def trials_for(absolute):
        target = al.Target("weight_bytes", absolute, float(nbytes), ["weight_bytes"], {}, {}, {})
        t = al.Trials(config, runner, model, Context(calib=ListSource(xs), val=ListSource(xs), template=model),
                      ListSource(xs), ref, None, table, [], target, {"trials": []}, xs[0])
        t.extra.update({"a": {("quantize", "x"): 1.0}})
        monkeypatch.setattr(t, "run_chain", lambda chosen: (model, [PassRecord(name="quantize", status="applied")]))
        evaluated = []
        real = t.evaluate
        monkeypatch.setattr(t, "evaluate", lambda m: (evaluated.append(1), real(m))[1])
        return t, evaluated

    missed, evaluated = trials_for(0.5 * nbytes)
    r = missed.verify("a", decide_on_cost=True)
    assert r["decided"] and r["budget_ok"] is None and not r["target_met"] and not evaluated
    assert "latency_ms" not in r["cost"] and missed.alloc["trials"][-1]["cosine"] is None
    r = missed.verify("a")  # the budget asked for: measured now
    assert not r.get("decided") and r["budget_ok"] is True and evaluated == [1] and "latency_ms" in r["cost"]
    met, evaluated = trials_for(2.0 * nbytes)
    r = met.verify("a", decide_on_cost=True)
    assert r["budget_ok"] is True and r["target_met"] and evaluated == [1]


def test_batched_outputs_need_the_batch_named_alike_on_inputs_and_outputs(monkeypatch):
    """An output whose first dimension has another name than the inputs' may not be the batch: the
    samples run one by one (20 runs), even though stacking would work for this model."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    xs = [{"x": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32)} for i in range(20)]
    out, runs = _batched(monkeypatch, model, xs)
    assert runs == 20 and _equal(out, _one_by_one(model, xs))


def test_chain_memo_keeps_small_pass_caches_and_drops_large_ones():
    """A pass run again on the same step input gets the cache its first run filled while that holds
    at most ``cache_bytes`` of arrays; a larger one (svd's covariances of wide layers) is dropped after
    the run, and the next run starts empty. Other step inputs get their own caches."""
    memo = al.ChainMemo(cache_bytes=1000)
    small = memo.pass_cache("in", "quantize")
    small["ranges"] = {"t": (0.0, 1.0), "w": np.zeros(10)}
    memo.settle("in", "quantize")
    assert memo.pass_cache("in", "quantize") is small
    assert memo.pass_cache("other", "quantize") == {}
    big = memo.pass_cache("in", "svd")
    big["cov"] = (np.zeros((20, 20)),)  # 3200 bytes
    memo.settle("in", "svd")
    again = memo.pass_cache("in", "svd")
    assert again is not big and again == {}
