"""prune: structured channel pruning that physically removes channels from the graph.

Channels are removed by *unit* (see ``onnxshrink.graph.channels``): every weight axis, per-channel
parameter, shape constant (Reshape shape, Split sizes, Slice bounds, Resize sizes), depthwise
``group`` attribute and per-channel Q/DQ scale that holds a unit's channel loses that position.

Lossless (``mode=zeros``): a unit is removed when, at every contracting consumer (Conv, Gemm,
MatMul, ConvTranspose) reading it, its value is a known constant c: exact when c = 0; for c != 0
the consumer's bias absorbs it,
    b'_o = b_o + sum_{p removed} c_p * sum_k W[o, p, k]         (Conv, per group)
    C'  = C + (alpha / beta) * sum_{p removed} c_p * B[p, :]      (Gemm; MatMul gets an Add)
which is exact for Gemm/MatMul and for convs without padding (with zero padding the border
outputs would differ, so such units are kept).

Lossy (``mode=importance``): units of each prunable group are ranked by an importance score and
the lowest ``ratio`` of them removed (per group, or globally after normalising scores by the
group's median); kept counts are rounded up to ``multiple_of``. Scores:
    l1 / l2:     norm of the unit's producing filters (each layer normalised by its mean norm)
    bn:          |gamma| / sqrt(var + eps) of the BatchNormalization after it
    activation:  sum over consumers of sqrt(E[x_p^2]) * ||W[:, p]||_2 on calibration data
Removed channels' calibration mean E[x_p] is folded into the consumer bias (as for constants).
Then each consumer whose input lost channels is refit by ridge least squares (ThiNet / He et al.
2017): inputs X from the pruned model, targets Y from the unpruned one (kept output channels),
    [W'; b'] = argmin ||[X 1][W; b] - Y||^2 + lam ||W||^2 = (A + lam I)^-1 B,
    A = sum X~^T X~, B = sum X~^T Y  (accumulated streaming over samples; conv inputs are
    im2col patches at randomly sampled output positions),
and a refit is kept only when its reconstruction error on the accumulated statistics is lower.
Consumers are refit level by level: a layer is fit after every refit layer upstream of it.

``target_macs`` (importance mode) picks per-group ratios by measured sensitivity: each group's
candidate removal (``ratio`` and 2 x ``ratio``) is simulated by zeroing its filters in a copy;
candidates are ranked by output error (1 - cosine) per MAC saved and taken until
    MACs = sum_layers MACs_l * (1 - removed_in_l) * (1 - removed_out_l) <= target_macs * MACs_0.
``target_latency`` follows the same greedy path and bisects on it for the shortest prefix whose
pruned model's measured onnxruntime CPU latency (1 thread, median) is <= target_latency x the
input's (about log2(#candidates) latency measurements).

Grouped convs (ShuffleNet, ResNeXt) need equal removals per group: a removal set is made valid by
``graph.channels.balanced_selection`` (the largest balanced subset of the wanted units, lowest
importance first).
"""

from __future__ import annotations

__all__ = ["PrunePass", "lossless_units", "remove_units"]

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels import (ChannelAnalysis, Layout, Member, _conv_pads_zero, analyze, balanced_selection,
                              const_value)
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register


@dataclass
class PruneOptions:
    mode: Literal["zeros", "importance"] = field(default="zeros", metadata={
        "help": "zeros: remove only channels that are provably zero/constant (lossless); "
                "importance: also remove the least important channels (lossy)"})
    ratio: float = field(default=0.3, metadata={"help": "fraction of each prunable group's channels to remove (importance mode)"})
    importance: Literal["l1", "l2", "bn", "activation"] = field(default="activation", metadata={
        "help": "channel importance: filter L1/L2 norm, BN scale, or activation energy x weight norm on calibration data"})
    scope: Literal["layer", "global"] = field(default="layer", metadata={
        "help": "layer: remove `ratio` of every group; global: lowest `ratio` of all channels by normalised score"})
    target_macs: float = field(default=0.0, metadata={
        "help": "importance mode: instead of pruning every group, prune (at `ratio`, then 2x `ratio`) the groups with the "
                "lowest measured output error per MAC saved until MACs <= this fraction of the input's (0: off)"})
    target_latency: float = field(default=0.0, metadata={
        "help": "importance mode: like target_macs, but prune along the same sensitivity order until the measured "
                "onnxruntime CPU latency (1 thread) is <= this fraction of the input's (0: off)"})
    multiple_of: int = field(default=8, metadata={"help": "round kept channel counts up to a multiple of this (SIMD-friendly)"})
    min_keep: float = field(default=0.1, metadata={"help": "global scope: keep at least this fraction of each group"})
    compensate: bool = field(default=True, metadata={"help": "fold removed channels' calibration mean into the consumer bias"})
    refit: bool = field(default=True, metadata={"help": "refit consumers of pruned channels by least squares on calibration data"})
    refit_stages: int = field(default=0, metadata={"help": "0: refit level by level (each layer sees its refit predecessors); "
                                                                "N: merge levels into at most N stages (faster, less exact)"})
    samples: int = field(default=16, metadata={"help": "calibration samples used for statistics and refit"})
    positions: int = field(default=256, metadata={"help": "output positions sampled per sample for conv refit"})
    ridge: float = field(default=0.1, metadata={"help": "smallest ridge strength tried (x1, x10, x100; picked on held-out samples), relative to the mean diagonal of X^T X; the ridge pulls towards the unrefit weights"})
    refit_max_dim: int = field(default=2304, metadata={"help": "skip the refit of consumers with more input features"})
    fold_constants: bool = field(default=True, metadata={"help": "fold constant channels into the consumer bias when exact"})
    latency: bool = field(default=True, metadata={"help": "measure onnxruntime CPU latency (1 thread) before and after"})
    group_ratios: list[str] = field(default_factory=list, metadata={
        "help": "importance mode: prune only these groups, each at its own ratio: PRODUCER=RATIO items (PRODUCER: "
                "the group's first producing node; the allocator of onnxshrink.pipeline.sensitivity sets them)"})


@register
class PrunePass(Pass):
    name = "prune"
    summary = "structured channel pruning: removes zero/constant channels exactly, or low-importance ones with a least-squares refit"
    lossless = True
    needs_data = False
    min_opset = 1
    Options = PruneOptions

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self.lossless = self.options.mode == "zeros"
        self.needs_data = self.options.mode == "importance"

    def weaker(self):
        if self.options.mode != "importance" or self.options.ratio * 0.6 < 0.04:
            return None
        return PrunePass(dataclasses.replace(self.options, ratio=round(self.options.ratio * 0.6, 4)))

    def describe_strength(self) -> str:
        return f"ratio={self.options.ratio:g}" if self.options.mode == "importance" else ""

    # ------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        t0 = time.perf_counter()
        samples = _samples(ctx, o.samples)
        input_shapes = _input_shapes(graph, samples)
        before = ctx.to_model(graph) if (o.mode == "importance" or o.latency) else None
        a = analyze(graph, input_shapes)
        groups = a.groups()
        blocked = a.blocked_units()
        free, fill = lossless_units(a, fold=o.fold_constants)
        removed = set(free)
        stats: dict = {"groups": len(groups), "prunable_groups": sum(g.prunable for g in groups),
                       "units": sum(g.units for g in groups),
                       "unprunable": [{"producers": g.producers[:4], "channels": g.channels, "reason": g.reason}
                                      for g in groups if not g.prunable],
                       "zero_units": len(free)}
        if o.mode == "importance":
            chan_stats = _sink_statistics(a, ctx, before, samples) if samples else {}
            scores = unit_scores(a, o.importance, chan_stats)
            chosen = _choose(a, groups, scores, set(free), blocked, o)
            if o.target_latency > 0 and samples:
                measure = _latency_probe(ctx, before, a.n, input_shapes, samples[0], free)
                chosen, stats["target_latency"] = _choose_for_macs(a, groups, scores, set(free), blocked, o, before,
                                                                   samples, input_shapes, measure)
            elif o.target_macs > 0 and samples:
                chosen, stats["target_macs"] = _choose_for_macs(a, groups, scores, set(free), blocked, o, before,
                                                                samples, input_shapes)
            removed |= chosen
            if o.compensate and chan_stats:
                for k, s in enumerate(a.sinks):
                    st = chan_stats.get(s.node.inputs[0].name)
                    if st is None or s.kind == "convtranspose":
                        continue
                    mean = st[0]
                    fill[k] = np.where(np.isnan(fill[k]), mean, fill[k]) if k in fill else mean
        removed = _feasible(a, removed, {**scores, **{u: -np.inf for u in free}} if o.mode == "importance" else None)
        if not removed:
            stats["reason"] = "no removable channels" if o.mode == "zeros" else "nothing to prune"
            return PassResult(graph, False, stats)
        info = remove_units(a, graph, removed, fill)
        stats["removed_units"] = len(removed)
        stats["removed_channels"] = int(info["removed_channels"])
        stats["per_group"] = _per_group(a, groups, removed)
        if o.mode == "importance" and o.refit and samples:
            stats["refit"] = refit_consumers(a, graph, ctx, before, samples, info, o)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        after = ctx.to_model(graph)
        _cost_stats(stats, before or None, after, input_shapes, samples, o.latency)
        return PassResult(graph, True, stats)


# ---------------------------------------------------------------------- helpers


def _samples(ctx: Context, n: int) -> list:
    src = getattr(ctx, "calib", None)
    if src is None:
        return []
    out = []
    try:
        for i in range(min(n, len(src))):
            out.append(src.get(i))
    except TypeError:
        for i, s in enumerate(src):
            if i >= n:
                break
            out.append(s)
    return out


def _input_shapes(graph: gs.Graph, samples: list) -> dict | None:
    if not samples:
        return None
    dyn = {}
    for t in graph.inputs:
        if t.name in samples[0] and (t.shape is None or any(not isinstance(d, int) for d in t.shape)):
            dyn[t.name] = list(samples[0][t.name].shape)
    return dyn or None


def _sink_foldable(s) -> bool:
    if const_value(s.node.inputs[1]) is None:
        return False
    if s.kind == "conv":
        w = const_value(s.node.inputs[1])
        return _conv_pads_zero(s.node, w.shape[2:])
    return s.kind in ("gemm", "matmul")


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


def _feasible(a: ChannelAnalysis, removed: set, scores: dict | None = None) -> set:
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


def _private_const(node: gs.Node, slot: int, values: np.ndarray, cache: dict, key=None) -> gs.Constant:
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


def _sink_bias_delta(s, w: np.ndarray, pos: np.ndarray, vals: np.ndarray) -> np.ndarray | None:
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


def remove_units(a: ChannelAnalysis, graph: gs.Graph, removed: set, fill: dict | None = None) -> dict:
    """Remove the units ``removed`` from ``graph`` in place: fold ``fill`` (per sink, the value of
    each input position, NaN: none) of removed positions into consumer biases, slice every member,
    rewrite shape constants and attributes. Returns {'removed_channels', 'out_keep': node name ->
    kept output mask, 'in_keep': node name -> kept input mask}."""
    rem = np.fromiter(removed, dtype=np.int64)
    fill = fill or {}
    cache: dict = {}
    out_keep, in_keep = {}, {}
    extra_members: list[Member] = []
    # 1. bias folding
    for k, s in enumerate(a.sinks):
        gone = np.isin(a.unit_of(s.ids), rem)
        in_keep[s.node.name] = ~gone
        if not gone.any() or k not in fill:
            continue
        vals = np.nan_to_num(np.asarray(fill[k], np.float64)[gone], nan=0.0)
        pos = np.nonzero(gone)[0]
        if not np.any(vals != 0):
            continue
        w = const_value(s.node.inputs[1])
        if w is None:
            continue
        delta = _sink_bias_delta(s, w.astype(np.float64), pos, vals)
        if delta is None:
            continue
        n = s.node
        out_member = next((m for m in a.members if m.node is n and m.slot == 1 and m.role == "out"), None)
        if s.kind == "conv":
            if len(n.inputs) > 2 and n.inputs[2].name:
                b = const_value(n.inputs[2]).astype(np.float64)
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
                c = const_value(n.inputs[2]).astype(np.float64)
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
        elif s.kind == "matmul":
            y = n.outputs[0]
            mid = gs.Variable(f"{y.name}_nobias", dtype=y.dtype)
            n.outputs[0] = mid
            add = gs.Node("Add", f"{n.name}_bias", inputs=[mid, gs.Constant(f"{n.name}_bias_pruned", delta.astype(w.dtype))],
                          outputs=[y])
            graph.nodes.append(add)
            if out_member is not None:
                extra_members.append(Member(add, 1, 0, out_member.ids, "out", "matmul_b"))
    # 2. slice members
    by_slot: dict = {}
    removed_channels = 0
    for m in list(a.members) + extra_members:
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
        v = const_value(t)
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
    # 3. shape constants and attributes
    for f in a.fixups:
        n = f.node
        if f.kind == "reshape":
            lay = f.layouts[0]
            kept = ~np.isin(a.unit_of(lay.ids), rem)
            counts = [int(np.any(np.moveaxis(kept, k, 0).reshape(kept.shape[k], -1), axis=1).sum())
                      for k in range(kept.ndim)]
            if int(np.prod(counts)) != int(kept.sum()):
                raise RuntimeError(f"Reshape '{n.name}': removal is not rectangular")
            spec = const_value(n.inputs[1]).copy()
            for k, ax in enumerate(lay.axes):
                if spec[ax] != -1:
                    spec[ax] = counts[k]
            _private_const(n, 1, spec, cache)
        elif f.kind == "split":
            sizes = np.array([int((~np.isin(a.unit_of(p.ids), rem)).sum()) for p in f.layouts], np.int64)
            if len(n.inputs) > 1 and n.inputs[1].name:
                _private_const(n, 1, sizes, cache)
            elif "split" in n.attrs or int(a._opset) < 13:
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
                st = const_value(n.inputs[1]).copy()
                en = const_value(n.inputs[2]).copy()
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
            sizes = const_value(n.inputs[3]).copy()
            sizes[x.axes[0]] = int((~np.isin(a.unit_of(x.ids), rem)).sum())
            _private_const(n, 3, sizes, cache)
    # 4. stale intermediate shapes would contradict the new channel counts
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None
    graph.cleanup().toposort()
    return {"removed_channels": removed_channels, "out_keep": out_keep, "in_keep": in_keep}


# ---------------------------------------------------------------------- importance


def _sink_statistics(a: ChannelAnalysis, ctx: Context, model: onnx.ModelProto, samples: list) -> dict:
    """{sink input tensor: (mean, mean square) per channel} over calibration samples."""
    names = sorted({s.node.inputs[0].name for s in a.sinks if s.kind in ("conv", "gemm", "matmul", "convtranspose")})
    if not names:
        return {}
    axis = {}
    for s in a.sinks:
        axis[s.node.inputs[0].name] = -1 if s.kind == "matmul" else 1
    acc: dict = {}
    for vals in ctx.capture(model, names, samples):
        for nm, x in vals.items():
            x = np.moveaxis(np.asarray(x, np.float64), axis[nm], 0).reshape(x.shape[axis[nm]], -1)
            s1, s2, c = acc.get(nm, (0.0, 0.0, 0))
            acc[nm] = (s1 + x.sum(axis=1), s2 + (x * x).sum(axis=1), c + x.shape[1])
    return {nm: (s1 / c, s2 / c) for nm, (s1, s2, c) in acc.items()}


def unit_scores(a: ChannelAnalysis, kind: str, chan_stats: dict | None = None) -> dict:
    """Importance of each unit (higher: keep). Each contributing layer is normalised by its mean."""
    scores: dict = {}

    def add(ids, vals):
        vals = np.asarray(vals, np.float64)
        mu = vals.mean() if vals.size and vals.mean() > 0 else 1.0
        for u, v in zip(a.unit_of(ids).tolist(), (vals / mu).tolist()):
            scores[u] = scores.get(u, 0.0) + v

    if kind == "activation" and chan_stats:
        for s in a.sinks:
            st = chan_stats.get(s.node.inputs[0].name)
            w = const_value(s.node.inputs[1])
            if st is None or w is None or s.w_member is None:
                continue
            if s.kind == "conv" and s.group > 1:  # column j of group g: the rows of group g only
                G = s.group
                wg = w.astype(np.float64).reshape(G, w.shape[0] // G, w.shape[1], -1)
                wn = np.sqrt((wg * wg).sum(axis=(1, 3))).ravel()
            else:
                wa = np.moveaxis(w.astype(np.float64), s.w_member.axis, 0).reshape(w.shape[s.w_member.axis], -1)
                wn = np.sqrt((wa * wa).sum(axis=1))
            rms = np.sqrt(np.maximum(st[1], 0))
            if rms.size != wn.size:
                continue
            add(s.ids, rms * wn)
        if scores:
            return scores
    if kind == "bn":
        for m in a.members:
            if m.tag == "bn_scale":
                g = const_value(m.node.inputs[1]).astype(np.float64)
                var = const_value(m.node.inputs[4]).astype(np.float64)
                add(m.ids, np.abs(g) / np.sqrt(var + float(m.node.attrs.get("epsilon", 1e-5))))
        if scores:
            # units without a BN fall back to their filter norm
            rest = unit_scores(a, "l2")
            for u, v in rest.items():
                scores.setdefault(u, v)
            return scores
    p = 1 if kind == "l1" else 2
    for m in a.members:
        if m.role != "out" or m.slot != 1:
            continue
        w = const_value(m.node.inputs[1])
        if w is None:
            continue
        wa = np.moveaxis(np.abs(w.astype(np.float64)), m.axis, 0).reshape(w.shape[m.axis], -1)
        add(m.ids, (wa ** p).sum(axis=1) ** (1.0 / p))
    return scores


def _choose(a: ChannelAnalysis, groups, scores: dict, free: set, blocked: dict, o: PruneOptions) -> set:
    """Units to remove by importance: per group (layer scope) or globally."""
    chosen = set()
    cand = []
    fixed = {k: float(v) for k, _, v in (str(it).rpartition("=") for it in o.group_ratios)} if o.group_ratios else None
    for g in groups:
        if not g.prunable or g.units < 2:
            continue
        ratio = o.ratio if fixed is None else fixed.get(g.producers[0], 0.0)
        if ratio <= 0:
            continue
        us = [u for u in g.unit_labels if u not in blocked]
        sc = np.array([(-np.inf if u in free else scores.get(u, 0.0)) for u in us])
        n = len(us)
        if o.scope == "layer" or fixed is not None:
            keep = _round_keep(n - int(np.floor(ratio * n)), n, o.multiple_of)
            chosen |= _lowest(a, g, us, sc, n - keep)
        else:
            fin = sc[np.isfinite(sc)]
            med = np.median(fin) if fin.size and np.median(fin) > 0 else 1.0
            cand.append((g, us, sc / med))
    if o.scope == "global" and cand:
        allsc = np.concatenate([c[2] for c in cand])
        total = allsc.size
        thr = np.sort(allsc)[max(0, min(total - 1, int(np.floor(o.ratio * total)) - 1))]
        for g, us, sc in cand:
            n = len(us)
            drop = int((sc <= thr).sum())
            keep = max(n - drop, int(np.ceil(o.min_keep * n)), 1)
            keep = _round_keep(keep, n, o.multiple_of)
            chosen |= _lowest(a, g, us, sc, n - keep)
    return chosen


def _lowest(a: ChannelAnalysis, g, us: list, sc, k: int) -> set:
    """The ``k`` units of ``us`` with the lowest scores ``sc``; in a group with balance
    constraints (grouped convs), the largest balanced subset of at most ``k`` of them."""
    if k <= 0:
        return set()
    if not getattr(g, "balances", 0):
        order = np.argsort(sc, kind="stable")
        return {us[i] for i in order[:k]}
    return balanced_selection(a, us, dict(zip(us, np.asarray(sc, np.float64).tolist())), k)


def _choose_for_macs(a: ChannelAnalysis, groups, scores: dict, free: set, blocked: dict, o: PruneOptions,
                     model: onnx.ModelProto, samples: list, input_shapes, measure=None) -> tuple[set, dict]:
    """Per-group ratios by measured sensitivity: each prunable group's candidate removal (its
    lowest-importance units at ``ratio`` and at 2 x ``ratio``) is simulated by zeroing the units'
    filters in a copy of the model; its output error (1 - cosine on a few calibration samples)
    per MAC saved ranks the candidates, and the cheapest are taken (one level per group) until
    the estimated MACs reach ``target_macs`` of the input's. With ``measure`` (removal set ->
    measured latency in ms), the same greedy path is followed to its end and the shortest prefix
    meeting ``target_latency`` is found by bisection on measured latencies."""
    from onnxshrink.graph.cost import model_cost
    from onnxshrink.metrics import fidelity
    from onnxshrink.runtime import make_session
    shapes = input_shapes or {k: list(v.shape) for k, v in samples[0].items()}
    per_node = model_cost(model, shapes)["per_node"]
    total = float(sum(per_node.values())) or 1.0
    evals = samples[: min(4, len(samples))]
    names = [x.name for x in make_session(model, optimize=True).get_outputs()]
    ref = [make_session(model, optimize=True).run(names, s) for s in evals]
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    cands = []
    for g in groups:
        if not g.prunable or g.units < 2:
            continue
        us = [u for u in g.unit_labels if u not in blocked]
        sc = np.array([(-np.inf if u in free else scores.get(u, 0.0)) for u in us])
        for level, r in enumerate((o.ratio, min(0.9, 2 * o.ratio))):
            keep = _round_keep(len(us) - int(np.floor(r * len(us))), len(us), o.multiple_of)
            drop = _lowest(a, g, us, sc, len(us) - keep)
            if not drop:
                continue
            rem = np.fromiter(drop, dtype=np.int64)
            saved = 0.0
            fracs: dict = {}
            m = onnx.ModelProto()
            m.CopyFrom(model)
            for mem in a.members:
                hit = np.isin(a.unit_of(mem.ids), rem)
                if not hit.any():
                    continue
                if mem.slot == 1 and (mem.role in ("in", "out") or mem.tag == "dw_w"):  # weights, not biases
                    key = (mem.node.name, "in" if mem.role == "in" else "out")
                    fracs[key] = fracs.get(key, 0.0) + float(hit.mean())
                    saved += per_node.get(mem.node.name, 0) * float(hit.mean())
                tname = mem.node.inputs[mem.slot].name
                if mem.role == "out" and tname in inits:
                    t = m.graph.initializer[inits[tname]]
                    v = onnx.numpy_helper.to_array(t).copy()
                    idx = [slice(None)] * v.ndim
                    idx[mem.axis] = hit
                    v[tuple(idx)] = 0
                    t.CopyFrom(onnx.numpy_helper.from_array(v, tname))
            if saved <= 0:
                continue
            sess = make_session(m, optimize=True)
            fid = fidelity(ref, [sess.run(names, s) for s in evals])
            err = max(0.0, 1.0 - fid.get("cosine", 0.0))
            cands.append((err / saved, g.id, level, drop, fracs, err))
    cands.sort(key=lambda c: c[0])

    def macs_of(removed: dict) -> float:
        # a layer's MACs scale with the kept fractions of its input and output channels
        tot = 0.0
        for node, base in per_node.items():
            tot += base * max(0.0, 1 - removed.get((node, "in"), 0.0)) * max(0.0, 1 - removed.get((node, "out"), 0.0))
        return tot

    chosen, used, removed = set(free), {}, {}
    macs = macs_of(removed)
    steps = [(set(chosen), macs, 0)]  # the greedy path: removal set, estimated MACs, groups pruned
    for score, gid, level, drop, fracs, err in cands:
        if measure is None and macs <= o.target_macs * total:
            break
        if gid in used:
            if used[gid][0] >= level:
                continue
            for k, v in used[gid][1].items():  # replace the lighter level of this group
                removed[k] -= v
            chosen -= used[gid][2]
        for k, v in fracs.items():
            removed[k] = removed.get(k, 0.0) + v
        chosen |= drop
        used[gid] = (level, fracs, drop)
        macs = macs_of(removed)
        steps.append((set(chosen), macs, len(used)))
    if measure is None:
        info = {"target": o.target_macs, "estimated_fraction": round(macs / total, 4),
                "groups_pruned": len(used), "candidates": len(cands)}
        return chosen, info
    # target_latency: the shortest prefix of the greedy path whose pruned model, measured on
    # onnxruntime (1 thread, median), is at most target_latency of the input's latency
    base = measure(set(free))
    goal = o.target_latency * base
    seen: dict = {}

    def lat(k):
        if k not in seen:
            seen[k] = measure(steps[k][0])
        return seen[k]

    lo, hi = 0, len(steps) - 1
    if lat(hi) > goal:
        k = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if lat(mid) <= goal:
                hi = mid
            else:
                lo = mid
        k = hi
    chosen, macs, n_groups = steps[k]
    info = {"target_latency": o.target_latency, "latency_ms_input": round(base, 3), "latency_ms_chosen": round(lat(k), 3),
            "reached": lat(k) <= goal, "estimated_macs_fraction": round(macs / total, 4), "groups_pruned": n_groups,
            "candidates": len(cands), "latency_measurements": len(seen) + 1}
    return chosen, info


def _latency_probe(ctx: Context, model: onnx.ModelProto, n_ids: int, input_shapes, feeds: dict, free: set):
    """A function: removal set -> onnxruntime CPU latency (ms, 1 thread, median of 10) of
    ``model`` with those units removed (a fresh import and analysis of the same model gives the
    same channel ids and unit labels)."""
    from onnxshrink.runtime import measure_latency

    def measure(chosen: set) -> float:
        g = gs.import_onnx(model)
        a2 = analyze(g, input_shapes)
        if a2.n != n_ids:
            raise RuntimeError("re-analysis gave different channel ids")
        rem = _feasible(a2, set(chosen), {u: -np.inf for u in free})
        if rem:
            remove_units(a2, g, rem, None)
        return measure_latency(ctx.to_model(g), feeds, runs=10, warmup=2, threads=1)

    return measure


def _round_keep(keep: int, n: int, m: int) -> int:
    keep = max(1, keep)
    if m > 1 and n >= m:
        keep = int(np.ceil(keep / m) * m)
    return min(keep, n)


def _per_group(a: ChannelAnalysis, groups, removed: set) -> list:
    out = []
    for g in groups:
        r = sum(1 for u in g.unit_labels if u in removed)
        if r:
            out.append({"producers": g.producers[:3], "units": g.units, "channels": g.channels, "removed_units": r})
    return out


# ---------------------------------------------------------------------- refit


def _conv_patches(x: np.ndarray, node: gs.Node, kshape, pos_idx: np.ndarray | None, out_hw):
    """im2col rows [N*P, C*kh*kw] of the conv input at output positions ``pos_idx`` (flat over Ho*Wo)."""
    pads = list(node.attrs.get("pads", [0] * 4)) or [0] * 4
    strides = list(node.attrs.get("strides", [1, 1])) or [1, 1]
    dil = list(node.attrs.get("dilations", [1, 1])) or [1, 1]
    kh, kw = kshape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ekh, ekw = dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (ekh, ekw), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]  # N C Ho Wo kh kw
    Ho, Wo = out_hw
    win = win[:, :, :Ho, :Wo]
    N, C = x.shape[:2]
    flat = win.reshape(N, C, Ho * Wo, kh, kw)
    if pos_idx is not None:
        flat = flat[:, :, pos_idx]
    return np.ascontiguousarray(flat.transpose(0, 2, 1, 3, 4)).reshape(-1, C * kh * kw)


def _refit_kind(node: gs.Node) -> str | None:
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and w.ndim == 4 \
            and str(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID", "b'NOTSET'"):
        return "conv"
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        return "gemm"
    if node.op == "MatMul" and w.ndim == 2:
        return "matmul"
    return None


def refit_consumers(a: ChannelAnalysis, graph: gs.Graph, ctx: Context, original: onnx.ModelProto,
                    samples: list, info: dict, o: PruneOptions) -> dict:
    """Least-squares refit of every consumer whose input lost channels (see the module docstring)."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    todo = []
    skipped = 0
    for name, keep in info["in_keep"].items():
        n = nodes.get(name)
        if n is None or keep.all():
            continue
        kind = _refit_kind(n)
        if kind is None:
            continue
        w = const_value(n.inputs[1])
        dim = int(np.prod(w.shape[1:])) if kind == "conv" else w.shape[0] if kind != "gemm" else (
            w.shape[1] if int(n.attrs.get("transB", 0)) else w.shape[0])
        if dim > o.refit_max_dim:
            skipped += 1
            continue
        todo.append(n)
    todo.sort(key=lambda n: order[n.name])
    res = {"refit": 0, "kept_old": 0, "skipped_dim": skipped, "layers": []}
    if not todo:
        return res
    # stages by dependency level: no layer is refit together with one upstream of it, so each
    # layer is fit to inputs that already come from its refit predecessors
    level = _refit_levels(graph, {n.name for n in todo})
    by_level: dict = {}
    for n in todo:
        by_level.setdefault(level[n.name], []).append(n)
    keys = sorted(by_level)
    if o.refit_stages > 0 and len(keys) > o.refit_stages:
        # merge consecutive levels (approximate: later layers of a stage see unrefit predecessors)
        chunks = np.array_split(np.arange(len(keys)), o.refit_stages)
        stages_list = [[n for k in c for n in by_level[keys[k]]] for c in chunks]
    else:
        stages_list = [by_level[k] for k in keys]
    res["stages"] = len(stages_list)
    rng = np.random.default_rng(0)
    # targets once: sampled rows of the unpruned model's outputs (kept channels), float32
    targets: dict = {n.name: [] for n in todo}
    plan: dict = {n.name: [] for n in todo}
    for s_orig in ctx.capture(original, [n.outputs[0].name for n in todo], samples):
        for n in todo:
            Y, pos = _target_rows(n, s_orig[n.outputs[0].name], info["out_keep"].get(n.name), o.positions, rng)
            targets[n.name].append(Y)
            plan[n.name].append(pos)
    n_hold = max(1, len(samples) // 4) if len(samples) >= 4 else 0
    stream = _StageStream(ctx.to_model(graph), [[n.name for n in st] for st in stages_list], samples)
    res["forward_nodes"] = 0
    for k, stage in enumerate(stages_list):
        acc = {n.name: None for n in stage}
        hold = {n.name: None for n in stage}
        for si, vals in enumerate(stream.inputs_of_stage(k, ctx.to_model(graph) if k else None)):
            target = hold if si >= len(samples) - n_hold else acc
            for n in stage:
                X = _input_rows(n, vals[n.inputs[0].name], plan[n.name][si], targets[n.name][si].shape[0])
                Y = targets[n.name][si]
                A, B, yy = target[n.name] or (0.0, 0.0, 0.0)
                target[n.name] = (A + (X.T @ X).astype(np.float64), B + (X.T @ Y).astype(np.float64),
                                  yy + float(np.sum(Y.astype(np.float64) ** 2)))
        for n in stage:
            if acc[n.name] is None:
                continue
            kind = _refit_kind(n)
            theta_old = _current_theta(n, kind)
            Ah, Bh, yyh = hold[n.name] if hold[n.name] is not None else acc[n.name]

            def err(t, A_=Ah, B_=Bh, yy_=yyh):
                return yy_ - 2 * float(np.sum(t * B_)) + float(np.sum(t * (A_ @ t)))

            lams = [o.ridge * 10] if hold[n.name] is None else [o.ridge, o.ridge * 10, o.ridge * 100]
            best, best_e, best_lam = None, None, None
            for lam, theta in zip(lams, _ridge_solutions(acc[n.name][0], acc[n.name][1], kind != "matmul", lams,
                                                         theta_old)):
                e = err(theta)
                if best_e is None or e < best_e:
                    best, best_e, best_lam = theta, e, lam
            e_old = err(theta_old)
            res["layers"].append({"node": n.name, "dim": int(acc[n.name][0].shape[0]), "ridge": best_lam,
                                  "err_before": e_old / max(yyh, 1e-30), "err_after": best_e / max(yyh, 1e-30)})
            if best_e < e_old:
                _write_theta(n, kind, best, graph)
                res["refit"] += 1
            else:
                res["kept_old"] += 1
    res["forward_nodes"] = stream.nodes_run
    return res


def _ridge_solutions(A: np.ndarray, B: np.ndarray, bias: bool, lams: list, prior: np.ndarray | None = None):
    """Ridge least-squares solutions [W; b] of the accumulated normal equations (A = sum X~^T X~,
    B = sum X~^T Y, X~ = [X 1] when ``bias``), one per strength in ``lams`` (relative to the mean
    diagonal), pulled towards the current weights W0 (``prior``, [W0; b0]) rather than towards 0,
    so a strong ridge falls back to the unrefit layer instead of shrinking it. The bias is not
    penalised: with n rows, s_x = sum X, s_y = sum Y,
        C = A_xx - s_x s_x^T / n,  D = B_x - s_x s_y^T / n      (centred statistics)
        W = (C + lam I)^-1 (D + lam W0)  (float64 Cholesky),   b = (s_y - s_x^T W) / n."""
    if bias:
        n = A[-1, -1]
        sx, sy = A[:-1, -1], B[-1]
        C = A[:-1, :-1] - np.outer(sx, sx) / n
        D = B[:-1] - np.outer(sx, sy) / n
    else:
        C, D = A, B
    d = C.shape[0]
    scale = float(np.trace(C)) / max(d, 1) or 1.0
    W0 = np.zeros_like(D) if prior is None else prior[:d]
    for lam in lams:
        reg = C.copy()
        reg[np.arange(d), np.arange(d)] += lam * scale
        rhs = D + (lam * scale) * W0
        try:
            from scipy.linalg import solve_triangular
            L = np.linalg.cholesky(reg)
            W = solve_triangular(L.T, solve_triangular(L, rhs, lower=True, check_finite=False), lower=False,
                                 check_finite=False)
        except Exception:  # no scipy, or not positive definite in float64
            try:
                W = np.linalg.solve(reg, rhs)
            except np.linalg.LinAlgError:
                W = np.linalg.lstsq(reg, rhs, rcond=None)[0]
        yield np.vstack([W, ((sy - sx @ W) / n)[None]]) if bias else W


class _StageStream:
    """Inputs of each refit stage on every sample, computing every node once overall.

    Stage k's layers must see inputs produced by the already refit stages < k, so the sample
    activations are streamed stage by stage: a tensor's level is the highest stage of the refit
    layers upstream of it (-1: none); pass k runs, from the frontier F(k-1) kept in memory, only
    the nodes needed for stage k's inputs and for F(k) = the tensors of level < k that a later
    node still reads. onnxruntime computes every node of a model whatever is fetched, so this is
    what keeps the cost at about one forward pass instead of one per stage."""

    def __init__(self, model: onnx.ModelProto, stages: list, samples: list):
        g = model.graph
        self.model = model
        self.stages = stages
        self.samples = samples
        self.nodes_run = 0
        self.inits = {t.name for t in g.initializer}
        self.prod = {}
        for i, n in enumerate(g.node):
            for o in n.output:
                self.prod[o] = i
        stage_of = {nm: k for k, st in enumerate(stages) for nm in st}
        self.lvl = {t.name: -1 for t in g.input}
        node_lvl = []
        for n in g.node:
            lv = max([self.lvl.get(t, -1) for t in n.input if t], default=-1)
            lv = max(lv, stage_of.get(n.name, -1))
            node_lvl.append(lv)
            for o in n.output:
                self.lvl[o] = lv
        # nodes some stage input depends on
        by_name = {n.name: n for n in g.node}
        need = set()
        todo = [by_name[nm].input[0] for st in stages for nm in st]
        while todo:
            t = todo.pop()
            i = self.prod.get(t)
            if i is None or i in need:
                continue
            need.add(i)
            todo.extend(x for x in g.node[i].input if x and x not in self.inits)
        self.need = need
        # last stage at which each activation is read by a needed node of a later level
        self.read_until = {}
        for i in need:
            for t in g.node[i].input:
                if t and t not in self.inits:
                    self.read_until[t] = max(self.read_until.get(t, -1), node_lvl[i])
        for st in stages:
            for nm in st:
                t = by_name[nm].input[0]
                self.read_until[t] = max(self.read_until.get(t, -1), stage_of[nm])
        self.stage_inputs = [[by_name[nm].input[0] for nm in st] for st in stages]
        self.types = {}
        try:
            inf = onnx.shape_inference.infer_shapes(model)
            for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        except Exception:
            pass
        self.frontier = [dict(s) for s in samples]

    def inputs_of_stage(self, k: int, model: onnx.ModelProto | None):
        """Yield, per sample, {input tensor of a stage-k layer: value}; ``model`` is the current
        (partly refit) model (None: unchanged since the stream was built)."""
        from onnxshrink.runtime import make_session
        have = set(self.frontier[0])
        # frontier after this pass: tensors of level < k still read at level >= k
        keep = {t for t, last in self.read_until.items() if self.lvl.get(t, 99) < k and last >= k}
        want = list(dict.fromkeys(self.stage_inputs[k] + sorted(keep - have)))
        fetch = [t for t in want if t not in have]
        sess = None
        if fetch:
            if model is not None:
                self.model = model
            sub, feeds = self._submodel(self.model, fetch, have)
            sess = make_session(sub, optimize=False)
        for si in range(len(self.samples)):
            cur = self.frontier[si]
            if sess is not None:
                out = sess.run(fetch, {t: cur[t] for t in feeds})
                cur.update(zip(fetch, out))
            yield {t: cur[t] for t in self.stage_inputs[k]}
            for t in list(cur):
                if t not in keep:
                    del cur[t]

    def _submodel(self, model: onnx.ModelProto, outputs: list, have: set):
        g = model.graph
        prod = {o: i for i, n in enumerate(g.node) for o in n.output}
        nodes, feeds = set(), set()
        todo = list(outputs)
        while todo:
            t = todo.pop()
            if t in have:
                feeds.add(t)
                continue
            i = prod.get(t)
            if i is None or i in nodes:
                continue
            nodes.add(i)
            todo.extend(x for x in g.node[i].input if x)
        self.nodes_run += len(nodes)
        used = {x for i in nodes for x in g.node[i].input}
        sample = self.frontier[0]

        def vi(name, arr=None):
            et = self.types.get(name) or (onnx.helper.np_dtype_to_tensor_dtype(arr.dtype) if arr is not None
                                          else onnx.TensorProto.FLOAT)
            return onnx.helper.make_tensor_value_info(name, et, None)

        sg = onnx.helper.make_graph([g.node[i] for i in sorted(nodes)], "refit_stage",
                                    [vi(t, np.asarray(sample[t])) for t in sorted(feeds)],
                                    [vi(t) for t in outputs],
                                    initializer=[t for t in g.initializer if t.name in used])
        m = onnx.helper.make_model(sg, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        return m, sorted(feeds)


def _refit_levels(graph: gs.Graph, names: set) -> dict:
    """Level of each node among the refit nodes ``names``: 0 when no refit node is upstream,
    else 1 + the highest level upstream."""
    depth: dict = {}  # refit nodes on the longest path ending at (and including) the node
    for n in graph.nodes:  # topological order
        up = max((depth.get(p.name, 0) for t in n.inputs for p in t.inputs), default=0)
        depth[n.name] = up + (1 if n.name in names else 0)
    return {k: depth[k] - 1 for k in names if k in depth}


def _target_rows(n: gs.Node, y, keep, positions: int, rng):
    """Regression targets of one sample (kept output channels of the unpruned model's output) and
    the sampled output positions (conv; None: all)."""
    kind = _refit_kind(n)
    y = np.asarray(y, np.float32)
    pos = None
    if kind == "conv":
        if keep is not None:
            y = y[:, keep]
        HW = y.shape[2] * y.shape[3]
        if positions < HW:
            pos = np.sort(rng.choice(HW, size=positions, replace=False))
        Y = y.reshape(y.shape[0], y.shape[1], -1)
        Y = (Y[:, :, pos] if pos is not None else Y).transpose(0, 2, 1).reshape(-1, y.shape[1])
        return np.ascontiguousarray(Y), (pos, (y.shape[2], y.shape[3]))
    Y = y.reshape(-1, y.shape[-1])
    if keep is not None:
        Y = Y[:, keep]
    return np.ascontiguousarray(Y), None


def _input_rows(n: gs.Node, x, plan, rows: int):
    """Regression inputs of one sample (im2col patches for convs), with a ones column except for
    MatMul (no bias)."""
    kind = _refit_kind(n)
    x = np.asarray(x, np.float32)
    if kind == "conv":
        w = const_value(n.inputs[1])
        pos, hw = plan
        X = _conv_patches(x, n, w.shape[2:], pos, hw)
    else:
        X = x.reshape(-1, x.shape[-1])
    if kind != "matmul":
        X = np.concatenate([X, np.ones((X.shape[0], 1), np.float32)], axis=1)
    return X


def _current_theta(n: gs.Node, kind: str) -> np.ndarray:
    w = const_value(n.inputs[1]).astype(np.float64)
    b = const_value(n.inputs[2]).astype(np.float64) if len(n.inputs) > 2 and n.inputs[2].name else None
    if kind == "conv":
        wm = w.reshape(w.shape[0], -1).T
        bb = np.zeros(w.shape[0]) if b is None else b
        return np.vstack([wm, bb[None]])
    if kind == "gemm":
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        wk = (w.T if int(n.attrs.get("transB", 0)) else w) * alpha
        N = wk.shape[1]
        bb = np.zeros(N) if b is None else np.broadcast_to(b.reshape(-1) if b.size == N else b.reshape(-1)[:1], (N,)) * beta
        return np.vstack([wk, bb[None]])
    return w


def _write_theta(n: gs.Node, kind: str, theta: np.ndarray, graph: gs.Graph) -> None:
    w = const_value(n.inputs[1])
    dt = w.dtype
    if kind == "conv":
        W = theta[:-1].T.reshape(w.shape).astype(dt)
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", W)
        b = theta[-1].astype(dt)
        if len(n.inputs) > 2 and n.inputs[2].name:
            n.inputs[2] = gs.Constant(f"{n.inputs[2].name}_refit", b)
        else:
            while len(n.inputs) < 2:
                n.inputs.append(gs.Variable.empty())
            n.inputs.append(gs.Constant(f"{n.name}_bias_refit", b))
    elif kind == "gemm":
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        wk = theta[:-1] / alpha
        W = (wk.T if int(n.attrs.get("transB", 0)) else wk).astype(dt)
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", W)
        if len(n.inputs) > 2 and n.inputs[2].name:
            c = const_value(n.inputs[2])
            shape = c.shape if c.size == theta.shape[1] else (theta.shape[1],)
            n.inputs[2] = gs.Constant(f"{n.inputs[2].name}_refit", (theta[-1] / beta).reshape(shape).astype(dt))
        else:
            n.attrs["beta"] = 1.0
            n.inputs.append(gs.Constant(f"{n.name}_bias_refit", theta[-1].astype(dt)))
    else:
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", theta.astype(dt))
    graph.cleanup()


# ---------------------------------------------------------------------- costs


def _cost_stats(stats: dict, before, after, input_shapes, samples, latency: bool) -> None:
    from onnxshrink.graph.cost import model_cost
    shapes = input_shapes or ({k: list(v.shape) for k, v in samples[0].items()} if samples else None)
    try:
        ca = model_cost(after, shapes)
        stats["params_after"], stats["macs_after"] = ca["params"], ca["macs"]
        if before is not None:
            cb = model_cost(before, shapes)
            stats["params_before"], stats["macs_before"] = cb["params"], cb["macs"]
    except Exception as e:  # costs are informative; never fail the pass on them
        stats["cost_error"] = str(e)[:200]
    if latency and before is not None and samples:
        from onnxshrink.runtime import measure_latency
        try:
            stats["latency_ms_before"] = round(measure_latency(before, samples[0], runs=10, warmup=2), 3)
            stats["latency_ms_after"] = round(measure_latency(after, samples[0], runs=10, warmup=2), 3)
        except Exception as e:
            stats["latency_error"] = str(e)[:200]
