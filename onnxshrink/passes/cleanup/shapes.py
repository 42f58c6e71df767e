"""Shape folding: ``Shape``/``Size`` of a tensor whose shape is static (onnx shape inference) and
``Gather``/``Slice`` of a partly static shape that pick only static dims become constants.

Shapes come from onnx shape inference on an export of the graph, starting from the graph inputs
only (an exporter's stale value_info must not turn into folded shapes). They are also written onto
tensors that lack them, for the folding guard's size estimates, and reset at the end so the
model's value_info stays as it was.
"""

from __future__ import annotations

__all__ = ["InferredShapes", "fold_shapes"]

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value
from onnxshrink.model import copy_model_fields
from onnxshrink.passes.cleanup.rewrite import all_graphs, drop_detached, is_default_domain, static_shape


class InferredShapes:
    """Shapes by tensor name from the latest successful inference (``shapes``), and the tensors
    whose dtype/shape were filled in, so that ``restore`` can reset them."""

    def __init__(self):
        self.shapes: dict[str, list] = {}
        self._annotated: list[tuple[gs.Tensor, object, object]] = []
        self._annotated_ids: set[int] = set()

    def annotate(self, graph: gs.Graph, model: onnx.ModelProto, template: onnx.ModelProto | None,
                 protected: dict) -> None:
        """Infer shapes on ``model`` (an export of ``graph``) and write them onto ``graph``'s tensors
        that lack them (never onto ``protected`` ones). Shape folding reads ``self.shapes``, never
        the tensors' imported shapes. On failure the previous shapes stay."""
        try:
            if template is not None:
                copy_model_fields(template, model)
            del model.graph.value_info[:]
            for o in model.graph.output:
                if o.type.HasField("tensor_type"):
                    o.type.tensor_type.ClearField("shape")
            for t in model.graph.initializer:  # inference needs dims, and values of small ones only
                if int(np.prod(t.dims, dtype=np.int64)) > 4096 and t.data_type != onnx.TensorProto.INT64:
                    for f in ("raw_data", "float_data", "double_data", "int32_data", "external_data"):
                        t.ClearField(f)
                    t.data_location = onnx.TensorProto.DEFAULT
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
            return
        info = {}
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            shape = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            dtype = None
            if tt.elem_type:
                with contextlib.suppress(Exception):
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            info[vi.name] = (dtype, shape)
        self.shapes = {k: v[1] for k, v in info.items() if v[1] is not None}
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Variable) and name in info and name not in protected:
                dtype, shape = info[name]
                better_shape = shape is not None and (t.shape is None or (
                    not static_shape(t.shape) and static_shape(shape) and len(shape) == len(t.shape)))
                if better_shape or (t.dtype is None and dtype is not None):
                    if id(t) not in self._annotated_ids:
                        self._annotated_ids.add(id(t))
                        self._annotated.append((t, t.dtype, t.shape))
                    if better_shape:
                        t.shape = shape
                    if t.dtype is None and dtype is not None:
                        t.dtype = dtype

    def restore(self) -> None:
        """Tensors get back the dtype and shape they had before ``annotate``: the inferred shapes
        were only for folding decisions."""
        for t, dtype, shape in self._annotated:
            if isinstance(t, gs.Variable):
                t.dtype, t.shape = dtype, shape


def fold_shapes(graph: gs.Graph, shapes: dict[str, list]) -> int:
    """Shape/Size of statically shaped tensors (and Gather/Slice of partly static shapes that pick
    static dims only) become constants, in the graph and its subgraphs; returns how many."""
    n = 0
    for sub in all_graphs(graph):
        for node in list(sub.nodes):
            if not is_default_domain(node) or not node.inputs or not node.outputs:
                continue
            if node.op == "Shape":
                x = node.inputs[0]
                if not isinstance(x, gs.Variable) or shapes.get(x.name) is None:
                    continue
                dims = list(shapes[x.name])
                r = len(dims)
                start = node.attrs.get("start", 0)
                end = node.attrs.get("end", r)
                dims = dims[start:end] if end is not None else dims[start:]
                if static_shape(dims):
                    n += _output_to_constant(node, np.array(dims, dtype=np.int64))
                else:
                    n += _fold_partial_shape(node, dims)
            elif node.op == "Size":
                x = node.inputs[0]
                if isinstance(x, gs.Variable) and static_shape(shapes.get(x.name)):
                    n += _output_to_constant(node, np.array(int(np.prod(shapes[x.name], dtype=np.int64)),
                                                            dtype=np.int64))
        drop_detached(sub)
    return n


def _output_to_constant(node: gs.Node, value: np.ndarray) -> int:
    out = node.outputs[0]
    node.outputs.clear()
    out.to_constant(value)
    return 1


def _fold_partial_shape(shape_node: gs.Node, dims: list) -> int:
    """Gather/Slice consumers of a partly dynamic shape that pick only static dims."""
    out = shape_node.outputs[0]
    n = 0
    for c in list(out.outputs):
        if not is_default_domain(c) or not c.outputs or c.inputs[0] is not out:
            continue
        picked = None
        try:
            if c.op == "Gather" and len(c.inputs) > 1 and c.attrs.get("axis", 0) == 0:
                idx = constant_value(c.inputs[1])
                if idx is not None and np.issubdtype(idx.dtype, np.integer):
                    arr = np.array(dims, dtype=object)
                    picked = arr[idx]
                    picked = picked.tolist() if isinstance(picked, np.ndarray) else picked
            elif c.op == "Slice":
                given = [None if t.is_empty() else constant_value(t) for t in c.inputs[1:]]
                if len(c.inputs) >= 3 and all(v is not None for t, v in zip(c.inputs[1:], given)
                                              if not t.is_empty()):
                    starts, ends = given[0].tolist(), given[1].tolist()
                    axes = given[2].tolist() if len(given) > 2 and given[2] is not None else [0]
                    steps = given[3].tolist() if len(given) > 3 and given[3] is not None else [1]
                elif "starts" in c.attrs and "ends" in c.attrs:
                    starts, ends = list(c.attrs["starts"]), list(c.attrs["ends"])
                    axes, steps = list(c.attrs.get("axes", [0])), [1]
                else:
                    continue
                if len(starts) == 1 and axes in ([0], [-1]) and steps[0] != 0:
                    picked = dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
        except Exception:
            picked = None
        if picked is None:
            continue
        if isinstance(picked, list):
            if not static_shape(picked):
                continue
            val = np.array(picked, dtype=np.int64)
        else:
            if not isinstance(picked, (int, np.integer)) or picked < 0:
                continue
            val = np.array(int(picked), dtype=np.int64)
        n += _output_to_constant(c, val)
    return n
