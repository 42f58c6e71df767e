"""Shared sensitivity of compressible units, measured once, and allocation toward a cost target.

Units and strengths (one ``Knob`` per lossy pass, declared by the pass itself as its ``knob``
beside its code and found through the pass registry (``knobs()``); each knob turns per-unit choices
into that pass's own per-unit options, so a unit is always compressed by the pass itself, and
merges them with the user's options of the pass):

  prune     a prunable channel group (key: its first producing node); strength r = fraction of its
            channels removed (lowest importance first, consumers refit): ``prune.group_ratios``
            {producer: r} (``passes/prune/knob.py``).
  svd       a Conv (2-D, group 1) / Gemm / MatMul layer; strength f = fraction of its parameters
            kept: rank ``k = max(1, floor(f n m / (n + m)))`` of its n x m weight view (channel_out
            form for convs), resolved on the graph it is applied to: ``svd.ranks`` {layer: [form, k]}
            (``passes/svd/knob.py``).
  quantize  a Conv / ConvTranspose / Gemm / MatMul node (with the factor pair svd made of it):
            strength 0.5 = its weights stored int8 with float activations (``quantize.fallback=int8``:
            a quarter of the bytes at float speed), 0.75 = dynamic int8 (MatMul/Gemm with a 2-D
            weight: ``quantize.dynamic_nodes``), 1 = QDQ int8 (integer kernels); nodes below 1 and not
            dynamic go to ``quantize.exclude``, nodes not chosen at all also to
            ``quantize.float_weights`` (``passes/quantize/knob.py``).

Measurement of one (unit, strength): the pass applied to the base model with only that unit at
that strength, then on the validation samples, against the ORIGINAL model's outputs,

  loss   = drop of the budget's metric from the base model's own score (clipped at 0; infinite
           scores such as the SQNR of an unchanged model count 0) + 0.01 (1 - cosine) + 0.01 mse,
           the small terms ranking units a discrete metric (accuracy) cannot tell apart;
  saving = cost(base) - cost(candidate) for parameters, weight bytes, MACs and (optionally)
           measured single-thread latency on onnxruntime's CPU EP.

On large models (``proxy.use_proxy``) the rows come from ``proxy.py`` instead: one capture, local
errors times per-layer gains measured through one shared session (approximate rows say so in
``row["proxy"]``).

Each measurement is a pure function of (model bytes, data, metric, pass, unit, strength, pass
options) and is cached on disk under the sha256 of exactly that (``cache.MeasurementCache``), so a
second run with the same inputs measures nothing; measurements run through ``executor.py`` (serial,
a spawned process pool, or Ray) and come back in input order, so every executor gives the same
table and the same decisions (latency is the one measured, hence machine-dependent, figure).

Allocation (``greedy_order``): candidates sorted by loss per unit of saving in the target's cost
(bytes, MACs or latency); walking that order, a unit takes the candidate's strength when it is
stronger than what it has (upgrades replace, weaker ones are skipped). The cost of a set of choices
is estimated per layer, multiplicatively across passes (pruning half a layer then quantizing it
saves 1 - 0.5 x 0.25 of its bytes, not 0.5 + 0.75): ``cost = base - sum_layers c_l (1 - prod_p
(1 - s_pl / c_l))``. The manager then verifies prefixes of this order end to end (``allocate`` in
manager.py): the shortest prefix whose *measured* cost meets the target, and when the budget fails
there, shorter prefixes (the worst choices dropped first) until it holds.
"""

from __future__ import annotations

__all__ = ["Choice", "SensitivityTable", "knobs", "measure_sensitivity", "greedy_order", "estimate_cost",
           "apply_pass", "batched_outputs"]

import math
import os
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.cache import MeasurementCache, data_digest, digest, model_digest
from onnxshrink.data import ListSource
from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.graph.cost import model_cost, model_stats
from onnxshrink.metrics import fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.knob import LAYER_OPS, weighted_nodes
from onnxshrink.passes.registry import create_pass, registry
from onnxshrink.pipeline.executor import SerialExecutor
from onnxshrink.pipeline.proxy import one_blas_thread, proxy_rows
from onnxshrink.runtime import make_session, measure_latency

VERSION = "sens-2"  # sens-2: the knobs' per-unit options are typed (dicts, not strings)
PROXY_VERSION = "proxy-2"  # proxy-2: rows without a usable gain are measured
NO_PROXY = {"no_proxy": True}  # cached under a row's proxy key when the proxy cannot give that row
COST_KINDS = ("params", "weight_bytes", "macs", "latency_ms")


@dataclass(frozen=True)
class Choice:
    """One unit of one pass at one strength."""

    pass_name: str
    unit: str
    strength: float

    def key(self) -> str:
        return f"{self.pass_name}:{self.unit}@{self.strength:g}"


def knobs() -> dict:
    """{pass name: its Knob} of the registered passes that declare one (``Pass.knob``), in the
    registry's (pipeline) order."""
    return {name: cls.knob for name, cls in registry().items() if cls.knob is not None}


# ---------------------------------------------------------------------------- applying and measuring
def apply_pass(model: onnx.ModelProto, pass_name: str, options: dict, ctx) -> tuple[onnx.ModelProto, str]:
    """Run one pass with ``options`` on ``model``: (new model, "") or, when the pass changes nothing,
    (the model itself, the pass's reason)."""
    p = create_pass({pass_name: options})
    res = p.run(model_to_graph(model), ctx)
    if not res.modified:
        return model, res.reason or "nothing changed"
    return graph_to_model(res.graph, ctx.template), ""


def cost_of(model: onnx.ModelProto, shapes: dict | None, feeds: dict | None = None, latency: bool = False,
            runs: int = 20) -> dict:
    st = model_stats(model, shapes)
    out = {"params": st["params"], "weight_bytes": st["weight_bytes"], "macs": st["macs"]}
    if latency and feeds is not None:
        out["latency_ms"] = measure_latency(model, feeds, runs=runs)
    return out


def layer_costs(model: onnx.ModelProto, shapes: dict | None) -> dict:
    """{layer: {params, weight_bytes, macs}} of the weighted nodes (the per-layer pools the cost
    estimate draws from)."""
    per = model_cost(model, shapes).get("per_node", {}) or {}
    out = {}
    inits = {t.name: t for t in model.graph.initializer}
    for n, size in weighted_nodes(model, ops=LAYER_OPS + ("ConvTranspose",)):
        nbytes = sum(int(np.prod(inits[i].dims)) * onnx.helper.tensor_dtype_to_np_dtype(inits[i].data_type).itemsize
                     for i in n.input[1:] if i in inits)
        out[n.name] = {"params": size, "weight_bytes": nbytes, "macs": per.get(n.name)}
    return out


BATCH = 16  # samples stacked into one run by batched_outputs


def batched_outputs(model: onnx.ModelProto, samples) -> list:
    """The outputs of ``model`` (onnxruntime's optimizations on, as the user runs it) on each of
    ``samples`` (an iterable of feeds), one list per sample. When every input and output of the
    model has the same named first dimension (a model exported for batches: ``batch``) and the
    samples have one shape with a first dimension of 1, they run ``BATCH`` at a time, stacked along
    that axis and split back, provided the stacked run of the first two gives their one-by-one
    outputs bit for bit (onnxruntime's CPU kernels compute each sample's rows alike whatever the
    batch; checked here, not assumed); otherwise, and for a batch whose run fails, one sample at a
    time. A stacked run reads each weight once per batch instead of once per sample: on a ViT-S at
    17 tokens, 2-2.7x faster."""
    sess = make_session(model, optimize=True, low_memory=True)
    names = [o.name for o in sess.get_outputs()]
    it = iter(samples)
    head = [s for _, s in zip(range(2), it)]
    out = [sess.run(names, s) for s in head]
    firsts = {v.shape[0] if v.shape else None for v in list(sess.get_inputs()) + list(sess.get_outputs())}
    free = len(firsts) == 1 and isinstance(next(iter(firsts)), str) and next(iter(firsts))
    if len(head) == 2 and free and _stackable(head, head[0]):
        try:
            same = all(np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
                       for x, y in zip(out, _stacked(sess, names, head)) for a, b in zip(x, y))
        except Exception:  # a shape fixed inside the graph: one sample at a time
            same = False
        if same:
            def run(chunk: list) -> list:
                try:
                    return _stacked(sess, names, chunk)
                except Exception:  # e.g. an output whose first dimension is not the batch after all
                    return [sess.run(names, s) for s in chunk]

            chunk: list = []
            for s in it:
                if not _stackable([s], head[0]):
                    out += run(chunk) if chunk else []
                    chunk = []
                    out.append(sess.run(names, s))
                    continue
                chunk.append(s)
                if len(chunk) == BATCH:
                    out += run(chunk)
                    chunk = []
            return out + (run(chunk) if chunk else [])
    return out + [sess.run(names, s) for s in it]


def _stackable(samples: list, like: dict) -> bool:
    """Every sample has ``like``'s inputs, shapes and dtypes, with a first dimension of 1."""
    return all(s.keys() == like.keys() and all(
        np.shape(s[k]) == np.shape(like[k]) and np.ndim(s[k]) > 0 and np.shape(s[k])[0] == 1
        and np.asarray(s[k]).dtype == np.asarray(like[k]).dtype for k in s) for s in samples)


def _stacked(sess, names: list, samples: list) -> list:
    """One run of ``samples`` stacked along the first axis, split back into per-sample outputs."""
    outs = sess.run(names, {k: np.concatenate([np.asarray(s[k]) for s in samples]) for k in samples[0]})
    if any(np.ndim(o) == 0 or np.shape(o)[0] != len(samples) for o in outs):
        raise ValueError("an output's first dimension is not the batch")
    return [[o[i:i + 1] for o in outs] for i in range(len(samples))]


class SensitivityData:
    """What a measurement needs besides the model, picklable: samples, reference, labels, metric."""

    def __init__(self, calib, val, reference, labels, budget, user_metric, shapes, seed, one_blas_thread=False):
        self.calib, self.val, self.reference, self.labels = calib, val, reference, labels
        self.budget, self.user_metric, self.shapes, self.seed = budget, user_metric, shapes, seed
        self.one_blas_thread = one_blas_thread  # the proxy mode's measurements (proxy.one_blas_thread)

    def context(self, template):
        calib = ListSource(self.calib, description=f"{len(self.calib)} sensitivity samples")
        val = ListSource(self.val, description=f"{len(self.val)} sensitivity validation samples")
        ctx = Context(calib=calib, val=val, reference=self.reference, budget=None, seed=self.seed,
                      template=template)

        def evaluator(m):
            return fidelity(self.reference, batched_outputs(m, self.val), self.user_metric, self.val, self.labels)
        ctx.evaluator = evaluator
        return ctx


def loss_of(scores: dict, base_scores: dict, budget) -> float:
    """The budget metric's drop from the base model's score (see the module docstring)."""
    tie = 0.01 * max(0.0, 1.0 - scores.get("cosine", 0.0)) + 0.01 * min(scores.get("mse", 1.0), 1.0)
    if not scores:
        return math.inf
    metric = budget.metric if budget is not None else "cosine"
    higher = budget.op == ">=" if budget is not None else True
    v, b = scores.get(metric), base_scores.get(metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.inf
    drop = (b - v) if higher else (v - b)
    if not math.isfinite(drop):
        drop = 0.0 if (b == v or (higher and v == math.inf) or (not higher and v == -math.inf)) else (
            math.inf if not math.isfinite(v) else 0.0)
    return max(0.0, drop) + tie


_WORKER: dict = {}


def _load_bundle(path: str):
    if path not in _WORKER:
        with open(path, "rb") as f:
            _WORKER.clear()
            _WORKER[path] = pickle.load(f)
    return _WORKER[path]


def measure_task(task: tuple) -> dict:
    """One measurement (module level and plain arguments, so a process pool or Ray can run it):
    (bundle path, pass name, options, latency?) -> {scores, cost, seconds, stats | error}."""
    bundle, pass_name, options, latency = task
    model, data = _load_bundle(bundle)
    t0 = time.perf_counter()
    try:
        ctx = data.context(model)
        with one_blas_thread(getattr(data, "one_blas_thread", False)):
            cand, reason = apply_pass(model, pass_name, options, ctx)
        if cand is model:
            return {"unchanged": True, "reason": reason,
                    "seconds": time.perf_counter() - t0}
        scores = ctx.evaluate(cand)
        cost = cost_of(cand, data.shapes, data.val[0] if data.val else None, latency)
    except Exception as e:  # a unit the pass cannot apply alone: never chosen, and the reason kept
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}",
                "seconds": time.perf_counter() - t0}
    return {"scores": _json_scores(scores), "cost": cost, "seconds": time.perf_counter() - t0}


def _json_scores(s: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in s.items()}


@dataclass
class SensitivityTable:
    """Rows of {pass, unit, strength, loss, saving{kind}, scores, cost, cached} plus the base's."""

    base_cost: dict
    base_scores: dict
    rows: list = field(default_factory=list)
    layer_cost: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_sensitivity(model: onnx.ModelProto, passes: list, data: SensitivityData, budget, cache=None, executor=None,
                        latency: bool = False, user_options: dict | None = None, progress=None,
                        max_units: int = 0, proxy: bool = False, only: set | None = None,
                        base_scores: dict | None = None) -> SensitivityTable:
    """Measure every (unit, strength) of the knobs of ``passes`` on ``model`` (see the module
    docstring); cached measurements are read, the others run through ``executor``. ``proxy``: every
    row the knob's proxy gives comes from ``proxy.proxy_rows`` (cached too, under their own key), a
    cached measurement of it notwithstanding, so that the table does not depend on what earlier runs
    measured; the rest is read or measured; ``only``: just these choices (``Choice.key()``);
    ``base_scores``: the base model's scores when already measured (a table of the same model and
    data)."""
    t0 = time.perf_counter()
    cache = cache if cache is not None else MeasurementCache(enabled=False)
    user_options = user_options or {}
    if base_scores is None:
        base_scores = fidelity(data.reference, batched_outputs(model, data.val), data.user_metric, data.val,
                               data.labels)
    feeds = data.val[0] if data.val else None
    base_cost = cost_of(model, data.shapes, feeds, latency)
    mkey = model_digest(model)
    dkey = digest(data_digest(data.calib), data_digest(data.val),
                  data_digest([{str(i): np.asarray(o) for i, o in enumerate(r)} for r in data.reference]),
                  [int(np.asarray(x).reshape(-1)[0]) for x in data.labels] if data.labels is not None else None,
                  getattr(data.user_metric, "__qualname__", None), data.seed)
    tasks, keys, meta = [], [], []
    pass_knobs = knobs()
    for pname in passes:
        knob = pass_knobs[pname]
        units = knob.units(model, data.shapes)
        if max_units and len(units) > max_units and knob.capped:
            units = sorted(units, key=lambda u: -u[1])[:max_units]
        if knob.exclude_option is not None:
            excluded = set(user_options.get(pname, {}).get(knob.exclude_option) or [])
            units = [u for u in units if u[0] not in excluded]
        for unit, _size in units:
            for s in knob.unit_strengths(model, unit):
                opts = knob.merge({**user_options.get(pname, {}), **knob.probe}, knob.options(model, {unit: s}))
                key = digest(VERSION, mkey, dkey, pname, unit, s, opts, latency)
                if only is not None and Choice(pname, unit, s).key() not in only:
                    continue
                tasks.append(opts)
                keys.append(key)
                meta.append(Choice(pname, unit, s))
    proxy_info = None
    if proxy:
        # every row the proxy gives comes from the proxy, even where an earlier run measured it (the
        # boundary rows ``allocate.verify_boundary`` measures are cached too): the table, and so the
        # allocation, is then the same whatever the cache holds; a cached measurement only serves the
        # rows the proxy cannot give (measured on PP-OCRv4 rec at 0.15 before: 0.229, 0.285, 0.313 and
        # 0.999 of the input's as the smallest size within the budget, from run to run on one cache)
        pkeys = {i: digest(PROXY_VERSION, k) for i, k in enumerate(keys)}
        results: list = [cache.get(pk) for pk in pkeys.values()]
        wanted = [i for i in pkeys if results[i] is None]
        if wanted:
            got, proxy_info = proxy_rows(model, [(meta[i], pass_knobs[meta[i].pass_name]) for i in wanted], data,
                                         lambda sc: loss_of(sc, base_scores, budget))
            for i in wanted:
                results[i] = got.get(meta[i].key()) or NO_PROXY  # NO_PROXY: a warm run need not ask again
                cache.put(pkeys[i], results[i])
        results = [cache.get(keys[i]) if r.get("no_proxy") else r for i, r in enumerate(results)]
    else:
        results = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        ex = executor or SerialExecutor()
        bundle = None
        if ex.name == "serial":  # no pickling: a user metric may be a lambda
            bundle = f"inproc-{id(model)}"
            _WORKER.clear()
            _WORKER[bundle] = (model, data)
        else:
            fd, bundle = tempfile.mkstemp(suffix=".pkl", prefix="onnxshrink-sens-")
            with os.fdopen(fd, "wb") as f:
                pickle.dump((model, data), f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if ex.name != "serial":
                ex.share_file(bundle)  # workers on other machines (a Ray cluster) get a copy
            items = [(bundle, meta[i].pass_name, tasks[i], latency) for i in todo]
            track = progress.track if progress is not None else (lambda it, d, total=None: it)
            # each result is cached as soon as it arrives: an interrupted sweep keeps what it measured
            for i, r in zip(todo, track(ex.imap(measure_task, items), f"sensitivity ({ex.name})", total=len(items))):
                results[i] = r
                if "error" not in r:  # a failure may be passing (memory, a killed worker): measured again next time
                    cache.put(keys[i], r)
        finally:
            if ex.name != "serial":
                Path(bundle).unlink(missing_ok=True)
            _WORKER.clear()
    measured = set(todo)
    rows = []
    for i, (c, r) in enumerate(zip(meta, results)):
        row = {"pass": c.pass_name, "unit": c.unit, "strength": c.strength, "cached": i not in measured}
        if "proxy" in r:
            row.update(loss=r["loss"], saving={k: r["saving"].get(k) for k in COST_KINDS}, proxy=r["proxy"])
        elif "scores" in r:
            saving = {k: (base_cost[k] - r["cost"][k]) if base_cost.get(k) is not None and r["cost"].get(k) is not None
                      else None for k in COST_KINDS}
            row.update(loss=loss_of(r["scores"], base_scores, budget), saving=saving,
                       metric=r["scores"].get(budget.metric if budget is not None else "cosine"),
                       cosine=r["scores"].get("cosine"))
        else:
            row.update(loss=math.inf, saving={}, skipped=r.get("error") or r.get("reason"))
        rows.append(row)
    info = {"measured": len(todo), "cached": len(keys) - len(todo), "candidates": len(keys),
            "mode": "proxy" if proxy else "measured", "proxied": sum(1 for r in rows if r.get("proxy")),
            **({"proxy": proxy_info} if proxy_info else {}),
            "executor": (executor.name if executor is not None else "serial") if todo else "none (all cached)",
            "seconds": round(time.perf_counter() - t0, 2), "samples": {"calibration": len(data.calib),
                                                                        "validation": len(data.val)}}
    return SensitivityTable(base_cost=base_cost, base_scores=_json_scores(base_scores), rows=rows,
                            layer_cost=layer_costs(model, data.shapes), info=info)


# ---------------------------------------------------------------------------- allocation
def _layer_of(row: dict, table: SensitivityTable) -> str:
    return row["unit"] if row["unit"] in table.layer_cost else f"{row['pass']}:{row['unit']}"


def estimate_cost(table: SensitivityTable, chosen: dict, kind: str) -> float:
    """Estimated cost of ``chosen`` ({(pass, unit): row}): per layer, savings of several passes
    combine multiplicatively (``c_l (1 - prod_p (1 - s_pl / c_l))``); latency adds up."""
    base = float(table.base_cost[kind])
    per_layer: dict = {}
    for row in chosen.values():
        s = row["saving"].get(kind) or 0.0
        lay = _layer_of(row, table)
        per_layer.setdefault(lay, []).append(s)
    saved = 0.0
    for lay, ss in per_layer.items():
        c = (table.layer_cost.get(lay) or {}).get(kind) if kind != "latency_ms" else None
        if not c or len(ss) == 1:
            saved += sum(ss)
            continue
        keep = 1.0
        for s in ss:
            keep *= max(0.0, 1.0 - min(max(s, 0.0) / c, 1.0))
        saved += c * (1.0 - keep)
    return base - saved


def greedy_order(table: SensitivityTable, kind: str) -> list[dict]:
    """Steps of the greedy allocation: each {choice row, estimated cost after it, chosen: {(pass,
    unit): strength}}, by loss per unit of saving in ``kind`` (ties: larger saving first)."""
    cands = [r for r in table.rows if math.isfinite(r.get("loss", math.inf)) and (r["saving"].get(kind) or 0) > 0]
    cands.sort(key=lambda r: (r["loss"] / r["saving"][kind], -r["saving"][kind], r["pass"], r["unit"], r["strength"]))
    chosen: dict = {}
    steps = []
    for r in cands:
        k = (r["pass"], r["unit"])
        if k in chosen and chosen[k]["saving"][kind] >= r["saving"][kind]:
            continue
        chosen[k] = r
        steps.append({"row": r, "estimated": estimate_cost(table, chosen, kind),
                      "chosen": {kk: v["strength"] for kk, v in chosen.items()}})
    return steps
