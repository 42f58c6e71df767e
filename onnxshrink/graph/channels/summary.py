"""What the channel units of an analysed graph are, for reports and ``onnxshrink inspect``:
attention heads (per attention product ``Q K^T``: the head count H and head width D), neurons
(the features of MatMul/Gemm layers, e.g. a transformer MLP's hidden width) or channels."""

from __future__ import annotations

__all__ = ["group_kind", "transformer_summary"]

import numpy as np

from onnxshrink.graph.channels.analysis import ChannelAnalysis, analyze
from onnxshrink.graph.channels.types import ChannelGroup


def group_kind(a: ChannelAnalysis, g: ChannelGroup) -> tuple[str, dict]:
    """("heads", {attention product: unit label of each head}) when ``g`` holds attention heads,
    ("neurons", {}) when every producer is a MatMul or Gemm, else ("channels", {})."""
    labels = set(g.unit_labels)
    heads = {name: a.unit_of(ids).tolist() for name, ids in a.heads if set(a.unit_of(ids).tolist()) <= labels}
    if heads:
        return "heads", heads
    ops = {n.name: n.op for n in a.graph.nodes}
    if g.producers and all(ops.get(p) in ("MatMul", "Gemm") for p in g.producers):
        return "neurons", {}
    return "channels", {}


def transformer_summary(graph, input_shapes: dict | None = None) -> list[dict]:
    """Per attention product ``{"attention", "heads", "head_dim", "prunable"}`` and per prunable
    neuron group ``{"mlp", "neurons"}`` (its first producer), in graph order; [] for a graph with
    neither."""
    a = analyze(graph, input_shapes)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    blocked = a.blocked_units()
    out = []
    for name, ids in a.heads:
        lay = a.layouts.get(nodes[name].inputs[0].name)
        d = int(lay.ids.shape[1]) if lay is not None and lay.ids.ndim == 2 else None
        units = np.unique(a.unit_of(ids)).tolist()
        out.append((order[name], {"attention": name, "heads": int(ids.size), "head_dim": d,
                                  "prunable": not any(u in blocked for u in units)}))
    if a.heads or any(n.op == "MatMul" for n in graph.nodes):
        for g in a.groups():
            if g.prunable and group_kind(a, g)[0] == "neurons":
                out.append((order.get(g.producers[0], 0), {"mlp": g.producers[0], "neurons": g.units}))
    return [rec for _, rec in sorted(out, key=lambda x: x[0])]
