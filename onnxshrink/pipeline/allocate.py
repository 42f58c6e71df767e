"""Allocation across prune, svd and quantize toward a cost target, verified end to end.

Given a cost target (weight bytes, MACs or measured latency, as a fraction of the input's) and the
fidelity budget, the manager calls ``allocate`` at the first pass that has a knob
(``Pass.knob``, listed by ``sensitivity.knobs``); every such pass of the pipeline is run here, in pipeline order:

1. the sensitivity table of the current model is measured once (cached on disk, through the
   executor): loss and saving of every (unit, strength);
2. ``greedy_order`` ranks the choices by loss per unit of saving; a prefix of n steps is a
   configuration (each unit at the strongest strength in the prefix); with the proxy table
   (``proxy.py``) the approximate rows nearest the step whose estimate meets the target are first
   measured by their passes and the order redone (``verify_boundary``);
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

With the proxy, the verified order is an approximation too: the boundary rows it measured carry
their end-to-end losses while every other row keeps its proxy estimate, which is often lower
(PP-OCRv4 rec: svd's scaled rows 2-10x, quantize's local rows 0.1-4x), so the redone order trades
the measured rows for unmeasured ones no better in fact, and single-row losses do not add up to a
configuration's. Neither order is the better one: on PP-OCRv4 rec (``--calib 40 --val 32``, cosine
>= 0.99) the verified order meets a size target of 0.25 where the proxy's own fails (0.278), and
the proxy's own meets 0.3 (0.281) where the verified one fails (0.325). So before failing closed,
steps 3-4 run again along the proxy's own order (``Trials.switch_order``; the report's
``second_order``, its trials marked ``order: proxy``): a run that would exit 4 pays a few more
trials, one that succeeds on the first order pays nothing.
"""

from __future__ import annotations

__all__ = ["allocate", "AllocationConfig", "Runner", "Target", "Trials", "quantize_closure", "speed_verdict"]

import copy
import dataclasses
import gc
import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from onnxshrink.cache import MeasurementCache, data_digest, digest, model_digest
from onnxshrink.errors import BudgetError, UsageError
from onnxshrink.metrics import fidelity
from onnxshrink.pipeline.executor import SerialExecutor, get_executor
from onnxshrink.pipeline.proxy import one_blas_thread, use_proxy
from onnxshrink.pipeline.report import NOT_APPLICABLE, PassRecord, plot_allocation
from onnxshrink.pipeline.sensitivity import (
    SensitivityData,
    batched_outputs,
    cost_of,
    estimate_cost,
    greedy_order,
    knobs,
    loss_of,
    measure_sensitivity,
)
from onnxshrink.progress import Progress
from onnxshrink.runtime import CLEAR_MARGIN, compare_speed, measure_latency

KIND_NAMES = {"weight_bytes": "size (weight bytes)", "macs": "MACs", "latency_ms": "latency (ms, 1 thread)",
              "combined": "cost / target (the largest over the targets)"}
COMBINED = "combined"
MAX_EXTEND = 6
MAX_BISECT = 5
BOUNDARY = 8  # approximate proxy rows measured end to end around the greedy's crossing of the target
FIRST_ORDER, SECOND_ORDER = "verified", "proxy"  # the report's names of the greedy orders (``Trials.switch_order``)


@dataclass
class Runner:
    """What the allocation needs of the pass manager's run.

    run_pass(model, pass name, options, ctx) -> (PassRecord, model): one step of a chain, validated
        as runnable only (the chain is measured end to end afterwards, ``Trials.evaluate``);
    labels: the validation labels (accuracy budgets), or None.
    """

    run_pass: Callable[[onnx.ModelProto, str, dict, Any], tuple[PassRecord, onnx.ModelProto]]
    labels: list | None


@dataclass
class AllocationConfig:
    """The manager's settings the allocation reads: the cost targets [(kind, fraction)], the knob
    passes in pipeline order (their options are the user's), the budget and the original's own
    scores, and how sensitivity is measured (executor, workers, cache, samples, max_units, plot)."""

    targets: list
    passes: list
    budget: Any = None
    baseline: dict = field(default_factory=dict)
    metric: Callable | None = None
    seed: int = 0
    executor: str = "auto"
    workers: int | None = None
    cache: Any = True
    sensitivity_samples: int = 0
    max_units: int = 0
    sensitivity: str = "auto"
    plot: Any = None
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))

    @property
    def names(self) -> list[str]:
        """The knob passes' names, in pipeline order."""
        pass_knobs = knobs()
        return [p.name for p in self.passes if p.name in pass_knobs]

    @property
    def user_options(self) -> dict:
        """{pass name: the user's options} of the knob passes."""
        pass_knobs = knobs()
        return {p.name: dataclasses.asdict(p.options) for p in self.passes if p.name in pass_knobs
                and dataclasses.is_dataclass(p.options)}


def sensitivity_data(config: AllocationConfig, runner: Runner, ctx, val, reference, shapes) -> SensitivityData:
    """The picklable samples a measurement uses: up to 16 calibration samples and the first
    ``sensitivity_samples`` validation samples (all by default) with their reference outputs."""
    calib = ctx.calib if ctx.calib is not None else val
    ncal = min(len(calib), 16)
    nval = len(val) if not config.sensitivity_samples else min(len(val), config.sensitivity_samples)
    labels = runner.labels[:nval] if runner.labels is not None else None
    return SensitivityData(calib=[calib.get(i) for i in range(ncal)], val=[val.get(i) for i in range(nval)],
                           reference=reference[:nval], labels=labels, budget=config.budget,
                           user_metric=config.metric, shapes=shapes, seed=config.seed)


def measurement_executor(config: AllocationConfig, n_tasks: int):
    """The executor of the sensitivity sweep; serial when a user metric cannot be pickled."""
    if config.executor == "serial":
        return SerialExecutor()
    if config.metric is not None:
        try:
            pickle.dumps(config.metric)
        except Exception:  # a lambda or closure cannot reach a worker process
            return SerialExecutor()
    return get_executor(config.executor, config.workers, n_tasks)


def measurement_cache(config: AllocationConfig) -> MeasurementCache:
    """The on-disk cache the settings ask for (True: the default folder; a folder; off)."""
    if config.cache is False or config.cache is None:
        return MeasurementCache(enabled=False)
    if isinstance(config.cache, MeasurementCache):
        return config.cache
    return MeasurementCache(None if config.cache is True else config.cache)


def measure_table(config: AllocationConfig, runner: Runner, base, ctx, val, reference, cost_shapes, latency: bool,
                  only: set | None = None, base_scores: dict | None = None):
    """Step 1: the sensitivity table of ``base`` (cached measurements read, the rest measured, or
    from the proxy, ``proxy.use_proxy``); ``only``: just these choices, measured; ``base_scores``: the
    base's scores when a table measured them."""
    data = sensitivity_data(config, runner, ctx, val, reference, cost_shapes)
    data.one_blas_thread = use_proxy(config.sensitivity, base, latency) or only is not None
    pass_knobs = knobs()
    n_tasks = len(only) if only is not None else sum(len(pass_knobs[n].strengths) * 8 for n in config.names)
    ex = measurement_executor(config, n_tasks)
    try:
        return measure_sensitivity(base, config.names, data, config.budget, cache=measurement_cache(config),
                                   executor=ex, latency=latency, user_options=config.user_options,
                                   progress=config.progress, max_units=config.max_units,
                                   proxy=only is None and use_proxy(config.sensitivity, base, latency), only=only,
                                   base_scores=base_scores)
    finally:
        ex.close()


def verify_boundary(config: AllocationConfig, runner: Runner, base, ctx, val, reference, cost_shapes, table,
                    target, steps) -> bool:
    """With the proxy: the approximate rows (prune's zeroing, scaled activation losses) among the
    greedy steps nearest the one whose estimate meets the target (``BOUNDARY`` of them) measured end
    to end by their passes, replacing the proxy's rows in ``table``; True when rows changed (the
    greedy order must be redone). The proxy's and the measured losses go to ``table.info``."""
    if table.info.get("mode") != "proxy" or not steps:
        return False
    cross = next((i for i, st in enumerate(steps) if st["estimated"] <= target.absolute), len(steps) - 1)
    approx = [i for i, st in enumerate(steps) if st["row"].get("proxy")]
    near = sorted(approx, key=lambda i: (abs(i - cross), i))[:BOUNDARY]
    keys = {f"{steps[i]['row']['pass']}:{steps[i]['row']['unit']}@{steps[i]['row']['strength']:g}" for i in near}
    if not keys:
        return False
    measured = measure_table(config, runner, base, ctx, val, reference, cost_shapes, False, only=keys,
                             base_scores=table.base_scores)
    new = {(r["pass"], r["unit"], r["strength"]): r for r in measured.rows}
    pairs = []
    for i, r in enumerate(table.rows):
        m = new.get((r["pass"], r["unit"], r["strength"]))
        if m is not None:
            pairs.append({"pass": r["pass"], "unit": r["unit"], "strength": r["strength"], "proxy": r.get("proxy"),
                          "proxy_loss": r["loss"], "loss": m["loss"]})
            table.rows[i] = {**m, "proxy_loss": r["loss"]}
    table.info["boundary"] = {"verified": len(pairs), "seconds": measured.info.get("seconds"), "rows": pairs}
    return True


@dataclass
class Target:
    """The cost the allocation drives down: ``kind`` (one target's cost, or COMBINED = max_k
    cost_k / target_k over several), its value ``absolute`` to reach and the input's ``base_value``;
    ``of_input``/``absolutes`` per target kind; ``info`` for the report."""

    kind: str
    absolute: float
    base_value: float
    kinds: list
    of_input: dict
    absolutes: dict
    info: dict

    def with_combined(self, cost: dict) -> dict:
        """``cost`` with its COMBINED value added (several targets)."""
        if self.kind == COMBINED:
            cost = dict(cost)
            vals = [cost.get(k) for k in self.kinds]
            cost[COMBINED] = (max(v / self.absolutes[k] for k, v in zip(self.kinds, vals))
                              if None not in vals else None)
        return cost


def greedy_choice(config: AllocationConfig, table, original, feeds, before: dict) -> tuple[Target, list]:
    """Step 2: the target (the input's costs, measured latency included) and the greedy steps."""
    targets = list(config.targets)
    kinds = [k for k, _ in targets]
    of_input = {k: measure_latency(original, feeds) if k == "latency_ms" else before.get(k) for k, _ in targets}
    for k in kinds:
        if not of_input[k]:  # a fraction of nothing: no target to reach (a model of elementwise ops only)
            raise UsageError(f"a {KIND_NAMES[k]} target needs an input whose {KIND_NAMES[k]} can be counted; "
                             f"this input's is {'unknown' if of_input[k] is None else 0}")
    absolute = {k: f * float(of_input[k]) for k, f in targets}
    if len(targets) == 1:
        kind, fraction = targets[0]
        steps = greedy_order(table, kind)
        info = {"cost": kind, "fraction": fraction, "of_input": of_input[kind], "absolute": absolute[kind]}
        return Target(kind, absolute[kind], of_input[kind], kinds, of_input, absolute, info), steps
    # several targets: one normalised cost, the largest of cost_k / target_k (met when <= 1); the
    # greedy ranks by loss per saving summed over the targets, each over its remaining gap
    base_value = max(float(of_input[k]) / absolute[k] for k in kinds)
    _add_combined(table, absolute)
    steps = greedy_order(table, COMBINED)
    rows = {(r["pass"], r["unit"], r["strength"]): r for r in table.rows}
    for st in steps:
        chosen_rows = {pu: rows[(*pu, sv)] for pu, sv in st["chosen"].items()}
        st["estimated"] = max(estimate_cost(table, chosen_rows, k) / absolute[k] for k in kinds)
    info = {"cost": "+".join(kinds), "fraction": None, "of_input": of_input, "absolute": absolute,
            "describe": " and ".join(f"{KIND_NAMES[k]} <= {f:g}" for k, f in targets) + " of the input's",
            "targets": [{"cost": k, "fraction": f, "of_input": of_input[k], "absolute": absolute[k]}
                        for k, f in targets]}
    return Target(COMBINED, 1.0, base_value, kinds, of_input, absolute, info), steps


class Trials:
    """Step 3's verification: configurations (a greedy prefix by its length n, or an extra one by
    its label) run through the real passes and measured end to end, each once (and cached on disk
    without its model)."""

    def __init__(self, config: AllocationConfig, runner: Runner, base, ctx, val, reference, cost_shapes,
                 table, steps: list, target: Target, alloc: dict, feeds):
        self.config, self.runner, self.base, self.ctx = config, runner, base, ctx
        self.val, self.reference, self.cost_shapes = val, reference, cost_shapes
        self.table, self.steps, self.target, self.alloc, self.feeds = table, steps, target, alloc, feeds
        self.latency = "latency_ms" in target.kinds
        self.names, self.user = config.names, config.user_options
        self.done: dict = {}
        self.extra: dict = {}  # trials beyond the greedy prefixes: label -> chosen
        self.cache = measurement_cache(config)
        self.key = digest("verify-1", model_digest(base), data_digest(val), data_digest(ctx.calib or []), self.names,
                          self.user, config.seed, str(config.budget), getattr(config.metric, "__qualname__", None),
                          cost_shapes)
        self.metric = config.budget.metric if config.budget is not None else "cosine"
        self.one_blas_thread = table.info.get("mode") == "proxy"  # proxy.one_blas_thread
        self.memo = ChainMemo()
        self.order: str | None = None  # the greedy order searched, when not the first (``switch_order``)

    def switch_order(self, steps: list, tag: str) -> None:
        """Search the greedy order ``steps`` from here on: each trial of the current order keeps its
        result as an extra configuration labelled ``o<n>`` (the empty configuration, the same in
        every order, stays 0), and the report's trials from now on say ``order: tag``."""
        for entry in self.alloc["trials"]:  # the report's entries so far: the first order's
            entry.setdefault("order", FIRST_ORDER)
        for n in [k for k in self.done if isinstance(k, int) and k]:
            label = f"o{n}"
            self.extra[label] = self.steps[n - 1]["chosen"]
            t = self.done.pop(n)
            t["n"] = label
            self.done[label] = t
        self.steps, self.order = steps, tag

    def chosen_of(self, n) -> dict:
        """{(pass, unit): strength} of trial ``n``."""
        return self.extra[n] if n in self.extra else (self.steps[n - 1]["chosen"] if n else {})

    def verify(self, n, materialize: bool = False, decide_on_cost: bool = False) -> dict:
        """Trial of the first n greedy steps (or of an extra configuration by its label); from the
        cache (without the model) when measured before, unless ``materialize``. ``decide_on_cost``: the
        caller only asks whether the budget holds *and* the target is met (the closure), so a
        configuration whose deterministic cost (weight bytes, MACs; not a latency) misses the target is
        decided without measuring its fidelity or latency (``budget_ok`` None, ``decided``, not cached)."""
        trials, target = self.done, self.target
        if n in trials and trials[n].get("decided") and not decide_on_cost:
            del trials[n]  # decided on its cost before; measured in full now
        if n in trials and (trials[n].get("model") is not None or not materialize):
            return trials[n]
        chosen = self.chosen_of(n)
        key = digest(self.key, sorted((p, u, s) for (p, u), s in chosen.items()))
        hit = None if materialize else self.cache.get(key)
        if hit is not None:
            t = {"n": n, "model": None, "records": None, **hit, "cached": True}
            t["cost"] = target.with_combined(t["cost"])
            value = t["cost"].get(target.kind)  # the target may differ from the run that cached the trial
            t["target_met"] = value is not None and value <= target.absolute
            trials[n] = t
            self.log(t, cached=True)
            return t
        tv = time.perf_counter()
        with one_blas_thread(self.one_blas_thread):
            current, recs = self.run_chain(chosen)
        cost = cost_of(current, self.cost_shapes)
        if decide_on_cost and n not in trials and not self.latency:
            missed = target.with_combined(cost).get(target.kind)
            if missed is not None and missed > target.absolute:  # exact: the built model's own figures
                t = {"n": n, "model": current, "records": recs, "scores": {}, "cost": target.with_combined(cost),
                     "budget_ok": None, "target_met": False, "decided": "target missed: fidelity not measured",
                     "seconds": round(time.perf_counter() - tv, 2)}
                trials[n] = t
                self.log(t, cached=False)
                return t
        scores = self.evaluate(current)
        if recs and recs[-1].status != NOT_APPLICABLE:
            recs[-1].fidelity = dict(scores)  # the chain's steps are checked runnable; the end is measured
        cost["latency_ms"] = measure_latency(current, self.feeds, runs=30 if self.latency else 15)
        cost = target.with_combined(cost)
        budget = self.config.budget
        ok = budget.holds(scores, self.config.baseline) if budget is not None else True
        value = cost.get(target.kind)
        scores = {k: float(v) for k, v in scores.items()}
        if n in trials:  # materialising a cached trial: the rebuilt model is checked again
            t = trials[n]
            t.update(model=current, records=recs)
            # the deterministic costs and the budget are re-judged on what was built (a measured
            # latency would only differ by noise, so a latency target keeps the cached figure)
            rebuilt_met = value is not None and value <= target.absolute if "latency_ms" not in target.kinds \
                else t["target_met"]
            if t["budget_ok"] and t["target_met"] and not (ok and rebuilt_met):
                t.update(budget_ok=bool(ok), target_met=bool(rebuilt_met), scores=scores, cost=cost,
                         rebuilt_mismatch=True)
            return t
        t = {"n": n, "model": current, "records": recs, "scores": scores, "cost": cost, "budget_ok": bool(ok),
             "target_met": value is not None and value <= target.absolute,
             "seconds": round(time.perf_counter() - tv, 2)}
        self.cache.put(key, {**{k: t[k] for k in ("scores", "budget_ok", "seconds")},
                             "cost": {k: v for k, v in t["cost"].items() if k != COMBINED}})
        trials[n] = t
        self.log(t, cached=False)
        return t

    def evaluate(self, model) -> dict:
        """The fidelity of ``model`` on every selection sample against the original's outputs (as the
        manager's ``ctx.evaluator``), the samples run in batches where that gives the one-by-one
        outputs bit for bit (``sensitivity.batched_outputs``)."""
        return fidelity(self.reference, batched_outputs(model, self.val), self.config.metric, self.val,
                        self.runner.labels)

    def run_chain(self, chosen: dict):
        """The knob passes in pipeline order, each with its per-unit options: (model, records).

        Trials share work (``ChainMemo``): a step whose chain so far (every earlier step's pass and
        options) was run by an earlier trial is taken from it with the random generator's state it
        left, so the result is the one running it again gives (the closure's variants differ from
        the configuration they extend only in quantize's options: its prune and svd steps run once);
        and a pass run again on the same input model gets the ``ctx.cache`` its earlier run filled
        (svd's covariances and spectra, quantize's calibration)."""
        # a fresh generator per trial: a trial's result must not depend on which trials ran before
        nobudget = dataclasses.replace(self.ctx, budget=None, cache={}, rng=np.random.default_rng(self.config.seed))
        current, recs = self.base, []
        pass_knobs = knobs()
        chain = digest("chain")
        last = max((i for i, pname in enumerate(self.names) if any(p == pname for p, _ in chosen)), default=-1)
        for i, pname in enumerate(self.names):
            choices = {u: s for (p, u), s in chosen.items() if p == pname}
            if not choices:
                recs.append(PassRecord(name=pname, status=NOT_APPLICABLE, options=self.user.get(pname, {}),
                                       reason="the allocation chose no unit of this pass"))
                continue
            knob = pass_knobs[pname]
            opts = knob.merge(self.user.get(pname, {}), knob.options(current, choices))
            step_input, chain = chain, digest(chain, pname, opts)
            hit = self.memo.step(chain)
            if hit is not None:
                rec, current, nobudget.rng.bit_generator.state = hit
                recs.append(rec)
                continue
            nobudget.cache = self.memo.pass_cache(step_input, pname)
            rec, current = self.runner.run_pass(current, pname, opts, nobudget)
            self.memo.settle(step_input, pname)
            rec.reason = (rec.reason + "; " if rec.reason else "") + f"allocated {len(choices)} unit(s)"
            recs.append(rec)
            if i < last:  # a step later ones build on (the last step's model is the trial's own)
                self.memo.keep(chain, rec, current, nobudget.rng.bit_generator.state)
            gc.collect()
        return current, recs

    def log(self, t: dict, cached: bool) -> None:
        """A trial into the report's allocation section and the progress log."""
        n, cost, scores, target, metric = t["n"], t["cost"], t["scores"], self.target, self.metric
        base_estimate = self.table.base_cost.get(target.kind)
        est = None if n in self.extra else (self.steps[n - 1]["estimated"] if n else base_estimate)
        self.alloc["trials"].append({"n": n, "estimated": est,
                                     "cost": dict(cost), metric: scores.get(metric), "cosine": scores.get("cosine"),
                                     "budget_ok": t["budget_ok"], "target_met": t["target_met"],
                                     "seconds": t["seconds"], "cached": cached,
                                     **({"order": self.order} if self.order else {})})
        value = cost.get(target.kind)
        self.config.progress.log(
            f"allocation: {n}/{len(self.steps)} choices -> {KIND_NAMES[target.kind]} {value:.4g} "
            f"(target {target.absolute:.4g}), {metric}={scores.get(metric, float('nan')):.5g}"
            f"{'' if t['budget_ok'] else ' (budget broken)' if t['budget_ok'] is False else ' (not measured)'}"
            f"{' (cached)' if cached else ''}")


class ChainMemo:
    """What the trials of one allocation share (``Trials.run_chain``): the models of chain steps
    later steps build on, keyed by the chain so far (a digest of every step's pass and options from
    the base model), with the step's record and the random generator's state after it; and the
    ``ctx.cache`` of each pass run on a given step input (same key scheme). Both hold the last
    ``size`` entries (models of the size of the input); a pass cache holding more than
    ``cache_bytes`` of arrays after its run is dropped (svd's covariances and spectra of a ViT-S's
    1536-wide layers reach hundreds of MB; quantize's ranges and maxima are small), so sharing never
    holds more than that beyond what one pass run held before."""

    def __init__(self, size: int = 2, cache_bytes: int = 128 * 2**20):
        self.size, self.cache_bytes = size, cache_bytes
        self.steps: dict = {}
        self.caches: dict = {}
        self.hits = 0

    def step(self, chain: str):
        """(record copy, model, generator state) of the step ending ``chain``, or None."""
        hit = self.steps.get(chain)
        if hit is None:
            return None
        self.steps[chain] = self.steps.pop(chain)  # most recently used last
        self.hits += 1
        rec, model, state = hit
        return copy.deepcopy(rec), model, copy.deepcopy(state)

    def keep(self, chain: str, rec, model, state) -> None:
        self.steps[chain] = (copy.deepcopy(rec), model, copy.deepcopy(state))
        _trim(self.steps, self.size)

    def pass_cache(self, step_input: str, pass_name: str) -> dict:
        """The ``ctx.cache`` of ``pass_name`` run on the model ``step_input`` names (new when unseen)."""
        key = (step_input, pass_name)
        cache = self.caches.pop(key, None)
        self.caches[key] = cache if cache is not None else {}
        _trim(self.caches, self.size)
        return self.caches[key]

    def settle(self, step_input: str, pass_name: str) -> None:
        """After the pass ran: its cache is dropped when it holds more than ``cache_bytes``."""
        key = (step_input, pass_name)
        if key in self.caches and _array_bytes(self.caches[key]) > self.cache_bytes:
            del self.caches[key]


def _trim(d: dict, size: int) -> None:
    while len(d) > size:
        d.pop(next(iter(d)))


def _array_bytes(obj) -> int:
    """Bytes of the numpy arrays in ``obj`` (nested dicts, lists and tuples)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_array_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(v) for v in obj)
    return 0


def search(trials: Trials) -> None:
    """Steps 3-4: verify the shortest prefix whose estimate meets the target, extend while the
    measured cost misses it (the estimate corrected by the measured share of the saving), and
    when the budget breaks, bisect down to the longest prefix that keeps it."""
    steps, table, kind, target_abs = trials.steps, trials.table, trials.target.kind, trials.target.absolute
    N = len(steps)
    n = next((i + 1 for i, s in enumerate(steps) if s["estimated"] <= target_abs), N)
    r = trials.verify(n)
    for _ in range(MAX_EXTEND):
        if r["target_met"] or n >= N or not r["budget_ok"]:
            break
        # correct the estimate by the measured share of the estimated saving, then jump ahead
        b0 = float(table.base_cost[kind])
        est = steps[n - 1]["estimated"] if n else b0
        k = (b0 - (r["cost"].get(kind) or est)) / max(b0 - est, 1e-12)
        n2 = next((i + 1 for i in range(n, N) if b0 - k * (b0 - steps[i]["estimated"]) <= target_abs), N)
        n = max(n2, n + 1)
        r = trials.verify(n)
    if not r["budget_ok"]:
        lo, hi = 0, n
        split = _loss_split(steps, table) if table.info.get("mode") == "proxy" else None
        for _ in range(MAX_BISECT):
            if hi - lo <= 1:
                break
            mid = split(lo, hi) if split is not None else (lo + hi) // 2
            if trials.verify(mid)["budget_ok"]:
                lo = mid
            else:
                hi = mid
        trials.verify(lo)


def _loss_split(steps: list, table):
    """``split(lo, hi)``: the prefix between lo and hi where the estimated loss (the chosen rows'
    losses summed) is half-way between theirs. The greedy order puts the cheap losses first, so the
    middle step holds far less than half the loss; on a large model, where each verification runs
    the passes for minutes, halving the loss finds the budget's edge in fewer trials."""
    rows = {(r["pass"], r["unit"], r["strength"]): r for r in table.rows}
    cum = [0.0] + [sum(rows[(p, u, s)]["loss"] for (p, u), s in st["chosen"].items()) for st in steps]

    def split(lo, hi):
        half = (cum[lo] + cum[hi]) / 2
        mid = next((i for i in range(lo + 1, hi) if cum[i] >= half), (lo + hi) // 2)
        return min(max(mid, lo + 1), hi - 1)
    return split


def describe_result(trials: Trials, best, config: AllocationConfig) -> None:
    """Step 5: the chosen configuration's decisions and result line, or how close the search came."""
    alloc, target, table, kind = trials.alloc, trials.target, trials.table, trials.target.kind
    within = [t for t in trials.done.values() if t["budget_ok"]]
    closest = min(within, key=lambda t: t["cost"][kind]) if within else None
    if best is not None:
        chosen = trials.chosen_of(best["n"])
        rows = {(r_["pass"], r_["unit"], r_["strength"]): r_ for r_ in table.rows}
        alloc["chosen_n"] = best["n"]
        if trials.order:
            alloc["chosen_order"] = trials.order
        alloc["decisions"] = [_decision(rows[(p, u, s)], kind, i) for i, ((p, u), s) in
                              enumerate(sorted(chosen.items(), key=lambda kv: _rank(rows[(*kv[0], kv[1])], kind)))]
        if kind == COMBINED:
            alloc["result"] = ", ".join(f"{KIND_NAMES[k]} {best['cost'][k]:.4g} <= target {target.absolutes[k]:.4g} "
                                        f"({best['cost'][k] / float(target.of_input[k]):.3f} of the input's)"
                                        for k in target.kinds) + " within the budget"
        else:
            value = best["cost"][kind]
            alloc["result"] = (f"{KIND_NAMES[kind]} {value:.4g} <= target {target.absolute:.4g} "
                               f"({value / float(target.base_value):.3f} of the input's) within the budget")
        return
    alloc["chosen_n"] = None
    alloc["result"] = _shortfall(kind, target.absolute, target.base_value, closest, trials.done, config.budget)
    if kind == COMBINED and closest is not None:
        alloc["result"] = (f"no configuration within the budget {config.budget} meets every target; the closest: "
                           + ", ".join(f"{KIND_NAMES[k]} {closest['cost'][k] / float(target.of_input[k]):.3f} of the "
                                       f"input's (target {f:g})" for k, f in config.targets)
                           + f"; {len(trials.done)} configurations verified")


def allocate(runner: Runner, config: AllocationConfig, base: onnx.ModelProto, ctx, val, reference, cost_shapes,
             report, original):
    """Run the knob passes of ``config`` on ``base`` under ``config.targets``: (model, pass records).
    Raises BudgetError (with the report filled in) when no verified configuration keeps the budget
    and meets the target."""
    t0 = time.perf_counter()
    feeds = val.get(0)
    latency = "latency_ms" in [k for k, _ in config.targets]
    table = measure_table(config, runner, base, ctx, val, reference, cost_shapes, latency)
    target, steps = greedy_choice(config, table, original, feeds, report.before)
    proxy_order = None  # the proxy's own greedy order, when the boundary's verification changed it
    if verify_boundary(config, runner, base, ctx, val, reference, cost_shapes, table, target, steps):
        proxy_order = steps
        target, steps = greedy_choice(config, table, original, feeds, report.before)
    alloc = report.allocation
    alloc.update({"target": target.info,
                  "passes": config.names, "sensitivity": table.info, "base_cost": table.base_cost,
                  "steps": len(steps), "trials": [], "baseline_scores": dict(config.baseline)})
    trials = Trials(config, runner, base, ctx, val, reference, cost_shapes, table, steps, target, alloc, feeds)
    search(trials)
    kind = target.kind

    def within() -> list:
        return [t for t in trials.done.values() if t["budget_ok"] and t["target_met"]]
    good = within()
    if not good and proxy_order is not None and _orders_differ(proxy_order, steps):
        # the second order (module docstring): the search again along the proxy's own order
        trials.switch_order(proxy_order, SECOND_ORDER)
        alloc["second_order"] = (f"no configuration of the verified order ({len(trials.done)} verified) met the "
                                 f"target within the budget: searched the proxy's own order too")
        search(trials)
        good = within()
    # the configuration meeting the target at the least metric loss (then the cheapest)
    best = min(good, key=lambda t: (loss_of(t["scores"], config.baseline, config.budget), t["cost"][kind])) \
        if good else None
    alloc["seconds"] = round(time.perf_counter() - t0, 2)
    alloc["table"] = [{k: v for k, v in row.items()} for row in table.rows]
    pass_knobs = knobs()
    closure = next((n for n in config.names if pass_knobs[n].closure), None)
    if best is not None and closure is not None:
        best = quantize_closure(best, trials.chosen_of(best["n"]), table, trials.extra, trials.verify, kind, alloc,
                                feeds, trials.cache, trials.key, closure)
    alloc["reused_steps"] = trials.memo.hits  # chain steps taken from an earlier trial (ChainMemo)
    describe_result(trials, best, config)
    if best is None:  # nothing is written on exit 4, the plot neither (the report says how close it came)
        raise BudgetError(f"cost target not met within the budget: {alloc['result']}", report)
    if config.plot:
        try:
            alloc["plot"] = str(plot_allocation(alloc, config.plot, config.budget))
        except ImportError as e:
            report.warnings.append(f"--plot needs matplotlib (pip install 'onnxshrink[plot]'): {e}")
    if best.get("model") is None:
        best = trials.verify(best["n"], materialize=True)
        if best.get("rebuilt_mismatch"):
            raise BudgetError(f"the chosen configuration {best['n']}, rebuilt from the measurement cache, no longer "
                              f"meets {'the budget' if not best['budget_ok'] else 'the cost target'} (nothing "
                              f"written; rerun with --no-cache)", report)
    return best["model"], best["records"]


def _orders_differ(a: list, b: list) -> bool:
    """Whether two greedy orders choose differently at some step."""
    return len(a) != len(b) or any(x["chosen"] != y["chosen"] for x, y in zip(a, b))


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


def quantize_closure(best, chosen, table, extra, verify, kind, alloc, feeds, cache, vkey, pass_name=None):
    """The chosen configuration with the units of ``pass_name`` (default: the pass whose knob is the
    closure, ``Knob.closure``: quantize) raised to a stronger strength together, for each of the
    knob's ``closure_strengths`` (quantize: QDQ int8, then dynamic int8 for its MatMul units), kept
    when it keeps the budget, meets the target *and* measures faster (interleaved, one thread).
    Per strength s, first every unit below s that has a measured row at s; when that breaks the
    budget, the longest prefix of them by marginal loss per MAC (loss at s minus loss at the unit's
    chosen strength, over the layer's MACs: compute-heavy, harmless units first) that keeps it, by
    bisection. The variants are timed in turn against the configuration kept so far, so the
    fastest clearly faster one wins. A unit quantized among float neighbours pays Q/DQ conversions
    at both ends, so only the timing decides; the size target alone never asks for it."""
    pass_name = pass_name or next(name for name, knob in knobs().items() if knob.closure)
    log: list = []
    variants = [lab for s in knobs()[pass_name].closure_strengths
                for lab in [_closure_variant(best, chosen, table, extra, verify, kind, pass_name, s, log)] if lab]
    if not variants:
        if log:
            alloc["closure"] = "; ".join(log)
        return best
    kept, kept_chosen = best, chosen
    for label in variants:
        # the timing decides once; its verdict is cached with the trials so a rerun makes the same choice
        key = digest(vkey, "closure-3", sorted((p, u, sv) for (p, u), sv in kept_chosen.items()),
                     sorted((p, u, sv) for (p, u), sv in extra[label].items()))
        hit = cache.get(key)
        was_cached = hit is not None
        if hit is None:
            a, b = verify(kept["n"], materialize=True), verify(label, materialize=True)
            hit = speed_verdict(a["model"], b["model"], feeds)
            cache.put(key, hit)
        raised = sum(1 for pu, sv in extra[label].items() if pu[0] == pass_name and kept_chosen.get(pu) != sv)
        log.append(f"{label} ({raised} units raised to int8): {hit['ms'][1]:.2f} ms vs {hit['ms'][0]:.2f} ms for "
                   f"{kept['n']}, speed-up {hit['speedup']:.3f}x, 95 % interval {hit['interval'][0]:.3f}-"
                   f"{hit['interval'][1]:.3f} (interleaved, 1 thread; kept when clearly faster: the "
                   f"interval above {hit.get('margin', CLEAR_MARGIN):g}x){' (cached)' if was_cached else ''}")
        # clearly faster by a margin: a tie within timing noise (a tiny model) must not flip the decision
        if hit["faster"]:
            kept, kept_chosen = verify(label), extra[label]
    alloc["closure"] = "; ".join(log)
    return kept


def _closure_variant(best, chosen, table, extra, verify, kind, pass_name, strength, log) -> str | None:
    """The label of the closure's configuration at ``strength`` that keeps the budget and meets the
    target (``quantize_closure``), or None."""
    rows = {(r["unit"], r["strength"]): r for r in table.rows if r["pass"] == pass_name}
    have = {u: s for (p, u), s in chosen.items() if p == pass_name}
    rest = sorted({u for (u, s), r in rows.items() if s == strength and math.isfinite(r.get("loss", math.inf))
                   and (r["saving"].get(kind) or 0) > 0} - {u for u, s in have.items() if s >= strength})
    if not rest:
        return None

    def marginal(u):
        now = rows.get((u, have[u])) if u in have else None
        base = now["loss"] if now is not None and math.isfinite(now.get("loss", math.inf)) else 0.0
        macs = (table.layer_cost.get(u) or {}).get("macs") or 1
        return max(rows[(u, strength)]["loss"] - base, 0.0) / macs

    rest.sort(key=lambda u: (marginal(u), u))
    tag = "q" if strength >= 1.0 else f"s{strength:g}:"

    def trial(k):
        label = f"{best['n']}+{tag}{k}"
        if label not in extra:
            extra[label] = {**chosen, **{(pass_name, u): strength for u in rest[:k]}}
        return label, verify(label, decide_on_cost=True)

    def outcome(t) -> str:
        return "target missed (fidelity not measured)" if t.get("decided") else \
            f"budget {'kept' if t['budget_ok'] else 'broken'}"

    label, t = trial(len(rest))
    log.append(f"{label}: {outcome(t)}")
    if t["budget_ok"] and t["target_met"]:
        return label
    lo, hi = 0, len(rest)
    for _ in range(MAX_BISECT - 1):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        lab, tm = trial(mid)
        log.append(f"{lab}: {outcome(tm)}")
        lo, hi = (mid, hi) if (tm["budget_ok"] and tm["target_met"]) else (lo, mid)
    if lo == 0:
        log.append(f"no prefix at strength {strength:g} keeps the budget")
        return None
    return trial(lo)[0]


def speed_verdict(model_a, model_b, feeds) -> dict:
    """Whether ``model_b`` is clearly faster than ``model_a`` (``runtime.compare_speed``), with the
    timings behind the verdict, as the cache stores it."""
    cmp = compare_speed(model_a, model_b, feeds, decides=(("faster", 1.0),))
    return {**cmp.as_dict(), "faster": cmp.faster_than(1.0), "margin": cmp.margin}


def _rank(row, kind):
    return row["loss"] / max(row["saving"][kind], 1e-300)


def _decision(row, kind, i) -> dict:
    return {"pass": row["pass"], "unit": row["unit"], "strength": row["strength"], "loss": row["loss"],
            "saving": row["saving"].get(kind), "cached": row.get("cached"),
            "why": f"rank {i + 1} by loss per {kind} saved ({_rank(row, kind):.3g})"}


def _shortfall(kind, target_abs, base_value, closest, trials, budget) -> str:
    name = KIND_NAMES[kind]
    if closest is None:
        return f"no configuration kept the budget {budget} (not even the passes' weakest)"
    v = closest["cost"][kind]
    return (f"the smallest {name} within the budget {budget} is {v:.4g} = {v / float(base_value):.3f} of the "
            f"input's (target {target_abs / float(base_value):.3f}); {len(trials)} configurations verified")
