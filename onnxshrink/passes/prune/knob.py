"""prune's knob for the cost-target allocation: a unit is a prunable channel group (key: its first
producing node) of at least two channel units; strength r is the fraction of its channel units
removed (lowest importance first, consumers refit), given to the pass as ``group_ratios``
``{producer: r}`` in importance mode.
"""

from __future__ import annotations

__all__ = ["PruneKnob"]

from onnxshrink.graph.channels import analyze
from onnxshrink.graph.convert import model_to_graph
from onnxshrink.passes.knob import Knob


class PruneKnob(Knob):
    """Per-group pruning ratios (see the module docstring)."""

    pass_name = "prune"
    strengths = (0.25, 0.5)
    probe = {"samples": 4, "latency": False}

    def units(self, model, shapes):
        a = analyze(model_to_graph(model), shapes)
        return [(g.producers[0], int(g.units)) for g in a.groups() if g.prunable and g.units >= 2 and g.producers]

    def options(self, model, choices):
        return {"mode": "importance", "group_ratios": {u: float(r) for u, r in sorted(choices.items())},
                "latency": False}
