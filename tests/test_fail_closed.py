"""Issue 15, "Fail closed everywhere: exit 0 must mean checked, and within budget".

Each test states the fail-closed behaviour and failed on the code before it (they were written first,
as strict xfails, whose marks went when the fix landed). Only the public API (``onnxshrink.optimize``) and the CLI
(``python -m onnxshrink optimize`` in a subprocess) are used: the package's modules are moving.

Small models (tests/fail_closed_models.py, models/build.py at 32x32), few samples: the file runs in
well under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxshrink
from models.build import mlp, mobilenet_small
from models.real import write_samples
from tests.fail_closed_models import conv1d_add_last_axis, if_outer_scope, scalar_head
from tests.helpers import normal_samples, run_ort

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ assumptions for the implementer
# point 1: the default budget when --budget is not given (documented in the issue)
DEFAULT_BUDGET_COSINE = 0.99
# point 1: how the --report JSON marks fidelity as not checked with `--budget none`. Any one of
# these spellings is accepted; adjust when the implementation settles on another.
UNCHECKED = "unchecked"
UNCHECKED_PLACES = (("budget_met",), ("fidelity_status",), ("fidelity", "status"), ("fidelity", "checked"))
# point 9: where the report states how many samples each role had, and the roles
REPORT_SAMPLES_KEY = "samples"
SAMPLE_ROLES = ("calibration", "selection", "test")
# pass statuses as the report spells them today
APPLIED, BACKED_OFF, ROLLED_BACK, NOT_APPLICABLE = "applied", "backed off", "rolled back", "not applicable"


# ------------------------------------------------------------------ helpers
def cli(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m onnxshrink ARGV`` in a subprocess with this tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "onnxshrink", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_calib(folder: Path, samples: list[dict]) -> Path:
    """The samples as a --calib folder (models.real.write_samples)."""
    return write_samples(samples, folder)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def input_name(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


def cosines(ref_model: onnx.ModelProto, model: onnx.ModelProto, samples: list[dict]) -> list[float]:
    """Per-sample cosine of every output (flattened, concatenated) against the reference model."""
    out = []
    for f in samples:
        a = np.concatenate([np.asarray(o, np.float64).ravel() for o in run_ort(ref_model, f)])
        b = np.concatenate([np.asarray(o, np.float64).ravel() for o in run_ort(model, f)])
        out.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return out


def report_passes(report: dict) -> dict:
    return {p["name"]: p for p in report["passes"]}


@pytest.fixture
def mlp_case(tmp_path):
    """mlp() [1,64] -> [1,10] and a calibration folder of 12 samples; held-out samples from another seed."""
    m = mlp()
    return (m, save(m, tmp_path / "mlp.onnx"),
            write_calib(tmp_path / "calib", normal_samples(12, seed=1, shape=(1, 64))),
            normal_samples(8, seed=101, shape=(1, 64)))


@pytest.fixture
def cnn_case(tmp_path):
    """mobilenet_small exported PyTorch-style at 32x32 (cleanup has BN/Constant work) + 8 samples."""
    m = mobilenet_small(hw=32, pytorch_style=True)
    name = input_name(m)
    return m, save(m, tmp_path / "cnn.onnx"), write_calib(
        tmp_path / "calib_cnn", normal_samples(8, seed=2, name=name, shape=(1, 3, 32, 32)))


# ------------------------------------------------------------------ 1. no budget means no check
def test_no_budget_applies_default_budget(tmp_path, mlp_case):
    # today: exit 0, sparsify applied, the written model has cosine 0.72 on held-out samples
    m, inp, calib, held_out = mlp_case
    out = tmp_path / "sparsify.onnx"
    r = cli("optimize", inp, out, "--passes", "cleanup,sparsify", "-o", "sparsify.method=sparsity",
            "-o", "sparsify.sparsity=0.9", "--calib", calib, "-q")
    assert r.returncode in (0, 4), r.stderr
    if r.returncode == 4:
        assert not out.exists(), "exit 4 must write nothing"
        return
    c = cosines(m, onnx.load(str(out)), held_out)
    assert float(np.mean(c)) >= DEFAULT_BUDGET_COSINE, \
        f"exit 0 without --budget but held-out cosine {np.mean(c):.4f} < default {DEFAULT_BUDGET_COSINE}"


def _marked_unchecked(report: dict) -> bool:
    for path in UNCHECKED_PLACES:
        v = report
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v == UNCHECKED or (path[-1] == "checked" and v is False):
            return True
    return False


def test_budget_none_is_accepted_and_reported_unchecked(tmp_path, mlp_case):
    # today: exit 2, "cannot parse budget 'none': expected METRIC>=VALUE or METRIC<=VALUE ..."
    m, inp, calib, _ = mlp_case
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("optimize", inp, out, "--passes", "cleanup,sparsify", "-o", "sparsify.method=sparsity",
            "-o", "sparsify.sparsity=0.9", "--calib", calib, "--budget", "none", "--report", rep, "-q")
    assert r.returncode == 0, r.stderr
    assert out.exists()
    report = json.loads(rep.read_text())
    assert _marked_unchecked(report), f"report does not mark fidelity {UNCHECKED!r}: " \
        f"budget={report.get('budget')!r} budget_met={report.get('budget_met')!r}"


# ------------------------------------------------------------------ 2. a mis-fold the guard cannot see
def test_quantize_keeps_last_axis_add(tmp_path):
    # today: quantize applied (min_speedup=0 makes the speed decision deterministic), fidelity it
    # reports 0.743, held-out cosine 0.54-0.70, no error: the guard compares against the already
    # mis-folded float graph. (At C = L = 64 it happens with default options too, when int8 measures faster.)
    m = conv1d_add_last_axis(8)
    data = normal_samples(12, seed=3, shape=(1, 8, 8))
    try:
        out, _ = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"min_speedup": 0.0}}], data=data)
    except onnxshrink.BudgetError:
        return  # failing closed is fine
    c = cosines(m, out, normal_samples(8, seed=103, shape=(1, 8, 8)))
    assert min(c) >= 0.99, f"quantized model's held-out cosine vs the original: min {min(c):.4f}"


# ------------------------------------------------------------------ 3. control flow
def test_quantize_if_with_outer_scope_reads(tmp_path):
    # today: exit 0 but quantize "rolled back" with "pass failed: InvalidArgument: [ONNXRuntimeError] :
    # 2 : INVALID_ARGUMENT : Invalid model. Node input 't_f' is not a graph input, initializer, or
    # output of a previous node." from the calibration session (collect_minmax): the Relu folded into
    # the outer MatMul's range is the sole consumer of its output, inside the then-branch.
    m = if_outer_scope()
    inp = save(m, tmp_path / "vad.onnx")
    r = np.random.default_rng(4)
    calib = write_calib(tmp_path / "calib", [{"x": r.standard_normal((1, 16)).astype(np.float32),
                                             "h": r.standard_normal((1, 16)).astype(np.float32)} for _ in range(12)])
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("optimize", inp, out, "--passes", "cleanup,quantize", "--calib", calib, "--report", rep, "-q",
              "--budget", "max_abs<=0.05")  # the crash is under test, not how close int8 gets
    assert res.returncode != 1, f"internal error: {res.stderr}"
    assert res.returncode == 0, res.stderr
    result = onnx.load(str(out))
    onnx.checker.check_model(result, full_check=True)
    held = [{"x": r.standard_normal((1, 16)).astype(np.float32), "h": r.standard_normal((1, 16)).astype(np.float32)}
            for _ in range(4)]
    run_ort(result, held[0])
    q = report_passes(json.loads(rep.read_text()))["quantize"]
    assert q["status"] in (APPLIED, BACKED_OFF, ROLLED_BACK, NOT_APPLICABLE)
    assert not q["reason"].startswith("pass failed"), \
        f"quantize crashed inside (not a clean decision): {q['status']}: {q['reason'][:300]}"


# ------------------------------------------------------------------ 4. cost target ignored
def test_cost_target_without_a_pass_that_serves_it(tmp_path, mlp_case):
    # today: exit 0, share applied, weight bytes 104488 -> 13240 (file 0.16x, not 0.01x), no warning
    m, inp, calib, _ = mlp_case
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("optimize", inp, out, "--passes", "cleanup,share", "--target-size", "0.01", "--budget", "cosine>=0.9",
            "--calib", calib, "--report", rep, "-q", "--no-cache")
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert not out.exists() and not rep.exists(), "a usage error comes before any work: nothing written"
    assert "onnxshrink: error:" in r.stderr


# ------------------------------------------------------------------ 5. lossless after lossy
def test_cleanup_after_sparsify_is_applied(cnn_case):
    # today: cleanup "rolled back" with "outputs changed (relative max error 7.39e-01 > 0.0001)":
    # it is compared with the original model, so sparsify's (accepted) change counts against it
    m, _, _ = cnn_case
    data = normal_samples(8, seed=2, name=input_name(m), shape=(1, 3, 32, 32))
    _, rep = onnxshrink.optimize(m, None, passes=[
        {"sparsify": {"method": "sparsity", "sparsity": 0.3, "min_size": 256}}, "cleanup"], data=data,
        budget="none")  # sparsify's change stands unchecked: only cleanup's own check is under test
    st = {p.name: (p.status, p.reason) for p in rep.passes}
    assert st["sparsify"][0] == APPLIED, st
    assert st["cleanup"][0] == APPLIED, f"cleanup: {st['cleanup']}"


# ------------------------------------------------------------------ 6. a metric that cannot see
def test_cosine_on_one_value_per_sample(tmp_path):
    # today: exit 0 at cosine 1.00000 (per sample), while the score moved by up to 0.19 (share 2 bits)
    m = scalar_head()
    inp = save(m, tmp_path / "score.onnx")
    calib = write_calib(tmp_path / "calib", normal_samples(12, seed=5, shape=(1, 64)))
    out = tmp_path / "o.onnx"
    r = cli("optimize", inp, out, "--passes", "cleanup,share", "-o", "share.bits=2", "-o", "share.min_elements=16",
            "--budget", "cosine>=0.99", "--calib", calib, "-q")
    assert r.returncode in (0, 2, 4), r.stderr
    if r.returncode != 0:
        assert not out.exists()
        return
    res = onnx.load(str(out))
    d = max(float(np.max(np.abs(run_ort(m, f)[0] - run_ort(res, f)[0])))
            for f in normal_samples(16, seed=105, shape=(1, 64)))
    assert d < 0.02, f"exit 0 under cosine>=0.99 but the score moved by {d:.3f} on held-out samples"


# ------------------------------------------------------------------ 7. smaller holes
@pytest.mark.parametrize("budget", ["sqnr>=-10%", "max_abs<=+10%", "mse<=+10%"])
def test_relative_budget_on_a_reference_metric_is_refused(tmp_path, cnn_case, budget):
    # before: exit 4 for all three ("budget sqnr>=-10% not met: sqnr=115.01 after all passes";
    # max_abs=1.2383e-06; mse=3.7681e-12): relative to the original's own score (inf dB, 0, 0), a
    # budget no model can meet. Now refused up front with the absolute form to use instead.
    _, inp, calib = cnn_case
    out = tmp_path / "o.onnx"
    r = cli("optimize", inp, out, "--passes", "cleanup", "--calib", calib, "--budget", budget, "-q")
    assert r.returncode == 2, r.stderr
    assert "relative budget on" in r.stderr and "give an absolute value" in r.stderr
    assert not out.exists()


def test_plot_path_is_input(tmp_path, mlp_case):
    # today: exit 0 (and a warning in the report that matplotlib is missing); the input survives only
    # because nothing was drawn
    _, inp, calib, _ = mlp_case
    before = sha256(inp)
    out = tmp_path / "o.onnx"
    r = cli("optimize", inp, out, "--passes", "cleanup,prune", "--target-size", "0.8", "--calib", calib,
            "--plot", inp, "-q", "--no-cache")
    assert sha256(inp) == before, "the input model was modified"
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert not out.exists()


def _node_case(name: str):
    """(model, [feeds]) of one onnx operator test case. Importing the op's case module registers its
    cases (the exporters run at class creation); much faster than collect_testcases() (15-25 s)."""
    import importlib
    import warnings

    import onnx.backend.test.case.node as cases
    module = {"test_affine_grid_2d_expanded": "affinegrid", "test_split_to_sequence_2": "splittosequence"}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if f"{cases.__name__}.{module}" not in sys.modules:
            cases._TargetOpType = None
        importlib.import_module(f"{cases.__name__}.{module}")
        found = [c for c in cases._NodeTestCases if c.name == name]
        if not found:
            found = [c for c in cases.collect_testcases() if c.name == name]
    c = found[0]
    g = c.model.graph
    inits = {t.name for t in g.initializer}
    in_names = [i.name for i in g.input if i.name not in inits]
    return c.model, [{n: v for n, v in zip(in_names, inputs)} for inputs, _ in c.data_sets]


@pytest.mark.parametrize("case,status,reason", [
    ("test_affine_grid_2d_expanded", ROLLED_BACK, "onnxruntime's graph optimizations fail on it"),
    ("test_split_to_sequence_2", NOT_APPLICABLE, "nothing to clean up")])
def test_cleanup_node_case_does_not_raise(case, status, reason):
    # today: affine_grid_2d_expanded raises Fail "[ONNXRuntimeError] : 1 : FAIL : Node () Op (Range)
    # [ShapeInferenceError] Input to 'Range' op should be scalars"; split_to_sequence_2 raises
    # ValueError "setting an array element with a sequence. The requested array has an inhomogeneous
    # shape after 1 dimensions" (the case's own inputs as data)
    model, data = _node_case(case)
    _, rep = onnxshrink.optimize(model, None, passes=["cleanup"], data=data)
    assert (rep.passes[0].status, rep.passes[0].reason[:len(reason)]) == (status, reason)


# ------------------------------------------------------------------ 8. reproducible
def test_same_run_same_bytes():
    # today: quantize keeps activations float in some runs ("no quantized placement is faster than fp32
    # on this CPU (best 0.95x-0.99x)") and quantizes them in others: two different models from one
    # command (mobilenet_small 32x32 via the CLI: 1 run of 5 differed; this 1-D CNN: ~3 runs of 8).
    # Up to 10 runs, stopping at the first difference: today P(all equal) is about 1 %.
    m = conv1d_add_last_axis(32, per_channel=True)
    data = normal_samples(8, seed=6, shape=(1, 32, 32))
    hashes = set()
    for _ in range(10):
        out, _ = onnxshrink.optimize(m, None, passes=["cleanup", "quantize"], data=data)
        hashes.add(hashlib.sha256(out.SerializeToString()).hexdigest())
        if len(hashes) > 1:
            break
    assert len(hashes) == 1, f"{len(hashes)} different outputs from the same call"


# ------------------------------------------------------------------ 9. sample counts per role
def test_report_states_samples_per_role(tmp_path, mlp_case):
    # before: report["data"] == {"calibration": "9 calibration samples", "validation": "3 held-out
    # validation samples", "synthetic": false}; no counts per role, no test split apart from selection
    _, inp, calib, _ = mlp_case
    n = len(list(calib.glob("*.npy")))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("optimize", inp, out, "--passes", "cleanup,sparsify", "--calib", calib, "--budget", "cosine>=0.9",
            "--report", rep, "-q")
    assert r.returncode in (0, 4), r.stderr
    report = json.loads(rep.read_text())
    assert REPORT_SAMPLES_KEY in report, f"no {REPORT_SAMPLES_KEY!r} in the report (keys: {sorted(report)})"
    counts = report[REPORT_SAMPLES_KEY]
    assert set(counts) >= set(SAMPLE_ROLES), counts
    assert all(isinstance(counts[k], int) and counts[k] >= 0 for k in SAMPLE_ROLES), counts
    assert counts["test"] > 0 and counts["calibration"] > 0, counts
    assert sum(counts[k] for k in SAMPLE_ROLES) <= n, counts
    assert counts["disjoint"] is True and report["data"]["test"].endswith("held-out test samples")


def test_ort_conversion_failure_leaves_no_output(tmp_path, monkeypatch, mlp_case):
    # before: OUT stayed behind when the .ort conversion failed after OUT was written
    import onnxshrink.pipeline.manager as manager

    def broken(path, **kw):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(manager, "save_ort_format", broken)
    m, inp, calib, _ = mlp_case
    out = tmp_path / "o.onnx"
    with pytest.raises(RuntimeError, match="converter crashed"):
        onnxshrink.optimize(str(inp), str(out), passes=["cleanup"], data=str(calib), target="cpu+ort")
    assert not out.exists() and not list(tmp_path.glob("o.onnx*"))


@pytest.mark.parametrize("builder,shape", [("loop_outer_scope", (1, 16)), ("scan_outer_scope", (1, 6, 16))])
def test_every_pass_on_control_flow_with_outer_scope_reads(builder, shape):
    # every pass on a Loop (a scripted PyTorch loop) and a Scan (tf2onnx's RNN) whose bodies read
    # outer tensors: each ends applied, not applicable, or rolled back with a reason a user can read
    # (before: fp16 said only "AssertionError"); quantize places the MatMuls outside the body
    import tests.fail_closed_models as models
    m = getattr(models, builder)()
    data = normal_samples(12, seed=3, shape=shape)
    for passes in (["cleanup", {"quantize": {"min_speedup": 0.0}}], ["cleanup", "prune", "svd", "share"],
                   ["sparsify", "fold", "equalize", "fp16"]):
        out, rep = onnxshrink.optimize(m, None, passes=passes, data=data, budget="none")
        onnx.checker.check_model(out, full_check=True)
        run_ort(out, data[0])
        for p in rep.passes:
            assert p.status in (APPLIED, NOT_APPLICABLE, ROLLED_BACK), (p.name, p.status)
            assert not p.reason.rstrip().endswith(("AssertionError", "Error:")), (p.name, p.reason)
    q = next(p for p in onnxshrink.optimize(m, None, passes=[{"quantize": {"min_speedup": 0.0}}], data=data,
                                            budget="none")[1].passes)
    assert q.status == APPLIED and q.stats["quantized_units"]["weighted"] >= 1


# ------------------------------------------------------------------ 1. the PicoDet-style detector
def test_picodet_style_detector_is_held_to_the_default_budget(tmp_path):
    """The issue's case: ``cleanup,quantize`` on a PicoDet-style layout detector with no budget
    shipped held-out cosine 0.64 (worst sample 0.38), exit 0. Full int8 on models.build.picodet_small
    is as bad (about 0.58 / 0.34 here, the first run below); without a budget the default one now
    judges quantize, which keeps what breaks it float: the written model is within it on 16 photos
    the tool never saw."""
    from models.build import demo_samples, picodet_small

    m = picodet_small()
    calib = [{"image": x} for x in demo_samples(32, seed=5, hw=96)]
    unseen = [{"image": x} for x in demo_samples(16, seed=77, hw=96)]
    forced, _ = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"guard": False}}], data=calib,
                                    budget="none")
    assert np.mean(cosines(m, forced, unseen)) < 0.9  # the reproduction: what int8 everywhere does
    inp, out, rep = save(m, tmp_path / "pico.onnx"), tmp_path / "pico_q.onnx", tmp_path / "r.json"
    r = cli("optimize", inp, out, "--passes", "cleanup,quantize", "--calib", write_calib(tmp_path / "calib", calib),
            "--report", rep, "-q")
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["budget_source"] == "default" and report["budget_met"] is True
    assert report["fidelity"]["cosine"] >= DEFAULT_BUDGET_COSINE
    assert np.mean(cosines(m, onnx.load(out), unseen)) >= DEFAULT_BUDGET_COSINE


# ------------------------------------------------------------------ 8. reproducible, through the CLI
def test_cli_twice_same_bytes(tmp_path):
    """The same command twice on a MobileNetV3-style classifier (HardSwish, squeeze-excite), every
    timing-based choice on (the quantize guard and the speed contract at its users' default): the
    same bytes. Timing decisions act only when statistically clear; a tie keeps the deterministic
    choice."""
    from models.build import demo_samples, mobilenet_v3_small

    m = mobilenet_v3_small()
    inp = save(m, tmp_path / "mnv3.onnx")
    calib = write_calib(tmp_path / "calib", [{"input": x} for x in demo_samples(16, seed=5, hw=64)])
    env = {k: v for k, v in os.environ.items() if k != "ONNXSHRINK_SPEED"}
    digests = []
    for k in range(2):
        out = tmp_path / f"out{k}.onnx"
        r = subprocess.run([sys.executable, "-m", "onnxshrink", "optimize", str(inp), str(out), "--passes",
                            "cleanup,quantize", "--calib", str(calib), "--seed", "3", "-q"], capture_output=True,
                           text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), timeout=600)
        assert r.returncode == 0, r.stderr
        digests.append(sha256(out))
    assert digests[0] == digests[1]
