"""Matching the tensors of a shrunk CANDIDATE to those of its ORIGINAL, and what the candidate did
to each.

For every float tensor ``t`` of the original graph (graph inputs, then node outputs in graph order) the
candidate's *view* of ``t`` is the tensor the candidate's consumers of ``t`` read:

1. a ``QuantizeLinear`` reading a candidate tensor named ``t`` followed by a ``DequantizeLinear``: the
   DequantizeLinear's output (QDQ insertion keeps the float names; onnxruntime's quantizer also
   drops a Relu after a Conv and gives the Conv the Relu's output name, whose quantized range then
   clips at zero, so the dequantized value is the one that matches the original ``t``);
2. else a candidate tensor named ``t`` (a ``DequantizeLinear`` output named ``t``, as onnxruntime's
   quantizer writes for graph outputs, carries that DequantizeLinear's quantization);
3. else none: ``t`` is not matched (a pruned layer's output with fewer channels is dropped when its
   shape differs, at measurement time).

The matched tensors cut the original graph into *segments*: a matched tensor's segment is the set of
original nodes between it and its nearest matched ancestors. A segment is the unit explain attributes
error to; its *main node* is its last Conv/MatMul/Gemm (else its producer), matched to the candidate
node of the same name. What the candidate did to a segment (``Unit``): the quantization of its tensor
(scale, zero point, axis, integer type), the weights of its nodes stored through DequantizeLinear
(dequantized values and the original floats), and structural changes: a weight with fewer channels
(pruned), a node replaced by ``<name>_svd_1 -> <name>_svd_2`` (factorized, rank = the inner width).
"""

from __future__ import annotations

__all__ = ["QParams", "WeightQuant", "Unit", "Matching", "match_models", "channel_axis", "channel_axes"]

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, node_attr
from onnxshrink.passes.quantize.plan import WEIGHTED_OPS

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def channel_axis(ndim: int) -> int:
    """The channel axis of an activation: 1 for NC... images (4-D, 5-D, as Conv's), the last axis for
    [N, C] and [B, T, C] (Gemm, MatMul)."""
    return 1 if ndim >= 4 else ndim - 1


def channel_axes(ndim: int) -> tuple:
    """The axes that may hold channels: a 3-D tensor is [B, T, C] in a transformer but [B, C, N] in a
    detection head (YOLO's boxes and class scores), so both of its axes count."""
    return (1, 2) if ndim == 3 else (channel_axis(ndim),)


@dataclass
class QParams:
    """One quantization: ``x_q = clip(round(x / scale) + zero_point)``, ``x' = (x_q - zero_point) scale``;
    ``axis`` for per-channel scales, ``dtype`` the integer type, ``domain`` the Q/DQ operator domain."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 1
    dtype: str = "uint8"
    domain: str = ""

    @property
    def bits(self) -> int:
        return np.dtype(self.dtype).itemsize * 8

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        shape = [1] * q.ndim
        if not self.per_tensor:
            shape[self.axis] = -1
        s = self.scale.astype(np.float64).reshape(shape if not self.per_tensor else [])
        z = self.zero_point.astype(np.float64).reshape(shape if not self.per_tensor else [])
        return ((q.astype(np.float64) - z) * s).astype(np.float32)


@dataclass
class WeightQuant:
    """A weight of an original node (input ``slot``) stored quantized by the candidate."""

    node: str
    slot: int
    params: QParams
    dequantized: np.ndarray
    original: np.ndarray


@dataclass
class Unit:
    """A matched original tensor, its segment and what the candidate did there."""

    tensor: str
    view: str
    nodes: list = field(default_factory=list)  # original node names of the segment, graph order
    node: str = ""  # the main node ("" for a graph input)
    op: str = ""
    ancestors: list = field(default_factory=list)
    act: QParams | None = None  # the candidate's quantization of the tensor
    weights: list = field(default_factory=list)  # WeightQuant of the segment's nodes
    pruned: dict = field(default_factory=dict)  # node -> {"out": (kept, of), "in": (kept, of)}
    factorized: dict = field(default_factory=dict)  # node -> {"rank": r, "full": min(dims)}
    unfused: bool = False  # Q/DQ around an op onnxruntime has no integer kernel for
    consumers: list = field(default_factory=list)  # original nodes reading the tensor

    @property
    def quantized(self) -> bool:
        return self.act is not None or bool(self.weights)

    @property
    def is_input(self) -> bool:
        return not self.nodes


@dataclass
class Matching:
    """The matched tensors in graph order, with the candidate's kind of change."""

    units: dict  # original tensor -> Unit, graph order
    outputs: list  # the graph outputs (original names)
    kind: str  # "quantized", "pruned", "factorized", "mixed", "unchanged"

    def pairs(self) -> dict:
        return {t: u.view for t, u in self.units.items()}


def _qparams(q_or_dq: gs.Node) -> QParams | None:
    scale = constant_value(q_or_dq.inputs[1]) if len(q_or_dq.inputs) > 1 else None
    if scale is None:
        return None
    zp = constant_value(q_or_dq.inputs[2]) if len(q_or_dq.inputs) > 2 and q_or_dq.inputs[2].name else None
    dtype = None
    if q_or_dq.op == "DequantizeLinear":
        dtype = np.asarray(constant_value(q_or_dq.inputs[0])).dtype if isinstance(q_or_dq.inputs[0], gs.Constant) \
            else q_or_dq.inputs[0].dtype
    if dtype is None:
        dtype = zp.dtype if zp is not None else np.uint8
    if zp is None:
        zp = np.zeros_like(np.asarray(scale), dtype=dtype)
    return QParams(np.asarray(scale, np.float32), np.asarray(zp), int(node_attr(q_or_dq, "axis", 1)),
                   np.dtype(dtype).name, q_or_dq.domain or "")


def _float_tensor(t) -> bool:
    return t.dtype is None or np.dtype(t.dtype).kind == "f"


def match_models(original: onnx.ModelProto, candidate: onnx.ModelProto) -> tuple[Matching, gs.Graph, gs.Graph]:
    """Match the candidate's tensors to the original's (module docstring); shapes are checked later,
    on the captured values."""
    go = gs.import_onnx(original)
    gc = gs.import_onnx(candidate)
    ctensors = gc.tensors()
    # candidate tensor name -> (DequantizeLinear output, its QuantizeLinear) for Q -> DQ pairs reading it
    q_view: dict[str, tuple[str, gs.Node]] = {}
    for n in gc.nodes:
        if n.op != "QuantizeLinear" or not n.inputs:
            continue
        for c in n.outputs[0].outputs:
            if c.op == "DequantizeLinear" and n.inputs[0].name not in q_view:
                q_view[n.inputs[0].name] = (c.outputs[0].name, n)
    units: dict[str, Unit] = {}
    # graph inputs that are initializers too (older exporters list weights as inputs) are weights
    weights = {t.name for t in original.graph.initializer}
    order = [t for t in go.inputs if t.name not in weights] + [t for n in go.nodes for t in n.outputs]
    for t in order:
        if not isinstance(t, gs.Variable) or not t.name or not _float_tensor(t) or t.name in units:
            continue
        if t.name in q_view:
            view, q = q_view[t.name]
            units[t.name] = Unit(t.name, view, act=_qparams(q))
        elif t.name in ctensors and isinstance(ctensors[t.name], gs.Variable):
            ct = ctensors[t.name]
            prod = ct.inputs[0] if ct.inputs else None
            act = _qparams(prod) if prod is not None and prod.op == "DequantizeLinear" else None
            units[t.name] = Unit(t.name, t.name, act=act)
    m = Matching(units, [t.name for t in go.outputs], "unchanged")
    return m, go, gc


def build_segments(m: Matching, go: gs.Graph, gc: gs.Graph) -> None:
    """Fill each unit's segment, main node, weights and structural changes (after unmatched
    tensors were dropped from ``m.units``)."""
    cnodes = {n.name: n for n in gc.nodes if n.name}
    order = {id(n): i for i, n in enumerate(go.nodes)}
    tmap = go.tensors()
    kinds = set()
    inputs = {t.name for t in go.inputs}
    for name, u in list(m.units.items()):
        t = tmap[name]
        u.consumers = [c.name for c in t.outputs]
        seen, segment, ancestors = set(), [], []
        stack = list(t.inputs)
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            segment.append(n)
            for x in n.inputs:
                if not isinstance(x, gs.Variable) or not x.name:
                    continue
                if x.name in m.units:
                    if x.name not in ancestors:
                        ancestors.append(x.name)
                else:
                    stack.extend(x.inputs)
        if not ancestors and name not in inputs and name not in m.outputs:
            del m.units[name]  # computed from constants alone: no activation
            continue
        segment.sort(key=lambda n: order[id(n)])
        u.nodes = [n.name for n in segment]
        u.ancestors = ancestors
        weighted = [n for n in segment if n.op in WEIGHTED_OPS]
        main = weighted[-1] if weighted else (segment[-1] if segment else None)
        u.node, u.op = (main.name, main.op) if main is not None else ("", "input")
        for n in segment:
            _compare_node(u, n, cnodes)
        if u.act is not None or u.weights:
            kinds.add("quantized")
        if u.pruned:
            kinds.add("pruned")
        if u.factorized:
            kinds.add("factorized")
    m.kind = "unchanged" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def _compare_node(u: Unit, n: gs.Node, cnodes: dict) -> None:
    """What the candidate did to original node ``n`` (weights quantized, pruned, factorized)."""
    cn = cnodes.get(n.name)
    if cn is None:
        s1, s2 = cnodes.get(f"{n.name}_svd_1"), cnodes.get(f"{n.name}_svd_2")
        w = constant_value(n.inputs[1]) if len(n.inputs) > 1 else None
        if s1 is not None and s2 is not None and w is not None:
            w1 = constant_value(s1.inputs[1])
            rank = int(w1.shape[0] if s1.op == "Conv" else w1.shape[-1]) if w1 is not None else 0
            full = int(min(w.shape[0], int(np.prod(w.shape[1:])))) if n.op == "Conv" else int(min(w.shape))
            u.factorized[n.name] = {"rank": rank, "full": full}
        return
    if cn.op in QDQ_OPS:
        return
    if n.op in WEIGHTED_OPS and cn.op not in WEIGHTED_OPS | QDQ_OPS:
        return
    for slot, x in enumerate(n.inputs):
        if slot >= len(cn.inputs) or not isinstance(x, gs.Constant):
            continue
        orig = constant_value(x)
        cx = cn.inputs[slot]
        prod = cx.inputs[0] if isinstance(cx, gs.Variable) and cx.inputs else None
        if prod is not None and prod.op == "DequantizeLinear" and isinstance(prod.inputs[0], gs.Constant):
            p = _qparams(prod)
            if p is None:
                continue
            deq = p.dequantize(np.asarray(constant_value(prod.inputs[0])))
            if orig is not None and deq.shape == orig.shape:
                u.weights.append(WeightQuant(n.name, slot, p, deq, np.asarray(orig, np.float32)))
            elif orig is not None and slot == 1:
                _pruned(u, n, orig.shape, deq.shape)
        else:
            cv = constant_value(cx) if isinstance(cx, gs.Constant) else None
            if cv is not None and orig is not None and slot == 1 and cv.shape != orig.shape:
                _pruned(u, n, orig.shape, cv.shape)
    if n.op not in WEIGHTED_OPS and u.act is not None:
        ins = [x for x in cn.inputs if isinstance(x, gs.Variable) and x.inputs
               and x.inputs[0].op == "DequantizeLinear"]
        u.unfused = bool(ins)


def _pruned(u: Unit, n: gs.Node, orig_shape, new_shape) -> None:
    d: dict = {}
    if orig_shape[0] != new_shape[0]:
        d["out"] = (int(new_shape[0]), int(orig_shape[0]))
    if len(orig_shape) > 1 and orig_shape[1] != new_shape[1]:
        d["in"] = (int(new_shape[1]), int(orig_shape[1]))
    if d:
        u.pruned[n.name] = d
