"""share pass: packing, clustering, the Gather graph in onnxruntime, pinned zeros, data-aware
clustering, the budgeted bit search, and (slow) the real-model targets."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.passes.base import Context
from onnxshrink.passes.share import SharePass, bit_planes, kmeans_1d, pack_indices, unpack_indices
from tests.helpers import check, run_ort

RNG = np.random.default_rng(0)


def _matmul_model(w: np.ndarray, as_constant_node: bool = False) -> onnx.ModelProto:
    k, n = w.shape
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", k])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])
    nodes, inits = [], []
    if as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _conv_model(w: np.ndarray, b: np.ndarray, group: int = 1) -> onnx.ModelProto:
    m = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, {w.shape[1] * group}, 12, 12] x) => (float[1, {w.shape[0]}, 12, 12] y) {{
            y = Conv <pads = [1, 1, 1, 1], group = {group}> (x, W, B)
        }}""")
    m.graph.initializer.extend([numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return m


def _share(model, ctx=None, **opts):
    ctx = ctx or Context(template=model)
    res = SharePass(**opts).run(model_to_graph(model), ctx)
    return graph_to_model(res.graph, model), res


def _weight_out(model, k):
    """The rebuilt weight as onnxruntime computes it: feed the identity to x @ W."""
    return run_ort(model, {"x": np.eye(k, dtype=np.float32)})[0]


# ------------------------------------------------------------------ packing and clustering
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip(bits):
    for n in (1, 5, 8, 999, 4096):
        a = RNG.integers(0, 2 ** bits, n)
        planes = pack_indices(a, bits)
        assert sum(w for w, _, _ in planes) == bits
        assert sum(p.nbytes for _, _, p in planes) == sum(-(-n // (8 // w)) for w, _ in bit_planes(bits))
        assert np.array_equal(unpack_indices(planes, n), a)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_indices(np.array([0, 4]), 2)


def test_kmeans_keeps_outliers_and_beats_uniform():
    x = np.concatenate([RNG.normal(0, 0.05, 20000), [3.0, -2.5, 4.0]])
    c, lab = kmeans_1d(x, 16)
    assert np.all(np.diff(c) >= 0) and lab.shape == x.shape
    err = np.sum((x - c[lab]) ** 2)
    grid = np.linspace(x.min(), x.max(), 16)
    uerr = np.sum((x - grid[np.argmin(np.abs(x[:, None] - grid[None]), axis=1)]) ** 2)
    assert err < 0.2 * uerr
    assert np.max(np.abs(x - c[lab])[-3:]) < 0.3  # the outliers are represented


def test_kmeans_exact_when_few_values():
    x = np.array([0.5, -1.0, 0.5, 2.0, -1.0])
    c, lab = kmeans_1d(x, 4)
    assert np.array_equal(c[lab], x)


# ------------------------------------------------------------------ the graph
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_ort_runs_the_shared_matmul_and_matches_the_codebook(bits):
    w = RNG.normal(size=(64, 96)).astype(np.float32)
    m = _matmul_model(w)
    out, res = _share(m, bits=bits, min_elements=16)
    check(out)
    assert res.modified and res.stats["layers"][0]["bits"] == bits
    ops = {n.op_type for n in out.graph.node}
    assert "Gather" in ops and not any(t.name == "W" for t in out.graph.initializer)
    rebuilt = _weight_out(out, 64)
    assert len(np.unique(rebuilt / rebuilt.std(axis=0, keepdims=True).round(6))) > 1
    # the weight graph is exact: optimized and unoptimized sessions agree with each other
    opt = run_ort(out, {"x": np.eye(64, dtype=np.float32)}, optimize=True)[0]
    np.testing.assert_array_equal(rebuilt, opt)
    err = np.sum((rebuilt - w) ** 2) / np.sum(w ** 2)
    assert err == pytest.approx(res.stats["layers"][0]["weight_err"], rel=1e-3)
    assert err < {2: 0.2, 3: 0.06, 4: 0.02, 6: 0.002, 8: 2e-4}[bits]


def test_file_shrinks_and_onnxruntime_folds_the_rebuild():
    w = RNG.normal(size=(256, 512)).astype(np.float32)
    m = _matmul_model(w)
    out, res = _share(m, bits=4)
    assert out.ByteSize() < 0.15 * m.ByteSize()
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
        folded = onnx.load(so.optimized_model_filepath)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]  # unpack + Gather folded at session start


def test_constant_node_weights_are_shared():
    w = RNG.normal(size=(48, 40)).astype(np.float32)
    m = _matmul_model(w, as_constant_node=True)
    out, res = _share(m, bits=3, min_elements=16)
    check(out)
    assert res.modified
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    rebuilt = _weight_out(out, 48)
    assert len(np.unique(rebuilt)) <= 8 * 40  # one codebook, per-column scale


@pytest.mark.parametrize("groups,scale", [(1, False), (4, False), (4, True), (1, True)])
def test_conv_groups_and_channel_scale(groups, scale):
    w = (RNG.normal(size=(16, 8, 3, 3)) * RNG.uniform(0.1, 3, size=(16, 1, 1, 1))).astype(np.float32)
    b = RNG.normal(size=16).astype(np.float32)
    m = _conv_model(w, b)
    x = RNG.normal(size=(1, 8, 12, 12)).astype(np.float32)
    out, res = _share(m, bits=3, groups=groups, channel_scale=scale, min_elements=16)
    check(out)
    layer = res.stats["layers"][0]
    assert layer["codebook"] == groups * 8
    ref = run_ort(m, {"x": x})[0]
    got = run_ort(out, {"x": x})[0]
    cos = float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.97
    np.testing.assert_allclose(got, run_ort(out, {"x": x}, optimize=True)[0], rtol=1e-5, atol=1e-5)


def test_pinned_zeros_stay_exact_after_pruning():
    w = RNG.normal(size=(64, 64)).astype(np.float32)
    w[RNG.random(w.shape) < 0.4] = 0.0  # what magnitude pruning leaves
    w[:, :8] = 0.0                       # and whole pruned channels
    m = _matmul_model(w)
    for bits in (2, 3, 4):
        out, res = _share(m, bits=bits, min_elements=16)
        rebuilt = _weight_out(out, 64)
        assert np.all(rebuilt[w == 0] == 0.0)
        assert np.count_nonzero(rebuilt[w != 0] == 0) < 0.5 * np.count_nonzero(w)


def test_weaker_raises_bits():
    p = SharePass(bits=3)
    assert p.weaker().options.bits == 4 and p.weaker().weaker().options.bits == 5
    assert SharePass(bits=8).weaker() is None
    q = SharePass()
    assert q.weaker().options.min_bits == 3


# ------------------------------------------------------------------ data awareness
def test_data_aware_beats_plain_kmeans_on_output_error():
    k, n = 64, 64
    feat_scale = np.exp(RNG.normal(0, 1.5, size=k)).astype(np.float32)  # very uneven input energies
    # weights of low-energy inputs are large (as after folding a normalisation): plain k-means spends
    # its centroids on them although they barely move the output
    w = (RNG.normal(size=(k, n)) / feat_scale[:, None]).astype(np.float32)
    m = _matmul_model(w)
    calib = [{"x": (RNG.normal(size=(16, k)) * feat_scale).astype(np.float32)} for _ in range(8)]
    held = (RNG.normal(size=(256, k)) * feat_scale).astype(np.float32)
    ref = held @ w
    errs = {}
    for aware in (True, False):
        ctx = Context(template=m, calib=calib)
        out, res = _share(m, ctx, bits=3, data_aware=aware, channel_scale=False, min_elements=16)
        assert res.stats["data_aware"] is aware
        y = run_ort(out, {"x": held})[0]
        errs[aware] = float(np.sum((y - ref) ** 2) / np.sum(ref ** 2))
    assert errs[True] < 0.7 * errs[False], errs


def test_budget_search_through_the_manager():
    from onnxshrink.pipeline.manager import PassManager

    rng = np.random.default_rng(7)  # its own: the module's RNG state depends on the tests run before
    w1 = rng.normal(size=(32, 64)).astype(np.float32)
    w2 = rng.normal(size=(64, 16)).astype(np.float32) * 0.1
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[4, 32] x) => (float[4, 16] y) {
            h = MatMul(x, W1)
            r = Relu(h)
            y = MatMul(r, W2)
        }""")
    m.graph.initializer.extend([numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    data = [{"x": rng.normal(size=(4, 32)).astype(np.float32)} for _ in range(12)]
    pm = PassManager([{"share": {"min_elements": 256}}], data=data, budget="cosine>=0.999")
    out, rep = pm.run(m)
    rec = rep.passes[0]
    assert rec.status == "applied", rec.reason
    assert rep.fidelity["cosine"] >= 0.999
    bits = [layer["bits"] for layer in rec.stats["layers"]]
    assert len(bits) == 2 and all(b in (2, 3, 4, 6, 8, "float") for b in bits)
    assert rec.stats["search"]["evaluations"] >= 3
    check(out)


def test_nothing_to_share():
    m = _matmul_model(RNG.normal(size=(4, 4)).astype(np.float32))
    _, res = _share(m)
    assert not res.modified and res.reason.startswith("no float weight with >= ")


# ------------------------------------------------------------------ real models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_rec", "yolov8n"])
def test_real_model_targets(name, real_model_path, tmp_path):
    from benchmarks.share_bench import bench

    row = bench(name, real_model_path(name), tmp_path)
    assert row["valid"]
    assert row["cosine_heldout"] >= 0.99
    assert row["speed_ratio"] >= 0.95
    # rec: 0.194 with 24 samples before cleanup fused its hard-swishes; 0.201 with 32 since (with 24
    # the search's choice missed the budget on the 6 test samples: 0.9898)
    assert row["size_ratio"] <= 0.21


def test_error_feedback_on_a_3x3_conv_lowers_output_error():
    w = RNG.normal(size=(16, 8, 3, 3)).astype(np.float32)
    b = RNG.normal(size=16).astype(np.float32)
    m = _conv_model(w, b)
    base = RNG.normal(size=(1, 8, 12, 12)).astype(np.float32)
    # correlated inputs: the case where the full E[x x^T] (not its diagonal) matters
    calib = [{"x": (base + 0.3 * RNG.normal(size=base.shape)).astype(np.float32)} for _ in range(6)]
    held = [(base + 0.3 * RNG.normal(size=base.shape)).astype(np.float32) for _ in range(4)]
    errs = {}
    for fb in (True, False):
        ctx = Context(template=m, calib=calib)
        out, res = _share(m, ctx, bits=3, error_feedback=fb, min_elements=16)
        check(out)
        e = 0.0
        for x in held:
            ref, got = run_ort(m, {"x": x})[0], run_ort(out, {"x": x})[0]
            e += float(np.sum((ref - got) ** 2) / np.sum(ref ** 2))
        errs[fb] = e
    assert errs[True] < errs[False], errs
