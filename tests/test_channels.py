"""Coupled-channel analysis: groups and index maps on small graphs built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from prune_helpers import single_input_model

from onnxshrink.graph.channels import analyze, balanced_selection, coupled_channel_groups

RNG = np.random.default_rng(0)


def W(*shape, name):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


model = single_input_model


def groups_of(m):
    return coupled_channel_groups(gs.import_onnx(m))


def by_producer(groups, name):
    return next(g for g in groups if name in g.producers)


def member(group, node, tag):
    return next(mm for mm in group.members if mm[0] == node and mm[4] == tag and mm[3] in ("in", "out", "param"))


def members(group, node, role):
    return [mm for mm in group.members if mm[0] == node and mm[3] == role]


def test_concat_offsets():
    m = model([
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"),
        helper.make_node("Conv", ["c", "wc"], ["y"], name="cc"),
    ], [W(4, 3, 1, 1, name="wa"), W(6, 3, 1, 1, name="wb"), W(2, 10, 1, 1, name="wc")])
    gr = groups_of(m)
    ga, gb = by_producer(gr, "ca"), by_producer(gr, "cb")
    assert ga.units == 4 and gb.units == 6 and ga.prunable and gb.prunable
    ia = members(ga, "cc", "in")[0][5]
    ib = members(gb, "cc", "in")[0][5]
    assert ia.tolist() == [0, 1, 2, 3] + [-1] * 6
    assert ib.tolist() == [-1] * 4 + [0, 1, 2, 3, 4, 5]
    # the output conv's channels reach the graph output: not prunable, with the reason
    gc = by_producer(gr, "cc")
    assert not gc.prunable and "graph output" in gc.reason


def test_split_index_map():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Split", ["a", "sizes"], ["s1", "s2"], axis=1, name="split"),
        helper.make_node("Conv", ["s1", "w1"], ["t1"], name="c1"),
        helper.make_node("Conv", ["s2", "w2"], ["t2"], name="c2"),
        helper.make_node("Add", ["t1", "t2"], ["y"], name="add"),
    ], [W(8, 3, 1, 1, name="w0"), numpy_helper.from_array(np.array([3, 5], np.int64), "sizes"),
        W(4, 3, 1, 1, name="w1"), W(4, 5, 1, 1, name="w2")])
    a = analyze(gs.import_onnx(m))
    g0 = by_producer(a.groups(), "c0")
    assert g0.units == 8
    assert members(g0, "c1", "in")[0][5].tolist() == [0, 1, 2]
    assert members(g0, "c2", "in")[0][5].tolist() == [3, 4, 5, 6, 7]
    assert any(f.kind == "split" for f in a.fixups)
    # c1 and c2 outputs are added: one residual-style group, blocked at the graph output
    g12 = by_producer(a.groups(), "c1")
    assert "c2" in g12.producers and not g12.prunable


def test_flatten_to_gemm_features():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", strides=[4, 4]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ], [W(3, 3, 1, 1, name="w0"), W(5, 12, name="wg"), W(5, name="bg")])
    g0 = by_producer(groups_of(m), "c0")
    assert g0.prunable and g0.units == 3
    imap = members(g0, "fc", "in")[0]
    assert imap[2] == 1  # transB: features along axis 1 of B
    # 8x8 input, stride 4 -> 2x2 spatial: channel c owns features [4c, 4c+4)
    assert imap[5].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_flatten_via_reshape_and_matmul():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", strides=[4, 4]),
        helper.make_node("Reshape", ["a", "shape"], ["f"], name="rs"),
        helper.make_node("MatMul", ["f", "wm"], ["y"], name="mm"),
    ], [W(3, 3, 1, 1, name="w0"), numpy_helper.from_array(np.array([1, -1], np.int64), "shape"), W(12, 5, name="wm")])
    a = analyze(gs.import_onnx(m))
    g0 = by_producer(a.groups(), "c0")
    assert g0.prunable
    assert members(g0, "mm", "in")[0][5].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert any(f.kind == "reshape" for f in a.fixups)


def test_depthwise_shares_units():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Conv", ["a", "wd", "bd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="c2"),
    ], [W(6, 3, 1, 1, name="w0"), W(6, 1, 3, 3, name="wd"), W(6, name="bd"), W(4, 6, 1, 1, name="w2")])
    a = analyze(gs.import_onnx(m))
    g0 = by_producer(a.groups(), "c0")
    assert g0.prunable and g0.units == 6
    assert members(g0, "dw", "param")[0][5].tolist() == list(range(6))
    assert members(g0, "c2", "in")[0][5].tolist() == list(range(6))
    assert any(f.kind == "group" for f in a.fixups)


def test_grouped_conv_balances_groups_without_tying_positions():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Conv", ["a", "wg"], ["y"], name="gc", group=2),
    ], [W(8, 3, 1, 1, name="w0"), W(4, 4, 1, 1, name="wg")])
    a = analyze(gs.import_onnx(m))
    g0 = by_producer(a.groups(), "c0")
    # every channel is its own unit; the two groups must lose equally many (any positions)
    assert g0.units == 8 and g0.balances == 1
    assert members(g0, "c0", "out")[0][5].tolist() == list(range(8))
    assert members(g0, "gc", "in")[0][5].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # row g: group g's columns
    units = np.array(g0.unit_labels)
    assert balanced_selection(a, units[[0, 1, 5]]) in ({0, 5}, {1, 5})    # one from each group
    assert balanced_selection(a, units[[0, 1, 2]]) == set()               # group 1 loses none: nothing goes
    assert balanced_selection(a, units[[0, 1, 4, 6]], limit=2) in ({0, 4}, {0, 6}, {1, 4}, {1, 6})


def test_residual_add_is_one_group():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["b"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="res"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="c2"),
    ], [W(5, 3, 1, 1, name="w0"), W(5, 5, 3, 3, name="w1"), W(2, 5, 1, 1, name="w2")])
    g = by_producer(groups_of(m), "c0")
    assert set(g.producers) == {"c0", "c1"} and g.units == 5 and g.prunable
    # c1 reads and writes the same units
    assert members(g, "c1", "in")[0][5].tolist() == list(range(5))
    assert members(g, "c1", "out")[0][5].tolist() == list(range(5))


def test_se_block_couples_excitation_with_features():
    m = model([
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Conv", ["p", "ws1", "bs1"], ["s1"], name="se1"),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se2"),
        helper.make_node("HardSigmoid", ["s2"], ["g"]),
        helper.make_node("Mul", ["a", "g"], ["m"], name="scale"),
        helper.make_node("Conv", ["m", "w3"], ["y"], name="c3"),
    ], [W(8, 3, 1, 1, name="w0"), W(8, name="b0"), W(2, 8, 1, 1, name="ws1"), W(2, name="bs1"),
        W(8, 2, 1, 1, name="ws2"), W(8, name="bs2"), W(4, 8, 1, 1, name="w3")])
    gr = groups_of(m)
    g = by_producer(gr, "c0")
    assert set(g.producers) == {"c0", "se2"} and g.units == 8 and g.prunable
    assert members(g, "se1", "in")[0][5].tolist() == list(range(8))
    gse = by_producer(gr, "se1")
    assert gse.units == 2 and gse.prunable


def test_channel_shuffle_is_provable():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Reshape", ["a", "s5"], ["r5"], name="r1"),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["r4"], name="r2"),
        helper.make_node("Conv", ["r4", "w1"], ["y"], name="c1"),
    ], [W(8, 3, 1, 1, name="w0"), numpy_helper.from_array(np.array([1, 2, 4, 8, 8], np.int64), "s5"),
        numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "s4"), W(2, 8, 1, 1, name="w1")])
    g = by_producer(groups_of(m), "c0")
    assert g.prunable and g.units == 4  # channel j and 4+j go together (rectangular [2, 4])
    out = members(g, "c0", "out")[0][5]
    inn = members(g, "c1", "in")[0][5]
    assert out.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert inn.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_unknown_op_blocks_with_reason():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("LRN", ["a"], ["l"], size=3, name="lrn"),
        helper.make_node("Conv", ["l", "w1"], ["y"], name="c1"),
    ], [W(4, 3, 1, 1, name="w0"), W(2, 4, 1, 1, name="w1")])
    g = by_producer(groups_of(m), "c0")
    assert not g.prunable and "no channel rule for LRN" in g.reason


def test_shape_of_tensor_blocks():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Shape", ["a"], ["sh"], name="shape"),
        helper.make_node("Reshape", ["a", "sh"], ["y"], name="rs"),
    ], [W(4, 3, 1, 1, name="w0")])
    g = by_producer(groups_of(m), "c0")
    assert not g.prunable and "reads the channel count" in g.reason


def test_slice_and_per_channel_constants():
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Mul", ["a", "scale"], ["b"], name="mul"),
        helper.make_node("Slice", ["b", "st", "en", "ax"], ["s"], name="sl"),
        helper.make_node("Conv", ["s", "w1"], ["y"], name="c1"),
    ], [W(6, 3, 1, 1, name="w0"), W(1, 6, 1, 1, name="scale"), numpy_helper.from_array(np.array([2], np.int64), "st"),
        numpy_helper.from_array(np.array([5], np.int64), "en"), numpy_helper.from_array(np.array([1], np.int64), "ax"),
        W(2, 3, 1, 1, name="w1")])
    a = analyze(gs.import_onnx(m))
    g = by_producer(a.groups(), "c0")
    assert g.prunable
    assert members(g, "mul", "param")[0][2] == 1  # the [1, 6, 1, 1] constant is sliced on axis 1
    assert members(g, "c1", "in")[0][5].tolist() == [2, 3, 4]
    assert any(f.kind == "slice" for f in a.fixups)


def test_dequantized_weights_follow_with_per_channel_scales():
    wq = RNG.integers(-100, 100, (4, 3, 1, 1)).astype(np.int8)
    m = model([
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dq"),
        helper.make_node("Conv", ["x", "w"], ["a"], name="c0"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["y"], name="c1"),
    ], [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"), W(2, 4, 1, 1, name="w1")])
    g = by_producer(groups_of(m), "c0")
    assert g.prunable
    tags = {mm[4] for mm in g.members if mm[0] == "dq"}
    assert {"conv_w", "scale", "zero_point"} <= tags


def test_channel_shuffle_between_grouped_convs():
    # ShuffleNet: grouped conv (2 groups of 4) -> shuffle -> grouped conv; channel (i, j) lands at j*2 + i
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", group=1),
        helper.make_node("Conv", ["a", "wg"], ["b"], name="g0", group=2),
        helper.make_node("Reshape", ["b", "s5"], ["r5"], name="r1"),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["r4"], name="r2"),
        helper.make_node("Conv", ["r4", "w1"], ["y"], name="g1", group=2),
    ], [W(4, 3, 1, 1, name="w0"), W(8, 2, 1, 1, name="wg"),
        numpy_helper.from_array(np.array([1, 2, 4, 8, 8], np.int64), "s5"),
        numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "s4"), W(2, 4, 1, 1, name="w1")])
    a = analyze(gs.import_onnx(m))
    g = by_producer(a.groups(), "g0")
    assert g.prunable and g.units == 4 and g.balances == 2
    assert members(g, "g0", "out")[0][5].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]      # column j of both groups
    assert members(g, "g1", "in")[0][5].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]   # after the shuffle
    u = np.array(g.unit_labels)
    assert balanced_selection(a, u[[0, 1]]) == set()                 # both in g1's first group
    assert balanced_selection(a, u[[0, 2]]) == {int(u[0]), int(u[2])}
    assert any(f.kind == "reshape" for f in a.fixups)
    # the stem feeds g0's two groups: 4 single-channel units, balanced 2 + 2
    gs0 = by_producer(a.groups(), "c0")
    assert gs0.units == 4 and gs0.balances == 1


def test_balanced_repair_without_scipy_is_balanced():
    from onnxshrink.graph.channels import balanced_repair, is_balanced
    m = model([
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Conv", ["a", "wg"], ["y"], name="gc", group=4),
    ], [W(12, 3, 1, 1, name="w0"), W(4, 3, 1, 1, name="wg")])
    a = analyze(gs.import_onnx(m))
    u = by_producer(a.groups(), "c0").unit_labels
    rows = a.balance_rows()
    wanted = [u[0], u[1], u[3], u[6], u[7], u[9]]   # per group of 3: 2, 1, 2, 1
    sel = balanced_repair(wanted, rows, None)
    assert is_balanced(rows, sel) and len(sel) == 4      # one per group
    assert sel == {u[0], u[3], u[6], u[9]}             # the first-ranked (least important) of each
