"""Calibration: exact streaming histograms, range estimators on known distributions, flat memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxshrink.passes.quantize.calibrate import (
    CALIBRATORS,
    TensorHistogram,
    collect_histograms,
    entropy_range,
    estimate_range,
    minmax_range,
    mse_range,
    percentile_range,
)


def _hist(chunks, bins=2048):
    h = TensorHistogram(bins, max_elements=0)  # exact counts
    for c in chunks:
        h.update(c)
    return h


def test_rebinning_is_exact_as_the_range_grows():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(50) * 0.01, -np.abs(rng.standard_normal(500)) * 0.5,
             rng.standard_normal(5000) * 3, rng.standard_normal(100) * 40 + 7]
    h = _hist(parts, bins=256)
    ref, _ = np.histogram(np.concatenate(parts), bins=h.edges)
    assert h.counts.sum() == sum(len(p) for p in parts)
    assert np.array_equal(ref, h.counts)
    allv = np.concatenate(parts)
    assert h.min == allv.min() and h.max == allv.max()
    # the grid uses at least half of its bins for the data (one power-of-two growth at most)
    assert (h.max - h.min) >= 0.25 * h.bins * h.width


def test_abs_histogram_folds_exactly():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(20000)
    h = _hist([x])
    counts, w = h.abs_histogram()
    ref, _ = np.histogram(np.abs(x), bins=w * np.arange(len(counts) + 1))
    assert np.array_equal(ref, counts)


def test_minmax_and_percentile_on_uniform():
    rng = np.random.default_rng(2)
    x = rng.uniform(-2.0, 6.0, 200000)
    h = _hist(np.array_split(x, 10))
    lo, hi = minmax_range(h)
    assert lo == x.min() and hi == x.max()
    lo, hi = percentile_range(h, percentile=99.0)
    assert abs(hi - np.percentile(x, 99.0)) < 0.02 and abs(lo - np.percentile(x, 1.0)) < 0.02


def test_range_always_contains_zero():
    h = _hist([np.linspace(2.0, 5.0, 1000)])
    for m in CALIBRATORS:
        lo, hi = estimate_range(h, m)
        assert lo == 0.0 and hi > 2.0


def test_mse_and_entropy_clip_heavy_tails_but_not_uniform():
    rng = np.random.default_rng(3)
    lap = rng.laplace(0, 1, 400000)
    h = _hist(np.array_split(lap, 8))
    for fn in (mse_range, entropy_range):
        lo, hi = fn(h)
        assert 3.0 < hi < 0.9 * lap.max(), fn.__name__  # clips the tail, keeps the bulk
        assert -0.9 * abs(lap.min()) < lo < -3.0
    # MSE optimum for a Laplace(1) at 8 bits is close to 9-10 b (Banner et al. 2019)
    lo, hi = mse_range(h)
    assert 6.0 < hi < 13.0
    uni = rng.uniform(-1, 1, 200000)
    hu = _hist([uni])
    lo, hi = mse_range(hu)
    assert hi > 0.95 and lo < -0.95  # nothing to clip on a uniform


def test_mse_range_has_lower_error_than_minmax_on_outliers():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(100000), [60.0]])
    h = _hist([x])

    def err(lo, hi):
        s = (hi - lo) / 255
        z = np.round(-lo / s)
        q = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
        return np.mean((q - x) ** 2)

    assert err(*mse_range(h)) < err(*minmax_range(h))


def test_unknown_calibrator():
    with pytest.raises(ValueError):
        estimate_range(_hist([np.ones(3)]), "bogus")


def test_memory_is_flat_in_the_number_of_samples():
    rng = np.random.default_rng(5)

    def run(n):
        def captures():
            for i in range(n):
                yield {"a": rng.standard_normal(2000).astype(np.float32) * (1 + i % 7),
                       "b": np.maximum(rng.standard_normal(500), 0).astype(np.float32)}
        tracemalloc.start()
        hists = collect_histograms(captures(), bins=512)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return hists, peak

    h10, peak10 = run(10)
    h1000, peak1000 = run(1000)
    assert h1000["a"].count == 1000 * 2000
    assert [h.state_nbytes() for h in h10.values()] == [h.state_nbytes() for h in h1000.values()]
    assert peak1000 < 1.5 * peak10 + 64 * 1024


def test_large_tensors_are_subsampled_but_min_max_stay_exact():
    rng = np.random.default_rng(6)
    x = rng.standard_normal(1 << 20).astype(np.float32)
    h = TensorHistogram(512, max_elements=1 << 16)
    h.update(x)
    assert h.min == x.min() and h.max == x.max()
    assert h.count == 1 << 16
    lo, hi = percentile_range(h, percentile=99.0)
    assert abs(hi - np.percentile(x, 99.0)) < 0.05


def test_minmax_keeps_the_models_outputs_of_the_first_samples(monkeypatch):
    """``collect_minmax`` with an ``outputs`` list also returns the model's own outputs, sample by
    sample in order, while they fit in ``KEPT_OUTPUTS_BYTES``; past it, no more are kept."""
    from models.build import mlp
    from onnxshrink.passes.quantize import calibrate
    from onnxshrink.runtime import make_session
    m = mlp()
    name = m.graph.input[0].name
    shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    samples = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(5)]
    tensors = [n.output[0] for n in m.graph.node][:3]
    kept: list = []
    hists, _ = calibrate.collect_minmax(m, tensors, samples, kept)
    sess = make_session(m, optimize=False)
    assert len(kept) == 5 and set(hists) == set(tensors)
    for s, k in zip(samples, kept):
        np.testing.assert_array_equal(k[0], sess.run(None, s)[0])
    one = kept[0][0].nbytes
    monkeypatch.setattr(calibrate, "KEPT_OUTPUTS_BYTES", 2 * one)
    few: list = []
    calibrate.collect_minmax(m, tensors, samples, few)
    assert len(few) == 2


def test_calibration_and_capture_add_outputs_in_place_and_infer_types_without_weights(monkeypatch):
    """``collect_minmax`` and ``capture_activations`` give the model its extra nodes and outputs for the
    session and remove them again (no copy of the model: a 10 MB CRNN's calibration peak), and the
    extra outputs' types come from shape inference on a weightless copy (inference on the model itself
    serializes it and returns another copy with the weights)."""
    import onnx

    from models.build import mlp
    from onnxshrink.passes.quantize import calibrate
    from onnxshrink.runtime import capture_activations, make_session
    m = mlp()
    weights = sum(len(t.raw_data) for t in m.graph.initializer)
    before = m.SerializeToString()
    inferred = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda model, *a, **k: inferred.append(
        model.ByteSize()) or real(model, *a, **k))
    name = m.graph.input[0].name
    rng = np.random.default_rng(0)
    samples = [{name: rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(3)]
    tensors = [n.output[0] for n in m.graph.node][:2]
    hists, _ = calibrate.collect_minmax(m, tensors, samples)
    assert m.SerializeToString() == before
    got = list(capture_activations(m, tensors, samples))
    assert m.SerializeToString() == before
    assert inferred and max(inferred) < weights / 4  # inference saw no weights
    full = onnx.ModelProto()
    full.CopyFrom(m)
    full.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    sess = make_session(full, optimize=False)
    for s, g in zip(samples, got):
        for t, v in zip(tensors, sess.run(tensors, s)):
            np.testing.assert_array_equal(g[t], v)
    for t in tensors:
        vals = [sess.run([t], s)[0] for s in samples]
        assert hists[t].min == min(v.min() for v in vals) and hists[t].max == max(v.max() for v in vals)
