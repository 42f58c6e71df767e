"""Canonicalization before quantization: float16/bfloat16 compute upcast to float32
(graph/precision.upcast_low_float: quantized weights get float32 scales and the kept-float parts
compute in float32, as the CPU's kernels do; the only non-lossless step, and only on half-precision
models), then lossless: Constant nodes to initializers, constant
subgraphs folded, hard-swish and hard-sigmoid chains fused into HardSigmoid (cleanup's step, for a run
of quantize without cleanup), BatchNormalization and scalar/per-channel Mul/Div/Add/Sub folded into the
preceding Conv/ConvTranspose/Gemm (cleanup's affine fold, the one implementation, which follows
ONNX's right-aligned broadcasting), optionally ``Div`` by a constant turned into ``Mul``, every
node named."""

from __future__ import annotations

__all__ = ["prepare_float_graph"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.fresh import FreshNames
from onnxshrink.graph.precision import upcast_low_float
from onnxshrink.graph.values import constant_value
from onnxshrink.passes.cleanup.activations import fuse_hard_activations, target_takes_hard_sigmoid
from onnxshrink.passes.cleanup.affine import fold_into_preceding_linear
from onnxshrink.passes.cleanup.constants import constants_to_initializers


def prepare_float_graph(graph: gs.Graph, div_to_mul: bool = False, target=None) -> dict:
    """Canonicalization the quantizer needs (module doc), in place; returns counts. Hard-sigmoid
    chains are fused into HardSigmoid unless ``target``'s preparation decomposes it
    (``activations.target_takes_hard_sigmoid``)."""
    up = upcast_low_float(graph)
    n = constants_to_initializers(graph)
    stats = {"constants_to_initializers": n}
    if any(up.values()):
        stats["upcast_from_float16"] = up
    if n:
        graph.cleanup()
    try:
        graph.fold_constants(error_ok=True).cleanup()
    except Exception:
        pass
    if not div_to_mul and target_takes_hard_sigmoid(target):  # div_to_mul keeps the chain for its Add/Mul units
        fused = fuse_hard_activations(graph, graph, FreshNames(graph))  # before the folds split the chain
        if fused:
            stats["hard_activations_fused"] = fused
            graph.cleanup()
    folded = fold_into_preceding_linear(graph)
    stats["folded_into_conv"] = sum(folded.values())
    if stats["folded_into_conv"]:
        graph.cleanup()
    if div_to_mul:
        stats["div_to_mul"] = _div_to_mul(graph)
    seen = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}"
        seen.add(node.name)
    graph.toposort()
    return stats


def _div_to_mul(graph: gs.Graph) -> int:
    """``Div(x, c)`` by a float constant becomes ``Mul(x, 1/c)`` (one rounding apart), which has an
    integer kernel (QLinearMul) where Div has none: hard-swish ``x * clip(x + 3, 0, 6) / 6`` then
    runs on integers end to end."""
    n = 0
    for node in graph.nodes:
        if node.op != "Div" or len(node.inputs) != 2:
            continue
        c = constant_value(node.inputs[1])
        if c is None or c.dtype != np.float32 or c.size > 4096 or not np.all(np.isfinite(c)) or np.any(c == 0):
            continue
        node.op = "Mul"
        node.inputs[1] = gs.Constant((node.inputs[1].name or "c") + f"_reciprocal{n}",
                                     np.asarray(1.0 / c, dtype=np.float32))
        n += 1
    return n
