"""passes/quantize/unit_analysis.py: each unit's noise-to-signal ratio, reduced in the graph."""

from __future__ import annotations

import numpy as np
from helpers import model_samples

from models.build import mobilenet_small
from onnxshrink.passes.quantize import unit_analysis
from onnxshrink.pipeline.manager import optimize


def _analysis_inputs(monkeypatch) -> tuple:
    """(builder, units, samples) of a real quantize run's unit analysis (keep_float asks for it)."""
    seen = []
    real = unit_analysis.analyse_units

    def spy(builder, units, samples, *a, **k):
        seen.append((builder, units, samples))
        return real(builder, units, samples, *a, **k)
    monkeypatch.setattr(unit_analysis, "analyse_units", spy)
    m = mobilenet_small()
    optimize(m, passes=[{"quantize": {"keep_float": 1, "guard": False, "dynamic": "off"}}], data=model_samples(m, 12),
             budget="none", speed="off")
    monkeypatch.setattr(unit_analysis, "analyse_units", real)
    assert len(seen) == 1
    return seen[0]


def test_the_nsr_reduced_in_the_graph_is_numpys_and_fetches_no_tensor(monkeypatch):
    """``|y_q - y|^2 / |y|^2`` summed over the samples: the graph's float64 sums of squares give what
    numpy gives from the captured tensors, and without shifts a run returns two scalars per unit."""
    builder, units, samples = _analysis_inputs(monkeypatch)
    fetched = []
    capture = unit_analysis.capture_activations

    def recording(model, names, feeds, *a, **k):
        for cap in capture(model, names, feeds, *a, **k):
            fetched.append(cap)
            yield cap
    monkeypatch.setattr(unit_analysis, "capture_activations", recording)
    full = unit_analysis.analyse_units(builder, units, samples, shifts=True)
    # numpy's NSR from the tensors this run fetched (each unit's float output and its shadow's)
    weighted = [u for u in units.values() if u.kind == "weighted"]
    out = {n.name: n.output[0] for n in builder.model_f.graph.node}  # the node's own output (before a Relu)
    for u in weighted:
        e = s = 0.0
        for cap in fetched:
            y, yq = cap[out[u.node]], cap[u.node + "_sh_y"]
            d = (yq - y).astype(np.float64)
            e, s = e + float((d * d).sum()), s + float((y.astype(np.float64) ** 2).sum())
        assert np.isclose(full[u.node]["nsr"], e / s, rtol=1e-9, atol=0), u.node
        assert full[u.node]["shift"] is not None
    fetched.clear()
    bare = unit_analysis.analyse_units(builder, units, samples, shifts=False)
    assert {k: v["nsr"] for k, v in bare.items()} == {k: v["nsr"] for k, v in full.items()}
    assert all(v["shift"] is None for v in bare.values())
    assert fetched and all(np.ndim(v) == 0 for cap in fetched for v in cap.values())  # scalars only
    assert len(fetched[0]) == 2 * len(weighted)
