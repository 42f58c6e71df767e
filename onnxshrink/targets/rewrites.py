"""Exact graph rewrites applied at target emission, on onnx-graphsurgeon graphs.

Decompositions of ops a target lacks, and fusions a target prefers; each is exact::

    HardSwish(x)   = x * HardSigmoid(x; alpha=1/6, beta=1/2)
    HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)
    Gemm(A, B, C)  = alpha * (A' @ B') + beta * C        (A' = A^T if transA, B' likewise)
    MatMul(A, W) + b  ->  Gemm(A, W, b)                   (A 2-D, W and b constant)
    x * HardSigmoid(x; 1/6, 1/2)  ->  HardSwish(x)
    ConvTranspose(x, W; kernel = stride = s) = DepthToSpace_DCR(Conv1x1(x, W'), s)
        with W'[(a*s + b)*O + o, c] = W[c, o, a, b]
    Resize(X, "", scales) -> Resize(X, roi=[], scales)
    x * 0.5 * (1 + Erf(x / sqrt 2))  ->  Gelu(x)          (com.microsoft below opset 20)
    Einsum(A, B) = Transpose/Reshape(MatMul(A', B'))      (a batched matrix product; graph.einsum)
    Transpose(x, perm) = Reshape(Transpose(Reshape(x, S'), perm'))   (above the target's rank limit; graph.rank)
    Gather(x, i, axis) = Squeeze(Slice(x, i, i + 1, axis), axis)       (a constant index, or run of indices)
    Flatten(x, axis) = Reshape(x, [d_0 * ... * d_(axis-1), -1])
    Pad(x, pads, v) = Concat(fill_v, x, fill_v) per padded axis      (mode constant, static shape)
    BatchNormalization(x) = x * s + t                                  (constant statistics; to round-off)

A node inside a QDQ group (fed by DequantizeLinear, feeding QuantizeLinear) is never split,
since the new intermediate tensors would be float: such ops are rewritten before quantization
(``onnxshrink.targets.prepare.prepare_for_target``). ``REWRITES`` names each rewrite with the ops
it removes and the ops it needs; ``apply_rewrites`` runs the named ones and, for a profile, every
decomposition of an op the target lacks into ops it has. Also the small graph helpers the other
target modules share (``export_graph``, ``unique_name``, ``op_counts``).
"""

from __future__ import annotations

__all__ = ["REWRITES", "DECOMPOSITIONS", "apply_rewrites", "decomposed_for", "gemm_to_matmul", "export_graph",
           "unique_name", "op_counts", "is_quantized_node"]

import collections
import contextlib
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.einsum import einsum_to_matmul
from onnxshrink.graph.fresh import FreshNames
from onnxshrink.graph.rank import reduce_transpose_rank
from onnxshrink.graph.shapes import infer_shapes, static_shape, value_shapes, value_types
from onnxshrink.graph.values import constant_value, is_default_domain, pad_operands, sole_consumer
from onnxshrink.model import copy_model_fields, weightless_copy
from onnxshrink.targets.profiles import target_has_op


def apply_rewrites(model: onnx.ModelProto, names, profile=None) -> tuple[onnx.ModelProto, dict]:
    """Apply the named rewrites (and, with a profile, every decomposition of an op the target
    lacks into ops it has). Returns (model, {rewrite: count})."""
    present = set(op_counts(model))
    todo = list(names)
    if profile is not None:
        todo += [r for r in DECOMPOSITIONS if _decomposes(profile, r, present) and r not in todo]
        # HardSwish on a target without HardSwish nor HardSigmoid: both decompositions in order
        if "HardSwish" in present and not target_has_op(profile, "HardSwish") and \
                not target_has_op(profile, "HardSigmoid") and "decompose_hardswish" not in todo:
            todo[:0] = ["decompose_hardswish", "decompose_hardsigmoid"]
    # Transposes above the target's rank limit: written at lower rank; it and the SHAPED rewrites read
    # the shapes inference gives, lent to the graph while they run (the others run without them)
    limit = profile.max_rank if profile is not None and profile.ops is not None else None
    types = _inferred_types(model) if any(r in SHAPED for r in todo) or (
        limit is not None and "Transpose" in present) else {}
    high = limit is not None and any(
        n.op_type == "Transpose" and len(types.get(n.input[0], (None, ()))[1] or ()) > limit for n in model.graph.node)
    if not todo and not high:
        return model, {}
    g = gs.import_onnx(model)
    done = {}
    todo = list(dict.fromkeys(todo))  # once each: HardSwish's pair may also be a listed decomposition

    def run(r: str) -> None:
        k = REWRITES[r][0](g)
        g.nodes = [n for n in g.nodes if n.outputs]  # the nodes a rewrite replaced: gone for the next one
        if k:
            done[r] = k
    for r in [r for r in todo if r not in SHAPED]:
        run(r)
    with _lent(g, types):
        for r in [r for r in todo if r in SHAPED]:
            run(r)
        if high:
            k = reduce_transpose_rank(g, limit, FreshNames(g).fresh, skip=is_quantized_node)
            if k:
                done["reduce_transpose_rank"] = k
    if not done:
        return model, {}
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    _distinct_node_names(g)
    return export_graph(g, model), done


def _decomposes(profile, rewrite: str, ops) -> bool:
    """Whether the decomposition ``rewrite`` applies for ``profile`` to a model with ``ops``: it removes
    one of them the target lacks and needs only ops the target has."""
    _, removes, needs = REWRITES[rewrite]
    return any(op in ops and not target_has_op(profile, op) for op in removes) and \
        all(target_has_op(profile, op) for op in needs)


def decomposed_for(profile, op: str) -> bool:
    """Whether the preparation for ``profile`` (None: none) replaces ``op`` by ops the target has: a
    pass must then not write ``op`` back (cleanup's hard-sigmoid fusion for NNAPI)."""
    return profile is not None and any(_decomposes(profile, r, {op}) for r in DECOMPOSITIONS)


def _distinct_node_names(g: gs.Graph) -> None:
    """A node name given twice (rewrites name new nodes after the node they replace: ``_mul`` twice in a
    model of unnamed nodes) gets a suffix: onnxruntime refuses a model with two nodes of one name."""
    fresh = FreshNames(g).fresh
    seen: set = set()
    for node in g.nodes:
        if node.name and node.name in seen:
            node.name = fresh(node.name)
        seen.add(node.name)


def gemm_to_matmul(g: gs.Graph, constant_weights_only: bool = False) -> int:
    """Gemm -> MatMul (+ Mul by alpha) (+ Add of beta * C); returns the number of Gemms rewritten.
    ``constant_weights_only``: only Gemms with a constant 2-D float32 B, transA = 0 and a constant or
    absent C (the weight-only quantizer's MatMulNBits needs the weight as a MatMul constant).

    Exact: Gemm(A, B, C) = alpha * (A' @ B') + beta * C with A' = A^T if transA (an explicit
    Transpose), B' likewise (folded into a constant B, as is alpha); beta is folded into a
    constant C or applied by a Mul. A Gemm inside a QDQ group (fed by DequantizeLinear or feeding
    QuantizeLinear) is left alone: splitting it would add float intermediates."""
    n = 0
    for node in [x for x in g.nodes if x.op == "Gemm"]:
        if is_quantized_node(node):
            continue
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        if constant_weights_only and not (isinstance(b, gs.Constant) and b.values.dtype == np.float32
                                          and b.values.ndim == 2 and not node.attrs.get("transA", 0)
                                          and not isinstance(a, gs.Constant)
                                          and (c is None or isinstance(c, gs.Constant))):
            continue
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        y = node.outputs[0]
        dt = np.dtype(y.dtype) if y.dtype is not None else np.dtype(np.float32)
        if node.attrs.get("transA", 0):
            at = gs.Variable(unique_name(g, f"{a.name}_T"), dtype=a.dtype)
            g.nodes.append(gs.Node("Transpose", f"{node.name}_transA", {"perm": [1, 0]}, inputs=[a], outputs=[at]))
            a = at
        if isinstance(b, gs.Constant):
            w = b.values.T if node.attrs.get("transB", 0) else b.values
            if alpha != 1.0:
                w, alpha = (w * np.asarray(alpha, w.dtype)).astype(w.dtype), 1.0
            b = gs.Constant(unique_name(g, f"{node.name}_B"), np.ascontiguousarray(w))
        elif node.attrs.get("transB", 0):
            bt = gs.Variable(unique_name(g, f"{b.name}_T"), dtype=b.dtype)
            g.nodes.append(gs.Node("Transpose", f"{node.name}_transB", {"perm": [1, 0]}, inputs=[b], outputs=[bt]))
            b = bt
        mm = gs.Variable(unique_name(g, f"{node.name}_matmul"), dtype=dt)
        g.nodes.append(gs.Node("MatMul", f"{node.name}_matmul", inputs=[a, b], outputs=[mm]))
        cur = mm
        if alpha != 1.0:
            nxt = gs.Variable(unique_name(g, f"{node.name}_alpha_out"), dtype=dt)
            g.nodes.append(gs.Node("Mul", f"{node.name}_alpha", inputs=[cur, gs.Constant(
                unique_name(g, f"{node.name}_alpha_c"), np.array(alpha, dt))], outputs=[nxt]))
            cur = nxt
        if c is not None and beta != 0.0:
            if isinstance(c, gs.Constant):
                c = gs.Constant(unique_name(g, f"{node.name}_C"), (c.values * np.asarray(beta, c.values.dtype)).astype(
                    c.values.dtype)) if beta != 1.0 else c
            elif beta != 1.0:
                cb = gs.Variable(unique_name(g, f"{node.name}_beta_out"), dtype=dt)
                g.nodes.append(gs.Node("Mul", f"{node.name}_beta", inputs=[c, gs.Constant(
                    unique_name(g, f"{node.name}_beta_c"), np.array(beta, dt))], outputs=[cb]))
                c = cb
            g.nodes.append(gs.Node("Add", f"{node.name}_add", inputs=[cur, c], outputs=[y]))
        else:
            g.nodes.append(gs.Node("Identity", f"{node.name}_out", inputs=[cur], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _decompose_hardswish(g: gs.Graph) -> int:
    """HardSwish(x) -> x * HardSigmoid(x; alpha=1/6, beta=1/2)."""
    n = 0
    for node in [x for x in g.nodes if x.op == "HardSwish"]:
        if is_quantized_node(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        hs = gs.Variable(unique_name(g, f"{x.name}_hardsigmoid"), dtype=x.dtype, shape=x.shape)
        g.nodes.append(gs.Node("HardSigmoid", f"{node.name}_hardsigmoid", {"alpha": 1.0 / 6, "beta": 0.5},
                               inputs=[x], outputs=[hs]))
        g.nodes.append(gs.Node("Mul", f"{node.name}_mul", inputs=[x, hs], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _decompose_hardsigmoid(g: gs.Graph) -> int:
    """HardSigmoid(x; alpha, beta) -> Clip(alpha * x + beta, 0, 1)."""
    n = 0
    for node in [x for x in g.nodes if x.op == "HardSigmoid"]:
        if is_quantized_node(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        dt = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        t1 = gs.Variable(unique_name(g, f"{x.name}_scaled"), dtype=dt, shape=x.shape)
        t2 = gs.Variable(unique_name(g, f"{x.name}_shifted"), dtype=dt, shape=x.shape)
        g.nodes.append(gs.Node("Mul", f"{node.name}_mul", inputs=[x, gs.Constant(unique_name(g, f"{node.name}_alpha"),
                                                                                  np.array(alpha, dt))], outputs=[t1]))
        g.nodes.append(gs.Node("Add", f"{node.name}_add", inputs=[t1, gs.Constant(unique_name(g, f"{node.name}_beta"),
                                                                                   np.array(beta, dt))], outputs=[t2]))
        g.nodes.append(gs.Node("Clip", f"{node.name}_clip",
                               inputs=[t2, gs.Constant(unique_name(g, f"{node.name}_lo"), np.array(0, dt)),
                                       gs.Constant(unique_name(g, f"{node.name}_hi"), np.array(1, dt))], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _fuse_hardswish(g: gs.Graph) -> int:
    """x * HardSigmoid(x; 1/6, 1/2) -> HardSwish(x), when the HardSigmoid feeds only that Mul."""
    n = 0
    for hs in [x for x in g.nodes if x.op == "HardSigmoid"]:
        if not hs.outputs or abs(float(hs.attrs.get("alpha", 0.2)) - 1 / 6) > 1e-6 or \
                abs(float(hs.attrs.get("beta", 0.5)) - 0.5) > 1e-6:
            continue
        x, h = hs.inputs[0], hs.outputs[0]
        users = list(h.outputs)
        if len(users) != 1 or users[0].op != "Mul" or h in g.outputs:
            continue
        mul = users[0]
        if {id(t) for t in mul.inputs} != {id(x), id(h)}:
            continue
        y = mul.outputs[0]
        g.nodes.append(gs.Node("HardSwish", f"{hs.name}_hardswish", inputs=[x], outputs=[y]))
        mul.outputs.clear()
        mul.inputs.clear()
        hs.outputs.clear()
        hs.inputs.clear()
        n += 1
    return n


def _fuse_gelu(g: gs.Graph) -> int:
    """The exact GELU as exporters write it, ``x * 0.5 * (1 + Erf(x / sqrt 2))`` (the scale by
    ``1/sqrt 2`` a Div or a Mul, the half applied first or last, operands in either order), becomes one
    ``Gelu(x)``: the ONNX op from opset 20, onnxruntime's com.microsoft Gelu below (the same function;
    QNN HTP takes both and has no Erf, checked on its simulator). Every intermediate must feed only
    the next step."""
    n = 0
    outs = {id(t) for t in g.outputs}
    for erf in [x for x in g.nodes if x.op == "Erf"]:
        if not erf.outputs or is_quantized_node(erf):
            continue
        pre = _only_producer(erf.inputs[0])
        x = _scaled(pre, 1 / math.sqrt(2)) if pre is not None and sole_consumer(erf.inputs[0], outs) is erf else None
        add = sole_consumer(erf.outputs[0], outs)
        if x is None or add is None or add.op != "Add" or _other_constant(add, erf.outputs[0]) != 1.0:
            continue
        a = add.outputs[0]
        m1 = sole_consumer(a, outs)
        if m1 is None or m1.op != "Mul":
            continue
        other = _other_input(m1, a)
        if other is x:                                  # x * (1 + erf) * 0.5
            m2 = sole_consumer(m1.outputs[0], outs)
            ok = m2 is not None and m2.op == "Mul" and _other_constant(m2, m1.outputs[0]) == 0.5
            removed = [pre, erf, add, m1, m2]
        elif _other_constant(m1, a) == 0.5:             # x * ((1 + erf) * 0.5)
            m2 = sole_consumer(m1.outputs[0], outs)
            ok = m2 is not None and m2.op == "Mul" and _other_input(m2, m1.outputs[0]) is x
            removed = [pre, erf, add, m1, m2]
        else:                                           # (x * 0.5) * (1 + erf)
            half = _only_producer(other) if other is not None else None
            ok = half is not None and half.op == "Mul" and _scaled(half, 0.5) is x and \
                sole_consumer(other, outs) is m1
            m2, removed = m1, [half, pre, erf, add, m1]
        if not ok or any(id(t) in outs for r in removed[:-1] for t in r.outputs):
            continue
        y = m2.outputs[0]
        if y.dtype is None and x.dtype is not None:  # com.microsoft Gelu has no ONNX shape inference
            y.dtype, y.shape = x.dtype, x.shape
        domain = "" if g.opset >= 20 else "com.microsoft"
        g.nodes.append(gs.Node("Gelu", f"{erf.name}_gelu", inputs=[x], outputs=[y], domain=domain))
        for r in removed:
            r.outputs.clear()
            r.inputs.clear()
        n += 1
    return n


def _only_producer(t):
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _other_input(node, t):
    """The input of a two-input ``node`` that is not ``t`` (None when ``t`` is not one of them)."""
    if len(node.inputs) != 2 or not any(i is t for i in node.inputs):
        return None
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def _other_constant(node, t):
    """The scalar constant ``node`` combines with ``t`` (rounded to float32's 6 digits), or None."""
    other = _other_input(node, t)
    v = constant_value(other) if other is not None else None
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return round(float(v.reshape(-1)[0]), 6)


def _scaled(node, factor: float):
    """``x`` when ``node`` is ``x * factor`` or ``x / (1 / factor)`` with a scalar constant (to float32
    rounding), else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    pairs = [(0, 1)] if node.op == "Div" else [(0, 1), (1, 0)]
    for xi, ci in pairs:
        v = constant_value(node.inputs[ci])
        if v is None or v.size != 1 or v.dtype.kind != "f" or constant_value(node.inputs[xi]) is not None:
            continue
        c = float(v.reshape(-1)[0])
        c = 1.0 / c if node.op == "Div" and c != 0 else c
        if abs(c - factor) <= 1e-6 * factor:
            return node.inputs[xi]
    return None


def _matmul_add_to_gemm(g: gs.Graph) -> int:
    """MatMul(A, W) + b -> Gemm(A, W, b) for a 2-D A, a constant 2-D W and a constant bias of W's columns."""
    n = 0
    for mm in [x for x in g.nodes if x.op == "MatMul"]:
        if not mm.outputs or len(mm.inputs) != 2:
            continue
        a, w = mm.inputs
        if not isinstance(w, gs.Constant) or w.values.ndim != 2 or a.shape is None or len(a.shape) != 2:
            continue
        out = mm.outputs[0]
        if len(out.outputs) != 1 or out in g.outputs or out.outputs[0].op != "Add":
            continue
        add = out.outputs[0]
        other = [t for t in add.inputs if t is not out]
        if len(other) != 1 or not isinstance(other[0], gs.Constant):
            continue
        bias = other[0].values
        if bias.size != w.values.shape[1] or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
            continue
        y = add.outputs[0]
        g.nodes.append(gs.Node("Gemm", f"{mm.name}_gemm", inputs=[a, w, gs.Constant(
            unique_name(g, f"{mm.name}_bias"), bias.reshape(-1))], outputs=[y]))
        add.outputs.clear()
        add.inputs.clear()
        mm.outputs.clear()
        mm.inputs.clear()
        n += 1
    return n


def _convtranspose_to_conv_depthtospace(g: gs.Graph) -> int:
    """ConvTranspose with kernel == stride == s (no padding, dilation 1, group 1) is a 1x1 Conv to
    s*s*O channels followed by DepthToSpace(s, DCR):
    W'[(a*s + b)*O + o, c] = W[c, o, a, b],  bias'[(a*s + b)*O + o] = bias[o]."""
    n = 0
    for node in [x for x in g.nodes if x.op == "ConvTranspose"]:
        if is_quantized_node(node) or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1].values
        a = node.attrs
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            continue
        s = int(w.shape[2])
        if a.get("group", 1) != 1 or list(a.get("strides", [1, 1])) != [s, s] or \
                list(a.get("kernel_shape", [s, s])) != [s, s] or any(a.get("pads", [0, 0, 0, 0])) or \
                any(d != 1 for d in a.get("dilations", [1, 1])) or any(a.get("output_padding", [0, 0])) or \
                "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        c_in, c_out = w.shape[0], w.shape[1]
        w2 = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(s * s * c_out, c_in, 1, 1))
        ins = [node.inputs[0], gs.Constant(unique_name(g, f"{node.name}_w1x1"), w2)]
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            b = node.inputs[2]
            if not isinstance(b, gs.Constant):
                continue
            ins.append(gs.Constant(unique_name(g, f"{node.name}_b1x1"), np.tile(b.values, s * s)))
        y = node.outputs[0]
        mid = gs.Variable(unique_name(g, f"{node.name}_depth"), dtype=y.dtype)
        g.nodes.append(gs.Node("Conv", f"{node.name}_conv1x1", {"kernel_shape": [1, 1]}, inputs=ins, outputs=[mid]))
        g.nodes.append(gs.Node("DepthToSpace", f"{node.name}_d2s", {"blocksize": s, "mode": "DCR"},
                               inputs=[mid], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _fill_empty_resize_inputs(g: gs.Graph) -> int:
    """Resize(X, "", scales) -> Resize(X, roi=[], scales): an empty roi (ignored unless
    coordinate_transformation_mode is tf_crop_and_resize) and, with sizes, empty scales, as
    constants. Same semantics; onnxruntime's mobile usability checker counts an empty input name
    as a dynamic shape and splits the NNAPI/CoreML partition there."""
    n = 0
    for node in [x for x in g.nodes if x.op == "Resize"]:
        changed = False
        for k in (1, 2):
            if k < len(node.inputs) and (node.inputs[k] is None or not node.inputs[k].name):
                if k == 2 and len(node.inputs) < 4:
                    continue
                node.inputs[k] = gs.Constant(unique_name(g, f"{node.name}_{'roi' if k == 1 else 'scales'}_empty"),
                                             np.zeros((0,), np.float32))
                changed = True
        n += changed
    return n


def _inferred_types(model: onnx.ModelProto) -> dict:
    """{value name: (numpy dtype or None, shape with None for unknown dims)} from shape inference
    on a weightless copy (the rewrites that need shapes: rank reduction, Pad, Flatten)."""
    inferred = infer_shapes(weightless_copy(model), data_prop=True)
    elem = value_types(inferred)

    def np_dtype(t: int | None):
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(t) if t else None
        except Exception:
            return None
    return {name: (np_dtype(elem.get(name)), shape) for name, shape in value_shapes(inferred).items()}


@contextlib.contextmanager
def _lent(g: gs.Graph, types: dict):
    """``types`` lent to the variables of ``g`` that have no shape while the rewrites run, taken back
    after (the exported model's value_info stays as it was)."""
    lent = []
    for name, t in g.tensors().items():
        if isinstance(t, gs.Variable) and t.shape is None and name in types:
            lent.append((t, t.dtype))
            t.dtype = t.dtype if t.dtype is not None else types[name][0]
            t.shape = types[name][1]
    try:
        yield
    finally:
        for t, dtype in lent:
            t.shape, t.dtype = None, dtype


def _static(t: gs.Tensor) -> list | None:
    """The static shape of ``t`` (a constant's, or a variable's with every dim known); else None."""
    return [int(d) for d in t.shape] if static_shape(t.shape) else None  # gs.Constant has .shape too


def _gather_to_slice(g: gs.Graph) -> int:
    """Gather(x, i, axis) with a constant scalar index -> Squeeze(Slice(x, i, i + 1, axis), axis); with a
    constant run of consecutive indices [i, ..., i + k - 1] (of one sign) -> Slice(x, i, i + k, axis).
    Exact: the same elements, in order (the q/k/v split and class token of torchvision's ViT)."""
    n = 0
    opset = g.opset or 13
    fresh = FreshNames(g).fresh
    for node in [x for x in g.nodes if x.op == "Gather" and is_default_domain(x)]:
        if is_quantized_node(node) or len(node.inputs) != 2:
            continue
        idx = constant_value(node.inputs[1])
        if idx is None or idx.ndim > 1 or idx.size == 0:
            continue
        flat = idx.reshape(-1).astype(np.int64)
        if np.any(np.diff(flat) != 1) or (flat.min() < 0 <= flat.max()):
            continue
        start, stop = int(flat[0]), int(flat[-1]) + 1
        if stop == 0:  # a run ending at -1: to the end
            stop = np.iinfo(np.int64).max
        x, y = node.inputs[0], node.outputs[0]
        axis = int(node.attrs.get("axis", 0))
        base = node.name or "gather"

        def const(tag, v):
            return gs.Constant(fresh(f"{base}_{tag}"), np.array(v, np.int64))
        sliced = y if idx.ndim == 1 else gs.Variable(fresh(f"{base}_slice_out"), dtype=x.dtype)
        bounds = [const("starts", [start]), const("ends", [stop]), const("axes", [axis])]
        g.nodes.append(gs.Node("Slice", fresh(f"{base}_slice"), inputs=[x, *bounds], outputs=[sliced]))
        if idx.ndim == 0:
            name = fresh(f"{base}_squeeze")
            if opset >= 13:
                g.nodes.append(gs.Node("Squeeze", name, inputs=[sliced, const("squeeze_axes", [axis])], outputs=[y]))
            else:
                g.nodes.append(gs.Node("Squeeze", name, {"axes": [axis]}, inputs=[sliced], outputs=[y]))
        node.inputs.clear()
        node.outputs.clear()
        n += 1
    return n


def _flatten_to_reshape(g: gs.Graph) -> int:
    """Flatten(x, axis) -> Reshape(x, [d_0 * ... * d_(axis-1), -1]): a 0 copies the first dimension
    (axis 1), a 1 stands for axis 0; other axes need those dimensions static. Exact (same order)."""
    n = 0
    fresh = FreshNames(g).fresh
    for node in [x for x in g.nodes if x.op == "Flatten" and is_default_domain(x)]:
        if is_quantized_node(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        axis = int(node.attrs.get("axis", 1))
        if axis < 0:
            if x.shape is None:
                continue
            axis += len(x.shape)
        if axis <= 1:
            lead = [1, -1] if axis == 0 else [0, -1]
        else:
            shape = x.shape
            if shape is None or not static_shape(shape[:axis]):
                continue
            lead = [int(np.prod(shape[:axis])), -1]
        base = node.name or "flatten"
        g.nodes.append(gs.Node("Reshape", fresh(f"{base}_reshape"), inputs=[
            x, gs.Constant(fresh(f"{base}_shape"), np.array(lead, np.int64))], outputs=[y]))
        node.inputs.clear()
        node.outputs.clear()
        n += 1
    return n


def _batchnorm_to_scale_shift(g: gs.Graph) -> int:
    """BatchNormalization(x; scale, B, mean, var, eps), inference form with constant statistics ->
    x * s + t, ``s = scale / sqrt(var + eps)``, ``t = B - mean * s`` (float64, stored in x's type) per
    channel (axis 1, broadcast over the rank of ``x``). Equal in real arithmetic, to float round-off
    (the emission's numeric check holds it to ``EMIT_TOL``): DenseNet's 62 pre-activation BatchNorms,
    which fold into no convolution, on CoreML, whose ML Program list has no BatchNormalization."""
    n = 0
    fresh = FreshNames(g).fresh
    for node in [x for x in g.nodes if x.op == "BatchNormalization" and is_default_domain(x)]:
        if is_quantized_node(node) or len(node.inputs) != 5 or len([o for o in node.outputs if not o.is_empty()]) != 1 \
                or int(node.attrs.get("training_mode", 0)) or not int(node.attrs.get("spatial", 1)):
            continue  # spatial=0 (before opset 9): statistics per activation, not per channel
        x, y = node.inputs[0], node.outputs[0]
        stats = [constant_value(t) for t in node.inputs[1:]]
        if x.shape is None or len(x.shape) < 2 or any(v is None for v in stats) or x.dtype is None:
            continue
        scale, bias, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in stats)
        channels = x.shape[1]
        if any(v.size != scale.size for v in (bias, mean, var)) or \
                (isinstance(channels, (int, np.integer)) and channels != scale.size):
            continue
        eps = float(node.attrs.get("epsilon", 1e-5))
        s64 = scale / np.sqrt(var + eps)
        t64 = bias - mean * s64
        dtype = np.dtype(x.dtype)
        bshape = [-1] + [1] * (len(x.shape) - 2)
        base = node.name or "batchnorm"
        scaled = gs.Variable(fresh(f"{base}_scaled"), dtype=dtype)
        g.nodes.append(gs.Node("Mul", fresh(f"{base}_mul"), inputs=[
            x, gs.Constant(fresh(f"{base}_s"), s64.reshape(bshape).astype(dtype))], outputs=[scaled]))
        g.nodes.append(gs.Node("Add", fresh(f"{base}_add"), inputs=[
            scaled, gs.Constant(fresh(f"{base}_t"), t64.reshape(bshape).astype(dtype))], outputs=[y]))
        node.inputs.clear()
        node.outputs.clear()
        n += 1
    return n


PAD_CONSTANT_BYTES = 1 << 20  # the fill blocks a Pad becomes, at most, each


def _pad_to_concat(g: gs.Graph) -> int:
    """Pad(x, pads, value) of mode constant, every amount >= 0, ``x`` of static shape -> a Concat per
    padded axis of a block filled with ``value``, ``x`` and another block (each block at most
    ``PAD_CONSTANT_BYTES``). Exact: the same values in the same places (Swin's window padding)."""
    n = 0
    fresh = FreshNames(g).fresh
    for node in [x for x in g.nodes if x.op == "Pad" and is_default_domain(x)]:
        if is_quantized_node(node) or str(node.attrs.get("mode", "constant")) != "constant":
            continue
        x, y = node.inputs[0], node.outputs[0]
        shape = _static(x)
        if shape is None or x.dtype is None:
            continue
        pads, fill, axes = pad_operands(node)
        if pads is None or fill is None or fill.size != 1 or axes:
            continue
        value = fill.reshape(-1)[0]
        pads = pads.reshape(-1)
        r = len(shape)
        if pads.size != 2 * r or np.any(pads < 0):
            continue
        dtype = np.dtype(x.dtype)
        blocks, cur = [], list(shape)
        for a in range(r):
            for k in (int(pads[a]), int(pads[r + a])):
                if k:
                    blocks.append((a, k))
            cur[a] += int(pads[a]) + int(pads[r + a])
        if not blocks or any(np.prod([*shape[:a], k, *cur[a + 1:]]) * dtype.itemsize > PAD_CONSTANT_BYTES
                             for a, k in blocks):
            continue
        base = node.name or "pad"
        cur, t = list(shape), x
        for a in range(r):
            b, e = int(pads[a]), int(pads[r + a])
            if not (b or e):
                continue
            parts = []
            for k in (b, e):
                if k:
                    blk = [*cur[:a], k, *cur[a + 1:]]
                    parts.append(gs.Constant(fresh(f"{base}_fill"), np.full(blk, value, dtype)))
                else:
                    parts.append(None)
            cur[a] += b + e
            last = not any(pads[a2] or pads[r + a2] for a2 in range(a + 1, r))
            out = y if last else gs.Variable(fresh(f"{base}_axis{a}"), dtype=dtype, shape=list(cur))
            inputs = [p for p in (parts[0], t, parts[1]) if p is not None]
            g.nodes.append(gs.Node("Concat", fresh(f"{base}_concat{a}"), {"axis": a}, inputs=inputs, outputs=[out]))
            t = out
        node.inputs.clear()
        node.outputs.clear()
        n += 1
    return n


def _einsum_to_matmul(g: gs.Graph) -> int:
    """Every Einsum that is a batched matrix product as MatMul (``graph.einsum``), outside QDQ groups."""
    return einsum_to_matmul(g, FreshNames(g).fresh, skip=is_quantized_node)


# name -> (function, ops it removes, ops it needs); defined after the functions it names
REWRITES = {
    "decompose_hardswish": (_decompose_hardswish, ("HardSwish",), ("HardSigmoid", "Mul")),
    "decompose_hardsigmoid": (_decompose_hardsigmoid, ("HardSigmoid",), ("Mul", "Add", "Clip")),
    "fuse_hardswish": (_fuse_hardswish, ("HardSigmoid",), ("HardSwish",)),
    "gemm_to_matmul": (gemm_to_matmul, ("Gemm",), ("MatMul", "Add")),
    "matmul_add_to_gemm": (_matmul_add_to_gemm, ("MatMul",), ("Gemm",)),
    "fill_empty_resize_inputs": (_fill_empty_resize_inputs, (), ("Resize",)),
    "fuse_gelu": (_fuse_gelu, ("Erf",), ("Gelu",)),
    "convtranspose_to_conv_depthtospace": (_convtranspose_to_conv_depthtospace, ("ConvTranspose",),
                                           ("Conv", "DepthToSpace")),
    "einsum_to_matmul": (_einsum_to_matmul, ("Einsum",), ("MatMul",)),
    "gather_to_slice": (_gather_to_slice, ("Gather",), ("Slice", "Squeeze")),
    "flatten_to_reshape": (_flatten_to_reshape, ("Flatten",), ("Reshape",)),
    "pad_to_concat": (_pad_to_concat, ("Pad",), ("Concat",)),
    "batchnorm_to_scale_shift": (_batchnorm_to_scale_shift, ("BatchNormalization",), ("Mul", "Add")),
}
# the rewrites that read the inferred shapes (``_lent``)
SHAPED = ("flatten_to_reshape", "pad_to_concat", "batchnorm_to_scale_shift")
# the rewrites that replace an op by others: applied whenever the target lacks the op and has the others
DECOMPOSITIONS = ("decompose_hardswish", "decompose_hardsigmoid", "gemm_to_matmul",
                  "convtranspose_to_conv_depthtospace", "fuse_gelu", "einsum_to_matmul", "gather_to_slice",
                  "flatten_to_reshape", "pad_to_concat", "batchnorm_to_scale_shift")


def is_quantized_node(node: gs.Node) -> bool:
    """A node inside a QDQ group: some input comes from DequantizeLinear or some output feeds QuantizeLinear."""
    fed = any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs if isinstance(t, gs.Variable))
    feeds = any(c.op == "QuantizeLinear" for t in node.outputs for c in t.outputs)
    return fed or feeds


def unique_name(graph: gs.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name no tensor of ``graph`` has."""
    names = graph.tensors()
    n, i = base, 0
    while n in names:
        i += 1
        n = f"{base}_{i}"
    return n


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` with ``template``'s model fields (metadata, producer, opsets, IR version).

    Not ``onnxshrink.graph.convert.graph_to_model``: that one also restores initializers listed as
    graph inputs, non-tensor I/O types, hoists shared subgraph initializers and lists initializers
    as inputs below IR 4, so its bytes differ on such models; the target emission keeps its own
    (byte-identical) export."""
    out = gs.export_onnx(graph, do_type_check=False)
    copy_model_fields(template, out)
    return out


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """op_type -> number of nodes in the main graph."""
    return collections.Counter(n.op_type for n in model.graph.node)
