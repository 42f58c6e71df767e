"""Shared sensitivity of compressible units, measured once, and allocation toward a cost target.

Units and strengths (one ``Knob`` per lossy pass; each knob turns per-unit choices into that
pass's own per-unit options, so a unit is always compressed by the pass itself):

  prune     a prunable channel group (key: its first producing node); strength r = fraction of its
            channels removed (lowest importance first, consumers refit): ``prune.group_ratios``.
  svd       a Conv (2-D, group 1) / Gemm / MatMul layer; strength f = fraction of its parameters
            kept: rank ``k = max(1, floor(f n m / (n + m)))`` of its n x m weight view (channel_out
            form for convs), resolved on the graph it is applied to: ``svd.ranks``.
  quantize  a Conv / ConvTranspose / Gemm / MatMul node (with the factor pair svd made of it):
            strength 0.5 = its weights stored int8 with float activations (``quantize.fallback=int8``:
            a quarter of the bytes at float speed), 1 = QDQ int8 (integer kernels); nodes below 1 go
            to ``quantize.exclude``, nodes not chosen at all also to ``quantize.float_weights``.

Measurement of one (unit, strength): the pass applied to the base model with only that unit at
that strength, then on the validation samples, against the ORIGINAL model's outputs,

  loss   = drop of the budget's metric from the base model's own score (clipped at 0; infinite
           scores such as the SQNR of an unchanged model count 0) + 0.01 (1 - cosine) + 0.01 mse,
           the small terms ranking units a discrete metric (accuracy) cannot tell apart;
  saving = cost(base) - cost(candidate) for parameters, weight bytes, MACs and (optionally)
           measured single-thread latency on onnxruntime's CPU EP.

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

__all__ = ["Choice", "Knob", "KNOBS", "SensitivityTable", "measure_sensitivity", "greedy_order",
           "estimate_cost", "apply_pass", "unit_of_node"]

import math
import os
import pickle
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.cache import MeasurementCache, data_digest, digest, model_digest
from onnxshrink.data import ListSource
from onnxshrink.graph.channels import analyze
from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.graph.cost import model_cost, model_stats
from onnxshrink.metrics import fidelity
from onnxshrink.passes.base import Context
from onnxshrink.passes.registry import create_pass
from onnxshrink.pipeline.executor import SerialExecutor
from onnxshrink.runtime import make_session, measure_latency

VERSION = "sens-1"
COST_KINDS = ("params", "weight_bytes", "macs", "latency_ms")
WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Choice:
    """One unit of one pass at one strength."""

    pass_name: str
    unit: str
    strength: float

    def key(self) -> str:
        return f"{self.pass_name}:{self.unit}@{self.strength:g}"


def unit_of_node(name: str) -> str:
    """The layer a node came from: svd's factor pair ``L_svd_1``/``L_svd_2`` belongs to ``L``."""
    return re.sub(r"_svd_[12]$", "", name)


def _const_weight(node: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    t = inits[node.input[1]]
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return None
    return onnx.numpy_helper.to_array(t)


def _weighted_nodes(model: onnx.ModelProto, min_params: int = 0, ops: tuple = WEIGHTED):
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ops:
            continue
        if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
            continue
        t = inits[n.input[1]]
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        if size >= min_params:
            yield n, size


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class Knob:
    """How one pass exposes per-unit strengths: ``units(model, shapes)`` lists (unit, size) pairs;
    ``options(model, choices)`` gives the pass options applying exactly ``{unit: strength}``;
    ``probe`` are the options the sensitivity measurement adds (fewer samples: a ranking, not the
    final result); ``capped`` says whether ``max_units`` limits its units to the largest ones;
    ``exclude_option`` names the pass option whose units the user keeps out (never measured)."""

    pass_name = ""
    strengths: tuple = ()
    probe: dict = {}
    capped = True
    exclude_option: str | None = None

    def units(self, model: onnx.ModelProto, shapes: dict | None) -> list[tuple[str, int]]:
        raise NotImplementedError

    def options(self, model: onnx.ModelProto, choices: dict) -> dict:
        raise NotImplementedError


class PruneKnob(Knob):
    pass_name = "prune"
    strengths = (0.25, 0.5)
    probe = {"samples": 4, "latency": False}

    def units(self, model, shapes):
        a = analyze(model_to_graph(model), shapes)
        return [(g.producers[0], int(g.units)) for g in a.groups() if g.prunable and g.units >= 2 and g.producers]

    def options(self, model, choices):
        return {"mode": "importance", "group_ratios": [f"{u}={r:g}" for u, r in sorted(choices.items())],
                "latency": False}


class SvdKnob(Knob):
    pass_name = "svd"
    strengths = (0.5, 0.25)
    probe = {"samples": 8}
    min_params = 4096

    def units(self, model, shapes):
        return [(n.name, size) for n, size in _weighted_nodes(model, self.min_params)
                if n.name and self._view(n, model) is not None]

    def _view(self, node, model):
        """(form, n, m) of the node's weight as a matrix, or None when svd does not factor it."""
        inits = {t.name: t for t in model.graph.initializer}
        dims = list(inits[node.input[1]].dims)
        if node.op_type == "Conv":
            if len(dims) != 4 or int(_attr(node, "group", 1)) != 1:
                return None
            return "channel_out", dims[0], dims[1] * dims[2] * dims[3]
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return None
        if len(dims) != 2:
            return None
        return "linear", dims[0], dims[1]

    def options(self, model, choices):
        nodes = {n.name: n for n in model.graph.node if n.name}
        ranks = []
        for u, f in sorted(choices.items()):
            n = nodes.get(u)
            view = self._view(n, model) if n is not None and n.op_type in WEIGHTED else None
            if view is None:
                continue
            form, a, b = view
            ranks.append(f"{u}={form}:{max(1, int(math.floor(f * a * b / (a + b))))}")
        return {"ranks": ranks, "fold": False, "measure": False, "latency": False, "min_params": self.min_params}


class QuantizeKnob(Knob):
    pass_name = "quantize"
    strengths = (0.5, 1.0)
    probe = {"max_samples": 8}
    capped = False  # quantizing one unit is cheap to measure
    exclude_option = "exclude"
    ops = WEIGHTED + ("ConvTranspose",)

    def units(self, model, shapes):
        return [(n.name, size) for n, size in _weighted_nodes(model, ops=self.ops) if n.name]

    def options(self, model, choices):
        nodes = [n.name for n, _ in _weighted_nodes(model, ops=self.ops)]
        return {"exclude": sorted(n for n in nodes if choices.get(unit_of_node(n), 0.0) < 1.0),
                "float_weights": sorted(n for n in nodes if unit_of_node(n) not in choices),
                "fallback": "int8", "guard": False, "keep_float": 0}


KNOBS: dict[str, Knob] = {k.pass_name: k for k in (PruneKnob(), SvdKnob(), QuantizeKnob())}


def merge_options(user: dict, knob_options: dict) -> dict:
    """The user's options of a pass under the knob's per-unit ones; nodes the user excluded from
    quantization stay excluded."""
    out = {**user, **knob_options}
    for key in ("exclude", "float_weights"):
        if user.get(key) and key in knob_options:
            out[key] = sorted(set(knob_options[key]) | set(user[key]))
    if user.get("fallback") == "float" and "fallback" in knob_options:
        out["fallback"] = "float"  # the user keeps float weights float: strength 0.5 changes nothing
    return out


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
    for n, size in _weighted_nodes(model, ops=WEIGHTED + ("ConvTranspose",)):
        nbytes = sum(int(np.prod(inits[i].dims)) * onnx.helper.tensor_dtype_to_np_dtype(inits[i].data_type).itemsize
                     for i in n.input[1:] if i in inits)
        out[n.name] = {"params": size, "weight_bytes": nbytes, "macs": per.get(n.name)}
    return out


class SensitivityData:
    """What a measurement needs besides the model, picklable: samples, reference, labels, metric."""

    def __init__(self, calib, val, reference, labels, budget, user_metric, shapes, seed):
        self.calib, self.val, self.reference, self.labels = calib, val, reference, labels
        self.budget, self.user_metric, self.shapes, self.seed = budget, user_metric, shapes, seed

    def context(self, template):
        calib = ListSource(self.calib, description=f"{len(self.calib)} sensitivity samples")
        val = ListSource(self.val, description=f"{len(self.val)} sensitivity validation samples")
        ctx = Context(calib=calib, val=val, reference=self.reference, budget=None, seed=self.seed,
                      template=template)

        def evaluator(m):
            sess = make_session(m, optimize=True)
            names = [o.name for o in sess.get_outputs()]
            return fidelity(self.reference, [sess.run(names, s) for s in self.val], self.user_metric, self.val,
                            self.labels)
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
                        max_units: int = 0) -> SensitivityTable:
    """Measure every (unit, strength) of the knobs of ``passes`` on ``model`` (see the module
    docstring); cached measurements are read, the others run through ``executor``."""
    t0 = time.perf_counter()
    cache = cache if cache is not None else MeasurementCache(enabled=False)
    user_options = user_options or {}
    sess = make_session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    base_scores = fidelity(data.reference, [sess.run(names, s) for s in data.val], data.user_metric, data.val,
                           data.labels)
    feeds = data.val[0] if data.val else None
    base_cost = cost_of(model, data.shapes, feeds, latency)
    mkey = model_digest(model)
    dkey = digest(data_digest(data.calib), data_digest(data.val),
                  data_digest([{str(i): np.asarray(o) for i, o in enumerate(r)} for r in data.reference]),
                  [int(np.asarray(x).reshape(-1)[0]) for x in data.labels] if data.labels is not None else None,
                  getattr(data.user_metric, "__qualname__", None), data.seed)
    tasks, keys, meta = [], [], []
    for pname in passes:
        knob = KNOBS[pname]
        units = knob.units(model, data.shapes)
        if max_units and len(units) > max_units and knob.capped:
            units = sorted(units, key=lambda u: -u[1])[:max_units]
        if knob.exclude_option is not None:
            excluded = set(user_options.get(pname, {}).get(knob.exclude_option) or [])
            units = [u for u in units if u[0] not in excluded]
        for unit, _size in units:
            for s in knob.strengths:
                opts = merge_options({**user_options.get(pname, {}), **knob.probe}, knob.options(model, {unit: s}))
                key = digest(VERSION, mkey, dkey, pname, unit, s, opts, latency)
                tasks.append(opts)
                keys.append(key)
                meta.append(Choice(pname, unit, s))
    results: list = [cache.get(k) for k in keys]
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
                cache.put(keys[i], r)
        finally:
            if ex.name != "serial":
                Path(bundle).unlink(missing_ok=True)
            _WORKER.clear()
    measured = set(todo)
    rows = []
    for i, (c, r) in enumerate(zip(meta, results)):
        row = {"pass": c.pass_name, "unit": c.unit, "strength": c.strength, "cached": i not in measured}
        if "scores" in r:
            saving = {k: (base_cost[k] - r["cost"][k]) if base_cost.get(k) is not None and r["cost"].get(k) is not None
                      else None for k in COST_KINDS}
            row.update(loss=loss_of(r["scores"], base_scores, budget), saving=saving,
                       metric=r["scores"].get(budget.metric if budget is not None else "cosine"),
                       cosine=r["scores"].get("cosine"))
        else:
            row.update(loss=math.inf, saving={}, skipped=r.get("error") or r.get("reason"))
        rows.append(row)
    info = {"measured": len(todo), "cached": len(keys) - len(todo), "candidates": len(keys),
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
