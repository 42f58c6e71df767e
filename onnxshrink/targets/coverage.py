"""Which nodes a target's execution provider takes, which not and why (static analysis).

Per node: the EP's op list (``TargetProfile.ops``; for NNAPI and CoreML onnxruntime's own mobile
usability checker decides), dynamic or unknown input shapes where the EP needs static ones, tensor
rank, shape operands computed at run time (QNN needs them constant), float compute outside a QDQ
group (QNN HTP runs quantized graphs), and the QDQ scheme of each DequantizeLinear:

- XNNPACK: uint8 or int8 activations; per-channel weights only as int8 symmetric ("qc8"), u8
  activations with s8 weights not fused; QDQ groups only of Conv/ConvTranspose/MaxPool/AveragePool/
  Softmax/Resize (other QDQ groups run as integer kernels on the CPU EP), float MatMul/Gemm only
  with constant weights, Relu/Clip only fused after a float Conv/MaxPool/AveragePool it takes
  (``_xnnpack_placement``);
- NNAPI: uint8 activations (TENSOR_QUANT8_ASYMM), per-channel weights only int8 symmetric;
- QNN HTP: 8- or 16-bit activations; int32 biases are taken by every EP here.

Taken nodes are counted into partitions (connected components), the EP's session boundaries.
"""

from __future__ import annotations

__all__ = ["coverage", "activation_qtypes", "SHAPE_OPERANDS", "HEAVY_OPS"]

import collections

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.graph.shapes import infer_shapes
from onnxshrink.targets.profiles import (
    QDQ_OPS,
    USABILITY_CHECKER_FILES,
    XNNPACK_FUSED_ACTIVATIONS,
    XNNPACK_QDQ_OPS,
    checker_ops,
)

# inputs that carry shapes, axes or sizes: the QNN EP needs them constant
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Pad": (1, 2, 3),
    "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "TopK": (1,), "ConstantOfShape": (0,),
    "Upsample": (1,), "Range": (0, 1, 2), "OneHot": (1,),
}
# activations the QNN EP fuses into a preceding Conv/ConvTranspose (DQ -> Conv -> Relu/Clip -> Q)
FUSED_ACTIVATIONS = ("Relu", "Clip")
# the compute-heavy ops: an EP that misses one of them is not worth running
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "QLinearConv")


def coverage(model: onnx.ModelProto, profile) -> dict:
    """Which nodes the target's EP takes, which not and why.

    Returns {"nodes", "taken", "not_taken", "partitions", "unsupported": [{node, op, reason}],
    "reasons": {reason: count}, "accepted": bool, "accepted_means": str, ...}."""
    m = infer_shapes(_qdq_in_onnx_domain(model), data_prop=True)
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
    listed_ops = checker_ops(profile) if isinstance(profile.ops, str) else None

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
        elif listed_ops is not None:
            if dom not in ("", "ai.onnx") or not listed_ops.get(op):
                why = f"{op} is not in onnxruntime's {profile.name} supported-op list"
        elif (op not in profile.contrib_ops) if dom == "com.microsoft" else \
                (dom not in ("", "ai.onnx") or op not in profile.ops):
            if profile.name == "xnnpack" and op in QDQ_OPS:
                why = None  # decided by the group it belongs to, below
            elif profile.name == "xnnpack" and op in XNNPACK_FUSED_ACTIVATIONS:
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
            if why is None and op == "Einsum":
                why = _qnn_einsum_problem(n)
            if why is None and op not in QDQ_OPS and not profile.float_ops_run:
                fin = [i for i in n.input if i and i not in const_names and types.get(i, (0,))[0] in float_types]
                fout = [o for o in n.output if o and types.get(o, (0,))[0] in float_types]
                bad_in = [i for i in fin if i not in producers or producers[i].op_type != "DequantizeLinear"]
                # float constant data (weights, operands; not shape operands or Clip's bounds) not behind a DQ
                bad_in += [i for k, i in enumerate(n.input) if i in inits and inits[i].data_type in float_types and
                           k not in SHAPE_OPERANDS.get(op, ()) and not (op == "Clip" and k > 0)]
                bad_out = [o for o in fout if not consumers.get(o) or
                           any(c.op_type != "QuantizeLinear" for c in consumers[o])]
                if bad_out and op in ("Conv", "ConvTranspose") and _fused_activation(n, consumers):
                    bad_out = []  # DQ -> Conv -> Relu/Clip -> Q: one QNN Conv (the EP's conv-activation fusion)
                if op in FUSED_ACTIVATIONS and n.input and n.input[0] in producers and \
                        producers[n.input[0]].op_type in ("Conv", "ConvTranspose") and \
                        _fused_activation(producers[n.input[0]], consumers):
                    bad_in = []
                if bad_in or bad_out:
                    float_nodes.append(name)
        if why is None and op == "DequantizeLinear" and profile.name in ("xnnpack", "nnapi", "qnn"):
            why = _dq_scheme_problem(profile, n, inits)
        if why is None:
            taken.add(name)
        else:
            reasons[name] = why

    cpu_integer, rejections = set(), []
    if profile.name == "xnnpack":
        cpu_integer, rejections = _xnnpack_placement(g, names, taken, reasons, producers, consumers, inits, types)

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
        info["float_node_names"] = float_nodes[:50]
        info["float_ops"] = dict(collections.Counter(node_by_name[k].op_type for k in float_nodes))
        if float_nodes:
            info["float_note"] = ("these nodes compute in float outside a QDQ group: the QNN EP hands them to "
                                  "HTP, which runs float only in fp16 on v73+ chips (fp32 in the x86 simulator); "
                                  "quantize them for older HTP versions")
    if listed_ops is not None:
        info["usability_checker"] = _usability_check(m, profile)
        info["accepted"] = info["usability_checker"]["suitability"] == "YES" and \
            not by_reason.get("QDQ scheme / fusion")
        info["accepted_means"] = ("onnxruntime's mobile usability checker rates the model YES for this EP "
                                  "and every QDQ tensor has a type the EP takes")
    elif profile.name == "xnnpack":
        info["cpu_integer"] = len(cpu_integer)
        info["heavy_ops"]["cpu_integer"] = sum(1 for k in cpu_integer if node_by_name[k].op_type in HEAVY_OPS)
        info["accepted"] = not rejections
        info["rejected_because"] = rejections[:20]
        info["accepted_means"] = ("XNNPACK takes every Conv/ConvTranspose and every MatMul/Gemm with constant "
                                  "weights, or the CPU EP runs that MatMul/Gemm as an integer kernel, and each "
                                  "QDQ group XNNPACK fuses has a scheme it takes; other ops (attention MatMuls "
                                  "included) run on the CPU EP in the same session by design")
    elif profile.ops is None:
        info["accepted"] = True
        info["accepted_means"] = f"{profile.provider} runs every ONNX op"
    else:
        info["accepted"] = not reasons
        info["rejected_because"] = [f"{u['node']} ({u['op']}): {u['reason']}" for u in unsupported[:20]]
        info["accepted_means"] = f"every node is taken by {profile.provider} (static analysis)"
    if listed_ops is not None and not info["accepted"]:
        uc = info["usability_checker"]
        # which ops it lacks, most frequent first: what a user can act on (a QDQ model on CoreML: Q/DQ)
        missing = collections.Counter(u["op"] for u in unsupported if _reason_kind(u["reason"]) == "op not in EP list")
        lacks = ", ".join(f"{op} x{k}" for op, k in missing.most_common(3))
        info["rejected_because"] = [f"the usability checker rates it {uc['suitability']} "
                                    f"({uc['supported_nodes']}/{uc['nodes']} nodes, {uc['partitions']} partitions"
                                    + (f"; ops not in its list: {lacks})" if lacks else ")")] + \
            [f"{u['node']} ({u['op']}): {u['reason']}" for u in unsupported
             if _reason_kind(u["reason"]) == "QDQ scheme / fusion"][:19]
    return info


def activation_qtypes(model: onnx.ModelProto) -> list[str]:
    """The integer types of the activation QuantizeLinear outputs (their zero points) in a QDQ model."""
    inits = {t.name: t for t in model.graph.initializer}
    found = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            found.add(onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name)
    return sorted(found)


def _xnnpack_placement(g, names, taken, reasons, producers, consumers, inits, types) -> tuple[set, list]:
    """Where each node runs in an XNNPACK session, as onnxruntime's XNNPACK EP partitions it
    (``xnnpack_execution_provider.cc``, ``detail/utils.cc``, ``node_support_checker.cc``), and what
    the target check rejects. Returns (``cpu_integer``: QDQ groups XNNPACK leaves to the CPU EP,
    ``rejections``: one line per problem).

    - A node reading DequantizeLinear outputs is a QDQ group when its output feeds only
      QuantizeLinear (through a Relu/Clip that onnxruntime drops as redundant). XNNPACK fuses groups
      of Conv/ConvTranspose/MaxPool/AveragePool/Softmax/Resize whose scheme it takes (qs8/qu8, qc8
      weights; not u8 activations with s8 weights); every other group (MatMul, Gemm, Add, ...) runs
      as an integer kernel on the CPU EP in the same session.
    - A float node is XNNPACK's when it has an XNNPACK kernel and that kernel's conditions hold:
      MatMul and Gemm only with a constant weight initializer (a 2-D MatMul weight, a Gemm with
      alpha = beta = 1, rank < 3 and a constant bias input), Conv/ConvTranspose only with constant
      weights; Relu/Clip when fused into a float Conv/MaxPool/AveragePool XNNPACK takes.
    - Q/DQ nodes belong to the group they surround.

    The check rejects the model when a Conv/ConvTranspose is not XNNPACK's, a MatMul/Gemm with a
    constant weight is neither XNNPACK's nor an integer kernel on the CPU EP, or a QDQ group XNNPACK
    would fuse has a scheme it does not take. An activation x activation MatMul (attention) has no
    XNNPACK kernel at all: it runs on the CPU EP, float or integer, by design."""
    by_node = dict(zip([id(n) for n in g.node], names))
    cpu_integer: set = set()
    rejections: list = []

    def from_dq(t):
        return t in producers and producers[t].op_type == "DequantizeLinear"

    def constant(t):  # a constant weight: an initializer, or the DQ of one
        return t in inits or (from_dq(t) and producers[t].input[0] in inits)

    def q_output(n):
        outs = consumers.get(n.output[0], []) if n.output else []
        if len(outs) == 1 and outs[0].op_type in XNNPACK_FUSED_ACTIVATIONS:
            outs = consumers.get(outs[0].output[0], [])
        return bool(outs) and all(c.op_type == "QuantizeLinear" for c in outs)

    def float_kernel_problem(n):
        op, ins = n.op_type, [i for i in n.input]
        if op in ("MatMul", "Gemm"):
            if len(ins) < 2 or ins[1] not in inits:
                return f"XNNPACK runs {op} only with a constant weight initializer (its weight is " + \
                    ("dequantized at run time)" if len(ins) > 1 and from_dq(ins[1]) else "an activation)")
            dims_a = (types.get(ins[0]) or (0, None))[1]
            rank_a = len(dims_a) if dims_a is not None else None  # unknown here: onnxruntime's inference decides
            rank_b = len(inits[ins[1]].dims)
            if op == "MatMul" and (rank_b > 2 or rank_a not in (rank_b, rank_b + 1, None)):
                return f"XNNPACK runs MatMul only as [batch,] M x K times a 2-D weight (ranks {rank_a} x {rank_b})"
            if op == "Gemm":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    return "XNNPACK runs Gemm only with alpha = beta = 1"
                if len(ins) < 3 or not ins[2]:  # its support check reads C's shape unconditionally
                    return "XNNPACK runs Gemm only with a bias input"
                if ins[2] not in inits:
                    return "XNNPACK runs Gemm only with a constant bias"
                if (rank_a or 0) >= 3 or rank_b >= 3:
                    return "XNNPACK runs Gemm only on 2-D operands"
        if op in ("Conv", "ConvTranspose") and (len(ins) < 2 or ins[1] not in inits):
            return f"XNNPACK runs a float {op} only with constant weights (its weight is " + \
                ("dequantized at run time)" if len(ins) > 1 and from_dq(ins[1]) else "an activation)")
        return None

    for name, n in zip(names, g.node):
        op = n.op_type
        if op in QDQ_OPS or op in XNNPACK_FUSED_ACTIVATIONS:
            continue
        data = [i for k, i in enumerate(n.input) if i and k not in SHAPE_OPERANDS.get(op, ()) and
                not (i in inits and not from_dq(i))]
        reads_dq = any(from_dq(i) for i in n.input)
        integer = reads_dq and bool(data) and all(from_dq(i) for i in data)
        if integer and op in XNNPACK_QDQ_OPS and q_output(n):
            if name not in taken:
                continue
            act_dt = set()  # the scheme: u8 activations with s8 weights are not taken
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
            bad_dq = [reasons[by_node[id(producers[i])]] for i in n.input
                      if from_dq(i) and by_node[id(producers[i])] in reasons]
            if len(act_dt) > 1:
                why = f"mixed {'/'.join(sorted(act_dt))} QDQ inputs (XNNPACK takes qu8 or qs8, not u8s8)"
            else:
                why = bad_dq[0] if bad_dq else None
            if why:
                taken.discard(name)
                reasons[name] = why
                rejections.append(f"{name} ({op}): {why}")
        elif integer and op not in XNNPACK_QDQ_OPS:
            taken.discard(name)
            cpu_integer.add(name)
            reasons[name] = f"an integer {op} on the CPU EP (XNNPACK fuses no QDQ {op}; by design)"
        elif name in taken:
            why = float_kernel_problem(n)
            if why:
                taken.discard(name)
                reasons[name] = why
    for name, n in zip(names, g.node):
        if n.op_type in QDQ_OPS:
            nb = [producers.get(i) for i in n.input] + [c for o in n.output for c in consumers.get(o, [])]
            if name not in reasons and any(x is not None and x.op_type not in QDQ_OPS and by_node[id(x)] in taken
                                           for x in nb):
                taken.add(name)
            else:
                taken.discard(name)
                reasons.setdefault(name, "Q/DQ around an op XNNPACK does not take (runs on the CPU EP)")
        elif n.op_type in XNNPACK_FUSED_ACTIVATIONS:
            p = producers.get(n.input[0]) if n.input else None
            if p is not None and p.op_type in ("Conv", "MaxPool", "AveragePool") and by_node[id(p)] in taken:
                taken.add(name)
            else:
                taken.discard(name)
                reasons[name] = f"XNNPACK fuses {n.op_type} only after a float Conv/MaxPool/AveragePool it takes"
    for name, n in zip(names, g.node):
        if n.op_type not in HEAVY_OPS or name in taken or name in cpu_integer:
            continue
        if n.op_type == "MatMul" and not any(constant(i) for i in n.input[:2]):
            continue  # activation x activation: no XNNPACK kernel; the CPU EP's by design
        line = f"{name} ({n.op_type}): {reasons.get(name, 'not taken')}"
        if line not in rejections:
            rejections.append(line)
    return cpu_integer, rejections


def _qnn_einsum_problem(node: onnx.NodeProto) -> str | None:
    """Why the QNN EP's Einsum builder refuses ``node`` (None when it takes it), as its
    ``IsOpSupported`` decides (onnxruntime ``qnn/builder/opbuilder/einsum_op_builder.cc``): two
    terms and a result of two or more lowercase letters each, in one of four patterns: MatMul
    (``...mk,...kn->...mn``), MatMul with the second operand transposed (``...mk,...nk->...mn``),
    rank 4 with every operand transposed (``bchq,bkhc->bkhq``) and rank 4 by rank 3 broadcast
    (``bhwc,hkc->bhwk``). Terms of unequal length are refused in the first two patterns (the
    builder indexes them as equal)."""
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    lhs, arrow, res = eq.partition("->")
    a, comma, b = lhs.partition(",")
    why = (f"the QNN EP's Einsum builder takes only lowercase batched-MatMul equations "
           f"(ij,jk->ik; ij,kj->ik; bchq,bkhc->bkhq; bhwc,hkc->bhwk), not '{eq}'")
    if not (arrow and comma) or any(len(t) < 2 or not (t.isascii() and t.isalpha() and t.islower())
                                    for t in (a, b, res)):
        return why
    if len(a) == len(b) == len(res) and a[:-2] == b[:-2] == res[:-2] and a[-2] == res[-2] and \
            (a[-1] == b[-2] and b[-1] == res[-1] or a[-1] == b[-1] and b[-2] == res[-1]):
        return None  # MatMul, MatMul with the second operand transposed
    if len(a) == len(b) == len(res) == 4 and a[0] == b[0] == res[0] and a[3] == res[3] and a[1] == b[3] and \
            b[1] == res[1]:
        return None  # every operand transposed
    if (len(a), len(b), len(res)) == (4, 3, 4) and a[2] == res[2] and a[3] == b[2] and b[1] == res[3] and \
            a[0] == res[0] and a[1] == res[1] and b[0] == res[1]:
        return None  # rank 4 by rank 3, broadcast
    return why


def _reason_kind(reason: str) -> str:
    """The category of a not-taken reason, for the per-category counts."""
    for key, kind in (("Q/DQ around", "Q/DQ of an op on the CPU EP"), ("XNNPACK fuses no", "integer on the CPU EP"),
                      ("XNNPACK runs", "EP kernel condition"), ("supported-op list", "op not in EP list"),
                      ("no ", "op not in EP list"), ("dynamic", "dynamic shape"), ("rank", "rank"),
                      ("shape operand", "run-time shape operand"), ("XNNPACK", "QDQ scheme / fusion"),
                      ("activations", "QDQ scheme / fusion"), ("weights", "QDQ scheme / fusion")):
        if key in reason:
            return kind
    return "other"


def _fused_activation(conv, consumers) -> bool:
    """``conv``'s only output feeds one Relu/Clip whose output feeds only QuantizeLinear nodes: the
    QNN EP fuses DQ -> Conv -> Relu/Clip -> Q into one quantized Conv."""
    cs = consumers.get(conv.output[0], [])
    if len(cs) != 1 or cs[0].op_type not in FUSED_ACTIVATIONS:
        return False
    outs = consumers.get(cs[0].output[0], [])
    return bool(outs) and all(c.op_type == "QuantizeLinear" for c in outs)


def _count_partitions(g, names, taken, producers) -> int:
    """Connected components of taken nodes (edges between taken producer/consumer pairs)."""
    from networkx.utils import UnionFind  # here, not at the top: networkx takes 0.2 s to import
    parts = UnionFind(taken)
    by_node = dict(zip([id(n) for n in g.node], names))
    for name, n in zip(names, g.node):
        if name not in taken:
            continue
        for i in n.input:
            p = producers.get(i)
            if p is not None and by_node[id(p)] in taken:
                parts.union(name, by_node[id(p)])
    return len({parts[k] for k in taken})


def _usability_check(model_with_shapes: onnx.ModelProto, profile) -> dict:
    """onnxruntime's own mobile usability checker on the model (shapes inferred)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    if profile.name == "nnapi":
        p = uc.check_nnapi_partitions(model_with_shapes, require_fixed_input_sizes=True)
    else:
        p = uc.check_coreml_partitions(model_with_shapes, True, USABILITY_CHECKER_FILES["coreml"])
    return {"partitions": p.num_partitions, "supported_nodes": p.num_supported_nodes, "nodes": p.num_nodes,
            "unsupported_ops": sorted(p.unsupported_ops),
            "unsupported_dynamic_shape": p.nodes_unsupported_due_to_dynamic_input,
            "unsupported_rank": p.num_unsupported_nodes_due_to_rank,
            "suitability": p.suitability().name,
            "caveats_unchecked": p.supported_ops_checker.get_caveats()}


def _tensor_types(model: onnx.ModelProto) -> dict:
    """name -> (elem_type, dims or None; unknown dims None) of every typed value and initializer."""
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
    if not any(n.domain == "com.microsoft" and n.op_type in QDQ_OPS for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.domain == "com.microsoft" and n.op_type in QDQ_OPS:
            n.domain = ""
    return m
