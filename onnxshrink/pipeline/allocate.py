"""Allocation across prune, svd and quantize toward a cost target, verified end to end.

Given a cost target (weight bytes, MACs or measured latency, as a fraction of the input's) and the
fidelity budget, the manager calls ``allocate`` at the first pass that has a knob
(``sensitivity.KNOBS``); every such pass of the pipeline is run here, in pipeline order:

1. the sensitivity table of the current model is measured once (cached on disk, through the
   executor): loss and saving of every (unit, strength);
2. ``greedy_order`` ranks the choices by loss per unit of saving; a prefix of n steps is a
   configuration (each unit at the strongest strength in the prefix);
3. verification runs the real passes with those per-unit options on the full calibration data and
   measures the result end to end (fidelity on every validation sample, weight bytes, MACs,
   single-thread latency): first the shortest prefix whose estimated cost meets the target, then
   longer ones while the measured cost misses it (the estimate corrected by the measured ratio);
4. when the budget fails there, the worst choices are backed off: the prefix is bisected down to
   the longest one whose budget holds;
5. a configuration that keeps the budget and meets the target is the result (several targets: the
   cost is ``max_k cost_k / target_k``, met when <= 1, and a choice saves ``sum_k saving_k / gap_k``
   with ``gap_k`` the base's distance to target k, so the greedy closes the gaps together); otherwise the run
   fails closed (BudgetError: exit code 4, nothing written) and the report says how close it came
   (the cheapest configuration within the budget, and the best-scoring one at the target).
"""

from __future__ import annotations

__all__ = ["allocate"]

import dataclasses
import gc
import math
import time

import numpy as np
import onnx

from onnxshrink.errors import BudgetError
from onnxshrink.pipeline.report import NOT_APPLICABLE, PassRecord

KIND_NAMES = {"weight_bytes": "size (weight bytes)", "macs": "MACs", "latency_ms": "latency (ms, 1 thread)",
              "combined": "cost / target (the largest over the targets)"}
COMBINED = "combined"
MAX_EXTEND = 6
CLOSURE_MARGIN = 0.97  # the closure is kept when at least 3 % faster
MAX_BISECT = 5


def _data_for(pm, ctx, val, reference):
    from onnxshrink.pipeline.sensitivity import SensitivityData
    calib = ctx.calib if ctx.calib is not None else val
    ncal = min(len(calib), 16)
    nval = len(val) if not pm.sensitivity_samples else min(len(val), pm.sensitivity_samples)
    labels = pm.val_labels[:nval] if pm.val_labels is not None else None
    return SensitivityData(calib=[calib.get(i) for i in range(ncal)], val=[val.get(i) for i in range(nval)],
                 reference=reference[:nval], labels=labels, budget=pm.budget, user_metric=pm.metric,
                 shapes=None, seed=pm.seed)


def _executor(pm, n_tasks: int):
    from onnxshrink.pipeline.executor import SerialExecutor, get_executor
    if pm.metric is not None and pm.executor != "serial":
        import pickle
        try:
            pickle.dumps(pm.metric)
        except Exception:  # a lambda or closure cannot reach a worker process
            return SerialExecutor()
    return get_executor(pm.executor, pm.workers, n_tasks)


def _cache(pm):
    from onnxshrink.cache import MeasurementCache
    if pm.cache is False or pm.cache is None:
        return MeasurementCache(enabled=False)
    if isinstance(pm.cache, MeasurementCache):
        return pm.cache
    return MeasurementCache(None if pm.cache is True else pm.cache)


def allocate(pm, base: onnx.ModelProto, ctx, val, reference, cost_shapes, report, original):
    """Run the knob passes of ``pm`` on ``base`` under ``pm.cost_targets``: (model, pass records).
    Raises BudgetError (with the report filled in) when no verified configuration keeps the budget
    and meets the target."""
    from onnxshrink.pipeline.executor import SerialExecutor
    from onnxshrink.pipeline.sensitivity import (KNOBS, cost_of, estimate_cost, greedy_order, loss_of, measure_sensitivity,
                              merge_options)
    t0 = time.perf_counter()
    targets = list(pm.cost_targets)
    kinds = [k for k, _ in targets]
    names = [p.name for p in pm.passes if p.name in KNOBS]
    user = {p.name: dataclasses.asdict(p.options) for p in pm.passes if p.name in KNOBS
            and dataclasses.is_dataclass(p.options)}
    feeds = val.get(0)
    latency = "latency_ms" in kinds
    data = _data_for(pm, ctx, val, reference)
    data.shapes = cost_shapes
    n_tasks = sum(len(KNOBS[n].strengths) * 8 for n in names)
    ex = _executor(pm, n_tasks) if pm.executor != "serial" else SerialExecutor()
    try:
        table = measure_sensitivity(base, names, data, pm.budget, cache=_cache(pm), executor=ex, latency=latency,
                                    user_options=user, progress=pm.progress, max_units=pm.max_units)
    finally:
        ex.close()
    of_input = {}
    for k, _ in targets:
        if k == "latency_ms":
            from onnxshrink.runtime import measure_latency
            of_input[k] = measure_latency(original, feeds)
        else:
            of_input[k] = report.before.get(k)
    absolute = {k: f * float(of_input[k]) for k, f in targets}
    if len(targets) == 1:
        kind, fraction = targets[0]
        base_value, target_abs = of_input[kind], absolute[kind]
        steps = greedy_order(table, kind)
        target_info = {"cost": kind, "fraction": fraction, "of_input": base_value, "absolute": target_abs}
    else:
        # several targets: one normalised cost, the largest of cost_k / target_k (met when <= 1); the
        # greedy ranks by loss per saving summed over the targets, each over its remaining gap
        kind, target_abs = COMBINED, 1.0
        base_value = max(float(of_input[k]) / absolute[k] for k in kinds)
        _add_combined(table, absolute)
        steps = greedy_order(table, kind)
        rows = {(r["pass"], r["unit"], r["strength"]): r for r in table.rows}
        for st in steps:
            chosen_rows = {pu: rows[(*pu, sv)] for pu, sv in st["chosen"].items()}
            st["estimated"] = max(estimate_cost(table, chosen_rows, k) / absolute[k] for k in kinds)
        target_info = {"cost": "+".join(kinds), "fraction": None, "of_input": of_input, "absolute": absolute,
                       "describe": " and ".join(f"{KIND_NAMES[k]} <= {f:g}" for k, f in targets) + " of the input's",
                       "targets": [{"cost": k, "fraction": f, "of_input": of_input[k], "absolute": absolute[k]}
                                   for k, f in targets]}

    def with_combined(cost: dict) -> dict:
        if kind == COMBINED:
            cost = dict(cost)
            vals = [cost.get(k) for k in kinds]
            cost[COMBINED] = max(v / absolute[k] for k, v in zip(kinds, vals)) if None not in vals else None
        return cost

    alloc = report.allocation
    alloc.update({"target": target_info,
                  "passes": names, "sensitivity": table.info, "base_cost": table.base_cost,
                  "steps": len(steps), "trials": [], "baseline_scores": dict(pm.baseline)})
    trials: dict = {}
    cache = _cache(pm)
    from onnxshrink.cache import data_digest, digest, model_digest
    vkey = digest("verify-1", model_digest(base), data_digest(val), data_digest(ctx.calib or []), names, user,
                  pm.seed, str(pm.budget), getattr(pm.metric, "__qualname__", None), cost_shapes)

    extra: dict = {}  # trials beyond the greedy prefixes: label -> chosen

    def chosen_of(n) -> dict:
        return extra[n] if n in extra else (steps[n - 1]["chosen"] if n else {})

    def verify(n, materialize: bool = False) -> dict:
        """Trial of the first n greedy steps (or of an extra configuration by its label); from the
        cache (without the model) when measured before, unless ``materialize``."""
        if n in trials and (trials[n].get("model") is not None or not materialize):
            return trials[n]
        chosen = chosen_of(n)
        key = digest(vkey, sorted((p, u, s) for (p, u), s in chosen.items()))
        hit = None if materialize else cache.get(key)
        if hit is not None:
            t = {"n": n, "model": None, "records": None, **hit, "cached": True}
            t["cost"] = with_combined(t["cost"])
            value = t["cost"].get(kind)  # the target may differ from the run that cached the trial
            t["target_met"] = value is not None and value <= target_abs
            trials[n] = t
            _log_trial(t, cached=True)
            return t
        # a fresh generator per trial: a trial's result must not depend on which trials ran before
        nobudget = dataclasses.replace(ctx, budget=None, cache={}, rng=np.random.default_rng(pm.seed))
        current, recs = base, []
        tv = time.perf_counter()
        for pname in names:
            choices = {u: s for (p, u), s in chosen.items() if p == pname}
            if not choices:
                recs.append(PassRecord(name=pname, status=NOT_APPLICABLE, options=user.get(pname, {}),
                                       reason="the allocation chose no unit of this pass"))
                continue
            from onnxshrink.passes.registry import create_pass
            opts = merge_options(user.get(pname, {}), KNOBS[pname].options(current, choices))
            p = create_pass({pname: opts})
            rec, current = pm._run_one(p, current, nobudget, val, reference, cost_shapes, check_budget=False)
            rec.reason = (rec.reason + "; " if rec.reason else "") + f"allocated {len(choices)} unit(s)"
            recs.append(rec)
            nobudget.cache.clear()
            gc.collect()
        scores = ctx.evaluator(current)
        if recs and recs[-1].status != NOT_APPLICABLE:
            recs[-1].fidelity = dict(scores)  # the chain's steps are checked runnable; the end is measured
        cost = with_combined(cost_of(current, cost_shapes, feeds, latency=True, runs=30 if latency else 15))
        ok = pm.budget.holds(scores, pm.baseline) if pm.budget is not None else True
        value = cost.get(kind)
        scores = {k: float(v) for k, v in scores.items()}
        if n in trials:  # materialising a cached trial: its decisions stand, the model is now built
            trials[n].update(model=current, records=recs)
            return trials[n]
        t = {"n": n, "model": current, "records": recs, "scores": scores, "cost": cost, "budget_ok": bool(ok),
             "target_met": value is not None and value <= target_abs, "seconds": round(time.perf_counter() - tv, 2)}
        cache.put(key, {**{k: t[k] for k in ("scores", "budget_ok", "seconds")},
                        "cost": {k: v for k, v in t["cost"].items() if k != COMBINED}})
        trials[n] = t
        _log_trial(t, cached=False)
        return t

    metric = pm.budget.metric if pm.budget is not None else "cosine"

    def _log_trial(t, cached):
        n, cost, scores = t["n"], t["cost"], t["scores"]
        est = None if n in extra else (steps[n - 1]["estimated"] if n else table.base_cost.get(kind))
        alloc["trials"].append({"n": n, "estimated": est,
                                "cost": dict(cost), metric: scores.get(metric), "cosine": scores.get("cosine"),
                                "budget_ok": t["budget_ok"], "target_met": t["target_met"],
                                "seconds": t["seconds"], "cached": cached})
        value = cost.get(kind)
        pm.progress.log(f"allocation: {n}/{len(steps)} choices -> {KIND_NAMES[kind]} {value:.4g} "
                        f"(target {target_abs:.4g}), {metric}={scores.get(metric, float('nan')):.5g}"
                        f"{'' if t['budget_ok'] else ' (budget broken)'}{' (cached)' if cached else ''}")

    N = len(steps)
    n = next((i + 1 for i, s in enumerate(steps) if s["estimated"] <= target_abs), N)
    r = verify(n)
    for _ in range(MAX_EXTEND):
        if r["target_met"] or n >= N or not r["budget_ok"]:
            break
        # correct the estimate by the measured share of the estimated saving, then jump ahead
        b0 = float(table.base_cost[kind])
        est = steps[n - 1]["estimated"] if n else b0
        k = (b0 - (r["cost"].get(kind) or est)) / max(b0 - est, 1e-12)
        n2 = next((i + 1 for i in range(n, N) if b0 - k * (b0 - steps[i]["estimated"]) <= target_abs), N)
        n = max(n2, n + 1)
        r = verify(n)
    if not r["budget_ok"]:
        lo, hi = 0, n
        for _ in range(MAX_BISECT):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            if verify(mid)["budget_ok"]:
                lo = mid
            else:
                hi = mid
        r = verify(lo)
    good = [t for t in trials.values() if t["budget_ok"] and t["target_met"]]
    # the configuration meeting the target at the least metric loss (then the cheapest)
    best = min(good, key=lambda t: (loss_of(t["scores"], pm.baseline, pm.budget), t["cost"][kind])) if good else None
    alloc["seconds"] = round(time.perf_counter() - t0, 2)
    alloc["table"] = [{k: v for k, v in row.items()} for row in table.rows]
    if best is not None and "quantize" in names:
        best = _quantize_closure(best, chosen_of(best["n"]), table, extra, verify, kind, alloc, feeds, cache, vkey)
    within = [t for t in trials.values() if t["budget_ok"]]
    closest = min(within, key=lambda t: t["cost"][kind]) if within else None
    if best is not None:
        chosen = chosen_of(best["n"])
        rows = {(r_["pass"], r_["unit"], r_["strength"]): r_ for r_ in table.rows}
        alloc["chosen_n"] = best["n"]
        alloc["decisions"] = [_decision(rows[(p, u, s)], kind, i) for i, ((p, u), s) in
                              enumerate(sorted(chosen.items(), key=lambda kv: _rank(rows[(*kv[0], kv[1])], kind)))]
        if kind == COMBINED:
            alloc["result"] = ", ".join(f"{KIND_NAMES[k]} {best['cost'][k]:.4g} <= target {absolute[k]:.4g} "
                                        f"({best['cost'][k] / float(of_input[k]):.3f} of the input's)"
                                        for k in kinds) + " within the budget"
        else:
            alloc["result"] = (f"{KIND_NAMES[kind]} {best['cost'][kind]:.4g} <= target {target_abs:.4g} "
                               f"({best['cost'][kind] / float(base_value):.3f} of the input's) within the budget")
    else:
        alloc["chosen_n"] = None
        alloc["result"] = _shortfall(kind, target_abs, base_value, closest, trials, pm)
        if kind == COMBINED and closest is not None:
            alloc["result"] = (f"no configuration within the budget {pm.budget} meets every target; the closest: "
                               + ", ".join(f"{KIND_NAMES[k]} {closest['cost'][k] / float(of_input[k]):.3f} of the "
                                           f"input's (target {f:g})" for k, f in targets)
                               + f"; {len(trials)} configurations verified")
    if pm.plot:
        from onnxshrink.pipeline.report import plot_allocation
        try:
            alloc["plot"] = str(plot_allocation(alloc, pm.plot, pm.budget))
        except ImportError as e:
            report.warnings.append(f"--plot needs matplotlib (pip install 'onnxshrink[plot]'): {e}")
    if best is None:
        raise BudgetError(f"cost target not met within the budget: {alloc['result']}", report)
    if best.get("model") is None:
        best = verify(best["n"], materialize=True)
    return best["model"], best["records"]


def _add_combined(table, absolute: dict) -> None:
    """Savings and base cost in the combined cost of several targets: a row saves
    ``sum_k saving_k / gap_k`` (``gap_k`` = base cost - target, targets already met weigh 0), so the
    greedy ranks by loss per share of the remaining gaps closed; the base is ``max_k base_k /
    target_k``."""
    gaps = {k: float(table.base_cost[k]) - a for k, a in absolute.items() if table.base_cost.get(k) is not None}
    for r in table.rows:
        sv = r.get("saving") or {}
        if not sv:
            continue
        sv[COMBINED] = sum((sv.get(k) or 0.0) / g for k, g in gaps.items() if g > 0)
    table.base_cost[COMBINED] = max(float(table.base_cost[k]) / a for k, a in absolute.items()
                                    if table.base_cost.get(k) is not None)


def _quantize_closure(best, chosen, table, extra, verify, kind, alloc, feeds, cache, vkey):
    """The chosen configuration with quantizable units raised to QDQ int8 as well (the ones at
    strength 0.5, int8 weights with float activations, or not chosen at all), kept when it keeps the
    budget, meets the target *and* measures faster (interleaved, one thread). First all of them;
    when that breaks the budget, the longest prefix of them by marginal loss per MAC (loss at 1
    minus loss at the unit's chosen strength, over the layer's MACs: compute-heavy, harmless units
    first) that keeps it, by bisection. A unit quantized among float neighbours pays Q/DQ
    conversions at both ends, so only the timing decides; the size target alone never asks for it."""
    rows = {(r["unit"], r["strength"]): r for r in table.rows if r["pass"] == "quantize"}
    have = {u: s for (p, u), s in chosen.items() if p == "quantize"}
    rest = sorted({u for (u, s), r in rows.items() if s >= 1.0 and math.isfinite(r.get("loss", math.inf))
                   and (r["saving"].get(kind) or 0) > 0} - {u for u, s in have.items() if s >= 1.0})
    if not rest:
        return best

    def marginal(u):
        now = rows.get((u, have[u])) if u in have else None
        base = now["loss"] if now is not None and math.isfinite(now.get("loss", math.inf)) else 0.0
        macs = (table.layer_cost.get(u) or {}).get("macs") or 1
        return max(rows[(u, 1.0)]["loss"] - base, 0.0) / macs

    rest.sort(key=lambda u: (marginal(u), u))

    def trial(k):
        label = f"{best['n']}+q{k}"
        if label not in extra:
            extra[label] = {**chosen, **{("quantize", u): 1.0 for u in rest[:k]}}
        return label, verify(label)

    label, t = trial(len(rest))
    log = [f"{label}: cosine-budget {'kept' if t['budget_ok'] else 'broken'}"]
    if not (t["budget_ok"] and t["target_met"]):
        lo, hi = 0, len(rest)
        for _ in range(MAX_BISECT - 1):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            lab, tm = trial(mid)
            log.append(f"{lab}: budget {'kept' if tm['budget_ok'] else 'broken'}")
            lo, hi = (mid, hi) if (tm["budget_ok"] and tm["target_met"]) else (lo, mid)
        if lo == 0:
            alloc["closure"] = "; ".join(log) + f"; no prefix keeps the budget: kept {best['n']}"
            return best
        label, t = trial(lo)
    # the timing decides once; its verdict is cached with the trials so a rerun makes the same choice
    from onnxshrink.cache import digest
    key = digest(vkey, "closure", sorted(map(list, chosen)), sorted(map(list, extra[label])))
    hit = cache.get(key)
    was_cached = hit is not None
    if hit is None:
        a, b = verify(best["n"], materialize=True), verify(label, materialize=True)
        ta, tb = _interleaved([a["model"], b["model"]], feeds)
        hit = {"ta": ta, "tb": tb}
        cache.put(key, hit)
    ta, tb = hit["ta"], hit["tb"]
    raised = sum(1 for u in rest if extra[label].get(("quantize", u)) == 1.0)
    log.append(f"{label} ({raised} units raised to int8): {tb:.2f} ms vs {ta:.2f} ms for {best['n']} (interleaved, 1 thread, min of 25; kept when 3 % faster)"
               f"{' (cached)' if was_cached else ''}")
    alloc["closure"] = "; ".join(log)
    # faster by a margin: a tie within timing noise (a tiny model) must not flip the decision
    return verify(label) if tb < CLOSURE_MARGIN * ta else best


def _interleaved(models, feeds, rounds: int = 5, runs: int = 5):
    from onnxshrink.runtime import interleaved_latency
    return [min(t) for t in interleaved_latency(models, feeds, rounds=rounds, runs=runs)]


def _rank(row, kind):
    return row["loss"] / max(row["saving"][kind], 1e-300)


def _decision(row, kind, i) -> dict:
    return {"pass": row["pass"], "unit": row["unit"], "strength": row["strength"], "loss": row["loss"],
            "saving": row["saving"].get(kind), "cached": row.get("cached"),
            "why": f"rank {i + 1} by loss per {kind} saved ({_rank(row, kind):.3g})"}


def _shortfall(kind, target_abs, base_value, closest, trials, pm) -> str:
    name = KIND_NAMES[kind]
    if closest is None:
        return f"no configuration kept the budget {pm.budget} (not even the passes' weakest)"
    v = closest["cost"][kind]
    return (f"the smallest {name} within the budget {pm.budget} is {v:.4g} = {v / float(base_value):.3f} of the "
            f"input's (target {target_abs / float(base_value):.3f}); {len(trials)} configurations verified")
