"""Half-precision (float16 / bfloat16) graphs: upcast them to float32 compute.

GPU-oriented exports and onnxshrink's own ``fp16`` pass store weights as float16 (or bfloat16), in
one of two forms: a float16 initializer read by a float16 op (float16 compute), or a float16
initializer widened by ``Cast(to=FLOAT)`` before a float32 op (float16 storage, float32 compute;
onnxruntime's converter writes it around the ops it keeps in float32).

cleanup folds the second form into float32 initializers (twice the bytes; prune, svd and share
then write float32 weights). prune, svd and share rewrite float16 weights of the first form in
numpy and keep their float16 storage. quantize needs float32 (its scales, its float fallbacks):

- ``upcast_low_float(graph)`` turns a graph's float16/bfloat16 compute into float32, in place:
  constants widened (exact), ``Cast(to=FLOAT16|BFLOAT16)`` made ``Cast(to=FLOAT)`` and removed where
  its input is already float, half-precision graph inputs / outputs kept with a Cast at the boundary
  (the interface does not change). The result computes what the input model computes without the
  float16 roundings of its activations (a relative change of at most about 2^-11 per op, the error
  the float16 model had against its own float32 original); the manager judges it against the
  original model's outputs like any lossy step.
"""

from __future__ import annotations

__all__ = ["LOW_FLOAT_TYPES", "is_low_float", "upcast_low_float"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

LOW_FLOAT_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_FLOATS = (onnx.TensorProto.FLOAT, *LOW_FLOAT_TYPES)
# attributes naming an element type: a half-precision one becomes float32
_DTYPE_ATTRS = {"EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                "RandomUniformLike": "dtype", "Bernoulli": "dtype", "Cast": "to"}


def is_low_float(dtype) -> bool:
    """Whether a numpy dtype (or ONNX element type) is float16 or bfloat16."""
    if isinstance(dtype, int):
        return dtype in LOW_FLOAT_TYPES
    try:
        return np.dtype(dtype) == np.float16 or np.dtype(dtype).name == "bfloat16"
    except TypeError:
        return False


def _is_float(dtype) -> bool:
    try:
        return np.dtype(dtype) == np.float32 or is_low_float(dtype)
    except TypeError:
        return False


def upcast_low_float(graph: gs.Graph) -> dict:
    """Float32 compute for a float16/bfloat16 graph, in place (module doc); returns counts
    ``{"constants", "casts_removed", "boundary_casts"}`` (all 0: nothing was half precision)."""
    stats = {"constants": 0, "casts_removed": 0, "boundary_casts": 0}
    was_float: set[str] = set()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if is_low_float(np.asarray(t.values).dtype):
                t.values = np.asarray(t.values, np.float32)
                stats["constants"] += 1
            if _is_float(np.asarray(t.values).dtype):
                was_float.add(t.name)
        elif t.dtype is not None and _is_float(t.dtype):
            was_float.add(t.name)
    for node in graph.nodes:
        for k, v in node.attrs.items():
            if isinstance(v, gs.Constant) and is_low_float(np.asarray(v.values).dtype):  # Constant, ConstantOfShape
                v.values = np.asarray(v.values, np.float32)
                stats["constants"] += 1
        key = _DTYPE_ATTRS.get(node.op)
        if key is not None and int(node.attrs.get(key, 0)) in LOW_FLOAT_TYPES:
            node.attrs[key] = onnx.TensorProto.FLOAT
        if node.op == "Cast" and int(node.attrs.get("to", 0)) in _FLOATS:
            for o in node.outputs:
                was_float.add(o.name)
    io_names = {t.name for t in list(graph.inputs) + list(graph.outputs)}
    for t in list(graph.inputs):
        if t.dtype is not None and is_low_float(t.dtype) and t.outputs:
            wide = gs.Variable(f"{t.name}_float32", dtype=np.float32, shape=t.shape)
            for consumer in list(t.outputs):
                _replace(consumer.inputs, t, wide)
            graph.nodes.insert(0, gs.Node("Cast", f"{t.name}_to_float32", {"to": onnx.TensorProto.FLOAT}, [t], [wide]))
            stats["boundary_casts"] += 1
    for t in list(graph.outputs):
        if t.dtype is not None and is_low_float(t.dtype) and t.inputs:
            low = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            wide = gs.Variable(f"{t.name}_float32", dtype=np.float32, shape=t.shape)
            producer = t.inputs[0]
            _replace(producer.outputs, t, wide)
            for consumer in list(t.outputs):
                _replace(consumer.inputs, t, wide)
            graph.nodes.append(gs.Node("Cast", f"{t.name}_from_float32", {"to": low}, [wide], [t]))
            stats["boundary_casts"] += 1
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io_names and t.dtype is not None and is_low_float(t.dtype):
            t.dtype = np.float32
    for node in list(graph.nodes):
        # a Cast to float of a float tensor is now the identity: its consumers read its input
        if node.op != "Cast" or int(node.attrs.get("to", 0)) != onnx.TensorProto.FLOAT \
                or node.inputs[0].name not in was_float or any(o in graph.outputs for o in node.outputs):
            continue
        src = node.inputs[0]
        if src in graph.inputs and is_low_float(src.dtype):  # a boundary Cast
            continue
        for o in node.outputs:
            for consumer in list(o.outputs):
                _replace(consumer.inputs, o, src)
        node.outputs.clear()
        node.inputs.clear()
        stats["casts_removed"] += 1
    if stats["casts_removed"]:
        graph.cleanup()
    graph.toposort()
    return stats


def _replace(tensors, old, new) -> None:
    """Replace ``old`` by ``new`` in a node's input or output list (onnx-graphsurgeon's synchronized
    lists take item assignment, not slices)."""
    for j, x in enumerate(tensors):
        if x is old:
            tensors[j] = new
