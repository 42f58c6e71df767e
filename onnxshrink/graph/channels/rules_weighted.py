"""Channel rules of the ops with weights or per-channel parameters: Conv, ConvTranspose, Gemm,
MatMul (the contracting "sinks", which also create new channel ids), BatchNormalization,
InstanceNormalization and LayerNormalization.

Every rule is ``rule(a, n, lays)``: ``a`` the ChannelAnalysis being built (its primitives:
``value``, ``add_param``, ``new_space``, ``balance``, ``block``, ``set_layout``), ``n`` the node,
``lays`` the Layout of each input (None: no channels). A zero filter makes its output channel
the constant bias, which later rules propagate:
    const_o = b_o  when W[o] == 0,  NaN (varying) otherwise.
A depthwise conv with zero padding maps a constant input c to c * sum_k W[o, k] + b_o.
"""

from __future__ import annotations

__all__ = ["out_const_from_filter", "conv_pads_are_zero", "conv_rule", "conv_transpose_rule", "gemm_rule",
           "matmul_rule", "batchnorm_rule", "instancenorm_rule", "layernorm_rule"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels.rules_attention import activation_matmul_rule
from onnxshrink.graph.channels.types import Fixup, Layout, Sink
from onnxshrink.graph.shapes import normalize_axis
from onnxshrink.graph.values import node_attr


def out_const_from_filter(w: np.ndarray, b: np.ndarray | None, axis: int) -> np.ndarray:
    """Constant of each output channel whose filter is all zero (its bias), NaN otherwise."""
    wz = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    zero = ~np.any(wz != 0, axis=1)
    n = w.shape[axis]
    bias = np.zeros(n) if b is None else np.broadcast_to(np.asarray(b, np.float64).ravel(), (n,))
    return np.where(zero, bias, np.nan)


def conv_pads_are_zero(node: gs.Node, kshape) -> bool:
    """True when the conv pads nothing: no nonzero explicit pads, or SAME auto-padding with a
    kernel of ones (a constant input channel then gives a constant output channel)."""
    ap = node_attr(node, "auto_pad", "NOTSET")
    if isinstance(ap, bytes):
        ap = ap.decode()
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in kshape)
    return not any(node_attr(node, "pads", []) or [])


def conv_rule(a, n: gs.Node, lays: list) -> None:
    """Conv: a sink of its input channels (grouped: one balance constraint per side), a new id space for its
    outputs; depthwise convs map input channel c to outputs [c*m, (c+1)*m)."""
    x = lays[0]
    w = a.value(n.inputs[1])
    if w is None:
        a.block_layout(x, f"Conv '{n.name}' has run-time weights")
        return
    b = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    G = int(node_attr(n, "group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    cin = cin_g * G
    if x is not None and (x.axes != (1,) or x.ids.size != cin):
        a.block_layout(x, f"Conv '{n.name}' input channel axis mismatch")
        x = None
    nopad = conv_pads_are_zero(n, w.shape[2:])
    if G > 1 and cin_g == 1 and G == cin:  # depthwise: output channel o comes from input o // m
        if x is None:
            return
        m = cout // G
        ids = np.repeat(x.ids, m)
        mw = a.add_param(n, 1, 0, ids, "param", "dw_w")
        if mw is None:
            a.block_layout(x, f"depthwise Conv '{n.name}' weights cannot be sliced")
            return
        if b is not None:
            a.add_param(n, 2, 0, ids, "param", "dw_b")
        cin_c = np.repeat(x.const, m)
        wsum = w.reshape(cout, -1).sum(axis=1).astype(np.float64)
        bb = np.zeros(cout) if b is None else b.astype(np.float64)
        wzero = ~np.any(w.reshape(cout, -1) != 0, axis=1)
        const = np.where(wzero | (cin_c == 0), bb, np.where(nopad, cin_c * wsum + bb, np.nan))
        const = np.where(np.isnan(cin_c) & ~wzero, np.nan, const)
        a.fixups.append(Fixup("group", n, [x]))
        a.set_layout(n.outputs[0], Layout((1,), ids, const))
        return
    if x is not None:
        if G == 1:
            mw = a.add_param(n, 1, 1, x.ids, "in", "conv_w")
        else:
            # group g's output rows read row g of the (G, cin_g) id matrix: a 2-D index map
            r = x.ids.reshape(G, cin_g)
            a.balance(r, n, "input")
            mw = a.add_param(n, 1, 1, r, "in", "conv_w")
        if mw is None:
            a.block_layout(x, f"Conv '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "conv", x.ids, x.const, G, mw))
    ids = a.new_space(cout, n.name)
    if G > 1:
        a.balance(ids.reshape(G, cout // G), n, "output")
    mo = a.add_param(n, 1, 0, ids, "out", "conv_w")
    if mo is None:
        a.block(ids, f"Conv '{n.name}' weights cannot be sliced")
    if b is not None and a.add_param(n, 2, 0, ids, "out", "conv_b") is None:
        a.block(ids, f"Conv '{n.name}' bias cannot be sliced")
    a.set_layout(n.outputs[0], Layout((1,), ids, out_const_from_filter(w, b, 0)))


def conv_transpose_rule(a, n: gs.Node, lays: list) -> None:
    """ConvTranspose (group 1): a sink of its input channels, a new id space for its outputs."""
    x = lays[0]
    w = a.value(n.inputs[1])
    G = int(node_attr(n, "group", 1))
    if w is None or G != 1:
        why = "has run-time weights" if w is None else "is grouped (no rule)"
        a.block_layout(x, f"ConvTranspose '{n.name}' {why}")
        return
    if any(node_attr(n, "output_shape", []) or []):
        a.block_layout(x, f"ConvTranspose '{n.name}' has output_shape")
    b = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    cin, cout = w.shape[0], w.shape[1]
    if x is not None and (x.axes != (1,) or x.ids.size != cin):
        a.block_layout(x, f"ConvTranspose '{n.name}' input channel axis mismatch")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, 0, x.ids, "in", "convt_w")
        if mw is None:
            a.block_layout(x, f"ConvTranspose '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "convtranspose", x.ids, x.const, 1, mw))
    ids = a.new_space(cout, n.name)
    if a.add_param(n, 1, 1, ids, "out", "convt_w") is None:
        a.block(ids, f"ConvTranspose '{n.name}' weights cannot be sliced")
    if b is not None and a.add_param(n, 2, 0, ids, "out", "convt_b") is None:
        a.block(ids, f"ConvTranspose '{n.name}' bias cannot be sliced")
    a.set_layout(n.outputs[0], Layout((1,), ids, out_const_from_filter(w, b, 1)))


def gemm_rule(a, n: gs.Node, lays: list) -> None:
    """Gemm (transA = 0): a sink of its input features, a new id space for its outputs (C sliced with them)."""
    x = lays[0]
    w = a.value(n.inputs[1])
    if w is None or w.ndim != 2:
        a.block_layout(x, f"Gemm '{n.name}' has run-time weights")
        return
    if lays[1] is not None or (len(lays) > 2 and lays[2] is not None):
        for l in lays[1:]:
            a.block_layout(l, f"Gemm '{n.name}' weight input carries channels")
    tA, tB = int(node_attr(n, "transA", 0)), int(node_attr(n, "transB", 0))
    kax, nax = (1, 0) if tB else (0, 1)
    N = w.shape[nax]
    if x is not None and (tA or x.axes != (1,) or x.ids.size != w.shape[kax]):
        a.block_layout(x, f"Gemm '{n.name}' input feature axis mismatch")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, kax, x.ids, "in", "gemm_w")
        if mw is None:
            a.block_layout(x, f"Gemm '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "gemm", x.ids, x.const, 1, mw))
    ids = a.new_space(N, n.name)
    if a.add_param(n, 1, nax, ids, "out", "gemm_w") is None:
        a.block(ids, f"Gemm '{n.name}' weights cannot be sliced")
    c = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    if len(n.inputs) > 2 and n.inputs[2].name:
        if c is None:
            a.block(ids, f"Gemm '{n.name}' has a run-time C")
        elif c.ndim >= 1 and c.shape[-1] == N and N > 1:
            if c.ndim == 2 and c.shape[0] != 1:
                a.block(ids, f"Gemm '{n.name}' C is not a bias row")
            elif a.add_param(n, 2, c.ndim - 1, ids, "out", "gemm_b") is None:
                a.block(ids, f"Gemm '{n.name}' C cannot be sliced")
    alpha, beta = float(node_attr(n, "alpha", 1.0)), float(node_attr(n, "beta", 1.0))
    bias = None if c is None else (np.broadcast_to(c.reshape(-1) if c.size == N else c.ravel()[:1], (N,)) * beta)
    const = out_const_from_filter(w * alpha, bias, nax)
    a.set_layout(n.outputs[0], Layout((1,), ids, const))


def matmul_rule(a, n: gs.Node, lays: list) -> None:
    """MatMul by a constant 2-D matrix: a sink of the last input axis, a new id space for its outputs.
    A MatMul of two activations is an attention product (``rules_attention``)."""
    x = lays[0]
    w = a.value(n.inputs[1])
    if w is None and a.value(n.inputs[0]) is None:
        activation_matmul_rule(a, n, lays)  # attention: Q K^T, P V
        return
    if lays[1] is not None or w is None or w.ndim != 2:
        a.block_layout(x, f"MatMul '{n.name}' has run-time weights")
        a.block_layout(lays[1], f"MatMul '{n.name}' right operand carries channels")
        return
    r = a.rank(n.inputs[0])
    if x is not None and (r is None or x.axes != (r - 1,) or x.ids.size != w.shape[0]):
        a.block_layout(x, f"MatMul '{n.name}' input feature axis is not the last axis")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, 0, x.ids, "in", "matmul_w")
        if mw is None:
            a.block_layout(x, f"MatMul '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "matmul", x.ids, x.const, 1, mw))
    ro = a.rank(n.outputs[0]) or r
    if ro is None:
        return
    ids = a.new_space(w.shape[1], n.name)
    if a.add_param(n, 1, 1, ids, "out", "matmul_w") is None:
        a.block(ids, f"MatMul '{n.name}' weights cannot be sliced")
    a.set_layout(n.outputs[0], Layout((ro - 1,), ids, out_const_from_filter(w, None, 1)))


def batchnorm_rule(a, n: gs.Node, lays: list) -> None:
    """BatchNormalization (inference): its four parameters follow the channels of axis 1."""
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"BatchNormalization '{n.name}' parameter carries channels")
    if x is None:
        return
    if len(n.outputs) > 1 and any(o.name for o in n.outputs[1:]) or x.axes != (1,):
        a.block_layout(x, f"BatchNormalization '{n.name}' in training mode or not on axis 1")
        return
    vals = [a.value(t) for t in n.inputs[1:5]]
    if any(v is None for v in vals):
        a.block_layout(x, f"BatchNormalization '{n.name}' has run-time parameters")
        return
    for slot, tag in zip(range(1, 5), ("bn_scale", "bn_bias", "bn_mean", "bn_var")):
        if a.add_param(n, slot, 0, x.ids, "param", tag) is None:
            a.block_layout(x, f"BatchNormalization '{n.name}' parameters cannot be sliced")
            return
    s, bb, mu, var = (v.astype(np.float64) for v in vals)
    eps = float(node_attr(n, "epsilon", 1e-5))
    const = s * (x.const - mu) / np.sqrt(var + eps) + bb
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, const))


def instancenorm_rule(a, n: gs.Node, lays: list) -> None:
    """InstanceNormalization: scale and bias follow the channels of axis 1."""
    x = lays[0]
    if x is None:
        return
    if x.axes != (1,):
        a.block_layout(x, f"InstanceNormalization '{n.name}' not on axis 1")
        return
    bb = a.value(n.inputs[2])
    ok = a.add_param(n, 1, 0, x.ids, "param", "in_scale") and a.add_param(n, 2, 0, x.ids, "param", "in_bias")
    if not ok:
        a.block_layout(x, f"InstanceNormalization '{n.name}' parameters cannot be sliced")
        return
    const = np.where(np.isnan(x.const), np.nan, bb.astype(np.float64))  # (c - c) * s + b
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, const))


def layernorm_rule(a, n: gs.Node, lays: list) -> None:
    """LayerNormalization over non-channel axes keeps the layout (values vary)."""
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    ax = node_attr(n, "axis", -1)
    if r is None or any(l >= normalize_axis(ax, r) for l in x.axes):
        a.block_layout(x, f"LayerNormalization '{n.name}' normalizes over the channel axis")
        return
    if len(n.outputs) > 1 and any(o.name for o in n.outputs[1:]):
        a.block_layout(x, f"LayerNormalization '{n.name}' outputs statistics")
        return
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, np.full(x.ids.shape, np.nan)))
