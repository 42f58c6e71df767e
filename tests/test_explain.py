"""onnxshrink explain: on a CNN with outlier channels quantized by onnxruntime (per-tensor), the
outlier convolution is ranked first with its cause named, and the recipe it writes, replayed by
``onnxshrink optimize --recipe``, is at least as faithful on held-out samples as onnxruntime's
quantization, also with the culprit excluded; pruned and factorized candidates; the CLI's exit codes
on bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from models.build import mlp
from onnxshrink.explain import explain
from onnxshrink.metrics import fidelity
from onnxshrink.runtime import make_session
from tests.explain_models import OUTLIER_CHANNELS, OUTLIER_NODE, ort_quantize, outlier_cnn, samples, write_samples
from tests.reliability_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    orig = d / "orig.onnx"
    onnx.save(outlier_cnn(), str(orig))
    cal = samples(16, seed=1)
    calib = write_samples(d / "calib", cal)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing" warnings
    cand = ort_quantize(orig, d / "ort.onnx", cal)
    return {"dir": d, "orig": orig, "calib": calib, "cand": cand, "cal": cal, "held": samples(16, seed=2)}


def held_out_cosine(orig, model, held) -> float:
    ref = make_session(onnx.load(str(orig)), optimize=False)
    sess = make_session(onnx.load(str(model)), optimize=True)
    return fidelity([ref.run(None, {"x": a}) for a in held], [sess.run(None, {"x": a}) for a in held])["cosine"]


def test_explain_ranks_outlier_node_first_and_recipe_fixes_it(case):
    d = case["dir"]
    r = run_cli("explain", case["orig"], case["cand"], "--calib", case["calib"], "--json", d / "ex.json",
                "--write-recipe", d / "recipe.yaml", "--apply", d / "applied.onnx")
    assert r.code == 0, r.err
    res = json.loads((d / "ex.json").read_text())
    top = res["ranking"][0]
    assert top["node"] == OUTLIER_NODE
    assert top["causes"][0]["cause"] == "outlier_channels"
    assert set(top["causes"][0]["channels"]) == set(OUTLIER_CHANNELS)
    assert top["share"] > 0.5
    # conv2's quantization alone costs more than any other unit's alone
    others = [x["share"] for x in res["ranking"][1:] if x["share"] is not None]
    assert all(top["share"] > s for s in others)
    assert res["kind"] == "quantized"
    assert res["after"]["cosine"] > res["before"]["cosine"]
    assert "apply_note" not in res  # the replay applied the recipe

    recipe = yaml.safe_load((d / "recipe.yaml").read_text())
    q = recipe["passes"][0]["quantize"]
    assert q["equalize"] is True and q["guard"] is False
    out = d / "replayed.onnx"
    r2 = run_cli("optimize", case["orig"], out, "--recipe", d / "recipe.yaml", "-q")
    assert r2.code == 0, r2.err
    ort_cos = held_out_cosine(case["orig"], case["cand"], case["held"])
    ort_fixed = ort_quantize(case["orig"], d / "ort_fixed.onnx", case["cal"], exclude=[OUTLIER_NODE])
    ort_fixed_cos = held_out_cosine(case["orig"], ort_fixed, case["held"])
    ours = held_out_cosine(case["orig"], out, case["held"])
    # the replay is an integer model like the candidate, not the float fallback
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops
    assert ours >= ort_cos and ours >= ort_fixed_cos, (ours, ort_cos, ort_fixed_cos)
    assert ours >= 0.999


def test_explain_api_tensors_in_graph_order(case):
    res = explain(onnx.load(str(case["orig"])), onnx.load(str(case["cand"])), str(case["calib"]), samples=8, top=2)
    names = [t["tensor"] for t in res["tensors"]]
    assert names == ["x", "conv1_r", "conv2_r", "conv3_r", "conv4_y", "gap", "out"]
    # the pre-Relu outputs onnxruntime's quantizer folded away are not matched
    assert "conv1_y" not in names
    assert res["alone_measured"] >= 2


def test_explain_exit_codes(case, tmp_path):
    d = case["dir"]
    r = run_cli("explain", tmp_path / "missing.onnx", case["cand"], "--calib", case["calib"])
    assert r.code == 3
    assert "model file not found" in r.err and len(r.err.strip().splitlines()) == 1
    other = outlier_cnn()
    other.graph.output[0].name = "logits"
    other.graph.node[-1].output[0] = "logits"
    bad = tmp_path / "other.onnx"
    onnx.save(other, str(bad))
    r = run_cli("explain", case["orig"], bad, "--calib", case["calib"])
    assert r.code == 2
    assert "interface differs" in r.err and len(r.err.strip().splitlines()) == 1
    r = run_cli("explain", case["orig"], case["cand"])
    assert r.code == 2
    r = run_cli("explain", case["orig"], case["cand"], "--calib", tmp_path / "nowhere")
    assert r.code == 3 and "calibration folder not found" in r.err
    r = run_cli("explain", case["orig"], case["cand"], "--calib", case["calib"], "--json", case["orig"])
    assert r.code == 2
    assert d.exists()


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    onnx.save(mlp(), str(d / "orig.onnx"))
    rng = np.random.default_rng(3)
    return d / "orig.onnx", write_samples(d / "calib", [rng.standard_normal((1, 64)).astype(np.float32)
                                                        for _ in range(16)])


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    calib = ROOT / "models/demo/calib"
    r = run_cli("optimize", ROOT / "models/demo/demo_cnn.onnx", d / "orig.onnx", "--passes", "cleanup", "--calib",
                calib, "-q")
    assert r.code == 0, r.err
    return d / "orig.onnx", calib


@pytest.mark.parametrize("model, shrink, kind, op, fix_pass", [
    ("mlp", ["--passes", "prune", "-o", "prune.mode=importance", "-o", "prune.ratio=0.6", "-o", "prune.multiple_of=2",
             "-o", "prune.refit=false"], "pruned", "prune group", "prune"),
    ("demo", ["--passes", "svd", "-o", "svd.rule=params", "-o", "svd.ratio=0.4", "-o", "svd.min_params=512",
              "-o", "svd.fold=false"], "factorized", "svd layer", "svd"),
])
def test_explain_structural_candidates(request, tmp_path, model, shrink, kind, op, fix_pass):
    """A pruned or factorized candidate: its groups / layers measured alone (onnxshrink's prune / svd of
    only that unit), the worst ranked first with its cause, and the recipe (the candidate's ratios or
    ranks, the culprits' halved or doubled) replayed gives a more faithful model."""
    orig, calib = request.getfixturevalue(f"{model}_case")
    cand = tmp_path / "cand.onnx"
    r = run_cli("optimize", orig, cand, *shrink, "--calib", calib, "--budget", "none", "-q")
    assert r.code == 0, r.err
    r = run_cli("explain", orig, cand, "--calib", calib, "--samples", "8", "--top", "3", "--json",
                tmp_path / "ex.json", "--write-recipe", tmp_path / "recipe.yaml", "--apply", tmp_path / "fixed.onnx",
                "--budget", "none", "-q")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "ex.json").read_text())
    assert res["kind"] == kind
    top = res["ranking"][0]
    assert top["op"] == op and top["share"] is not None
    assert top["causes"][0]["cause"] == {"pruned": "pruned", "factorized": "low_rank"}[kind]
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert [next(iter(p)) for p in recipe["passes"]] == [fix_pass]
    assert res["after"]["cosine"] > res["before"]["cosine"] + 0.01


def test_balanced_nsr_sees_class_scores_under_boxes():
    """A detection head [1, 4 + C, N]: boxes in pixels, class scores in [0, 1]. Rounding the scores to
    a step of 320 / 255 barely moves the whole tensor's NSR (the boxes hold its energy) but loses the
    scores: the channel-balanced NSR says so; an exact copy scores 0."""
    from onnxshrink.explain.measure import balanced_nsr, cosine_nsr

    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (1, 4, 300)), rng.uniform(0, 0.3, (1, 18, 300))], axis=1)
    out = ref.copy()
    out[:, 4:] = np.round(out[:, 4:] / (320 / 255)) * (320 / 255)
    _, whole = cosine_nsr(ref, out)
    assert whole < 1e-4
    assert balanced_nsr(ref, out) > 0.5
    assert balanced_nsr(ref, ref) == 0.0


def test_shares_against_an_original_whose_batchnorms_the_candidate_folded():
    """A conv + BatchNorm model shrunk by cleanup,quantize: the candidate's weights hold the folded
    BatchNorms, so explain compares with the cleaned original; put back into the unfolded original
    they applied each BatchNorm twice and every convolution's share read 100-500x the candidate's
    whole error."""
    from models.build import crnn_small
    from onnxshrink.pipeline.manager import optimize
    from tests.helpers import model_samples

    original = crnn_small(hw=(32, 64), hidden=32, num_classes=11, widths=(8, 16, 16, 16, 16))
    assert any(n.op_type == "BatchNormalization" for n in original.graph.node)
    data = model_samples(original, 12)
    candidate, _ = optimize(original, passes=["cleanup", {"quantize": {"guard": False, "dynamic": "off"}}],
                            data=data, budget="none")
    res = explain(original, candidate, data)
    shares = [r["share"] for r in res["ranking"] if r.get("share") is not None]
    assert shares and max(shares) < 1.5, shares


def test_shares_against_a_candidate_that_kept_the_batchnorms(tmp_path):
    """onnxruntime's quantize_static on the raw model keeps the BatchNorms unfolded: explain compares it
    with ORIGINAL as given (its weights are nearer those than the cleaned ones), shares stay sane."""
    from models.build import crnn_small
    from tests.helpers import model_samples

    original = crnn_small(hw=(32, 64), hidden=32, num_classes=11, widths=(8, 16, 16, 16, 16))
    data = model_samples(original, 12)
    onnx.save(original, tmp_path / "orig.onnx")
    cand = onnx.load(str(ort_quantize(tmp_path / "orig.onnx", tmp_path / "ort.onnx", [d["x"] for d in data])))
    assert any(n.op_type == "BatchNormalization" for n in cand.graph.node)
    res = explain(original, cand, data)
    shares = [r["share"] for r in res["ranking"] if r.get("share") is not None]
    assert shares and max(shares) < 1.5, shares


def test_explain_apply_says_when_the_recipe_changed_nothing_and_writes_a_json_recipe_as_json(case, monkeypatch):
    """A replay whose passes all roll back (every timing reads the result 2x slower: the speed contract
    undoes the quantize pass) writes the original, whose fidelity is exact: --apply says the recipe
    changed nothing and why, instead of reporting cosine 1.0 as the recipe's. A --write-recipe path
    ending in .json is written as JSON (optimize reads a .json recipe as JSON)."""
    from onnxshrink import runtime

    monkeypatch.setenv("ONNXSHRINK_SPEED", "never-slower")  # the suite's default is off (conftest)
    monkeypatch.setattr(runtime, "speed_comparison", lambda blocks: runtime.SpeedComparison(
        speedup=0.5, low=0.45, high=0.55, t_a=1.0, t_b=2.0, rounds=12))
    d = case["dir"]
    r = run_cli("explain", case["orig"], case["cand"], "--calib", case["calib"], "--json", d / "nothing.json",
                "--write-recipe", d / "recipe.json", "--apply", d / "nothing.onnx")
    assert r.code == 0, r.err
    recipe = json.loads((d / "recipe.json").read_text())
    assert next(iter(recipe["passes"][0])) == "quantize"
    res = json.loads((d / "nothing.json").read_text())
    assert res["apply_note"].startswith("the recipe changed nothing: quantize rolled back (rolled back by the speed "
                                        "contract")
    assert res["after"]["cosine"] > 0.99999
    assert "the recipe changed nothing" in r.out
