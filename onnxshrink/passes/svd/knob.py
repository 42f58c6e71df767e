"""Which layers svd factors (``weight_view``, the one rule both the pass and its knob use) and
svd's knob for the cost-target allocation.

A layer is a Conv / Gemm / MatMul with a constant float weight. svd factors a MatMul or Gemm whose
weight is a matrix (Gemm without ``transA``) as an n x m ``linear`` view, and a 2-D group-1 Conv;
its channel_out view is the n x m = Cout x (Cin kh kw) matrix. Knob: a unit is such a layer of at
least ``min_params`` weights; strength f is the fraction of its parameters kept, rank
``k = max(1, floor(f n m / (n + m)))`` of that view (k (n + m) parameters for n m), given to the
pass as ``ranks`` ``{layer: [form, k]}``, resolved on the graph the pass is applied to.

Proxy (``proxy``, see ``passes/knob.py``): the rank-k factor pair of the K x N weight whitened by the
layer's input covariance (``factorization.factorize``; a Conv's patch covariance, or none for long
patches), multiplied back, measured end to end at the first strength, the others that loss scaled by the
ratio of their output errors judged on the other samples' covariance (``eval_cov``: fitted on the
calibration samples, a rank cut of a wide layer looks exact on them); saving ``n m - k (n + m)``
parameters (4 bytes each for float32) and that share of the layer's MACs.
"""

from __future__ import annotations

__all__ = ["SvdKnob", "WeightView", "weight_view"]

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxshrink.passes.knob import LAYER_OPS, Knob, weighted_nodes
from onnxshrink.passes.svd.factorization import factorize, whitened_svd


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


def rank_of(view: WeightView, f: float) -> int:
    """The rank keeping the fraction ``f`` of a view's parameters: ``max(1, floor(f n m / (n + m)))``."""
    return max(1, int(math.floor(f * view.n * view.m / (view.n + view.m))))


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
            ranks[u] = [view.form, rank_of(view, f)]
        return {"ranks": ranks, "fold": False, "measure": False, "latency": False, "min_params": self.min_params}

    def proxy(self, model, unit, strength, layers, shared):
        L = layers.get(unit)
        view = self.view(L.node, model) if L is not None else None
        if view is None:
            return None
        k = rank_of(view, strength)
        if k * (view.n + view.m) >= view.n * view.m:
            return {"unchanged": f"rank {k} saves nothing"}
        key = ("svd.spectrum", unit)
        if key not in shared:  # one whitened SVD per layer, for every strength
            shared[key] = whitened_svd(L.kn.astype(np.float64), L.cov)
        A, B = factorize(L.kn, k, svd=shared[key])
        new = L.from_kn(A @ B)
        saved = view.n * view.m - k * (view.n + view.m)
        return {"weights": {L.weight_name: new},
                "saving": {"params": saved, "weight_bytes": saved * L.weight.itemsize,
                           "macs": L.macs * saved / (view.n * view.m) if L.macs else 0},
                "noise": {unit: L.weight_noise(new)},
                # a rank cut's error is far from white in the output (a noise probe's gain misranks
                # it): measured end to end at the first strength, the others scaled by local error
                **({"exact": True} if strength == self.strengths[0] else {"anchor": self.strengths[0]})}
