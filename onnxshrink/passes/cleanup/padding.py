"""Zero padding written as its own node, folded into the convolution or average pool reading it (a
step of the cleanup pass).

Keras writes the asymmetric "same" padding of a strided convolution as a ``ZeroPadding2D`` layer,
which tf2onnx exports as ``Pad`` (mode constant, value 0) in front of an unpadded ``Conv``; other
exporters do the same for explicit pads. With ``p`` the Pad's pads on the spatial axes (begin and
end, each >= 0; none on the batch and channel axes)

    Conv(Pad(x, p, 0); pads = q)                             = Conv(x; pads = q + p)
    AveragePool(Pad(x, p, 0); pads = q, count_include_pad=1) = AveragePool(x; pads = q + p, count_include_pad=1)

exactly: a Conv pads with zeros and multiplies the same products either way, and an average that
counts its padding divides the same sum by the same window size. MaxPool ignores its padding (as
-inf): folding is exact only where the padded values are >= 0 (the Pad's input comes from Relu, a
Clip with a lower bound >= 0, or Sigmoid: a zero never exceeds the window's largest value) and every
window keeps a real value (the folded pads smaller than the kernel), as in Keras ResNet's
``pool1_pad`` before its max pool; other MaxPools, and an AveragePool that does not count its
padding, keep their Pad.

Why: the Pad sits between the Conv and the op before it. onnxruntime's CPU EP fuses it at load,
but the quantizer would put a Q/DQ pair around it, the EP checks see a Pad that CoreML's and
XNNPACK's lists lack (Keras MobileNetV2's four Pads: the CoreML check's one objection, exit 4),
and the channel analysis follows one more op. Needs the pads (and a constant value, if given) as
constants; Pad with an ``axes`` input (opset 18) is left alone.
"""

from __future__ import annotations

__all__ = ["fold_pad"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import clip_range, pad_operands
from onnxshrink.passes.cleanup.rewrite import (
    detach,
    drop_detached,
    graph_input_ids,
    graph_output_ids,
    is_default_domain,
    single_use,
)


def fold_pad(sub: gs.Graph, root: gs.Graph) -> int:
    """Every constant zero ``Pad`` of ``sub`` read only by a ``Conv`` or a padding-counting
    ``AveragePool`` (explicit pads) is folded into that node's ``pads`` (module docstring). Returns
    how many."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for pad in [p for p in sub.nodes if p.op == "Pad" and is_default_domain(p)]:
        if not pad.outputs or len(pad.outputs) != 1:
            continue
        y = pad.outputs[0]
        if len(y.outputs) != 1:
            continue
        user = y.outputs[0]
        if not single_use(y, user, outs, ins) or user not in sub.nodes or not _takes_padding(user, y, pad):
            continue
        spatial = _zero_spatial_pads(pad)
        if spatial is None:
            continue
        begin, end = spatial
        rank = len(begin)
        q = [int(v) for v in user.attrs.get("pads", [0] * (2 * rank))]
        if len(q) != 2 * rank:
            continue
        folded = [q[i] + begin[i] for i in range(rank)] + [q[rank + i] + end[i] for i in range(rank)]
        if user.op == "MaxPool" and any(folded[i] >= k or folded[rank + i] >= k
                                        for i, k in enumerate(user.attrs.get("kernel_shape", []))):
            continue  # a window all padding: the Pad's zero, and no value at all without it
        user.attrs["pads"] = folded
        user.inputs[0] = pad.inputs[0]
        detach(pad)
        n += 1
    drop_detached(sub)
    return n


def _takes_padding(node: gs.Node, x: gs.Tensor, pad: gs.Node) -> bool:
    """Whether ``node`` reads ``x`` as its data input and padding it with zeros gives what ``pad``
    gives: a Conv, an AveragePool with ``count_include_pad``, or a MaxPool (no indices output) of
    values >= 0 (``_nonnegative``), with explicit pads (no ``auto_pad``)."""
    if not is_default_domain(node) or not node.inputs or node.inputs[0] is not x or \
            str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", ""):
        return False
    if node.op == "Conv":
        return True
    if node.op == "MaxPool":
        return len([o for o in node.outputs if not o.is_empty()]) == 1 and _nonnegative(pad.inputs[0])
    return node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)) == 1 and len(node.outputs) == 1


def _nonnegative(t: gs.Tensor) -> bool:
    """Whether every value of ``t`` is >= 0 by its producer: Relu, Sigmoid, or Clip with min >= 0."""
    if len(t.inputs) != 1:
        return False
    p = t.inputs[0]
    if not is_default_domain(p) or p.outputs[0] is not t:
        return False
    if p.op in ("Relu", "Sigmoid"):
        return True
    bounds = clip_range(p) if p.op == "Clip" else None
    return bounds is not None and bounds[0] >= 0


def _zero_spatial_pads(pad: gs.Node) -> tuple[list, list] | None:
    """(begin, end) of the spatial axes of a constant-mode Pad with value 0 that pads neither the
    batch nor the channel axis, every amount >= 0; None otherwise."""
    if str(pad.attrs.get("mode", "constant")) != "constant":
        return None
    pads, value, axes = pad_operands(pad)
    if pads is None or value is None or axes:
        return None
    pads = np.asarray(pads).reshape(-1)
    if pads.size % 2 or pads.size < 6 or np.any(np.asarray(value) != 0) or np.any(pads < 0):
        return None
    r = pads.size // 2
    if pads[0] or pads[1] or pads[r] or pads[r + 1]:
        return None
    return [int(v) for v in pads[2:r]], [int(v) for v in pads[r + 2:]]
