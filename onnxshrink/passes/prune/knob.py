"""prune's knob for the cost-target allocation: a unit is a prunable channel group (key: its first
producing node) of at least two channel units; strength r is the fraction of its channel units
removed (lowest importance first, consumers refit), given to the pass as ``group_ratios``
``{producer: r}`` in importance mode.

Proxy (``proxy``, see ``passes/knob.py``): the ``floor(r U)`` units (at least one) of the group's U
whose input rows carry the least output energy in the consumers that read them, ``sum_p E[x_p^2]
|W_p|^2`` over the unit's positions p (the pass's activation importance, squared), zeroed in those
consumers' weights: the removal without the pass's least-squares refit (an upper bound of the
pass's error), as each consumer's local output error. Saving: the removed share of every member
tensor of the group (producers' filters and biases, per-channel parameters, consumers' rows) and of
those layers' MACs.
"""

from __future__ import annotations

__all__ = ["PruneKnob"]

import numpy as np
import onnx

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

    def proxy(self, model, unit, strength, layers, shared):
        if "prune.groups" not in shared:
            groups = analyze(model_to_graph(model), shared.get("shapes")).groups()
            shared["prune.groups"] = {g.producers[0]: g for g in groups if g.producers}
            shared["prune.inits"] = {t.name: t for t in model.graph.initializer}
        g = shared["prune.groups"].get(unit)
        if g is None:
            return None
        inits = shared["prune.inits"]
        score = np.zeros(g.units)
        for node, tname, axis, role, _tag, imap in g.members:
            L = layers.get(node)
            if role != "in" or L is None or tname != L.weight_name or L.weight.shape[axis] != len(imap):
                continue
            w = np.moveaxis(L.weight.astype(np.float64), axis, 0).reshape(len(imap), -1)
            energy = (w * w).sum(axis=1)
            if L.chan_ms is not None and len(L.chan_ms) == len(imap):
                energy = energy * L.chan_ms
            ok = imap >= 0
            np.add.at(score, imap[ok], energy[ok])
        n_remove = max(1, int(strength * g.units))
        if n_remove >= g.units:
            return None
        removed = np.argsort(score, kind="stable")[:n_remove]
        weights: dict = {}
        params = nbytes = macs = 0.0
        for node, tname, axis, role, _tag, imap in g.members:
            if tname not in inits:
                continue
            dims = list(inits[tname].dims)
            if axis >= len(dims) or dims[axis] != len(imap):
                continue
            mask = np.isin(imap, removed)
            frac = float(mask.sum()) / len(imap)
            size = int(np.prod(dims)) if dims else 1
            params += size * frac
            nbytes += size * frac * onnx.helper.tensor_dtype_to_np_dtype(inits[tname].data_type).itemsize
            L = layers.get(node)
            if L is None or tname != L.weight_name:
                continue
            macs += (L.macs or 0.0) * frac
            if role == "in":
                w = weights.get(tname, L.weight).copy()
                idx = [slice(None)] * w.ndim
                idx[axis] = mask
                w[tuple(idx)] = 0
                weights[tname] = w
        if not weights:
            return None
        noise = {node: layers[node].weight_noise(weights[tname]) for node, tname, *_ in g.members
                 if tname in weights and node in layers and layers[node].weight_name == tname}
        return {"weights": weights, "saving": {"params": params, "weight_bytes": nbytes, "macs": macs},
                "noise": noise}
