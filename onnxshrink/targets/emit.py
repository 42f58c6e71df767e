"""Target emission: make a model runtime-ready for one execution provider, and say how much of it
the EP takes.

Steps (each lossless; the result is checked numerically against the input model):

1. opset into the profile's range (``onnx.version_converter``);
2. constant and static-shape folding (Constant nodes become initializers); with every input dimension fixed, shape inference with data propagation
   gives every shape-arithmetic value (Shape -> Gather -> Range -> Expand -> Reshape ...) a
   constant; onnx-graphsurgeon's ``fold_constants`` evaluates those subgraphs into initializers.
   Quantize/Dequantize nodes are never folded, so QDQ weights stay quantized;
3. exact rewrites of ops the target lacks (and fusions the target prefers)::

       HardSwish(x)   = x * HardSigmoid(x; alpha=1/6, beta=1/2)
       HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)
       Gemm(A, B, C)  = alpha * (A' @ B') + beta * C        (A' = A^T if transA, B' likewise)
       MatMul(A, W) + b  ->  Gemm(A, W, b)                   (A 2-D, W and b constant)
       x * HardSigmoid(x; 1/6, 1/2)  ->  HardSwish(x)
       ConvTranspose(x, W; kernel = stride = s) = DepthToSpace_DCR(Conv1x1(x, W'), s)
           with W'[(a*s + b)*O + o, c] = W[c, o, a, b]

   A node inside a QDQ group (fed by DequantizeLinear, feeding QuantizeLinear) is never split,
   since the new intermediate tensors would be float: such ops are rewritten before
   quantization (``prepare_for_target``, which the PassManager runs before the passes);
4. with the ``channels_last`` option: 4-D float graph inputs/outputs become NHWC through exact
   Transposes (on the integer side of a boundary per-tensor Q/DQ), checked numerically
   (``to_channels_last``);
5. coverage: per node, whether the EP takes it and why not (op list, dynamic shape, rank,
   run-time shape operand, float op outside a QDQ group, QDQ scheme the EP cannot fuse); for
   NNAPI and CoreML onnxruntime's own mobile usability checker decides;
6. for ``qnn`` when ``onnxruntime-qnn`` is installed: a real HTP-backend session (a simulator on
   x86-64 Linux) with CPU fallback disabled, run on the validation samples in a subprocess;
   fidelity against the original fp32 model on the CPU.

``save_ort_format`` writes the ORT format (.ort) with onnxruntime's converter.
"""

from __future__ import annotations

__all__ = ["prepare_for_target", "emit_for_target", "fold_static_shapes", "convert_opset", "apply_rewrites",
           "coverage", "qnn_htp_check", "qnn_available", "save_ort_format", "REWRITES", "to_channels_last",
           "channels_last_samples"]

import collections
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxshrink.model import copy_model_fields
from onnxshrink.passes.quantize.weight_storage import is_weight_decode

QDQ = ("QuantizeLinear", "DequantizeLinear")
# inputs that carry shapes, axes or sizes: the QNN EP needs them constant
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Pad": (1, 2, 3),
    "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "TopK": (1,), "ConstantOfShape": (0,),
    "Upsample": (1,), "Range": (0, 1, 2), "OneHot": (1,),
}
XNN_FUSED = frozenset({"Relu", "Clip"})  # XNNPACK fuses these into a preceding float Conv/pool
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "QLinearConv")
FOLD_SIZE_LIMIT = 1 << 24  # bytes: never fold a subgraph into a constant larger than this
EMIT_TOL = 1e-4            # emission is lossless: relative max-abs error allowed vs the input model


# ---------------------------------------------------------------------------------------- helpers
def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _static_inputs(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not tt.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in tt.shape.dim):
            return False
    return True


def _export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    out = gs.export_onnx(graph, do_type_check=False)
    copy_model_fields(template, out)
    return out


def _infer(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)
    except Exception:
        return model


def _op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _is_quantized_node(node: gs.Node) -> bool:
    """A node inside a QDQ group: some input comes from DequantizeLinear or some output feeds QuantizeLinear."""
    fed = any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs if isinstance(t, gs.Variable))
    feeds = any(c.op == "QuantizeLinear" for t in node.outputs for c in t.outputs)
    return fed or feeds


def _uniq(graph: gs.Graph, base: str) -> str:
    names = graph.tensors()
    n, i = base, 0
    while n in names:
        i += 1
        n = f"{base}_{i}"
    return n


# ---------------------------------------------------------------------------------------- steps
def convert_opset(model: onnx.ModelProto, lo: int, hi: int) -> tuple[onnx.ModelProto, dict]:
    """Convert the default-domain opset into [lo, hi]; returns (model, info)."""
    cur = _opset(model)
    want = min(max(cur, lo), hi)
    if want == cur:
        return model, {"opset": cur, "changed": False}
    try:
        from onnx import version_converter
        out = version_converter.convert_version(model, want)
        copy_model_fields(model, out)
        for o in out.opset_import:  # copy_model_fields does not lower; set the converted default opset
            if o.domain in ("", "ai.onnx"):
                o.version = want
        onnx.checker.check_model(out)
        return out, {"opset": want, "from": cur, "changed": True}
    except Exception as e:
        return model, {"opset": cur, "changed": False,
                       "error": f"cannot convert opset {cur} -> {want}: {str(e).splitlines()[0][:200]}"}


def fold_static_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold constant and shape subgraphs into initializers (Q/DQ nodes excluded). With static
    input shapes this removes Shape/Gather/Range/Expand/ConstantOfShape arithmetic entirely."""
    before = _op_counts(model)
    m = _infer(model, data_prop=True)
    g = gs.import_onnx(m)
    try:
        g.fold_constants(fold_shapes=True, error_ok=True, size_threshold=FOLD_SIZE_LIMIT,
                         should_exclude_node=lambda n: n.op in QDQ or is_weight_decode(n))
    except TypeError:  # older onnx-graphsurgeon without should_exclude_node
        return model, {"changed": False, "error": "onnx-graphsurgeon too old for QDQ-safe folding"}
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export(g, model)
    after = _op_counts(out)
    if after == before:
        return model, {"changed": False, "nodes": sum(before.values())}
    removed = {k: before[k] - after.get(k, 0) for k in before if before[k] > after.get(k, 0)}
    return out, {"changed": True, "nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "removed": removed}


# ---- rewrites (on an onnx-graphsurgeon graph; each returns the number of rewrites made)
def _decompose_hardswish(g: gs.Graph) -> int:
    n = 0
    for node in [x for x in g.nodes if x.op == "HardSwish"]:
        if _is_quantized_node(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        hs = gs.Variable(_uniq(g, f"{x.name}_hardsigmoid"), dtype=x.dtype, shape=x.shape)
        g.nodes.append(gs.Node("HardSigmoid", f"{node.name}_hardsigmoid", {"alpha": 1.0 / 6, "beta": 0.5},
                               inputs=[x], outputs=[hs]))
        g.nodes.append(gs.Node("Mul", f"{node.name}_mul", inputs=[x, hs], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _decompose_hardsigmoid(g: gs.Graph) -> int:
    n = 0
    for node in [x for x in g.nodes if x.op == "HardSigmoid"]:
        if _is_quantized_node(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        dt = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        t1 = gs.Variable(_uniq(g, f"{x.name}_scaled"), dtype=dt, shape=x.shape)
        t2 = gs.Variable(_uniq(g, f"{x.name}_shifted"), dtype=dt, shape=x.shape)
        g.nodes.append(gs.Node("Mul", f"{node.name}_mul", inputs=[x, gs.Constant(_uniq(g, f"{node.name}_alpha"),
                                                                                  np.array(alpha, dt))], outputs=[t1]))
        g.nodes.append(gs.Node("Add", f"{node.name}_add", inputs=[t1, gs.Constant(_uniq(g, f"{node.name}_beta"),
                                                                                   np.array(beta, dt))], outputs=[t2]))
        g.nodes.append(gs.Node("Clip", f"{node.name}_clip",
                               inputs=[t2, gs.Constant(_uniq(g, f"{node.name}_lo"), np.array(0, dt)),
                                       gs.Constant(_uniq(g, f"{node.name}_hi"), np.array(1, dt))], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _fuse_hardswish(g: gs.Graph) -> int:
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


def _gemm_to_matmul(g: gs.Graph) -> int:
    n = 0
    for node in [x for x in g.nodes if x.op == "Gemm"]:
        if _is_quantized_node(node):
            continue
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        y = node.outputs[0]
        dt = np.dtype(y.dtype) if y.dtype is not None else np.dtype(np.float32)
        if node.attrs.get("transA", 0):
            at = gs.Variable(_uniq(g, f"{a.name}_T"), dtype=a.dtype)
            g.nodes.append(gs.Node("Transpose", f"{node.name}_transA", {"perm": [1, 0]}, inputs=[a], outputs=[at]))
            a = at
        if isinstance(b, gs.Constant):
            w = b.values.T if node.attrs.get("transB", 0) else b.values
            if alpha != 1.0:
                w, alpha = (w * np.asarray(alpha, w.dtype)).astype(w.dtype), 1.0
            b = gs.Constant(_uniq(g, f"{node.name}_B"), np.ascontiguousarray(w))
        elif node.attrs.get("transB", 0):
            bt = gs.Variable(_uniq(g, f"{b.name}_T"), dtype=b.dtype)
            g.nodes.append(gs.Node("Transpose", f"{node.name}_transB", {"perm": [1, 0]}, inputs=[b], outputs=[bt]))
            b = bt
        mm = gs.Variable(_uniq(g, f"{node.name}_matmul"), dtype=dt)
        g.nodes.append(gs.Node("MatMul", f"{node.name}_matmul", inputs=[a, b], outputs=[mm]))
        cur = mm
        if alpha != 1.0:
            nxt = gs.Variable(_uniq(g, f"{node.name}_alpha_out"), dtype=dt)
            g.nodes.append(gs.Node("Mul", f"{node.name}_alpha", inputs=[cur, gs.Constant(
                _uniq(g, f"{node.name}_alpha_c"), np.array(alpha, dt))], outputs=[nxt]))
            cur = nxt
        if c is not None and beta != 0.0:
            if isinstance(c, gs.Constant):
                c = gs.Constant(_uniq(g, f"{node.name}_C"), (c.values * np.asarray(beta, c.values.dtype)).astype(
                    c.values.dtype)) if beta != 1.0 else c
            elif beta != 1.0:
                cb = gs.Variable(_uniq(g, f"{node.name}_beta_out"), dtype=dt)
                g.nodes.append(gs.Node("Mul", f"{node.name}_beta", inputs=[c, gs.Constant(
                    _uniq(g, f"{node.name}_beta_c"), np.array(beta, dt))], outputs=[cb]))
                c = cb
            g.nodes.append(gs.Node("Add", f"{node.name}_add", inputs=[cur, c], outputs=[y]))
        else:
            g.nodes.append(gs.Node("Identity", f"{node.name}_out", inputs=[cur], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        n += 1
    return n


def _matmul_add_to_gemm(g: gs.Graph) -> int:
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
            _uniq(g, f"{mm.name}_bias"), bias.reshape(-1))], outputs=[y]))
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
        if _is_quantized_node(node) or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
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
        ins = [node.inputs[0], gs.Constant(_uniq(g, f"{node.name}_w1x1"), w2)]
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            b = node.inputs[2]
            if not isinstance(b, gs.Constant):
                continue
            ins.append(gs.Constant(_uniq(g, f"{node.name}_b1x1"), np.tile(b.values, s * s)))
        y = node.outputs[0]
        mid = gs.Variable(_uniq(g, f"{node.name}_depth"), dtype=y.dtype)
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
                node.inputs[k] = gs.Constant(_uniq(g, f"{node.name}_{'roi' if k == 1 else 'scales'}_empty"),
                                             np.zeros((0,), np.float32))
                changed = True
        n += changed
    return n


# ---- channel-last I/O (emission option ``channels_last``)
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def _per_tensor_qdq(node: gs.Node) -> bool:
    """A QuantizeLinear/DequantizeLinear with one scale (it maps every element alike, so it commutes
    with any permutation of the elements)."""
    return node.op in QDQ and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) and \
        np.asarray(node.inputs[1].values).size == 1


def _image_tensor(t) -> bool:
    return t.shape is not None and len(t.shape) == 4 and t.dtype is not None and np.dtype(t.dtype).kind == "f"


def to_channels_last(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """4-D float graph inputs and outputs become channel-last (NHWC), names kept; exact:

        x (N,H,W,C) -> Transpose(0,3,1,2) -> the NCHW graph -> Transpose(0,2,3,1) -> y (N,H,W,C)

    Where the input's only consumer is a per-tensor QuantizeLinear (or the output's producer a
    per-tensor DequantizeLinear) the Transpose moves to the integer side of it (an elementwise map
    with one scale commutes with a permutation): ``x -> Q -> Transpose -> DQ``, so no float node is
    added. onnxruntime's layout transformation for an NHWC EP (QNN, NNAPI, XNNPACK) then cancels it
    against the Transpose it inserts before the first (after the last) convolution.
    Returns (model, {"inputs": [...], "outputs": [...]}) naming the tensors changed."""
    g = gs.import_onnx(model)
    info = {"inputs": [], "outputs": []}
    for k, old in enumerate(list(g.inputs)):
        if not _image_tensor(old):
            continue
        name = old.name
        old.name = _uniq(g, f"{name}_nchw")
        new = gs.Variable(name, dtype=old.dtype, shape=[old.shape[i] for i in TO_NHWC])
        users = list(old.outputs)
        if len(users) == 1 and users[0].op == "QuantizeLinear" and _per_tensor_qdq(users[0]) \
                and users[0].outputs[0] not in g.outputs:
            q = users[0]
            qy = q.outputs[0]
            qn = gs.Variable(_uniq(g, f"{qy.name}_nhwc"), dtype=qy.dtype,
                             shape=[qy.shape[i] for i in TO_NHWC] if qy.shape is not None else None)
            q.inputs[0] = new
            q.outputs[0] = qn
            g.nodes.append(gs.Node("Transpose", _uniq(g, f"{name}_to_nchw"), {"perm": list(TO_NCHW)},
                                   inputs=[qn], outputs=[qy]))
            old.outputs.clear()
        else:
            g.nodes.append(gs.Node("Transpose", _uniq(g, f"{name}_to_nchw"), {"perm": list(TO_NCHW)},
                                   inputs=[new], outputs=[old]))
        g.inputs[k] = new
        info["inputs"].append(name)
    for k, old in enumerate(list(g.outputs)):
        if not _image_tensor(old) or old in g.inputs:
            continue
        name = old.name
        old.name = _uniq(g, f"{name}_nchw")
        new = gs.Variable(name, dtype=old.dtype, shape=[old.shape[i] for i in TO_NHWC])
        prod = old.inputs[0] if old.inputs else None
        if prod is not None and prod.op == "DequantizeLinear" and _per_tensor_qdq(prod) and not old.outputs:
            xq = prod.inputs[0]
            tq = gs.Variable(_uniq(g, f"{xq.name}_nhwc"), dtype=xq.dtype,
                             shape=[xq.shape[i] for i in TO_NHWC] if xq.shape is not None else None)
            g.nodes.append(gs.Node("Transpose", _uniq(g, f"{name}_to_nhwc"), {"perm": list(TO_NHWC)},
                                   inputs=[xq], outputs=[tq]))
            prod.inputs[0] = tq
            prod.outputs[0] = new
        else:
            g.nodes.append(gs.Node("Transpose", _uniq(g, f"{name}_to_nhwc"), {"perm": list(TO_NHWC)},
                                   inputs=[old], outputs=[new]))
        g.outputs[k] = new
        info["outputs"].append(name)
    if not info["inputs"] and not info["outputs"]:
        return model, info
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return _export(g, model), info


def channels_last_samples(samples, names) -> list[dict]:
    """Feeds for a channel-last model: the named NCHW inputs transposed to NHWC."""
    return [{k: (np.ascontiguousarray(v.transpose(TO_NHWC)) if k in names else v) for k, v in s.items()}
            for s in samples]


class ChannelsLastIO:
    """Runs a model whose image I/O went channel-last (``to_channels_last``) on NCHW samples and
    gives NCHW outputs back, so it is measured against the original model's outputs.
    ``layout`` is the emission's ``channels_last`` info ({"inputs": [...], "outputs": [...]}) or None."""

    def __init__(self, layout: dict | None):
        layout = layout if layout and not layout.get("rolled_back") else {}
        self.inputs = set(layout.get("inputs", ()))
        self.outputs = set(layout.get("outputs", ()))

    def feeds(self, samples) -> list[dict]:
        return channels_last_samples(samples, self.inputs) if self.inputs else samples

    def shapes(self, shapes: dict | None) -> dict | None:
        if not shapes or not self.inputs:
            return shapes
        return {k: ([v[i] for i in TO_NHWC] if k in self.inputs and len(v) == 4 else v) for k, v in shapes.items()}

    def back(self, outputs, names) -> list:
        """Per-sample output lists (in ``names`` order) with the channel-last ones back in NCHW."""
        return [[o.transpose(TO_NCHW) if n in self.outputs else o for n, o in zip(names, outs)]
                for outs in outputs]

    def run(self, model: onnx.ModelProto, samples, optimize: bool = True) -> list:
        from onnxshrink.runtime import make_session
        sess = make_session(model, optimize=optimize)
        names = [o.name for o in sess.get_outputs()]
        return self.back([sess.run(names, s) for s in self.feeds(samples)], names)


def _apply_channels_last(model: onnx.ModelProto, ctx) -> tuple[onnx.ModelProto, dict]:
    """``to_channels_last``, kept only when its outputs (back in NCHW) match the input model's."""
    cand, info = to_channels_last(model)
    if cand is model:
        return model, {**info, "changed": False, "reason": "no 4-D float graph input or output"}
    samples = _samples(model, ctx)
    try:
        onnx.checker.check_model(cand)
        err = _max_rel_err(_run(model, samples), ChannelsLastIO(info).run(cand, samples, optimize=False))
    except Exception as e:
        return model, {**info, "rolled_back": True,
                       "reason": f"invalid or does not run: {str(e).splitlines()[0][:200]}"}
    if err > EMIT_TOL:
        return model, {**info, "rolled_back": True, "reason": f"outputs changed (relative max error {err:.2e})"}
    return cand, {**info, "changed": True, "max_rel_err": err}


# name -> (function, ops it removes, ops it needs)
REWRITES = {
    "decompose_hardswish": (_decompose_hardswish, ("HardSwish",), ("HardSigmoid", "Mul")),
    "decompose_hardsigmoid": (_decompose_hardsigmoid, ("HardSigmoid",), ("Mul", "Add", "Clip")),
    "fuse_hardswish": (_fuse_hardswish, ("HardSigmoid",), ("HardSwish",)),
    "gemm_to_matmul": (_gemm_to_matmul, ("Gemm",), ("MatMul", "Add")),
    "matmul_add_to_gemm": (_matmul_add_to_gemm, ("MatMul",), ("Gemm",)),
    "fill_empty_resize_inputs": (_fill_empty_resize_inputs, (), ("Resize",)),
    "convtranspose_to_conv_depthtospace": (_convtranspose_to_conv_depthtospace, ("ConvTranspose",),
                                           ("Conv", "DepthToSpace")),
}
_DECOMPOSITIONS = ("decompose_hardswish", "decompose_hardsigmoid", "gemm_to_matmul",
                   "convtranspose_to_conv_depthtospace")


def _target_has(profile, op: str) -> bool:
    s = profile.supports_op(op) if profile is not None else True
    if s is None:  # decided by onnxruntime's usability checker list
        return _checker_ops(profile).get(op, False)
    return bool(s)


def apply_rewrites(model: onnx.ModelProto, names, profile=None) -> tuple[onnx.ModelProto, dict]:
    """Apply the named rewrites (and, with a profile, every decomposition of an op the target
    lacks into ops it has). Returns (model, {rewrite: count})."""
    present = set(_op_counts(model))
    todo = list(names)
    if profile is not None:
        for r in _DECOMPOSITIONS:
            _, removes, needs = REWRITES[r]
            if any(op in present and not _target_has(profile, op) for op in removes) and \
                    all(_target_has(profile, op) for op in needs) and r not in todo:
                todo.append(r)
        # HardSwish on a target without HardSwish nor HardSigmoid: both decompositions in order
        if "HardSwish" in present and not _target_has(profile, "HardSwish") and \
                not _target_has(profile, "HardSigmoid") and "decompose_hardswish" not in todo:
            todo[:0] = ["decompose_hardswish", "decompose_hardsigmoid"]
    if not todo:
        return model, {}
    g = gs.import_onnx(model)
    done = {}
    for r in todo:
        k = REWRITES[r][0](g)
        if k:
            done[r] = k
    if not done:
        return model, {}
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return _export(g, model), done


# ---------------------------------------------------------------------------------------- numerics
def _samples(model: onnx.ModelProto, ctx, n: int = 4) -> list[dict]:
    src = getattr(ctx, "val", None) if ctx is not None else None
    if src is not None and len(src):
        return [src.get(i) for i in range(min(n, len(src)))]
    from onnxshrink.data import SyntheticSource, input_specs
    return [s for s in SyntheticSource(input_specs(model), n=2, seed=0)]


def _run(model: onnx.ModelProto, samples) -> list[list[np.ndarray]]:
    from onnxshrink.runtime import make_session
    sess = make_session(model, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, s) for s in samples]


def _max_rel_err(a, b) -> float:
    worst = 0.0
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            if x.shape != y.shape:
                return float("inf")
            if x.dtype.kind not in "fc":
                if not np.array_equal(x, y):
                    return float("inf")
                continue
            scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-12)
            err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            worst = max(worst, err / scale)
    return worst


def _transform(model: onnx.ModelProto, profile, ctx, fold: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Opset, folding and rewrites, each kept only if the outputs stay within EMIT_TOL."""
    info: dict = {}
    samples = _samples(model, ctx)
    try:
        base = _run(model, samples)
    except Exception as e:
        return model, {"error": f"the model does not run on the CPU EP: {str(e).splitlines()[0][:200]}"}
    cur = model
    steps = [("opset", lambda m: convert_opset(m, profile.opset_min, profile.opset_max))]
    if fold:
        steps.append(("fold", fold_static_shapes))
    steps.append(("rewrites", lambda m: apply_rewrites(m, profile.rewrites, profile)))
    for name, fn in steps:
        try:
            cand, st = fn(cur)
        except Exception as e:
            info[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            continue
        if cand is cur:
            info[name] = st
            continue
        try:
            onnx.checker.check_model(cand)
            err = _max_rel_err(base, _run(cand, samples))
        except Exception as e:
            info[name] = {**(st if isinstance(st, dict) else {}), "rolled_back": True,
                          "reason": f"invalid or does not run: {str(e).splitlines()[0][:200]}"}
            continue
        if err > EMIT_TOL:
            info[name] = {**(st if isinstance(st, dict) else {}), "rolled_back": True,
                          "reason": f"outputs changed (relative max error {err:.2e})"}
            continue
        info[name] = st if isinstance(st, dict) else {"applied": st}
        info[name]["max_rel_err"] = err
        cur = cand
    return cur, info


def prepare_for_target(model: onnx.ModelProto, profile, ctx=None) -> tuple[onnx.ModelProto, dict]:
    """Before the passes: opset into range, shape folding (when the inputs are static), exact
    rewrites of ops the target lacks. Lossless; returns (model, info)."""
    return _transform(model, profile, ctx)


def emit_for_target(model: onnx.ModelProto, profile, ctx=None, qnn: bool | None = None
                    ) -> tuple[onnx.ModelProto, dict]:
    """After the passes: the preparation steps again (the passes may have added foldable
    subgraphs), channel-last I/O when the profile asks for it, then the coverage report; for qnn
    the real HTP check when available (``qnn=False`` skips it, ``qnn=True`` requires it), fed NHWC
    samples and compared in NCHW for a channel-last model."""
    model, steps = _transform(model, profile, ctx)
    info = {"target": profile.name, "provider": profile.provider, "emission": steps,
            "scheme": {"activations": profile.activation_dtype, "weights": profile.weight_dtype,
                       "symmetric_weights": profile.symmetric_weights, "per_channel": profile.per_channel,
                       "activations_in_model": _activation_qtypes(model)},
            "opset": _opset(model), "static_inputs": _static_inputs(model)}
    if getattr(profile, "channels_last", False):
        model, info["channels_last"] = _apply_channels_last(model, ctx)
    io = ChannelsLastIO(info.get("channels_last"))
    info["coverage"] = coverage(model, profile)
    if profile.name == "qnn" and qnn is not False:
        samples = _samples(model, ctx, n=int(os.environ.get("ONNXSHRINK_QNN_SAMPLES", "8")))
        ref = getattr(ctx, "reference", None)
        info["qnn_htp"] = qnn_htp_check(model, io.feeds(samples), ref[:len(samples)] if ref is not None else None,
                                        required=bool(qnn), outputs_back=io)
    return model, info


def _activation_qtypes(model: onnx.ModelProto) -> list[str]:
    """The integer types of the activation QuantizeLinear outputs (their zero points) in a QDQ model."""
    inits = {t.name: t for t in model.graph.initializer}
    found = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            found.add(onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name)
    return sorted(found)


# ---------------------------------------------------------------------------------------- coverage
_CHECKER_FILES = {"nnapi": "nnapi_supported_ops.md", "coreml": "coreml_supported_mlprogram_ops.md"}


def _checker_ops(profile) -> dict:
    """op -> True for the ops in onnxruntime's mobile usability checker list of this EP."""
    return _checker_ops_for(profile.name)


@functools.lru_cache(maxsize=None)
def _checker_ops_for(name: str) -> dict:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    path = Path(uc.__file__).parent / _CHECKER_FILES[name]
    ops = uc._SupportedOpsChecker(str(path))._ops
    return {k.split(":", 1)[1]: True for k in ops if k.startswith("ai.onnx:")}


def _tensor_types(model: onnx.ModelProto) -> dict:
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        out[vi.name] = (tt.elem_type, dims)
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def _dq_scheme_problem(profile, dq: onnx.NodeProto, inits: dict) -> str | None:
    """Why a DequantizeLinear's quantization is not one the target fuses, or None."""
    x = dq.input[0]
    if x not in inits:  # activation
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        dt = onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name if zp is not None else "uint8"
        if profile.name == "xnnpack" and dt not in ("uint8", "int8"):
            return f"{dt} activations (XNNPACK takes uint8 or int8)"
        if profile.name == "nnapi" and dt != "uint8":
            return f"{dt} activations (NNAPI takes uint8)"
        if profile.name == "qnn" and dt not in ("uint8", "uint16", "int8", "int16"):
            return f"{dt} activations (QNN HTP takes 8/16-bit)"
        return None
    w = inits[x]
    dt = onnx.helper.tensor_dtype_to_np_dtype(w.data_type).name
    if dt == "int32":  # a bias: int32 with scale = input scale * weight scale, taken by every EP here
        return None
    scale = inits.get(dq.input[1])
    per_channel = scale is not None and int(np.prod(scale.dims or [1])) > 1
    if profile.name == "xnnpack":
        if per_channel and dt != "int8":
            return f"per-channel {dt} weights (XNNPACK takes per-channel only as int8)"
        if per_channel and len(dq.input) > 2 and dq.input[2] in inits and \
                np.any(numpy_helper.to_array(inits[dq.input[2]]) != 0):
            return "per-channel weights with non-zero zero points (XNNPACK needs symmetric)"
    if profile.name == "nnapi" and per_channel and dt != "int8":
        return f"per-channel {dt} weights (NNAPI per-channel needs int8 symmetric)"
    return None


def _qdq_in_onnx_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with com.microsoft QuantizeLinear/DequantizeLinear (16-bit types below opset 21, as
    onnxruntime's quantizer emits them) in the ONNX domain: the same semantics, and onnx's shape
    inference (which has no contrib schemas) then sees through them. For analysis only."""
    if not any(n.domain == "com.microsoft" and n.op_type in QDQ for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.domain == "com.microsoft" and n.op_type in QDQ:
            n.domain = ""
    return m


def coverage(model: onnx.ModelProto, profile) -> dict:
    """Which nodes the target's EP takes, which not and why.

    Returns {"nodes", "taken", "not_taken", "partitions", "unsupported": [{node, op, reason}],
    "reasons": {reason: count}, "accepted": bool, "accepted_means": str, ...}."""
    m = _infer(_qdq_in_onnx_domain(model), data_prop=True)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    types = _tensor_types(m)
    producers = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    const_names = set(inits) | {n.output[0] for n in g.node if n.op_type == "Constant"}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    checker_ops = _checker_ops(profile) if isinstance(profile.ops, str) else None

    def dynamic(name):
        t = types.get(name)
        return t is None or t[1] is None or any(d is None for d in t[1])

    reasons: dict[str, str] = {}
    taken: set[str] = set()
    float_nodes: list[str] = []  # taken, but computed in float (not inside a QDQ group)
    names = [n.name or f"{n.op_type}_{k}" for k, n in enumerate(g.node)]
    for name, n in zip(names, g.node):
        why = None
        op = n.op_type
        dom = n.domain or ""
        if profile.ops is None:
            pass
        elif checker_ops is not None:
            if dom not in ("", "ai.onnx") or not checker_ops.get(op):
                why = f"{op} is not in onnxruntime's {profile.name} supported-op list"
        elif dom not in ("", "ai.onnx") or op not in profile.ops:
            if profile.name == "xnnpack" and op in QDQ:
                why = None  # decided by the group it belongs to, below
            elif profile.name == "xnnpack" and op in XNN_FUSED:
                why = None
            else:
                why = f"no {profile.name} kernel for {op}"
        if why is None and profile.static_shapes and profile.ops is not None:
            dyn = [i for i in n.input if i and i not in const_names and dynamic(i)]
            if dyn:
                why = f"input '{dyn[0]}' has a dynamic or unknown shape"
        if why is None and profile.ops is not None:
            ranks = [len(types[i][1]) for i in n.input if i in types and types[i][1] is not None]
            if ranks and max(ranks) > profile.max_rank:
                why = f"rank {max(ranks)} > {profile.max_rank}"
        if why is None and profile.name == "qnn":
            for k in SHAPE_OPERANDS.get(op, ()):
                if k < len(n.input) and n.input[k] and n.input[k] not in const_names:
                    why = f"shape operand '{n.input[k]}' is computed at run time (QNN needs it constant)"
                    break
            if why is None and op not in QDQ and not profile.float_ops_run:
                fin = [i for i in n.input if i and i not in const_names and types.get(i, (0,))[0] in float_types]
                fout = [o for o in n.output if o and types.get(o, (0,))[0] in float_types]
                bad_in = [i for i in fin if i not in producers or producers[i].op_type != "DequantizeLinear"]
                bad_out = [o for o in fout if not consumers.get(o) or
                           any(c.op_type != "QuantizeLinear" for c in consumers[o])]
                if bad_in or bad_out:
                    float_nodes.append(name)
        if why is None and op == "DequantizeLinear" and profile.name in ("xnnpack", "nnapi", "qnn"):
            why = _dq_scheme_problem(profile, n, inits)
        if why is None:
            taken.add(name)
        else:
            reasons[name] = why

    if profile.name == "xnnpack":
        _xnnpack_groups(g, names, taken, reasons, producers, consumers, inits, profile)

    node_by_name = dict(zip(names, g.node))
    unsupported = [{"node": k, "op": node_by_name[k].op_type, "reason": v} for k, v in reasons.items()]
    by_reason = collections.Counter(_reason_kind(v) for v in reasons.values())
    partitions = _count_partitions(g, names, taken, producers)
    heavy_total = sum(1 for n in g.node if n.op_type in HEAVY_OPS)
    heavy_taken = sum(1 for k, n in zip(names, g.node) if n.op_type in HEAVY_OPS and k in taken)
    info = {"nodes": len(g.node), "taken": len(taken), "not_taken": len(reasons), "partitions": partitions,
            "heavy_ops": {"total": heavy_total, "taken": heavy_taken},
            "unsupported_ops": dict(collections.Counter(u["op"] for u in unsupported)),
            "reasons": dict(by_reason), "unsupported": unsupported[:200]}
    if not profile.float_ops_run:
        info["float_nodes"] = len(float_nodes)
        info["float_ops"] = dict(collections.Counter(node_by_name[k].op_type for k in float_nodes))
        if float_nodes:
            info["float_note"] = ("these nodes compute in float outside a QDQ group: the QNN EP hands them to "
                                  "HTP, which runs float only in fp16 on v73+ chips (fp32 in the x86 simulator); "
                                  "quantize them for older HTP versions")
    if checker_ops is not None:
        info["usability_checker"] = _usability_check(m, profile)
        info["accepted"] = info["usability_checker"]["suitability"] == "YES" and \
            not by_reason.get("QDQ scheme / fusion")
        info["accepted_means"] = ("onnxruntime's mobile usability checker rates the model YES for this EP "
                                  "and every QDQ tensor has a type the EP takes")
    elif profile.name == "xnnpack":
        info["accepted"] = heavy_taken == heavy_total and not any(
            "XNNPACK takes" in v or "XNNPACK needs" in v for v in reasons.values())
        info["accepted_means"] = ("XNNPACK takes every Conv/ConvTranspose/MatMul/Gemm and the QDQ scheme is one "
                                  "it fuses; other ops run on the CPU EP in the same session by design")
    elif profile.ops is None:
        info["accepted"] = True
        info["accepted_means"] = f"{profile.provider} runs every ONNX op"
    else:
        info["accepted"] = not reasons
        info["accepted_means"] = f"every node is taken by {profile.provider} (static analysis)"
    return info


def _xnnpack_groups(g, names, taken, reasons, producers, consumers, inits, profile):
    """XNNPACK: a QDQ group is taken when its op is one XNNPACK fuses as QDQ and the scheme fits;
    Q/DQ nodes belong to the group they surround; Relu/Clip are taken when fused into a float
    Conv/MaxPool/AveragePool it takes."""
    from onnxshrink.targets.profiles import XNNPACK_QDQ_OPS
    by_node = dict(zip([id(n) for n in g.node], names))
    for name, n in zip(names, g.node):
        if n.op_type in QDQ or n.op_type in XNN_FUSED:
            continue
        if name not in taken:
            continue
        quantized = any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
        if quantized and n.op_type not in XNNPACK_QDQ_OPS:
            taken.discard(name)
            reasons[name] = f"XNNPACK takes {n.op_type} only in float, not as a QDQ group"
        if quantized and name in taken:
            # the scheme: u8 activations with s8 weights are not taken
            act_dt = set()
            for i in n.input:
                p = producers.get(i)
                if p is not None and p.op_type == "DequantizeLinear":
                    src = inits.get(p.input[0])
                    if src is not None:  # weight (or int32 bias, which does not count)
                        dt = onnx.helper.tensor_dtype_to_np_dtype(src.data_type).name
                    else:
                        zp = inits.get(p.input[2]) if len(p.input) > 2 and p.input[2] else None
                        dt = onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name if zp is not None else "uint8"
                    if dt != "int32":
                        act_dt.add(dt)
            if len(act_dt) > 1:
                taken.discard(name)
                reasons[name] = f"mixed {'/'.join(sorted(act_dt))} QDQ inputs (XNNPACK takes qu8 or qs8, not u8s8)"
    for name, n in zip(names, g.node):
        if n.op_type in QDQ:
            nb = [producers.get(i) for i in n.input] + [c for o in n.output for c in consumers.get(o, [])]
            if any(x is not None and x.op_type not in QDQ and by_node[id(x)] in taken for x in nb):
                if name not in reasons:
                    taken.add(name)
            else:
                taken.discard(name)
                reasons.setdefault(name, "Q/DQ around an op XNNPACK does not take (runs on the CPU EP)")
        elif n.op_type in XNN_FUSED:
            p = producers.get(n.input[0]) if n.input else None
            if p is not None and p.op_type in ("Conv", "MaxPool", "AveragePool") and by_node[id(p)] in taken:
                taken.add(name)
            else:
                taken.discard(name)
                reasons[name] = f"XNNPACK fuses {n.op_type} only after a float Conv/MaxPool/AveragePool it takes"


def _reason_kind(reason: str) -> str:
    for key, kind in (("Q/DQ around", "Q/DQ of an op on the CPU EP"), ("supported-op list", "op not in EP list"),
                      ("no ", "op not in EP list"), ("dynamic", "dynamic shape"), ("rank", "rank"),
                      ("shape operand", "run-time shape operand"), ("XNNPACK", "QDQ scheme / fusion"),
                      ("activations", "QDQ scheme / fusion"), ("weights", "QDQ scheme / fusion")):
        if key in reason:
            return kind
    return "other"


def _count_partitions(g, names, taken, producers) -> int:
    """Connected components of taken nodes (edges between taken producer/consumer pairs)."""
    parent = {k: k for k in taken}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_node = dict(zip([id(n) for n in g.node], names))
    for name, n in zip(names, g.node):
        if name not in taken:
            continue
        for i in n.input:
            p = producers.get(i)
            if p is not None and by_node[id(p)] in taken:
                parent[find(name)] = find(by_node[id(p)])
    return len({find(k) for k in taken})


def _usability_check(model_with_shapes: onnx.ModelProto, profile) -> dict:
    """onnxruntime's own mobile usability checker on the model (shapes inferred)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    if profile.name == "nnapi":
        p = uc.check_nnapi_partitions(model_with_shapes, require_fixed_input_sizes=True)
    else:
        p = uc.check_coreml_partitions(model_with_shapes, True, _CHECKER_FILES["coreml"])
    return {"partitions": p.num_partitions, "supported_nodes": p.num_supported_nodes, "nodes": p.num_nodes,
            "unsupported_ops": sorted(p.unsupported_ops),
            "unsupported_dynamic_shape": p.nodes_unsupported_due_to_dynamic_input,
            "unsupported_rank": p.num_unsupported_nodes_due_to_rank,
            "suitability": p.suitability().name,
            "caveats_unchecked": p.supported_ops_checker.get_caveats()}


# ---------------------------------------------------------------------------------------- QNN HTP
_QNN_WORKER = r'''
import json, re, sys, time
import numpy as np
import onnxruntime as ort
import onnxruntime_qnn as qnn
model, samples_path, out_path, log_path, options = sys.argv[1:6]
options = json.loads(options)
ort.register_execution_provider_library("QNNExecutionProvider", qnn.get_library_path())
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
res = {"onnxruntime": ort.__version__, "onnxruntime_qnn": getattr(qnn, "__version__", "?"), "provider_options": options}
if not devs:
    res["error"] = "no QNN EP device"
    print(json.dumps(res)); sys.exit(0)
def session(fallback):
    so = ort.SessionOptions()
    so.log_severity_level = 0 if not fallback else 0
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.intra_op_num_threads = 1
    so.add_provider_for_devices(devs, options)
    return ort.InferenceSession(model, so)
t = time.time()
try:
    sess = session(False)
    res["accepted"] = True
except Exception as e:
    res["accepted"] = False
    res["error"] = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    sess = None
res["session_s"] = round(time.time() - t, 2)
if sess is None:
    try:
        sess = session(True)
        res["ran_with_cpu_fallback"] = True
    except Exception as e:
        res["fallback_error"] = str(e).strip().splitlines()[0][:400]
if sess is not None:
    data = np.load(samples_path, allow_pickle=False)
    n = int(data["__n__"])
    names = [o.name for o in sess.get_outputs()]
    outs = {}
    t = time.time()
    for k in range(n):
        feeds = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}/")}
        for j, v in enumerate(sess.run(names, feeds)):
            outs[f"{k}/{j}"] = v
    res["run_s_per_sample"] = round((time.time() - t) / max(n, 1), 3)
    np.savez(out_path, **outs)
    res["samples"] = n
print(json.dumps(res))
'''


# The HTP device the simulator emulates. Without a soc_model the simulator cannot finalize graphs
# that keep float nodes (QNN_COMMON_ERROR_MEM_ALLOC); 43 = Snapdragon 8 Gen 2 (SM8550, HTP v73).
# enable_htp_fp16_precision: float nodes run in fp16 as they do on the device (v73+).
QNN_HTP_OPTIONS = {"backend_type": "htp", "soc_model": "43", "enable_htp_fp16_precision": "1"}


def qnn_provider_options() -> dict:
    """QNN_HTP_OPTIONS overridden by $ONNXSHRINK_QNN_OPTIONS ("key=value,key=value")."""
    opts = dict(QNN_HTP_OPTIONS)
    for kv in filter(None, os.environ.get("ONNXSHRINK_QNN_OPTIONS", "").split(",")):
        k, _, v = kv.partition("=")
        if v == "":
            opts.pop(k.strip(), None)
        else:
            opts[k.strip()] = v.strip()
    return opts


def qnn_python() -> str | None:
    """The Python that has onnxruntime-qnn: $ONNXSHRINK_QNN_PYTHON, else this one if it has it."""
    env = os.environ.get("ONNXSHRINK_QNN_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("onnxruntime_qnn") is not None else None


def qnn_available() -> bool:
    return qnn_python() is not None


def _parse_placements(log: str) -> dict:
    """onnxruntime's 'Node placements' verbose log -> {provider: [op (name), ...] or count}."""
    out: dict = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            cur = m.group(2)
            out.setdefault(cur, {"count": int(m.group(3)), "nodes": []})
            continue
        if cur and "VerifyEachNodeIsAssignedToAnEp" in line:
            txt = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1].strip()
            if txt and "placed on" not in txt and txt != "Node placements":
                out[cur]["nodes"].append(txt)
        elif cur and "VerifyEachNodeIsAssignedToAnEp" not in line:
            cur = None
    return out


def _parse_qnn_validation(log: str, limit: int = 50) -> list[dict]:
    """The QNN EP's own per-node-unit verdicts from its verbose log: 'Validation FAILED for N nodes
    in OrtNodeUnit (Op)' followed by the nodes and a 'REASON :' line."""
    out, cur = [], None
    for line in log.splitlines():
        if "Validation FAILED for" in line:
            m = re.search(r"OrtNodeUnit \((\w+)\)", line)
            cur = {"unit": m.group(1) if m else "?", "nodes": [], "reason": ""}
            out.append(cur)
        elif cur is not None and line.startswith("\tOperator type:"):
            m = re.search(r"Operator type: (\S+) Node name: (.*?) Node index", line)
            if m:
                cur["nodes"].append(f"{m.group(1)} ({m.group(2)})")
        elif cur is not None and "REASON" in line:
            cur["reason"] = line.split(":", 1)[1].strip()[:300]
            cur = None
        elif cur is not None and not line.strip():
            cur = None
    seen, uniq = set(), []
    for v in out:  # onnxruntime asks the EP twice (before and after layout transform)
        key = (v["unit"], tuple(v["nodes"]), v["reason"])
        if key not in seen:
            seen.add(key)
            uniq.append(v)
    return uniq[:limit]


def qnn_htp_check(model: onnx.ModelProto, samples, reference=None, required: bool = False,
                  timeout: int = 1800, outputs_back: "ChannelsLastIO | None" = None) -> dict:
    """Build a QNN HTP session with CPU fallback disabled (``session.disable_cpu_ep_fallback=1``)
    in a subprocess, run ``samples`` on it, and compare with ``reference`` (the fp32 original's
    outputs on the CPU). Returns {"available", "accepted", "placements", "fidelity", ...}."""
    py = qnn_python()
    if py is None:
        res = {"available": False, "reason": "onnxruntime-qnn is not installed (pip install onnxruntime-qnn)"}
        if required:
            from onnxshrink.errors import UsageError
            raise UsageError(res["reason"])
        return res
    with tempfile.TemporaryDirectory(prefix="onnxshrink_qnn_") as d:
        mp = os.path.join(d, "model.onnx")
        from onnxshrink.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, mp, save_as_external_data=tensor_bytes(m) >= EXTERNAL_DATA_THRESHOLD,
                        location="model.onnx.data")
        sp = os.path.join(d, "samples.npz")
        arrays = {"__n__": np.array(len(samples))}
        for k, s in enumerate(samples):
            for name, v in s.items():
                arrays[f"{k}/{name}"] = v
        np.savez(sp, **arrays)
        op = os.path.join(d, "outputs.npz")
        lp = os.path.join(d, "log.txt")
        try:
            with open(lp, "w") as logf:
                proc = subprocess.run([py, "-c", _QNN_WORKER, mp, sp, op, lp, json.dumps(qnn_provider_options())],
                                      stdout=subprocess.PIPE,
                                      stderr=logf, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"available": True, "accepted": False, "error": f"QNN check timed out after {timeout}s"}
        log = Path(lp).read_text(errors="replace")
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not last:
            tail = [ln for ln in log.splitlines() if "rror" in ln][-3:]
            return {"available": True, "accepted": False,
                    "error": f"QNN worker exited with {proc.returncode}: {' | '.join(tail)[:600]}"}
        res = json.loads(last[-1])
        res["available"] = True
        res["python"] = py
        res["placements"] = _parse_placements(log)
        cpu = res["placements"].get("CPUExecutionProvider")
        if cpu:
            res["nodes_on_cpu"] = cpu["count"]
            res["cpu_nodes"] = cpu["nodes"][:100]
        res["ep_validation_failed"] = _parse_qnn_validation(log)
        res["errors_in_log"] = [ln.split("]", 1)[-1].strip()[:300] for ln in log.splitlines()
                                if "[E:" in ln][:10]
        if Path(op).exists() and reference is not None:
            outs = np.load(op)
            got = [[outs[f"{k}/{j}"] for j in range(len(reference[k]))] for k in range(res.get("samples", 0))]
            if outputs_back is not None:  # channel-last outputs compared in the reference's NCHW layout
                got = outputs_back.back(got, [o.name for o in model.graph.output])
            from onnxshrink.metrics import compare_outputs, fidelity
            res["fidelity"] = fidelity(reference[:len(got)], got)
            res["per_sample"] = [{"cosine": compare_outputs(r, o)["cosine"],
                                  "ref_max": float(max(np.max(np.abs(x)) for x in r))}
                                 for r, o in zip(reference, got)]
            res["fidelity_vs"] = "fp32 original on the CPU EP"
    return res


# ---------------------------------------------------------------------------------------- ORT format
def save_ort_format(onnx_path: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                    optimization_style: str = "Fixed", target_platform: str | None = None) -> Path:
    """Convert a saved .onnx model to the ORT format with onnxruntime's converter
    (``python -m onnxruntime.tools.convert_onnx_models_to_ort``); returns the .ort path.
    onnxruntime's guidance: 'Runtime' style for NNAPI/CoreML, 'Fixed' otherwise."""
    onnx_path = Path(onnx_path)
    out_dir = Path(output_dir) if output_dir else onnx_path.parent
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
           "--output_dir", str(out_dir), "--optimization_style", optimization_style]
    if target_platform:
        cmd += ["--target_platform", target_platform]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(out_dir.glob(onnx_path.stem + "*.ort"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not found:
        from onnxshrink.errors import InputError
        raise InputError(f"ORT format conversion failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return found[-1]

