"""Which layers svd factors (``weight_view``, the one rule both the pass and its knob use) and
svd's knob for the cost-target allocation.

A layer is a Conv / Gemm / MatMul with a constant float weight. svd factors a MatMul or Gemm whose
weight is a matrix (Gemm without ``transA``) as an n x m ``linear`` view, and a 2-D group-1 Conv;
its channel_out view is the n x m = Cout x (Cin kh kw) matrix. Knob: a unit is such a layer of at
least ``min_params`` weights; strength f is the fraction of its parameters kept, rank
``k = max(1, floor(f n m / (n + m)))`` of that view (k (n + m) parameters for n m), given to the
pass as ``ranks`` ``{layer: [form, k]}``, resolved on the graph the pass is applied to.
"""

from __future__ import annotations

__all__ = ["SvdKnob", "WeightView", "weight_view"]

import math
from dataclasses import dataclass

import onnx

from onnxshrink.passes.knob import LAYER_OPS, Knob, weighted_nodes


@dataclass(frozen=True)
class WeightView:
    """A factorable layer's weight: ``kind`` (matmul, gemm or conv) and the n x m matrix of its
    ``form`` (linear; channel_out for convs) the rank formula reads."""

    kind: str
    form: str
    n: int
    m: int


def weight_view(op: str, shape, attrs: dict) -> tuple[WeightView | None, str]:
    """(the view of a layer's weight, "") when svd factors it, else (None, why not), from the op,
    the weight's shape and the node's attributes ({name: value})."""
    ndim = len(shape)
    if op == "Conv":
        if ndim != 4:
            return None, f"{ndim - 2}-D conv (only 2-D convs)"
        group = int(_attribute(attrs, "group", 1))
        if group != 1:
            return None, f"grouped conv (group={group}) is not factorized"
        return WeightView("conv", "channel_out", int(shape[0]), int(shape[1] * shape[2] * shape[3])), ""
    if op == "Gemm" and _attribute(attrs, "transA", 0):
        return None, "transA=1 (the activation is transposed)"
    if ndim != 2:
        return None, f"weight of rank {ndim}" + (" (batched)" if op == "MatMul" else "")
    return WeightView(op.lower(), "linear", int(shape[0]), int(shape[1])), ""


def _attribute(attrs: dict, name: str, default):
    """An attribute's value, ``default`` when absent or None."""
    v = attrs.get(name, default)
    return default if v is None else v


class SvdKnob(Knob):
    """Per-layer ranks (see the module docstring)."""

    pass_name = "svd"
    strengths = (0.5, 0.25)
    probe = {"samples": 8}
    min_params = 4096

    def units(self, model, shapes):
        return [(n.name, size) for n, size in weighted_nodes(model, self.min_params)
                if n.name and self.view(n, model) is not None]

    def view(self, node: onnx.NodeProto, model: onnx.ModelProto) -> WeightView | None:
        """The view of an initializer-weighted node's weight, or None when svd does not factor it."""
        weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
        if weight is None:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return weight_view(node.op_type, list(weight.dims), attrs)[0]

    def options(self, model, choices):
        nodes = {n.name: n for n in model.graph.node if n.name}
        ranks = {}
        for u, f in sorted(choices.items()):
            n = nodes.get(u)
            view = self.view(n, model) if n is not None and n.op_type in LAYER_OPS else None
            if view is None:
                continue
            ranks[u] = [view.form, max(1, int(math.floor(f * view.n * view.m / (view.n + view.m))))]
        return {"ranks": ranks, "fold": False, "measure": False, "latency": False, "min_params": self.min_params}
