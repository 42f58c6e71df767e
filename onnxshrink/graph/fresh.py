"""Walking an onnx-graphsurgeon graph with its If/Loop/Scan subgraphs, and names for new tensors
and nodes that collide with none of it (the rewrites of cleanup, quantize's preparation and the
target emission share them)."""

from __future__ import annotations

__all__ = ["FreshNames", "all_graphs"]

import numpy as np
import onnx_graphsurgeon as gs


def all_graphs(graph: gs.Graph):
    """The graph and every nested subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from all_graphs(sub)


class FreshNames:
    """Names not yet used by any tensor or node of a graph (subgraphs included): new tensors never
    collide with existing ones, in any scope."""

    def __init__(self, graph: gs.Graph):
        self.used: set[str] = set()
        for sub in all_graphs(graph):
            self.used.update(sub.tensors().keys())
            self.used.update(n.name for n in sub.nodes if n.name)

    def fresh(self, base: str) -> str:
        """``base``, or ``base_<i>`` with the first free ``i``; reserved from now on."""
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new initializer with a fresh name."""
        return gs.Constant(self.fresh(base), np.ascontiguousarray(values))
