"""CLI cost targets: --target-size/--target-macs/--target-latency and their recipe keys, usage errors."""

from __future__ import annotations

import json

import pytest

from tests.reliability_helpers import mlp_with_calib, run_cli


@pytest.fixture
def case(tmp_path):
    return mlp_with_calib(tmp_path)


@pytest.mark.parametrize("args,msg", [
    (["--target-size", "1.5"], "fraction"),
    (["--target-size", "0"], "fraction"),
])
def test_target_usage_errors(case, tmp_path, args, msg):
    p, calib = case
    res = run_cli("optimize", p, tmp_path / "o.onnx", "--calib", calib, "-p", "cleanup,quantize", *args)
    assert res.code == 2 and msg in res.err
    assert not (tmp_path / "o.onnx").exists()


def test_recipe_target_size(case, tmp_path):
    p, calib = case
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes: [cleanup, svd, quantize]\ncalib: {calib}\nbudget: cosine>=0.98\n"
                      f"target_size: 0.5\nexecutor: serial\ncache: false\n")
    res = run_cli("optimize", p, tmp_path / "o.onnx", "--recipe", recipe, "--report", tmp_path / "r.json", "-q")
    assert res.code == 0, res.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["allocation"]["target"] == {**rep["allocation"]["target"], "cost": "weight_bytes", "fraction": 0.5}
    assert rep["after"]["weight_bytes"] <= 0.5 * rep["before"]["weight_bytes"] and rep["budget_met"]
    assert rep["allocation"]["sensitivity"]["executor"] == "serial"


def test_size_and_macs_targets_together(case, tmp_path):
    """Several targets: all must be met; the report names each."""
    p, calib = case
    res = run_cli("optimize", p, tmp_path / "o.onnx", "--calib", calib, "-p", "cleanup,prune,svd,quantize",
                  "--budget", "cosine>=0.95", "--target-size", "0.5", "--target-macs", "0.9", "--executor", "serial",
                  "--no-cache", "--report", tmp_path / "r.json", "-q")
    assert res.code == 0, res.err
    rep = json.loads((tmp_path / "r.json").read_text())
    t = rep["allocation"]["target"]
    assert [x["cost"] for x in t["targets"]] == ["weight_bytes", "macs"] and "and MACs" in t["describe"]
    assert rep["after"]["weight_bytes"] <= 0.5 * rep["before"]["weight_bytes"]
    assert rep["after"]["macs"] <= 0.9 * rep["before"]["macs"] and rep["budget_met"]
    assert "MACs" in rep["allocation"]["result"] and "size" in rep["allocation"]["result"]
