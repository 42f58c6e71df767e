"""Merging duplicates, exact: a deterministic node with the same op, domain, attributes and input
tensors as an earlier one computes the same values (common subexpressions), and initializers with
the same dtype, shape and bytes hold the same values; their consumers read the first copy."""

from __future__ import annotations

__all__ = ["merge_duplicate_nodes", "merge_initializers"]

import contextlib
import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.convert import values_bytes
from onnxshrink.passes.cleanup.rewrite import (
    NO_FOLD_OPS,
    detach,
    drop_detached,
    graph_output_ids,
    quiet_gs,
    replace_uses,
)


def merge_duplicate_nodes(sub: gs.Graph, root: gs.Graph) -> int:
    """Consumers of a node equal to an earlier one read the earlier node's outputs; nodes with
    subgraphs and graph-output producers are kept. Returns how many nodes were merged away."""
    n = 0
    outs = graph_output_ids(root)
    seen: dict[tuple, gs.Node] = {}
    with quiet_gs(), contextlib.suppress(Exception):
        sub.toposort(recurse_subgraphs=False)
    for node in list(sub.nodes):
        if not node.outputs or node.op in NO_FOLD_OPS or node.op == "Constant":
            continue
        key = _node_key(node)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(id(o) in outs for o in node.outputs) or len(first.outputs) != len(node.outputs):
            continue
        for mine, theirs in zip(list(node.outputs), list(first.outputs)):
            if not mine.is_empty():
                if theirs.is_empty():
                    break
                replace_uses(mine, theirs)
        else:
            detach(node)
            n += 1
    drop_detached(sub)
    return n


def _node_key(node: gs.Node):
    """What makes two nodes compute the same: op, domain, input tensors (by identity), attributes
    (tensor attributes by bytes), output count; None for nodes with subgraphs or object tensors."""
    attrs = []
    for k in sorted(node.attrs):
        v = node.attrs[k]
        if isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(x, gs.Graph) for x in v)):
            return None
        if isinstance(v, gs.Constant):
            vals = np.asarray(v.values)
            if vals.dtype == object:
                return None
            v = ("tensor", vals.dtype.str, vals.shape, vals.tobytes())
        elif isinstance(v, list):
            v = tuple(v)
        elif not isinstance(v, (int, float, str, bytes, bool, tuple, type(None))):
            v = repr(v)
        attrs.append((k, v))
    ins = tuple(("", None) if t.is_empty() else id(t) for t in node.inputs)
    return node.op, node.domain or "", ins, tuple(attrs), len(node.outputs)


def merge_initializers(graph: gs.Graph, digests: dict | None = None) -> int:
    """Consumers of an initializer identical (dtype, shape, bytes) to an earlier one read the
    earlier one (the copy is then dead); graph outputs are kept. Returns how many were merged.

    Only constants sharing a dtype and shape with another are hashed, and a constant not yet loaded
    is hashed from its tensor's bytes without being loaded (a 1 GiB embedding table is neither kept
    as a numpy copy nor copied a second time to hash it). ``digests``, shared by the calls of one
    cleanup, keeps the digests of constants still not loaded (their bytes cannot have changed
    between the calls): a 2 GiB embedding model's two tables were hashed twice, 2.6 s each time."""
    outs = graph_output_ids(graph)
    groups: dict[tuple, list[gs.Constant]] = {}
    for t in list(graph.tensors().values()):
        if not isinstance(t, gs.Constant) or id(t) in outs:
            continue
        try:
            dtype, shape = np.dtype(t.dtype), tuple(t.shape)
        except Exception:
            continue
        if dtype.kind == "O":
            continue
        groups.setdefault((dtype.str, shape), []).append(t)
    n = 0
    for (dtype, shape), consts in groups.items():
        if len(consts) < 2:
            continue
        seen: dict[str, gs.Constant] = {}
        for t in consts:
            digest = _bytes_digest(t, digests)
            if digest is None:
                continue
            first = seen.get(digest)
            if first is None:
                seen[digest] = t
                continue
            replace_uses(t, first)
            n += 1
    return n


def _bytes_digest(t: gs.Constant, digests: dict | None = None) -> str | None:
    """sha1 of the constant's little-endian bytes (``graph.convert.values_bytes``: a constant not yet
    loaded is read from its tensor, not loaded); None when they cannot be read. A constant not yet
    loaded has its digest kept in ``digests`` (by its lazy values, which loading replaces)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    lazy = t._values if isinstance(t._values, LazyValues) else None
    if lazy is not None and digests is not None and id(lazy) in digests:
        return digests[id(lazy)][1]
    try:
        v = lazy if lazy is not None else np.asarray(t.values)
        if isinstance(v, np.ndarray) and v.dtype.kind == "O":
            return None
        digest = hashlib.sha1(values_bytes(v)).hexdigest()
    except Exception:
        return None
    if lazy is not None and digests is not None:
        digests[id(lazy)] = (lazy, digest)  # the values held: their id is not reused while kept
    return digest
