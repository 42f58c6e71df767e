"""Static QDQ quantization placed where onnxruntime's CPU kernels run it in integers.

Numerics (``x`` an activation, ``W`` a weight, ``b`` a bias):

- Activations: affine 8-bit, ``q = clip(round(x / s) + z, qmin, qmax)``, ``s = (hi - lo) / (qmax - qmin)``,
  ``z = round(qmin - lo / s)`` for a calibrated range ``[lo, hi]`` containing 0 (uint8 by default:
  u8 activations x s8 weights is the fast path of MLAS on x86 and ARM). 16-bit activations
  (uint16/int16, A16W8) on the same grid with 65536 levels, for NPUs that take them (QNN HTP); Q/DQ
  ops in the com.microsoft domain below opset 21, as onnxruntime's own quantizer emits them.
- Weights: symmetric int8 per output channel, ``s_c = max|W_c| / 127``, ``W_q = round(W / s_c)``
  (per-tensor option; 7-bit ``[-64, 63]`` on x86 without VNNI, where u8 x s8 pairs can saturate).
- Bias: int32 with ``s_b = s_x * s_w,c`` and zero point 0: ``b_q = round(b / s_b)``.

Placement: a node unit ``DQ -> op -> Q`` is emitted only where onnxruntime's QDQ selectors
(``qdq_selector_action_transformer.cc``) replace it with an integer kernel on the CPU EP:
Conv (QLinearConv), MatMul (QLinearMatMul / MatMulIntegerToFloat), Gemm (QGemm) always;
Add/Mul (QLinearAdd/Mul), Sigmoid, LeakyRelu, (Global)AveragePool, Concat only when all their
activation inputs are already integer (else the Q/DQ pairs cost more than the float op);
MaxPool, Resize, Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Slice, Gather, Split, Expand,
Tile as passthrough with the input's scale and zero point (the selector requires them equal) and
only when an integer consumer needs their output. A Relu or Clip(0, c) right after a unit is folded
into the unit's output range (zero point at qmin, range within the clip), which onnxruntime then
drops as redundant. Each consumer gets its own DQ; a unit never produces a graph output (the
selector refuses that). ConvTranspose, HardSigmoid, HardSwish, Div, Pow, ... stay in float.

Data-aware extras (no training):
- Bias correction: ``b_c <- b_c - (E[y_q,c] - E[y_c])`` with the means of each output channel of the
  quantized and float units over the calibration samples (the shift rounding adds, Nagel et al. 2019).
- Sensitivity: each unit quantized alone on its float input (a shadow copy of the node next to the
  float one), ``NSR = |y_q - y|^2 / |y|^2`` over calibration samples. The bias-correction shift
  comes from the same run (so it corrects each layer's own error, not its inputs').
- Rounding (``rounding=gptq``, off by default: measured, it does not pay with 8-bit activations):
  with the scales fixed, integer weights that minimise ``|(W - s Q) X|^2`` on the calibration inputs
  by GPTQ error feedback (``rounding.py``).
- Cross-layer equalization (``equalize=true``, off by default): exact per-channel rescaling of
  Conv -> [Relu] -> Conv pairs before calibration (``equalize.py``).
- Weight-only (``weights_only=int4|int8``): instead of QDQ, onnxruntime's MatMulNBits quantizer on the
  MatMul/Gemm weights, block size chosen on the calibration samples (``weight_only.py``).
- Guard: the most sensitive units are kept in float (1, 2, 4, ... of them) until ``ctx.budget``
  (else mean cosine >= ``min_cosine``) holds; then the quantized and float models are timed
  (one thread, interleaved runs, medians). When the quantized one is not faster, small convolutions
  (few weights: onnxruntime's float NCHWc kernels beat the integer ones there) go back to float; when
  nothing is faster, the pass changes nothing and says why.
- Float fallback (``fallback``): the weights of nodes that stay float (sensitive, small, or the
  whole model when no integer placement is faster) are stored int8 per channel as ``Cast x Mul``
  constants that onnxruntime folds at load (``weight_storage.py``): float speed and activations, a
  quarter of the weight bytes; with ``auto`` only while the fidelity floor holds.
- Wider activations: for a target that also takes 16-bit activations (``wide_activation_dtype``: QNN
  HTP) and ``activation_dtype=auto``, an 8-bit plan that misses the floor or keeps units in float is
  redone A16W8 (plain and bias-corrected); the plan holding the floor with the fewest float units,
  then the best cosine, is kept (``stats["activation_choice"]``).
"""

from __future__ import annotations

__all__ = ["QuantizePass", "QuantizeOptions", "refuse_quantized"]

import dataclasses
import math
import platform
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register
from onnxshrink.graph.values import constant_value
from onnxshrink.passes.quantize.prepare import prepare_float_graph, sole_consumer
from onnxshrink.passes.quantize.calibrate import DEFAULT_BINS, TensorHistogram, collect_histograms, collect_minmax, estimate_range

# ops whose presence means the model is already quantized
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm", "QAttention",
                 "MatMulNBits", "MatMulBnb4", "QOrderedMatMul", "GatherBlockQuantized"}
WEIGHTED_OPS = {"Conv", "MatMul", "Gemm"}
# ops with a QLinear kernel on the CPU EP, used only when all activation inputs are already integer
ELEMENTWISE_OPS = {"Add", "Mul", "Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool", "Concat", "MatMul"}
BINARY_CONST_OK = {"Add", "Mul"}
# ops the selectors run on integers when input DQ and output Q share scale and zero point
PASSTHROUGH_OPS = {"MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                   "Gather", "Split", "Expand", "Tile"}
FOLDABLE_ACTIVATIONS = {"Relu", "Clip"}
SHAPE_OPS = {"Constant", "Shape", "Cast", "Range", "ConstantOfShape", "Size", "Identity", "NonZero"}


def _is_large(model) -> bool:
    from onnxshrink.model import is_large
    return is_large(model)


def _has_vnni() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # ARM sdot / neon paths do not saturate
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        return "avx512_vnni" in info or "avx_vnni" in info
    except OSError:
        return True


@dataclass
class QuantizeOptions:
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
    bins: int = field(default=DEFAULT_BINS, metadata={"help": "histogram bins per tensor"})
    max_samples: int = field(default=0, metadata={"help": "calibration samples used (0: all)"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "node names kept in float"})
    fallback: Literal["auto", "float", "int8"] = field(default="auto", metadata={
        "help": "weights of the nodes kept in float: int8 stores them per channel as Cast x Mul, which "
                "onnxruntime folds at load (float speed and activations, 1/4 of the bytes; "
                "passes/weight_storage.py); auto: int8 (no target or cpu) while the budget (or the "
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

    def weaker(self):
        o = self.options
        nxt = max(1, 2 * o.keep_float)
        known = getattr(self, "_n_units", None)
        if known is not None and nxt >= known:
            return None
        return QuantizePass(dataclasses.replace(o, keep_float=nxt))

    def describe_strength(self) -> str:
        return f"keep_float={self.options.keep_float}"

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        wide = getattr(ctx.target, "wide_activation_dtype", None) if self.options.activation_dtype == "auto" else None
        model = ctx.to_model(graph) if wide else None
        q = _Quantizer(self.options, ctx)
        result = q.run(graph)
        self._n_units = q.n_units
        if wide and getattr(q, "outcome", None) and (not q.outcome["holds"] or q.outcome["kept_float"]):
            result = self._wider_activations(q, result, model, ctx, wide)
        return result

    def _wider_activations(self, q8, r8, model, ctx, wide) -> PassResult:
        """The target also takes 16-bit activations (QNN HTP: A16W8) and the 8-bit plan missed the
        fidelity floor or kept units in float to hold it: quantize again with ``wide`` activations,
        plain and with bias correction (with 16-bit activations the int8 weights' rounding is the
        main error left, and its per-channel mean shift is what bias correction removes), and keep
        the plan that holds the floor with the fewest float units, then the best cosine (ties with
        the 8-bit plan: 8-bit, half the bandwidth)."""
        rank = (lambda o: (o["holds"], -o["kept_float"], o["cosine"]))
        act8 = q8.stats.get("scheme", {}).get("activations")
        cands = {act8: (q8, r8)}
        for bc in (False, True) if not self.options.bias_correction else (True,):
            q = _Quantizer(dataclasses.replace(self.options, activation_dtype=wide, bias_correction=bc), ctx)
            r = q.run(gs.import_onnx(model))
            if r.modified and getattr(q, "outcome", None):
                cands[wide + ("+bias_correction" if bc and not self.options.bias_correction else "")] = (q, r)
        best = max(cands, key=lambda k: (rank(cands[k][0].outcome), k == act8))
        q, r = cands[best]
        self._n_units = q.n_units
        r.stats["activation_choice"] = {
            "chosen": best, "candidates": {k: v[0].outcome for k, v in cands.items()},
            "rule": "the target takes 8- and 16-bit activations: the plan that holds the fidelity floor with the "
                    "fewest units kept float, then the best cosine (ties: 8-bit)"}
        return r


# ---------------------------------------------------------------------- refusal and preparation
def _drop_qdq_value_info(graph: gs.Graph) -> None:
    """No value_info for Q/DQ outputs: their shapes are their inputs', which any consumer (onnxruntime,
    shape inference) re-derives; on YOLOv8n they were 107 kB of a 3.5 MB file."""
    outs = {id(t) for t in graph.outputs}
    for n in graph.nodes:
        if n.op in ("QuantizeLinear", "DequantizeLinear"):
            for t in n.outputs:
                if id(t) not in outs:
                    t.shape, t.dtype = None, None


def refuse_quantized(graph: gs.Graph) -> None:
    """Raise InputError when the graph is already quantized (QDQ, QOperator or dynamic)."""
    for node in graph.nodes:
        if node.op in QUANTIZED_OPS or node.op.startswith("QLinear"):
            raise InputError(f"the model is already quantized (it has {node.op} node '{node.name}'); "
                             f"quantize the float model instead")


@dataclass
class _Unit:
    node: str
    kind: str               # weighted | elementwise | passthrough
    inputs: list            # activation input tensor names to quantize
    output: str             # the tensor the unit's Q reads (after a folded Relu/Clip)
    raw_output: str         # the op's own output
    clip: tuple | None = None  # (min, max) of a folded Relu/Clip
    weight_axis: int | None = None


class _Quantizer:
    def __init__(self, options: QuantizeOptions, ctx: Context):
        self.o = options
        self.ctx = ctx
        self.stats: dict = {}
        self.n_units = None
        self.elementwise = options.elementwise

    # -------------------------------------------------------------- scheme
    def _scheme(self):
        o, target = self.o, self.ctx.target
        act = o.activation_dtype
        if act == "auto":
            act = getattr(target, "activation_dtype", "uint8") if target is not None else "uint8"
            if act not in ("uint8", "int8", "uint16", "int16"):
                act = "uint8"
        self.act_dtype = np.dtype(act).type
        self.qmin, self.qmax = int(np.iinfo(act).min), int(np.iinfo(act).max)
        self.qdq_domain = ""  # set in run(): com.microsoft for 16-bit types below opset 21
        per_channel = o.per_channel and bool(getattr(target, "per_channel", True) if target is not None else True)
        reduce = o.reduce_range == "true" or (o.reduce_range == "auto" and not _has_vnni() and
                                              getattr(target, "name", "cpu") == "cpu")  # an NPU does not saturate
        self.wmax = 63 if reduce else 127
        self.per_channel = per_channel
        self.stats["scheme"] = {"activations": act, "weights": "int8" + (" (7-bit)" if reduce else ""),
                                "per_channel": per_channel}

    # -------------------------------------------------------------- opset
    def _handle_opset(self, graph: gs.Graph) -> gs.Graph:
        opset = int(graph.opset or 0)
        self.stats["opset_in"] = opset
        if opset >= 13 or (not self.per_channel and opset >= 10):
            return graph
        if self.o.upgrade_opset:
            try:
                from onnx import version_converter
                from onnxshrink.graph.convert import model_to_graph
                before = self.ctx.to_model(graph)
                after = version_converter.convert_version(before, 13)
                onnx.checker.check_model(after)
                sample = self._first_sample()
                if sample is not None:
                    from onnxshrink.runtime import make_session
                    ra = make_session(before, optimize=False).run(None, sample)
                    rb = make_session(after, optimize=False).run(None, sample)
                    for a, b in zip(ra, rb):
                        scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-6)
                        if a.shape != b.shape or float(np.max(np.abs(a - b))) > 1e-4 * scale:
                            raise ValueError("outputs changed")
                g2 = model_to_graph(after)
                self.stats["opset"] = f"upgraded {opset} -> 13"
                return g2
            except Exception as e:  # converter gaps: fall back to per-tensor weights
                self.stats["opset_upgrade_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if opset < 10:
            raise InputError(f"opset {opset} has no QuantizeLinear (needs >= 10) and the upgrade failed")
        self.per_channel = False
        self.stats["scheme"]["per_channel"] = False
        self.stats["opset"] = f"kept {opset}: per-tensor weights (per-channel DequantizeLinear needs opset 13)"
        return graph

    def _first_sample(self):
        src = self.ctx.calib if self.ctx.calib is not None else self.ctx.val
        if src is None:
            return None
        for s in src:
            return s
        return None

    def _samples(self):
        src = self.ctx.calib if self.ctx.calib is not None else self.ctx.val
        if src is None:
            raise InputError("quantize needs calibration samples")
        n = self.o.max_samples
        for i, s in enumerate(src):
            if n and i >= n:
                break
            yield s

    # -------------------------------------------------------------- planning
    def plan(self, graph: gs.Graph, excluded: set) -> tuple[dict, dict]:
        """Units to quantize (by node name) and a decision per compute node (name -> reason)."""
        graph_outputs = {t.name for t in graph.outputs}
        avail: set = set()       # tensors available as integers without a new Q
        units: dict[str, _Unit] = {}
        reasons: dict[str, str] = {}
        tentative: dict[str, _Unit] = {}
        for node in graph.nodes:
            op = node.op
            if op in WEIGHTED_OPS or op in ELEMENTWISE_OPS or op in PASSTHROUGH_OPS or op in ("ConvTranspose",):
                pass
            else:
                if node.name not in reasons and op not in SHAPE_OPS:
                    reasons[node.name] = f"kept float: no integer {op} kernel on the CPU EP"
                continue
            name = node.name
            if name in excluded:
                reasons[name] = "kept float: excluded (sensitive or by option)"
                continue
            outs = list(node.outputs)
            if not outs:
                continue
            if op == "ConvTranspose":
                reasons[name] = "kept float: no integer ConvTranspose kernel on the CPU EP"
                continue
            weighted = self._weight_info(node)
            if op in PASSTHROUGH_OPS:
                data = node.inputs[0] if node.inputs else None
                if data is not None and data.name in avail and not any(t.name in graph_outputs for t in outs) \
                        and not (op == "MaxPool" and len(outs) > 1):
                    tentative[name] = _Unit(name, "passthrough", [data.name], outs[0].name, outs[0].name)
                    for t in outs:
                        avail.add(t.name)
                else:
                    reasons[name] = "kept float: input not integer" if data is not None and data.name not in avail \
                        else "kept float: produces a graph output"
                continue
            if any(t.name in graph_outputs for t in outs):
                reasons[name] = "kept float: produces a graph output (onnxruntime does not fuse it)"
                continue
            if weighted is not None:
                kind = "weighted"
                act_inputs = [node.inputs[0].name]
            else:
                if op in WEIGHTED_OPS and op != "MatMul":
                    reasons[name] = "kept float: weights are not float constants"
                    continue
                if not self.elementwise:
                    reasons[name] = "kept float: elementwise quantization off (by option or by the guard: " \
                                    "fewer requantizations, better fidelity)"
                    continue
                var_inputs = [t for t in node.inputs if not isinstance(t, gs.Constant)]
                const_inputs = [t for t in node.inputs if isinstance(t, gs.Constant)]
                if const_inputs and (op not in BINARY_CONST_OK or
                                     any(np.asarray(c.values).dtype.kind != "f" for c in const_inputs)):
                    reasons[name] = "kept float: constant input without a quantized form"
                    continue
                if op == "MatMul" and len(var_inputs) != 2:
                    reasons[name] = "kept float: weights are not float constants"
                    continue
                if op == "MatMul" and not self.o.matmul_activations:
                    reasons[name] = "kept float: activation x activation MatMul (attention; option matmul_activations)"
                    continue
                missing = [t.name for t in var_inputs if t.name not in avail]
                if missing or not var_inputs:
                    reasons[name] = "kept float: an input is float (Q/DQ would cost more than the integer op saves)"
                    continue
                kind = "elementwise"
                act_inputs = [t.name for t in var_inputs]
            unit = _Unit(name, kind, act_inputs, outs[0].name, outs[0].name,
                         weight_axis=weighted[1] if weighted else None)
            # fold a following Relu/Clip into the range
            if self.o.fold_activations and op not in ("Concat",):
                nxt = sole_consumer(outs[0])
                if nxt is not None and nxt.op in FOLDABLE_ACTIVATIONS and nxt.name not in excluded and \
                        nxt.outputs[0].name not in graph_outputs:
                    clip = self._clip_bounds(nxt)
                    if clip is not None:
                        unit.output = nxt.outputs[0].name
                        unit.clip = clip
                        reasons[nxt.name] = f"folded into {name}'s output range"
            units[name] = unit
            avail.add(unit.output)
            reasons[name] = "quantized" + (" (integer kernel)" if kind == "weighted" else " (inputs already integer)")
        # keep a passthrough only when an integer consumer needs its output
        needed = {t for u in units.values() for t in u.inputs}
        for name in reversed([n.name for n in graph.nodes]):
            u = tentative.get(name)
            if u is None:
                continue
            node = self._node(graph, name)
            if any(t.name in needed for t in node.outputs):
                units[name] = u
                needed.add(u.inputs[0])
                reasons[name] = "quantized (passthrough with the input's scale)"
            else:
                reasons[name] = "kept float: no integer consumer"
        return units, reasons

    def _node(self, graph, name):
        if not hasattr(self, "_node_index") or self._node_index[0] is not graph:
            self._node_index = (graph, {n.name: n for n in graph.nodes})
        return self._node_index[1][name]

    def _clip_bounds(self, node) -> tuple | None:
        if node.op == "Relu":
            return (0.0, math.inf)
        lo, hi = -math.inf, math.inf
        if "min" in node.attrs:
            lo = float(node.attrs["min"])
        if "max" in node.attrs:
            hi = float(node.attrs["max"])
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            v = constant_value(node.inputs[1])
            if v is None:
                return None
            lo = float(v.reshape(-1)[0])
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            v = constant_value(node.inputs[2])
            if v is None:
                return None
            hi = float(v.reshape(-1)[0])
        if lo > 0 or hi <= 0:
            return None  # the range must hold 0 and the clip must end at or below 0
        return (lo, hi)

    def _weight_info(self, node) -> tuple | None:
        """(weight input index, per-channel axis) when the node has float constant weights."""
        op = node.op
        if op == "Conv" and len(node.inputs) >= 2:
            w = constant_value(node.inputs[1])
            if w is not None and w.dtype == np.float32 and w.ndim >= 3 and \
                    (len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)):
                return 1, 0
        if op == "MatMul" and len(node.inputs) == 2:
            w = constant_value(node.inputs[1])
            if w is not None and w.dtype == np.float32 and w.ndim == 2 and not isinstance(node.inputs[0], gs.Constant):
                return 1, 1
        if op == "Gemm" and len(node.inputs) >= 2:
            w = constant_value(node.inputs[1])
            if w is not None and w.dtype == np.float32 and w.ndim == 2 and not isinstance(node.inputs[0], gs.Constant) \
                    and int(node.attrs.get("transA", 0)) == 0:
                c = node.inputs[2] if len(node.inputs) > 2 else None
                if c is not None and c.name and not (isinstance(c, gs.Constant) and np.asarray(c.values).ndim <= 1):
                    return None
                return 1, 0 if int(node.attrs.get("transB", 0)) else 1
        return None

    # -------------------------------------------------------------- ranges
    def _act_params(self, lo: float, hi: float, clip: tuple | None = None) -> tuple[float, int]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if clip is not None:
            lo = max(lo, clip[0])
            hi = min(hi, clip[1])
        if hi - lo < 1e-8:
            hi = lo + 1e-8 if lo < 0 else 1e-8
        levels = self.qmax - self.qmin
        scale = (hi - lo) / levels
        zp = int(np.clip(round(self.qmin - lo / scale), self.qmin, self.qmax))
        if clip is not None:
            # the Relu/Clip is redundant (and dropped by onnxruntime) only when the grid lies inside it
            rep_hi = (self.qmax - zp) * np.float32(scale)
            if rep_hi > clip[1]:
                scale = float(np.float32(clip[1] / (self.qmax - zp)) * np.float32(1 - 1e-6))
            if clip[0] == 0.0:
                zp = self.qmin
        return float(np.float32(scale)), zp

    # -------------------------------------------------------------- emission
    def emit(self, model_f: onnx.ModelProto, units: dict, params: dict, bias_shift: dict | None = None) -> gs.Graph:
        """A QDQ graph: the float model with Q/DQ on unit inputs and outputs and quantized weights."""
        g = gs.import_onnx(model_f)
        nodes = {n.name: n for n in g.nodes}
        tmap = g.tensors()
        act_np = self.act_dtype
        consts: dict[str, tuple] = {}

        def qparams(tname):
            if tname not in consts:
                s, z = params[tname]
                consts[tname] = (gs.Constant(tname + "_scale", np.array(s, np.float32)),
                                 gs.Constant(tname + "_zero_point", np.array(z, act_np)))
            return consts[tname]

        int_consumers = set(units)
        qtensors = []
        for u in units.values():
            qtensors.extend(u.inputs)
            if u.kind == "passthrough":
                node = nodes[u.node]
                qtensors.extend(t.name for t in node.outputs if t.name in params)
            else:
                qtensors.append(u.output)
        for tname in dict.fromkeys(qtensors):
            t = tmap[tname]
            s_c, z_c = qparams(tname)
            tq = gs.Variable(tname + "_quantized", dtype=act_np, shape=t.shape)
            consumers = [c for c in list(t.outputs)]
            qnode = gs.Node("QuantizeLinear", name=tname + "_QuantizeLinear", inputs=[t, s_c, z_c], outputs=[tq],
                            domain=self.qdq_domain)
            g.nodes.append(qnode)
            shared_dq = None
            for k, c in enumerate(consumers):
                if c.name in int_consumers:
                    dq_out = gs.Variable(f"{tname}_dequantized_{k}", dtype=np.float32, shape=t.shape)
                    g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear_{k}",
                                           inputs=[tq, s_c, z_c], outputs=[dq_out], domain=self.qdq_domain))
                else:
                    if shared_dq is None:
                        shared_dq = gs.Variable(f"{tname}_dequantized", dtype=np.float32, shape=t.shape)
                        g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear",
                                               inputs=[tq, s_c, z_c], outputs=[shared_dq], domain=self.qdq_domain))
                    dq_out = shared_dq
                for i, inp in enumerate(c.inputs):
                    if inp is t:
                        c.inputs[i] = dq_out
        # weights, bias and constant operands
        for u in units.values():
            node = nodes[u.node]
            if u.kind == "weighted":
                self._quantize_weights(g, node, u, params, (bias_shift or {}).get(u.node))
            elif u.kind == "elementwise":
                for i, t in enumerate(node.inputs):
                    if isinstance(t, gs.Constant):
                        node.inputs[i] = self._const_dq(g, t, f"{u.node}_in{i}")
        g.cleanup().toposort()
        return g

    def _const_dq(self, g, t, name):
        c = np.asarray(t.values).astype(np.float32)
        lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
        s, z = self._act_params(lo, hi)
        qv = np.asarray(np.clip(np.round(c / s) + z, self.qmin, self.qmax)).astype(self.act_dtype)
        out = gs.Variable(name + "_dequantized", dtype=np.float32, shape=list(c.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=name + "_DequantizeLinear",
                               inputs=[gs.Constant(name + "_quantized", qv),
                                       gs.Constant(name + "_scale", np.array(s, np.float32)),
                                       gs.Constant(name + "_zero_point", np.array(z, self.act_dtype))],
                               outputs=[out], domain=self.qdq_domain))
        return out

    def weight_quant(self, W: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """(int8 weights, scales): symmetric, per channel along ``axis`` (scales [C]) or per tensor
        (a 0-d scale), on ``[-wmax, wmax]``."""
        from onnxshrink.passes.quantize.weight_storage import int8_channels
        q, s = int8_channels(W, axis if self.per_channel else None, self.wmax)
        return q, (s.reshape(-1) if self.per_channel else s.reshape(()))

    def unit_weight_quant(self, name: str, W: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """``weight_quant`` with the integer weights of ``rounding`` (same scales) where it chose them."""
        q, s = self.weight_quant(W, axis)
        r = getattr(self, "rounded", {}).get(name)
        return (r, s) if r is not None and r.shape == q.shape else (q, s)

    def _quantize_weights(self, g, node, u: _Unit, params, shift):
        W = np.asarray(node.inputs[1].values).astype(np.float32)
        axis = u.weight_axis
        wq, ws = self.unit_weight_quant(node.name, W, axis)
        dq_w = gs.Variable(node.name + "_W_dequantized", dtype=np.float32, shape=list(W.shape))
        attrs = {"axis": axis} if self.per_channel else {}
        g.nodes.append(gs.Node("DequantizeLinear", name=node.name + "_W_DequantizeLinear", attrs=attrs,
                               inputs=[gs.Constant(node.name + "_W_quantized", wq),
                                       gs.Constant(node.name + "_W_scale", ws),
                                       gs.Constant(node.name + "_W_zero_point", np.zeros(ws.shape, np.int8))],
                               outputs=[dq_w], domain=self.qdq_domain))
        node.inputs[1] = dq_w
        bias_idx = 2
        if len(node.inputs) > bias_idx and node.inputs[bias_idx].name:
            b = np.asarray(node.inputs[bias_idx].values).astype(np.float32).reshape(-1)
        elif node.op in ("Conv",):
            b = None
        else:
            b = None
        if shift is not None and node.op in ("Conv", "Gemm"):  # MatMul has no bias to carry it
            b = (np.zeros(len(shift), np.float32) if b is None else b) - shift.astype(np.float32)
        if b is None:
            return
        sx = params[u.inputs[0]][0]
        n_out = W.shape[axis] if node.op != "Gemm" else W.shape[0 if int(node.attrs.get("transB", 0)) else 1]
        if b.size == 1 and n_out > 1:
            b = np.full(n_out, b[0], np.float32)
        sb = (np.float32(sx) * (ws if ws.ndim else np.full(n_out, ws, np.float32))).astype(np.float32)
        sb = np.broadcast_to(sb, b.shape).astype(np.float32)
        bq = np.clip(np.round(b.astype(np.float64) / sb), -2 ** 31 + 1, 2 ** 31 - 1).astype(np.int32)
        dq_b = gs.Variable(node.name + "_B_dequantized", dtype=np.float32, shape=list(b.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=node.name + "_B_DequantizeLinear",
                               attrs={"axis": 0} if self.per_channel else {},
                               inputs=[gs.Constant(node.name + "_B_quantized", bq),
                                       gs.Constant(node.name + "_B_scale", sb if self.per_channel else
                                                   np.array(sb.reshape(-1)[0], np.float32)),
                                       gs.Constant(node.name + "_B_zero_point",
                                                   np.zeros(sb.shape if self.per_channel else (), np.int32))],
                               outputs=[dq_b], domain=self.qdq_domain))
        if len(node.inputs) > bias_idx:
            node.inputs[bias_idx] = dq_b
        else:
            while len(node.inputs) < bias_idx:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(dq_b)

    # -------------------------------------------------------------- the run
    def run(self, graph: gs.Graph) -> PassResult:
        import time
        t0 = time.perf_counter()
        timings = self.stats["timings_s"] = {}

        def lap(name):
            nonlocal t0
            t = time.perf_counter()
            timings[name] = round(t - t0, 2)
            t0 = t

        refuse_quantized(graph)
        if self.o.weights_only != "off":
            from onnxshrink.passes.quantize.weight_only import run_weights_only
            self.n_units = 0
            self.stats["prepared"] = prepare_float_graph(graph)
            return PassResult(*run_weights_only(graph, self.o, self.ctx, self.stats))
        self._scheme()
        self.stats["prepared"] = prepare_float_graph(graph, self.o.div_to_mul)
        if self.o.equalize:
            from onnxshrink.passes.equalize import equalize_pairs
            self.stats["equalize"] = equalize_pairs(graph)
        if not any(n.op in WEIGHTED_OPS and self._weight_info(n) is not None for n in graph.nodes):
            raise InputError("the model has no float Conv/MatMul/Gemm weights to quantize")
        graph_in = graph
        graph = self._handle_opset(graph)
        # float activations need no per-channel DequantizeLinear: the float result keeps the input's opset
        self._pre_opset = graph_in if graph is not graph_in else None
        if graph.opset and graph.opset < 13:
            self.per_channel = False
        prepare_float_graph(graph)
        self.model_f = self.ctx.to_model(graph)
        self.graph_f = graph = gs.import_onnx(self.model_f)
        if np.dtype(self.act_dtype).itemsize == 2 and int(graph.opset or 0) < 21:
            # ONNX Q/DQ take 16-bit types from opset 21; onnxruntime (and its QNN EP) read the
            # com.microsoft Q/DQ ops the same way below that (as its own quantizer emits them)
            self.qdq_domain = "com.microsoft"
            self.stats["scheme"]["qdq_domain"] = self.qdq_domain
        lap("prepare_and_opset")

        excluded = set(self.o.exclude)
        units, reasons = self.plan(graph, excluded)
        if not any(u.kind == "weighted" for u in units.values()):
            # every weighted node excluded: nothing can be integer, no calibration needed
            self.n_units = 0
            self.stats["nodes"] = reasons
            return self._float_result(graph, "every weighted node is excluded")
        # calibrate every tensor any plan could quantize, so excluding units later needs no new pass
        cand, _ = self.plan(graph, set())
        tensors = sorted({t for u in cand.values() for t in (u.inputs + [u.output])})
        if self.o.calibrator == "minmax" and not _is_large(self.model_f):
            # only min and max are needed: reduced in the graph, the tensors never leave onnxruntime
            self.hists, rest = collect_minmax(self.model_f, tensors, self._samples())
            if rest:
                self.hists.update(collect_histograms(self._capture(self.model_f, rest), rest, bins=self.o.bins))
        else:
            self.hists = collect_histograms(self._capture(self.model_f, tensors), tensors, bins=self.o.bins)
        self.clips = {u.output: u.clip for u in cand.values() if u.clip is not None}
        kw = {"percentile": self.o.percentile} if self.o.calibrator == "percentile" else {}
        levels = self.qmax - self.qmin + 1
        self.ranges = {t: estimate_range(h, self.o.calibrator, levels=levels, **kw) for t, h in self.hists.items()}
        self.n_units = sum(1 for u in units.values() if u.kind == "weighted")
        lap("calibrate")
        if self.o.rounding == "gptq":
            from onnxshrink.passes.quantize.rounding import round_units
            w_units = [u for u in cand.values() if u.kind == "weighted"]
            self.rounded, self.stats["rounding"] = round_units(
                self.model_f, graph, [(u.node, u.weight_axis) for u in w_units], self.weight_quant, self._samples,
                self._capture, self.wmax, n_samples=self.o.rounding_samples)
            lap("rounding")

        # per-unit analysis on a shadow model: each unit quantized alone, on float inputs
        # (the guard asks for it only when its fidelity floor fails: most models never pay for it)
        self._cand = cand
        analysis = self._analysis() if self.o.keep_float or self.o.bias_correction else None
        lap("analyse")
        self.shift = ({k: a["shift"] for k, a in analysis.items()} if self.o.bias_correction and analysis else None)
        order = self._order() if analysis else None
        if self.o.keep_float and order:
            excluded |= set(order[: self.o.keep_float])
            units, reasons = self.plan(graph, excluded)
        qg = self._build(units)
        if self.o.guard or self.ctx.budget is not None:
            qg, units, reasons, excluded = self._guard(qg, units, reasons, excluded, order)
            lap("guard")
            if qg is None:
                self.stats["nodes"] = reasons
                return self._float_result(graph, self.stats.get("guard_reason", "no faster placement"))
        for n in excluded:
            if n in reasons and n in getattr(self, "sens", {}) and not reasons[n].startswith("kept float: small"):
                reasons[n] = f"kept float: sensitive (alone it adds noise-to-signal {self.sens[n]:.2e})"
        self.stats["nodes"] = reasons
        self.stats["quantized_units"] = {k: sum(1 for u in units.values() if u.kind == k)
                                         for k in ("weighted", "elementwise", "passthrough")}
        self.stats["kept_float"] = sorted(excluded)
        if not units:
            why = ("no node could be quantized within the fidelity budget (every unit was kept float to hold it)"
                   if excluded else "no node could be quantized")
            return self._float_result(graph, why)
        qg, _ = self._store_float_weights(qg)
        lap("float_weights")
        _drop_qdq_value_info(qg)
        return PassResult(qg, True, self.stats)

    def _float_result(self, graph, why: str) -> PassResult:
        """No integer placement kept: the float model, with its weights stored int8 when ``fallback``
        allows (smaller, same speed); else unchanged."""
        src = self._pre_opset if getattr(self, "_pre_opset", None) is not None else gs.import_onnx(self.model_f)
        g, stored = self._store_float_weights(src)
        if not stored:
            return PassResult(graph, False, {"reason": why, **self.stats})
        self.stats["activations"] = f"float ({why})"
        self.stats["note"] = f"activations stay float: {why}; {stored} weights stored int8 (float speed)"
        return PassResult(g, True, self.stats)

    def _fallback_mode(self) -> str:
        mode = self.o.fallback
        if mode == "auto":
            target = getattr(self.ctx, "target", None)
            # the CPU EP folds the Cast x Mul at load; an EP profile (XNNPACK, QNN HTP, NNAPI, CoreML) is
            # checked op by op and wants its weights quantized or float, not a decode subgraph
            if target is not None and getattr(target, "name", None) != "cpu":
                self.stats["float_weights"] = {"mode": "float", "why": f"the {target.name} target"}
                return "float"
            if target is not None and getattr(target, "ort_format", False):
                # the ORT format converter applies constant folding: the .ort would hold float weights
                self.stats["float_weights"] = {"mode": "float", "why": "ORT format output (its converter folds "
                                                                       "the stored weights back to float)"}
                return "float"
        return mode

    def _store_float_weights(self, g: gs.Graph) -> tuple[gs.Graph, int]:
        """Store the float-kept weights of ``g`` int8 (``weight_storage.py``) per ``fallback``:
        (graph, number stored)."""
        from onnxshrink.passes.quantize import weight_storage as ws
        mode = self._fallback_mode()
        if mode == "float":
            return g, 0
        cands = ws.candidates(g, skip=set(self.o.float_weights))
        if not cands:
            return g, 0
        log: dict = {"mode": mode}
        checked = mode == "auto" and (self.o.guard or self.ctx.budget is not None)
        if checked and _is_large(self.model_f):
            # the check copies the model per trial: not for a model past 2 GB
            self.stats["float_weights"] = {"mode": "float", "why": "model over 2 GB: fallback=int8 stores "
                                                                   "without the check"}
            return g, 0
        if checked:
            if not hasattr(self, "_floor"):
                self._floor = self.o.min_cosine
            base = self.ctx.to_model(g)
            from onnxshrink.metrics import fidelity
            from onnxshrink.runtime import make_session
            ref: dict = {}  # the unstored model's outputs on 4 samples, made on the first layer_loss

            def layer_loss(m):
                if not ref:
                    ref["samples"] = list(self._samples_n(4))
                    sess = make_session(base, optimize=True, low_memory=True)
                    ref["outputs"] = [sess.run(None, s) for s in ref["samples"]]
                out = make_session(m, optimize=True, low_memory=True)
                return 1.0 - fidelity(ref["outputs"], [out.run(None, s) for s in ref["samples"]]).get("cosine", 0.0)

            base_fid = self._fidelity(base)
            if self._holds(base_fid):
                def check(m):
                    return self._holds(self._fidelity(m))
            elif self.ctx.budget is None:
                # the guard's best plan already misses its floor: the stored weights may cost at most a
                # tenth of the floor's allowance more
                worst = base_fid.get("cosine", 0.0) - 0.1 * (1.0 - self._floor)
                log["floor"] = f"the plan misses the floor: cosine >= {worst:.5f} (a tenth of the allowance below it)"

                def check(m):
                    return self._fidelity(m).get("cosine", 0.0) >= worst
            else:
                log.update(stored=0, why="the plan breaks the budget already (the manager weakens it)")
                self.stats["float_weights"] = log
                return g, 0
            keep, log_sel = ws.select_within_budget(base, cands, check, layer_loss)
            log.update(log_sel)
            cands = {k: cands[k] for k in keep}
        saved = ws.store_int8(g, cands) if cands else {}
        log.update(stored=len(saved), bytes_saved=int(sum(saved.values())))
        self.stats["float_weights"] = log
        return g, len(saved)

    def _capture(self, model, tensors, samples=None):
        from onnxshrink.runtime import capture_activations
        return capture_activations(model, tensors, self._samples() if samples is None else samples)

    def _params(self, units):
        params = {}
        for u in units.values():
            if u.kind == "passthrough":
                continue
            for t in u.inputs + [u.output]:
                if t not in params:
                    lo, hi = self.ranges.get(t, (0.0, 1.0))
                    params[t] = self._act_params(lo, hi, self.clips.get(t) if t == u.output else None)
            if u.kind == "elementwise" and self.qmax > 255 and u.output == u.raw_output and \
                    self._node(self.graph_f, u.node).op == "Sigmoid":
                # QNN HTP's 16-bit Sigmoid has a fixed output encoding (onnxruntime's QNN config sets it too)
                params[u.output] = (1.0 / (self.qmax - self.qmin + 1), 0) if self.qmin == 0 else (1.0 / 32768, 0)
        # passthrough outputs share their input's params (resolved in graph order)
        for node in self.graph_f.nodes:
            u = units.get(node.name)
            if u is not None and u.kind == "passthrough":
                src = params.get(u.inputs[0])
                if src is None:
                    lo, hi = self.ranges.get(u.inputs[0], (0.0, 1.0))
                    src = params[u.inputs[0]] = self._act_params(lo, hi)
                for t in node.outputs:
                    params[t.name] = src
        return params

    def _build(self, units) -> gs.Graph:
        return self.emit(self.model_f, units, self._params(units), self.shift)

    # -------------------------------------------------------------- guards: fidelity floor and speed
    def _fidelity(self, g) -> dict:
        """Fidelity against the float model: the manager's evaluator under a budget, else the
        guard's own check on up to 8 calibration samples."""
        if self.ctx.budget is not None and self.ctx.evaluator is not None:
            return self.ctx.evaluate(g)
        from onnxshrink.metrics import fidelity
        from onnxshrink.runtime import make_session
        if not hasattr(self, "_ref"):
            self._guard_samples = list(self._samples_n(8))
            sess = make_session(self.model_f, optimize=False, low_memory=True)
            self._ref = [sess.run(None, s) for s in self._guard_samples]
        model = g if isinstance(g, onnx.ModelProto) else self.ctx.to_model(g)
        sess = make_session(model, optimize=True, low_memory=True)
        return fidelity(self._ref, [sess.run(None, s) for s in self._guard_samples])

    def _holds(self, fid: dict) -> bool:
        if self.ctx.budget is not None:
            return self.ctx.budget_holds(fid)
        return fid.get("cosine", 0.0) >= self._floor

    def _analysis(self) -> dict:
        """The per-unit analysis (sensitivity, mean shifts), run once on first use."""
        if not hasattr(self, "_analysed"):
            self._analysed = self.analyse(self._cand)
            self.sens = {k: a["nsr"] for k, a in self._analysed.items()}
            self.stats["sensitivity"] = {k: float(f"{v:.3e}") for k, v in
                                         sorted(self.sens.items(), key=lambda kv: -kv[1])[:20]}
        return self._analysed

    def _order(self) -> list:
        """Weighted units, most sensitive first."""
        self._analysis()
        return [k for k, _ in sorted(self.sens.items(), key=lambda kv: -kv[1])]

    def _guard(self, qg, units, reasons, excluded, order):
        """Keep the most sensitive units in float (1, 2, 4, ... of them) until the fidelity floor holds
        (``ctx.budget``; else mean cosine >= ``min_cosine`` x the float model's own cosine after
        onnxruntime's optimizations, which is below 1 on ill-conditioned outputs). When the floor is
        out of reach within ``max_float_fraction`` of the units, the best candidate within it is kept.
        Then, with ``guard`` and no target other than ``cpu`` (this machine's speed says nothing
        about an NPU or an ARM core), the model must be faster than the float one: small convolutions (whose
        integer kernels lose to onnxruntime's float NCHWc kernels) go back to float, else the pass
        gives up and changes nothing."""
        self._floor = self.o.min_cosine
        if self.ctx.budget is None:
            base = self._fidelity(self.model_f).get("cosine", 1.0)
            self._floor = self.o.min_cosine * min(base, 1.0)
        base_ex = set(excluded)
        fid = self._fidelity(qg)
        tried = [(fid, qg, units, reasons, excluded)]
        log = [{"keep_float": 0, "cosine": round(fid.get("cosine", 0.0), 6)}]
        if not self._holds(fid) and self.elementwise:
            # every integer elementwise op requantizes; without them each conv input is rounded once
            self.elementwise = False
            units_e, reasons_e = self.plan(self.graph_f, base_ex)
            qg_e = self._build(units_e)
            fid_e = self._fidelity(qg_e)
            log.append({"keep_float": 0, "elementwise": False, "cosine": round(fid_e.get("cosine", 0.0), 6)})
            if fid_e.get("cosine", 0.0) > fid.get("cosine", 0.0):
                fid, qg, units, reasons = fid_e, qg_e, units_e, reasons_e
                tried.append((fid, qg, units, reasons, excluded))
            else:
                self.elementwise = True
        if not self._holds(fid) and order is None:
            order = self._order()
        order = order or []
        cap = len(order) if self.ctx.budget is not None else \
            max(1, int(math.ceil(self.o.max_float_fraction * len(order))))
        k = 1
        while not self._holds(fid) and order and k <= min(cap, len(order)):
            ex = base_ex | set(order[:k])
            units_k, reasons_k = self.plan(self.graph_f, ex)
            qg_k = self._build(units_k)
            fid = self._fidelity(qg_k)
            tried.append((fid, qg_k, units_k, reasons_k, ex))
            log.append({"keep_float": k, "cosine": round(fid.get("cosine", 0.0), 6)})
            if k >= min(cap, len(order)):
                break
            k = min(2 * k, cap, len(order))
        self.stats["fidelity_search"] = log
        self.stats["fidelity_floor"] = str(self.ctx.budget) if self.ctx.budget is not None else \
            f"cosine>={self._floor:.4f}"
        ok = [t for t in tried if self._holds(t[0])]
        fid, qg, units, reasons, excluded = ok[0] if ok else max(tried, key=lambda t: t[0].get("cosine", 0.0))
        self.outcome = {"holds": bool(ok), "cosine": fid.get("cosine", 0.0), "kept_float": len(excluded - base_ex)}
        if not self.o.guard:
            return qg, units, reasons, excluded
        target = getattr(getattr(self.ctx, "target", None), "name", None)
        if target not in (None, "cpu"):
            # an NPU or an ARM CPU runs the integer kernels natively: timing them on this machine
            # says nothing about the target, so only the fidelity floor applies
            self.stats["speed_search"] = [{"config": f"skipped: the {target} target is not this CPU"}]
            return qg, units, reasons, excluded
        sample = self._first_sample()
        t_f, t_q = self._latency(self.model_f, self.ctx.to_model(qg), sample)
        speed = [{"config": f"{len(excluded)} sensitive units in float", "speedup": round(t_f / t_q, 3)}]
        best = (t_q, qg, units, reasons, excluded)
        if t_f / t_q < self.o.min_speedup:
            for limit in (2048, 8192, 32768):
                small = {u.node for u in units.values() if u.kind == "weighted" and self._weight_count(u) < limit}
                if not small:
                    continue
                ex = excluded | small
                units_k, reasons_k = self.plan(self.graph_f, ex)
                if not any(u.kind == "weighted" for u in units_k.values()):
                    break
                qg_k = self._build(units_k)
                t_f2, t_k = self._latency(self.model_f, self.ctx.to_model(qg_k), sample)
                t_k *= t_f / t_f2  # the same float reference for every candidate
                speed.append({"config": f"only convs with >= {limit} weights", "speedup": round(t_f / t_k, 3)})
                if t_k < best[0]:
                    fid_k = self._fidelity(qg_k)
                    if self._holds(fid_k) or fid_k.get("cosine", 0) >= fid.get("cosine", 0):
                        best = (t_k, qg_k, units_k, {**reasons_k, **{n: "kept float: small convolution (the "
                                                     "float kernel is faster)" for n in small}}, ex)
                if t_f / best[0] >= self.o.min_speedup:
                    break
        self.stats["speed_search"] = speed
        if t_f / best[0] < self.o.min_speedup:
            self.stats["guard_reason"] = (f"no quantized placement is faster than fp32 on this CPU "
                                          f"(best {t_f / best[0]:.2f}x)")
            return None, units, reasons, excluded
        return best[1], best[2], best[3], best[4]

    def _weight_count(self, u) -> int:
        node = self._node(self.graph_f, u.node)
        return int(np.prod(node.inputs[1].shape)) if u.kind == "weighted" else 0

    def _latency(self, model_a, model_b, sample, rounds: int | None = None):
        """Median one-thread latency of two models, runs interleaved (shared load hits both)."""
        import statistics
        import time
        from onnxshrink.runtime import interleaved_latency, make_session
        sa, sb = make_session(model_a, optimize=True, threads=1), make_session(model_b, optimize=True, threads=1)
        for s in (sa, sb):
            s.run(None, sample)
        t0 = time.perf_counter()
        sa.run(None, sample)
        one = time.perf_counter() - t0
        rounds = rounds or int(min(41, max(7, 1.5 / max(one, 1e-4))))
        ta, tb = interleaved_latency([sa, sb], sample, rounds=rounds, runs=1, warmup=0)
        return statistics.median(ta) / 1e3, statistics.median(tb) / 1e3

    def _samples_n(self, n):
        for i, s in enumerate(self._samples()):
            if i >= n:
                break
            yield s

    # -------------------------------------------------------------- per-unit analysis
    def analyse(self, units, samples: int = 8) -> dict:
        """Quantize each weighted unit alone on its float input (a shadow copy of the node with
        fake-quantized input, weights and bias next to the float one), and measure over calibration
        samples its noise-to-signal ratio ``|y_q - y|^2 / |y|^2`` (its sensitivity) and the mean
        shift of each output channel ``E[y_q - y]`` (what bias correction removes)."""
        w_units = [u for u in units.values() if u.kind == "weighted"]
        if not w_units:
            return {}
        params = self._params(units)
        g = gs.import_onnx(self.model_f)
        nodes = {n.name: n for n in g.nodes}
        tmap = g.tensors()
        pairs = []
        for u in w_units:
            node = nodes[u.node]
            x = tmap[u.inputs[0]]
            s, z = params[u.inputs[0]]
            sc = gs.Constant(u.node + "_sh_scale", np.array(s, np.float32))
            zc = gs.Constant(u.node + "_sh_zp", np.array(z, self.act_dtype))
            xq = gs.Variable(u.node + "_sh_xq", dtype=self.act_dtype)
            xd = gs.Variable(u.node + "_sh_xd", dtype=np.float32)
            g.nodes.append(gs.Node("QuantizeLinear", inputs=[x, sc, zc], outputs=[xq], domain=self.qdq_domain))
            g.nodes.append(gs.Node("DequantizeLinear", inputs=[xq, sc, zc], outputs=[xd], domain=self.qdq_domain))
            W = np.asarray(node.inputs[1].values).astype(np.float32)
            wq, ws = self.unit_weight_quant(u.node, W, u.weight_axis)
            shape = [1] * W.ndim
            if self.per_channel:
                shape[u.weight_axis] = -1
            Wf = (wq.astype(np.float32) * ws.reshape(shape)).astype(np.float32)
            ins = [xd, gs.Constant(u.node + "_sh_W", Wf)]
            if len(node.inputs) > 2 and node.inputs[2].name:
                b = np.asarray(node.inputs[2].values).astype(np.float32)
                sb = np.float32(s) * (ws if ws.ndim else np.float32(ws))
                bf = (np.round(b / sb) * sb).astype(np.float32)
                ins.append(gs.Constant(u.node + "_sh_B", bf))
            y = node.outputs[0]
            ys = gs.Variable(u.node + "_sh_y", dtype=np.float32)
            g.nodes.append(gs.Node(node.op, attrs=dict(node.attrs), inputs=ins, outputs=[ys]))
            pairs.append((u, y.name, ys.name))
        g.toposort()
        from onnxshrink.graph.convert import graph_to_model
        model = graph_to_model(g, self.model_f)
        names = [n for _, a, b in pairs for n in (a, b)]
        acc = {u.node: {"d": 0.0, "n": 0, "e": 0.0, "s": 0.0} for u, _, _ in pairs}
        for cap in self._capture(model, names, list(self._samples_n(samples))):
            for u, a, b in pairs:
                yf, yq = cap[a].astype(np.float64), cap[b].astype(np.float64)
                op = nodes[u.node].op
                axis = 1 if op == "Conv" else yf.ndim - 1
                red = tuple(i for i in range(yf.ndim) if i != axis)
                r = acc[u.node]
                r["d"] = r["d"] + (yq - yf).mean(axis=red)
                r["n"] += 1
                r["e"] += float(np.sum((yq - yf) ** 2))
                r["s"] += float(np.sum(yf ** 2))
        return {k: {"nsr": r["e"] / max(r["s"], 1e-30), "shift": np.asarray(r["d"]) / max(r["n"], 1)}
                for k, r in acc.items()}
