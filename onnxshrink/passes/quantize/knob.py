"""quantize's knob for the cost-target allocation: a unit is a Conv / ConvTranspose / Gemm / MatMul
node with a constant float weight (with the factor pair svd made of it, ``L_svd_1``/``L_svd_2``
belonging to ``L``). Strength 0.5 stores its weights int8 with float activations
(``fallback=int8``: a quarter of the bytes at float speed), 1 makes it QDQ int8 (integer kernels);
nodes below 1 go to ``exclude``, nodes not chosen at all also to ``float_weights``. The knob is the
allocation's closure: its remaining units are finally tried at strength 1 together, kept when that
measures faster.
"""

from __future__ import annotations

__all__ = ["QuantizeKnob"]

from onnxshrink.passes.knob import LAYER_OPS, Knob, unit_of_node, weighted_nodes


class QuantizeKnob(Knob):
    """Per-node int8 weight storage or QDQ quantization (see the module docstring)."""

    pass_name = "quantize"
    strengths = (0.5, 1.0)
    probe = {"max_samples": 8}
    capped = False  # quantizing one unit is cheap to measure
    exclude_option = "exclude"
    closure = True
    ops = LAYER_OPS + ("ConvTranspose",)

    def units(self, model, shapes):
        return [(n.name, size) for n, size in weighted_nodes(model, ops=self.ops) if n.name]

    def options(self, model, choices):
        nodes = [n.name for n, _ in weighted_nodes(model, ops=self.ops)]
        return {"exclude": sorted(n for n in nodes if choices.get(unit_of_node(n), 0.0) < 1.0),
                "float_weights": sorted(n for n in nodes if unit_of_node(n) not in choices),
                "fallback": "int8", "guard": False, "keep_float": 0}

    def merge(self, user: dict, knob_options: dict) -> dict:
        """The user's options under the knob's per-unit ones; nodes the user excluded from
        quantization (or kept with float weights) stay so, and ``fallback=float`` stays float."""
        out = {**user, **knob_options}
        for key in ("exclude", "float_weights"):
            if user.get(key) and key in knob_options:
                out[key] = sorted(set(knob_options[key]) | set(user[key]))
        if user.get("fallback") == "float" and "fallback" in knob_options:
            out["fallback"] = "float"  # the user keeps float weights float: strength 0.5 changes nothing
        return out
