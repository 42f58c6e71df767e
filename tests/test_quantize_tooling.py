"""Tool cost of the quantize pass: MinMax calibration reduced inside onnxruntime, lazy per-unit analysis."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as TP
from onnx import helper as oh
from test_quantize import quantize, samples, small_net

from onnxshrink.passes.quantize.calibrate import collect_histograms, collect_minmax
from onnxshrink.runtime import capture_activations


def test_collect_minmax_equals_the_histograms_min_and_max():
    m = small_net()
    names = ["c1_r", "c2_y", "c3_r", "mp", "c4_y", "silu", "gap"]
    data = samples(5)
    fast, rest = collect_minmax(m, names, data)
    slow = collect_histograms(capture_activations(m, names, data), names)
    assert not rest and set(fast) == set(slow)
    for n in names:
        assert fast[n].min == slow[n].min and fast[n].max == slow[n].max


def test_collect_minmax_hands_non_finite_tensors_back():
    g = oh.make_graph([oh.make_node("Log", ["x"], ["y"]), oh.make_node("Relu", ["y"], ["z"])], "g",
                      [oh.make_tensor_value_info("x", TP.FLOAT, [4])], [oh.make_tensor_value_info("z", TP.FLOAT, [4])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    hists, rest = collect_minmax(m, ["y", "z"], [{"x": np.array([0.0, 1.0, 2.0, 3.0], np.float32)}])
    assert rest == ["y"] and hists["z"].min == 0.0 and np.isclose(hists["z"].max, np.log(3.0))


def test_guard_skips_the_per_unit_analysis_when_the_floor_holds():
    out, rec = quantize(small_net(), guard=True, min_speedup=0.0)
    assert rec.stats["fidelity_search"][0]["cosine"] >= 0.99 * 0.99
    assert "sensitivity" not in rec.stats  # never needed: no unit had to go back to float
    # budget none: the guard's own floor (min_cosine, unreachable here) decides, not the default budget
    out, rec = quantize(small_net(), budget="none", guard=True, min_speedup=0.0, min_cosine=1.5,
                        max_float_fraction=0.5)
    assert "sensitivity" in rec.stats and len(rec.stats["fidelity_search"]) > 1


def test_a_tensor_without_calibration_range_is_an_error_not_zero_to_one():
    """A range calibration never measured is refused (the pass rolls back with the reason), never
    replaced by a made-up (0, 1)."""
    from types import SimpleNamespace

    import pytest

    from onnxshrink.passes.quantize.qdq import QdqBuilder
    builder = SimpleNamespace(ranges={"seen": (-1.0, 2.0)})
    assert QdqBuilder.range_of(builder, "seen") == (-1.0, 2.0)
    with pytest.raises(RuntimeError, match="no calibration range for tensor 'unseen'"):
        QdqBuilder.range_of(builder, "unseen")
