"""quantize's knob for the cost-target allocation: a unit is a Conv / ConvTranspose / Gemm / MatMul
node with a constant float weight (with the factor pair svd made of it, ``L_svd_1``/``L_svd_2``
belonging to ``L``). Strengths:

  0.5   its weights stored int8 with float activations (``fallback=int8``: a quarter of the bytes at
        float speed);
  0.75  dynamic int8 (MatMul, and Gemm without transA, with a 2-D weight only): int8 weights per
        tensor, activations quantized at run time from their own range (``dynamic_nodes``,
        onnxruntime's ``quantize_dynamic``: ``DynamicQuantizeLinear`` + ``MatMulInteger``); no
        calibrated range can be wrong, which is what transformers' activation outliers need;
  1     QDQ int8 (integer kernels, calibrated static ranges).

Proxy (``proxy``, see ``passes/knob.py``): the weights each strength writes (per channel int8 for
0.5 and 1, per tensor for 0.75), and for 0.75 and 1 the input quantization noise: step
``(max(x, 0) - min(x, 0)) / 255`` from each sample's own range (dynamic) or from the range over the
samples (static, plus the output's requantization ``e = d_y^2 / 12 / E[y^2]``); bytes saved
``4n - (n + 4 C)`` for C scales (0.5), ``4n - (n + 5)`` (0.75), ``4n - (n + 5 C)`` (1: scales
and zero points).

Nodes below 1 and not dynamic go to ``exclude``, nodes not chosen at all also to ``float_weights``.
The knob is the allocation's closure: its remaining units are finally tried at a stronger
strength together (``closure_strengths``: QDQ int8, and dynamic int8 for the MatMul units), kept
when that measures faster.

Weight-only int4 (``MatMulNBits``) is not offered per unit: measured on a 4-block ViT-S-width
encoder (onnxruntime 1.32, AVX2), every MatMul in int4 ran at 1.0x fp32 (with ``accuracy_level`` 4
as well) at cosine 0.989 (block 32) or 0.89 (block 128), against 1.7x at 0.999 for dynamic int8:
it would buy bytes with the speed the allocation must keep.
"""

from __future__ import annotations

__all__ = ["QuantizeKnob", "WEIGHTS_INT8", "DYNAMIC", "QDQ"]

import numpy as np
import onnx

from onnxshrink.passes.knob import LAYER_OPS, Knob, unit_of_node, weighted_nodes
from onnxshrink.passes.quantize.weight_storage import MIN_ELEMENTS, int8_channels, storage_axis

WEIGHTS_INT8, DYNAMIC, QDQ = 0.5, 0.75, 1.0


def dynamic_capable(node: onnx.NodeProto, weight_dims) -> bool:
    """Whether onnxruntime's dynamic quantization takes the node: a MatMul, or a Gemm without
    transA, with a 2-D constant weight."""
    if len(weight_dims) != 2 or node.op_type not in ("MatMul", "Gemm"):
        return False
    return not any(a.name == "transA" and a.i for a in node.attribute)


class QuantizeKnob(Knob):
    """Per-node int8 weight storage, dynamic int8 or QDQ quantization (see the module docstring)."""

    pass_name = "quantize"
    strengths = (WEIGHTS_INT8, DYNAMIC, QDQ)
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
        dynamic = sorted(n for n in nodes if choices.get(unit_of_node(n)) == DYNAMIC)
        out = {"exclude": sorted(n for n in nodes if choices.get(unit_of_node(n), 0.0) < QDQ
                                 and choices.get(unit_of_node(n)) != DYNAMIC),
               "float_weights": sorted(n for n in nodes if unit_of_node(n) not in choices),
               "fallback": "int8", "guard": False, "keep_float": 0}
        if dynamic:
            out["dynamic_nodes"] = dynamic
        return out

    def proxy(self, model, unit, strength, layers, shared):
        L = layers.get(unit)
        if L is None:
            return None
        W = L.weight
        n = W.size
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in L.node.attribute}
        axis = storage_axis(L.node.op_type, attrs, W.ndim)
        if strength == DYNAMIC:
            Q, s = int8_channels(W, None)
            steps = [((max(hi, 0.0) - min(lo, 0.0)) / 255.0) ** 2 for lo, hi in L.in_ranges]
            act = L.input_noise(float(np.mean(steps)) if steps else 0.0)
            saved = 4 * n - (n + 5)
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
        if user.get("fallback") == "float" and "fallback" in knob_options:
            out["fallback"] = "float"  # the user keeps float weights float: strength 0.5 changes nothing
        return out
