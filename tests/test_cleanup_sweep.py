"""Corpus sweeps of the cleanup pass.

1. Every operator test case the onnx package ships (``collect_testcases()``, ~1,900).
   Slow variants turn the cases' inputs into initializers (all, or all but the first) so the
   folding steps run on every operator.
2. Every model file under ``onnx/backend/test/data/`` (light ResNet-50, DenseNet-121, ...,
   simple / pytorch-converted / pytorch-operator with their test_data_set inputs).

For each: run the cleanup pass through its PassResult and the export the manager does; the
result must be valid (ONNX checker, full when the original passes it), keep the interface, and,
wherever the original runs in onnxruntime, give equal outputs. A case the pass leaves unchanged
counts as such (the manager keeps the model it had). Skips carry explicit reasons and are counted;
the counts are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import cleanup_sweep_lib as sweep
import onnx
import pytest

HEAVY_DATA = ("light_vgg19", "light_densenet121", "light_inception_v2", "light_zfnet512")


def _report(title: str, results: dict) -> None:
    print(f"\n{title}\n{sweep.summarize(results)}")
    failed = {k: v for k, v in results.items() if v[0] == "failed"}
    assert not failed, "\n".join(f"{k}: {v[1]}" for k, v in list(failed.items())[:20])


def test_operator_cases_sweep():
    results = {}
    for name, model, feeds in sweep.node_cases():
        results[name] = sweep.check_case(model, feeds)
    _report("cleanup over onnx operator test cases", results)
    # the corpus is there and most of it is exercised
    assert len(results) > 1500
    counts = [s for s, _ in results.values()]
    assert counts.count("run") > 300


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["constants", "weights"])
def test_operator_cases_sweep_with_constant_inputs(variant):
    """The same cases with their inputs turned into initializers: "constants" (all of them, so
    every case folds through onnxruntime) and "weights" (all but the first: parameters constant)."""
    results = {}
    for name, model, feeds in sweep.node_cases(variant):
        results[name] = sweep.check_case(model, feeds)
    _report(f"cleanup over onnx operator test cases, inputs as initializers ({variant})", results)
    assert len(results) > 1500


def _data_results(heavy: bool) -> dict:
    results = {}
    for name, path in sweep.data_models():
        if any(h in name for h in HEAVY_DATA) != heavy:
            continue
        model = onnx.load(path)
        results[name] = sweep.check_case(model, sweep.data_feeds(path, model))
    return results


def test_backend_data_models_sweep():
    results = _data_results(heavy=False)
    _report("cleanup over onnx/backend/test/data models (light set)", results)
    assert len(results) > 100


@pytest.mark.slow
def test_backend_data_models_sweep_heavy():
    results = _data_results(heavy=True)
    _report("cleanup over onnx/backend/test/data models (heavy: vgg19, densenet121, inception_v2, zfnet512)", results)
    assert len(results) == len(HEAVY_DATA)
