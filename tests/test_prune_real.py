"""Real-model checks of the prune pass (slow; run with ``-m slow``): the issue's "done when".

See benchmarks/prune_bench.py for how models and samples are prepared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["yolov8n", "ppocr_det", "resnet50", "densenet121", "inception_v1", "shufflenet",
                                  "squeezenet"])
def test_zeroed_channels_all_removed_losslessly(name):
    import prune_bench
    r = prune_bench.lossless(name)
    assert r["status"] == "applied", r["reason"]
    assert r["removed_units"] == r["zeroed_units"]
    assert r["max_rel_err"] <= 1e-4
    assert r["params_drop"] >= 0.25, r


@pytest.mark.parametrize("name,opts", [("yolov8n", {}), ("ppocr_det", {}), ("ppocr_det", {"target_macs": 0.75})])
def test_importance_refit_faster_and_better(name, opts):
    import prune_bench
    no = prune_bench.importance(name, refit=False, n_samples=16, **opts)
    yes = prune_bench.importance(name, refit=True, n_samples=16, **opts)
    assert yes["sqnr_db"] > no["sqnr_db"]
    assert yes["latency_ms_after"] < yes["latency_ms_before"]
