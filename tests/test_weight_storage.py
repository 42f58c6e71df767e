"""Int8 storage of float weights (passes/weight_storage.py): exact dequantization, onnxruntime folds
it at load, cleanup leaves it alone, and the per-layer back-off keeps the check."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from helpers import check, normal_samples, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnxshrink.data import ListSource
from onnxshrink.graph.convert import graph_to_model
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize import QuantizeOptions, QuantizePass
from onnxshrink.passes.quantize import weight_storage as ws
from onnxshrink.pipeline.manager import optimize
from onnxshrink.pipeline.sensitivity import knobs
from onnxshrink.runtime import make_session
from onnxshrink.targets.profiles import get_target

RNG = np.random.default_rng(0)


def net():
    """Conv -> Relu -> ConvTranspose -> GAP -> Flatten -> Gemm(transB) -> MatMul."""
    inits = [nh.from_array(RNG.standard_normal((16, 3, 3, 3)).astype(np.float32), "wc"),
             nh.from_array(RNG.standard_normal(16).astype(np.float32), "bc"),
             nh.from_array((RNG.standard_normal((16, 8, 2, 2)) * 0.2).astype(np.float32), "wt"),
             nh.from_array(RNG.standard_normal((32, 8)).astype(np.float32), "wg"),
             nh.from_array(RNG.standard_normal((32, 16)).astype(np.float32), "wm"),
             nh.from_array(np.ones((16, 4), np.float32), "tiny")]
    nodes = [oh.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             oh.make_node("ConvTranspose", ["r", "wt"], ["t"], name="convt", strides=[2, 2]),
             oh.make_node("GlobalAveragePool", ["t"], ["p"], name="gap"),
             oh.make_node("Flatten", ["p"], ["f"], name="flat"),
             oh.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", transB=1),
             oh.make_node("MatMul", ["g", "wm"], ["y0"], name="mm"),
             oh.make_node("MatMul", ["y0", "tiny"], ["y"], name="mm_tiny")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_store_int8_is_exact_dequantization_and_valid():
    m = net()
    g = gs.import_onnx(m)
    cands = ws.candidates(g)
    assert sorted(cands) == ["wc", "wg", "wm", "wt"]  # "tiny" (64 elements) is not worth it
    saved = ws.store_int8(g, cands)
    out = graph_to_model(g, m)
    check(out)
    inits = {t.name: nh.to_array(t) for t in out.graph.initializer}
    assert all(inits[f"{n}.int8"].dtype == np.int8 for n in cands)
    assert saved["wc"] == 16 * 27 * 4 - 16 * 27 - 16 * 4
    # the reference: the same model with W' = Q * s (per output channel along each op's axis)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    for t in ref.graph.initializer:
        if t.name in cands:
            W = nh.to_array(t)
            axis = {"wc": 0, "wt": 1, "wg": 0, "wm": 1}[t.name]
            Q, s = ws.int8_channels(W, axis)
            assert np.all(np.abs(Q.astype(np.float32) * s - W) <= s / 2 + 1e-7)
            t.CopyFrom(nh.from_array((Q.astype(np.float32) * s).astype(np.float32), t.name))
    x = normal_samples(1, shape=(1, 3, 16, 16))[0]
    np.testing.assert_allclose(run_ort(out, x)[0], run_ort(ref, x)[0], rtol=1e-5, atol=1e-5)


def test_onnxruntime_folds_the_stored_weights_at_load(tmp_path):
    """Level-1 constant folding turns Cast x Mul into a float initializer: the kernels see a
    constant weight (float speed)."""
    m = net()
    g = gs.import_onnx(m)
    ws.store_int8(g, ws.candidates(g))
    out = graph_to_model(g, m)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Cast" not in ops and ops.count("Mul") == 0


def test_cleanup_does_not_fold_stored_weights_back():
    m = net()
    g = gs.import_onnx(m)
    ws.store_int8(g, ws.candidates(g))
    stored = graph_to_model(g, m)
    out, rep = optimize(stored, passes=["cleanup"], data=normal_samples(2, shape=(1, 3, 16, 16)))
    assert sum(n.op_type == "Cast" for n in out.graph.node) == 4
    assert rep.after["weight_bytes"] <= rep.before["weight_bytes"]
    check(out)


def test_select_within_budget_backs_off_the_most_harmful_layer():
    m = net()
    g = gs.import_onnx(m)
    cands = ws.candidates(g)
    x = normal_samples(1, shape=(1, 3, 16, 16))[0]
    y0 = run_ort(m, x)[0]

    def err_of(model):
        return float(np.abs(run_ort(model, x)[0] - y0).max())

    def changed(model, name):
        a = {t.name: nh.to_array(t) for t in model.graph.initializer}[name]
        b = {t.name: nh.to_array(t) for t in m.graph.initializer}[name]
        return not np.array_equal(a, b)

    def with_these(stored, names):
        mm = onnx.ModelProto()
        mm.CopyFrom(m)
        for t in mm.graph.initializer:
            if t.name in names:
                t.CopyFrom(nh.from_array(stored[t.name], t.name))
        return mm

    def losses(score):  # the scorer: the loss of the model with a group of weights stored
        return lambda stored: lambda names: score(with_these(stored, names))

    # the conv's weights alone cost the most, and the check refuses them: everything else is kept
    # (the longest prefix by loss per byte), the conv stays float
    keep, log = ws.select_within_budget(m, cands, lambda mm: not changed(mm, "wc"),
                                        losses(lambda mm: 1.0 if changed(mm, "wc") else 1e-3 * err_of(mm)))
    assert sorted(keep) == ["wg", "wm", "wt"] and "broke the check" in log["checked"]
    # searched from the top: all but the last of the ranking held at the first try
    assert log["bisection"] == [{"stored": 4, "holds": False}, {"stored": 3, "holds": True}]
    # a check that holds with at most one stored: all but 1, all but 2 (3 -> 1: holds), then the bisection
    keep_one, log_one = ws.select_within_budget(m, cands, lambda mm: sum(changed(mm, n) for n in cands) <= 1,
                                                losses(err_of))
    assert len(keep_one) == 1
    assert [(t["stored"], t["holds"]) for t in log_one["bisection"]] == [(4, False), (3, False), (1, True),
                                                                         (2, False)]
    keep_all, log_all = ws.select_within_budget(m, cands, lambda mm: True, losses(err_of))
    assert sorted(keep_all) == sorted(cands) and "holds" in log_all["checked"]
    # the model with none stored breaks the check itself: no stored set is searched for (no scoring,
    # no bisection), none is stored; asked only once storing every weight failed
    asked, scored = [], []
    keep_none, log_none = ws.select_within_budget(m, cands, lambda mm: False,
                                                  lambda stored: scored.append(1) or (lambda names: 0.0),
                                                  none_holds=lambda: asked.append(1) or False)
    assert keep_none == [] and asked == [1] and scored == [] and "none stored" in log_none["checked"]
    keep_all, _ = ws.select_within_budget(m, cands, lambda mm: True, losses(err_of),
                                          none_holds=lambda: asked.append(2) or False)
    assert sorted(keep_all) == sorted(cands) and asked == [1]
    # none_holds true: the search goes on as without it
    keep, log = ws.select_within_budget(m, cands, lambda mm: not changed(mm, "wc"),
                                        losses(lambda mm: 1.0 if changed(mm, "wc") else 1e-3 * err_of(mm)),
                                        none_holds=lambda: True)
    assert sorted(keep) == ["wg", "wm", "wt"]


def test_group_losses_isolate_the_harmful_weights_in_few_measurements():
    """Additive losses over 64 weights, two of which cost far more than the rest: splitting groups
    finds both exactly (the ranking's tail, where the search cuts it) in far fewer than 64
    measurements; the small ones share their group's loss by bytes; a group of one is never split."""
    names = [f"w{i:02d}" for i in range(64)]
    own = {n: 1e-5 for n in names}
    own["w05"], own["w40"] = 0.08, 0.01
    nbytes = {n: 400 for n in names}
    calls = []

    def group_loss(grp):
        calls.append(list(grp))
        return sum(own[n] for n in grp)

    losses, measured = ws.group_losses(names, group_loss, nbytes)
    assert measured == len(calls) < 30
    assert losses["w05"] == pytest.approx(0.08) and losses["w40"] == pytest.approx(0.01)
    assert sorted(names, key=lambda n: -losses[n])[:2] == ["w05", "w40"]
    assert sum(losses.values()) == pytest.approx(sum(own.values()))
    assert all(len(c) >= 1 for c in calls)
    # a known total is not measured again; nothing harmful: nothing is split
    calls.clear()
    flat, m0 = ws.group_losses(names, group_loss, nbytes, total=0.0)
    assert m0 == 0 and not calls and set(flat.values()) == {0.0}


def test_overridable_weights_score_each_stored_weight_like_its_own_model():
    """One session with overridable weights gives each layer's loss as a model with that weight
    replaced would: the fed value is used, the other weights keep their initializers."""
    m = net()
    cands = ws.candidates(gs.import_onnx(m))
    x = normal_samples(1, shape=(1, 3, 16, 16))[0]
    sess = make_session(ws.overridable_weights(m, list(cands)), optimize=True)
    y0 = run_ort(m, x)[0]
    np.testing.assert_allclose(sess.run(None, x)[0], y0, rtol=1e-5, atol=1e-6)
    for name in cands:
        w = nh.to_array(next(t for t in m.graph.initializer if t.name == name))
        w2 = (w * 1.5).astype(w.dtype)
        alone = onnx.ModelProto()
        alone.CopyFrom(m)
        next(t for t in alone.graph.initializer if t.name == name).CopyFrom(nh.from_array(w2, name))
        got = sess.run(None, {**x, name: w2})[0]
        np.testing.assert_allclose(got, run_ort(alone, x)[0], rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, y0, rtol=1e-3, atol=1e-4)  # the fed value was used


def test_quantize_knob_strengths_map_to_exclude_and_float_weights():
    m = net()
    knob = knobs()["quantize"]
    assert knob.strengths == (0.5, 0.75, 1.0, 1.25)  # 0.75, 1.25: dynamic int8 (8- or 6-bit weights), MatMul/Gemm
    assert {u for u, _ in knob.units(m, None)} == {"conv", "convt", "gemm", "mm", "mm_tiny"}
    o = knob.options(m, {"conv": 1.0, "gemm": 0.5})
    assert o["fallback"] == "int8"
    assert o["exclude"] == ["convt", "gemm", "mm", "mm_tiny"]
    assert o["float_weights"] == ["convt", "mm", "mm_tiny"]
    assert "dynamic_nodes" not in o
    o = knob.options(m, {"conv": 1.0, "mm": 0.75})
    assert o["dynamic_nodes"] == ["mm"] and "mm" not in o["exclude"] and "mm" not in o["float_weights"]


def test_quantize_with_everything_excluded_stores_weights_without_calibrating():
    m = net()
    out, rep = optimize(m, passes=[{"quantize": {"exclude": ["conv", "convt", "gemm", "mm", "mm_tiny"],
                                                 "fallback": "int8", "guard": False}}],
                        data=normal_samples(4, shape=(1, 3, 16, 16)))
    rec = rep.passes[0]
    assert rec.status == "applied" and rec.stats["float_weights"]["stored"] == 4
    assert "calibrate" not in rec.stats["timings_s"]
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    check(out)


def test_auto_storage_only_without_a_target_or_for_cpu_and_openvino():
    """EP profiles are checked op by op, and the ORT-format converter folds the Casts back: both keep
    float weights float; the cpu and openvino targets store them (both runtimes fold them at load)."""
    m = net()
    opts = {"exclude": ["conv", "convt", "gemm", "mm", "mm_tiny"], "guard": False}
    data = normal_samples(4, shape=(1, 3, 16, 16))
    for target, stored in (("cpu", True), ("openvino", True), ("xnnpack", False), ("cpu+ort", False)):
        g = gs.import_onnx(m)
        ctx = Context(calib=ListSource(data), val=None, reference=None, budget=None, seed=0, template=m,
                      target=get_target(target))
        res = QuantizePass(QuantizeOptions(**opts)).run(g, ctx)
        assert res.modified is stored, target
        if not stored:
            assert res.stats["float_weights"]["mode"] == "float"


def test_float_result_keeps_the_input_opset():
    """Every node kept float on an opset-11 model: the weights are stored int8 and the opset stays
    11 (the upgrade to 13 is only for per-channel DequantizeLinear)."""
    m = net()
    m.opset_import[0].version = 11
    out, rep = optimize(m, passes=[{"quantize": {"exclude": ["conv", "convt", "gemm", "mm", "mm_tiny"],
                                                 "fallback": "int8", "guard": False}}],
                        data=normal_samples(4, shape=(1, 3, 16, 16)))
    assert rep.passes[0].status == "applied"
    assert out.opset_import[0].version == 11 and sum(n.op_type == "Cast" for n in out.graph.node) == 4
    check(out)


def _low_rank_matmul():
    """y = x @ W with W of rank 4 (16 x 16): inputs in W's left null space give small outputs that
    the weights' int8 rounding error (full rank) swamps."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((16, 4)), rng.standard_normal((4, 16))
    w = (a @ b).astype(np.float32)
    m = oh.make_model(oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, [1, 16])], [oh.make_tensor_value_info("y", TP.FLOAT, [1, 16])],
        [nh.from_array(w, "w")]), opset_imports=[oh.make_opsetid("", 17)])
    null = np.linalg.svd(a.T)[2][4:]  # rows x with x @ a = 0
    return m, rng, null


def _low_rank_then_dense():
    """``_low_rank_matmul`` followed by a dense 16 x 16 MatMul ``mm2`` (weight ``w2``)."""
    m, rng, null = _low_rank_matmul()
    w2 = nh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w2")
    m.graph.initializer.append(w2)
    m.graph.node[0].output[0] = "h"
    m.graph.node.append(oh.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"))
    return m, rng, null


def test_stored_weights_also_hold_on_the_calibration_samples():
    """Storing a weight int8 uses no data statistic, so the calibration samples check it too: here
    the 8 selection samples are ordinary and every stored weight holds there, but two of the 16
    calibration samples (in the weight's null space) break the budget, so the weight stays float."""
    m, rng, null = _low_rank_matmul()
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    for i in (2, 6):  # calibration samples (of every four, the 1st and 3rd calibrate)
        samples[i] = {"x": (null[i % 12] + 0.001 * rng.standard_normal(16)).astype(np.float32)[None]}
    stored_w = nh.to_array(m.graph.initializer[0])
    q, s = ws.int8_channels(stored_w, 1)
    w_int8 = (q.astype(np.float32) * s).astype(np.float32)
    def cosine(x):
        y, y8 = (x @ stored_w).ravel(), (x @ w_int8).ravel()
        return float(y @ y8 / np.linalg.norm(y) / np.linalg.norm(y8))

    cos = [cosine(d["x"]) for d in samples]
    assert min(cos[1::4]) > 0.999 and np.mean([cos[i] for i in range(32) if i % 4 in (0, 2)]) < 0.99, cos
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["mm"]}}], data=samples, budget="cosine>=0.99")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["stored"] == 0 and "16 calibration samples" in fw["also_checked_on"], fw


def test_a_failed_calibration_check_names_the_harmful_weight_and_keeps_it_float():
    """Two weights, of which only the low-rank one breaks the budget on two calibration samples
    (in its null space): storing both fails the calibration check, the group scoring reads the two
    worst samples from that check and isolates the low-rank weight, which alone stays float."""
    m, rng, null = _low_rank_then_dense()
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    for i in (2, 6):  # calibration samples (of every four, the 1st and 3rd calibrate)
        # scaled up: the stored weight's error stands out of the output's scale (not a silent sample)
        samples[i] = {"x": (20 * null[i % 12] + 0.02 * rng.standard_normal(16)).astype(np.float32)[None]}
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["mm", "mm2"]}}], data=samples,
                      budget="cosine>=0.99")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["stored"] == 1 and "broke the check" in fw["checked"], fw
    # nothing could be integer, so nothing was calibrated: the check ran the float model itself
    assert fw["also_checked_on"].endswith("(storing weights uses no data statistic)")
    assert list(fw["most_sensitive"])[0] == "w" and fw["most_sensitive"]["w"] > 10 * fw["most_sensitive"]["w2"]
    assert fw["scored"] == "3 group measurements for 2 weights"
    assert fw["bisection"] == [{"stored": 2, "holds": False}, {"stored": 1, "holds": True}]


def test_a_tiny_saving_is_not_worth_the_check():
    """``auto`` checks a stored set only when it saves at least ``MIN_CHECKED_SAVING`` of the model's
    weight bytes: a small float-kept MatMul beside a big integer one is left float, with the reason,
    and no check runs; ``fallback=int8`` stores it unchecked."""
    from onnxshrink.passes.quantize import fallback as fb

    rng = np.random.default_rng(3)
    big = nh.from_array(rng.standard_normal((512, 512)).astype(np.float32), "big")
    small = nh.from_array(rng.standard_normal((512, 8)).astype(np.float32), "small")
    g = oh.make_graph([oh.make_node("MatMul", ["x", "big"], ["h"], name="mm_big"),
                       oh.make_node("MatMul", ["h", "small"], ["y"], name="mm_small")], "g",
                      [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 512])],
                      [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], [big, small])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    samples = [{"x": rng.standard_normal((1, 512)).astype(np.float32)} for _ in range(24)]
    opts = {"dynamic": "off", "guard": False}  # static int8 for mm_big whatever its speed
    assert 8 * 512 * 3 < fb.MIN_CHECKED_SAVING * 4 * 512 * (512 + 8)  # the small weight's saving is under it
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["mm_small"], **opts}}], data=samples, budget="cosine>=0.99")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["stored"] == 0 and "not worth the check" in fw["why"] and "checked" not in fw, fw
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["mm_small"], "fallback": "int8", **opts}}], data=samples,
                      budget="cosine>=0.99")
    assert rep.passes[0].stats["float_weights"]["stored"] == 1


def test_the_float_model_is_not_measured_before_its_weights_are_stored(monkeypatch):
    """No placement kept (every unit excluded): the plan is the float model, whose scores are the
    original's on the same samples, so the fidelity check measures only models with stored weights."""
    from onnxshrink.passes.quantize.guard import FidelityCheck
    m = net()
    float_w = {t.name: nh.to_array(t) for t in m.graph.initializer if t.name in ("wc", "wt", "wg", "wm")}
    measured = []  # per model measured: how many of the 4 weights hold their float values
    real = FidelityCheck.measure

    def measure(self, g):
        model = g if isinstance(g, onnx.ModelProto) else self.ctx.to_model(g)
        inits = {t.name: t for t in model.graph.initializer}
        measured.append(sum(n in inits and np.array_equal(nh.to_array(inits[n]), w) for n, w in float_w.items()))
        return real(self, model)
    monkeypatch.setattr(FidelityCheck, "measure", measure)
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["conv", "convt", "gemm", "mm", "mm_tiny"]}}],
                      data=normal_samples(32, shape=(1, 3, 16, 16)), budget="cosine>=0.99")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["stored"] == 4 and fw["checked"] == "all 4 stored: holds", fw
    assert measured == [0]  # one check: the model with the 4 weights as stored (Q x s), none float


def test_a_plan_failing_the_calibration_check_itself_stores_nothing_without_a_search(monkeypatch):
    """An integer plan whose float-kept weights break the calibration check when all stored is checked
    there with none stored; failing too, none is stored without scoring the weights or bisecting.
    Stand-in check: every model fails it; it sees the all-stored model, then the plan itself."""
    from onnxshrink.passes.quantize import fallback

    seen = []

    def failing(self, m, record=True):
        seen.append(sum(n.op_type == "Cast" for n in m.graph.node))
        return False
    monkeypatch.setattr(fallback._CalibrationCheck, "__call__", failing)
    m = net()
    data = normal_samples(24, shape=(1, 3, 16, 16))
    out, rep = optimize(m, passes=[{"quantize": {"exclude": ["convt", "gemm", "mm"], "guard": False}}], data=data,
                        budget="cosine>=0.5")
    q = rep.passes[0]
    fw = q.stats["float_weights"]
    assert q.stats["quantized_units"]["weighted"] == 1, q.stats  # the conv int8: an integer plan
    assert seen == [3, 0] and fw["stored"] == 0 and "so does the model with none stored" in fw["checked"], (seen, fw)
    assert "scored" not in fw and "bisection" not in fw
    assert not any(n.op_type == "Cast" for n in out.graph.node)


def test_a_stored_set_holding_the_mean_only_by_a_tail_keeps_the_harmful_weight_float():
    """The verdict judges the mean of 8 test samples: one calibration sample in the low-rank weight's
    null space (cosine about 0.92 with every weight stored) leaves the calibration mean above 0.99
    but the lower prediction bound of an 8-sample test mean (mean - 1.645 sd sqrt(1/16 + 1/8)) below
    it, so storing both weights is refused and the low-rank one stays float; the kept set's bound holds."""
    m, rng, null = _low_rank_then_dense()
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    v = np.ones(16) - null.T @ (null @ np.ones(16))  # a direction the low-rank weight does not null
    samples[2] = {"x": (20 * null[0] + 0.1 * v / np.linalg.norm(v)).astype(np.float32)[None]}  # calibration
    _, rep = optimize(m, passes=[{"quantize": {"exclude": ["mm", "mm2"]}}], data=samples,
                      budget="cosine>=0.99")
    fw = rep.passes[0].stats["float_weights"]
    assert fw["tail_refused"] >= 1 and fw["stored"] == 1, fw
    assert fw["bisection"] == [{"stored": 2, "holds": False}, {"stored": 1, "holds": True}]
    assert list(fw["most_sensitive"])[0] == "w"
    assert fw["tail"]["lower_bound"] >= 0.99 and fw["tail"]["verdict_samples"] == 8
