"""PassManager on unusual graphs: If/Loop/Scan subgraphs, custom-domain and contrib ops,
several inputs and outputs, omitted optional inputs, inputs with initializer defaults, integer
and bool inputs; plus determinism (same inputs, options and seed -> byte-identical output).

Every case runs the lossless test pass ``t_strip_identity`` (and the real ``cleanup`` pass when
it is registered): the result must pass the full checker, run in onnxruntime with outputs equal
to the original's, keep subgraph bodies working, and keep custom ops untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tests.fake_passes  # noqa: F401
from models.build import mlp, mobilenet_small, transformer_block
from onnxshrink import PassManager, optimize
from onnxshrink.passes.registry import registry
from tests.helpers import assert_outputs_close, run_ort
from tests.reliability_helpers import init, model, run_cli, sha256, vi, write_npy_dir

LOSSLESS = ["t_strip_identity"] + (["cleanup"] if "cleanup" in registry() else [])


def _bodies(m: onnx.ModelProto) -> dict:
    """{node name/attr: body node op types} of every subgraph in the main graph."""
    out = {}
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out[f"{n.op_type}.{a.name}"] = [x.op_type for x in a.g.node]
    return out


def _run_lossless(m: onnx.ModelProto, feeds_list: list[dict], passes=None, **kw):
    passes = passes or LOSSLESS
    out, rep = PassManager(passes, data=feeds_list, **kw).run(m)
    onnx.checker.check_model(out, full_check=True)
    for feeds in feeds_list:
        assert_outputs_close(run_ort(m, feeds), run_ort(out, feeds))
    return out, rep


# ---------------------------------------------------------------------------- subgraphs
def if_model():
    """y = If(c, Relu(xi) * w, Neg(xi)); xi = Identity(x) in the outer graph (outer-scope use)."""
    w = init("w", np.full((1, 4), 2.0, np.float32))
    then_g = helper.make_graph([helper.make_node("Relu", ["xi"], ["t0"]), helper.make_node("Mul", ["t0", "w"], ["t"]),
                                helper.make_node("Identity", ["t"], ["t_out"])], "then", [], [vi("t_out", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["xi"], ["e"])], "else", [], [vi("e", [1, 4])])
    return model([helper.make_node("Identity", ["x"], ["xi"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                 [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])], [w])


def loop_model():
    """acc_{i+1} = acc_i + x * i for i < M; outputs the final acc and the scan of partial sums."""
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["xo", "fi"], ["xi"]),
         helper.make_node("Add", ["acc_in", "xi"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [1, 3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [1, 3]), vi("scan_out", [1, 3])])
    return model([helper.make_node("Identity", ["x"], ["xo"]),
                  helper.make_node("Loop", ["M", "", "acc0"], ["acc", "partials"], body=body)],
                 [vi("x", [1, 3]), vi("M", [], TensorProto.INT64), vi("acc0", [1, 3])],
                 [vi("acc", [1, 3]), vi("partials", [None, 1, 3])])


def scan_model():
    """Running sum over the sequence axis with Scan (opset 9+ form, no batch axis)."""
    body = helper.make_graph([helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
                              helper.make_node("Identity", ["s_out"], ["y_t"])], "scan_body",
                             [vi("s_in", [4]), vi("x_t", [4])], [vi("s_out", [4]), vi("y_t", [4])])
    return model([helper.make_node("Identity", ["seq"], ["seq_i"]),
                  helper.make_node("Scan", ["s0", "seq_i"], ["s", "ys"], body=body, num_scan_inputs=1)],
                 [vi("s0", [4]), vi("seq", [5, 4])], [vi("s", [4]), vi("ys", [5, 4])])


def test_if_subgraph():
    m = if_model()
    feeds = [{"x": np.array([[-1, 2, -3, 4]], np.float32), "c": np.array(c)} for c in (True, False)]
    out, rep = _run_lossless(m, feeds)
    assert rep.passes[0].status == "applied"
    bodies = _bodies(out)
    assert bodies["If.then_branch"][:2] == ["Relu", "Mul"] and bodies["If.else_branch"] == ["Neg"]


def test_loop_subgraph():
    m = loop_model()
    feeds = [{"x": np.arange(3, dtype=np.float32)[None], "M": np.array(n, np.int64),
              "acc0": np.ones((1, 3), np.float32)} for n in (0, 1, 4)]
    out, _ = _run_lossless(m, feeds)
    assert "Add" in _bodies(out)["Loop.body"]


def test_scan_subgraph():
    m = scan_model()
    rng = np.random.default_rng(0)
    feeds = [{"s0": np.zeros(4, np.float32), "seq": rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(2)]
    out, _ = _run_lossless(m, feeds)
    assert _bodies(out)["Scan.body"][0] == "Add"


# ---------------------------------------------------------------------------- custom and contrib ops
def test_contrib_op_left_alone():
    """A com.microsoft op onnxruntime runs (FusedMatMul): kept as is; the rest is processed."""
    rng = np.random.default_rng(0)
    m = model([helper.make_node("Identity", ["x"], ["xi"]),
               helper.make_node("FusedMatMul", ["xi", "W"], ["h"], domain="com.microsoft", alpha=0.5, transB=1),
               helper.make_node("Relu", ["h"], ["y"])],
              [vi("x", [2, 8])], [vi("y", [2, 4])], [init("W", rng.standard_normal((4, 8)).astype(np.float32))],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(2)]
    out, rep = _run_lossless(m, feeds)
    fused = [n for n in out.graph.node if n.op_type == "FusedMatMul"]
    assert len(fused) == 1 and fused[0].domain == "com.microsoft"
    assert {a.name: helper.get_attribute_value(a) for a in fused[0].attribute} == {"alpha": 0.5, "transB": 1}
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    assert "Identity" not in [n.op_type for n in out.graph.node]


def test_custom_domain_with_function_kept():
    """A custom-domain op defined by a model-local function (runs in onnxruntime): untouched,
    the function and its opset import survive."""
    fn = helper.make_function("my.ops", "Swish", ["X"], ["Y"],
                              [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
                              [helper.make_opsetid("", 17)])
    m = model([helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Swish", ["xi"], ["y"], domain="my.ops")],
              [vi("x", [1, 4])], [vi("y", [1, 4])],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    m.functions.append(fn)
    feeds = [{"x": np.array([[-2, -1, 1, 2]], np.float32)}]
    out, _ = _run_lossless(m, feeds)
    assert [f.name for f in out.functions] == ["Swish"]
    assert [n.op_type for n in out.graph.node if n.domain == "my.ops"] == ["Swish"]


# ---------------------------------------------------------------------------- inputs and outputs
def test_multi_input_multi_output():
    rng = np.random.default_rng(1)
    m = model([helper.make_node("Identity", ["a"], ["ai"]), helper.make_node("MatMul", ["ai", "W"], ["h"]),
               helper.make_node("Add", ["h", "b"], ["y"]), helper.make_node("ReduceSum", ["ai"], ["z"], keepdims=1),
               helper.make_node("Identity", ["z"], ["z2"])],
              [vi("a", [1, 8]), vi("b", [1, 4])], [vi("y", [1, 4]), vi("z", [1, 1]), vi("z2", [1, 1])],
              [init("W", rng.standard_normal((8, 4)).astype(np.float32))])
    feeds = [{"a": rng.standard_normal((1, 8)).astype(np.float32), "b": rng.standard_normal((1, 4)).astype(np.float32)}
             for _ in range(3)]
    out, _ = _run_lossless(m, feeds)
    assert [o.name for o in out.graph.output] == ["y", "z", "z2"]
    assert [i.name for i in out.graph.input] == ["a", "b"]


def test_multi_input_from_npz_folder(tmp_path):
    """Several inputs through the CLI with a folder of .npz files."""
    from tests.reliability_helpers import two_input_model
    src = tmp_path / "m.onnx"
    onnx.save(two_input_model(), str(src))
    (tmp_path / "cal").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        np.savez(tmp_path / "cal" / f"{i}.npz", a=rng.standard_normal((1, 8)).astype(np.float32),
                 b=rng.standard_normal((1, 4)).astype(np.float32))
    r = run_cli("optimize", src, tmp_path / "o.onnx", "--calib", tmp_path / "cal", "-p", "t_needs_data", "-q")
    assert r.code == 0, r.err


def test_omitted_optional_inputs():
    """Ops with omitted optional inputs ('' names): Clip with only a max, Resize with no roi."""
    m = model([helper.make_node("Identity", ["x"], ["xi"]),
               helper.make_node("Clip", ["xi", "", "hi"], ["c"]),
               helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest")],
              [vi("x", [1, 1, 2, 2])], [vi("y", [1, 1, 4, 4])],
              [init("hi", np.float32(0.5)), init("scales", np.array([1, 1, 2, 2], np.float32))])
    feeds = [{"x": np.array([[[[0.1, 0.9], [-1.0, 0.4]]]], np.float32)}]
    out, _ = _run_lossless(m, feeds)
    clip = next(n for n in out.graph.node if n.op_type == "Clip")
    assert list(clip.input)[1] == "" and len(clip.input) == 3


def test_input_with_initializer_default():
    """A graph input that also has an initializer (a default a caller may override) is not a data
    input: samples need not give it, and it stays overridable."""
    m = model([helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Mul", ["xi", "scale"], ["y"])],
              [vi("x", [1, 4]), vi("scale", [1])], [vi("y", [1, 4])], [init("scale", np.array([3.0], np.float32))],
              ir_version=8)
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    out, _ = _run_lossless(m, feeds)
    y = run_ort(out, {"x": np.ones((1, 4), np.float32), "scale": np.array([5.0], np.float32)})[0]
    assert np.allclose(y, 5.0)  # still overridable


def test_integer_and_bool_inputs():
    """int64 token ids (Gather from an embedding), an int32 input and a bool mask."""
    rng = np.random.default_rng(0)
    m = model([helper.make_node("Gather", ["emb", "ids"], ["e"]),
               helper.make_node("Identity", ["e"], ["ei"]),
               helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
               helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"]),
               helper.make_node("Mul", ["ei", "mu"], ["y"]),
               helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
               helper.make_node("Add", ["kf", "one"], ["z"])],
              [vi("ids", [1, 6], TensorProto.INT64), vi("mask", [1, 6], TensorProto.BOOL),
               vi("k", [1], TensorProto.INT32)],
              [vi("y", [1, 6, 4]), vi("z", [1])],
              [init("emb", rng.standard_normal((10, 4)).astype(np.float32)), init("ax", np.array([2], np.int64)),
               init("one", np.array([1.0], np.float32))])
    feeds = [{"ids": rng.integers(0, 10, (1, 6)).astype(np.int64), "mask": rng.integers(0, 2, (1, 6)).astype(bool),
              "k": np.array([i], np.int32)} for i in range(3)]
    _run_lossless(m, feeds)
    # without data: synthetic integers stay inside the embedding table (0..7 < 10)
    out, rep = PassManager(LOSSLESS).run(m)
    assert rep.data["synthetic"] is True
    # int32 samples for an int64 input are cast (same kind), float ones are refused
    ok = [{"ids": f["ids"].astype(np.int32), "mask": f["mask"], "k": f["k"]} for f in feeds]
    PassManager(["t_noop"], data=ok).run(m)


def test_dynamic_shapes_from_data():
    """A dynamic-batch model with batch-4 samples: fidelity measured on them."""
    m = mlp(dynamic_batch=True)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(3)]
    out, rep = _run_lossless(m, feeds, passes=["t_noop"])
    assert rep.fidelity["max_abs"] == 0.0


def test_transformer_and_cnn_lossless():
    rng = np.random.default_rng(0)
    for m, name, shape in ((transformer_block(), "x", (1, 16, 64)),
                           (mobilenet_small(pytorch_style=True), "input", (1, 3, 64, 64))):
        feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
        _run_lossless(m, feeds)


# ---------------------------------------------------------------------------- determinism
def test_deterministic_output_bytes(tmp_path):
    """Same input, passes, options and seed -> byte-identical model; another seed -> different."""
    src = tmp_path / "m.onnx"
    onnx.save(mobilenet_small(pytorch_style=True), str(src))
    rng = np.random.default_rng(0)
    cal = write_npy_dir(tmp_path / "cal", [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(4)])
    passes = ",".join(LOSSLESS + ["t_noise"])
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        o = tmp_path / f"o{i}.onnx"
        r = run_cli("optimize", src, o, "--calib", cal, "-p", passes, "-o", "t_noise.ratio=0.01", "--seed", seed, "-q")
        assert r.code == 0, r.err
        outs.append(sha256(o))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_deterministic_python_api(tmp_path):
    m = mlp()
    data = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(4)]
    a, _ = optimize(m, passes=LOSSLESS + [{"t_noise": {"ratio": 0.05}}], data=data, seed=1)
    b, _ = optimize(m, passes=LOSSLESS + [{"t_noise": {"ratio": 0.05}}], data=data, seed=1)
    assert a.SerializeToString() == b.SerializeToString()


def test_backoff_then_budget_holds():
    """A lossy pass breaking the budget is weakened until it holds (backed off)."""
    m = mlp()
    data = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(16)]
    out, rep = PassManager([{"t_noise": {"ratio": 0.8}}], data=data, budget="cosine>=0.99").run(m)
    rec = rep.passes[0]
    assert rec.status == "backed off" and rec.options["ratio"] < 0.8 and len(rec.attempts) >= 2
    assert rep.budget_met and rep.fidelity["cosine"] >= 0.99


@pytest.mark.parametrize("passes", [["t_noop"], ["t_strip_identity", "t_noop"]])
def test_input_model_object_not_mutated(passes):
    m = mobilenet_small(pytorch_style=True)
    before = m.SerializeToString()
    PassManager(passes).run(m)
    assert m.SerializeToString() == before


def test_interface_change_rolled_back():
    """Callers feed and fetch by name: a pass renaming an output is rolled back even though the
    values are equal."""
    m = mlp()
    out, rep = PassManager(["t_rename_output"]).run(m)
    assert rep.passes[0].status == "rolled back"
    assert rep.passes[0].reason == "the model's interface changed: outputs ['logits'] became ['logits_renamed']"
    assert [o.name for o in out.graph.output] == ["logits"]


REAL_PASSES = [n for n in ("prune", "sparsify", "svd", "share", "quantize")]


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", REAL_PASSES)
def test_deterministic_real_passes_on_demo(tmp_path, pass_name):
    """Every real pass, twice on the bundled demo with its calibration data and the same seed:
    byte-identical outputs. quantize runs without its speed guard, whose decision comes from
    measured latency (a timing, not a function of the inputs); everything else it decides is."""
    if pass_name not in registry():
        pytest.skip(f"pass {pass_name} not registered in this branch")
    from pathlib import Path
    demo = Path(__file__).resolve().parents[1] / "models" / "demo"
    hashes = []
    for i in range(2):
        o = tmp_path / f"o{i}.onnx"
        extra = ["-o", "quantize.guard=false"] if pass_name == "quantize" else []
        r = run_cli("optimize", demo / "demo_cnn.onnx", o, "--calib", demo / "calib", "-p", f"cleanup,{pass_name}",
                    "--seed", 3, "-q", *extra)
        assert r.code in (0, 4), r.err
        if r.code == 4:
            pytest.skip(f"{pass_name}: budget not met on the demo")
        hashes.append(sha256(o))
    assert hashes[0] == hashes[1]


def test_small_models_are_not_collected_between_passes(monkeypatch):
    """A pass's graph is collected (``gc.collect``, 20-90 ms) only where its weights are big: a small
    model's passes run without a collection between them; from 0 bytes on, every pass is followed by one."""
    from onnxshrink.pipeline import manager
    calls = []
    monkeypatch.setattr(manager.gc, "collect", lambda *a: calls.append(1) or 0)
    m = mlp()
    optimize(m, passes=["cleanup", "cleanup"], speed="off")
    assert calls == []
    monkeypatch.setattr(manager, "COLLECT_FROM_BYTES", 0)
    optimize(m, passes=["cleanup", "cleanup"], speed="off")
    assert len(calls) >= 2


def _slowed(monkeypatch, method: str, seconds: float) -> None:
    """``PassManager.<method>`` made ``seconds`` slower, to see where the report counts its time."""
    import time

    from onnxshrink.pipeline import manager
    real = getattr(manager.PassManager, method)

    def slow(self, *a, **k):
        time.sleep(seconds)
        return real(self, *a, **k)
    monkeypatch.setattr(manager.PassManager, method, slow)


def test_report_says_where_the_time_went(monkeypatch):
    """``Report.timings_s``: the run's wall time by phase (``report.PHASES``, in run order) and its total,
    which the phases add up to; the passes' phase holds every pass's own time, time spent in a phase
    is counted there (a speed contract slowed by 0.3 s), and --latency adds its own phase."""
    from onnxshrink.pipeline.report import PHASES
    from tests.helpers import model_samples

    _slowed(monkeypatch, "_speed_contract", 0.3)
    m = mlp()
    _, rep = optimize(m, passes=["cleanup", "cleanup"], data=model_samples(m, 8), speed="off")
    t = rep.timings_s
    assert list(t) == ["input", "reference_outputs", "passes", "speed_contract", "verdict", "total"]
    assert abs(sum(v for k, v in t.items() if k != "total") - t["total"]) < 0.01
    assert t["passes"] >= sum(p.wall_time_s for p in rep.passes) - 0.01
    assert 0.3 <= t["speed_contract"] < t["total"]
    _, rep = optimize(m, passes=["cleanup"], data=model_samples(m, 8), speed="off", measure_speed=True)
    # every phase but the emission (no target), in PHASES' order
    assert [k for k in PHASES if k != "emission"] == [k for k in rep.timings_s if k != "total"]


def test_with_a_target_the_emission_is_a_phase_of_its_own(monkeypatch):
    """With --target the passes' result is emitted for the target before the speed contract: its time
    (on openvino the EP's check and timing) is the ``emission`` phase, not the contract's."""
    from tests.helpers import model_samples

    _slowed(monkeypatch, "_emit", 0.3)
    m = mlp()
    _, rep = optimize(m, passes=["cleanup"], data=model_samples(m, 8), speed="off", target="cpu", budget="none")
    t = rep.timings_s
    assert list(t) == ["input", "reference_outputs", "passes", "emission", "speed_contract", "verdict", "total"]
    assert t["emission"] >= 0.3 and t["speed_contract"] < 0.3
    assert abs(sum(v for k, v in t.items() if k != "total") - t["total"]) < 0.01


def test_outputs_that_do_not_depend_on_the_input_are_warned_about():
    """A model whose outputs are the same on every sample (a zero-initialised head: the output is its
    bias) passes any fidelity budget with cosine 1.0: the report warns that the figures compare
    constants; a model whose outputs vary gets no such warning."""
    from tests.helpers import model_samples

    m = mlp()
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(m)
    last = [n for n in zeroed.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    for t in zeroed.graph.initializer:
        if t.name == last.input[1]:
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(t)), t.name))
    data = model_samples(m, 16)
    _, rep = optimize(zeroed, passes=["cleanup"], data=data, speed="off")
    assert rep.fidelity["cosine"] > 1 - 1e-12
    assert any("outputs are the same on every selection and test sample" in w for w in rep.warnings), rep.warnings
    _, rep = optimize(m, passes=["cleanup"], data=data, speed="off")
    assert not any("outputs are the same on every" in w for w in rep.warnings), rep.warnings


def test_a_test_miss_that_the_selection_held_says_how_the_roles_were_drawn():
    """Test samples unlike the selection ones (here every 4th file, the test role's, is 10x larger and a
    lossy pass saturates it): the budget holds on selection and misses on test; the exit-4 message
    says the selection held it and how files are assigned to roles (what the user can change)."""
    from onnxshrink.errors import BudgetError
    rng = np.random.default_rng(0)
    m = mlp()
    name = m.graph.input[0].name
    shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    data = [{name: (rng.standard_normal(shape) * (10.0 if i % 4 == 3 else 1.0)).astype(np.float32)}
            for i in range(32)]
    with pytest.raises(BudgetError) as e:
        optimize(m, passes=["t_clip_input"], data=data, budget="cosine>=0.999")
    msg = str(e.value)
    assert msg.startswith("budget cosine>=0.999 not met on the 8 test samples")
    assert "(the selection samples hold it, cosine=" in msg and "roles go by file order" in msg
    assert e.value.report.selection_fidelity["cosine"] >= 0.999 > e.value.report.fidelity["cosine"]
