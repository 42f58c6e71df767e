"""Conversion between onnx.ModelProto and the onnx-graphsurgeon Graph passes work on."""

from __future__ import annotations

__all__ = ["model_to_graph", "graph_to_model"]

import onnx
import onnx_graphsurgeon as gs

# onnx-graphsurgeon's warnings (missing opset info, colour module) are noise on a user's terminal;
# our own validation reports what matters
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

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
        _restore_io_types(model, template)
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


def _restore_io_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """onnx-graphsurgeon keeps only tensor types: give graph inputs/outputs of the template that
    are sequences, optionals or maps (same name) their original type back."""
    types = {v.name: v.type for v in list(template.graph.input) + list(template.graph.output)
             if v.type.WhichOneof("value") not in (None, "tensor_type")}
    if not types:
        return
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in types:
            v.type.CopyFrom(types[v.name])


def _list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too."""
    g = model.graph
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in have:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
