"""Fold consecutive linear ops (no nonlinearity between them) into one when that is cheaper.

Linear pairs. MatMul and Gemm (transA=0) with constant weights are affine maps ``x P + q``
(MatMul: P = W; Gemm: P = alpha op(B), q = beta C; a constant Add between them, broadcast on the
last axis only, is the first map's q). Two in a row compose exactly:
    (x P1 + q1) P2 + q2 = x (P1 P2) + (q1 P2 + q2)
The merged op has n m parameters and MACs per row against k (n + m) for the pair (k the inner
width), so the pair is merged only when ``n m <= k (n + m)``, i.e. its rank is too high to pay.

Conv pairs (2-D, group 1), all exact:
  * kxk conv (W1: k x Cin x kh x kw, b1) -> 1x1 conv (stride 1, no pads; W2: Cout x k):
    ``W[o,c,i,j] = sum_r W2[o,r] W1[r,c,i,j]``, ``b = W2 b1 + b2``, the first conv's geometry.
  * 1x1 conv (stride 1, no pads; W1: k x Cin) -> kxk conv (W2: Cout x k x kh x kw):
    ``W[o,c,i,j] = sum_r W2[o,r,i,j] W1[r,c]``; ``b = b2 + sum_{r,i,j} W2[o,r,i,j] b1[r]``, allowed only
    when the second conv pads nothing or b1 is zero (padding pads the 1x1's output with zeros, not b1).
  * (kh x 1) conv -> (1 x kw) conv (the spatial factor pair): ``W[o,c,i,j] = sum_r W2[o,r,0,j] W1[r,c,i,0]``
    with strides, pads and dilations joined; b1 must be zero unless the second conv pads nothing.
MACs are compared per inference from the tensor shapes (input positions estimated from the
strides when shapes are unknown); a pair is merged only when the merged conv needs no more MACs
and no more parameters, so folding never increases MACs.
"""

from __future__ import annotations

__all__ = ["FoldPass", "fold_linear_pairs"]


import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, node_attr, sole_consumer
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register


@register
class FoldPass(Pass):
    """Merge consecutive MatMul/Gemm (and 1x1-conv, conv-1x1, kx1-1xk conv) pairs whose merged
    form is no more expensive; exact up to float round-off."""

    name = "fold"
    summary = "merge consecutive linear ops (MatMul/Gemm/1x1 Conv chains) when cheaper; exact"
    lossless = True
    needs_data = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        recs = fold_linear_pairs(graph, ctx)
        stats = {"folded": recs}
        reason = "" if recs else "no consecutive linear pair whose merged form is cheaper"
        return PassResult(graph, bool(recs), stats, reason=reason)


def _affine(node: gs.Node):
    """(x tensor, P, q or None, kind) when node is x P + q with constant P (2-D) and q; else None."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    P = constant_value(node.inputs[1])
    if P is None or P.ndim != 2 or P.dtype.kind != "f" or constant_value(node.inputs[0]) is not None:
        return None
    if node.op == "MatMul":
        return node.inputs[0], P.astype(np.float64), None, "MatMul"
    if node_attr(node, "transA", 0):
        return None
    P = (P.T if node_attr(node, "transB", 0) else P).astype(np.float64) * float(node_attr(node, "alpha", 1.0))
    q = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = constant_value(node.inputs[2])
        if c is None:
            return None
        q = c.astype(np.float64) * float(node_attr(node, "beta", 1.0))
    return node.inputs[0], P, q, "Gemm"


def _last_axis_bias(b: np.ndarray, n: int) -> bool:
    return b.size == 1 or (b.ndim >= 1 and b.shape[-1] == n and b.size == n)


def _vec(q: np.ndarray, n: int) -> np.ndarray:
    """A Gemm C / Add bias over n columns as a row vector (n,) or a 2-D (M, n) matrix."""
    if q.size == 1:
        return np.full((n,), float(q.reshape(-1)[0]))
    if q.ndim == 2 and q.shape[1] == 1:
        return np.broadcast_to(q, (q.shape[0], n))
    return q.reshape(-1) if q.size == n else q


def _fold_affine(graph: gs.Graph, first: gs.Node, outs: set) -> dict | None:
    a = _affine(first)
    if a is None:
        return None
    x, P1, q1, k1 = a
    t = first.outputs[0]
    nxt = sole_consumer(t, outs)
    add = None
    if nxt is not None and nxt.op == "Add" and q1 is None:
        other = nxt.inputs[1] if nxt.inputs[0] is t else nxt.inputs[0]
        b = constant_value(other)
        if b is None or not _last_axis_bias(b, P1.shape[1]):
            return None
        add, q1, bias_shape = nxt, b.astype(np.float64), b.shape
        t = nxt.outputs[0]
        nxt = sole_consumer(t, outs)
    if nxt is None:
        return None
    a2 = _affine(nxt)
    if a2 is None or a2[0] is not t:
        return None
    _, P2, q2, k2 = a2
    n, k = P1.shape
    m = P2.shape[1]
    if n * m > k * (n + m):
        return None  # the pair is cheaper than the merged op
    P = P1 @ P2
    q = None
    if q1 is not None:
        q = _vec(q1, k) @ P2
    if q2 is not None:
        q = q2 if q is None else q + q2
    dtype = np.asarray(constant_value(first.inputs[1])).dtype
    base = first.name or first.outputs[0].name
    y = nxt.outputs[0]
    w = gs.Constant(f"{base}_fold_W", P.astype(dtype))
    if k1 == "Gemm" or k2 == "Gemm":
        inputs = [x, w] + ([gs.Constant(f"{base}_fold_C", np.asarray(q).astype(dtype))] if q is not None else [])
        new = [gs.Node("Gemm", f"{base}_fold", attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
                       inputs=inputs, outputs=[y])]
    elif q is None:
        new = [gs.Node("MatMul", f"{base}_fold", inputs=[x, w], outputs=[y])]
    else:
        mid = gs.Variable(f"{base}_fold_mid", dtype=dtype)
        qq = np.asarray(q).reshape(tuple(bias_shape[:-1]) + (m,)) if add is not None and len(bias_shape) else q
        new = [gs.Node("MatMul", f"{base}_fold", inputs=[x, w], outputs=[mid]),
               gs.Node("Add", f"{base}_fold_bias",
                       inputs=[mid, gs.Constant(f"{base}_fold_b", np.asarray(qq).astype(dtype))],
                       outputs=[y])]
    for nd in [first, add, nxt]:
        if nd is not None:
            nd.inputs.clear()
            nd.outputs.clear()
    graph.nodes.extend(new)
    return {"kind": f"{k1}{'+Add' if add is not None else ''}->{k2}", "first": first.name, "second": nxt.name,
            "shape": [n, k, m], "params_before": int(n * k + k * m), "params_after": int(n * m),
            "macs_per_row_before": int(n * k + k * m), "macs_per_row_after": int(n * m)}


def _conv_info(node: gs.Node):
    if node.op != "Conv" or len(node.inputs) < 2:
        return None
    w = constant_value(node.inputs[1])
    if w is None or w.ndim != 4 or w.dtype.kind != "f" or int(node_attr(node, "group", 1)) != 1:
        return None
    if str(node_attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", ""):
        return None
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        b = constant_value(node.inputs[2])
        if b is None:
            return None
    return {"w": w.astype(np.float64), "b": None if b is None else b.astype(np.float64),
            "strides": list(node_attr(node, "strides", [1, 1])), "pads": list(node_attr(node, "pads", [0, 0, 0, 0])),
            "dil": list(node_attr(node, "dilations", [1, 1]))}


def _positions(t: gs.Tensor):
    shp = getattr(t, "shape", None)
    if shp and len(shp) == 4 and all(isinstance(d, int) and d > 0 for d in shp):
        return float(shp[0] * shp[2] * shp[3]), (shp[2], shp[3])
    return None, None


def _fold_conv(graph: gs.Graph, first: gs.Node, outs: set) -> dict | None:
    c1 = _conv_info(first)
    if c1 is None:
        return None
    t = first.outputs[0]
    nxt = sole_consumer(t, outs)
    if nxt is None:
        return None
    c2 = _conv_info(nxt)
    if c2 is None or nxt.inputs[0] is not t:
        return None
    W1, W2 = c1["w"], c2["w"]
    k, Cin, kh1, kw1 = W1.shape
    Cout, k2, kh2, kw2 = W2.shape
    if k2 != k:
        return None
    b1, b2 = c1["b"], c2["b"]
    b1_zero = b1 is None or not np.any(b1)
    pads2_zero = not any(c2["pads"])
    out_pos, _ = _positions(nxt.outputs[0])
    mid_pos, _ = _positions(t)
    in_pos, _ = _positions(first.inputs[0])
    if kh2 == 1 and kw2 == 1 and c2["strides"] == [1, 1] and pads2_zero:
        kind = "conv->1x1"
        W = np.einsum("or,rcij->ocij", W2[:, :, 0, 0], W1)
        b = (W2[:, :, 0, 0] @ b1 if b1 is not None else 0) + (b2 if b2 is not None else 0)
        attrs = dict(first.attrs)
        unit = out_pos or 1.0
        before = unit * (k * Cin * kh1 * kw1 + Cout * k)
        after = unit * Cout * Cin * kh1 * kw1
    elif kh1 == 1 and kw1 == 1 and c1["strides"] == [1, 1] and not any(c1["pads"]):
        if not b1_zero and not pads2_zero:
            return None  # the second conv pads the first's output with zeros, not with b1
        kind = "1x1->conv"
        W = np.einsum("orij,rc->ocij", W2, W1[:, :, 0, 0])
        b = (np.einsum("orij,r->o", W2, b1) if b1 is not None else 0) + (b2 if b2 is not None else 0)
        attrs = dict(nxt.attrs)
        s = c2["strides"]
        unit = out_pos or 1.0
        ipos = in_pos or unit * s[0] * s[1]
        before = ipos * k * Cin + unit * Cout * k * kh2 * kw2
        after = unit * Cout * Cin * kh2 * kw2
    elif (kw1 == 1 and kh2 == 1 and c1["strides"][1] == 1 and c2["strides"][0] == 1 and c1["dil"][1] == 1
          and c2["dil"][0] == 1 and c1["pads"][1] == 0 and c1["pads"][3] == 0 and c2["pads"][0] == 0
          and c2["pads"][2] == 0):
        if not b1_zero and not pads2_zero:
            return None
        kind = "kx1->1xk"
        W = np.einsum("orj,rci->ocij", W2[:, :, 0, :], W1[:, :, :, 0])
        b = (np.einsum("orj,r->o", W2[:, :, 0, :], b1) if b1 is not None else 0) + (b2 if b2 is not None else 0)
        attrs = dict(first.attrs)
        attrs.update(kernel_shape=[kh1, kw2], strides=[c1["strides"][0], c2["strides"][1]],
                     pads=[c1["pads"][0], c2["pads"][1], c1["pads"][2], c2["pads"][3]],
                     dilations=[c1["dil"][0], c2["dil"][1]])
        unit = out_pos or 1.0
        mpos = mid_pos or unit * c2["strides"][1]
        before = mpos * k * Cin * kh1 + unit * Cout * k * kw2
        after = unit * Cout * Cin * kh1 * kw2
    else:
        return None
    if after > before or W.size > W1.size + W2.size:
        return None
    dtype = np.asarray(constant_value(first.inputs[1])).dtype
    base = first.name or first.outputs[0].name
    attrs["kernel_shape"] = list(W.shape[2:])
    attrs["group"] = 1
    inputs = [first.inputs[0], gs.Constant(f"{base}_fold_W", W.astype(dtype))]
    if b1 is not None or b2 is not None:
        inputs.append(gs.Constant(f"{base}_fold_B", (np.zeros(Cout) + b).astype(dtype)))
    y = nxt.outputs[0]
    new = gs.Node("Conv", f"{base}_fold", attrs=attrs, inputs=inputs, outputs=[y])
    for nd in (first, nxt):
        nd.inputs.clear()
        nd.outputs.clear()
    graph.nodes.append(new)
    known = out_pos is not None
    return {"kind": kind, "first": first.name, "second": nxt.name, "shape": [Cout, k, Cin],
            "params_before": int(W1.size + W2.size), "params_after": int(W.size),
            "macs_before": int(before) if known else None, "macs_after": int(after) if known else None}


def fold_linear_pairs(graph: gs.Graph, ctx: Context | None = None) -> list[dict]:
    """Merge every foldable pair in ``graph`` (in place, repeatedly until none is left); returns
    one record per merge."""
    records = []
    while True:
        outs = set(id(t) for t in graph.outputs)
        done = None
        for node in list(graph.nodes):
            if not node.outputs:
                continue
            done = _fold_affine(graph, node, outs) or _fold_conv(graph, node, outs)
            if done:
                records.append(done)
                break
        if not done:
            break
        graph.cleanup().toposort()
    return records
