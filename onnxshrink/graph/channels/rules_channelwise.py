"""Channel rules of the channel-wise and elementwise ops: unary activations, Clip, broadcasting
elementwise ops (Add, Mul, ..., PRelu), pooling, Resize, Pad, Softmax-like ops, reductions over
other axes, Q/DQ, and the ops that read the channel count (Shape, Size).

Every rule is ``rule(a, n, lays)`` as in ``rules_weighted``. Besides the ids, a layout carries
each channel's constant value (NaN: varying); these rules map it through the op, e.g.
    Mul: c = prod_i c_i (0 when any c_i is 0),  Add/Sum: c = sum_i c_i,  Relu: max(c, 0),
so a zero filter followed by BN and an activation is still known to emit a constant.
"""

from __future__ import annotations

__all__ = ["FLOAT_UNARY", "ELEMENTWISE_OPS", "POOL_OPS", "per_channel_const", "unary_rule", "clip_rule",
           "elementwise_rule", "pool_rule", "resize_rule", "pad_rule", "softmax_rule", "reduce_rule", "qdq_rule",
           "block_reads_shape_rule"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels.types import Fixup, Layout
from onnxshrink.graph.shapes import normalize_axis
from onnxshrink.graph.values import node_attr

# op -> f(constant per channel, node): the output constants (None: the output varies)
FLOAT_UNARY = {
    "Relu": lambda x, n: np.maximum(x, 0),
    "Sigmoid": lambda x, n: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "HardSigmoid": lambda x, n: np.clip(node_attr(n, "alpha", 0.2) * x + node_attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, node_attr(n, "alpha", 0.01) * x),
    "Elu": lambda x, n: np.where(x >= 0, x, node_attr(n, "alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1)),
    "Selu": lambda x, n: node_attr(n, "gamma", 1.0507) * np.where(
        x > 0, x, node_attr(n, "alpha", 1.67326) * (np.exp(np.minimum(x, 0)) - 1)),
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Exp": lambda x, n: np.exp(x),
    "Abs": lambda x, n: np.abs(x),
    "Neg": lambda x, n: -x,
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x),
    "Sqrt": lambda x, n: np.sqrt(np.where(x >= 0, x, np.nan)),
    "Reciprocal": lambda x, n: np.where(x != 0, 1 / np.where(x != 0, x, 1), np.nan),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "Sign": lambda x, n: np.sign(x),
    "Cast": lambda x, n: x,
    "Erf": None,  # no exact numpy erf: constant channels through Erf are treated as varying
    "Gelu": lambda x, n: np.where(x == 0, 0.0, np.nan),
    "Celu": lambda x, n: np.where(x == 0, 0.0, np.nan),
    "ThresholdedRelu": lambda x, n: np.where(x > node_attr(n, "alpha", 1.0), x, 0),
    "Clip": None,  # handled with its min/max inputs
}

ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}


def _is_float_tensor(t) -> bool:
    """True unless the tensor's dtype is known and not floating point."""
    try:
        return np.issubdtype(np.dtype(t.dtype), np.floating)
    except Exception:
        return True

def unary_rule(a, n: gs.Node, lays: list) -> None:
    """Elementwise unary ops keep the layout and map the constants (Cast only to a float type)."""
    x = lays[0]
    if x is None:
        return
    if n.op == "Cast" and not _is_float_tensor(n.outputs[0]):
        a.block_layout(x, f"Cast '{n.name}' to a non-float type")
        return
    f = FLOAT_UNARY.get(n.op)
    with np.errstate(all="ignore"):
        const = f(x.const, n) if f is not None else np.full(x.ids.shape, np.nan)
    for o in n.outputs[:1]:
        a.set_layout(o, Layout(x.axes, x.ids, np.asarray(const, np.float64)))


def clip_rule(a, n: gs.Node, lays: list) -> None:
    """Clip keeps the layout; constants are clipped when the bounds are constant."""
    x = a.data_layout(lays, f"Clip '{n.name}' bound carries channels")
    if x is None:
        return
    lo = node_attr(n, "min", -np.inf)
    hi = node_attr(n, "max", np.inf)
    known = True
    if len(n.inputs) > 1 and n.inputs[1].name:
        v = a.value(n.inputs[1])
        known &= v is not None
        lo = float(v) if v is not None else lo
    if len(n.inputs) > 2 and n.inputs[2].name:
        v = a.value(n.inputs[2])
        known &= v is not None
        hi = float(v) if v is not None else hi
    const = np.clip(x.const, lo, hi) if known else np.full(x.ids.shape, np.nan)
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, const))


def per_channel_const(v: np.ndarray, axes_in: list, count: tuple) -> np.ndarray:
    """Per-channel value of a constant operand (channels along ``axes_in`` of ``v``, or broadcast):
    the value when uniform over the other axes, else NaN."""
    v = np.asarray(v, np.float64)
    if not axes_in:
        return np.full(count, float(v.ravel()[0]) if v.size and np.all(v == v.ravel()[0]) else np.nan)
    moved = np.moveaxis(v, axes_in, list(range(len(axes_in))))
    flat = moved.reshape(moved.shape[:len(axes_in)] + (-1,))
    lo, hi = flat.min(axis=-1), flat.max(axis=-1)
    out = np.where(lo == hi, lo, np.nan)
    return np.broadcast_to(out, count).astype(np.float64)


def elementwise_rule(a, n: gs.Node, lays: list) -> None:
    """Broadcasting elementwise ops unite the ids of inputs that carry the full channel axis; per-channel
    constant operands become parameters to slice."""
    if all(l is None for l in lays):
        return
    ro = a.rank(n.outputs[0])
    if ro is None:
        rs = [a.rank(t) for t in n.inputs]
        ro = max(r for r in rs if r is not None) if any(r is not None for r in rs) else None
    if ro is None:
        for l in lays:
            a.block_layout(l, f"{n.op} '{n.name}': unknown ranks")
        return
    full = []
    biggest = max(l.ids.size for l in lays if l is not None)
    lays = list(lays)
    bcast = {}
    for i, (t, l) in enumerate(zip(n.inputs, lays)):
        if l is None:
            continue
        if l.ids.size == 1 and biggest > 1:
            # a one-channel tensor (spatial attention map) broadcast over the channels
            a.block_layout(l, f"{n.op} '{n.name}' broadcasts a one-channel tensor over channels")
            bcast[i] = float(l.const.ravel()[0])
            lays[i] = None
            continue
        off = ro - (a.rank(t) or ro)
        full.append((i, tuple(x + off for x in l.axes), l))
    axes = full[0][1]
    cshape = full[0][2].ids.shape
    if any(f[1] != axes or f[2].ids.shape != cshape for f in full):
        for _, _, l in full:
            a.block_layout(l, f"{n.op} '{n.name}' joins tensors with different channel axes")
        return
    if int(np.prod(cshape)) == 1 and ro is not None:
        oshape = a.shape(n.outputs[0])
        if oshape is None or any(oshape[x] != 1 for x in axes):
            for _, _, l in full:
                a.block_layout(l, f"{n.op} '{n.name}' broadcasts a one-channel tensor over channels")
            return
    ids = full[0][2].ids
    for _, _, l in full[1:]:
        a.unite(ids, l.ids)
    per_input = []
    reason = None
    for i, (t, l) in enumerate(zip(n.inputs, lays)):
        if l is not None:
            per_input.append(l.const)
            continue
        if i in bcast:
            per_input.append(np.full(cshape, bcast[i]))
            continue
        if not t.name:
            continue
        r = a.rank(t)
        v = a.value(t)
        s = a.shape(t)
        off = ro - (r if r is not None else ro)
        ain = [x - off for x in axes]
        dims = None if s is None or any(x >= len(s) for x in ain) else [s[x] if x >= 0 else 1 for x in ain]
        if v is not None:
            if all(x < 0 or v.shape[x] == 1 for x in ain):
                per_input.append(per_channel_const(v, [], cshape))
            elif [v.shape[x] for x in ain if x >= 0] == list(cshape) and all(x >= 0 for x in ain) and len(ain) == 1:
                tag = {"Add": "add_const", "Sub": "sub_const", "Mul": "mul_const", "Div": "div_const",
                       "PRelu": "prelu_slope"}.get(n.op, n.op.lower() + "_const")
                if a.add_param(n, i, ain[0], ids, "param", tag) is None:
                    reason = f"{n.op} '{n.name}' constant operand cannot be sliced"
                per_input.append(per_channel_const(v, ain, cshape))
            else:
                reason = f"{n.op} '{n.name}' constant operand does not match the channel axis"
        elif dims is not None and all(d == 1 for d in dims):
            per_input.append(np.full(cshape, np.nan))
        else:
            reason = f"{n.op} '{n.name}' input '{t.name}' carries untracked channels"
    if reason:
        for _, _, l in full:
            a.block_layout(l, reason)
        return
    const = _combine_const(n.op, per_input, cshape)
    a.set_layout(n.outputs[0], Layout(axes, ids, const))


def where_rule(a, n: gs.Node, lays: list) -> None:
    """Where(cond, x, y): x and y as a broadcasting elementwise op, the condition carrying no
    channels (a mask over tokens, e.g. ``scores.masked_fill(mask == 0, -inf)`` on attention logits,
    whose head axis it broadcasts over); the output's per-channel constant is unknown (NaN)."""
    if lays and lays[0] is not None:
        for l in lays:
            if l is not None:
                a.block_layout(l, f"Where '{n.name}' condition carries channels")
        return
    elementwise_rule(a, n, lays)


def _combine_const(op: str, cs: list, shape: tuple) -> np.ndarray:
    """Per-channel constant of the output of ``op`` from its inputs' constants ``cs`` (NaN: varying)."""
    cs = [np.broadcast_to(np.asarray(c, np.float64), shape) for c in cs]
    with np.errstate(all="ignore"):
        if op == "Mul":
            out = cs[0].copy()
            zero = cs[0] == 0
            for c in cs[1:]:
                out = out * c
                zero |= c == 0
            return np.where(zero, 0.0, out)
        if op in ("Add", "Sum"):
            return np.sum(cs, axis=0)
        if op == "Mean":
            return np.mean(cs, axis=0)
        if op == "Sub":
            return cs[0] - cs[1]
        if op == "Div":
            return np.where(cs[1] != 0, cs[0] / cs[1], np.nan)
        if op == "Pow":
            return np.power(cs[0], cs[1])
        if op == "Max":
            return np.max(cs, axis=0)
        if op == "Min":
            return np.min(cs, axis=0)
        if op == "PRelu":
            return np.where(cs[0] >= 0, cs[0], cs[0] * cs[1])
    return np.full(shape, np.nan)


def pool_rule(a, n: gs.Node, lays: list) -> None:
    """Pooling on axis 1 keeps the layout (constants survive unless padding or Lp norms change them)."""
    x = lays[0]
    if x is None:
        return
    if x.axes != (1,) or (len(n.outputs) > 1 and any(o.name for o in n.outputs[1:])):
        a.block_layout(x, f"{n.op} '{n.name}' not on axis 1 or outputs indices")
        return
    const = x.const
    if n.op == "AveragePool":
        pads = (any(node_attr(n, "pads", []) or [])
                or str(node_attr(n, "auto_pad", "NOTSET")).startswith(("SAME", "b'SAME")))
        if pads and int(node_attr(n, "count_include_pad", 0)) != 0:
            const = np.where(const == 0, 0.0, np.nan)
    elif n.op in ("LpPool", "GlobalLpPool"):
        const = np.where(const == 0, 0.0, np.nan)
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, const))


def resize_rule(a, n: gs.Node, lays: list) -> None:
    """Resize/Upsample keeps the layout when the channel axis is not scaled; sizes are fixed up."""
    x = a.data_layout(lays, f"{n.op} '{n.name}' scale input carries channels")
    if x is None:
        return
    if n.op == "Upsample" or a.opset < 11:
        sc = a.value(n.inputs[1]) if len(n.inputs) > 1 else np.asarray(node_attr(n, "scales", []))
        sizes = None
    else:
        sc = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        sizes = a.value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
        if (len(n.inputs) > 2 and n.inputs[2].name and sc is None
                or len(n.inputs) > 3 and n.inputs[3].name and sizes is None):
            a.block_layout(x, f"Resize '{n.name}' scales/sizes computed at run time")
            return
    if node_attr(n, "axes", None) is not None:
        a.block_layout(x, f"Resize '{n.name}' with axes (no rule)")
        return
    if sc is not None and sc.size and any(float(sc[ax]) != 1.0 for ax in x.axes):
        a.block_layout(x, f"Resize '{n.name}' scales the channel axis")
        return
    if sizes is not None and sizes.size:
        a.fixups.append(Fixup("resize_sizes", n, [x]))
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, x.const))


def pad_rule(a, n: gs.Node, lays: list) -> None:
    """Pad keeps the layout when the channel axis is not padded."""
    x = a.data_layout(lays, f"Pad '{n.name}' parameter carries channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    pads = a.value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else np.asarray(node_attr(n, "pads", []))
    axes = a.value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
    if pads is None or r is None:
        a.block_layout(x, f"Pad '{n.name}' pads computed at run time")
        return
    pads = pads.astype(np.int64).ravel()
    axes = list(range(r)) if axes is None else [normalize_axis(int(v), r) for v in axes.ravel()]
    k = len(axes)
    for j, ax in enumerate(axes):
        if ax in x.axes and (pads[j] != 0 or pads[j + k] != 0):
            a.block_layout(x, f"Pad '{n.name}' pads the channel axis")
            return
    mode = node_attr(n, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    const = x.const
    if mode == "constant" and pads.any():
        cv = 0.0
        if len(n.inputs) > 2 and n.inputs[2].name:
            v = a.value(n.inputs[2])
            cv = float(v) if v is not None and v.size else np.nan
        elif a.opset < 11:
            cv = float(node_attr(n, "value", 0.0))
        const = np.where(const == cv, const, np.nan)
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, const))

def softmax_rule(a, n: gs.Node, lays: list) -> None:
    """Softmax/LogSoftmax/Hardmax over non-channel axes keeps the layout (values vary)."""
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    default = -1 if a.opset >= 13 else 1
    ax = normalize_axis(int(node_attr(n, "axis", default)), r)
    if (a.opset < 13 and any(l >= ax for l in x.axes)) or ax in x.axes:
        a.block_layout(x, f"{n.op} '{n.name}' normalizes over the channel axis")
        return
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, np.full(x.ids.shape, np.nan)))


def reduce_rule(a, n: gs.Node, lays: list) -> None:
    """Reductions over non-channel axes keep the channels (axes renumbered without keepdims)."""
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    if len(n.inputs) > 1 and n.inputs[1].name:
        axes = a.value(n.inputs[1])
        if axes is None:
            a.block_layout(x, f"{n.op} '{n.name}' axes computed at run time")
            return
        axes = [int(v) for v in axes.ravel()]
    else:
        axes = node_attr(n, "axes", None)
    if axes is None or len(axes) == 0:
        if int(node_attr(n, "noop_with_empty_axes", 0)):
            a.set_layout(n.outputs[0], x)
            return
        axes = list(range(r))
    axes = sorted(normalize_axis(v, r) for v in axes)
    if any(v in x.axes for v in axes):
        a.block_layout(x, f"{n.op} '{n.name}' reduces over the channel axis")
        return
    keep = int(node_attr(n, "keepdims", 1))
    new = x.axes if keep else tuple(ax - sum(1 for v in axes if v < ax) for ax in x.axes)
    const = x.const if n.op in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(x.const == 0, 0.0, np.nan)
    a.set_layout(n.outputs[0], Layout(new, x.ids, const))


def qdq_rule(a, n: gs.Node, lays: list) -> None:
    """QuantizeLinear/DequantizeLinear keep the layout; a per-axis scale and zero point follow it."""
    x = a.data_layout(lays, f"{n.op} '{n.name}' scale carries channels")
    if x is None:
        return
    s = a.value(n.inputs[1])
    zp = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    if s is None or s.ndim > 1:
        a.block_layout(x, f"{n.op} '{n.name}' scale computed at run time or blocked")
        return
    r = a.rank(n.inputs[0])
    s64 = s.astype(np.float64)
    z64 = np.zeros_like(s64) if zp is None else zp.astype(np.float64)
    if s.size > 1:
        ax = normalize_axis(int(node_attr(n, "axis", 1)), r)
        if x.axes != (ax,) or s.size != x.ids.size:
            a.block_layout(x, f"{n.op} '{n.name}' per-axis scale not on the channel axis")
            return
        a.add_param(n, 1, 0, x.ids, "param", "scale")
        if zp is not None:
            a.add_param(n, 2, 0, x.ids, "param", "zero_point")
    with np.errstate(all="ignore"):
        if n.op == "QuantizeLinear":
            const = np.round(x.const / s64) + z64
        else:
            const = (x.const - z64) * s64
    a.set_layout(n.outputs[0], Layout(x.axes, x.ids, np.broadcast_to(const, x.ids.shape).astype(np.float64)))



def block_reads_shape_rule(a, n: gs.Node, lays: list) -> None:
    """Shape/Size read the channel count: every id reaching them is blocked, unless only dims off the
    channel axes are read (``x.size(0)``: a Shape whose every reader Gathers constant indices, or
    Slices constant bounds, of other axes, as PyTorch's ``x.view(x.size(0), ...)`` does), or the
    head width D of attention heads whose D channels are tied (torch's ``scaled_dot_product_attention``
    export computes its scale 1/sqrt(D) from ``Shape(q)[-1:]``; removing heads never changes D)."""
    x = lays[0] if lays else None
    if x is not None and n.op == "Shape" and _reads_other_dims(a, n, x):
        return
    for l in lays:
        a.block_layout(l, f"{n.op} '{n.name}' reads the channel count")


def _reads_other_dims(a, n: gs.Node, x: Layout) -> bool:
    """Whether every reader of Shape ``n``'s output takes constant dims away from ``x``'s axes."""
    r = a.rank(n.inputs[0])
    if r is None or not n.outputs[0].outputs:
        return False
    start = int(node_attr(n, "start", 0))
    end = int(node_attr(n, "end", r))
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    size = max(end - start, 0)
    fixed = set()   # the inner axis of a 2-D layout whose rows are each one unit (a head's D channels)
    if x.ids.ndim == 2 and len(x.axes) == 2:
        units = a.unit_of(x.ids)
        if np.all(units == units[:, :1]):
            fixed.add(x.axes[1])
    for g in n.outputs[0].outputs:
        dims = _shape_dims_read(a, g, size)
        if dims is None or size == 0:
            return False
        if any(start + d in x.axes and start + d not in fixed for d in dims):
            return False
    return True


def _shape_dims_read(a, g: gs.Node, size: int) -> list | None:
    """Positions of a shape vector of length ``size`` that node ``g`` reads: a Gather of constant
    indices on axis 0, or a Slice with constant bounds on axis 0 and step 1; None for anything else."""
    if g.op == "Gather" and len(g.inputs) > 1 and int(node_attr(g, "axis", 0)) == 0:
        idx = a.value(g.inputs[1])
        return None if idx is None or size == 0 else [int(i) % size for i in np.asarray(idx).ravel()]
    if g.op == "Slice" and len(g.inputs) >= 3:
        vals = [a.value(t) if t.name else None for t in g.inputs[1:5]] + [None] * (5 - len(g.inputs))
        starts, ends, axes, steps = vals
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        if (axes is not None and int(axes.ravel()[0]) not in (0, -1)) or \
                (steps is not None and int(steps.ravel()[0]) != 1):
            return None
        return list(range(size))[slice(int(starts.ravel()[0]), int(ends.ravel()[0]))]
    return None
