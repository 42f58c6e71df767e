"""The quantize pass: static QDQ quantization with calibration, placed for onnxruntime's integer kernels.

A run (``quantize_static``): refuse an already quantized model; canonicalize the float graph
(``prepare.py``) and choose the numeric scheme, upgrading the opset when per-channel weights need it
(``scheme.py``); place the integer units (``plan.py``); calibrate the ranges of every tensor any
plan could quantize (``calibrate.py``); write the QDQ graph (``qdq.py``); hold the fidelity floor
and check speed (``guard.py``, with the per-unit analysis of ``unit_analysis.py``); store the
weights of nodes kept float int8 (``fallback.py``).

Data-aware extras (no training):
- Bias correction (``bias_correction``): each output channel's mean shift from the per-unit
  analysis, removed in the bias (``unit_analysis.py``).
- Rounding (``rounding=gptq``, off by default: measured, it does not pay with 8-bit activations):
  with the scales fixed, integer weights that minimise ``|(W - s Q) X|^2`` on the calibration inputs
  by GPTQ error feedback (``rounding.py``).
- Cross-layer equalization (``equalize=true``, off by default): exact per-channel rescaling of
  Conv -> [Relu] -> Conv pairs before calibration (``equalize.py``).
- Weight-only (``weights_only=int4|int8``): instead of QDQ, onnxruntime's MatMulNBits quantizer on the
  MatMul/Gemm weights, block size chosen on the calibration samples (``weight_only.py``).
- Wider activations: for a target that also takes 16-bit activations (``wide_activation_dtype``: QNN
  HTP) and ``activation_dtype=auto``, an 8-bit plan that misses the floor or keeps units in float is
  redone A16W8 (plain and bias-corrected); the plan holding the floor with the fewest float units,
  then the best cosine, is kept (``stats["activation_choice"]``).
- LSTMs: after the run, LSTM nodes with constant weights become onnxruntime's
  ``DynamicQuantizeLSTM`` (int8 W and R, the gate GEMMs integer with activations quantized at run
  time; ``dynamic.dynamic_lstm``), kept with ``dynamic=auto`` when the result holds the fidelity
  floor and measures clearly faster than without (``stats["dynamic_lstm"]``), always with
  ``dynamic=on``, never with ``off``. onnxruntime has no static integer LSTM kernel.
- Back-off: ``weaker()`` keeps the 1, 2, 4, ... most sensitive units in float, up to the number of
  weighted units the last run planned.
"""

from __future__ import annotations

__all__ = ["QuantizeOptions", "QuantizePass", "QuantizeRun", "quantize_static"]

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.cache import model_digest
from onnxshrink.errors import InputError, UsageError
from onnxshrink.graph.convert import model_to_graph
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.equalize import equalize_pairs
from onnxshrink.passes.quantize.calibrate import DEFAULT_BINS, CalibrationSamples, calibrate_ranges
from onnxshrink.passes.quantize.dynamic import (
    dynamic_graph,
    dynamic_lstm,
    dynamic_matmuls,
    judge_trial,
    lstm_nodes,
    try_dynamic,
)
from onnxshrink.passes.quantize.fallback import FloatFallback
from onnxshrink.passes.quantize.guard import FidelityCheck, Placement, QuantizeGuard
from onnxshrink.passes.quantize.knob import QuantizeKnob
from onnxshrink.passes.quantize.plan import (
    WEIGHTED_OPS,
    PlacementRules,
    float_activations,
    has_float_weights,
    plan_units,
    refuse_quantized,
)
from onnxshrink.passes.quantize.prepare import prepare_float_graph
from onnxshrink.passes.quantize.qdq import QdqBuilder, drop_qdq_value_info
from onnxshrink.passes.quantize.regions import describe_regions
from onnxshrink.passes.quantize.rounding import round_units
from onnxshrink.passes.quantize.scheme import choose_scheme, upgrade_opset, use_qdq_domain
from onnxshrink.passes.quantize.smooth import AUTO_ALPHA, AUTO_MIN_RATIO, smooth_activations, smooth_groups
from onnxshrink.passes.quantize.unit_analysis import UnitAnalysis
from onnxshrink.passes.quantize.weight_only import run_weights_only
from onnxshrink.passes.registry import register
from onnxshrink.runtime import capture_activations


@dataclass
class QuantizeOptions:
    """Options of the quantize pass."""

    calibrator: Literal["minmax", "percentile", "entropy", "mse"] = field(
        default="minmax", metadata={"help": "activation range estimator"})
    percentile: float = field(default=99.999, metadata={"help": "percentile for calibrator=percentile"})
    per_channel: bool = field(default=True, metadata={"help": "per-output-channel weight scales (needs opset >= 13)"})
    activation_dtype: Literal["auto", "uint8", "int8", "uint16", "int16"] = field(
        default="auto", metadata={"help": "activation type; auto: the target's, else uint8 (16-bit: A16W8, "
                                          "Q/DQ in the com.microsoft domain below opset 21)"})
    reduce_range: Literal["auto", "true", "false"] = field(
        default="auto", metadata={"help": "7-bit weights (auto: on x86 without VNNI)"})
    elementwise: bool = field(default=True, metadata={
        "help": "quantize Add/Mul/Sigmoid/Concat/pools whose inputs are already integer"})
    matmul_activations: bool = field(default=True, metadata={
        "help": "quantize MatMul of two activations (attention scores) when both are integer"})
    fold_activations: bool = field(default=True, metadata={"help": "fold Relu/Clip into the preceding unit's range"})
    upgrade_opset: bool = field(default=True, metadata={
        "help": "upgrade opset < 13 to 13 for per-channel weights (checked numerically)"})
    bias_correction: bool = field(default=False, metadata={
        "help": "correct each output channel's mean shift in the bias"})
    div_to_mul: bool = field(default=False, metadata={
        "help": "rewrite Div by a constant as Mul by its reciprocal (integer hard-swish chains)"})
    equalize: bool = field(default=False, metadata={
        "help": "cross-layer equalization of Conv -> [Relu] -> Conv pairs first (exact; passes/equalize.py)"})
    smooth: float | Literal["auto", "off"] = field(default="auto", metadata={
        "help": "SmoothQuant: migrate the outlier channels of LayerNorm outputs into the weights of the MatMuls "
                "reading them, exactly (passes/quantize/smooth.py); a number: its strength alpha in (0, 1] on "
                "every such output; auto: alpha 0.5 where the largest channel range is >= 8x the median's"})
    rounding: Literal["nearest", "gptq"] = field(default="nearest", metadata={
        "help": "weight rounding: nearest, or gptq (error feedback that minimises each layer's output "
                "error on the calibration inputs, same scales; see passes/rounding.py)"})
    rounding_samples: int = field(default=16, metadata={"help": "calibration samples for rounding=gptq"})
    weights_only: Literal["off", "int4", "int8"] = field(default="off", metadata={
        "help": "instead of QDQ: block-wise int4/int8 weights of MatMul/Gemm with float activations "
                "(onnxruntime's MatMulNBits quantizer; for transformers; see passes/weight_only.py)"})
    block_size: int = field(default=0, metadata={
        "help": "weights_only block size (0: of 128/64/32, the smallest file that holds min_cosine on "
                "calibration samples)"})
    symmetric: bool = field(default=False, metadata={"help": "weights_only: symmetric blocks (no zero points)"})
    accuracy_level: int = field(default=0, metadata={
        "help": "weights_only: MatMulNBits accuracy_level (0: onnxruntime's default; 4: int8 compute on CPU)"})
    dynamic: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "dynamic int8 MatMul (onnxruntime's quantize_dynamic: activations quantized at run time; "
                "passes/quantize/dynamic.py); auto: tried first on models whose MACs are mostly in MatMul/Gemm "
                "(transformers) with the guard on and the cpu target, kept when it holds the fidelity floor "
                "and is clearly faster than fp32; also LSTMs with constant weights as DynamicQuantizeLSTM after "
                "the static plan (auto: kept when it holds the floor and is clearly faster than without)"})
    dynamic_nodes: list[str] = field(default_factory=list, metadata={
        "help": "MatMul/Gemm nodes quantized dynamically (int8 weights, activations quantized at run time), the "
                "others as the remaining options say (the allocation's per-node choice; dynamic.py)"})
    dynamic_weight_bits: dict[str, int] = field(default_factory=dict, metadata={
        "help": "{node: bits} of dynamic_nodes whose weights are stored per column at 2-7 bits and decoded to "
                "int8 at load (the same integer kernel; the allocation's strength 1.25; dynamic.py)"})
    bins: int = field(default=DEFAULT_BINS, metadata={"help": "histogram bins per tensor"})
    max_samples: int = field(default=0, metadata={"help": "calibration samples used (0: all)"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "node names kept in float"})
    fallback: Literal["auto", "float", "int8"] = field(default="auto", metadata={
        "help": "weights of the nodes kept in float: int8 stores them per channel as Cast x Mul, which "
                "onnxruntime folds at load (float speed and activations, 1/4 of the bytes; "
                "passes/weight_storage.py); auto: int8 (no target, cpu or openvino) while the budget (or the "
                "guard's floor) holds, the most sensitive layers left float when needed; float: as they are"})
    float_weights: list[str] = field(default_factory=list, metadata={
        "help": "node names whose weights stay float whatever fallback says"})
    keep_float: int = field(default=0, metadata={"help": "number of most sensitive units kept in float"})
    guard: bool = field(default=True, metadata={
        "help": "keep sensitive units in float until min_cosine holds and return the float model "
                "unchanged when no placement is faster than fp32 (measured)"})
    min_cosine: float = field(default=0.99, metadata={
        "help": "fidelity floor of the guard when no budget is given (mean cosine vs float)"})
    min_speedup: float = field(default=1.0, metadata={"help": "the guard's required speed-up over fp32"})
    max_float_fraction: float = field(default=0.34, metadata={
        "help": "most units the guard keeps in float when no budget is given"})


@register
class QuantizePass(Pass):
    """Static int8 QDQ quantization with calibrated ranges, placed for onnxruntime's integer kernels."""

    name = "quantize"
    summary = "static int8 QDQ quantization (calibrated, per-channel, placed for integer kernels)"
    lossless = False
    needs_data = True
    min_opset = 1
    Options = QuantizeOptions
    knob = QuantizeKnob()

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        # weighted units the last run planned (None before any run): keeping that many in float leaves
        # nothing to quantize, so weaker() stops below it. The manager calls weaker() right after a
        # run on the same graph and gives it no graph, so the count comes from that run.
        self.planned_units: int | None = None
        self.integer_only = False  # the last run's target has no float unit (QNN HTP before v73)

    def weaker(self):
        o = self.options
        if self.integer_only:
            return None  # a device without a float unit: no unit can be kept float
        nxt = max(1, 2 * o.keep_float)
        if self.planned_units is not None and nxt >= self.planned_units:
            return None
        return QuantizePass(dataclasses.replace(o, keep_float=nxt))

    def describe_strength(self) -> str:
        return f"keep_float={self.options.keep_float}"

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        trial: dict = {}
        self.integer_only = bool(getattr(ctx.target, "integer_only", False))
        on_cpu = ctx.target is None or ctx.target.name == "cpu"
        if o.dynamic_nodes and o.weights_only == "off":
            refuse_quantized(graph)
            return self._per_node_dynamic(graph, ctx)
        wide = getattr(ctx.target, "wide_activation_dtype", None) if o.activation_dtype == "auto" else None
        lstms = o.weights_only == "off" and o.dynamic != "off" and (o.dynamic == "on" or (o.guard and on_cpu)) \
            and any(n.op == "LSTM" for n in graph.nodes)
        model = ctx.input_model(graph) if wide or lstms else None  # the float input, before the run changes graph
        if o.weights_only == "off" and (o.dynamic == "on" or (o.dynamic == "auto" and o.guard and on_cpu)):
            refuse_quantized(graph)
            dynamic = self._dynamic(graph, ctx, trial)
            if dynamic is not None:
                self.planned_units = 0
                return self._dynamic_lstm(dynamic, model, ctx) if lstms else dynamic
        done = quantize_static(graph, o, ctx, final=not lstms)
        if wide and done.outcome and (not done.outcome["holds"] or done.outcome["kept_float"]):
            done = self._wider_activations(done, model, ctx, wide)
        if trial:
            done.result.stats["dynamic"] = trial
        self.planned_units = done.weighted_units
        return self._dynamic_lstm(done.result, model, ctx) if lstms else done.result

    def _dynamic_lstm(self, result: PassResult, model_f: onnx.ModelProto, ctx: Context) -> PassResult:
        """``result`` with its LSTMs as onnxruntime's ``DynamicQuantizeLSTM`` (``dynamic.dynamic_lstm``):
        with ``dynamic=on`` always; with ``auto`` (guard on, this CPU) when the result with them holds the
        fidelity floor against the float model ``model_f`` (the budget when there is one) and measures
        clearly faster than the result without them (``Context.compare_speeds``); ``stats["dynamic_lstm"]``
        says what was measured either way."""
        o = self.options
        base = ctx.to_model(result.graph)
        names = [n for n in lstm_nodes(base) if n not in set(o.exclude)]
        if not names:
            return result
        stats = dict(result.stats)
        trial = stats["dynamic_lstm"] = {"nodes": names}
        try:  # as the pass will return it (graph and back): the model timed is then the model the manager gets
            cand = ctx.to_model(model_to_graph(dynamic_lstm(base, o.exclude)))
        except Exception as e:  # the tool cannot take this model: the result stays as it is
            trial.update(chosen=False, reason=f"quantize_dynamic failed: {type(e).__name__}: {e}")
            return dataclasses.replace(result, stats=stats)
        if o.dynamic == "auto":
            samples, check = self._fidelity_check(ctx, model_f)
            if not judge_trial(trial, cand, base, check, samples.first(), ctx, 1.0, "the result without it"):
                return dataclasses.replace(result, stats=stats)
        else:
            trial.update(chosen=True, reason="dynamic=on")
        note = "; ".join(x for x in (result.note, f"{len(names)} LSTM dynamic int8 (DynamicQuantizeLSTM)") if x)
        return PassResult(model_to_graph(cand), True, stats, note=note, model=cand)

    def _fidelity_check(self, ctx: Context, model_f: onnx.ModelProto) -> tuple[CalibrationSamples, FidelityCheck]:
        """The samples and the fidelity check (the budget, else the guard's floor) of a dynamic trial
        against the float model ``model_f``."""
        samples = CalibrationSamples(ctx.calib, ctx.val, self.options.max_samples)
        check = FidelityCheck(ctx, model_f, samples, self.options.min_cosine)
        check.set_floor(self.options.min_cosine)
        return samples, check

    def _dynamic(self, graph: gs.Graph, ctx: Context, trial: dict) -> PassResult | None:
        """Dynamic int8 MatMul (``dynamic.py``): the result with ``dynamic=on``; with ``auto`` the result
        when its trial holds the floor and is clearly faster, else None (``trial`` says why)."""
        o = self.options
        stats = {"scheme": {"weights": "int8 per tensor", "activations": "uint8, quantized at run time (dynamic)",
                            "per_channel": False}}
        model_f = ctx.input_model(graph)  # the graph is as the pass got it
        if o.dynamic == "on":
            qg, qm = dynamic_graph(model_f, o.exclude), None
        else:
            samples, check = self._fidelity_check(ctx, model_f)
            try:
                qm = try_dynamic(model_f, o, check, samples.first(), stats, ctx)
            except Exception as e:  # the tool cannot take this model: the static path decides
                stats["dynamic"] = {"chosen": False, "reason": f"quantize_dynamic failed: {type(e).__name__}: {e}"}
                qm = None
            trial.update(stats["dynamic"])
            if qm is None:
                return None
            qg = model_to_graph(qm)  # qm is its export (the model timed)
        stats["dynamic_matmuls"] = dynamic_matmuls(qg)
        if not stats["dynamic_matmuls"]:
            if o.dynamic == "on":
                raise InputError("dynamic: the model has no MatMul/Gemm with constant weights to quantize")
            return None
        note = "dynamic int8 MatMul (activations quantized at run time)" + (
            f": {trial['reason']}" if trial.get("reason") else "")
        return PassResult(qg, True, stats, note=note, model=qm)

    def _per_node_dynamic(self, graph: gs.Graph, ctx: Context) -> PassResult:
        """``dynamic_nodes``: the other nodes first as the remaining options say (static QDQ, int8 or float
        weights, with the dynamic nodes kept float with float weights), then the dynamic nodes by
        onnxruntime's ``quantize_dynamic`` restricted to them (``dynamic.dynamic_graph``)."""
        o = self.options
        dyn = sorted(set(o.dynamic_nodes) - set(o.exclude))
        rest = dataclasses.replace(o, dynamic_nodes=[], dynamic="off", exclude=sorted(set(o.exclude) | set(dyn)),
                                   float_weights=sorted(set(o.float_weights) | set(dyn)))
        done = quantize_static(graph, rest, ctx)
        self.planned_units = done.weighted_units
        stats = done.stats
        g = done.result.graph if done.result.modified else graph
        bits = {n: b for n, b in o.dynamic_weight_bits.items() if n in dyn}
        qg = dynamic_graph(ctx.to_model(g), include=dyn, weight_bits=bits)
        stats["dynamic_matmuls"] = dynamic_matmuls(qg)
        if not stats["dynamic_matmuls"] and not done.result.modified:
            return PassResult(graph, False, stats, reason="no node to quantize")
        widths = sorted(set(bits.values()))
        if bits:
            stats["dynamic_weight_bits"] = {str(b): sum(1 for v in bits.values() if v == b) for b in widths}
        note = f"{stats['dynamic_matmuls']} MatMul dynamic int8 (activations quantized at run time)" + (
            f", {len(bits)} of them with {'/'.join(map(str, widths))}-bit weights" if bits else "") + (
            f"; {done.result.note}" if done.result.note else "")
        return PassResult(qg, True, stats, note=note)

    def _wider_activations(self, run8: QuantizeRun, model, ctx: Context, wide: str) -> QuantizeRun:
        """The target also takes 16-bit activations (QNN HTP: A16W8) and the 8-bit plan missed the
        fidelity floor or kept units in float to hold it: quantize again with ``wide`` activations,
        plain and with bias correction (with 16-bit activations the int8 weights' rounding is the
        main error left, and its per-channel mean shift is what bias correction removes), and keep
        the plan that holds the floor with the fewest float units, then the fewest units at 16 bits
        (the 8-bit plan may be mixed: ``regions.py``), then the best cosine (ties with the 8-bit plan:
        8-bit, half the bandwidth)."""
        def rank(o):
            return (o["holds"], -o["kept_float"], -o.get("wide", 0.0), o["cosine"])

        act8 = run8.stats.get("scheme", {}).get("activations")
        cands = {act8: run8}
        for bc in (False, True) if not self.options.bias_correction else (True,):
            done = quantize_static(gs.import_onnx(model), dataclasses.replace(
                self.options, activation_dtype=wide, bias_correction=bc), ctx)
            if done.result.modified and done.outcome:
                cands[wide + ("+bias_correction" if bc and not self.options.bias_correction else "")] = done
        best = max(cands, key=lambda k: (rank(cands[k].outcome), k == act8))
        chosen = cands[best]
        if best != act8 and chosen.stats.get("quantized_units"):
            o8 = run8.outcome
            chosen.stats["precision_regions"] = [{
                "precision": wide, "units": sum(chosen.stats["quantized_units"].values()),
                "weighted": chosen.stats["quantized_units"]["weighted"], "nodes": [],
                "why": f"{act8} misses the fidelity floor (cosine {o8['cosine']:.5f}" +
                       (f", {o8['kept_float']} units float" if o8["kept_float"] else "") +
                       f"; no mixed plan held); the whole model at {best}: cosine {chosen.outcome['cosine']:.5f}"}]
        chosen.result.stats["activation_choice"] = {
            "chosen": best, "candidates": {k: v.outcome for k, v in cands.items()},
            "rule": "the target takes 8- and 16-bit activations: the plan that holds the fidelity floor with the "
                    "fewest units kept float, then the fewest units at 16 bits, then the best cosine (ties: 8-bit)"}
        return chosen


def _smooth(graph: gs.Graph, ctx: Context, samples: CalibrationSamples, smooth) -> dict:
    """SmoothQuant on ``graph`` in place (``smooth.py``), with each group's per-channel max |X| from
    the calibration samples; ``smooth`` is alpha, or "auto" (``AUTO_ALPHA`` where a group's outlier
    ratio reaches ``AUTO_MIN_RATIO``)."""
    alpha, min_ratio = (AUTO_ALPHA, AUTO_MIN_RATIO) if smooth == "auto" else (float(smooth), 0.0)
    if not 0 < alpha <= 1:
        raise UsageError(f"quantize.smooth is SmoothQuant's alpha in (0, 1], or auto or off; got {smooth}")
    names = [g.tensor.name for g in smooth_groups(graph)]
    if not names:
        return {"alpha": alpha, "groups": [], "reason": "no LayerNorm (or per-channel affine) output read only by "
                                                         "MatMuls with constant weights"}
    model = ctx.to_model(graph)
    # the same float model seen again (a weaker attempt, another allocation trial): its maxima from ctx.cache
    key = ("quantize.smooth_absmax", model_digest(model), tuple(names), id(samples.source), samples.max_samples)
    absmax = ctx.cache.get(key)
    if absmax is None:
        absmax = {}
        for acts in capture_activations(model, names, samples.all()):
            for n, v in acts.items():
                m = np.max(np.abs(np.asarray(v, np.float64).reshape(-1, v.shape[-1])), axis=0)
                absmax[n] = m if n not in absmax else np.maximum(absmax[n], m)
        ctx.cache[key] = absmax
    del model
    return smooth_activations(graph, absmax, alpha, min_ratio)


def cached_ranges(ctx: Context, model_f, tensors: list, samples: CalibrationSamples, o, levels: int,
                  outputs: list | None = None) -> dict:
    """``calibrate_ranges`` through ``ctx.cache``: a tensor's range depends only on its own values, so
    the ranges an earlier run measured on the same float model (by content digest; a weaker attempt,
    another allocation trial) are reused and only the tensors not seen yet are calibrated (then
    ``outputs`` gets the float model's outputs of the first samples, ``calibrate_ranges``)."""
    key = ("quantize.ranges", model_digest(model_f), id(samples.source), samples.max_samples, o.calibrator, levels,
           o.bins, o.percentile)
    known = ctx.cache.setdefault(key, {})
    missing = [t for t in tensors if t not in known]
    if missing:
        got = calibrate_ranges(model_f, missing, samples, o.calibrator, levels=levels, bins=o.bins,
                               percentile=o.percentile, outputs=outputs)
        known.update({t: got.get(t) for t in missing})  # None: no range (not a float tensor)
    return {t: known[t] for t in tensors if known[t] is not None}


@dataclass
class QuantizeRun:
    """One quantization of a graph: the pass result, its stats, the weighted units of its plan (before
    any unit is kept float; 0 when nothing is planned) and the fidelity search's outcome
    ``{"holds", "cosine", "kept_float"}`` (None when the guard did not run)."""

    result: PassResult
    stats: dict
    weighted_units: int
    outcome: dict | None = None


def quantize_static(graph: gs.Graph, o: QuantizeOptions, ctx: Context, final: bool = True) -> QuantizeRun:
    """Quantize ``graph`` (modified in place on the way) with the options ``o`` (module docstring);
    ``final=False``: a later step of the pass changes the result (its LSTMs made dynamic int8), so
    the guard's timing is not kept for the speed contract."""
    stats: dict = {}
    timings = stats["timings_s"] = {}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        t = time.perf_counter()
        timings[name] = round(t - t0, 2)
        t0 = t

    refuse_quantized(graph)
    if o.weights_only != "off":
        stats["prepared"] = prepare_float_graph(graph, target=ctx.target)
        return QuantizeRun(PassResult(*run_weights_only(graph, o, ctx, stats)), stats, 0)
    scheme, stats["scheme"] = choose_scheme(o, ctx.target)
    stats["prepared"] = prepare_float_graph(graph, o.div_to_mul, ctx.target)
    if o.equalize:
        stats["equalize"] = equalize_pairs(graph)
    if not has_float_weights(graph):
        raise InputError("the model has no float Conv/MatMul/Gemm weights to quantize")
    samples = CalibrationSamples(ctx.calib, ctx.val, o.max_samples)
    if o.smooth != "off":
        smoothed = _smooth(graph, ctx, samples, o.smooth)
        if smoothed["groups"] or o.smooth != "auto":
            stats["smooth"] = smoothed
    graph_in = graph
    graph = upgrade_opset(graph, scheme, o.upgrade_opset, ctx.to_model, samples.first, stats)
    # float activations need no per-channel DequantizeLinear: the float result keeps the input's opset
    pre_opset = graph_in if graph is not graph_in else None
    if graph.opset and graph.opset < 13:
        scheme.per_channel = False
    prepare_float_graph(graph, o.div_to_mul, ctx.target)
    model_f = ctx.to_model(graph)
    graph = gs.import_onnx(model_f)
    use_qdq_domain(scheme, int(graph.opset or 0), stats)
    lap("prepare_and_opset")

    check = FidelityCheck(ctx, model_f, samples, o.min_cosine)
    fallback = FloatFallback(o, ctx, check, model_f, samples, stats)

    def float_result(why: str) -> PassResult:
        return fallback.float_result(graph, pre_opset if pre_opset is not None else gs.import_onnx(model_f), why)

    # a target reading Q/DQ only at the inputs of integer ops (OpenVINO) gets no integer elementwise units;
    # a device without a float unit (QNN HTP before v73) gets every op between Q/DQ
    inputs_only = getattr(ctx.target, "qdq_placement", "fused") == "inputs"
    integer_only = bool(getattr(ctx.target, "integer_only", False))
    rules = PlacementRules(o.elementwise and not inputs_only, o.matmul_activations, o.fold_activations,
                           float_tensors=float_activations(model_f) if integer_only else None)
    if integer_only:
        stats["placement"] = (f"every op between Q/DQ (HTP v{ctx.target.htp_arch} has no float unit); "
                              f"no unit is kept float")
    excluded = set(o.exclude)
    units, reasons = plan_units(graph, excluded, rules)
    if not any(u.kind == "weighted" for u in units.values()):
        # no weighted node can be integer (excluded, or no integer form): no calibration needed
        stats["nodes"] = reasons
        weighted = {n.name for n in graph.nodes if n.op in WEIGHTED_OPS}
        why = collections.Counter(r.removeprefix("kept float: ") for n, r in reasons.items() if n in weighted)
        return QuantizeRun(float_result("no weighted node can be integer: " + "; ".join(
            f"{k} ({why[k]} node{'s' if why[k] > 1 else ''})" for k in sorted(why, key=why.get, reverse=True))),
            stats, 0)
    # calibrate every tensor any plan could quantize, so excluding units later needs no new pass; the
    # user's exclusions hold in every plan (an excluded Relu/Clip is not folded: its unit's own output
    # is the one quantized)
    cand, _ = plan_units(graph, set(o.exclude), rules)
    tensors = sorted({t for u in cand.values() for t in (u.inputs + [u.output])})
    ranges = cached_ranges(ctx, model_f, tensors, samples, o, scheme.qmax - scheme.qmin + 1,
                           fallback.float_outputs)
    clips = {u.output: u.clip for u in cand.values() if u.clip is not None}
    n_units = sum(1 for u in units.values() if u.kind == "weighted")
    lap("calibrate")
    builder = QdqBuilder(scheme, model_f, graph, ranges, clips)
    builder.inputs_only = inputs_only
    builder.float_readers_per_axis = getattr(ctx.target, "name", None) in (None, "cpu")
    wide = getattr(ctx.target, "wide_activation_dtype", None) if o.activation_dtype == "auto" else None
    if wide and np.dtype(scheme.activation_dtype).itemsize == 1 and (o.guard or ctx.budget is not None):
        # mixed 8/16-bit regions, tried by the guard when the 8-bit plan misses the floor (regions.py)
        builder.wide, _ = choose_scheme(dataclasses.replace(o, activation_dtype=wide), ctx.target)
        builder.wide.per_channel = scheme.per_channel
        use_qdq_domain(builder.wide, int(graph.opset or 0), {"scheme": {}})
    if inputs_only:
        stats["placement"] = f"Q/DQ only at the inputs of integer ops (the {ctx.target.name} target)"
    if o.rounding == "gptq":
        w_units = [u for u in cand.values() if u.kind == "weighted"]
        builder.rounded, stats["rounding"] = round_units(
            model_f, graph, [(u.node, u.weight_axis) for u in w_units], builder.weight_quant, samples.all,
            capture_activations, scheme.wmax, n_samples=o.rounding_samples)
        lap("rounding")

    # per-unit analysis on a shadow model: each unit quantized alone, on float inputs
    # (the guard asks for it only when its fidelity floor fails: most models never pay for it)
    analysis = UnitAnalysis(builder, cand, samples, stats, shifts=o.bias_correction)
    analysed = analysis.run() if o.keep_float or o.bias_correction else None
    lap("analyse")
    builder.bias_shift = ({k: a["shift"] for k, a in analysed.items()} if o.bias_correction and analysed else None)
    order = analysis.order() if analysed else None
    if o.keep_float and order and not integer_only:
        excluded |= set(order[: o.keep_float])
        units, reasons = plan_units(graph, excluded, rules)
    placement = Placement(builder.build(units), units, reasons, excluded)
    outcome = None
    if o.guard or ctx.budget is not None:
        guard = QuantizeGuard(o, ctx, check, builder, rules, analysis, samples, stats, final=final)
        placement, outcome = guard.run(placement, order)
        lap("guard")
        if placement.graph is None:
            stats["nodes"] = placement.reasons
            return QuantizeRun(float_result(stats.get("guard_reason", "no faster placement")), stats, n_units, outcome)
    units, reasons, excluded = placement.units, placement.reasons, placement.excluded
    if placement.wide:
        act8, act16 = stats["scheme"]["activations"], np.dtype(builder.wide.activation_dtype).name
        stats["scheme"]["activations"] = f"mixed {act8}/{act16}"
        stats["precision_regions"] = describe_regions(units, set(placement.wide), stats.get("wide_seeds", []),
                                                      analysis.nsr, act8, act16, builder.graph_f)
        stats["wide_units"] = len(placement.wide)
        if builder.wide.qdq_domain:
            stats["scheme"]["qdq_domain"] = builder.wide.qdq_domain
    elif builder.wide is not None and units:
        act8 = stats["scheme"]["activations"]
        why = (f"the whole model holds the fidelity floor at {act8} (cosine {outcome['cosine']:.5f})"
               if outcome and outcome["holds"] else f"{act8} (no plan held the fidelity floor)")
        stats["precision_regions"] = [{"precision": act8, "units": len(units), "weighted": sum(
            1 for u in units.values() if u.kind == "weighted"), "nodes": list(units)[:8], "why": why}]
    for n in excluded:
        if n in reasons and n in analysis.nsr and not reasons[n].startswith("kept float: small"):
            reasons[n] = f"kept float: sensitive (alone it adds noise-to-signal {analysis.nsr[n]:.2e})"
    stats["nodes"] = reasons
    stats["quantized_units"] = {k: sum(1 for u in units.values() if u.kind == k)
                                for k in ("weighted", "elementwise", "passthrough")}
    stats["kept_float"] = sorted(excluded)
    if not units:
        why = ("no node could be quantized within the fidelity budget (every unit was kept float to hold it)"
               if excluded else "no node could be quantized")
        return QuantizeRun(float_result(why), stats, n_units, outcome)
    qg, _ = fallback.store(placement.graph)
    lap("float_weights")
    drop_qdq_value_info(qg)
    return QuantizeRun(PassResult(qg, True, stats), stats, n_units, outcome)
