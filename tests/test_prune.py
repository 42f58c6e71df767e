"""prune pass: lossless removal of zero/constant channels through every index map, shape fix-ups,
bias folding of constant channels, importance pruning with least-squares refit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_outputs_close, check, run_ort
from onnx import helper, numpy_helper
from prune_helpers import single_input_model, zero_channels

from onnxshrink.graph.channels import analyze
from onnxshrink.graph.cost import model_cost
from onnxshrink.metrics import fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.prune import PrunePass
from onnxshrink.pipeline.manager import optimize

RNG = np.random.default_rng(0)


def W(*shape, name, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def I64(vals, name):
    return numpy_helper.from_array(np.array(vals, np.int64), name)


def model(nodes, inits, x_shape=(1, 3, 8, 8), opset=17):
    return single_input_model(nodes, inits, x_shape, "y", opset)


class _Samples(list):
    def get(self, i):
        return self[i]


def feeds(m, n=1, seed=1):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run_pass(m, calib=None, **opts):
    ctx = Context(calib=_Samples(calib or feeds(m, 2)), template=m)
    opts.setdefault("latency", False)
    res = PrunePass(**opts).run(gs.import_onnx(m), ctx)
    return ctx.to_model(res.graph), res


def assert_lossless(m, out, n=2):
    check(out)
    for f in feeds(m, n, seed=7):
        assert_outputs_close(run_ort(m, f), run_ort(out, f), 1e-5)


def zeroed(m, ratio=0.5, seed=0):
    z, info = zero_channels(m, ratio, seed)
    assert info["units"] > 0
    return z, info


def params(m):
    return model_cost(m)["params"]


# ------------------------------------------------------------------ lossless, per index map

def _concat_model():
    return model([
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="ca", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("BatchNormalization", ["b", "s", "bb", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Concat", ["ar", "bn"], ["c"], axis=1),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "wc"], ["y"], name="cc", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    ], [W(8, 3, 3, 3, name="wa"), W(8, name="ba"), W(8, 3, 1, 1, name="wb"),
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, 8).astype(np.float32), "s"), W(8, name="bb"), W(8, name="mu"),
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, 8).astype(np.float32), "var"), W(4, 16, 3, 3, name="wc")])


def test_concat_lossless_removal():
    m = _concat_model()
    z, info = zeroed(m)
    out, res = run_pass(z)
    assert res.modified and res.stats["removed_units"] == info["units"] == 8
    assert_lossless(z, out)
    wc = next(t for t in out.graph.initializer if t.name.startswith("wc"))
    assert list(wc.dims) == [4, 8, 3, 3]


def test_split_sizes_follow():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Split", ["a", "sizes"], ["s1", "s2"], axis=1, name="split"),
        helper.make_node("Conv", ["s1", "w1"], ["t1"], name="c1"),
        helper.make_node("Conv", ["s2", "w2"], ["t2"], name="c2"),
        helper.make_node("Concat", ["t1", "t2", "s2"], ["y"], axis=1),
    ], [W(8, 3, 1, 1, name="w0"), I64([4, 4], "sizes"), W(4, 4, 1, 1, name="w1"), W(4, 4, 1, 1, name="w2")])
    # zero channels 0 and 1 (first split part) of c0: they are not in the graph output part
    z = onnx.ModelProto()
    z.CopyFrom(m)
    w0 = numpy_helper.to_array(z.graph.initializer[0]).copy()
    w0[[0, 1]] = 0
    z.graph.initializer[0].CopyFrom(numpy_helper.from_array(w0, "w0"))
    out, res = run_pass(z)
    assert res.stats["removed_units"] == 2
    assert_lossless(z, out)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    sizes = next(t for t in out.graph.initializer if t.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [2, 4]


def test_split_without_sizes_opset11_attr():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Split", ["a"], ["s1", "s2"], axis=1, name="split"),
        helper.make_node("Conv", ["s1", "w1"], ["t1"], name="c1"),
        helper.make_node("Conv", ["s2", "w2"], ["t2"], name="c2"),
        helper.make_node("Add", ["t1", "t2"], ["y"]),
    ], [W(8, 3, 1, 1, name="w0"), W(4, 4, 1, 1, name="w1"), W(4, 4, 1, 1, name="w2")], opset=11)
    z, _ = zeroed(m)
    out, res = run_pass(z)
    assert res.modified
    assert_lossless(z, out)


def test_flatten_to_gemm_removes_feature_blocks():
    m = model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0", strides=[4, 4]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ], [W(6, 3, 1, 1, name="w0"), W(6, name="b0"), W(5, 24, name="wg"), W(5, name="bg")])
    z, info = zeroed(m)
    out, res = run_pass(z)
    assert res.stats["removed_units"] == 3
    assert_lossless(z, out)
    wg = next(t for t in out.graph.initializer if t.name.startswith("wg"))
    assert list(wg.dims) == [5, 12]


def test_reshape_shape_constant_follows():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", strides=[4, 4]),
        helper.make_node("Reshape", ["a", "shape"], ["f"], name="rs"),
        helper.make_node("MatMul", ["f", "wm"], ["y"], name="mm"),
    ], [W(6, 3, 1, 1, name="w0"), I64([1, 24], "shape"), W(24, 5, name="wm")])
    z, _ = zeroed(m)
    out, res = run_pass(z)
    assert_lossless(z, out)
    rs = next(n for n in out.graph.node if n.op_type == "Reshape")
    shape = next(t for t in out.graph.initializer if t.name == rs.input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, 12]


def test_depthwise_group_attribute_follows():
    m = model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ], [W(8, 3, 1, 1, name="w0"), W(8, name="b0"), W(8, 1, 3, 3, name="wd"), W(8, name="bd"), W(4, 8, 3, 3, name="w2")])
    z, _ = zeroed(m)
    out, res = run_pass(z)
    assert res.stats["removed_units"] == 4
    assert_lossless(z, out)
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4


def test_residual_group_removed_everywhere():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w1", "b1"], ["b"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="res"),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("Conv", ["sr", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ], [W(8, 3, 1, 1, name="w0"), W(8, 8, 3, 3, name="w1"), W(8, name="b1"), W(2, 8, 3, 3, name="w2")])
    z, _ = zeroed(m)
    out, res = run_pass(z)
    assert res.stats["removed_units"] == 4
    assert_lossless(z, out)
    w1 = next(t for t in out.graph.initializer if t.name.startswith("w1"))
    assert list(w1.dims) == [4, 4, 3, 3]


def test_se_block_lossless():
    m = model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Conv", ["p", "ws1", "bs1"], ["s1"], name="se1"),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se2"),
        helper.make_node("HardSigmoid", ["s2"], ["g"]),
        helper.make_node("Mul", ["a", "g"], ["m"], name="scale"),
        helper.make_node("Conv", ["m", "w3"], ["y"], name="c3", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    ], [W(8, 3, 1, 1, name="w0"), W(8, name="b0"), W(4, 8, 1, 1, name="ws1"), W(4, name="bs1"),
        W(8, 4, 1, 1, name="ws2"), W(8, name="bs2"), W(4, 8, 3, 3, name="w3")])
    z, info = zeroed(m)
    out, res = run_pass(z)
    assert res.stats["removed_units"] == info["units"] == 6  # 4 of 8 features + 2 of 4 squeeze units
    assert_lossless(z, out)


def test_channel_shuffle_lossless():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Reshape", ["a", "s5"], ["r5"], name="r1"),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["r4"], name="r2"),
        helper.make_node("Conv", ["r4", "w1"], ["y"], name="c1"),
    ], [W(8, 3, 1, 1, name="w0"), I64([1, 2, 4, 8, 8], "s5"), I64([1, 8, 8, 8], "s4"), W(2, 8, 1, 1, name="w1")])
    z, info = zeroed(m)
    out, res = run_pass(z)
    assert res.stats["removed_channels"] == 4
    assert_lossless(z, out)


def _bn(name, c):
    return [numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), f"{name}_s"), W(c, name=f"{name}_b"),
            W(c, name=f"{name}_m"), numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), f"{name}_v")]


def _shuffle_unit():
    """A ShuffleNet v1 stage in miniature: stem conv; downsampling-style unit (grouped 1x1 conv,
    channel shuffle, depthwise 3x3, grouped 1x1 conv) concatenated with an AveragePool shortcut;
    then a residual unit whose grouped convs read the concatenation (groups straddle both parts)."""
    def bn(n, c):
        return helper.make_node("BatchNormalization", [f"{n}_in", f"{n}_s", f"{n}_b", f"{n}_m", f"{n}_v"],
                                [f"{n}_out"], name=n)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["r0"], name="stem"),
        helper.make_node("Conv", ["r0", "wg1"], ["bn1_in"], name="g1", group=2),
        bn("bn1", 8),
        helper.make_node("Relu", ["bn1_out"], ["a"]),
        helper.make_node("Reshape", ["a", "s5"], ["a5"], name="sh1"),
        helper.make_node("Transpose", ["a5"], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["s"], name="sh2"),
        helper.make_node("Conv", ["s", "wd"], ["bn2_in"], name="dw", group=8, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        bn("bn2", 8),
        helper.make_node("Conv", ["bn2_out", "wg2"], ["b"], name="g2", group=2),
        helper.make_node("AveragePool", ["r0"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["b", "p"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["c"]),
        helper.make_node("Conv", ["c", "wg3"], ["e"], name="g3", group=4),
        helper.make_node("Add", ["e", "c"], ["f"], name="res"),
        helper.make_node("Conv", ["f", "w4"], ["y"], name="head"),
    ]
    inits = [W(12, 3, 1, 1, name="w0"), W(8, 6, 1, 1, name="wg1"), *_bn("bn1", 8), I64([1, 2, 4, 8, 8], "s5"),
             I64([1, 8, 8, 8], "s4"), W(8, 1, 3, 3, name="wd"), *_bn("bn2", 8), W(8, 4, 1, 1, name="wg2"),
             W(20, 5, 1, 1, name="wg3"), W(3, 20, 1, 1, name="w4")]
    return model(nodes, inits)


def test_grouped_conv_removes_different_positions_per_group():
    m = model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "wg", "bg"], ["g"], name="gc", group=2, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["g", "w2"], ["y"], name="c2"),
    ], [W(8, 3, 1, 1, name="w0"), W(8, name="b0"), W(6, 4, 3, 3, name="wg"), W(6, name="bg"), W(2, 6, 1, 1, name="w2")])
    z = onnx.ModelProto()
    z.CopyFrom(m)
    init = {t.name: t for t in z.graph.initializer}
    w0, b0 = numpy_helper.to_array(init["w0"]).copy(), numpy_helper.to_array(init["b0"]).copy()
    w0[[1, 6]] = 0   # channel 1 of group 0 and channel 2 of group 1: equal counts, different positions
    b0[[1, 6]] = 0
    w0[3] = 0        # a third zero channel in group 0 only: removing it would unbalance the groups
    b0[3] = 0
    init["w0"].CopyFrom(numpy_helper.from_array(w0, "w0"))
    init["b0"].CopyFrom(numpy_helper.from_array(b0, "b0"))
    wg = numpy_helper.to_array(init["wg"]).copy()
    wg[3] = 0        # output channel 0 of group 1
    init["wg"].CopyFrom(numpy_helper.from_array(wg, "wg"))
    out, res = run_pass(z)
    assert_lossless(z, out)
    dims = {t.name.split("_")[0]: list(t.dims) for t in out.graph.initializer}
    assert dims["w0"][0] == 6                  # 1 and 6 gone, 3 kept (its group partner would be missing)
    assert dims["wg"] == [6, 3, 3, 3]          # 3 input columns per group; no output channel (unbalanced)
    gw = next(t for t in out.graph.initializer if t.name.startswith("wg"))
    kept = numpy_helper.to_array(gw)
    np.testing.assert_array_equal(kept[:3], wg[:3][:, [0, 2, 3]])   # group 0 keeps columns 0, 2, 3
    np.testing.assert_array_equal(kept[3:], wg[3:][:, [0, 1, 3]])   # group 1 keeps columns 0, 1, 3


def test_shufflenet_unit_lossless():
    m = _shuffle_unit()
    a = analyze(gs.import_onnx(m))
    grp = {p: g for g in a.groups() for p in g.producers}
    # the shuffle ties channel j of both groups of g1 (a column of the 2 x 4 matrix): 4 units of 2;
    # the backbone (stem + g2 + g3 via the concat and the residual Add) keeps single channels
    assert grp["g1"].units == 4 and grp["g1"].balances == 2
    assert grp["stem"].units == 20 and set(grp["stem"].producers) == {"stem", "g2", "g3"}
    for seed in range(3):
        z, info = zero_channels(m, 0.4, seed)
        out, res = run_pass(z)
        assert res.stats["removed_units"] == info["units"] > 0
        assert_lossless(z, out)
    assert params(out) < 0.75 * params(m)


def test_shufflenet_unit_importance_keeps_groups_even():
    m = _shuffle_unit()
    out, r = run_pass(m, calib=feeds(m, 4), mode="importance", ratio=0.5, multiple_of=1, refit=True, samples=4)
    check(out)
    run_ort(out, feeds(m, 1)[0])
    assert r.stats["removed_units"] >= 8
    for n in out.graph.node:
        if n.op_type == "Conv":
            g = next((x.i for x in n.attribute if x.name == "group"), 1)
            w = next(t for t in out.graph.initializer if t.name == n.input[1])
            assert w.dims[0] % g == 0


def test_slice_bounds_follow():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["s"], name="sl"),
        helper.make_node("Conv", ["s", "w1"], ["t"], name="c1"),
        helper.make_node("Conv", ["a", "w2"], ["u"], name="c2"),
        helper.make_node("Concat", ["t", "u"], ["y"], axis=1),
    ], [W(6, 3, 1, 1, name="w0"), I64([2], "st"), I64([5], "en"), I64([1], "ax"), W(2, 3, 1, 1, name="w1"),
        W(2, 6, 1, 1, name="w2")])
    z = onnx.ModelProto()
    z.CopyFrom(m)
    w0 = numpy_helper.to_array(z.graph.initializer[0]).copy()
    w0[[0, 3]] = 0  # one before the slice, one inside it
    z.graph.initializer[0].CopyFrom(numpy_helper.from_array(w0, "w0"))
    out, res = run_pass(z)
    assert res.stats["removed_units"] == 2
    assert_lossless(z, out)
    sl = next(n for n in out.graph.node if n.op_type == "Slice")
    vals = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert vals[sl.input[1]] == [1] and vals[sl.input[2]] == [3]


def test_per_channel_dequantize_scales_follow():
    wq = RNG.integers(-100, 100, (6, 3, 1, 1)).astype(np.int8)
    wq[[1, 4]] = 0
    m = model([
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dq"),
        helper.make_node("Conv", ["x", "w"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1]),
    ], [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(RNG.uniform(0.01, 0.02, 6).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(6, np.int8), "wz"), W(2, 6, 3, 3, name="w1")])
    out, res = run_pass(m)
    assert res.stats["removed_units"] == 2
    assert_lossless(m, out)
    dims = {t.name.split("_pruned")[0]: list(t.dims) for t in out.graph.initializer}
    assert dims["wq"] == [4, 3, 1, 1] and dims["ws"] == [4] and dims["wz"] == [4]


def test_unprunable_groups_listed_with_reason():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("LRN", ["a"], ["l"], size=3, name="lrn"),
        helper.make_node("Conv", ["l", "w1"], ["y"], name="c1"),
    ], [W(4, 3, 1, 1, name="w0"), W(2, 4, 1, 1, name="w1")])
    out, res = run_pass(m)
    assert not res.modified
    reasons = [u["reason"] for u in res.stats["unprunable"]]
    assert any("no channel rule for LRN" in r for r in reasons)


# ------------------------------------------------------------------ constant channels -> bias

def _const_channel_model(k, pads, consumer="conv"):
    w0 = (RNG.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    w0[[1, 4]] = 0  # zero filters, nonzero bias: after BN and ReLU these channels are constants
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "s", "bb", "mu", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
    ]
    inits = [numpy_helper.from_array(w0, "w0"),
             numpy_helper.from_array((np.abs(RNG.standard_normal(6)) + 0.5).astype(np.float32), "b0"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, 6).astype(np.float32), "s"), W(6, name="bb"),
             W(6, name="mu"), numpy_helper.from_array(RNG.uniform(0.5, 1.5, 6).astype(np.float32), "var")]
    if consumer == "conv":
        nodes.append(helper.make_node("Conv", ["r", "w1", "b1"], ["y"], name="c1", pads=pads, kernel_shape=[k, k]))
        inits += [W(4, 6, k, k, name="w1"), W(4, name="b1")]
    else:
        nodes += [helper.make_node("Flatten", ["r"], ["f"]),
                  helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1, alpha=0.5)]
        inits.append(W(5, 6 * 64, name="wg"))
    return model(nodes, inits)


def test_constant_channels_fold_into_1x1_conv_bias():
    m = _const_channel_model(1, [0, 0, 0, 0])
    out, res = run_pass(m)
    assert res.stats["removed_units"] == 2
    assert_lossless(m, out)


def test_constant_channels_fold_into_gemm_bias():
    m = _const_channel_model(1, None, consumer="gemm")
    out, res = run_pass(m)
    assert res.stats["removed_units"] == 2
    assert_lossless(m, out)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 3  # a bias was created for the folded constants


def test_constant_channels_kept_before_padded_kxk_conv():
    m = _const_channel_model(3, [1, 1, 1, 1])
    out, res = run_pass(m)
    assert not res.modified  # folding would be wrong at the zero-padded borders


def test_constant_channels_fold_into_unpadded_kxk_conv():
    m = _const_channel_model(3, [0, 0, 0, 0])
    out, res = run_pass(m)
    assert res.stats["removed_units"] == 2
    assert_lossless(m, out)


# ------------------------------------------------------------------ through the manager

def test_manager_accepts_lossless_prune():
    m = _concat_model()
    z, info = zeroed(m)
    out, rep = optimize(z, passes=["prune"], data=feeds(z, 4))
    rec = rep.passes[0]
    assert rec.status == "applied", rec.reason
    assert params(out) < params(z)
    check(out)


# ------------------------------------------------------------------ importance pruning and refit

def _cnn(seed=3):
    rng = np.random.default_rng(seed)

    def w(*s, name):
        return numpy_helper.from_array((rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32),
                                       name)

    def b(n, name):
        return numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name)

    return model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["a1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], name="c2"),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ], [w(16, 3, 3, 3, name="w0"), b(16, "b0"), w(32, 16, 3, 3, name="w1"), b(32, "b1"), w(24, 32, 1, 1, name="w2"),
        b(24, "b2"), w(10, 24, name="wg"), b(10, "bg")], x_shape=(1, 3, 12, 12))


def _smooth_inputs(n, seed):
    # correlated channels and pixels: what makes refitting worth it on real images
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.standard_normal((1, 1, 6, 6)).astype(np.float32)
        img = np.kron(base, np.ones((1, 1, 2, 2), np.float32))
        img = np.concatenate([img * c for c in (1.0, 0.8, -0.5)], axis=1)
        out.append({"x": (img + 0.1 * rng.standard_normal(img.shape)).astype(np.float32)})
    return out


def _fid(m, out, samples):
    ref = [run_ort(m, s) for s in samples]
    got = [run_ort(out, s) for s in samples]
    return fidelity(ref, got)


def test_importance_refit_beats_no_refit():
    m = _cnn()
    calib = _smooth_inputs(24, 0)
    val = _smooth_inputs(8, 99)
    res = {}
    for refit in (False, True):
        out, r = run_pass(m, calib=calib, mode="importance", ratio=0.5, multiple_of=1, refit=refit, samples=24)
        check(out)
        res[refit] = _fid(m, out, val)
        assert params(out) < 0.7 * params(m)
    assert res[True]["mse"] < res[False]["mse"]
    assert res[True]["cosine"] > res[False]["cosine"]


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "activation"])
def test_importance_criteria_run(importance):
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(6, 0), mode="importance", importance=importance, ratio=0.25,
                      refit=False, multiple_of=1)
    check(out)
    assert r.stats["removed_units"] > 0
    run_ort(out, _smooth_inputs(1, 5)[0])


def test_multiple_of_rounds_kept_counts_up():
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(4, 0), mode="importance", importance="l2", ratio=0.3,
                      refit=False, multiple_of=8)
    dims = {t.name.split("_")[0]: list(t.dims) for t in out.graph.initializer}
    # keep = n - floor(0.3 n) rounded up to 8: 16 -> 12 -> 16, 32 -> 23 -> 24, 24 -> 17 -> 24
    assert dims["w0"][0] == 16 and dims["w1"][0] == 24 and dims["w2"][0] == 24
    check(out)


def test_global_scope():
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(4, 0), mode="importance", importance="l2", ratio=0.3,
                      refit=False, multiple_of=1, scope="global")
    check(out)
    assert r.stats["removed_units"] > 0


def test_weaker_lowers_ratio_and_zeros_mode_has_none():
    p = PrunePass(mode="importance", ratio=0.3)
    w = p.weaker()
    assert w is not None and w.options.ratio < 0.3 and not w.lossless
    assert PrunePass().weaker() is None and PrunePass().lossless


def test_costs_in_stats():
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(4, 0), mode="importance", ratio=0.3, refit=False, latency=True)
    st = r.stats
    assert st["params_after"] < st["params_before"] and st["macs_after"] < st["macs_before"]
    assert st["latency_ms_before"] > 0 and st["latency_ms_after"] > 0


def test_target_macs_picks_groups_by_sensitivity():
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(6, 0), mode="importance", ratio=0.25, refit=False, multiple_of=1,
                      target_macs=0.85)
    check(out)
    info = r.stats["target_macs"]
    assert info["estimated_fraction"] <= 0.85 and info["groups_pruned"] >= 1
    assert r.stats["macs_after"] <= 0.9 * r.stats["macs_before"]


def test_target_latency_bisects_on_measured_latency():
    m = _cnn()
    out, r = run_pass(m, calib=_smooth_inputs(4, 0), mode="importance", ratio=0.25, refit=False, multiple_of=1,
                      target_latency=0.6)
    check(out)
    info = r.stats["target_latency"]
    assert info["latency_ms_input"] > 0 and info["latency_ms_chosen"] > 0 and info["latency_measurements"] >= 2
    assert info["groups_pruned"] >= 1 and r.stats["removed_units"] > 0


def test_refit_stream_runs_each_node_once_and_matches_full_capture():
    from onnxshrink.passes.prune.stage_stream import StageStream
    from onnxshrink.runtime import capture_activations
    m = _cnn()
    samples = _smooth_inputs(3, 0)
    stream = StageStream(m, [["c1"], ["c2"], ["fc"]], samples)
    got = [list(stream.inputs_of_stage(k, None)) for k in range(3)]
    full = list(capture_activations(m, ["r0", "r1", "f"], samples))
    for si in range(3):
        np.testing.assert_array_equal(got[0][si]["r0"], full[si]["r0"])
        np.testing.assert_array_equal(got[1][si]["r1"], full[si]["r1"])
        np.testing.assert_array_equal(got[2][si]["f"], full[si]["f"])
    assert stream.nodes_run == len(m.graph.node) - 1   # all but fc itself
