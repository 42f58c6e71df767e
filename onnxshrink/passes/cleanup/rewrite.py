"""Rewriting primitives the cleanup steps share: walking a graph with its If/Loop/Scan subgraphs and
fresh names (both from ``graph.fresh``; with ``is_default_domain`` and ``static_shape`` from the graph
layer, re-exported here), the graph-boundary tensors (inputs and outputs of every
(sub)graph) a rewrite must keep, and rewiring consumers. Tensors are shared objects across scopes, so
a tensor's consumer list includes uses inside subgraphs and a rewrite in one scope is seen by all of
them."""

from __future__ import annotations

__all__ = ["DEFAULT_DOMAINS", "FLOAT_TYPES", "NO_FOLD_OPS", "FreshNames", "all_graphs", "count_nodes",
           "detach", "drop_detached", "graph_input_ids", "graph_output_ids", "is_default_domain", "producer",
           "quiet_gs", "replace_uses", "single_use", "static_shape"]

import contextlib

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from onnxshrink.graph.fresh import FreshNames, all_graphs
from onnxshrink.graph.shapes import static_shape
from onnxshrink.graph.values import DEFAULT_DOMAINS, is_default_domain

FLOAT_TYPES = (np.float16, np.float32, np.float64)
# never folded or merged: nondeterministic, sequence/optional producing, or stateful
NO_FOLD_OPS = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "Dropout", "Loop", "Scan", "If",
}


def count_nodes(graph: gs.Graph) -> int:
    """Nodes in the graph and all its subgraphs."""
    return sum(len(g.nodes) for g in all_graphs(graph))


def graph_output_ids(root: gs.Graph) -> set[int]:
    """ids of the outputs of the graph and of every subgraph."""
    return {id(t) for sub in all_graphs(root) for t in sub.outputs}


def graph_input_ids(root: gs.Graph) -> set[int]:
    """ids of the inputs of the graph and of every subgraph."""
    return {id(t) for sub in all_graphs(root) for t in sub.inputs}


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of ``old`` (in any graph, subgraphs included) reads ``new`` instead."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def detach(node: gs.Node) -> None:
    """Disconnect a node from its tensors; ``drop_detached`` then removes it from its graph."""
    node.inputs.clear()
    node.outputs.clear()


def drop_detached(sub: gs.Graph) -> None:
    """Remove the nodes that produce nothing any more (detached by a rewrite)."""
    sub.nodes = [nd for nd in sub.nodes if nd.outputs]


def single_use(x: gs.Tensor, consumer: gs.Node, outs: set[int], ins: set[int]) -> bool:
    """Whether ``x`` is an intermediate tensor read by ``consumer`` only (so a rewrite may drop it)."""
    return (isinstance(x, gs.Variable) and id(x) not in outs and id(x) not in ins
            and len(x.outputs) == 1 and x.outputs[0] is consumer)


def producer(x: gs.Tensor, sub: gs.Graph, ops) -> gs.Node | None:
    """The node of ``sub`` with an op in ``ops`` whose one (first) output is ``x``; else None."""
    if len(x.inputs) != 1:
        return None
    p = x.inputs[0]
    if p.op not in ops or not is_default_domain(p) or p not in sub.nodes or p.outputs[0] is not x:
        return None
    if len([o for o in p.outputs if not o.is_empty()]) != 1:
        return None
    return p


@contextlib.contextmanager
def quiet_gs():
    """Silence onnx-graphsurgeon's warnings (a failed fold or toposort is expected and handled)."""
    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR + 10
    try:
        yield
    finally:
        G_LOGGER.severity = old
