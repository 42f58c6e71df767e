"""Transposes of high rank written at lower rank: the exact rewrite for EPs with a rank limit.

A Transpose moves whole runs of axes: size-1 axes carry no data, and input axes ``i, i+1`` that
stay neighbours in the output (``i+1`` right after ``i``) move as one. With the input's static
shape ``S`` and ``perm``, drop the size-1 axes, merge each such run into one axis (its size the
product), and the same data movement is

    Transpose(x, perm) = Reshape(Transpose(Reshape(x, S'), perm'), [S[p] for p in perm])

where ``S'`` are the runs' sizes in input order and ``perm'`` their output order: a Reshape keeps
the row-major order of the elements, so only the Transpose moves anything, and it moves the same
blocks. A Reshape before it (whose output only it reads) takes ``S'`` directly, and a Reshape
after it (its only reader) reads the lower-rank Transpose directly, so the window partitions of
Swin and maxvit (Reshape to 6-D, Transpose, Reshape back) become the same three ops at rank 5 or
less.

Why: QNN HTP and CoreML take tensors up to rank 5 (maxvit_t's grid partition: 6-D Transposes the
HTP simulator failed on, "Failed to add node"); the rewrite is applied only where a Transpose's
rank exceeds the target's limit and the result fits in it.
"""

from __future__ import annotations

__all__ = ["reduce_transpose_rank"]

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.shapes import static_shape
from onnxshrink.graph.values import constant_value, is_default_domain


def reduce_transpose_rank(graph: gs.Graph, max_rank: int, fresh: Callable[[str], str],
                          skip: Callable[[gs.Node], bool] | None = None) -> int:
    """Every Transpose of ``graph`` whose input has a static shape of rank above ``max_rank`` and
    that fits in ``max_rank`` once its size-1 axes are dropped and its runs merged (module
    docstring) is rewritten so; ``skip(node)`` keeps a node as it is. Returns how many."""
    outputs = {id(t) for t in graph.outputs}
    done = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not is_default_domain(node) or len(node.inputs) != 1 or \
                len(node.outputs) != 1 or (skip is not None and skip(node)):
            continue
        x, y = node.inputs[0], node.outputs[0]
        shape = x.shape  # a constant's too (gs.Constant.shape)
        if not static_shape(shape) or len(shape) <= max_rank or 0 in shape:
            continue  # a 0 in a Reshape target copies a dimension: empty tensors are left alone
        shape = [int(d) for d in shape]
        perm = [int(p) for p in node.attrs.get("perm", list(range(len(shape)))[::-1])]
        plan = _runs(shape, perm)
        if plan is None or len(plan[0]) > max_rank:
            continue
        low_shape, low_perm = plan
        out_shape = [shape[p] for p in perm]
        dtype = x.dtype
        base = node.name or "transpose"
        # the input at low rank: its producing Reshape (read by this Transpose only) reshapes to it directly
        prev = x.inputs[0] if len(x.inputs) == 1 else None
        if prev is not None and prev.op == "Reshape" and is_default_domain(prev) and \
                len(x.outputs) == 1 and id(x) not in outputs and int(prev.attrs.get("allowzero", 0)) == 0:
            prev.inputs[1] = gs.Constant(fresh(f"{base}_in_shape"), np.array(low_shape, np.int64))
            x.shape = low_shape
            low_in = x
        else:
            low_in = gs.Variable(fresh(f"{base}_in_low"), dtype=dtype, shape=low_shape)
            graph.nodes.append(gs.Node("Reshape", fresh(f"{base}_to_low"), inputs=[
                x, gs.Constant(fresh(f"{base}_in_shape"), np.array(low_shape, np.int64))], outputs=[low_in]))
        node.inputs[0] = low_in
        node.attrs["perm"] = low_perm
        # the output: a Reshape reading it alone reads the low-rank Transpose; else one restores the shape
        nxt = y.outputs[0] if len(y.outputs) == 1 and id(y) not in outputs else None
        target = constant_value(nxt.inputs[1]) if nxt is not None and nxt.op == "Reshape" and \
            is_default_domain(nxt) and nxt.inputs[0] is y and len(nxt.inputs) > 1 else None
        if target is not None and int(nxt.attrs.get("allowzero", 0)) == 0:
            # a 0 copied the dimension at its index of the full-rank output: written out
            resolved = [out_shape[i] if int(d) == 0 else int(d) for i, d in enumerate(target.reshape(-1))]
            nxt.inputs[1] = gs.Constant(fresh(f"{base}_out_shape"), np.array(resolved, np.int64))
            y.shape = [low_shape[i] for i in low_perm]
            done += 1
            continue
        low_out = gs.Variable(fresh(f"{base}_out_low"), dtype=dtype)
        node.outputs[0] = low_out
        graph.nodes.append(gs.Node("Reshape", fresh(f"{base}_from_low"), inputs=[
            low_out, gs.Constant(fresh(f"{base}_out_shape"), np.array(out_shape, np.int64))], outputs=[y]))
        done += 1
    return done


def _runs(shape: list, perm: list) -> tuple[list, list] | None:
    """(sizes of the runs in input order, their order in the output) of ``perm`` on ``shape``, size-1
    axes dropped (module docstring); None when every axis has size 1."""
    kept = [i for i in range(len(shape)) if shape[i] != 1]
    if not kept:
        return None
    after = {a: b for a, b in zip(kept, kept[1:])}  # the next kept axis in input order
    runs: list[list[int]] = []
    for a in (p for p in perm if shape[p] != 1):
        if runs and after.get(runs[-1][-1]) == a:
            runs[-1].append(a)
        else:
            runs.append([a])
    by_input = sorted(runs, key=lambda r: r[0])
    return [math.prod(shape[a] for a in r) for r in by_input], [by_input.index(r) for r in runs]
