"""Dynamic int8 quantization of MatMul, by onnxruntime's own tool, for transformer-style models.

``onnxruntime.quantization.quantize_dynamic`` writes ``MatMul(x, W)`` with a constant ``W`` as
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q)`` scaled back to float (onnxruntime fuses it
into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``): ``W ~ s_W W_q`` int8 per tensor (the
tool's per-column option quantizes column by column in Python: 14 s for a 4-block ViT-S-width
encoder, against 1.5 s per tensor, so it is not used), and ``x ~ s_x (x_q - z_x)`` uint8 with ``s_x``, ``z_x`` from the
min/max of *this* input at run time, so no calibration range can be wrong for an input (the
activation outliers of transformers are what static int8 ranges lose). The contrib ``Attention`` op
of onnxruntime's transformer optimizer is quantized the same way. This module adds only what the
tool does not do:

- ``Gemm(A, B, C)`` with a constant ``B`` is rewritten first, exactly, as ``MatMul(A, alpha op(B))``
  (+ ``Add(beta C)``): the tool quantizes MatMul, not Gemm.
- Full-range int8 weights (the tool's default), unlike the static scheme's 7-bit weights on x86
  without VNNI: on this very kind of CPU (AVX2, whose u8 x s8 kernels can saturate) a 4-block
  ViT-S-width encoder measured cosine 0.9991 with 8-bit against 0.9971 with 7-bit weights, and the
  fidelity check runs these kernels, so a saturation that mattered would be caught.
- When to use it (the quantize option ``dynamic``): ``on`` always, ``off`` never; ``auto`` (the
  default) tries it first when the guard is on, the target is this CPU, and most of the model's MACs
  are in MatMul/Gemm with constant weights (``matmul_share`` >= ``MATMUL_SHARE``: transformer
  encoders, MLPs; convolutional models stay with static QDQ, whose integer Conv kernels
  ``ConvInteger`` cannot match). It is kept when its fidelity against the float model holds the
  guard's floor (the budget when there is one) and it measures clearly faster than the float model
  (``Context.compare_speeds``: the whole ~95 % interval above ``min_speedup`` x 1.03); the static
  search is then skipped. Otherwise the static plan runs as before and the trial is reported.
- LSTMs (``dynamic_lstm``): the same tool's ``DynamicQuantizeLSTM`` for LSTM nodes with constant
  weights, applied after the static plan to whatever it returned (the quantize pass decides).
- Narrower weights for chosen nodes (``weight_bits`` {node: b}, b in 2..7; the allocation's
  strength ``DYNAMIC_NARROW``, the quantize option ``dynamic_weight_bits``): after the tool, such a node's
  int8 weight becomes ``W ~ s_n q`` per column ``n`` with ``|q| <= 2^(b-1) - 1``, ``s_n = max_k |W_kn|
  / (2^(b-1) - 1)``, stored in ``n b / 8`` bytes (``weight_storage.store_narrow``, decoded to int8 by a
  constant subgraph onnxruntime folds at load) and its scale ``s_W`` becomes the vector ``s_n`` (the
  fused ``DynamicQuantizeMatMul`` takes a per-column scale). The same integer kernel runs: measured
  on a 4-block ViT-S-width encoder, 15.2 ms per-column against 15.4 ms per tensor (fp32 32.8 ms).
  Full 8-bit per-column weights are not offered: on AVX2 without VNNI the u8 x s8 kernel saturates
  on full-range columns (cosine 0.9972 per column against 0.9992 per tensor there); below 8 bits
  (``|q| <= 63``) a pair of products cannot saturate. Measured there, every MatMul at 6 bits:
  cosine 0.9949 (5 bits 0.9866, 4 bits 0.927): the allocation picks it per unit by loss per byte.
"""

from __future__ import annotations

__all__ = ["MATMUL_SHARE", "dynamic_graph", "dynamic_lstm", "dynamic_matmuls", "dynamic_quantize", "judge_trial",
           "lstm_nodes", "matmul_share", "narrow_weights", "narrow_columns", "try_dynamic"]

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.convert import fill_placeholders, graph_to_model, model_to_graph, write_graph
from onnxshrink.graph.cost import model_cost
from onnxshrink.model import VIA_FILE_BYTES, kept_written
from onnxshrink.passes.quantize.weight_storage import int8_channels, store_narrow
from onnxshrink.targets.rewrites import gemm_to_matmul

MATMUL_SHARE = 0.5  # auto: at least this share of the MACs in MatMul/Gemm with constant weights
DYNAMIC_OPS = ("MatMul", "Attention")


def matmul_share(model: onnx.ModelProto, input_shapes: dict | None = None) -> float:
    """The share of the model's MACs in MatMul/Gemm nodes whose weight (input 1) is an initializer."""
    cost = model_cost(model, input_shapes)
    total = sum(cost["per_node"].values())
    if not total:
        return 0.0
    inits = {t.name for t in model.graph.initializer}
    weighted = {n.name for n in model.graph.node
                if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits}
    return sum(m for name, m in cost["per_node"].items() if name in weighted) / total


def dynamic_quantize(model: onnx.ModelProto, exclude: list | None = None,
                     include: list | None = None, weight_bits: dict | None = None) -> onnx.ModelProto:
    """``dynamic_graph``'s model (with ``model``'s metadata)."""
    return graph_to_model(dynamic_graph(model, exclude, include, weight_bits), model)


def dynamic_graph(model: onnx.ModelProto, exclude: list | None = None,
                  include: list | None = None, weight_bits: dict | None = None) -> gs.Graph:
    """onnxruntime's ``quantize_dynamic`` (int8 weights, uint8 activations quantized at run time) of
    the MatMul and Attention nodes of ``model``, after Gemm with constant weights became MatMul;
    with ``include``, of those nodes only (a Gemm by its own name); ``weight_bits``: {node: bits}
    whose weights are then narrowed (``narrow_weights``). The tool's output as a graph whose
    constants the tool did not read share ``model``'s values (no copy: a 2 GiB embedding table is
    neither handed to the tool nor copied back)."""
    graph = model_to_graph(model)
    gemms = {n.name for n in graph.nodes if n.op == "Gemm"}
    if gemm_to_matmul(graph, constant_weights_only=True):
        graph.cleanup().toposort()
    names = {n.name for n in graph.nodes}
    # gemm_to_matmul names the MatMul of Gemm G "G_matmul"
    def renamed(n):
        return n + "_matmul" if n in gemms and n + "_matmul" in names else n
    only = None if include is None else [renamed(n) for n in include]
    if only is not None and not only:  # the tool reads an empty list as "every node"
        return model_to_graph(model)
    with tempfile.TemporaryDirectory(prefix="onnxshrink_dynamic_in_") as d:
        # the tool reads the model from a file, written from the graph without a whole export in memory
        # (given a proto it serializes and reloads it beside ours; ViT-S width: -40 MB of peak RSS), and
        # only the weights it quantizes with their data: the other big constants (embedding tables) are
        # placeholders, given back after (a 2 GiB table: the tool failed to serialize its output)
        src = Path(d) / "model.onnx"
        write_graph(graph, src, model, weights_of={t.name for n in graph.nodes if n.op in DYNAMIC_OPS
                                                   for t in n.inputs if isinstance(t, gs.Constant)})
        out = model_to_graph(_ort_quantize_dynamic(src, list(DYNAMIC_OPS), exclude, only))
    fill_placeholders(out, graph)
    if weight_bits:
        narrow_weights(out, graph, {renamed(n): int(b) for n, b in weight_bits.items()})
    return out


def dynamic_matmuls(graph: gs.Graph) -> int:
    """How many MatMuls of ``graph`` run dynamic int8 (``MatMulInteger``, or fused ``DynamicQuantizeMatMul``)."""
    return sum(1 for n in graph.nodes if n.op in ("MatMulInteger", "DynamicQuantizeMatMul"))


def _ort_quantize_dynamic(model: onnx.ModelProto | Path, op_types: list, exclude: list | None,
                          only: list | None) -> onnx.ModelProto:
    """onnxruntime's ``quantize_dynamic`` of the nodes of ``op_types`` (int8 weights per tensor, uint8
    activations quantized at run time), but ``exclude``, or ``only`` those when given."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # the tool logs "consider pre-processing" on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="onnxshrink_dynamic_") as d:
            out = Path(d) / "dynamic.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=op_types, per_channel=False, reduce_range=False,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude or []),
                             nodes_to_quantize=only)
            return onnx.load(str(out))
    finally:  # the caller's logging as it was
        root.setLevel(level)


def lstm_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's LSTM nodes whose weights W and R are initializers (what
    ``DynamicQuantizeLSTM`` takes)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "LSTM" and (n.domain or "") in ("", "ai.onnx") and len(n.input) > 2
            and n.input[1] in inits and n.input[2] in inits]


def dynamic_lstm(model: onnx.ModelProto, exclude: list | None = None) -> onnx.ModelProto:
    """``model`` with its LSTMs (``lstm_nodes``, but ``exclude``) as onnxruntime's contrib
    ``DynamicQuantizeLSTM``, written by onnxruntime's own ``quantize_dynamic``: the input and
    recurrent weights W, R int8 (``W ~ s_W W_q``), and at every step the gate products
    ``x_t W^T`` and ``h_(t-1) R^T`` run as integer GEMMs with the activations quantized at run time;
    the gates, cell and hidden states stay float. Other nodes (Q/DQ, stored weights) are left as
    they are. Measured on a CRNN (conv + bidirectional LSTM, hidden 256): 2.07x fp32 with its
    convolutions static int8, against 1.46x with the LSTM float; cosine 0.9981 against 0.9985."""
    names = [n for n in lstm_nodes(model) if n not in set(exclude or [])]
    if not names:
        return model
    return _ort_quantize_dynamic(model, ["LSTM"], exclude, names)


def narrow_columns(W: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N], s float32 [N]): ``W ~ q s`` per column, symmetric at ``bits`` bits."""
    Q, s = int8_channels(W, W.ndim - 1, qmax=(1 << (bits - 1)) - 1)
    return Q, s.reshape(-1)


def narrow_weights(qg: gs.Graph, float_graph: gs.Graph, bits: dict) -> None:
    """Store the weight of each MatMul node of ``bits`` ({node: b}) in ``qg`` (``quantize_dynamic``'s
    output of ``float_graph``) per column at b bits, in place (module docstring). A node the tool did
    not quantize, or whose int8 weight another node shares, keeps its int8 weight."""
    floats = {t.name: t for t in float_graph.tensors().values() if isinstance(t, gs.Constant)}
    users: dict = {}
    for node in qg.nodes:
        if node.op == "MatMulInteger":
            users.setdefault(node.inputs[1].name, []).append(node)
    scale_mul = {n.name: n for n in qg.nodes if n.op == "Mul"}
    done = 0
    for node in list(qg.nodes):
        if node.op != "MatMulInteger" or not node.name.endswith("_quant"):
            continue
        b = bits.get(node.name[:-len("_quant")])
        w = node.inputs[1]
        base = w.name[:-len("_quantized")] if w.name.endswith("_quantized") else None
        mul = scale_mul.get(node.name + "_scales_mul")
        if (not b or base not in floats or len(users.get(w.name, [])) != 1 or mul is None
                or not isinstance(w, gs.Constant)):
            continue
        W = np.asarray(floats[base].values, dtype=np.float32)
        if W.ndim != 2 or W.shape != tuple(w.shape):
            continue
        Q, s = narrow_columns(W, b)
        node.inputs[1] = store_narrow(qg, Q, b, base)
        mul.inputs[1] = gs.Constant(f"{base}_scale_b{b}", s.astype(np.float32))
        done += 1
    if done:
        qg.cleanup().toposort()


def try_dynamic(model_f: onnx.ModelProto, options, check, sample: dict, stats: dict, ctx):
    """The ``auto`` trial: the dynamic model of the float model ``model_f`` when it holds ``check``'s
    floor and is clearly ``options.min_speedup`` faster than ``model_f`` on ``sample`` (timed by
    ``ctx.compare_speeds``), else None; ``stats["dynamic"]`` says what was measured either way."""
    share = matmul_share(model_f, {k: list(v.shape) for k, v in sample.items()})
    trial = stats["dynamic"] = {"matmul_share": round(share, 3)}
    if share < MATMUL_SHARE:
        trial["chosen"] = False
        trial["reason"] = (f"{share:.0%} of the MACs in MatMul/Gemm with constant weights (dynamic is tried from "
                           f"{MATMUL_SHARE:.0%})")
        return None
    # as the pass will return it (its graph, exported): the model timed is then the model the manager gets
    qm = ctx.to_model(dynamic_graph(model_f, options.exclude))
    if not judge_trial(trial, qm, model_f, check, sample, ctx, options.min_speedup, "fp32"):
        return None
    trial["reason"] += ": static QDQ not tried"
    return qm


def judge_trial(trial: dict, candidate: onnx.ModelProto, base, check, sample: dict, ctx, threshold: float,
                than: str) -> bool:
    """Whether ``candidate`` holds ``check``'s floor and is clearly ``threshold`` times faster than
    ``base`` on ``sample`` (``ctx.compare_speeds``); its cosine, speed, verdict (``chosen``) and the
    reason go into ``trial``, the reason naming the base as ``than``. The decision of both dynamic
    trials: the MatMul one against fp32, the LSTM one against the result without it."""
    with kept_written(candidate, VIA_FILE_BYTES), kept_written(base, VIA_FILE_BYTES):
        fid = check.measure(candidate)  # a big model written once for both
        cmp = ctx.compare_speeds(base, [candidate], sample, (("faster", threshold),))[0]
    holds, faster = check.holds(fid), cmp.faster_than(threshold)
    interval = f"95 % interval {cmp.low:.2f}-{cmp.high:.2f}x"
    trial.update(cosine=round(fid.get("cosine", 0.0), 6), speed=cmp.as_dict(), chosen=holds and faster)
    if trial["chosen"]:
        trial["reason"] = (f"holds the floor (cosine {fid.get('cosine', 0.0):.4f}) at {cmp.speedup:.2f}x {than} "
                           f"({interval})")
    else:
        trial["reason"] = ("misses the fidelity floor" if not holds else
                           f"not clearly faster than {than} ({cmp.speedup:.2f}x, {interval})")
    return trial["chosen"]
