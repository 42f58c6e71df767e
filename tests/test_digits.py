"""A CNN trained in this test on scikit-learn's load_digits (real labels): a top-1 accuracy budget
of at most two points lost ("accuracy>=-2%", labels.npy beside the held-out data) over a
compressing pipeline, with and without a size target, checked against the real labels by an
independent onnxruntime run of the written model."""

from __future__ import annotations

import json

import onnx
import pytest

from tests.digits_cnn import accuracy, digits_model, digits_split, write_digits_folder
from tests.reliability_helpers import run_cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    xtr, ytr, xte, yte = digits_split()
    model = digits_model()
    onnx.checker.check_model(model, full_check=True)
    path = d / "digits.onnx"
    onnx.save(model, str(path))
    write_digits_folder(d / "calib", xtr[:64], ytr[:64])
    write_digits_folder(d / "val", xte, yte)
    # the tool splits --val into selection (even positions) and test (odd): the verdict is on the test half
    xt, yt = xte[1::2], yte[1::2]
    return {"dir": d, "model": path, "x": xte, "y": yte, "acc": accuracy(model, xte, yte),
            "x_test": xt, "y_test": yt, "acc_test": accuracy(model, xt, yt)}


def _run(digits, tmp_path, *extra, budget="accuracy>=-2%"):
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    res = run_cli("optimize", digits["model"], out, "--calib", digits["dir"] / "calib", "--val", digits["dir"] / "val",
                  "--passes", "cleanup,prune,svd,quantize", "--budget", budget, "--report", rep, "-q", *extra)
    return res, out, (json.loads(rep.read_text()) if rep.exists() else None)


def test_trained_cnn_is_accurate(digits):
    assert len(digits["y"]) == 497
    assert digits["acc"] >= 0.97  # a real classifier, so "one point" means something


@pytest.mark.parametrize("budget", ["accuracy>=-2%", "top1>=-3%"])
def test_accuracy_budget_met_against_real_labels(digits, tmp_path, budget):
    """``accuracy`` is top-1 against the labels; ``top1`` is agreement with the original's top-1,
    so ``top1>=-3%`` (97 % agreement) bounds the accuracy lost by three points whatever the labels."""
    res, out, rep = _run(digits, tmp_path, "-o", "prune.mode=importance", "-o", "prune.ratio=0.3", budget=budget)
    assert res.code == 0, res.err
    assert rep["budget"] == budget and rep["budget_met"] is True
    assert "with labels" in rep["data"]["test"]
    assert rep["data"]["original_scores"]["accuracy"] == pytest.approx(digits["acc_test"])
    assert rep["samples"] == {"calibration": 64, "selection": 249, "test": 248, "disjoint": True}
    got = accuracy(onnx.load(str(out)), digits["x_test"], digits["y_test"])  # independent of the tool's figure
    assert got == pytest.approx(rep["fidelity"]["accuracy"])
    assert got >= digits["acc_test"] - 0.02
    assert rep["after"]["params"] < rep["before"]["params"]
    assert any(p["name"] == "prune" and p["status"] in ("applied", "backed off") for p in rep["passes"])


def test_size_target_within_accuracy_budget(digits, tmp_path):
    res, out, rep = _run(digits, tmp_path, "--target-size", "0.2", "--executor", "serial", "--no-cache")
    assert res.code == 0, res.err
    a = rep["allocation"]
    assert a["target"]["cost"] == "weight_bytes" and a["chosen_n"] is not None
    assert rep["after"]["weight_bytes"] <= 0.2 * rep["before"]["weight_bytes"]
    got = accuracy(onnx.load(str(out)), digits["x_test"], digits["y_test"])
    assert got == pytest.approx(rep["fidelity"]["accuracy"]) and got >= digits["acc_test"] - 0.02
    assert a["decisions"] and all({"pass", "unit", "strength", "why"} <= set(d) for d in a["decisions"])
    assert {d["pass"] for d in a["decisions"]} & {"prune", "svd"}  # more than quantization alone
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_unreachable_target_fails_closed(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSHRINK_CACHE", str(tmp_path / "cache"))
    res, out, rep = _run(digits, tmp_path, "--target-size", "0.02", "--executor", "serial")
    assert res.code == 4, res.err
    assert not out.exists()
    assert "cost target not met" in res.err
    a = rep["allocation"]
    assert a["chosen_n"] is None and "smallest size" in a["result"] and a["trials"]
    ok = [t for t in a["trials"] if t["budget_ok"]]
    assert ok
    # the same inputs with a target a verified configuration meets: the cached trials are judged
    # against the new target, and the chosen one is rebuilt. The least compressed verified one: the
    # verdict is on the held-out test samples, which the cheapest one verified on the selection
    # samples can miss (seen on an AVX-512 VNNI CPU: 0.984 on selection, 0.948 on test, exit 4)
    reachable = max(t["cost"]["weight_bytes"] for t in ok) / rep["before"]["weight_bytes"] + 1e-3
    res, out, rep = _run(digits, tmp_path, "--target-size", f"{reachable:.4f}", "--executor", "serial")
    assert res.code == 0, res.err
    assert rep["allocation"]["sensitivity"]["measured"] == 0
    assert any(t["cached"] and t["target_met"] for t in rep["allocation"]["trials"])
    assert rep["after"]["weight_bytes"] <= reachable * rep["before"]["weight_bytes"]
