"""Measurements of explain: the error of every matched tensor, the float activations' channel
ranges, and the output error of one unit's quantization alone.

- Error of a tensor: per sample ``metrics.compare_outputs`` of the candidate's view against the
  original tensor (cosine, SQNR in dB); the noise-to-signal ratio ``NSR = 10^(-SQNR/10) =
  |view - t|^2 / |t|^2`` is the additive measure attribution uses; means over samples.
- Output error: per sample the worst graph output's channel-balanced NSR (``balanced_nsr``: a
  detection head's class scores count as much as its box coordinates), mean over samples.
- Both models run with onnxruntime's graph optimizations off and the matched tensors added as graph
  outputs (``runtime.capture_activations``), one sample at a time: Q/DQ are simulated in float, which
  is what attribution needs (an integer kernel fused by onnxruntime rounds the same values); the
  before/after fidelity is measured separately with optimizations on (``metrics.fidelity``).
- Channel ranges: per channel ``max |t|`` over samples, along each axis that may hold channels
  (``match.channel_axes``).
- Alone: the ORIGINAL with only one unit's quantization from CANDIDATE inserted (its tensor's Q/DQ
  with the candidate's scale and zero point, its weights replaced by the candidate's dequantized ones;
  everything else float), its output NSR against the original's outputs.
"""

from __future__ import annotations

__all__ = ["TensorErrors", "measure_tensors", "quantize_only", "output_nsr", "balanced_nsr", "cosine_nsr", "nsr_of"]

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.explain.match import Matching, Unit, channel_axes
from onnxshrink.graph.convert import graph_to_model
from onnxshrink.metrics import compare_outputs
from onnxshrink.runtime import capture_activations, make_session, run_model


def nsr_of(sqnr: float) -> float:
    """Noise-to-signal ratio from SQNR in dB (inf dB: 0)."""
    if math.isinf(sqnr):
        return 0.0 if sqnr > 0 else math.inf
    return 10 ** (-sqnr / 10)


@dataclass
class TensorErrors:
    """Per matched tensor: mean cosine and NSR over samples; per-channel max |t| of the float tensor;
    the original's outputs per sample (the reference); tensors dropped for a shape mismatch."""

    cosine: dict = field(default_factory=dict)
    nsr: dict = field(default_factory=dict)
    channel_max: dict = field(default_factory=dict)
    reference: list = field(default_factory=list)
    candidate_outputs: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


def measure_tensors(original: onnx.ModelProto, candidate: onnx.ModelProto, m: Matching, samples: list) -> TensorErrors:
    """Capture every matched tensor in both models over ``samples`` (streamed: one sample's tensors
    at a time) and reduce to the statistics of ``TensorErrors``; unmatched shapes are dropped from
    ``m.units``."""
    pairs = m.pairs()
    names_o = list(pairs)
    names_c = list(dict.fromkeys(pairs.values()))
    res = TensorErrors()
    sums: dict = {t: [0.0, 0.0, 0] for t in names_o}
    bad: set = set()
    cap_o = capture_activations(original, names_o, samples)
    cap_c = capture_activations(candidate, names_c, samples)
    for vo, vc in zip(cap_o, cap_c):
        res.reference.append([vo[o] for o in m.outputs])
        res.candidate_outputs.append([vc[pairs[o]] for o in m.outputs])
        for t in names_o:
            if t in bad:
                continue
            a, b = np.asarray(vo[t]), np.asarray(vc[pairs[t]])
            if a.shape != b.shape or a.dtype.kind != "f":
                bad.add(t)
                continue
            cos, nsr = cosine_nsr(a, b)
            acc = sums[t]
            acc[0] += cos
            acc[1] += nsr
            acc[2] += 1
            if a.ndim >= 2:
                absa = np.abs(a)
                cms = tuple(np.max(absa, axis=tuple(i for i in range(a.ndim) if i != ax))
                            for ax in channel_axes(a.ndim))
                prev = res.channel_max.get(t)
                res.channel_max[t] = cms if prev is None else tuple(np.maximum(p, c) for p, c in zip(prev, cms))
    for t in names_o:
        if t in bad or not sums[t][2]:
            res.dropped.append(t)
            if t not in m.outputs:
                m.units.pop(t, None)
            continue
        c, e, k = sums[t]
        res.cosine[t] = c / k
        res.nsr[t] = e / k
    return res


def cosine_nsr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine and NSR of ``b`` against ``a`` (as ``metrics.compare_outputs`` defines them, without its
    other metrics: this runs on every matched tensor of every sample)."""
    a = a.astype(np.float64, copy=False).ravel()
    b = b.astype(np.float64, copy=False).ravel()
    if not np.isfinite(b).all():
        return 0.0, math.inf
    sig, err = float(a @ a), float(np.sum((a - b) ** 2))
    nb = float(b @ b)
    cos = 1.0 if sig == 0 and nb == 0 else 0.0 if sig == 0 or nb == 0 else float(a @ b) / math.sqrt(sig * nb)
    nsr = 0.0 if err == 0 else (err / sig if sig > 0 else math.inf)
    return cos, nsr


def balanced_nsr(r: np.ndarray, o: np.ndarray) -> float:
    """The NSR of one output, channel-balanced: the largest of the whole tensor's NSR and, along each
    axis that may hold channels (``match.channel_axes``), the mean over channels of
    ``min(|e_c|^2 / max(|r_c|^2, median_c |r_c|^2), 1)``: each channel against its own energy, floored
    at the median channel's (a class that never fires is near-zero noise, not a signal to keep) and
    capped at 1 (a channel as wrong as its signal is lost; all-zero channels skipped). A detection
    head concatenating box coordinates (0..640) and class scores (0..1) has a cosine and a whole-tensor
    NSR set by the boxes alone; class scores rounded away show here."""
    r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
    if r64.shape != o64.shape:
        return math.inf
    worst = nsr_of(compare_outputs([r64], [o64])["sqnr"])
    if r64.ndim < 2 or r64.dtype.kind not in "fc":
        return worst
    e2, s2 = (o64 - r64) ** 2, r64 ** 2
    for ax in channel_axes(r64.ndim):
        red = tuple(i for i in range(r64.ndim) if i != ax)
        es, ss = e2.sum(axis=red), s2.sum(axis=red)
        keep = ss > 0
        if keep.any():
            floor = float(np.median(ss[keep]))
            worst = max(worst, float(np.mean(np.minimum(es[keep] / np.maximum(ss[keep], floor), 1.0))))
    return worst


def output_nsr(reference: list, outputs: list) -> float:
    """Mean over samples of the worst output's channel-balanced NSR (``balanced_nsr``)."""
    if not reference:
        return 0.0
    vals = [max(balanced_nsr(a, b) for a, b in zip(r, o)) for r, o in zip(reference, outputs)]
    return float(np.mean(vals))


def quantize_only(original: onnx.ModelProto, units: list[Unit]) -> onnx.ModelProto:
    """The original with only ``units``' quantization from the candidate (module docstring)."""
    g = gs.import_onnx(original)
    nodes = {n.name: n for n in g.nodes}
    tmap = g.tensors()
    inputs = {t.name for t in g.inputs}
    k = 0
    for u in units:
        for w in u.weights:
            n = nodes[w.node]
            n.inputs[w.slot] = gs.Constant(f"{w.node}__explain_w{w.slot}", w.dequantized)
        if u.act is None:
            continue
        t = tmap[u.tensor]
        p = u.act
        k += 1
        s = gs.Constant(f"{t.name}__explain_scale", p.scale)
        z = gs.Constant(f"{t.name}__explain_zp", p.zero_point.astype(np.dtype(p.dtype)))
        q = gs.Variable(f"{t.name}__explain_q", dtype=np.dtype(p.dtype))
        attrs = {"axis": p.axis} if not p.per_tensor else {}
        if t.name in inputs:
            fq = gs.Variable(f"{t.name}__explain_fq", dtype=t.dtype, shape=t.shape)
            for c in list(t.outputs):
                c.inputs[c.inputs.index(t)] = fq
            src, dst = t, fq
        else:
            raw = gs.Variable(f"{t.name}__explain_raw", dtype=t.dtype, shape=t.shape)
            prod = t.inputs[0]
            prod.outputs[prod.outputs.index(t)] = raw
            src, dst = raw, t
        g.nodes.append(gs.Node("QuantizeLinear", inputs=[src, s, z], outputs=[q], attrs=attrs, domain=p.domain))
        g.nodes.append(gs.Node("DequantizeLinear", inputs=[q, s, z], outputs=[dst], attrs=attrs, domain=p.domain))
    g.toposort()
    return graph_to_model(g, original)


def run_outputs(model: onnx.ModelProto, samples: list, optimize: bool = False) -> list:
    """The model's outputs per sample."""
    sess = make_session(model, optimize=optimize, low_memory=True)
    return list(run_model(sess, samples))
