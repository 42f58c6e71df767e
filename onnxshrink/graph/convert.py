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
    return model
