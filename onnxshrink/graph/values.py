"""Reading constant values and attributes off onnx-graphsurgeon nodes and tensors (a Pad's operands
among them), whether a node is a standard ONNX op, and a tensor's sole consumer."""

from __future__ import annotations

__all__ = ["constant_value", "node_attr", "is_constant", "is_weight_decode", "clip_range", "sole_consumer",
           "pad_operands", "is_default_domain", "DEFAULT_DOMAINS", "NARROW_INTS"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")
# integer types weights are stored in (int8/uint8 quantized weights, weight sharing's 2-8 bit codes)
NARROW_INTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
               onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def constant_value(t, numeric_attrs: bool = False) -> np.ndarray | None:
    """The value of an initializer, or of a tensor produced by a Constant node; None otherwise.

    A Constant node's ``value`` tensor is always read; with ``numeric_attrs`` also its
    ``value_float``, ``value_int``, ``value_floats`` and ``value_ints`` forms (as numpy's default
    dtypes of the Python values), which the channel analysis and the prune and sparsify passes
    read as constants (shape specs, slice bounds)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        v = attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if numeric_attrs:
            for k in ("value_float", "value_int", "value_floats", "value_ints"):
                if k in attrs:
                    return np.asarray(attrs[k])
    return None


def sole_consumer(t, graph_outputs=()) -> "gs.Node | None":
    """The one node reading ``t``; None when no node or several do, or when ``t`` is a graph output
    (``graph_outputs``: the ids of the graph's output tensors, when a caller needs that checked)."""
    if len(t.outputs) != 1 or id(t) in graph_outputs:
        return None
    return t.outputs[0]


def node_attr(node: gs.Node, name: str, default):
    """An attribute's value, ``default`` when absent or None."""
    v = node.attrs.get(name, default)
    return default if v is None else v



def clip_range(node: gs.Node) -> tuple[float, float] | None:
    """``(min, max)`` of a Clip node: attributes before opset 11, optional inputs from 11 (a bound
    left out is -inf or +inf); None when a bound is given by a tensor that is not constant."""
    lo, hi = float(node_attr(node, "min", -np.inf)), float(node_attr(node, "max", np.inf))
    bounds = [lo, hi]
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name:
            v = constant_value(node.inputs[i])
            if v is None or v.size != 1:
                return None
            bounds[i - 1] = float(v.reshape(-1)[0])
    return bounds[0], bounds[1]


def is_default_domain(node: gs.Node) -> bool:
    """Whether the node is a standard ONNX op (custom-domain ops are left alone)."""
    return (node.domain or "") in DEFAULT_DOMAINS


def pad_operands(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """A Pad's ``(amounts, fill value, whether it has an axes input)``: attributes before opset 11,
    inputs from 11 (axes from 18); the amounts or the value None where computed at run time, the value
    0 where not given."""
    if "pads" in node.attrs:
        return np.asarray(node.attrs["pads"], np.int64), np.asarray(node.attrs.get("value", 0.0)), False

    def given(k: int) -> bool:
        return len(node.inputs) > k and not node.inputs[k].is_empty()
    pads = constant_value(node.inputs[1]) if given(1) else None
    value = constant_value(node.inputs[2]) if given(2) else np.zeros(())
    return pads, value, given(3)


def is_constant(t) -> bool:
    """Whether ``constant_value(t)`` reads a value (an initializer, or the tensor a Constant node
    produces), without loading it."""
    if isinstance(t, gs.Constant):
        return True
    return (isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant"
            and isinstance(t.inputs[0].attrs.get("value"), gs.Constant))


def is_weight_decode(node: gs.Node) -> bool:
    """A Cast of a narrow integer constant to a float type: stored weights (quantize's int8 weight
    storage, or weight sharing's codes) that constant folding must leave alone (folding would undo the
    compression; onnxruntime folds it in memory at load)."""
    if node.op != "Cast" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return False
    to = int(node.attrs.get("to", 0))
    src = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(node.inputs[0].values).dtype)
    return src in NARROW_INTS and to in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                         onnx.TensorProto.BFLOAT16)
