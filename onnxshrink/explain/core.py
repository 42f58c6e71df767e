"""explain: where a shrunk CANDIDATE of ORIGINAL loses its fidelity, why, and the fix.

0. ORIGINAL as the candidate's passes saw it (``_as_the_passes_saw_it``): when the candidate's
   quantized weights are nearer ORIGINAL after the lossless cleanup pass than before it (they hold
   its BatchNorms and constant scales folded in: onnxshrink's cleanup, or quantize's own
   canonicalization), the cleaned ORIGINAL is compared; put back into the unfolded original such
   weights apply each BatchNorm twice (a conv + BatchNorm CRNN: every convolution's share read
   100-1000x the candidate's whole error). A candidate that kept them unfolded (onnxruntime's
   ``quantize_static`` on the raw model) is compared with ORIGINAL as given.
1. Match the tensors of the two graphs (``match.py``) and measure each matched tensor's error on the
   samples, in graph order (``measure.py``).
2. Attribute the output error to units (a matched tensor and the segment of nodes producing it):
   - the output error: the worst output's channel-balanced NSR (``measure.balanced_nsr``);
   - the local jump ``J(t) = NSR(t) - max_a NSR(a)`` over the matched ancestors ``a`` (where the error
     appears, not where it has accumulated to);
   - for quantized units, among the ``top`` largest jumps, the output NSR with that unit's quantization
     alone (the ORIGINAL with only its Q/DQ and weights from CANDIDATE, everything else float) and its
     *share* of the candidate's output NSR (``alone / candidate``; shares need not add to 1: errors
     of different layers interact);
   - for pruned channel groups and factorized layers (``structural.py``; a pruned tensor has another
     shape, so it is not matched and the error shows at the next matched tensor), up to ``2 top`` of
     them, the strongest first: the output NSR with onnxshrink's prune / svd of only that unit.
3. Name the causes and their fixes (``causes.py``), rank the units (measured share, then jump), and
   turn the fixes of the top culprits into a recipe (``recipe.py``).
"""

from __future__ import annotations

__all__ = ["explain", "check_interface", "samples_fidelity", "json_ready", "DEFAULT_TOP", "DEFAULT_SAMPLES"]

import math
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.data import as_source, input_specs
from onnxshrink.errors import UsageError
from onnxshrink.explain.causes import OUTLIER_RATIO, diagnose, diagnose_structural, outlier_ratio
from onnxshrink.explain.match import build_segments, channel_axis, match_models
from onnxshrink.explain.measure import measure_tensors, output_nsr, quantize_only, run_outputs
from onnxshrink.explain.recipe import build_recipe
from onnxshrink.explain.structural import measure_alone, structural_units
from onnxshrink.graph.convert import graph_to_model
from onnxshrink.metrics import fidelity
from onnxshrink.passes.cleanup.constants import constants_to_initializers
from onnxshrink.passes.equalize import equalize_pairs, find_pairs
from onnxshrink.passes.quantize.plan import FOLDABLE_ACTIVATIONS, WEIGHTED_OPS
from onnxshrink.pipeline.report import Report
from onnxshrink.runtime import capture_activations

DEFAULT_TOP = 8  # units measured alone (each is one extra model run over the samples)
DEFAULT_SAMPLES = 16
ALONE_SAMPLES = 8  # each unit alone is one model run: on the first 8 samples (the share's denominator too)
RECIPE_CULPRITS = 3  # the fixes of this many top culprits go into the recipe ...
MIN_RECIPE_SHARE = 0.05  # ... when their share of the output error is at least this
# plain 8-bit rounding (no specific cause) is named, with "keep float" as its fix, only for a unit whose
# quantization alone makes this much of the output error: below, keeping one layer float among many
# that each add a little was measured not to help (onnxshrink's guard=false int8 demo CNN: 0.869 -> 0.813)
MIN_GENERIC_SHARE = 0.2


def check_interface(original: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """UsageError unless the two models have the same input and output names (a candidate is a
    shrunk version of the original, run on the same data)."""
    def names(vis, inits=()):
        return [v.name for v in vis if v.name not in inits]

    oi = names(original.graph.input, {t.name for t in original.graph.initializer})
    ci = names(candidate.graph.input, {t.name for t in candidate.graph.initializer})
    oo, co = names(original.graph.output), names(candidate.graph.output)
    if sorted(oi) != sorted(ci) or sorted(oo) != sorted(co):
        raise UsageError(f"CANDIDATE's interface differs from ORIGINAL's (inputs {ci} vs {oi}, outputs {co} vs {oo}): "
                         f"explain compares a shrunk model with the model it came from")


def explain(original: onnx.ModelProto, candidate: onnx.ModelProto, data, samples: int = DEFAULT_SAMPLES,
            top: int = DEFAULT_TOP, calib_path: str | None = None, budget: str | None = None,
            progress=None) -> dict:
    """The explain result as a JSON-ready dict (module docstring)."""
    t0 = time.perf_counter()
    timings: dict = {}
    lap = [t0]

    def tick(name):
        now = time.perf_counter()
        timings[name] = round(now - lap[0], 2)
        lap[0] = now

    check_interface(original, candidate)
    candidate = _constants_as_weights(candidate)
    original = _as_the_passes_saw_it(_constants_as_weights(original), candidate)
    src = as_source(data, input_specs(original))
    if src is None or len(src) == 0:
        raise UsageError("explain needs samples (--calib DIR)")
    feeds = [src.get(i) for i in range(min(len(src), samples) if samples else len(src))]
    m, go, gc = match_models(original, candidate)
    errs = measure_tensors(original, candidate, m, feeds)
    tick("match_and_capture")
    build_segments(m, go, gc)
    units = m.units
    jump = {}
    for t, u in units.items():
        anc = max((errs.nsr.get(a, 0.0) for a in u.ancestors), default=0.0)
        jump[t] = errs.nsr.get(t, 0.0) - anc
    out_nsr = output_nsr(errs.reference, errs.candidate_outputs)
    # the candidate as it will run (onnxruntime's optimizations on: integer kernels)
    before = _fidelity(errs.reference, run_outputs(candidate, feeds, optimize=True))
    tick("segments_and_fidelity")

    ranked_jump = sorted((t for t in units if units[t].quantized), key=lambda t: -jump[t])
    alone: dict = {}
    measured = _to_measure(ranked_jump, units, errs, top)
    it = progress.track(measured, "explain: units alone") if progress is not None else measured
    k = min(len(feeds), ALONE_SAMPLES)
    out_nsr_k = output_nsr(errs.reference[:k], errs.candidate_outputs[:k])
    for t in it:
        model = quantize_only(original, [units[t]])
        _ensure_domains(model, candidate)
        alone[t] = output_nsr(errs.reference[:k], run_outputs(model, feeds[:k]))

    tick("alone")
    node_ops = {n.name: n.op for n in go.nodes}
    go_nodes = {n.name: n for n in go.nodes}
    node_attrs = {n.name: dict(n.attrs) for n in go.nodes}
    pairs, _ = find_pairs(go)
    seconds = {n2.name: (act.outputs[0].name if act is not None else n1.outputs[0].name) for n1, act, n2 in pairs}
    eq_after = _equalized_ratios(original, pairs, units, errs, feeds[: min(4, len(feeds))])
    quantized_nodes = {u.node for u in units.values() if u.quantized and u.node}
    rows = []
    for t, u in units.items():
        if t not in jump:
            continue
        qc = [c for c in u.consumers if c in quantized_nodes]
        causes = diagnose(u, errs.channel_max.get(t), eq_after, node_ops, node_attrs, qc, seconds,
                          _float_node(u, go_nodes))
        share = alone[t] / out_nsr_k if t in alone and out_nsr_k > 0 else None
        if share is None or share < MIN_GENERIC_SHARE:  # plain rounding is named a cause only where it dominates
            causes = [c for c in causes if c["cause"] != "quantization"]
        ratio, chans = outlier_ratio(errs.channel_max.get(t))
        rows.append({
            "tensor": t, "node": u.node or f"(input {t})", "op": u.op, "nodes": u.nodes,
            "cosine": errs.cosine.get(t), "nsr": errs.nsr.get(t), "sqnr_db": _db(errs.nsr.get(t)),
            "jump": jump[t], "alone_nsr": alone.get(t), "share": share,
            "quantized": u.quantized, "activation_bits": u.act.bits if u.act is not None else None,
            "per_tensor": u.act.per_tensor if u.act is not None else None,
            "channel_range_ratio": round(ratio, 2), "outlier_channels": chans[:16],
            "causes": causes,
        })
    structural = structural_units(original, candidate) if m.kind != "quantized" and m.kind != "unchanged" else []
    if structural:
        structural.sort(key=lambda su: -(su.ratio if su.kind == "pruned" else 1 - su.rank / max(su.full, 1)))
        measure_alone(original, structural[: max(0, 2 * top)], feeds[:k], errs.reference[:k], progress)
    for su in structural:
        share = su.alone_nsr / out_nsr_k if su.alone_nsr is not None and out_nsr_k > 0 else None
        rows.append({"tensor": None, "node": su.key, "op": "prune group" if su.kind == "pruned" else "svd layer",
                     "nodes": su.nodes, "cosine": None, "nsr": None, "sqnr_db": None, "jump": None,
                     "alone_nsr": su.alone_nsr, "share": share, "quantized": False, "activation_bits": None,
                     "per_tensor": None, "channel_range_ratio": None, "outlier_channels": [],
                     "causes": diagnose_structural(su), "not_measured": su.reason or None})
    tick("causes_and_structural")
    rows_by_graph = [r for r in rows if r["tensor"] is not None]
    rows.sort(key=lambda r: (r["share"] is None, -(r["share"] or 0.0), -(r["jump"] or 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    culprits = [r for r in rows[:RECIPE_CULPRITS] if r["causes"] and r["causes"][0]["fix"]
                and (r["share"] is None or r["share"] >= MIN_RECIPE_SHARE)]
    recipe = build_recipe(m.kind, units, structural, gc, culprits, calib_path, budget)
    return {
        "kind": m.kind,
        "samples": len(feeds),
        "matched_tensors": len(units),
        "unmatched_dropped": errs.dropped,
        "output_nsr": out_nsr,
        "output_sqnr_db": _db(out_nsr),
        "before": before,
        "ranking": rows,
        "tensors": [{"tensor": r["tensor"], "node": r["node"], "cosine": r["cosine"], "sqnr_db": r["sqnr_db"],
                     "jump": r["jump"]} for r in rows_by_graph],
        "alone_measured": len(alone),
        "recipe": recipe,
        "outlier_ratio_threshold": OUTLIER_RATIO,
        "seconds": round(time.perf_counter() - t0, 2),
        "timings_s": timings,
    }


def _db(nsr):
    if nsr is None:
        return None
    return float("inf") if nsr <= 0 else float(-10 * np.log10(nsr))


def _ensure_domains(model: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """Q/DQ copied from the candidate may use a domain (com.microsoft) the original does not import."""
    have = {o.domain for o in model.opset_import}
    for o in candidate.opset_import:
        if o.domain not in have:
            model.opset_import.append(onnx.helper.make_opsetid(o.domain, o.version))


def _as_the_passes_saw_it(original: onnx.ModelProto, candidate: onnx.ModelProto) -> onnx.ModelProto:
    """ORIGINAL after the lossless cleanup pass when the candidate's quantized weights are nearer it
    than ORIGINAL's (module docstring, step 0); else ORIGINAL as given (also when cleanup changes
    nothing or cannot run)."""
    from onnxshrink.passes.base import Context
    from onnxshrink.passes.cleanup import CleanupPass

    try:
        res = CleanupPass().run(gs.import_onnx(original), Context(template=original))
        if not res.modified:
            return original
        cleaned = graph_to_model(res.graph, original)
        return cleaned if _weight_error(cleaned, candidate) < _weight_error(original, candidate) else original
    except Exception:  # explain still runs on the original as given
        return original


def _weight_error(original: onnx.ModelProto, candidate: onnx.ModelProto) -> float:
    """Mean relative squared distance ``|W_cand - W|^2 / |W|^2`` between the candidate's dequantized
    weights and ``original``'s, over the weights the matching pairs (inf when it pairs none)."""
    m, go, gc = match_models(original, candidate)
    build_segments(m, go, gc)
    errs = [float(np.sum((w.dequantized.astype(np.float64) - w.original) ** 2) / max(np.sum(
            w.original.astype(np.float64) ** 2), 1e-30))
            for u in m.units.values() for w in u.weights if w.dequantized.shape == w.original.shape]
    return float(np.mean(errs)) if errs else math.inf


def _constants_as_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Constant`` nodes as initializers (exact; ``passes/cleanup/constants.py``): a weight an
    exporter writes as a Constant node (PaddlePaddle's) is then a weight, not an activation."""
    g = gs.import_onnx(model)
    return graph_to_model(g, model) if constants_to_initializers(g) else model


def _float_node(u, nodes: dict) -> str:
    """The node ``quantize.exclude`` names to keep unit ``u`` float: a Relu/Clip right after a
    Conv/MatMul/Gemm is folded into that node's output range by quantize's placement (no unit of its
    own), so the weighted node is named; else the unit's main node."""
    n = nodes.get(u.node)
    if n is not None and n.op in FOLDABLE_ACTIVATIONS and n.inputs and n.inputs[0].inputs:
        p = n.inputs[0].inputs[0]
        if p.op in WEIGHTED_OPS:
            return p.name
    return u.node


def _to_measure(ranked_jump: list, units: dict, errs, top: int) -> list:
    """The units measured alone: the ``top`` largest local jumps, then (up to ``2 top`` in all) the
    matched ancestors of the largest jumps and the tensors with outlier channels: an error can appear
    one layer late (an outlier channel crushed by a per-tensor scale shows where the next layer scales
    it back down)."""
    want = list(ranked_jump[:top])
    extra = [a for t in ranked_jump[: max(1, top // 2)] for a in units[t].ancestors]
    extra += [t for t in ranked_jump if outlier_ratio(errs.channel_max.get(t))[0] >= OUTLIER_RATIO]
    for t in extra:
        if len(want) >= 2 * top:
            break
        if t in units and units[t].quantized and t not in want:
            want.append(t)
    return want


def _equalized_ratios(original, pairs: list, units: dict, errs, feeds) -> dict:
    """For outlier tensors produced by an equalizable Conv pair: the outlier ratio after cross-layer
    equalization of the original (exact rescaling), on a few samples."""
    between = {(act.outputs[0].name if act is not None else n1.outputs[0].name) for n1, act, _ in pairs}
    want = [t for t, u in units.items() if u.act is not None and u.act.per_tensor and t in between
            and outlier_ratio(errs.channel_max.get(t))[0] >= OUTLIER_RATIO]
    if not want:
        return {}
    g = gs.import_onnx(original)
    equalize_pairs(g)
    model = graph_to_model(g, original)
    cm: dict = {}
    for cap in capture_activations(model, want, feeds):
        for t in want:
            a = np.abs(np.asarray(cap[t]))
            ax = channel_axis(a.ndim)
            v = np.max(a, axis=tuple(i for i in range(a.ndim) if i != ax))
            cm[t] = v if t not in cm else np.maximum(cm[t], v)
    return {t: outlier_ratio(v)[0] for t, v in cm.items()}


def samples_fidelity(original: onnx.ModelProto, model: onnx.ModelProto, data, samples: int = DEFAULT_SAMPLES) -> dict:
    """``metrics.fidelity`` of ``model`` against ``original`` on the first ``samples`` samples of
    ``data``, both run as deployed (onnxruntime's optimizations on for ``model``, off for the reference),
    with ``balanced_sqnr``: the channel-balanced SQNR in dB (``measure.balanced_nsr``)."""
    src = as_source(data, input_specs(original))
    feeds = [src.get(i) for i in range(min(len(src), samples) if samples else len(src))]
    return _fidelity(run_outputs(original, feeds), run_outputs(model, feeds, optimize=True))


def _fidelity(reference: list, outputs: list) -> dict:
    """``metrics.fidelity`` and the channel-balanced SQNR in dB (``measure.balanced_nsr``)."""
    f = fidelity(reference, outputs)
    f["balanced_sqnr"] = _db(output_nsr(reference, outputs))
    return f


def json_ready(res: dict) -> dict:
    """``res`` as JSON-safe values (inf and nan as strings, numpy scalars as numbers), cleaned as the
    optimize report is (``pipeline.report.Report.to_dict``)."""
    return Report(allocation=res).to_dict()["allocation"]
