"""Removing what computes nothing: ``Identity``, inference ``Dropout`` (no training mode, mask
unused) and a ``Pad`` of zero amounts are bypassed (when one produces a graph output, its producer
writes that output instead, so the output keeps its name), and nodes and initializers no output
depends on are removed."""

from __future__ import annotations

__all__ = ["dropout_is_identity", "pad_is_identity", "remove_dead", "remove_identities"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value, pad_operands
from onnxshrink.passes.cleanup.rewrite import (
    detach,
    drop_detached,
    graph_input_ids,
    graph_output_ids,
    is_default_domain,
    quiet_gs,
    replace_uses,
)


def remove_dead(graph: gs.Graph) -> None:
    """Remove dead nodes and unused initializers (graph inputs stay), subgraphs included."""
    with quiet_gs():
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)


def remove_identities(sub: gs.Graph, root: gs.Graph, opset: int) -> tuple[int, int]:
    """Bypass Identity and inference Dropout nodes of ``sub``; returns (identities, dropouts) removed."""
    identities = dropouts = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for node in list(sub.nodes):
        if not node.outputs or not is_default_domain(node):
            continue
        if node.op == "Identity":
            is_dropout = False
        elif node.op == "Dropout" and dropout_is_identity(node, outs, opset):
            is_dropout = True
        elif node.op == "Pad" and pad_is_identity(node):
            is_dropout = False
        else:
            continue
        if not node.inputs or node.inputs[0].is_empty():
            continue
        x, y = node.inputs[0], node.outputs[0]
        if not isinstance(x, (gs.Variable, gs.Constant)) or not isinstance(y, gs.Variable):
            continue
        if id(y) not in outs:
            replace_uses(y, x)
            detach(node)
        else:
            # y names a graph output: let x's producer write y directly, when x is local
            prod = x.inputs[0] if len(x.inputs) == 1 else None
            if (prod is None or prod not in sub.nodes or id(x) in outs or id(x) in ins
                    or isinstance(x, gs.Constant) or any(c not in sub.nodes for c in x.outputs)):
                continue
            if y.dtype is None:
                y.dtype = x.dtype
            others = [c for c in x.outputs if c is not node]
            detach(node)
            for c in others:
                for i, t in enumerate(c.inputs):
                    if t is x:
                        c.inputs[i] = y
            k = next(i for i, t in enumerate(prod.outputs) if t is x)
            prod.outputs[k] = y
        if is_dropout:
            dropouts += 1
        else:
            identities += 1
    drop_detached(sub)
    return identities, dropouts


def pad_is_identity(node: gs.Node) -> bool:
    """Whether a Pad pads nothing: constant pads, every one 0 (torchvision's Swin pads its patch merging
    by ``H % 2``, zero at even sizes once shapes fold), whatever its mode and value."""
    pads = pad_operands(node)[0]
    return pads is not None and pads.size > 0 and not np.any(pads)


def dropout_is_identity(node: gs.Node, outs: set[int], opset: int) -> bool:
    """Whether a Dropout passes its input through: inference mode (``is_test`` before opset 7, no
    true ``training_mode`` after) and its mask output unused."""
    if opset and opset < 7 and node.attrs.get("is_test", 0) != 1:
        return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        training_mode = constant_value(node.inputs[2])
        if training_mode is None or bool(np.any(training_mode)):
            return False
    for m in node.outputs[1:]:
        if not m.is_empty() and (m.outputs or id(m) in outs):
            return False
    return True
