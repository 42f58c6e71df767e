"""Constant steps of the cleanup pass, each exact up to float32 round-off:

* ``Constant`` nodes become initializers (PaddlePaddle exports hold their weights in hundreds of
  them); one whose output is a graph output stays a node (an output cannot be an initializer and
  keep its producer).
* Constant folding: nodes whose inputs are all constant are evaluated once with onnxruntime
  (onnx-graphsurgeon's ``fold_constants``). Guarded: random ops, custom domains, sequences,
  optionals and stored int8 weight decoders are never folded, and a node whose output would exceed
  the size limit and its inputs' size (ConstantOfShape, Expand, Tile, broadcasting) is left to run
  time. Optionally the taken branch of an If with a constant condition is inlined.
* ``ConstantOfShape(s, value=v) (op) c`` with a one-element constant ``c``: a fill of ``v (op) c``.
* Chains ``(x (op) c1) (op) c2`` of two multiplicative (Mul, Div) or two additive (Add, Sub) ops by
  constants: one ``x * (c1*c2)`` or ``x + (c1+c2)`` (broadcasting is associative).
"""

from __future__ import annotations

__all__ = ["constant_operand", "constants_to_initializers", "fold_constant_chains", "fold_constant_of_shape",
           "fold_constants"]

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, is_constant
from onnxshrink.passes.cleanup.rewrite import (
    FLOAT_TYPES, NO_FOLD_OPS, FreshNames, all_graphs, count_nodes, detach, drop_detached, graph_input_ids,
    graph_output_ids, is_default_domain, producer, quiet_gs, single_use, static_shape)
from onnxshrink.passes.quantize.weight_storage import is_weight_decode

# may produce outputs much larger than their inputs; folded only with a known, bounded output size
EXPANDING_OPS = {
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "CenterCropPad", "Col2Im", "Where",
}
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


def fold_constants(graph: gs.Graph, size_limit: int, subgraphs: bool = True, flatten_if: bool = False,
                   names: FreshNames | None = None) -> tuple[int, int]:
    """Evaluate nodes whose inputs are all constant (see the module doc for the guard), graph by
    graph, then (``flatten_if``) inline If nodes with a constant condition and remove dead code.
    Returns (nodes removed, If nodes flattened)."""
    limit = int(size_limit)
    before = count_nodes(graph)

    def nbytes(t) -> int | None:
        if isinstance(t, gs.Constant):
            return int(t.values.nbytes)
        dt = _np_dtype(t)
        if not static_shape(t.shape) or dt is None:
            return None
        return int(np.prod(t.shape, dtype=np.int64)) * dt.itemsize

    def exclude(node: gs.Node) -> bool:
        if not is_default_domain(node) or node.op in NO_FOLD_OPS or is_weight_decode(node):
            return True  # (stored int8 weights: folding would undo the compression)
        if "Sequence" in node.op or "Optional" in node.op:
            return True
        ins = [nbytes(t) for t in node.inputs if not t.is_empty()]
        outs = [nbytes(t) for t in node.outputs if not t.is_empty()]
        if any(o is None for o in outs):
            return node.op in EXPANDING_OPS
        grow = sum(outs)
        return grow > limit and grow > sum(i or 0 for i in ins)

    flattened = 0
    with quiet_gs():
        graph.toposort(recurse_subgraphs=True)
        # graph by graph, outermost first, so that our guard applies to subgraphs too (gs's own
        # recursion drops should_exclude_node) and its If flattening (which rebinds outer-scope
        # producers) never runs
        for sub in (list(all_graphs(graph)) if subgraphs else [graph]):
            try:
                sub.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning=None,
                                   error_ok=False, flatten_subgraphs=False, size_threshold=None,
                                   should_exclude_node=exclude, recurse_functions=False)
            except Exception:
                # one node onnxruntime cannot evaluate: peel failing nodes off ("basic" partitioning
                # recurses forever on a failure in onnx-graphsurgeon 0.6)
                with contextlib.suppress(Exception):
                    sub.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning="recursive",
                                       error_ok=True, flatten_subgraphs=False, size_threshold=None,
                                       should_exclude_node=exclude, recurse_functions=False)
        if flatten_if:
            names = names if names is not None else FreshNames(graph)
            flattened = sum(_flatten_ifs(sub, names) for sub in list(all_graphs(graph)))
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    return max(0, before - count_nodes(graph)), flattened


def _np_dtype(t: gs.Tensor):
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.dtype))
        except Exception:
            return None


def _flatten_ifs(g: gs.Graph, names: FreshNames) -> int:
    """Inline the taken branch of an If whose condition is constant. A branch output that is not
    produced inside the branch (an outer-scope value, a branch constant or a branch input) is passed
    on through an Identity."""
    n = 0
    index = 0
    while index < len(g.nodes):
        node = g.nodes[index]
        cond = constant_value(node.inputs[0]) if node.op == "If" and node.inputs else None
        if cond is None or not is_default_domain(node) or cond.size != 1:
            index += 1
            continue
        branch = node.attrs["then_branch"] if bool(cond.reshape(-1)[0]) else node.attrs["else_branch"]
        if len(branch.outputs) != len(node.outputs):
            index += 1
            continue
        # names are unique across scopes (SSA over subgraphs), so branch tensors keep theirs
        new_nodes = list(branch.nodes)
        pairs = list(zip(list(node.outputs), list(branch.outputs)))  # clearing inputs edits node.outputs
        node.inputs.clear()
        node.outputs.clear()
        for node_out, sub_out in pairs:
            prod = sub_out.inputs[0] if len(sub_out.inputs) == 1 else None
            if prod is not None and prod in branch.nodes and not isinstance(sub_out, gs.Constant):
                node_out.inputs.clear()
                k = next(i for i, t in enumerate(prod.outputs) if t is sub_out)
                prod.outputs[k] = node_out
            else:
                node_out.inputs.clear()
                new_nodes.append(gs.Node("Identity", name=names.fresh("flattened_if_identity"),
                                         inputs=[sub_out], outputs=[node_out]))
        del g.nodes[index]
        g.nodes[index:index] = new_nodes
        index += len(new_nodes)
        n += 1
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
