"""Constant folding: nodes whose inputs are all constant are evaluated once with onnxruntime
(onnx-graphsurgeon's ``fold_constants``), exact. Guarded: random ops, custom domains, sequences,
optionals and stored int8 weight decoders are never folded, and a node whose output would exceed
the size limit and its inputs' size (ConstantOfShape, Expand, Tile, broadcasting) is left to run
time. Optionally the taken branch of an If with a constant condition is inlined."""

from __future__ import annotations

__all__ = ["EXPANDING_OPS", "fold_constants"]

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, is_weight_decode
from onnxshrink.passes.cleanup.rewrite import (
    NO_FOLD_OPS,
    FreshNames,
    all_graphs,
    count_nodes,
    is_default_domain,
    quiet_gs,
    static_shape,
)

# may produce outputs much larger than their inputs; folded only with a known, bounded output size
EXPANDING_OPS = {
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "CenterCropPad", "Col2Im", "Where",
}


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
