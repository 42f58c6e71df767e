"""Keeping a graph's interface through cleanup: graph inputs and outputs keep the names, order,
types and shapes they were declared with; initializers that are also graph inputs of an IR >= 4
model (defaults a caller may override at run time) are hidden from folding; a graph output that
folding turned into a constant is produced by a node again."""

from __future__ import annotations

__all__ = ["outputs_from_constants", "protect_overridable", "record_io", "restore_io", "restore_protected"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.passes.cleanup.rewrite import FreshNames, all_graphs


def protect_overridable(graph: gs.Graph, template: onnx.ModelProto | None) -> dict[str, tuple[gs.Tensor, np.ndarray]]:
    """Initializers that are also graph inputs of an IR >= 4 model may be fed at run time: hide
    their values (make them Variables) while folding; ``restore_protected`` puts them back."""
    protected: dict[str, tuple[gs.Tensor, np.ndarray]] = {}
    if template is None or (template.ir_version or 0) < 4:
        return protected
    inits = {t.name for t in template.graph.initializer}
    names = {i.name for i in template.graph.input if i.name in inits}
    if not names:
        return protected
    for name, t in graph.tensors().items():
        if name in names and isinstance(t, gs.Constant):
            vals = t.values
            protected[name] = (t, vals)
            t.to_variable(dtype=vals.dtype, shape=list(vals.shape))
    return protected


def restore_protected(protected: dict[str, tuple[gs.Tensor, np.ndarray]]) -> None:
    """The overridable initializers hidden by ``protect_overridable`` become initializers again."""
    for t, vals in protected.values():
        t.to_constant(vals)


def record_io(graph: gs.Graph) -> list[tuple[gs.Tensor, object, object]]:
    """(tensor, dtype, shape) of every graph input and output, for ``restore_io``."""
    return [(t, t.dtype, t.shape) for t in list(graph.inputs) + list(graph.outputs)]


def restore_io(io_types: list[tuple[gs.Tensor, object, object]]) -> None:
    """Graph inputs and outputs keep the types and shapes they were declared with."""
    for t, dtype, shape in io_types:
        if isinstance(t, gs.Variable):
            t.dtype, t.shape = dtype, shape


def outputs_from_constants(graph: gs.Graph, names: FreshNames, opset: int, protected: dict) -> None:
    """A graph output that became a constant is produced by a node again, so the output keeps its
    name and stays an output rather than an initializer: a Constant node (opset >= 13, where
    Constant takes every tensor type), else an Identity of an initializer."""
    for sub in all_graphs(graph):
        for t in sub.outputs:
            if isinstance(t, gs.Constant) and t.name not in protected:
                vals = t.values
                t.to_variable(dtype=vals.dtype, shape=list(vals.shape))
                if opset >= 13:
                    node = gs.Node("Constant", name=names.fresh(t.name + "_const"),
                                   attrs={"value": gs.Constant(t.name + "_value", vals)}, outputs=[t])
                else:
                    init = gs.Constant(names.fresh(t.name + "_value"), vals)
                    node = gs.Node("Identity", name=names.fresh(t.name + "_identity"), inputs=[init], outputs=[t])
                sub.nodes.append(node)
