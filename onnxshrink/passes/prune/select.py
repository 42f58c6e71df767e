"""Which channel units to remove by importance.

Scores (higher: keep), each contributing layer normalised by its mean:
    l1 / l2:     norm of the unit's producing filters
    bn:          |gamma| / sqrt(var + eps) of the BatchNormalization after it
    activation:  sum over consumers of sqrt(E[x_p^2]) * ||W[:, p]||_2 on calibration data
``choose_units`` removes the lowest ``ratio`` of every group (or globally after normalising
scores by the group's median); kept counts are rounded up to ``multiple_of``.

``choose_for_target`` picks per-group ratios by measured sensitivity: each group's candidate
removal (``ratio`` and 2 x ``ratio``) is simulated by zeroing its filters in a copy; candidates
are ranked by output error (1 - cosine) per MAC saved and taken until
    MACs = sum_layers MACs_l * (1 - removed_in_l) * (1 - removed_out_l) <= target_macs * MACs_0.
For ``target_latency`` it follows the same greedy path and bisects on it for the shortest prefix
whose pruned model's measured onnxruntime CPU latency (1 thread, median) is <= target_latency x
the input's (about log2(#candidates) measurements, ``latency_probe``).
"""

from __future__ import annotations

__all__ = ["sink_statistics", "unit_scores", "choose_units", "choose_for_target", "latency_probe"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels import ChannelAnalysis, analyze, balanced_selection
from onnxshrink.graph.cost import model_cost
from onnxshrink.graph.values import constant_value
from onnxshrink.metrics import fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.prune.remove import feasible, remove_units


def sink_statistics(a: ChannelAnalysis, ctx: Context, model: onnx.ModelProto, samples: list) -> dict:
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
            w = constant_value(s.node.inputs[1], numeric_attrs=True)
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
                g = constant_value(m.node.inputs[1], numeric_attrs=True).astype(np.float64)
                var = constant_value(m.node.inputs[4], numeric_attrs=True).astype(np.float64)
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
        w = constant_value(m.node.inputs[1], numeric_attrs=True)
        if w is None:
            continue
        wa = np.moveaxis(np.abs(w.astype(np.float64)), m.axis, 0).reshape(w.shape[m.axis], -1)
        add(m.ids, (wa ** p).sum(axis=1) ** (1.0 / p))
    return scores


def choose_units(a: ChannelAnalysis, groups: list, scores: dict, free: set, blocked: dict, *, ratio: float,
                 scope: str, multiple_of: int, min_keep: float, group_ratios: dict) -> set:
    """Units to remove by importance: the lowest ``ratio`` of each prunable group (``scope`` "layer",
    or each group named in ``group_ratios`` {producer: ratio} at its own ratio), or of all units by
    score normalised by the group's median (``scope`` "global", at least ``min_keep`` of each group
    kept); kept counts rounded up to ``multiple_of``. ``free`` (lossless) units go first."""
    chosen = set()
    cand = []
    fixed = group_ratios or None
    for g in groups:
        if not g.prunable or g.units < 2:
            continue
        group_ratio = ratio if fixed is None else fixed.get(g.producers[0], 0.0)
        if group_ratio <= 0:
            continue
        us = [u for u in g.unit_labels if u not in blocked]
        sc = np.array([(-np.inf if u in free else scores.get(u, 0.0)) for u in us])
        n = len(us)
        if scope == "layer" or fixed is not None:
            keep = _round_keep(n - int(np.floor(group_ratio * n)), n, multiple_of)
            chosen |= _lowest(a, g, us, sc, n - keep)
        else:
            fin = sc[np.isfinite(sc)]
            med = np.median(fin) if fin.size and np.median(fin) > 0 else 1.0
            cand.append((g, us, sc / med))
    if scope == "global" and cand:
        allsc = np.concatenate([c[2] for c in cand])
        total = allsc.size
        thr = np.sort(allsc)[max(0, min(total - 1, int(np.floor(ratio * total)) - 1))]
        for g, us, sc in cand:
            n = len(us)
            drop = int((sc <= thr).sum())
            keep = max(n - drop, int(np.ceil(min_keep * n)), 1)
            keep = _round_keep(keep, n, multiple_of)
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


def choose_for_target(a: ChannelAnalysis, groups: list, scores: dict, free: set, blocked: dict, model: onnx.ModelProto,
                      samples: list, input_shapes, *, ratio: float, multiple_of: int, target_macs: float,
                      target_latency: float, measure=None) -> tuple[set, dict]:
    """Per-group ratios by measured sensitivity: each prunable group's candidate removal (its
    lowest-importance units at ``ratio`` and at 2 x ``ratio``) is simulated by zeroing the units'
    filters in a copy of the model; its output error (1 - cosine on a few calibration samples)
    per MAC saved ranks the candidates, and the cheapest are taken (one level per group) until
    the estimated MACs reach ``target_macs`` of the input's. With ``measure`` (removal set ->
    measured latency in ms), the same greedy path is followed to its end and the shortest prefix
    meeting ``target_latency`` is found by bisection on measured latencies."""
    from onnxshrink.runtime import make_session
    shapes = input_shapes or {k: list(v.shape) for k, v in samples[0].items()}
    per_node = model_cost(model, shapes)["per_node"]
    total = float(sum(per_node.values())) or 1.0
    evals = samples[: min(4, len(samples))]
    names = [x.name for x in make_session(model, optimize=True).get_outputs()]
    ref = [make_session(model, optimize=True).run(names, s) for s in evals]
    cands = _sensitivity_candidates(a, groups, scores, free, blocked, model, per_node, names, ref, evals,
                                    ratio=ratio, multiple_of=multiple_of)

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
        if measure is None and macs <= target_macs * total:
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
        info = {"target": target_macs, "estimated_fraction": round(macs / total, 4),
                "groups_pruned": len(used), "candidates": len(cands)}
        return chosen, info
    # target_latency: the shortest prefix of the greedy path whose pruned model, measured on
    # onnxruntime (1 thread, median), is at most target_latency of the input's latency
    base = measure(set(free))
    goal = target_latency * base
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
    info = {"target_latency": target_latency, "latency_ms_input": round(base, 3), "latency_ms_chosen": round(lat(k), 3),
            "reached": lat(k) <= goal, "estimated_macs_fraction": round(macs / total, 4), "groups_pruned": n_groups,
            "candidates": len(cands), "latency_measurements": len(seen) + 1}
    return chosen, info


def _sensitivity_candidates(a: ChannelAnalysis, groups: list, scores: dict, free: set, blocked: dict,
                            model: onnx.ModelProto, per_node: dict, names: list, ref: list, evals: list, *,
                            ratio: float, multiple_of: int) -> list:
    """(error per MAC saved, group id, level, units, {(node, "in"/"out"): removed fraction}, error)
    of each group's removal at ``ratio`` (level 0) and 2 x ``ratio`` (level 1), sorted cheapest
    first: the output error is 1 - cosine against ``ref`` on ``evals`` with the units' filters
    zeroed in a copy of ``model``."""
    from onnxshrink.runtime import make_session
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    cands = []
    for g in groups:
        if not g.prunable or g.units < 2:
            continue
        us = [u for u in g.unit_labels if u not in blocked]
        sc = np.array([(-np.inf if u in free else scores.get(u, 0.0)) for u in us])
        for level, r in enumerate((ratio, min(0.9, 2 * ratio))):
            keep = _round_keep(len(us) - int(np.floor(r * len(us))), len(us), multiple_of)
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
    return cands


def latency_probe(ctx: Context, model: onnx.ModelProto, n_ids: int, input_shapes, feeds: dict, free: set):
    """A function: removal set -> onnxruntime CPU latency (ms, 1 thread, median of 10) of
    ``model`` with those units removed (a fresh import and analysis of the same model gives the
    same channel ids and unit labels)."""
    from onnxshrink.runtime import measure_latency

    def measure(chosen: set) -> float:
        g = gs.import_onnx(model)
        a2 = analyze(g, input_shapes)
        if a2.n != n_ids:
            raise RuntimeError("re-analysis gave different channel ids")
        rem = feasible(a2, set(chosen), {u: -np.inf for u in free})
        if rem:
            remove_units(a2, g, rem, None)
        return measure_latency(ctx.to_model(g), feeds, runs=10, warmup=2, threads=1)

    return measure


def _round_keep(keep: int, n: int, m: int) -> int:
    """``keep`` (at least 1) rounded up to a multiple of ``m`` when the group has ``m`` or more, at most ``n``."""
    keep = max(1, keep)
    if m > 1 and n >= m:
        keep = int(np.ceil(keep / m) * m)
    return min(keep, n)
