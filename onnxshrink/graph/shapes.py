"""Shape utilities: parse and apply static input shapes, run shape inference, read the inferred
dims of every tensor, tell a static shape, normalize negative axes."""

from __future__ import annotations

__all__ = ["parse_input_shape", "fix_input_shapes", "infer_shapes", "static_shapes_from_sample", "value_shapes",
           "value_types", "tensor_shapes", "static_shape", "normalize_axis"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError, UsageError
from onnxshrink.graph.convert import graph_to_skeleton


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``name:1,3,224,224`` -> ("name", [1, 3, 224, 224]). The name may itself contain ':'."""
    if ":" not in text:
        raise UsageError(f"--input-shape '{text}': expected NAME:D0,D1,... e.g. x:1,3,224,224")
    name, dims = text.rsplit(":", 1)
    try:
        shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise UsageError(f"--input-shape '{text}': dimensions must be whole numbers") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape '{text}': dimensions must be positive")
    return name, shape


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Set the given inputs' dimensions in place (checking rank and fixed dims), clear stale
    value_info so shape inference recomputes it, and return the model."""
    if not shapes:
        return model
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise UsageError(
                f"--input-shape names '{name}', but the model's inputs are "
                f"{[i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]}")
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise InputError(f"input '{name}' has rank {len(dims)}, but --input-shape gives {len(shape)} dims")
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != shape[i]:
                raise InputError(f"input '{name}' dim {i} is fixed at {d.dim_value}, --input-shape gives {shape[i]}")
        del dims[:]
        for v in shape:
            dims.add().dim_value = int(v)
    del model.graph.value_info[:]
    # outputs keep their element type; their dims are recomputed by shape inference (a negative
    # dim_value, PaddlePaddle's "unknown", is cleared too: the fixed inputs may make it known)
    for o in model.graph.output:
        tt = o.type.tensor_type
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if not d.HasField("dim_value") or d.dim_value < 0:
                    d.Clear()
    return model


def static_shapes_from_sample(sample: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sample.items()}


def infer_shapes(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    """Shape inference (with data propagation, so shape arithmetic resolves); returns the model
    unchanged when inference fails. onnx knows no shapes of onnxruntime's contrib ops: the outputs
    of those in ``CONTRIB_SHAPES`` (the ones onnxshrink emits) are added from their inputs' shapes and
    inference runs again, so the values after them are known too."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)
    except Exception:
        return model
    for _ in range(CONTRIB_ROUNDS):  # a contrib op behind another is reached on the next round
        if not _add_contrib_shapes(inferred):
            break
        try:
            inferred = onnx.shape_inference.infer_shapes(inferred, strict_mode=False, data_prop=data_prop)
        except Exception:
            break
    return inferred


def _lstm_outputs(node: onnx.NodeProto, shapes: dict) -> list | None:
    """The output shapes of onnxruntime's ``DynamicQuantizeLSTM`` (the LSTM's: Y ``[T, dirs, B, H]``,
    Y_h and Y_c ``[dirs, B, H]``; batch first with ``layout=1``) from its input X and its attributes."""
    x = shapes.get(node.input[0])
    if not x or len(x) != 3:
        return None
    attrs = {a.name: a for a in node.attribute}
    hidden = attrs["hidden_size"].i if "hidden_size" in attrs else None
    if not hidden:
        return None
    dirs = 2 if "direction" in attrs and attrs["direction"].s == b"bidirectional" else 1
    if "layout" in attrs and attrs["layout"].i == 1:
        t, b = x[1], x[0]
        return [[b, t, dirs, hidden], [b, dirs, hidden], [b, dirs, hidden]]
    t, b = x[0], x[1]
    return [[t, dirs, b, hidden], [dirs, b, hidden], [dirs, b, hidden]]


CONTRIB_SHAPES = {("com.microsoft", "DynamicQuantizeLSTM"): _lstm_outputs}
CONTRIB_ROUNDS = 8  # inference rounds after adding contrib outputs (one per contrib op in a chain)


def _add_contrib_shapes(model: onnx.ModelProto) -> int:
    """Add to ``model``'s value_info the output shapes of its contrib ops of ``CONTRIB_SHAPES`` that
    inference left without them (the element type of input 0); returns how many were added."""
    g = model.graph
    if not any((n.domain, n.op_type) in CONTRIB_SHAPES for n in g.node):
        return 0  # most models: no contrib op, nothing to read
    shapes = value_shapes(model)
    types = value_types(model)
    added = 0
    for node in g.node:
        rule = CONTRIB_SHAPES.get((node.domain, node.op_type))
        if rule is None or all(o in shapes or not o for o in node.output):
            continue
        outs = rule(node, shapes)
        if outs is None:
            continue
        for name, dims in zip(node.output, outs):
            if name and name not in shapes and types.get(node.input[0]):
                g.value_info.append(onnx.helper.make_tensor_value_info(
                    name, types[node.input[0]], [d if isinstance(d, int) else None for d in dims]))
                added += 1
    return added


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """name -> element type (``onnx.TensorProto`` enum; 0 where unknown) of the main graph's inputs,
    outputs and inferred values."""
    g = model.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}


def value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """name -> list of dims (int or None) for every value with inferred type, and initializers."""
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = list(a.t.dims)
    return out


def tensor_shapes(graph: gs.Graph, input_shapes: dict | None = None) -> dict:
    """name -> list of dims (int, or str for symbolic, None unknown) from ONNX shape inference on
    a weight-free export of ``graph`` (input dims fixed by ``input_shapes`` when given)."""
    model = graph_to_skeleton(graph.copy())
    # IR < 4 lists initializers as inputs; the export does not, and shape inference then ignores them
    model.ir_version = max(model.ir_version, 4)
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.INT64 and int(np.prod(t.dims)) > 64:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
    if input_shapes:
        for i in model.graph.input:
            if i.name in input_shapes:
                dims = i.type.tensor_type.shape.dim
                del dims[:]
                for v in input_shapes[i.name]:
                    dims.add().dim_value = int(v)
        del model.graph.value_info[:]
    model = infer_shapes(model)
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    for n in graph.nodes:
        for o in n.outputs:
            if o.name not in out and o.shape is not None:
                out[o.name] = [d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in o.shape]
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            out[t.name] = list(t.shape)
    return out


def static_shape(shape) -> bool:
    """Whether every dimension of ``shape`` is a known non-negative integer."""
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` counted from the front: a negative axis plus ``rank`` (no range check)."""
    return axis + rank if axis < 0 else axis
