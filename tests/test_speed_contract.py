"""The speed contract of the cpu target (issue 15, "One speed contract"; docs/errors.md).

The slow result here is int8 forced (``quantize.guard=false``) onto a chain of 24 tiny MatMul+Tanh
layers: the Q/DQ overhead dwarfs the arithmetic, so it runs at about 0.5x the input's speed, far
outside ``runtime.compare_speed``'s 3 % margin even on a loaded 2-core machine. The test session's
default policy is "off" (tests/conftest.py); every test here names its policy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from models.build import mlp, transformer_block
from onnxshrink.errors import BudgetError, UsageError
from onnxshrink.pipeline.manager import optimize
from onnxshrink.pipeline.settings import Settings, speed_policy
from tests.helpers import model_samples

ROOT = Path(__file__).resolve().parents[1]
FORCED_INT8 = {"quantize": {"guard": False}}


def tiny_chain(layers: int = 24, width: int = 8) -> onnx.ModelProto:
    """x[1, width] -> (MatMul -> Tanh) x layers -> y: microseconds of arithmetic per layer."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes += [onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  onnx.helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        x = f"t{i}"
    nodes.append(onnx.helper.make_node("Identity", [x], ["y"]))
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                      [1, width])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, width])],
                                   weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_default_policy_is_never_slower(monkeypatch):
    monkeypatch.delenv("ONNXSHRINK_SPEED", raising=False)
    assert Settings().speed is None
    assert speed_policy(None) == "never-slower"
    monkeypatch.setenv("ONNXSHRINK_SPEED", "report")
    assert speed_policy(None) == "report"
    assert speed_policy("never-slower") == "never-slower"  # a given policy wins over the environment
    monkeypatch.setenv("ONNXSHRINK_SPEED", "fastest")
    with pytest.raises(UsageError, match="never-slower"):
        speed_policy(None)


def test_a_slower_pass_is_rolled_back_and_the_lossless_ones_kept():
    model = tiny_chain()
    out, rep = optimize(model, passes=["cleanup", FORCED_INT8, "fold"], data=model_samples(model), speed="never-slower",
                        budget="none")
    status = {r.name: r.status for r in rep.passes}
    assert status["quantize"] == "rolled back"
    assert "speed contract" in next(r.reason for r in rep.passes if r.name == "quantize")
    assert status["cleanup"] != "rolled back"
    assert "QuantizeLinear" not in _ops(out) and "DequantizeLinear" not in _ops(out)
    assert rep.speed["contract"] == "enforced"
    assert [r["passes"] for r in rep.speed["rolled_back"]] == [["quantize"]]
    assert rep.speed["rolled_back"][0]["interval"][1] < 1.0  # the timing behind the decision is reported
    assert rep.speed["verdict"] == "not slower"


def test_lossless_passes_after_the_rolled_back_one_run_again():
    model = tiny_chain()
    _, rep = optimize(model, passes=[FORCED_INT8, "cleanup"], data=model_samples(model), speed="never-slower",
                      budget="none")
    cleanup = next(r for r in rep.passes if r.name == "cleanup")
    assert next(r.status for r in rep.passes if r.name == "quantize") == "rolled back"
    assert cleanup.reason.startswith("run again after rolling back quantize")
    assert cleanup.status != "rolled back"


def test_a_file_input_is_released_and_read_again_when_the_contract_goes_back_to_it(tmp_path):
    """An input read from a file is kept as a weightless skeleton once a pass replaced it (one model less
    at every later peak); when the contract rolls back to the input (quantize, the first step, is
    slower), the input comes back whole from its file, with the shapes ``--input-shape`` fixed, and the
    lossless pass after it runs on it again."""
    from onnxshrink.pipeline.manager import PassManager

    model = tiny_chain(width=32)  # weights of 4 kB: past the skeleton's 1 kB threshold
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # fixed again by input_shapes
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    fixed = onnx.load(str(src))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    pm = PassManager([FORCED_INT8, "cleanup"], data=model_samples(fixed), speed="never-slower", budget="none",
                     input_shapes={"x": [1, 32]})
    out, rep = pm.run(src)
    assert pm._original_released
    assert not pm.original.graph.initializer[0].raw_data  # the skeleton: no weights kept
    assert next(r.status for r in rep.passes if r.name == "quantize") == "rolled back"
    assert next(r for r in rep.passes if r.name == "cleanup").reason.startswith("run again after rolling back")
    assert "QuantizeLinear" not in _ops(out)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the input shapes held
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for t in model.graph.initializer:
        np.testing.assert_array_equal(weights[t.name], onnx.numpy_helper.to_array(t))


def test_report_policy_keeps_the_slower_result_and_warns():
    model = tiny_chain()
    out, rep = optimize(model, passes=["cleanup", FORCED_INT8], data=model_samples(model), speed="report",
                        budget="none")
    assert next(r.status for r in rep.passes if r.name == "quantize") == "applied"
    assert "QuantizeLinear" in _ops(out)
    assert rep.speed["verdict"] == "slower" and rep.speed["contract"].startswith("waived")
    assert any("slower than the input" in w for w in rep.warnings)


def test_off_policy_does_not_time():
    model = mlp()
    _, rep = optimize(model, passes=["cleanup", FORCED_INT8], data=model_samples(model), speed="off")
    assert rep.speed == {}


def test_a_size_only_target_waives_the_contract_unless_enforced():
    model = transformer_block()
    passes = [{"quantize": {"weights_only": "int4"}}]
    _, rep = optimize(model, passes=passes, data=model_samples(model), speed="never-slower", budget="none",
                      target_size=0.9, enforce_speed=False)
    assert rep.speed["contract"].startswith("waived (a size-only target")
    assert any(r.name == "quantize" and r.status in ("applied", "backed off") for r in rep.passes)


def test_nothing_left_to_roll_back_is_exit_4(monkeypatch):
    """A result still slower with every pass rolled back is refused, nothing written. Here the
    target's own preparation (opset 11 -> 13 for the cpu profile) is what remains, and a stand-in
    timing always says "slower"."""
    from onnxshrink.pipeline import manager
    from onnxshrink.runtime import SpeedComparison

    def always_slower(a, b, feeds, **kw):
        return SpeedComparison(speedup=0.5, low=0.45, high=0.55, t_a=1.0, t_b=2.0, rounds=30)

    monkeypatch.setattr(manager, "compare_speed", always_slower)
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    with pytest.raises(BudgetError, match="with every pass rolled back"):
        optimize(model, passes=["cleanup"], data=model_samples(model), speed="never-slower", target="cpu")


def test_cli_speed_flag(tmp_path):
    model = tiny_chain()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib"
    calib.mkdir()
    for k, s in enumerate(model_samples(model)):
        np.savez(calib / f"{k:03d}.npz", **s)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ONNXSHRINK_SPEED")
    bad = subprocess.run([sys.executable, "-m", "onnxshrink", "optimize", str(src), str(out), "--speed", "fastest"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "never-slower" in bad.stderr and not out.exists()
    report = tmp_path / "r.json"
    ok = subprocess.run([sys.executable, "-m", "onnxshrink", "optimize", str(src), str(out), "--passes",
                         "cleanup,quantize", "-o", "quantize.guard=false", "--calib", str(calib), "--budget", "none",
                         "--report", str(report), "-q"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "QuantizeLinear" not in _ops(onnx.load(out))  # the default policy rolled the forced int8 back


def test_past_2gb_a_slower_result_undoes_every_pass_at_once(monkeypatch):
    """Past 2 GB (``model.is_large`` made to say so for a tiny model) no earlier model is kept, but the
    result is still timed against the input: when it is clearly slower every pass is undone together
    and the input itself is the output, each applied pass saying why."""
    from onnxshrink import model as model_io

    monkeypatch.setattr(model_io, "is_large", lambda m: True)
    model = tiny_chain()
    out, rep = optimize(model, passes=["cleanup", FORCED_INT8], data=model_samples(model), speed="never-slower",
                        budget="none")
    assert rep.speed["contract"] == "enforced" and rep.speed["verdict"] == "not slower"
    undone = rep.speed["rolled_back"]
    assert len(undone) == 1 and "quantize" in undone[0]["passes"] and undone[0]["speedup"] < 1.0
    assert all(r.status != "applied" for r in rep.passes)
    assert "past 2 GB" in next(r for r in rep.passes if r.name == "quantize").reason
    assert "QuantizeLinear" not in _ops(out) and _ops(out) == _ops(model)


class _StandInTimer:
    """Stand-in for runtime's timers: model ``a`` takes ``ms`` per run, ``b`` ``ratio``-times less in every
    round, with a deterministic spread of +-``spread`` around it; counts the rounds timed."""

    def __init__(self, ratio: float, spread: float, ms: float = 50.0):
        self.ratio, self.spread, self.rounds, self.ms = ratio, spread, 0, ms

    def interleaved(self, sessions, feeds, rounds, runs=1, warmup=2, threads=1):
        wobble = [self.spread * (2 * (k % 5) / 4 - 1) for k in range(rounds)]  # -spread .. +spread
        self.rounds += rounds
        return [[self.ms] * rounds, [self.ms / (self.ratio + w) for w in wobble]]


def _no_sizing_run(*a, **k):
    raise AssertionError("a decision's rounds are sized by the early look's first block, not by a run of their own")


@pytest.mark.parametrize("ratio, spread, rounds, faster, slower", [
    (2.0, 0.2, 6, True, False),      # every round far faster: decided on the first block (decisive)
    (0.5, 0.05, 6, False, True),     # every round far slower: the same
    (1.2, 0.02, 12, True, False),    # clearly faster, not by the decisive factor: the early look's 12 rounds
    (1.0, 0.005, 12, False, False),  # a tight tie, inside both boundaries: a tie on the early look
    (1.045, 0.02, 15, False, False),  # the faster boundary inside, the median above it: measured in full
    (1.02, 0.02, 12, False, False),  # the faster boundary inside, the median under it: futile, a tie
    (0.97, 0.02, 15, False, False),  # the slower boundary inside: measured in full whatever the median
])
def test_compare_speed_stops_early_only_when_no_decision_is_close(monkeypatch, ratio, spread, rounds, faster,
                                                                  slower):
    from onnxshrink import runtime
    timer = _StandInTimer(ratio, spread)  # 50 ms runs: the close pairs' ~100 ms rounds fit 15 times in 1.5 s
    monkeypatch.setattr(runtime, "interleaved_latency", timer.interleaved)
    monkeypatch.setattr(runtime, "measure_latency", _no_sizing_run)
    model = tiny_chain(2)
    cmp = runtime.compare_speed(model, model, {"x": np.zeros((1, 8), np.float32)})
    assert runtime.EARLY_ROUNDS == 6 and cmp.rounds == timer.rounds == rounds, timer.rounds
    assert cmp.faster_than(1.0) is faster and cmp.slower_than(1.0) is slower
    # a caller that decides only "faster than 1.0" lets a clear tie below its boundary stop early as well
    timer.rounds = 0
    one = runtime.compare_speed(model, model, {"x": np.zeros((1, 8), np.float32)}, decides=(("faster", 1.0),))
    assert one.faster_than(1.0) is faster
    # a tiny model (its 61 rounds fit in the time budget) is always measured in full, the first block's
    # rounds counted in it
    timer.rounds, timer.ms = 0, 0.02
    tiny = runtime.compare_speed(model, model, {"x": np.zeros((1, 8), np.float32)})
    assert timer.rounds == tiny.rounds == 61


class _StandInRatios:
    """Stand-in timer for several models: model k takes ``1 / ratios[k]`` of model 0's time in every
    round, with a deterministic spread of +-``spread``; counts the rounds timed and, per model, the
    rounds it ran in (sessions are told apart by identity, as the first call lists them)."""

    def __init__(self, ratios, spread: float, ms: float = 100.0):
        self.ratios, self.spread, self.rounds, self.order, self.ran, self.ms = ratios, spread, 0, None, {}, ms

    def interleaved(self, sessions, feeds, rounds, runs=1, warmup=2, threads=1):
        if self.order is None:
            assert len(sessions) == len(self.ratios) + 1
            self.order = list(sessions)
        wobble = [self.spread * (2 * (k % 5) / 4 - 1) for k in range(rounds)]
        self.rounds += rounds
        out = []
        for sess in sessions:
            k = self.order.index(sess)
            self.ran[k] = self.ran.get(k, 0) + rounds
            out.append([self.ms] * rounds if k == 0 else [self.ms / (self.ratios[k - 1] + w) for w in wobble])
        return out


@pytest.mark.parametrize("ratios, rounds", [
    ((2.0, 3.0), (6, 6, 6)),     # both candidates far faster in every round: the first block decides both
    ((1.2, 1.3), (12, 12, 12)),  # both clearly faster, not decisively: the early look decides both
    ((2.0, 1.045), (12, 15, 12)),  # the second is a close call: it alone (with its base) gets the full measurement
])
def test_compare_speeds_times_candidates_against_one_base(monkeypatch, ratios, rounds):
    from onnxshrink import runtime
    timer = _StandInRatios(ratios, 0.02)  # the first pair's ~150 ms rounds: 15 in 1.5 s
    monkeypatch.setattr(runtime, "interleaved_latency", timer.interleaved)
    monkeypatch.setattr(runtime, "measure_latency", _no_sizing_run)
    model = tiny_chain(2)
    faster = (("faster", 1.0),)
    cmps = runtime.compare_speeds([model, model, model], {"x": np.zeros((1, 8), np.float32)},
                                  [(0, 1, faster), (0, 2, faster), (1, 2, ())])
    assert timer.rounds == rounds[1]
    assert [c.speedup for c in cmps] == pytest.approx([ratios[0], ratios[1], ratios[1] / ratios[0]], rel=0.02)
    assert cmps[0].faster_than(1.0) and cmps[1].faster_than(1.0) is (rounds[1] != 15)
    # the close pair (0, 2) is measured in full; the pairs decided early (or deciding nothing) keep the early look,
    # and model 1, in no close pair, leaves the rounds
    assert tuple(c.rounds for c in cmps) == rounds
    assert timer.ran == {0: rounds[1], 1: rounds[0], 2: rounds[1]}




@pytest.mark.parametrize("decides", [(("faster", 1.0),), (("slower", 1.0), ("faster", 1.0)), (("faster", 1.5),),
                                     (("slower", 1.0),)])
def test_an_ep_worker_looks_early_at_the_boundaries_compare_speeds_uses(decides):
    """The EP worker's early look (``runtime.early_boundaries``, taken only where a round takes
    EARLY_LOOK_MS or more) has the boundaries ``compare_speeds`` takes on such a comparison, and
    its rules are runtime's own, shipped as source. Under TINY_RUN_MS the margin differs: there the
    worker does not look early."""
    from onnxshrink.runtime import (
        EARLY_LOOK_MS,
        SpeedComparison,
        _boundaries,
        close_call,
        early_boundaries,
        settled_by_far,
    )
    from onnxshrink.targets.ep_process import EP_WORKER
    half = EARLY_LOOK_MS / 2  # each model's run: a round of the pair takes EARLY_LOOK_MS
    cmp = SpeedComparison(1.0, 0.9, 1.1, half, half, 6)
    assert early_boundaries(decides) == _boundaries(cmp, decides)
    tiny = SpeedComparison(1.0, 0.9, 1.1, 0.05, 0.05, 6)
    assert early_boundaries(decides) != _boundaries(tiny, decides)
    import inspect
    assert inspect.getsource(close_call) in EP_WORKER and inspect.getsource(settled_by_far) in EP_WORKER
