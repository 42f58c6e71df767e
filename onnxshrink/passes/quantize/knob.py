"""quantize's knob for the cost-target allocation: a unit is a Conv / ConvTranspose / Gemm / MatMul
node with a constant float weight (with the factor pair svd made of it, ``L_svd_1``/``L_svd_2``
belonging to ``L``). Strengths:

  0.5   its weights stored int8 with float activations (``fallback=int8``: a quarter of the bytes at
        float speed);
  0.75  dynamic int8 (MatMul, and Gemm without transA, with a 2-D weight only): int8 weights per
        tensor, activations quantized at run time from their own range (``dynamic_nodes``,
        onnxruntime's ``quantize_dynamic``: ``DynamicQuantizeLinear`` + ``MatMulInteger``); no
        calibrated range can be wrong, which is what transformers' activation outliers need;
  1     QDQ int8 (integer kernels, calibrated static ranges);
  1.25  dynamic int8 compute with 6-bit weights (``DYNAMIC_NARROW``, MatMul units as for 0.75): per
        column ``W ~ s_n q``, ``|q| <= 31``, stored in 3/4 of a byte per weight and decoded to int8 at
        load (``dynamic.narrow_weights``; the quantize option ``dynamic_weight_bits``), so the same
        integer kernel runs: the strength for the bytes a size target still needs where the
        activations are dynamic int8 already (on a ViT-S-width encoder 6-bit weights cost each MatMul
        about 6x the loss of 0.75, and save a quarter of its int8 bytes).

Proxy (``proxy``, see ``passes/knob.py``): the weights each strength writes (per channel int8 for
0.5 and 1, per tensor for 0.75), and for 0.75 and 1 the input quantization noise: step
``(max(x, 0) - min(x, 0)) / 255`` from each sample's own range (dynamic) or from the range over the
samples (static, plus the output's requantization ``e = d_y^2 / 12 / E[y^2]``); bytes saved
``4n - (n + 4 C)`` for C scales (0.5), ``4n - (n + 5)`` (0.75), ``4n - (n + 5 C)`` (1: scales
and zero points), ``4n - (3n / 4 + 4 N + 1)`` (1.25: per-column scales; plus the decoder's ~100 bytes).

Nodes below 1 and not dynamic go to ``exclude``, nodes not chosen at all also to ``float_weights``.
The knob is the allocation's closure: its remaining units are finally tried at a stronger
strength together (``closure_strengths``: QDQ int8, and dynamic int8 for the MatMul units), kept
when that measures faster.

Weight-only int4 (``MatMulNBits``) is not offered per unit: measured on a 4-block ViT-S-width
encoder (onnxruntime 1.32, AVX2), every MatMul in int4 ran at 1.0x fp32 (with ``accuracy_level`` 4
as well) at cosine 0.989 (block 32) or 0.89 (block 128), against 1.7x at 0.999 for dynamic int8:
it would buy bytes with the speed the allocation must keep. Nor are int4 weights for units with
float activations: per layer, round-to-nearest int4 (per channel, or blocks of 32 or 16 along the
input) costs 50-150x the loss of int8 storage on that encoder and 0.005-0.14 of cosine per layer on
PP-OCRv4 rec, whose int8 weights alone already take 0.0067 of a 0.01 budget.
"""

from __future__ import annotations

__all__ = ["QuantizeKnob", "WEIGHTS_INT8", "DYNAMIC", "QDQ", "DYNAMIC_NARROW", "NARROW_BITS"]

import numpy as np
import onnx

from onnxshrink.passes.knob import LAYER_OPS, Knob, unit_of_node, weighted_nodes
from onnxshrink.passes.quantize.dynamic import narrow_columns
from onnxshrink.passes.quantize.weight_storage import MIN_ELEMENTS, int8_channels, narrow_bytes, storage_axis

WEIGHTS_INT8, DYNAMIC, QDQ, DYNAMIC_NARROW = 0.5, 0.75, 1.0, 1.25
NARROW_BITS = 6  # the weights' bits at DYNAMIC_NARROW


def dynamic_capable(node: onnx.NodeProto, weight_dims) -> bool:
    """Whether onnxruntime's dynamic quantization takes the node: a MatMul, or a Gemm without
    transA, with a 2-D constant weight."""
    if len(weight_dims) != 2 or node.op_type not in ("MatMul", "Gemm"):
        return False
    return not any(a.name == "transA" and a.i for a in node.attribute)


class QuantizeKnob(Knob):
    """Per-node int8 weight storage, dynamic int8 or QDQ quantization (see the module docstring)."""

    pass_name = "quantize"
    strengths = (WEIGHTS_INT8, DYNAMIC, QDQ, DYNAMIC_NARROW)
    probe = {"max_samples": 8}
    capped = False  # quantizing one unit is cheap to measure
    exclude_option = "exclude"
    closure = True
    closure_strengths = (QDQ, DYNAMIC)
    ops = LAYER_OPS + ("ConvTranspose",)

    def units(self, model, shapes):
        return [(n.name, size) for n, size in weighted_nodes(model, ops=self.ops) if n.name]

    def unit_strengths(self, model, unit):
        inits = {t.name: t for t in model.graph.initializer}
        node = next((n for n in model.graph.node if n.name == unit), None)
        if node is None or not dynamic_capable(node, list(inits[node.input[1]].dims)):
            return (WEIGHTS_INT8, QDQ)
        return self.strengths

    def options(self, model, choices):
        nodes = [n.name for n, _ in weighted_nodes(model, ops=self.ops)]
        dynamic = sorted(n for n in nodes if choices.get(unit_of_node(n)) in (DYNAMIC, DYNAMIC_NARROW))
        narrow = {n: NARROW_BITS for n in nodes if choices.get(unit_of_node(n)) == DYNAMIC_NARROW}
        out = {"exclude": sorted(n for n in nodes if choices.get(unit_of_node(n), 0.0) < QDQ
                                 and choices.get(unit_of_node(n)) != DYNAMIC),
               "float_weights": sorted(n for n in nodes if unit_of_node(n) not in choices),
               "fallback": "int8", "guard": False, "keep_float": 0}
        if dynamic:
            out["dynamic_nodes"] = dynamic
        if narrow:
            out["dynamic_weight_bits"] = narrow
        return out

    def proxy(self, model, unit, strength, layers, shared):
        L = layers.get(unit)
        if L is None:
            return None
        W = L.weight
        n = W.size
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in L.node.attribute}
        axis = storage_axis(L.node.op_type, attrs, W.ndim)
        if strength in (DYNAMIC, DYNAMIC_NARROW):
            if strength == DYNAMIC:
                Q, s = int8_channels(W, None)
                saved = 4 * n - (n + 5)
            else:  # MatMul's [K, N] weight (the unit is dynamic-capable, so a 2-D one)
                Q, s = narrow_columns(W, NARROW_BITS)
                saved = 4 * n - (narrow_bytes(n, NARROW_BITS, W.ndim) + 4 * s.size + 1)
            steps = [((max(hi, 0.0) - min(lo, 0.0)) / 255.0) ** 2 for lo, hi in L.in_ranges]
            act = L.input_noise(float(np.mean(steps)) if steps else 0.0)
        else:
            Q, s = int8_channels(W, axis)
            act = 0.0
            saved = 4 * n - (n + 4 * s.size) if n >= MIN_ELEMENTS else 0
            if strength == QDQ:
                lo = min((r[0] for r in L.in_ranges), default=0.0)
                hi = max((r[1] for r in L.in_ranges), default=0.0)
                d_y = (max(L.out_range[1], 0.0) - min(L.out_range[0], 0.0)) / 255.0
                act = L.input_noise(((max(hi, 0.0) - min(lo, 0.0)) / 255.0) ** 2) + d_y ** 2 / 12.0 / max(
                    L.out_ms, 1e-30)
                saved = 4 * n - (n + 5 * s.size)
        Wq = (Q.astype(np.float32) * s).astype(W.dtype)
        return {"weights": {L.weight_name: Wq}, "saving": {"params": 0, "weight_bytes": saved, "macs": 0},
                "noise": {unit: L.weight_noise(Wq) + act}}

    def merge(self, user: dict, knob_options: dict) -> dict:
        """The user's options under the knob's per-unit ones; nodes the user excluded from
        quantization (or kept with float weights) stay so, and ``fallback=float`` stays float."""
        out = {**user, **knob_options}
        for key in ("exclude", "float_weights"):
            if user.get(key) and key in knob_options:
                out[key] = sorted(set(knob_options[key]) | set(user[key]))
        if user.get("exclude") and out.get("dynamic_nodes"):
            out["dynamic_nodes"] = sorted(set(out["dynamic_nodes"]) - set(user["exclude"]))
        if user.get("exclude") and out.get("dynamic_weight_bits"):
            out["dynamic_weight_bits"] = {n: b for n, b in out["dynamic_weight_bits"].items()
                                          if n not in user["exclude"]}
        if user.get("fallback") == "float" and "fallback" in knob_options:
            out["fallback"] = "float"  # the user keeps float weights float: strength 0.5 changes nothing
        return out
