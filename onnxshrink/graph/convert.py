"""Conversion between onnx.ModelProto and the onnx-graphsurgeon Graph passes work on."""

from __future__ import annotations

__all__ = ["model_to_graph", "graph_to_model"]

import onnx
import onnx_graphsurgeon as gs

from ..model import copy_model_fields


def model_to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph``; with a template, keep its metadata, producer, doc string, custom opset
    domains and functions, and never lower its IR version."""
    model = gs.export_onnx(graph, do_type_check=False)
    if template is not None:
        copy_model_fields(template, model)
        _restore_overridable_inputs(template, model)
    return model


def _restore_overridable_inputs(template: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Graph inputs that also have an initializer (a default the caller may override) come back
    from onnx-graphsurgeon as plain initializers; put them back in the inputs, in the original
    order, so the model's interface does not change."""
    have = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    lost = [i for i in template.graph.input if i.name not in have and i.name in inits]
    if not lost:
        return
    order = {i.name: k for k, i in enumerate(template.graph.input)}
    merged = sorted(list(model.graph.input) + lost, key=lambda v: order.get(v.name, len(order)))
    del model.graph.input[:]
    model.graph.input.extend(merged)
