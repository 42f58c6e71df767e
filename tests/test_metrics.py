"""Fidelity metrics, budgets (absolute and relative) and labels beside the data."""

import math

import numpy as np
import onnx
import pytest

from onnxshrink import PassManager
from onnxshrink.errors import UsageError
from onnxshrink.metrics import Budget, compare_outputs, fidelity, label_accuracy


def test_compare_outputs_identical_and_scaled():
    r = [np.array([[1.0, 2.0, 3.0]], np.float32)]
    s = compare_outputs(r, r)
    assert s["cosine"] == pytest.approx(1.0) and s["sqnr"] == math.inf and s["max_abs"] == 0.0
    s2 = compare_outputs(r, [r[0] * 2])
    assert s2["cosine"] == pytest.approx(1.0)
    assert s2["max_abs"] == pytest.approx(3.0 / 3.0)  # |6-3| / max|ref|


def test_compare_outputs_worst_output_counts():
    good = np.ones((4,), np.float32)
    bad = np.array([1, -1, 1, -1], np.float32)
    s = compare_outputs([good, good], [good, bad])
    assert s["cosine"] == pytest.approx(0.0)


def test_nonfinite_output_scores_zero():
    r = [np.ones(3, np.float32)]
    s = compare_outputs(r, [np.array([1, np.nan, 1], np.float32)])
    assert s["cosine"] == 0.0 and s["max_abs"] == math.inf


def test_sqnr_value():
    r = np.array([3.0, 4.0])
    o = r + np.array([0.03, 0.04])  # noise energy 1e-4 * 25 ; signal 25
    s = fidelity([[r]], [[o]])
    assert s["sqnr"] == pytest.approx(40.0, abs=1e-6)


def test_label_accuracy_top1_top5():
    outs = [[np.eye(6)[[2]] ], [np.eye(6)[[4]]]]
    assert label_accuracy(outs, [2, 3], 1) == 0.5
    assert label_accuracy(outs, [2, 3], 5) == 1.0


@pytest.mark.parametrize("text,ok", [("cosine>=0.99", True), ("sqnr >= 30", True), ("max_abs<=1e-3", True),
                                     ("accuracy>=-1%", True), ("cosine>0.9", False), ("foo>=1", False),
                                     ("cosine>=x", False)])
def test_budget_parse(text, ok):
    if ok:
        assert Budget.parse(text) is not None
    else:
        with pytest.raises(UsageError):
            Budget.parse(text)


def test_relative_budget_points_and_percent():
    b = Budget.parse("accuracy>=-1%")
    assert b.threshold({"accuracy": 0.95}) == pytest.approx(0.94)
    assert b.holds({"accuracy": 0.941}, {"accuracy": 0.95})
    assert not b.holds({"accuracy": 0.93}, {"accuracy": 0.95})
    s = Budget.parse("user>=-10%")
    assert s.threshold({"user": 40.0}) == pytest.approx(36.0)
    for text in ("sqnr>=-10%", "max_abs<=+10%", "mse<=+10%"):  # the original's own score is exact
        with pytest.raises(UsageError, match="give an absolute value"):
            Budget.parse(text)
    with pytest.raises(UsageError):
        b.threshold(None)


def _linear_model():
    return onnx.parser.parse_model("""<ir_version: 8, opset_import: ["": 17]>
agraph (float[N, 4] x) => (float[N, 3] y) <float[4,3] w = {1,2,3,4,5,6,7,8,9,10,11,12}> {
 y = MatMul(x, w)
}""")


def test_labels_file_beside_data(tmp_path):
    rng = np.random.default_rng(0)
    w = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    labels = []
    for i in range(12):
        x = rng.random((1, 4), dtype=np.float32)
        np.save(tmp_path / f"{i:03d}.npy", x)
        labels.append(int(np.argmax(x @ w)) if i % 2 else (int(np.argmax(x @ w)) + 1) % 3)
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)))
    _, rep = PassManager([], data=str(tmp_path), budget="accuracy>=-1%").run(_linear_model())
    assert "accuracy" in rep.data["original_scores"]
    assert rep.budget_met
    assert rep.fidelity["accuracy"] == rep.data["original_scores"]["accuracy"]


def test_accuracy_budget_without_labels_is_usage_error():
    data = [{"x": np.ones((1, 4), np.float32)}] * 4
    with pytest.raises(UsageError):
        PassManager([], data=data, budget="accuracy>=0.9").run(_linear_model())


def test_silent_sample_cosine_is_one_but_false_positive_is_not():
    loud = np.array([0.0, 0.9, 1.0, 0.0])
    silent = np.array([1e-7, -1e-7, 2e-7, 0.0])
    noise = silent + np.array([1.5e-7, 1e-7, -1e-7, 1e-7])
    f = fidelity([[loud], [silent]], [[loud], [noise]])
    assert f["cosine_min"] == pytest.approx(1.0)
    f2 = fidelity([[loud], [silent]], [[loud], [silent + np.array([0.0, 0.2, 0.0, 0.0])]])
    assert f2["cosine_min"] < 0.5
