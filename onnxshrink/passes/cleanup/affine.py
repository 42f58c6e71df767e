"""The affine folds: a per-channel ``y * s + t`` next to a Conv/ConvTranspose/Gemm merged into its
weights and bias (the one implementation; quantize's canonicalization calls it too).

* BatchNormalization ``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``, i.e.
  ``y = x * s + t`` with ``t = beta - mean * s``, folds into a preceding Conv / ConvTranspose / Gemm,
  per output channel ``o``: ``W'[o] = W[o] * s[o]``, ``b' = b * s + t``. Conv weights are
  [M, C/g, k...] (output channel axis 0); ConvTranspose weights are [C, M/g, k...] whose output
  channel is ``group(c) * M/g + j`` (axis 1, per group); Gemm scales the columns of op(B) and
  ``C' = beta*C * s + t`` with ``beta' = 1``.
* ``Mul``/``Div``/``Add``/``Sub`` by a constant after Conv/ConvTranspose/Gemm: ``Mul(c)``: ``W' = W*c``,
  ``b' = b*c``; ``Div(c)``: the same with ``1/c``; ``Add(c)``: ``b' = b + c``; ``Sub(c)``: ``b' = b - c``.
  Only when ``c`` is per channel under ONNX's right-aligned broadcasting (``channel_vector``):
  against the output shape [N, C, *spatial] every axis of ``c`` but the channel axis has size 1,
  so a [C] constant after a 1-D Conv ([N, C, L]) is per *position* (last axis), never per channel.
* Forward, into a following Conv (per *input* channel ``c``): ``Conv(x * s + t)`` is
  ``W'[m, c] = W[m, c] * s[c]``, ``b'[m] = b[m] + sum_{c,k} W[m, c, k] * t[c]``, for a BatchNorm or a
  Mul/Div/Add/Sub by a per-channel constant. Only exact when the Conv has no padding (padded zeros
  would have to become ``t[c]``), so padded Convs are left alone.

Every fold needs the intermediate tensor to have one consumer and not be a graph input or output,
and the constants to have the weights' float dtype.
"""

from __future__ import annotations

__all__ = ["batchnorm_affine", "channel_vector", "fold_batchnorm_backward", "fold_batchnorm_forward",
           "fold_into_preceding_linear", "fold_scale_bias_backward", "fold_scale_bias_forward"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, is_constant
from onnxshrink.passes.cleanup.constants import constant_operand
from onnxshrink.passes.cleanup.rewrite import (
    FLOAT_TYPES,
    FreshNames,
    detach,
    drop_detached,
    graph_input_ids,
    graph_output_ids,
    is_default_domain,
    producer,
    single_use,
)

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")


def fold_into_preceding_linear(graph: gs.Graph, names: FreshNames | None = None) -> dict[str, int]:
    """BatchNormalization and scalar/per-channel Mul/Div/Add/Sub folded into the preceding
    Conv/ConvTranspose/Gemm of ``graph`` (not its subgraphs), repeated until nothing is left to
    fold (Conv -> BN -> Add folds step by step). Returns the counts."""
    names = names if names is not None else FreshNames(graph)
    counts = {"bn_folded": 0, "scale_bias_folded": 0}
    while True:
        bn = fold_batchnorm_backward(graph, graph, names)
        sb = fold_scale_bias_backward(graph, graph, names)
        counts["bn_folded"] += bn
        counts["scale_bias_folded"] += sb
        if not bn + sb:
            return counts


def channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a float64 vector over ``channels`` when, broadcast (right-aligned, as ONNX does)
    against an output of ``rank`` axes [N, C, ...], it is a scalar or varies along axis 1 only:
    every other axis of ``c`` has size 1 and axis 1 has size 1 or ``channels``. None otherwise
    (``c`` varies along the batch or a spatial axis, or would broadcast the output to more axes)."""
    if c.ndim > rank:
        return None
    cs = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(cs.shape) if i != 1) or cs.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(cs.reshape(-1).astype(np.float64), (channels,))


def batchnorm_affine(bn: gs.Node, outs: set[int]):
    """``(s, t, dtype)`` of an inference BatchNormalization (``y = x*s + t`` per channel) with
    constant float parameters whose extra outputs are unused; None otherwise."""
    if bn.op != "BatchNormalization" or not is_default_domain(bn) or len(bn.inputs) < 5:
        return None
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return None
    for m in bn.outputs[1:]:
        if not m.is_empty() and (m.outputs or id(m) in outs):
            return None
    params = [constant_value(p) for p in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1):
        return None
    if not (gamma.shape == beta.shape == mean.shape == var.shape):
        return None
    if params[0].dtype not in FLOAT_TYPES:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    t = beta - mean * s
    return s, t, params[0].dtype


def fold_batchnorm_backward(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """BatchNormalization into the preceding Conv/ConvTranspose/Gemm; returns how many."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for bn in list(sub.nodes):
        if bn.op != "BatchNormalization" or not bn.outputs:
            continue
        affine = batchnorm_affine(bn, outs)
        if affine is None:
            continue
        x = bn.inputs[0]
        p = producer(x, sub, LINEAR_OPS)
        if p is None or not single_use(x, bn, outs, ins):
            continue
        lp = _linear_params(p)
        if lp is None:
            continue
        w, b, m = lp
        s, t, dtype = affine
        if s.shape != (m,) or dtype != w.dtype:
            continue
        _scale_linear(p, w, b, s, t, names)
        y = bn.outputs[0]
        detach(bn)
        p.outputs[0] = y
        n += 1
    drop_detached(sub)
    return n


def fold_scale_bias_backward(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """Mul/Div/Add/Sub by a scalar or per-channel constant into the preceding Conv/ConvTranspose/Gemm;
    returns how many."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for e in list(sub.nodes):
        if e.op not in ("Mul", "Div", "Add", "Sub") or not is_default_domain(e) or not e.outputs:
            continue
        if len(e.inputs) != 2:
            continue
        a, c = e.inputs
        if is_constant(a) and not is_constant(c) and e.op in ("Mul", "Add"):
            a, c = c, a
        if not is_constant(c) or is_constant(a):
            continue
        p = producer(a, sub, LINEAR_OPS)
        if p is None or not single_use(a, e, outs, ins):
            continue
        lp = _linear_params(p)
        if lp is None:
            continue
        w, b, m = lp
        cv = constant_value(c)
        if cv.dtype != w.dtype:
            continue
        vec = channel_vector(cv, 2 if p.op == "Gemm" else w.ndim, m)
        if vec is None:
            continue
        if e.op in ("Mul", "Div"):
            if e.op == "Div":
                if np.any(vec == 0) or not np.all(np.isfinite(vec)):
                    continue
                vec = 1.0 / vec
            _scale_linear(p, w, b, vec, np.zeros(m), names)
        else:
            _scale_linear(p, w, b, np.ones(m), vec if e.op == "Add" else -vec, names)
        y = e.outputs[0]
        detach(e)
        p.outputs[0] = y
        n += 1
    drop_detached(sub)
    return n


def fold_batchnorm_forward(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """BatchNormalization into a following unpadded Conv; returns how many."""
    n = 0
    outs = graph_output_ids(root)
    for bn in list(sub.nodes):
        if bn.op != "BatchNormalization" or not bn.outputs:
            continue
        affine = batchnorm_affine(bn, outs)
        if affine is None:
            continue
        found = _following_unpadded_conv(bn.outputs[0], sub, outs)
        if found is None or affine[2] != found[1].dtype:
            continue
        conv, w, b, m = found
        if _fold_input_affine(conv, w, b, m, affine[0], affine[1], bn.inputs[0], names):
            detach(bn)
            n += 1
    drop_detached(sub)
    return n


def fold_scale_bias_forward(sub: gs.Graph, root: gs.Graph, names: FreshNames, shapes: dict[str, list]) -> int:
    """Mul/Div/Add/Sub of x by a scalar or per-channel constant that only an unpadded Conv reads
    (PP-LCNet's learnable affine before a pointwise conv). x must already have the Conv input's
    rank (``shapes``: inferred shapes by name), so the constant does not broadcast x to a bigger
    shape. Returns how many."""
    n = 0
    outs = graph_output_ids(root)
    for e in list(sub.nodes):
        if not e.outputs:
            continue
        op = constant_operand(e)
        if op is None:
            continue
        x, c64, dt, fam = op
        found = _following_unpadded_conv(e.outputs[0], sub, outs)
        if found is None or dt != found[1].dtype:
            continue
        conv, w, b, m = found
        rank = w.ndim
        xs = shapes.get(x.name) if isinstance(x, gs.Variable) else None
        xs = xs if xs is not None else x.shape
        if xs is None or len(xs) != rank:
            continue
        cin = w.shape[1] * int(conv.attrs.get("group", 1))
        vec = channel_vector(c64, rank, cin)
        if vec is None:
            continue
        s, t = (vec, np.zeros(cin)) if fam == "Mul" else (np.ones(cin), vec)
        if _fold_input_affine(conv, w, b, m, np.asarray(s, np.float64), np.asarray(t, np.float64), x, names):
            detach(e)
            n += 1
    drop_detached(sub)
    return n


def _linear_params(p: gs.Node):
    """(W, b or None, channels M) of a Conv/ConvTranspose/Gemm with constant float weights."""
    if len(p.inputs) < 2:
        return None
    w = constant_value(p.inputs[1])
    if w is None or w.dtype not in FLOAT_TYPES:
        return None
    b = None
    if len(p.inputs) > 2 and not p.inputs[2].is_empty():
        b = constant_value(p.inputs[2])
        if b is None or b.dtype != w.dtype:
            return None
    if p.op == "Conv":
        if w.ndim < 3:
            return None
        m = w.shape[0]
    elif p.op == "ConvTranspose":
        if w.ndim < 3:
            return None
        m = w.shape[1] * int(p.attrs.get("group", 1))
    else:  # Gemm
        if w.ndim != 2:
            return None
        m = w.shape[0] if p.attrs.get("transB", 0) else w.shape[1]
    if p.op != "Gemm" and b is not None and b.shape != (m,):
        return None
    return w, b, m


def _set_bias(node: gs.Node, bias: gs.Constant) -> None:
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)


def _scale_linear(p: gs.Node, w, b, scale: np.ndarray, shift: np.ndarray, names: FreshNames) -> None:
    """Rewrite p so that its output becomes ``y * scale + shift`` (per output channel)."""
    dt = w.dtype
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    w64 = w.astype(np.float64)
    if p.op == "Conv":
        w_new = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif p.op == "ConvTranspose":
        g = int(p.attrs.get("group", 1))
        cin, mg = w.shape[0], w.shape[1]
        w_new = (w64.reshape((g, cin // g, mg) + w.shape[2:])
                 * scale.reshape((g, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:
        w_new = w64 * (scale[:, None] if p.attrs.get("transB", 0) else scale[None, :])
    base = p.inputs[1].name
    p.inputs[1] = names.constant(base + "_folded", w_new.astype(dt))
    if p.op == "Gemm":
        beta = float(p.attrs.get("beta", 1.0))
        c = b.astype(np.float64) * beta if b is not None else np.zeros(1)
        c_new = c * scale + shift
        if b is None and c_new.shape == (1,):
            c_new = np.broadcast_to(c_new, scale.shape)
        tensor = names.constant((p.inputs[2].name if b is not None else base) + "_bias_folded", c_new.astype(dt))
        p.attrs["beta"] = 1.0
    else:
        b64 = b.astype(np.float64) if b is not None else np.zeros(scale.shape)
        tensor = names.constant((p.inputs[2].name if b is not None else base) + "_bias_folded",
                                (b64 * scale + shift).astype(dt))
    _set_bias(p, tensor)


def _following_unpadded_conv(y: gs.Tensor, sub: gs.Graph, outs: set[int]):
    """(conv, W, b, M) when ``y`` is read only by an unpadded Conv as its data input."""
    if not (isinstance(y, gs.Variable) and id(y) not in outs and len(y.outputs) == 1):
        return None
    conv = y.outputs[0]
    if conv.op != "Conv" or not is_default_domain(conv) or conv not in sub.nodes or conv.inputs[0] is not y:
        return None
    if any(t is y for t in conv.inputs[1:]):
        return None
    # padding would pad x with zeros where the original padded affine(x) with zeros
    if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if any(int(v) != 0 for v in conv.attrs.get("pads", [])):
        return None
    lp = _linear_params(conv)
    if lp is None:
        return None
    return (conv,) + lp


def _fold_input_affine(conv: gs.Node, w, b, m, s: np.ndarray, t: np.ndarray, x: gs.Tensor,
                       names: FreshNames) -> bool:
    """Conv(x * s + t) with per-input-channel s, t (length C) -> Conv'(x): W'[m, c] = W[m, c] * s[c],
    b'[m] = b[m] + sum_{c,k} W[m, c, k] * t[c] (grouped: input channel c of output m's group)."""
    g = int(conv.attrs.get("group", 1))
    cg = w.shape[1]
    if s.shape != (cg * g,) or t.shape != (cg * g,) or m % g:
        return False
    mg = m // g
    w64 = w.astype(np.float64)
    extra = (1,) * (w.ndim - 2)
    wg = w64.reshape((g, mg, cg) + w.shape[2:])
    w_new = (wg * s.reshape((g, 1, cg) + extra)).reshape(w.shape)
    b_add = (wg * t.reshape((g, 1, cg) + extra)).reshape(m, -1).sum(axis=1)
    b64 = b.astype(np.float64) if b is not None else np.zeros(m)
    base = conv.inputs[1].name
    conv.inputs[1] = names.constant(base + "_folded", w_new.astype(w.dtype))
    if np.any(t != 0) or b is not None:
        _set_bias(conv, names.constant((conv.inputs[2].name if b is not None else base) + "_bias_folded",
                                       (b64 + b_add).astype(w.dtype)))
    conv.inputs[0] = x
    return True
