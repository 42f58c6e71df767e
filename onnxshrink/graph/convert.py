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
        _restore_initializer_inputs(model, template)
    if model.ir_version and model.ir_version < 4:
        _list_initializers_as_inputs(model)
    return model


def _restore_initializer_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """onnx-graphsurgeon drops graph inputs that are also initializers (weights listed as inputs,
    as IR < 4 requires, or overridable defaults). Put those still present back at their place."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    have = {i.name for i in g.input}
    missing = {i.name for i in template.graph.input if i.name in inits and i.name not in have}
    if not missing:
        return
    current = {i.name: i for i in g.input}
    ordered = []
    for i in template.graph.input:
        if i.name in current:
            ordered.append(current.pop(i.name))
        elif i.name in missing:
            ordered.append(i)
    ordered.extend(current.values())  # inputs the template did not have (none for a cleanup)
    new = [onnx.ValueInfoProto() for _ in ordered]
    for n, o in zip(new, ordered):
        n.CopyFrom(o)
    del g.input[:]
    g.input.extend(new)


def _list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too."""
    g = model.graph
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in have:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
