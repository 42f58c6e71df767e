"""Early rejection of candidates that cannot hold the budget (``metrics.out_of_reach``, the
manager's ``ctx.screen``): exact bounds, so the decisions and the bytes written are the ones a
full measurement gives, with fewer runs."""

from __future__ import annotations

import numpy as np
import pytest

import onnxshrink
from models.build import mobilenet_v3_small
from onnxshrink.metrics import Budget, out_of_reach
from onnxshrink.pipeline import manager
from tests.helpers import model_samples


def _per(metric, values):
    return [{metric: v, "cosine": v} for v in values]


@pytest.mark.parametrize("budget, seen, n, expected", [
    ("cosine>=0.99", [0.9, 1.0], 8, True),       # 1.9 + 6 < 7.92
    ("cosine>=0.99", [0.95], 8, False),          # 0.95 + 7 >= 7.92: the rest could still make it
    ("cosine>=0.99", [0.99] * 7, 8, False),
    ("cosine_min>=0.98", [0.99, 0.97], 8, True),
    ("max_abs<=0.01", [0.001, 0.02], 8, True),
    ("max_abs<=0.01", [0.001, 0.009], 8, False),
    ("mse<=0.001", [0.003, 0.006], 8, True),     # 0.009 > 0.008
    ("sqnr>=30", [1.0], 8, False),               # no bound: never before the end
])
def test_out_of_reach_bounds(budget, seen, n, expected):
    b = Budget.parse(budget)
    assert out_of_reach(b, None, _per(b.metric if b.metric != "cosine_min" else "cosine", seen), n) is expected


def test_out_of_reach_never_rejects_a_mean_that_could_still_hold():
    rng = np.random.default_rng(0)
    b = Budget.parse("cosine>=0.99")
    for _ in range(2000):
        vals = list(np.clip(1 - rng.exponential(0.01, 8), 0, 1))
        for k in range(1, 8):
            if out_of_reach(b, None, _per("cosine", vals[:k]), 8):
                assert np.mean(vals[:k] + [1.0] * (8 - k)) < 0.99  # even perfect samples after it miss
                assert np.mean(vals) < 0.99


def test_screening_writes_the_same_bytes_with_fewer_runs(monkeypatch):
    # a strict budget: int8 everywhere misses it, so the guard measures several placements
    m = mobilenet_v3_small()
    data = model_samples(m, 32, seed=3)
    kw = dict(passes=["cleanup", {"quantize": {"dynamic": "off"}}], data=data, budget="cosine>=0.999", speed="off")
    out, rep = onnxshrink.optimize(m, None, **kw)
    search = rep.passes[-1].stats["fidelity_search"]
    stopped = [s for s in search if "out_of_reach_after" in s]
    assert stopped and all(s["out_of_reach_after"] < 8 for s in stopped)
    # the same run measuring every candidate in full
    monkeypatch.setattr(manager.PassManager, "_screen", lambda self, model, val, reference: onnxshrink.metrics.fidelity(
        reference, self._selection_outputs(model, val), None, val, self.val_labels))
    full, rep_full = onnxshrink.optimize(m, None, **kw)
    assert full.SerializeToString() == out.SerializeToString()
    full_search = rep_full.passes[-1].stats["fidelity_search"]
    assert not any("out_of_reach_after" in s for s in full_search)
    # an entry whose cosine is not the full measurement's is marked as the partial one it is (the
    # first placement's and the one without integer elementwise ops too)
    assert len(search) == len(full_search)
    partial = [i for i, (s, f) in enumerate(zip(search, full_search)) if s.get("cosine") != f.get("cosine")]
    assert partial and all("out_of_reach_after" in search[i] for i in partial), (partial, search)


def test_models_read_from_files_are_run_as_often_as_from_bytes(monkeypatch):
    """Past ``model.VIA_FILE_BYTES`` of weights (lowered here) the checker and every session read a
    temporary file with external data; the selection outputs of the placement the quantize guard keeps
    are still the manager's validation of it (kept under the model's digest), so no sample runs twice
    more than from bytes, and the bytes written are the same."""
    import onnxruntime as ort

    from onnxshrink import model as model_io
    from onnxshrink import runtime
    m = mobilenet_v3_small()
    # no timing (guard off: its speed comparison's rounds depend on the machine), the budget's search on
    kw = dict(passes=[{"quantize": {"dynamic": "off", "guard": False}}], data=model_samples(m, 24, seed=3),
              budget="cosine>=0.8", speed="off")
    runs = []
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    from_bytes, _ = onnxshrink.optimize(m, None, **kw)
    n_bytes = len(runs)
    written = []
    real_write = model_io.write_external
    monkeypatch.setattr(model_io, "write_external", lambda *a, **k: written.append(1) or real_write(*a, **k))
    for mod in (model_io, runtime):
        monkeypatch.setattr(mod, "VIA_FILE_BYTES", 1024)
    runs.clear()
    from_files, rep = onnxshrink.optimize(m, None, **kw)
    assert rep.passes[-1].status == "applied"
    assert written  # the sessions did read files
    assert len(runs) == n_bytes
    assert from_files.SerializeToString() == from_bytes.SerializeToString()
