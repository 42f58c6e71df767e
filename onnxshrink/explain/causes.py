"""Naming the cause of a unit's error, and the fix onnxshrink can apply for it.

Rules (each checked on what explain measured; a unit may have several causes, the first is its main
one and its fix goes into the recipe):

- ``outlier_channels``: the tensor is quantized with one scale and its float range is ``R =
  max_c r_c / median_c r_c >= OUTLIER_RATIO`` times the median channel's (``r_c`` = max |t| of channel
  c over the samples): the step ``range / (2^bits - 1)`` is set by a few channels and the median channel
  keeps about ``(2^bits - 1) / R`` levels. Fix: ``quantize.equalize`` when cross-layer equalization
  of the producing Conv pair brings ``R`` under the threshold (measured on the equalized original,
  exact rescaling), else keep the producer and the tensor's quantized consumers float
  (``quantize.exclude``); 16-bit activations (``quantize.activation_dtype=uint16``) are the
  alternative named.
- ``per_tensor_weights``: a weight quantized with one scale whose weight NSR ``|W' - W|^2 / |W|^2``
  is at least ``WEIGHT_CHANNEL_GAIN`` times the NSR of symmetric per-output-channel scales at the same
  bits, and at least ``MIN_WEIGHT_NSR``. Fix: ``quantize.per_channel=true``.
- ``input_channel_imbalance``: the second Conv of an equalizable pair whose weights for some input
  channels are ``OUTLIER_RATIO`` times smaller than the median input channel's (the mirror image of
  outlier channels in its input), quantized with one scale. Fix: ``quantize.equalize``.
- ``saturating_8bit``: a Sigmoid or Softmax output quantized to 8 bits (values crowd near 0 and 1,
  where a step of 1/255 is a large relative error). Fix: keep the node float (``quantize.exclude``).
- ``unfused``: Q/DQ around an op onnxruntime has no integer kernel for (it runs in float between a
  DequantizeLinear and a QuantizeLinear: rounding without speed). Fix: keep it float
  (``quantize.exclude``; onnxshrink's own placement never puts Q/DQ there).
- ``pruned`` (a channel group, ``structural.py``): Fix: half the pruned fraction for that group
  (``prune.group_ratios``).
- ``low_rank`` (a factorized layer): Fix: twice the rank, at most full (``svd.ranks``).
- ``quantization``: quantized, none of the above, and its quantization alone makes at least
  ``core.MIN_GENERIC_SHARE`` of the output error: keep it float (``quantize.exclude``).
"""

from __future__ import annotations

__all__ = ["OUTLIER_RATIO", "diagnose", "diagnose_structural", "outlier_ratio", "per_channel_weight_nsr",
           "UNFUSABLE_SAFE_OPS"]

import numpy as np

from onnxshrink.explain.match import Unit, WeightQuant
from onnxshrink.explain.structural import StructuralUnit
from onnxshrink.passes.quantize.plan import (
    ELEMENTWISE_OPS,
    FOLDABLE_ACTIVATIONS,
    PASSTHROUGH_OPS,
    WEIGHTED_OPS,
)

OUTLIER_RATIO = 10.0  # a range 10x the median channel's leaves the median channel < 26 of 255 levels
WEIGHT_CHANNEL_GAIN = 4.0  # per-channel scales cut the weight's error 4x or more: per-tensor is the cause
MIN_WEIGHT_NSR = 1e-4  # a weight NSR below this (SQNR > 40 dB) is no cause whatever per-channel would give
# ops onnxruntime runs on integers between DQ and Q (its QDQ selectors), besides onnxshrink's placement
UNFUSABLE_SAFE_OPS = (WEIGHTED_OPS | ELEMENTWISE_OPS | PASSTHROUGH_OPS | FOLDABLE_ACTIVATIONS
                      | {"Softmax", "Pad", "Where", "DepthToSpace", "SpaceToDepth", "ArgMax", "GlobalMaxPool",
                         "Sigmoid", "HardSigmoid", "HardSwish", "InstanceNormalization", "LayerNormalization"})


def outlier_ratio(channel_max) -> tuple[float, list]:
    """``(R, outlier channels)``: the tensor's range over the median channel's, and the channels above
    ``OUTLIER_RATIO`` x the median; ``channel_max`` is one array or a tuple of them (one per axis that
    may hold channels: the worst axis counts)."""
    if isinstance(channel_max, (tuple, list)):
        return max((outlier_ratio(c) for c in channel_max), key=lambda rc: rc[0], default=(1.0, []))
    if channel_max is None or np.size(channel_max) < 4:
        return 1.0, []
    cm = np.asarray(channel_max, np.float64).ravel()
    med = float(np.median(cm))
    if med <= 0:
        return 1.0, []
    ratio = float(cm.max() / med)
    return ratio, [int(i) for i in np.nonzero(cm >= OUTLIER_RATIO * med)[0]]


def per_channel_weight_nsr(w: WeightQuant, op: str, trans_b: bool = False) -> tuple[float, float]:
    """``(NSR of the candidate's weight, NSR of symmetric per-output-channel scales at its bits)``."""
    W = w.original.astype(np.float64)
    err = float(np.sum((w.dequantized - W) ** 2))
    sig = float(np.sum(W ** 2)) or 1.0
    axis = 0 if op == "Conv" or (op == "Gemm" and trans_b) else W.ndim - 1
    qmax = 2 ** (w.params.bits - 1) - 1
    red = tuple(i for i in range(W.ndim) if i != axis)
    s = np.max(np.abs(W), axis=red, keepdims=True) / qmax
    s[s == 0] = 1.0
    pc = np.clip(np.round(W / s), -qmax - 1, qmax) * s
    return err / sig, float(np.sum((pc - W) ** 2)) / sig


def diagnose(u: Unit, channel_max, equalize_fixes: dict, node_ops: dict, node_attrs: dict,
             quantized_consumers: list, equalize_seconds: dict | None = None, float_node: str = "") -> list[dict]:
    """The causes of ``u``'s error, most specific first, each ``{"cause", "text", "fix", "fix_text"}``
    (``fix`` as ``{pass: {option: value}}``). ``equalize_fixes``: tensor -> the outlier ratio after
    cross-layer equalization (absent: the tensor's producer is in no equalizable pair);
    ``equalize_seconds``: the second Conv of each equalizable pair -> the tensor between the two;
    ``float_node``: the node ``quantize.exclude`` must name to keep the unit float (a Relu/Clip folded
    into its Conv's range is no unit of its own: the Conv is named), default the unit's main node."""
    out: list[dict] = []
    equalize_seconds = equalize_seconds or {}
    keep_float = [float_node or u.node] if u.node else list(quantized_consumers[:1])
    if u.act is not None and u.act.per_tensor:
        ratio, chans = outlier_ratio(channel_max)
        if ratio >= OUTLIER_RATIO and chans:
            levels = (2 ** u.act.bits - 1) / ratio
            shown = ", ".join(map(str, chans[:6])) + (", ..." if len(chans) > 6 else "")
            text = (f"activation range dominated by {len(chans)} outlier channel(s) ({shown}): the per-tensor range is "
                    f"{ratio:.0f}x the median channel's, so {u.act.bits}-bit steps leave that channel ~{levels:.0f} "
                    f"levels")
            after = equalize_fixes.get(u.tensor)
            if after is not None and after < OUTLIER_RATIO:
                fix = {"quantize": {"equalize": True}}
                fix_text = (f"cross-layer equalization (quantize.equalize=true) brings the range to {after:.1f}x "
                            f"the median channel's (exact rescaling); or 16-bit activations "
                            f"(quantize.activation_dtype=uint16)")
            else:
                ex = keep_float + [c for c in quantized_consumers if c not in keep_float]
                fix = {"quantize": {"exclude": ex}}
                fix_text = (f"keep {', '.join(ex)} float (quantize.exclude: the tensor is then never quantized); "
                            f"or 16-bit activations (quantize.activation_dtype=uint16)")
            out.append({"cause": "outlier_channels", "text": text, "fix": fix, "fix_text": fix_text,
                        "ratio": round(ratio, 2), "channels": chans})
    for w in u.weights:
        if w.slot != 1 or not w.params.per_tensor or w.original.ndim < 2:
            continue
        op = node_ops.get(w.node, "")
        nsr_pt, nsr_pc = per_channel_weight_nsr(w, op, bool(node_attrs.get(w.node, {}).get("transB", 0)))
        if nsr_pt >= MIN_WEIGHT_NSR and nsr_pt >= WEIGHT_CHANNEL_GAIN * nsr_pc:
            out.append({"cause": "per_tensor_weights",
                        "text": f"{w.node}'s weights share one scale: weight NSR {nsr_pt:.1e}, per-channel scales "
                                f"would give {nsr_pc:.1e}",
                        "fix": {"quantize": {"per_channel": True}}, "fix_text": "per-channel weights "
                        "(quantize.per_channel=true, onnxshrink's default)"})
    for w in u.weights:
        if w.slot != 1 or w.node not in equalize_seconds or w.original.ndim != 4:
            continue
        r_in = np.max(np.abs(w.original), axis=(0, 2, 3))
        med = float(np.median(r_in))
        small = [int(i) for i in np.nonzero(r_in * OUTLIER_RATIO <= med)[0]]
        if small and w.params.per_tensor:
            after = equalize_fixes.get(equalize_seconds[w.node])
            out.append({"cause": "input_channel_imbalance",
                        "text": f"{w.node}'s weights for input channel(s) {', '.join(map(str, small[:6]))} are "
                                f"{med / max(float(r_in[small].max()), 1e-30):.0f}x smaller than the median input "
                                f"channel's (their input carries outlier channels): one weight scale rounds them away",
                        "fix": {"quantize": {"equalize": True}},
                        "fix_text": "cross-layer equalization (quantize.equalize=true) balances the pair"
                                    + (f" (input range then {after:.1f}x the median)" if after is not None else "")})
    last_op = node_ops.get(u.nodes[-1], "") if u.nodes else ""
    if u.act is not None and u.act.bits <= 8 and last_op in ("Sigmoid", "Softmax"):
        out.append({"cause": "saturating_8bit",
                    "text": f"{last_op} output at {u.act.bits} bits: its values crowd near 0 and 1, where a step of "
                            f"1/{2 ** u.act.bits - 1} is a large relative error",
                    "fix": {"quantize": {"exclude": [u.nodes[-1]]}},
                    "fix_text": f"keep {u.nodes[-1]} float (quantize.exclude); or 16-bit activations"})
    if u.unfused and u.op not in UNFUSABLE_SAFE_OPS:
        out.append({"cause": "unfused",
                    "text": f"Q/DQ around {u.op}, which onnxruntime has no integer kernel for: it runs in float "
                            f"between DequantizeLinear and QuantizeLinear (rounding, no speed)",
                    "fix": {"quantize": {"exclude": [u.node]}},
                    "fix_text": f"keep {u.node} float (onnxshrink's placement puts no Q/DQ there)"})
    if not out and u.quantized:
        what = "its output and weights" if u.act is not None and u.weights else "its weights" if u.weights else \
            "its output"
        out.append({"cause": "quantization",
                    "text": f"{u.act.bits if u.act is not None else 8}-bit rounding of {what}",
                    "fix": {"quantize": {"exclude": keep_float}} if keep_float else {},
                    "fix_text": f"keep {', '.join(keep_float)} float (quantize.exclude)" if keep_float else
                    "16-bit activations (quantize.activation_dtype=uint16)"})
    return out


def diagnose_structural(u: StructuralUnit) -> list[dict]:
    """The cause and fix of a pruned group or a factorized layer."""
    if u.kind == "pruned":
        return [{"cause": "pruned",
                 "text": f"channel group of {u.key} pruned by {u.ratio:.0%} of {u.channels} channels",
                 "fix": {"prune": {"group_ratios": {u.key: round(u.ratio / 2, 4)}}},
                 "fix_text": f"prune this group by {u.ratio / 2:.0%} (prune.group_ratios)"}]
    r2 = min(2 * u.rank, u.full)
    return [{"cause": "low_rank", "text": f"{u.key} factorized at rank {u.rank} of {u.full}",
             "fix": {"svd": {"ranks": {u.key: [u.form, r2]}}}, "fix_text": f"rank {r2} (svd.ranks)"}]
