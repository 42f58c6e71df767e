"""Channel rules of the ops that move, cut or join channel axes: Concat, Split, Slice, Transpose,
Reshape, Flatten, Squeeze, Unsqueeze and Gather.

Every rule is ``rule(a, n, lays)`` as in ``rules_weighted``. A Reshape is followed through the
*blocks* of its static dims (consecutive input and output dims with equal products): the ids of
the block holding the channel axis are broadcast over the input block and reshaped to the output
block, so Flatten to features gives channel c the features [c*s, (c+1)*s), and a channel shuffle
(N, C, H, W) -> (N, g, C/g, H, W) gives a 2-D layout whose columns are tied so the result stays
rectangular. Shape constants that count channels (Reshape shape, Split sizes, Slice bounds) are
recorded as fix-ups.
"""

from __future__ import annotations

__all__ = ["concat_rule", "split_rule", "slice_rule", "transpose_rule", "reshape_rule", "flatten_rule",
           "squeeze_unsqueeze_rule", "gather_rule"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels.rules_attention import feeds_activation_matmul
from onnxshrink.graph.channels.rules_channelwise import per_channel_const
from onnxshrink.graph.channels.types import Fixup, Layout
from onnxshrink.graph.shapes import normalize_axis
from onnxshrink.graph.values import node_attr


def concat_rule(a, n: gs.Node, lays: list) -> None:
    """Concat on the channel axis concatenates ids (untracked inputs get blocked ids); on another axis it
    unites the ids of equal positions."""
    if all(l is None for l in lays):
        return
    r = a.rank(n.outputs[0]) or next((a.rank(t) for t in n.inputs if a.rank(t)), None)
    ax = normalize_axis(int(node_attr(n, "axis", None)), r)
    lay0 = next(l for l in lays if l is not None)
    if ax in lay0.axes:
        if any(l is not None and l.axes != (ax,) for l in lays):
            for l in lays:
                a.block_layout(l, f"Concat '{n.name}' joins different channel axes")
            return
        ids, consts = [], []
        for t, l in zip(n.inputs, lays):
            if l is not None:
                ids.append(l.ids)
                consts.append(l.const)
                continue
            s = a.shape(t)
            c = s[ax] if s is not None and len(s) > ax else None
            if not isinstance(c, int):
                for l2 in lays:
                    a.block_layout(l2, f"Concat '{n.name}' input '{t.name}' has an unknown channel count")
                return
            extra = a.new_space(c, f"{t.name} (untracked)")
            a.block(extra, f"Concat '{n.name}' input '{t.name}' is not produced by a prunable layer")
            ids.append(extra)
            v = a.value(t)
            consts.append(per_channel_const(v, [ax], (c,)) if v is not None else np.full(c, np.nan))
        a.set_layout(n.outputs[0], Layout((ax,), np.concatenate(ids), np.concatenate(consts)))
        return
    # concat along another axis: channel i of every input is channel i of the output
    if any(l is None for l in lays) or any(l.axes != lay0.axes or l.ids.shape != lay0.ids.shape for l in lays):
        for l in lays:
            a.block_layout(l, f"Concat '{n.name}' along a non-channel axis of unmatched inputs")
        return
    for l in lays[1:]:
        a.unite(lay0.ids, l.ids)
    const = lay0.const
    for l in lays[1:]:
        const = np.where(const == l.const, const, np.nan)
    a.set_layout(n.outputs[0], Layout(lay0.axes, lay0.ids, const))


def split_rule(a, n: gs.Node, lays: list) -> None:
    """Split on the channel axis cuts the ids (sizes fixed up); on another axis every output keeps them."""
    x = a.data_layout(lays, f"Split '{n.name}' sizes carry channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    ax = normalize_axis(int(node_attr(n, "axis", 0)), r)
    if ax not in x.axes:
        for o in n.outputs:
            a.set_layout(o, Layout(x.axes, x.ids, x.const))
        return
    if len(n.inputs) > 1 and n.inputs[1].name:
        sizes = a.value(n.inputs[1])
        if sizes is None:
            a.block_layout(x, f"Split '{n.name}' sizes computed at run time")
            return
        sizes = [int(v) for v in sizes.ravel()]
    elif node_attr(n, "split", None) is not None:
        sizes = [int(v) for v in node_attr(n, "split", None)]
    else:
        k = len(n.outputs)
        c = x.ids.size
        q = -(-c // k)
        sizes = [q] * (k - 1) + [c - q * (k - 1)]
    if not x.single:
        # one axis of a split layout (a fused QKV's [3, H, D]): the axis keeps its length, each output
        # gets its slices
        k = x.axes.index(ax)
        if sum(sizes) != x.ids.shape[k] or len(sizes) != len(n.outputs):
            a.block_layout(x, f"Split '{n.name}' sizes do not match the channels")
            return
        _tie_along(a, x.ids, k)
        off = 0
        for o, sz in zip(n.outputs, sizes):
            sl = np.arange(off, off + sz)
            a.set_layout(o, Layout(x.axes, np.take(x.ids, sl, axis=k), np.take(x.const, sl, axis=k)))
            off += sz
        return
    if sum(sizes) != x.ids.size or len(sizes) != len(n.outputs):
        a.block_layout(x, f"Split '{n.name}' sizes do not match the channels")
        return
    parts = []
    off = 0
    for o, s in zip(n.outputs, sizes):
        lay = Layout(x.axes, x.ids[off:off + s], x.const[off:off + s])
        parts.append(lay)
        a.set_layout(o, lay)
        off += s
    a.fixups.append(Fixup("split", n, parts, {"axis": ax}))


def slice_rule(a, n: gs.Node, lays: list) -> None:
    """Slice on the channel axis (step 1) cuts the ids; the bounds are fixed up. Along one axis of a
    split layout the axis keeps its length (its slices tied) and the bounds stay."""
    x = a.data_layout(lays, f"Slice '{n.name}' bounds carry channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    if len(n.inputs) > 1:
        vals = [a.value(t) if i < len(n.inputs) and n.inputs[i].name else None
                for i, t in zip(range(1, 5), list(n.inputs[1:]) + [None] * 4)]
        starts, ends, axes, steps = (vals + [None] * 4)[:4]
        if starts is None or ends is None or (len(n.inputs) > 3 and n.inputs[3].name and axes is None) \
                or (len(n.inputs) > 4 and n.inputs[4].name and steps is None):
            a.block_layout(x, f"Slice '{n.name}' bounds computed at run time")
            return
    else:
        starts, ends, axes, steps = (np.asarray(node_attr(n, "starts", None)), np.asarray(node_attr(n, "ends", None)),
                                     node_attr(n, "axes", None), None)
        axes = None if axes is None else np.asarray(axes)
    starts, ends = starts.ravel().astype(np.int64), ends.ravel().astype(np.int64)
    axes = np.arange(len(starts)) if axes is None else axes.ravel().astype(np.int64)
    steps = np.ones(len(starts), np.int64) if steps is None else steps.ravel().astype(np.int64)
    lay = x
    for j, ax in enumerate(axes):
        ax = normalize_axis(int(ax), r)
        if ax not in x.axes:
            continue
        if steps[j] != 1:
            a.block_layout(x, f"Slice '{n.name}' with a step on the channel axis")
            return
        if not x.single:
            # one axis of a split layout (PaddlePaddle's qkv[0] of a fused QKV): the axis keeps its
            # length (its slices tied), the bounds stay
            k = x.axes.index(ax)
            c = x.ids.shape[k]
            s0, e0 = int(starts[j]), int(ends[j])
            s0 = max(0, min(c, s0 + c if s0 < 0 else s0))
            e0 = max(0, min(c, e0 + c if e0 < 0 else e0))
            _tie_along(a, x.ids, k)
            lay = Layout(lay.axes, np.take(lay.ids, np.arange(s0, e0), axis=k),
                         np.take(lay.const, np.arange(s0, e0), axis=k))
            continue
        c = x.ids.size
        s, e = int(starts[j]), int(ends[j])
        s = max(0, min(c, s + c if s < 0 else s))
        e = max(0, min(c, e + c if e < 0 else e))
        lay = Layout(x.axes, x.ids[s:e], x.const[s:e])
        a.fixups.append(Fixup("slice", n, [x], {"index": j, "start": s, "end": e}))
    a.set_layout(n.outputs[0], lay)


def transpose_rule(a, n: gs.Node, lays: list) -> None:
    """Transpose moves the channel axes."""
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    perm = node_attr(n, "perm", None)
    perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
    new_axes = sorted(j for j, p in enumerate(perm) if p in x.axes)
    order = [x.axes.index(perm[j]) for j in new_axes]
    a.set_layout(n.outputs[0], Layout(tuple(new_axes), np.transpose(x.ids, order), np.transpose(x.const, order)))


def _blocks(ind: list, outd: list):
    """Aligned blocks of a reshape: list of ((i0, i1), (o0, o1)) whose dim products agree, a third
    element "unknown" when dims there are not static. Leading and trailing equal dims (symbolic
    ones too) pair one to one."""
    blocks = []
    i0, o0 = 0, 0
    while i0 < len(ind) and o0 < len(outd) and ind[i0] == outd[o0] and ind[i0] is not None:
        blocks.append(((i0, i0 + 1), (o0, o0 + 1)))
        i0, o0 = i0 + 1, o0 + 1
    tail = []
    i1, o1 = len(ind), len(outd)
    while i1 > i0 and o1 > o0 and ind[i1 - 1] == outd[o1 - 1] and ind[i1 - 1] is not None:
        tail.append(((i1 - 1, i1), (o1 - 1, o1)))
        i1, o1 = i1 - 1, o1 - 1
    mid_in, mid_out = ind[i0:i1], outd[o0:o1]
    if mid_in or mid_out:
        if any(not isinstance(d, int) for d in mid_in + mid_out):
            blocks.append(((i0, i1), (o0, o1), "unknown"))
        else:
            pi, po = i0, o0
            while pi < i1 or po < o1:
                bi, bo = pi, po
                si = so = 1
                if pi < i1:
                    si *= ind[pi]
                    pi += 1
                if po < o1:
                    so *= outd[po]
                    po += 1
                while si != so:
                    if si < so and pi < i1:
                        si *= ind[pi]
                        pi += 1
                    elif so < si and po < o1:
                        so *= outd[po]
                        po += 1
                    else:
                        blocks.append(((bi, i1), (bo, o1), "unknown"))
                        return blocks + tail[::-1]
                blocks.append(((bi, pi), (bo, po)))
    return blocks + tail[::-1]


def _reshape_like(a, n: gs.Node, x: Layout, ind, outd, fix: bool) -> None:
    """The output layout of a reshape of ``x`` from dims ``ind`` to ``outd`` (blocked when the
    channel block is not static); ``fix``: record the shape constant as a fix-up."""
    if ind is None or outd is None:
        a.block_layout(x, f"{n.op} '{n.name}': unknown shapes")
        return
    blocks = _blocks(list(ind), list(outd))
    hit = [b for b in blocks if any(b[0][0] <= ax < b[0][1] for ax in x.axes)]
    if len(hit) != 1 or len(hit[0]) == 3 or not all(hit[0][0][0] <= ax < hit[0][0][1] for ax in x.axes):
        a.block_layout(x, f"{n.op} '{n.name}' channel mapping not provable from static dims")
        return
    (i0, i1), (o0, o1) = hit[0][:2]
    block_in = [int(d) for d in ind[i0:i1]]
    block_out = [int(d) for d in outd[o0:o1]]
    # ids over the whole input block (broadcast over the non-channel axes of the block)
    shp = [1] * (i1 - i0)
    for k, ax in enumerate(x.axes):
        shp[ax - i0] = x.ids.shape[k]
    ids = np.broadcast_to(x.ids.reshape(shp), block_in).reshape(block_out)
    const = np.broadcast_to(x.const.reshape(shp), block_in).reshape(block_out)
    # drop output axes of the block where ids do not vary (size-1 dims, pure spatial splits)
    keep = [k for k in range(len(block_out)) if block_out[k] > 1 and
            not np.all(ids == np.take(ids, [0], axis=k))]
    if not keep:
        keep = [int(np.argmax(block_out))]
    if keep != list(range(keep[0], keep[-1] + 1)):
        a.block_layout(x, f"{n.op} '{n.name}' scatters channels over non-adjacent axes")
        return
    sl = tuple(slice(None) if k in keep else slice(0, 1) for k in range(len(block_out)))
    ids2 = ids[sl].reshape([block_out[k] for k in keep])
    const2 = const[sl].reshape([block_out[k] for k in keep])
    if len(keep) > 1 and feeds_activation_matmul(n.outputs[0]):
        # attention heads [.., H, D]: a unit is one head (the axis before D), so H shrinks and D,
        # which the 1/sqrt(D) scale depends on, stays
        a.unite_across(ids2, len(keep) - 2)
    elif len(keep) > 1:
        # keep the result rectangular: removal goes along one axis, whole slices at a time
        best, cost = 0, None
        for f in range(len(keep)):
            arr = np.moveaxis(a.unit_of(ids2), f, 0).reshape(ids2.shape[f], -1)
            c = sum(len(set(row.tolist())) - 1 for row in arr)
            if cost is None or c < cost:
                best, cost = f, c
        a.unite_across(ids2, best)
    lay = Layout(tuple(o0 + k for k in keep), ids2, const2)
    if fix:
        a.fixups.append(Fixup("reshape", n, [lay]))
    a.set_layout(n.outputs[0], lay)


def reshape_rule(a, n: gs.Node, lays: list) -> None:
    """Reshape with a constant shape maps the ids when provable from static dims; the shape is fixed up."""
    x = lays[0]
    a.block_layout(lays[1] if len(lays) > 1 else None, f"Reshape '{n.name}' shape carries channels")
    if x is None:
        return
    spec = a.value(n.inputs[1]) if len(n.inputs) > 1 else None
    concat = None
    if spec is None:
        concat, spec, sizes = _concat_spec(a, n)
        if concat is None:
            a.block_layout(x, f"Reshape '{n.name}' shape is computed at run time")
            return
    if int(node_attr(n, "allowzero", 0)) and np.any(spec == 0):
        a.block_layout(x, f"Reshape '{n.name}' with allowzero")
        return
    ind = a.shape(n.inputs[0])
    outd = a.shape(n.outputs[0])
    if outd is None and ind is not None and all(isinstance(d, int) for d in ind):
        sp = [int(v) for v in spec.ravel()]
        outd = [ind[k] if v == 0 else v for k, v in enumerate(sp)]
        if -1 in outd:
            known = int(np.prod([d for d in outd if d != -1]))
            outd[outd.index(-1)] = int(np.prod(ind)) // max(known, 1)
    if outd is not None and ind is not None:
        outd = list(outd)
        for k, v in enumerate(spec.ravel().tolist()):
            if v == 0 and k < len(ind):
                outd[k] = ind[k]
            elif v > 0 and outd[k] is None:
                outd[k] = int(v)
    if concat is not None:
        # the shape is Concat([x.size(0), x.size(1)], [H, D]): the channel dims must be constants
        lay_before = a.layouts.get(n.outputs[0].name)
        _reshape_like(a, n, x, ind, outd, fix=False)
        lay = a.layouts.get(n.outputs[0].name)
        if lay is None or lay is lay_before:
            return
        if any(ax >= len(spec) or np.isnan(spec[ax]) for ax in lay.axes):
            a.layouts.pop(n.outputs[0].name, None)
            a.block_layout(x, f"Reshape '{n.name}' shape is computed at run time on the channel axes")
            return
        a.fixups.append(Fixup("reshape", n, [lay], {"concat": concat, "sizes": sizes}))
        return
    _reshape_like(a, n, x, ind, outd, fix=True)


def _concat_spec(a, n: gs.Node):
    """(Concat node, spec with NaN at run-time entries, length of each piece) when a Reshape's shape
    is a Concat (axis 0, read by this Reshape only) of 1-D pieces, each constant or of known length
    (PyTorch's ``x.view(x.size(0), x.size(1), H, D)``); (None, None, None) otherwise."""
    t = n.inputs[1] if len(n.inputs) > 1 else None
    if t is None or len(t.inputs) != 1 or t.inputs[0].op != "Concat" or len(t.outputs) != 1 \
            or int(node_attr(t.inputs[0], "axis", 0)) != 0:
        return None, None, None
    parts = []
    for piece in t.inputs[0].inputs:
        v = a.value(piece)
        if v is not None:
            parts.append(np.asarray(v, np.float64).ravel())
            continue
        s = a.shape(piece)
        if s is None or len(s) != 1 or not isinstance(s[0], int):
            return None, None, None
        parts.append(np.full(s[0], np.nan))
    if not parts:
        return None, None, None
    return t.inputs[0], np.concatenate(parts), [p.size for p in parts]


def flatten_rule(a, n: gs.Node, lays: list) -> None:
    """Flatten maps the ids like a reshape to (head, tail): channel c gets features [c*s, (c+1)*s)."""
    x = lays[0]
    if x is None:
        return
    ind = a.shape(n.inputs[0])
    if ind is None:
        a.block_layout(x, f"Flatten '{n.name}': unknown shape")
        return
    ax = normalize_axis(int(node_attr(n, "axis", 1)), len(ind))

    def prod(ds):
        p = 1
        for d in ds:
            if not isinstance(d, int):
                return None
            p *= d
        return p

    head, tail = prod(ind[:ax]), prod(ind[ax:])
    if tail is None or (head is None and any(l < ax for l in x.axes)):
        a.block_layout(x, f"Flatten '{n.name}': dims after the axis are not static")
        return
    if head is None:
        # leading dims unknown (batch): they stay out of the channel block
        ind2 = ["?"] + list(ind[ax:])
        x2 = Layout(tuple(l - ax + 1 for l in x.axes), x.ids, x.const)
        _reshape_like(a, n, x2, ind2, ["?", tail], fix=False)
        return
    _reshape_like(a, n, x, list(ind), [head, tail], fix=False)


def squeeze_unsqueeze_rule(a, n: gs.Node, lays: list) -> None:
    """Squeeze/Unsqueeze of non-channel axes renumber the channel axes."""
    x = lays[0]
    if x is None:
        return
    if len(n.inputs) > 1 and n.inputs[1].name:
        axes = a.value(n.inputs[1])
        if axes is None:
            a.block_layout(x, f"{n.op} '{n.name}' axes computed at run time")
            return
        axes = [int(v) for v in axes.ravel()]
    else:
        axes = node_attr(n, "axes", None)
    rin = a.rank(n.inputs[0])
    if rin is None:
        a.block_layout(x, f"{n.op} '{n.name}': unknown rank")
        return
    if n.op == "Squeeze":
        if axes is None:
            s = a.shape(n.inputs[0])
            axes = [k for k, d in enumerate(s) if d == 1]
        axes = sorted(normalize_axis(v, rin) for v in axes)
        hit = [x.axes.index(v) for v in axes if v in x.axes]
        if hit and (x.single or any(x.ids.shape[k] != 1 for k in hit)):
            a.block_layout(x, f"Squeeze '{n.name}' removes the channel axis")
            return
        if hit:  # a length-1 axis of a split layout (one of a fused QKV's q, k, v) goes
            x = Layout(tuple(ax for ax in x.axes if ax not in axes), x.ids.squeeze(tuple(hit)),
                       x.const.squeeze(tuple(hit)))
        new = tuple(ax - sum(1 for v in axes if v < ax) for ax in x.axes)
    else:
        rout = rin + len(axes)
        axes = sorted(normalize_axis(v, rout) for v in axes)
        pos = [k for k in range(rout) if k not in axes]  # output positions of input axes
        new = tuple(pos[ax] for ax in x.axes)
        if new != tuple(range(new[0], new[0] + len(new))):
            a.block_layout(x, f"Unsqueeze '{n.name}' splits the channel axes")
            return
    a.set_layout(n.outputs[0], Layout(new, x.ids, x.const))


def _tie_along(a, ids: np.ndarray, k: int) -> None:
    """Unite the ids at equal positions of every slice along axis ``k`` (the axis then never
    shrinks: a removal takes a position from every slice)."""
    rows = np.moveaxis(ids, k, -1).reshape(-1, ids.shape[k])
    for row in rows:
        a.unite(np.full(row.size - 1, row[0]), row[1:])


def gather_rule(a, n: gs.Node, lays: list) -> None:
    """Gather with constant indices: along a non-channel axis the channel axes are renumbered; a
    scalar index along one axis of a split layout (``qkv[0]`` of a fused QKV) takes that slice, the
    axis keeping its length (its slices tied); anything else blocks."""
    x = a.data_layout(lays, f"Gather '{n.name}' indices carry channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    idx = a.value(n.inputs[1])
    if r is None or idx is None:
        a.block_layout(x, f"Gather '{n.name}' indices computed at run time or unknown rank")
        return
    ax = normalize_axis(int(node_attr(n, "axis", 0)), r)
    if ax not in x.axes:
        shift = idx.ndim - 1
        a.set_layout(n.outputs[0], Layout(tuple(v + shift if v > ax else v for v in x.axes), x.ids, x.const))
        return
    if x.single or idx.ndim != 0:
        a.block_layout(x, f"Gather '{n.name}' picks channels")
        return
    k = x.axes.index(ax)
    i = int(idx) % x.ids.shape[k]
    _tie_along(a, x.ids, k)
    a.set_layout(n.outputs[0], Layout(tuple(v - 1 if v > ax else v for v in x.axes if v != ax),
                                      np.take(x.ids, i, axis=k), np.take(x.const, i, axis=k)))
