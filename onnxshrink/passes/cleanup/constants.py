"""Constant steps of the cleanup pass, each exact up to float32 round-off (evaluating constant
subgraphs is in ``folding``):

* ``Constant`` nodes become initializers (PaddlePaddle exports hold their weights in hundreds of
  them); one whose output is a graph output stays a node (an output cannot be an initializer and
  keep its producer).
* ``ConstantOfShape(s, value=v) (op) c`` with a one-element constant ``c``: a fill of ``v (op) c``.
* Chains ``(x (op) c1) (op) c2`` of two multiplicative (Mul, Div) or two additive (Add, Sub) ops by
  constants: one ``x * (c1*c2)`` or ``x + (c1+c2)`` (broadcasting is associative).
"""

from __future__ import annotations

__all__ = ["constant_operand", "constants_to_initializers", "fold_constant_chains", "fold_constant_of_shape"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, is_constant
from onnxshrink.passes.cleanup.rewrite import (
    FLOAT_TYPES,
    FreshNames,
    all_graphs,
    detach,
    drop_detached,
    graph_input_ids,
    graph_output_ids,
    is_default_domain,
    producer,
    single_use,
)

ARITHMETIC = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}


def constants_to_initializers(graph: gs.Graph) -> int:
    """Every standard ``Constant`` node holding a tensor (``value``, ``value_float(s)``,
    ``value_int(s)``) whose output is no graph output becomes an initializer of the same name, in
    the graph and its subgraphs; returns how many. Sparse and string constants stay nodes."""
    outs = graph_output_ids(graph)
    n = 0
    for sub in all_graphs(graph):
        for node in list(sub.nodes):
            if node.op != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if id(out) in outs or len(node.attrs) != 1:
                continue
            (attr, val), = node.attrs.items()
            if attr == "value" and isinstance(val, gs.Constant):
                arr = val.values
            elif attr in ("value_float", "value_int"):
                arr = np.array(val, dtype=np.float32 if attr == "value_float" else np.int64)
            elif attr in ("value_floats", "value_ints"):
                arr = np.array(list(val), dtype=np.float32 if attr == "value_floats" else np.int64)
            else:  # sparse_value, strings, attribute references: leave the node
                continue
            if arr.dtype == object:
                continue
            node.outputs.clear()
            out.to_constant(arr)
            n += 1
        sub.nodes = [nd for nd in sub.nodes if nd.outputs or nd.op != "Constant"]
    return n


def fold_constant_of_shape(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """``ConstantOfShape(s, value=v) (op) c`` with a one-element float constant ``c`` whose rank
    does not exceed the fill's: a fill of ``v (op) c`` (computed in the tensor's dtype, as at run
    time). Dynamic shapes keep this (YOLOv8's stride tensors). Returns how many were folded."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for e in list(sub.nodes):
        if e.op not in ARITHMETIC or not is_default_domain(e) or not e.outputs:
            continue
        if len(e.inputs) != 2:
            continue
        for k in (0, 1):
            a, c = e.inputs[k], e.inputs[1 - k]
            if is_constant(c) and not is_constant(a):
                break
        else:
            continue
        p = producer(a, sub, ("ConstantOfShape",))
        if p is None or not single_use(a, e, outs, ins) or not p.inputs:
            continue
        cv = constant_value(c)
        val = p.attrs.get("value")
        v = np.asarray(val.values) if isinstance(val, gs.Constant) else np.zeros(1, np.float32)
        if cv.size != 1 or v.size != 1 or cv.dtype != v.dtype or v.dtype not in FLOAT_TYPES:
            continue
        shp = p.inputs[0]
        shp_value = constant_value(shp)
        rank = shp_value.shape[0] if shp_value is not None and shp_value.ndim == 1 else (
            shp.shape[0] if shp.shape is not None and len(shp.shape) == 1 and isinstance(shp.shape[0], int)
            else None)
        if rank is None or cv.ndim > rank:
            continue
        x, y = (v.reshape(()), cv.reshape(())) if k == 0 else (cv.reshape(()), v.reshape(()))
        with np.errstate(all="ignore"):
            r = ARITHMETIC[e.op](x, y)
        p.attrs["value"] = gs.Constant(names.fresh(p.name or "fill") if p.name else names.fresh("fill"),
                                       np.asarray(r, dtype=v.dtype).reshape(1))
        out = e.outputs[0]
        detach(e)
        p.outputs[0] = out
        n += 1
    drop_detached(sub)
    return n


def constant_operand(e: gs.Node):
    """``(x, c, dtype, family)`` of x*c, c*x, x/c, x+c, c+x, x-c by a float constant ``c``, with ``c``
    in float64 as a multiplier (family 'Mul': Div inverted) or an addend (family 'Add': Sub
    negated); None for anything else (or a Div by zero or non-finite values)."""
    if e.op not in ARITHMETIC or not is_default_domain(e) or len(e.inputs) != 2:
        return None
    a, b = e.inputs
    if is_constant(b) and not is_constant(a):
        x, c = a, constant_value(b)
    elif is_constant(a) and not is_constant(b) and e.op in ("Mul", "Add"):
        x, c = b, constant_value(a)
    else:
        return None
    if c.dtype not in FLOAT_TYPES:
        return None
    c64 = c.astype(np.float64)
    if e.op == "Div":
        if np.any(c64 == 0) or not np.all(np.isfinite(c64)):
            return None
        c64 = 1.0 / c64
    elif e.op == "Sub":
        c64 = -c64
    return x, c64, c.dtype, ("Mul" if e.op in ("Mul", "Div") else "Add")


def fold_constant_chains(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """``(x (op) c1) (op) c2`` with both ops multiplicative (Mul, Div by a constant) or both additive
    (Add, Sub of a constant): one ``x * (c1*c2)`` or ``x + (c1+c2)``. Broadcasting is associative,
    so the output shape is unchanged; the merged constant may not be larger than the larger of the
    two. One rounding instead of two: equal to float round-off. Returns how many were merged."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for e1 in list(sub.nodes):
        if not e1.outputs:
            continue
        first = constant_operand(e1)
        if first is None:
            continue
        x, c1, dt1, fam = first
        t = e1.outputs[0]
        if not (isinstance(t, gs.Variable) and id(t) not in outs and id(t) not in ins and len(t.outputs) == 1):
            continue
        e2 = t.outputs[0]
        if e2 not in sub.nodes or not e2.outputs:
            continue
        second = constant_operand(e2)
        if second is None or second[0] is not t or second[3] != fam or second[2] != dt1:
            continue
        c2 = second[1]
        try:
            merged = c1 * c2 if fam == "Mul" else c1 + c2
        except ValueError:
            continue
        if merged.size > max(c1.size, c2.size) or not np.all(np.isfinite(merged)):
            continue
        y = e2.outputs[0]
        detach(e2)
        e1.op = fam
        e1.inputs.clear()
        e1.inputs.extend([x, names.constant((e1.name or "const") + "_merged", merged.astype(dt1))])
        e1.outputs[0] = y
        n += 1
    drop_detached(sub)
    return n
