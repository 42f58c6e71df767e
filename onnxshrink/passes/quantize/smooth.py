"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, exactly.

A transformer's LayerNorm output ``X [..., K]`` feeds the MatMuls of its block (Q/K/V, or fc1)
with constant weights ``W [K, N]``. A few of its K channels carry outliers tens of times larger
than the rest, and a per-tensor int8 grid for ``X`` spends its levels on them. For ``s > 0`` per
channel,

    X W = (X diag(1/s)) (diag(s) W),

so dividing channel ``j`` of ``X`` by ``s_j`` and multiplying row ``j`` of every consumer's ``W`` by
``s_j`` leaves each product unchanged. ``X / s`` costs nothing at run time: it is folded into the
producer's per-channel affine, which must map channel ``j`` alone:

- ``LayerNormalization(x, gamma, beta)`` (last axis): ``gamma / s``, ``beta / s``;
- the decomposed LayerNorm of PyTorch exports below opset 17, and any ``Add(Mul(y, g), b)`` with
  constant ``g``, ``b`` over the last axis: ``g / s``, ``b / s``.

Both are exact up to float round-off. The strength: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
with ``max|X_j|`` over the calibration samples and ``max|W_j|`` over row ``j`` of every consumer's
weight; ``alpha = 0.5`` (the paper's default) balances the two ranges. Channels with no signal keep
``s = 1``; ``s`` is bounded to ``[1e-4, 1e4]``. ``quantize.smooth=auto`` (the default) smooths, at
alpha 0.5, only the groups whose largest channel range is at least 8x the median channel's (the
outlier channels of trained transformers reach tens to hundreds; a ViT without them has 1.5-2):
elsewhere there is nothing to migrate and the model stays as it was.

A group is smoothed only when every consumer of ``X`` is such a MatMul (a residual reading the
LayerNorm output would see ``X / s``) or a Shape (PaddlePaddle's exports read the shape of the
LayerNorm output for their reshapes; ``X / s`` has the same), and the producer's constants feed no
other node.
"""

from __future__ import annotations

__all__ = ["smooth_groups", "smooth_activations", "outlier_ratio", "AUTO_ALPHA", "AUTO_MIN_RATIO"]

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value

S_BOUNDS = (1e-4, 1e4)
AUTO_ALPHA = 0.5  # quantize.smooth=auto: the paper's default strength ...
AUTO_MIN_RATIO = 8.0  # ... on the groups whose largest channel range is 8x their median or more


@dataclass
class SmoothGroup:
    """One smoothable activation: ``tensor`` (``[..., K]``), the ``producer`` constants that absorb
    ``1 / s`` (``(node, input index)`` pairs: LayerNormalization's scale and bias, or the Mul's and
    the Add's constant), and the MatMul ``consumers`` whose weight rows absorb ``s``."""

    tensor: gs.Variable
    producer: list  # [(node, input index)] of the constants that take 1 / s
    consumers: list  # MatMul nodes reading the tensor as input 0 with a constant [K, N] weight


def _last_axis_vector(c, k: int) -> bool:
    """A constant that varies only along the last axis, with ``k`` entries there (or a scalar)."""
    v = constant_value(c)
    return v is not None and v.dtype == np.float32 and (v.size == 1 or (v.shape[-1] == k and v.size == k))


def _sole(t) -> bool:
    return len(t.outputs) == 1


def smooth_groups(graph: gs.Graph) -> list[SmoothGroup]:
    """The activations SmoothQuant can migrate (module docstring), in graph order."""
    outputs = {id(t) for t in graph.outputs}
    groups = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Variable) or not t.outputs or id(t) in outputs or len(t.inputs) != 1:
            continue
        consumers = [n for n in t.outputs if n.op != "Shape"]  # a Shape reads no value: X / s has X's shape
        if not consumers or not all(n.op == "MatMul" and n.inputs[0] is t and isinstance(n.inputs[1], gs.Constant)
                                    and np.asarray(n.inputs[1].values).ndim == 2 for n in consumers):
            continue
        k = int(np.asarray(consumers[0].inputs[1].values).shape[0])
        if any(np.asarray(n.inputs[1].values).shape[0] != k for n in consumers):
            continue
        p = t.inputs[0]
        producer = None
        if p.op == "LayerNormalization" and int(p.attrs.get("axis", -1)) in (-1, len(t.shape or []) - 1) and \
                len(p.inputs) >= 2 and all(isinstance(c, gs.Constant) and _sole(c) and _last_axis_vector(c, k)
                                           for c in p.inputs[1:3]):
            producer = [(p, i) for i in range(1, len(p.inputs))]
        elif p.op == "Add" and len(p.inputs) == 2:
            ci = next((i for i, c in enumerate(p.inputs) if isinstance(c, gs.Constant)), None)
            if ci is not None and _sole(p.inputs[ci]) and _last_axis_vector(p.inputs[ci], k):
                z = p.inputs[1 - ci]
                m = z.inputs[0] if isinstance(z, gs.Variable) and len(z.inputs) == 1 and _sole(z) else None
                if m is not None and m.op == "Mul" and len(m.inputs) == 2:
                    gi = next((i for i, c in enumerate(m.inputs) if isinstance(c, gs.Constant)), None)
                    if gi is not None and _sole(m.inputs[gi]) and _last_axis_vector(m.inputs[gi], k):
                        producer = [(p, ci), (m, gi)]
        if producer is not None:
            groups.append(SmoothGroup(t, producer, consumers))
    return groups


def outlier_ratio(absmax) -> float:
    """How far the largest channel's range stands out: ``max_j |X_j|`` over the median of the
    channels' ``max |X_j|`` (0 when every channel is silent)."""
    a = np.asarray(absmax, np.float64)
    live = a[a > 0]
    return float(a.max() / np.median(live)) if live.size else 0.0


def smooth_activations(graph: gs.Graph, act_absmax: dict, alpha: float = 0.5, min_ratio: float = 0.0) -> dict:
    """Apply SmoothQuant to the groups of ``graph`` whose tensor has a per-channel ``act_absmax``
    (``{tensor name: max |X_j| over the samples, shape [K]}``) with an ``outlier_ratio`` of at least
    ``min_ratio``, in place. Returns stats: per group smoothed, the outlier ratio before and after;
    the groups left as they were."""
    done, left = [], []
    for g in smooth_groups(graph):
        a = act_absmax.get(g.tensor.name)
        if a is None:
            continue
        if outlier_ratio(a) < min_ratio:
            left.append({"tensor": g.tensor.name, "outlier_ratio": round(outlier_ratio(a), 2)})
            continue
        a = np.asarray(a, np.float64)
        w_absmax = np.max([np.max(np.abs(np.asarray(n.inputs[1].values, np.float64)), axis=1) for n in g.consumers],
                          axis=0)
        live = (a > 0) & (w_absmax > 0)
        s = np.ones_like(a)
        s[live] = a[live] ** alpha / w_absmax[live] ** (1 - alpha)
        s = np.clip(s, *S_BOUNDS)
        for node, i in g.producer:
            c = np.asarray(node.inputs[i].values, np.float64)
            # c is [K], [.., K] or a scalar: c / s broadcasts over the last axis in every case
            node.inputs[i] = gs.Constant(node.inputs[i].name + "_smoothed", (c / s).astype(np.float32))
        for n in g.consumers:
            w = np.asarray(n.inputs[1].values, np.float64)
            n.inputs[1] = gs.Constant(n.inputs[1].name + "_smoothed", (w * s[:, None]).astype(np.float32))
        done.append({"tensor": g.tensor.name, "channels": int(a.size), "consumers": [n.name for n in g.consumers],
                     "outlier_ratio": round(outlier_ratio(a), 2),
                     "outlier_ratio_after": round(outlier_ratio(a / s), 2)})
    return {"alpha": alpha, "groups": done, "left": left}
