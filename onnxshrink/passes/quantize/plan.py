"""Placement of static QDQ quantization: which nodes become integer units on onnxruntime's CPU EP.

A node unit ``DQ -> op -> Q`` is emitted only where onnxruntime's QDQ selectors
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

Every-op placement (``PlacementRules.float_tensors`` set: a device without a float unit, QNN HTP before
v73): every node with a float activation input or output is a unit, so every compute op sits between
Q/DQ. Conv/ConvTranspose/MatMul/Gemm with float constant weights are weighted units (ConvTranspose per
channel along axis 1, group 1); the ops above are passthrough units (their outputs take the input's
scale); every other op is an elementwise unit whose float constant data operands get a DQ (not shape
operands, Resize's roi/scales, Pad's value or Clip's bounds, which stay float parameters). Graph inputs
and outputs are quantized too. A Relu/Clip is folded only after a Conv/ConvTranspose (the QNN EP fuses
DQ -> Conv -> Relu/Clip -> Q); elsewhere it is its own unit.
"""

from __future__ import annotations

__all__ = ["QUANTIZED_OPS", "WEIGHTED_OPS", "PlacementRules", "QuantUnit", "clip_bounds",
           "float_activations", "has_float_weights", "plan_units", "refuse_quantized", "weight_info", "NON_DATA_INPUTS"]

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError
from onnxshrink.graph.shapes import infer_shapes
from onnxshrink.graph.values import clip_range, constant_value, sole_consumer

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
# inputs that are parameters, not data (shapes, axes, sizes, roi/scales, pad values, clip bounds): never quantized
NON_DATA_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3),
                   "Pad": (1, 2, 3), "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,),
                   "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "TopK": (1,), "Upsample": (1,),
                   "Clip": (1, 2), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "ScatterND": (1,)}


@dataclass
class QuantUnit:
    """One node run on integers: its activation inputs and output get Q/DQ, its weights int8."""

    node: str
    kind: str               # weighted | elementwise | passthrough
    inputs: list            # activation input tensor names to quantize
    output: str             # the tensor the unit's Q reads (after a folded Relu/Clip)
    raw_output: str         # the op's own output
    clip: tuple | None = None  # (min, max) of a folded Relu/Clip
    weight_axis: int | None = None
    const_inputs: tuple | None = None  # input indices of constant data operands to quantize (None: every constant)


@dataclass(frozen=True)
class PlacementRules:
    """The placement options: integer elementwise ops, activation x activation MatMul, Relu/Clip folding;
    ``float_tensors`` (the float activation tensors of the graph) switches to the every-op placement."""

    elementwise: bool = True
    matmul_activations: bool = True
    fold_activations: bool = True
    float_tensors: frozenset | None = None

    @property
    def every_op(self) -> bool:
        return self.float_tensors is not None


def refuse_quantized(graph: gs.Graph) -> None:
    """Raise InputError when the graph is already quantized (QDQ, QOperator or dynamic)."""
    for node in graph.nodes:
        if node.op in QUANTIZED_OPS or node.op.startswith("QLinear"):
            raise InputError(f"the model is already quantized (it has {node.op} node '{node.name}'); "
                             f"quantize the float model instead")


def float_activations(model) -> frozenset:
    """The float32 activation tensors of ``model`` (graph inputs and node outputs, from shape inference)."""
    m = infer_shapes(model, data_prop=False)
    g = m.graph
    inits = {t.name for t in g.initializer}
    out = set()
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name not in inits and vi.type.tensor_type.elem_type == 1:  # TensorProto.FLOAT
            out.add(vi.name)
    return frozenset(out)


def has_float_weights(graph: gs.Graph) -> bool:
    """Whether some Conv/MatMul/Gemm has float constant weights (something to quantize)."""
    return any(n.op in WEIGHTED_OPS and weight_info(n) is not None for n in graph.nodes)


def plan_units(graph: gs.Graph, excluded: set, rules: PlacementRules) -> tuple[dict, dict]:
    """Units to quantize (by node name) and a decision per compute node (name -> reason)."""
    if rules.every_op:
        return plan_every_op(graph, excluded, rules)
    graph_outputs = {t.name for t in graph.outputs}
    main_graph = {id(n) for n in graph.nodes}  # a consumer inside an If/Loop body is not foldable here
    avail: set = set()       # tensors available as integers without a new Q
    units: dict[str, QuantUnit] = {}
    reasons: dict[str, str] = {}
    tentative: dict[str, QuantUnit] = {}
    for node in graph.nodes:
        op = node.op
        if not (op in WEIGHTED_OPS or op in ELEMENTWISE_OPS or op in PASSTHROUGH_OPS or op in ("ConvTranspose",)):
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
        weighted = weight_info(node)
        if op in PASSTHROUGH_OPS:
            data = node.inputs[0] if node.inputs else None
            if data is not None and data.name in avail and not any(t.name in graph_outputs for t in outs) \
                    and not (op == "MaxPool" and len(outs) > 1):
                tentative[name] = QuantUnit(name, "passthrough", [data.name], outs[0].name, outs[0].name)
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
            if not rules.elementwise:
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
            if op == "MatMul" and not rules.matmul_activations:
                reasons[name] = "kept float: activation x activation MatMul (attention; option matmul_activations)"
                continue
            missing = [t.name for t in var_inputs if t.name not in avail]
            if missing or not var_inputs:
                reasons[name] = "kept float: an input is float (Q/DQ would cost more than the integer op saves)"
                continue
            kind = "elementwise"
            act_inputs = [t.name for t in var_inputs]
        unit = QuantUnit(name, kind, act_inputs, outs[0].name, outs[0].name,
                         weight_axis=weighted[1] if weighted else None)
        # fold a following Relu/Clip into the range
        if rules.fold_activations and op not in ("Concat",):
            nxt = sole_consumer(outs[0])
            if nxt is not None and id(nxt) in main_graph and nxt.op in FOLDABLE_ACTIVATIONS and \
                    nxt.name not in excluded and nxt.outputs[0].name not in graph_outputs:
                clip = clip_bounds(nxt)
                if clip is not None:
                    unit.output = nxt.outputs[0].name
                    unit.clip = clip
                    reasons[nxt.name] = f"folded into {name}'s output range"
        units[name] = unit
        avail.add(unit.output)
        reasons[name] = "quantized" + (" (integer kernel)" if kind == "weighted" else " (inputs already integer)")
    # keep a passthrough only when an integer consumer needs its output
    needed = {t for u in units.values() for t in u.inputs}
    nodes = {n.name: n for n in graph.nodes}
    for name in reversed([n.name for n in graph.nodes]):
        u = tentative.get(name)
        if u is None:
            continue
        if any(t.name in needed for t in nodes[name].outputs):
            units[name] = u
            needed.add(u.inputs[0])
            reasons[name] = "quantized (passthrough with the input's scale)"
        else:
            reasons[name] = "kept float: no integer consumer"
    return units, reasons


def plan_every_op(graph: gs.Graph, excluded: set, rules: PlacementRules) -> tuple[dict, dict]:
    """Every node with a float activation input or output becomes a unit (module docstring)."""
    floats = rules.float_tensors or frozenset()
    main_graph = {id(n) for n in graph.nodes}
    units: dict[str, QuantUnit] = {}
    reasons: dict[str, str] = {}
    folded: set = set()
    for node in graph.nodes:
        name, op = node.name, node.op
        if name in folded:
            continue
        act = [t.name for k, t in enumerate(node.inputs) if not isinstance(t, gs.Constant) and t.name in floats
               and k not in NON_DATA_INPUTS.get(op, ())]
        outs = [t for t in node.outputs if t.name in floats]
        if not act and not outs:
            continue
        if name in excluded:
            reasons[name] = "kept float: excluded (sensitive or by option)"
            continue
        if not outs:
            reasons[name] = f"kept float: {op} has no float output to quantize"
            continue
        weighted = weight_info(node)
        if weighted is not None:
            unit = QuantUnit(name, "weighted", [node.inputs[0].name], outs[0].name, outs[0].name,
                             weight_axis=weighted[1])
        elif op in PASSTHROUGH_OPS and act and len(act) == 1 and node.inputs[0].name == act[0]:
            unit = QuantUnit(name, "passthrough", act, outs[0].name, outs[0].name)
        else:
            consts = tuple(k for k, t in enumerate(node.inputs) if isinstance(t, gs.Constant) and t.name and
                           np.asarray(t.values).dtype.kind == "f" and k not in NON_DATA_INPUTS.get(op, ()))
            unit = QuantUnit(name, "elementwise", act, outs[0].name, outs[0].name, const_inputs=consts)
        if rules.fold_activations and op in ("Conv", "ConvTranspose"):
            nxt = sole_consumer(outs[0])
            if nxt is not None and id(nxt) in main_graph and nxt.op in FOLDABLE_ACTIVATIONS and \
                    nxt.name not in excluded and nxt.outputs[0].name not in {t.name for t in graph.outputs}:
                clip = clip_bounds(nxt)
                if clip is not None:
                    unit.output = nxt.outputs[0].name
                    unit.clip = clip
                    folded.add(nxt.name)
                    reasons[nxt.name] = f"folded into {name}'s output range (the QNN EP fuses it)"
        units[name] = unit
        reasons[name] = f"quantized ({unit.kind}, every op integer)"
    return units, reasons


def clip_bounds(node: gs.Node) -> tuple | None:
    """(min, max) of a Relu or Clip whose range holds 0 and whose lower end is at or below 0, else None."""
    if node.op == "Relu":
        return (0.0, math.inf)
    bounds = clip_range(node)
    if bounds is None or bounds[0] > 0 or bounds[1] <= 0:
        return None  # the range must hold 0 and the clip must end at or below 0
    return bounds


def weight_info(node: gs.Node) -> tuple | None:
    """(weight input index, per-channel axis) when the node has float constant weights."""
    op = node.op
    if op == "Conv" and len(node.inputs) >= 2:
        w = constant_value(node.inputs[1])
        if w is not None and w.dtype == np.float32 and w.ndim >= 3 and \
                (len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)):
            return 1, 0
    if op == "ConvTranspose" and len(node.inputs) >= 2 and int(node.attrs.get("group", 1)) == 1:
        w = constant_value(node.inputs[1])
        if w is not None and w.dtype == np.float32 and w.ndim >= 3 and \
                (len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)):
            return 1, 1
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
