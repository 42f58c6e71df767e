"""Exact physical removal of channel units from a graph, and the units removable losslessly.

Removing a unit slices every member that holds it (weight axes, per-channel parameters, per-axis
Q/DQ scales), rewrites the shape constants and attributes that count channels (Reshape shape,
Split sizes, Slice bounds, Resize sizes, a depthwise conv's ``group``), and folds the value the
removed input channels had into the consumer's bias:
    b'_o = b_o + sum_{p removed} c_p * sum_k W[o, p, k]         (Conv, per group)
    C'  = C + (alpha / beta) * sum_{p removed} c_p * B[p, :]      (Gemm; a MatMul's bias Add, or a
                                                                   new Add after it)
which is exact when c_p is the channel's constant value, for Gemm/MatMul and for convs without
padding (with zero padding the border outputs would differ, so such units are kept).
"""

from __future__ import annotations

__all__ = ["lossless_units", "feasible", "remove_units", "matmul_bias_add"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels import ChannelAnalysis, Member, Sink, balanced_selection, conv_pads_are_zero
from onnxshrink.graph.values import constant_value


def lossless_units(a: ChannelAnalysis, fold: bool = True) -> tuple[set, dict]:
    """Units removable without changing any output, and {sink index: constant per input position}
    (NaN where the channel varies) for the bias folding."""
    blocked = a.blocked_units()
    bad = set(blocked)
    fill = {}
    for k, s in enumerate(a.sinks):
        u = a.unit_of(s.ids)
        c = np.asarray(s.const, np.float64)
        ok = (c == 0) | (np.isfinite(c) & fold & _sink_foldable(s))
        bad.update(u[~ok].tolist())
        fill[k] = np.where(np.isfinite(c), c, np.nan)
    # every unit that occurs in a layout and is not bad
    cand = set()
    for lay in a.layouts.values():
        cand.update(np.unique(a.unit_of(lay.ids)).tolist())
    return cand - bad, fill


def feasible(a: ChannelAnalysis, removed: set, scores: dict | None = None) -> set:
    """Shrink ``removed`` until no tensor loses all its channels and every balance constraint
    (equal removals per group of a grouped conv) holds."""
    removed = set(removed)
    while True:
        new = _keep_nonempty(a, removed)
        if a.balances:
            new = balanced_selection(a, new, scores)
        if new == removed:
            return new
        removed = new


def remove_units(a: ChannelAnalysis, graph: gs.Graph, removed: set, fill: dict | None = None) -> dict:
    """Remove the units ``removed`` from ``graph`` in place: fold ``fill`` (per sink, the value of
    each input position, NaN: none) of removed positions into consumer biases, slice every member,
    rewrite shape constants and attributes. Returns {'removed_channels', 'out_keep': node name ->
    kept output mask, 'in_keep': node name -> kept input mask}."""
    rem = np.fromiter(removed, dtype=np.int64)
    cache: dict = {}   # the new constants: shared by equally sliced inputs, unique names
    in_keep, extra_members = _fold_into_biases(a, graph, rem, fill or {}, cache)
    out_keep, removed_channels = _slice_members(a, list(a.members) + extra_members, rem, cache)
    _rewrite_fixups(a, rem, cache)
    # stale intermediate shapes would contradict the new channel counts
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None
    graph.cleanup().toposort()
    return {"removed_channels": removed_channels, "out_keep": out_keep, "in_keep": in_keep}


def _sink_foldable(s: Sink) -> bool:
    """True when a constant input channel of the sink can be folded into its bias exactly: Gemm,
    MatMul, and convs without padding (with padding the border outputs would differ)."""
    if constant_value(s.node.inputs[1], numeric_attrs=True) is None:
        return False
    if s.kind == "conv":
        w = constant_value(s.node.inputs[1], numeric_attrs=True)
        return conv_pads_are_zero(s.node, w.shape[2:])
    return s.kind in ("gemm", "matmul")


def _keep_nonempty(a: ChannelAnalysis, removed: set) -> set:
    """Un-remove units so no tensor (or Split part, Slice result, group) loses all its channels."""
    removed = set(removed)
    if not removed:
        return removed
    changed = True
    while changed:
        changed = False
        rem = np.fromiter(removed, dtype=np.int64)
        for lay in a.layouts.values():
            u = a.unit_of(lay.ids).ravel()
            if np.all(np.isin(u, rem)):
                removed.discard(int(u[0]))
                changed = True
                break
    return removed


def _private_const(node: gs.Node, slot: int, values: np.ndarray, cache: dict, key=None) -> gs.Constant:
    """Set input ``slot`` of ``node`` to a new constant holding ``values`` (a fresh unique name per
    call; with ``key``, one constant shared by every input sliced the same way)."""
    old = node.inputs[slot]
    if key is not None and key in cache:
        c = cache[key]
    else:
        base = old.name or f"{node.name}_in{slot}"
        name = f"{base}_pruned"
        k = 1
        while name in cache.get("__names__", set()):
            k += 1
            name = f"{base}_pruned{k}"
        cache.setdefault("__names__", set()).add(name)
        c = gs.Constant(name, np.ascontiguousarray(values))
        if key is not None:
            cache[key] = c
    node.inputs[slot] = c
    return c


def _sink_bias_delta(s: Sink, w: np.ndarray, pos: np.ndarray, vals: np.ndarray) -> np.ndarray | None:
    """Change of the consumer's output bias when input positions ``pos`` hold constants ``vals``."""
    n = s.node
    if s.kind == "conv":
        G = s.group
        cout, cin_g = w.shape[0], w.shape[1]
        wsum = w.reshape(cout, cin_g, -1).sum(axis=2).astype(np.float64)
        delta = np.zeros(cout)
        cout_g = cout // G
        for p, v in zip(pos.tolist(), vals.tolist()):
            g, j = divmod(p, cin_g)
            delta[g * cout_g:(g + 1) * cout_g] += v * wsum[g * cout_g:(g + 1) * cout_g, j]
        return delta
    if s.kind == "gemm":
        tB = int(n.attrs.get("transB", 0))
        wk = w.T if tB else w  # [K, N]
        return float(n.attrs.get("alpha", 1.0)) * (vals @ wk[pos].astype(np.float64))
    if s.kind == "matmul":
        return vals @ w[pos].astype(np.float64)
    return None


def _fold_into_biases(a: ChannelAnalysis, graph: gs.Graph, rem: np.ndarray, fill: dict, cache: dict) -> tuple:
    """Fold the ``fill`` values of the removed input positions of every sink into its bias (a new
    bias input, or an Add after a MatMul). Returns (sink name -> kept input mask, the members the
    new biases add)."""
    in_keep = {}
    extra_members: list[Member] = []
    for k, s in enumerate(a.sinks):
        gone = np.isin(a.unit_of(s.ids), rem)
        in_keep[s.node.name] = ~gone
        if not gone.any() or k not in fill:
            continue
        vals = np.nan_to_num(np.asarray(fill[k], np.float64)[gone], nan=0.0)
        pos = np.nonzero(gone)[0]
        if not np.any(vals != 0):
            continue
        w = constant_value(s.node.inputs[1], numeric_attrs=True)
        if w is None:
            continue
        delta = _sink_bias_delta(s, w.astype(np.float64), pos, vals)
        if delta is None:
            continue
        n = s.node
        out_member = next((m for m in a.members if m.node is n and m.slot == 1 and m.role == "out"), None)
        if s.kind == "conv":
            if len(n.inputs) > 2 and n.inputs[2].name:
                b = constant_value(n.inputs[2], numeric_attrs=True).astype(np.float64)
                _private_const(n, 2, (b + delta).astype(w.dtype), cache)
            else:
                while len(n.inputs) < 2:
                    n.inputs.append(gs.Variable.empty())
                n.inputs.append(gs.Constant(f"{n.name}_bias_pruned", delta.astype(w.dtype)))
                if out_member is not None:
                    extra_members.append(Member(n, 2, 0, out_member.ids, "out", "conv_b"))
        elif s.kind == "gemm":
            beta = float(n.attrs.get("beta", 1.0))
            N = delta.size
            if len(n.inputs) > 2 and n.inputs[2].name:
                c = constant_value(n.inputs[2], numeric_attrs=True).astype(np.float64)
                had_member = any(m.node is n and m.slot == 2 for m in a.members)
                cn = np.broadcast_to(c.reshape(-1) if c.size == N else c.reshape(-1)[:1], (N,)) + delta / beta
                _private_const(n, 2, cn.astype(w.dtype), cache)
                if not had_member and out_member is not None:
                    extra_members.append(Member(n, 2, 0, out_member.ids, "out", "gemm_b"))
            else:
                n.attrs["beta"] = 1.0
                n.inputs.append(gs.Constant(f"{n.name}_bias_pruned", delta.astype(w.dtype)))
                if out_member is not None:
                    extra_members.append(Member(n, 2, 0, out_member.ids, "out", "gemm_b"))
        elif s.kind == "matmul" and matmul_bias_add(n) is not None:
            add, slot = matmul_bias_add(n)  # the export's own bias Add (sliced as its add_const member)
            b = np.asarray(add.inputs[slot].values, np.float64)
            _private_const(add, slot, (b + delta.reshape(b.shape)).astype(add.inputs[slot].values.dtype), cache)
        elif s.kind == "matmul":
            y = n.outputs[0]
            mid = gs.Variable(f"{y.name}_nobias", dtype=y.dtype)
            n.outputs[0] = mid
            bias = gs.Constant(f"{n.name}_bias_pruned", delta.astype(w.dtype))
            add = gs.Node("Add", f"{n.name}_bias", inputs=[mid, bias], outputs=[y])
            graph.nodes.append(add)
            if out_member is not None:
                extra_members.append(Member(add, 1, 0, out_member.ids, "out", "matmul_b"))
    return in_keep, extra_members


def _rewrite_concat_pieces(concat: gs.Node, sizes: list, new: dict, cache: dict) -> None:
    """Set entries ``new`` {position: value} of a shape built by ``concat`` (axis 0) of pieces of
    ``sizes`` in its constant pieces (the analysis checked that those positions are constant)."""
    off = 0
    for slot, (piece, size) in enumerate(zip(list(concat.inputs), sizes)):
        v = constant_value(piece, numeric_attrs=True)
        hit = {p - off: val for p, val in new.items() if off <= p < off + size}
        if hit:
            v = v.reshape(-1).copy()
            for p, val in hit.items():
                if v[p] != -1:
                    v[p] = val
            _private_const(concat, slot, v, cache)
        off += size


def matmul_bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(Add, slot of its constant) when the only consumer of a MatMul's output adds a bias: a 1-D
    constant of the MatMul's output width (PyTorch's Linear, either operand order), or the Add
    ``remove`` put after it to hold folded channel values; None otherwise."""
    w = constant_value(node.inputs[1], numeric_attrs=True) if len(node.inputs) > 1 else None
    users = node.outputs[0].outputs if node.outputs else []
    if w is None or w.ndim != 2 or len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    add = users[0]
    slot = 1 if add.inputs[0] is node.outputs[0] else 0
    c = add.inputs[slot]
    if add.inputs[1 - slot] is not node.outputs[0] or not isinstance(c, gs.Constant) \
            or np.asarray(c.values).ndim != 1 or np.asarray(c.values).size != w.shape[1]:
        return None
    return add, slot


def _slice_members(a: ChannelAnalysis, members: list, rem: np.ndarray, cache: dict) -> tuple:
    """Slice every member's tensor along its axes (a grouped conv's 2-D input mask row by row).
    Returns (producer name -> kept output mask, the number of removed output channels)."""
    out_keep = {}
    by_slot: dict = {}
    removed_channels = 0
    for m in members:
        keep = ~np.isin(a.unit_of(m.ids), rem)
        key = (id(m.node), m.slot)
        ent = by_slot.setdefault(key, (m.node, m.slot, {}))
        ax = ent[2]
        ax[m.axis] = ax[m.axis] & keep if m.axis in ax else keep
        if m.role == "out" and m.slot == 1:
            out_keep[m.node.name] = keep
            removed_channels += int((~keep).sum())
    for node, slot, axes in by_slot.values():
        if all(mask.all() for mask in axes.values()):
            continue
        t = node.inputs[slot]
        v = constant_value(t, numeric_attrs=True)
        if v is None:
            raise RuntimeError(f"cannot slice input {slot} of '{node.name}'")
        new = v
        for axis, mask in sorted(axes.items(), key=lambda kv: kv[1].ndim == 1):
            if mask.ndim == 2:
                # grouped conv input: output rows of group g keep the columns of row g of the mask
                kept = mask.sum(axis=1)
                if np.any(kept != kept[0]):
                    raise RuntimeError(f"'{node.name}': unequal removals across groups")
                parts = np.split(new, mask.shape[0], axis=0)
                new = np.concatenate([np.compress(mask[g], p, axis=axis) for g, p in enumerate(parts)], axis=0)
            else:
                new = np.compress(mask, new, axis=axis)
        key = (t.name, tuple((ax, m.tobytes()) for ax, m in sorted(axes.items())))
        _private_const(node, slot, new, cache, key)
    return out_keep, removed_channels


def _rewrite_fixups(a: ChannelAnalysis, rem: np.ndarray, cache: dict) -> None:
    """Rewrite the shape constants and attributes that count channels to the kept counts."""
    for f in a.fixups:
        n = f.node
        if f.kind == "reshape":
            lay = f.layouts[0]
            kept = ~np.isin(a.unit_of(lay.ids), rem)
            counts = [int(np.any(np.moveaxis(kept, k, 0).reshape(kept.shape[k], -1), axis=1).sum())
                      for k in range(kept.ndim)]
            if int(np.prod(counts)) != int(kept.sum()):
                raise RuntimeError(f"Reshape '{n.name}': removal is not rectangular")
            concat = f.info.get("concat")
            if concat is not None:  # the channel dims are constant pieces of a run-time Concat
                _rewrite_concat_pieces(concat, f.info["sizes"], {ax: counts[k] for k, ax in enumerate(lay.axes)}, cache)
                continue
            spec = constant_value(n.inputs[1], numeric_attrs=True).copy()
            for k, ax in enumerate(lay.axes):
                if spec[ax] != -1:
                    spec[ax] = counts[k]
            _private_const(n, 1, spec, cache)
        elif f.kind == "split":
            sizes = np.array([int((~np.isin(a.unit_of(p.ids), rem)).sum()) for p in f.layouts], np.int64)
            if len(n.inputs) > 1 and n.inputs[1].name:
                _private_const(n, 1, sizes, cache)
            elif "split" in n.attrs or int(a.opset) < 13:
                n.attrs["split"] = [int(x) for x in sizes]
                n.attrs.pop("num_outputs", None)
            else:
                n.attrs.pop("num_outputs", None)
                n.inputs.append(gs.Constant(f"{n.name}_split_pruned", sizes))
        elif f.kind == "slice":
            x = f.layouts[0]
            kept = ~np.isin(a.unit_of(x.ids), rem)
            s, e, j = f.info["start"], f.info["end"], f.info["index"]
            ns = int(kept[:s].sum())
            ne = ns + int(kept[s:e].sum())
            if len(n.inputs) > 1:
                st = constant_value(n.inputs[1], numeric_attrs=True).copy()
                en = constant_value(n.inputs[2], numeric_attrs=True).copy()
                st[j], en[j] = ns, ne
                _private_const(n, 1, st, cache)
                _private_const(n, 2, en, cache)
            else:
                st, en = list(n.attrs["starts"]), list(n.attrs["ends"])
                st[j], en[j] = ns, ne
                n.attrs["starts"], n.attrs["ends"] = st, en
        elif f.kind == "group":
            x = f.layouts[0]
            n.attrs["group"] = int((~np.isin(a.unit_of(x.ids), rem)).sum())
        elif f.kind == "resize_sizes":
            x = f.layouts[0]
            sizes = constant_value(n.inputs[3], numeric_attrs=True).copy()
            sizes[x.axes[0]] = int((~np.isin(a.unit_of(x.ids), rem)).sum())
            _private_const(n, 3, sizes, cache)
