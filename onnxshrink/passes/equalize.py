"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization"): exact, per channel.

For two convolutions in a row, ``y = W2 f(W1 x + b1) + b2``, with ``f`` positively homogeneous
(identity, Relu, LeakyRelu: ``f(x / s) = f(x) / s`` for ``s > 0``), scaling output channel ``i``
of the first layer by ``1 / s_i`` and input channel ``i`` of the second by ``s_i``

    W1[i] <- W1[i] / s_i,   b1[i] <- b1[i] / s_i,   W2[:, i] <- W2[:, i] * s_i

leaves ``y`` unchanged (padding zeros stay zeros). With ``r1_i = max|W1[i]|`` and
``r2_i = max|W2[:, i]|`` the choice ``s_i = sqrt(r1_i r2_i) / r2_i`` makes both ranges equal to
``sqrt(r1_i r2_i)``, which evens out the per-channel weight ranges that per-tensor int8 grids
(and depthwise convolutions, one channel per filter) lose precision on. Chains (Conv -> depthwise
Conv -> pointwise Conv) are equalized pair by pair, repeated until the scales settle.

Grouped second layers work per group: input channel ``i`` of a Conv with ``g`` groups feeds the
output channels of group ``i // (C_in / g)`` through weight column ``i % (C_in / g)``.
Clip with a finite upper bound (ReLU6), HardSwish, HardSigmoid, Sigmoid, SiLU and anything else
are *not* homogeneous, so pairs joined by them are skipped (``stats['skipped']`` counts why).
The tensor between the two layers must have a single consumer and not be a graph output.
Run ``cleanup`` first so BatchNormalization is folded into the convolutions.
"""

from __future__ import annotations

__all__ = ["EqualizeOptions", "EqualizePass", "equalize_pairs", "find_pairs"]

import collections
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import clip_range, constant_value
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register

HOMOGENEOUS = {"Relu", "LeakyRelu", "Identity"}


@dataclass
class EqualizeOptions:
    iterations: int = field(default=20, metadata={"help": "passes over the pairs (chains settle in a few)"})
    max_scale: float = field(default=1e4, metadata={"help": "bound on each channel's scale factor"})


@register
class EqualizePass(Pass):
    """Cross-layer equalization of Conv -> [Relu/LeakyRelu] -> Conv pairs; exact up to float round-off."""

    name = "equalize"
    summary = "lossless: cross-layer equalization of conv pairs (even per-channel weight ranges for int8)"
    lossless = True
    needs_data = False
    Options = EqualizeOptions

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        seen = set()
        for i, node in enumerate(graph.nodes):
            if not node.name or node.name in seen:
                node.name = f"{node.op}_{i}"
            seen.add(node.name)
        stats = equalize_pairs(graph, self.options.iterations, max_scale=self.options.max_scale)
        reason = "" if stats["pairs"] else "no Conv -> [Relu] -> Conv pair with a single-consumer link"
        return PassResult(graph, bool(stats["pairs"]), stats, reason=reason)


def _conv_ok(node) -> bool:
    if node.op != "Conv" or len(node.inputs) < 2:
        return False
    w = constant_value(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim < 3:
        return False
    if len(node.inputs) > 2 and node.inputs[2].name and constant_value(node.inputs[2]) is None:
        return False
    return True


def _is_relu_clip(node) -> bool:
    """Clip(0, +inf) (ONNX Clip without a max) is a Relu."""
    bounds = clip_range(node) if node.op == "Clip" else None
    return bounds is not None and bounds[0] == 0.0 and math.isinf(bounds[1])


def find_pairs(graph: gs.Graph) -> tuple[list, collections.Counter]:
    """``(conv1, activation or None, conv2)`` triples that can be equalized, and why others can't."""
    outs = {t.name for t in graph.outputs}
    pairs, skipped = [], collections.Counter()
    for n1 in graph.nodes:
        if not _conv_ok(n1):
            continue
        y = n1.outputs[0]
        if y.name in outs or len(y.outputs) != 1:
            skipped["first output fans out or is a graph output"] += 1
            continue
        nxt, act = y.outputs[0], None
        if nxt.op in HOMOGENEOUS or _is_relu_clip(nxt):
            act = nxt
            z = nxt.outputs[0]
            if z.name in outs or len(z.outputs) != 1:
                skipped["activation output fans out or is a graph output"] += 1
                continue
            nxt = z.outputs[0]
        elif nxt.op != "Conv":
            skipped[f"joined by {nxt.op} (not positively homogeneous)"] += 1
            continue
        if not _conv_ok(nxt) or nxt.inputs[0] is not (act.outputs[0] if act is not None else y):
            skipped[f"followed by {nxt.op}, not a Conv with constant weights"] += 1
            continue
        c1 = constant_value(n1.inputs[1]).shape[0]
        w2 = constant_value(nxt.inputs[1])
        g2 = int(nxt.attrs.get("group", 1))
        if w2.shape[1] * g2 != c1:
            skipped["channel counts do not match"] += 1
            continue
        pairs.append((n1, act, nxt))
    return pairs, skipped


def _slabs(w2: np.ndarray, g: int) -> np.ndarray:
    """W2 [Cout, Cin/g, k...] as per-input-channel slabs [Cin, Cout/g, prod(k)]."""
    cout, cg = w2.shape[:2]
    return w2.reshape(g, cout // g, cg, -1).transpose(0, 2, 1, 3).reshape(g * cg, cout // g, -1)


def _unslab(sl: np.ndarray, shape, g: int) -> np.ndarray:
    cout, cg = shape[:2]
    return sl.reshape(g, cg, cout // g, -1).transpose(0, 2, 1, 3).reshape(shape)


def equalize_pairs(graph: gs.Graph, iterations: int = 20, tol: float = 1e-3, max_scale: float = 1e4) -> dict:
    """Equalize every eligible pair in place (see the module doc); returns stats."""
    pairs, skipped = find_pairs(graph)
    if not pairs:
        return {"pairs": 0, "skipped": dict(skipped)}
    ws = {}  # node name -> float64 weights, written back once at the end
    bs = {}

    def w(n):
        if n.name not in ws:
            ws[n.name] = constant_value(n.inputs[1]).astype(np.float64)
        return ws[n.name]

    def b(n):
        if n.name not in bs:
            bs[n.name] = (constant_value(n.inputs[2]).astype(np.float64).reshape(-1)
                          if len(n.inputs) > 2 and n.inputs[2].name else None)
        return bs[n.name]

    # before: mean over pairs of the spread of per-channel ranges (max / min) of both layers
    def spread(a):
        r = np.abs(a).reshape(a.shape[0], -1).max(axis=1)
        r = r[r > 1e-6 * r.max()] if r.size and r.max() > 0 else r[:0]  # dead channels say nothing
        return float(r.max() / r.min()) if r.size else 1.0

    before = float(np.mean([spread(w(p[0])) for p in pairs]))
    it = 0
    for it in range(1, iterations + 1):
        change = 0.0
        for n1, _act, n2 in pairs:
            W1, W2 = w(n1), w(n2)
            g2 = int(n2.attrs.get("group", 1))
            r1 = np.abs(W1).reshape(W1.shape[0], -1).max(axis=1)
            sl = _slabs(W2, g2)
            r2 = np.abs(sl).reshape(sl.shape[0], -1).max(axis=1)
            s = np.ones_like(r1)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            s = np.clip(s, 1.0 / max_scale, max_scale)
            change = max(change, float(np.max(np.abs(np.log(s)))))
            ws[n1.name] = W1 / s.reshape(-1, *([1] * (W1.ndim - 1)))
            if b(n1) is not None:
                bs[n1.name] = b(n1) / s
            ws[n2.name] = _unslab(sl * s[:, None, None], W2.shape, g2)
        if change < tol:
            break
    by_name = {n.name: n for p in pairs for n in (p[0], p[2])}
    for name, arr in ws.items():
        node = by_name[name]
        # named after the node: a weight shared by two convs (cleanup merges equal initializers)
        # gets one new tensor per conv
        node.inputs[1] = gs.Constant(f"{node.name}_W_equalized", arr.astype(np.float32))
    for name, arr in bs.items():
        if arr is None:
            continue
        node = by_name[name]
        node.inputs[2] = gs.Constant(f"{node.name}_B_equalized", arr.astype(np.float32))
    graph.cleanup()
    after = float(np.mean([spread(ws[p[0].name]) for p in pairs]))
    return {"pairs": len(pairs), "iterations": it, "skipped": dict(skipped),
            "first_layer_range_spread": {"before": round(before, 2), "after": round(after, 2)},
            "pair_names": [f"{p[0].name} -> {p[2].name}" for p in pairs][:50]}
