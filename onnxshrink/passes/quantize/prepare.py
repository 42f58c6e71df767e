"""Lossless canonicalization before quantization: Constant nodes to initializers, constant
subgraphs folded, Conv + BatchNorm and Conv + Add(bias) folded, every node named."""

from __future__ import annotations

__all__ = ["prepare_float_graph", "sole_consumer"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def _const_value(t) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def _constants_to_initializers(graph: gs.Graph) -> int:
    """Constant nodes (PaddlePaddle exports hold every weight in one) become initializers."""
    outs = {t.name for t in graph.outputs}
    n = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1 or node.outputs[0].name in outs:
            continue
        attrs = node.attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            val = np.asarray(attrs["value"].values)
        elif "value_float" in attrs:
            val = np.array(attrs["value_float"], np.float32)
        elif "value_floats" in attrs:
            val = np.array(attrs["value_floats"], np.float32)
        elif "value_int" in attrs:
            val = np.array(attrs["value_int"], np.int64)
        elif "value_ints" in attrs:
            val = np.array(attrs["value_ints"], np.int64)
        else:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name + "_c" if out.name else f"const_{n}", val)
        for consumer in list(out.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
        n += 1
    if n:
        graph.cleanup()
    return n


def sole_consumer(t) -> "gs.Node | None":
    return t.outputs[0] if len(t.outputs) == 1 else None


def _fold_conv_affine(graph: gs.Graph) -> int:
    """Fold BatchNormalization and per-channel constant Add into the preceding Conv:
    BN: ``W' = W * g / sqrt(v + eps)``, ``b' = (b - mean) * g / sqrt(v + eps) + beta``;
    Add: ``b' = b + c`` for ``c`` of shape [C], [C,1,1] or [1,C,1,1]."""
    outs = {t.name for t in graph.outputs}
    n = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
            continue
        while True:
            y = conv.outputs[0]
            nxt = sole_consumer(y)
            if nxt is None or y.name in outs:
                break
            W = np.asarray(conv.inputs[1].values).astype(np.float32)
            cout = W.shape[0]
            b = (np.asarray(conv.inputs[2].values).astype(np.float32) if len(conv.inputs) > 2 and
                 isinstance(conv.inputs[2], gs.Constant) else np.zeros(cout, np.float32))
            if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
                break
            if nxt.op == "BatchNormalization" and len(nxt.outputs) == 1 and \
                    all(isinstance(t, gs.Constant) for t in nxt.inputs[1:5]):
                g_, beta, mean, var = (np.asarray(t.values).astype(np.float64) for t in nxt.inputs[1:5])
                f = g_ / np.sqrt(var + float(nxt.attrs.get("epsilon", 1e-5)))
                W2 = (W * f.reshape(-1, *([1] * (W.ndim - 1)))).astype(np.float32)
                b2 = ((b - mean) * f + beta).astype(np.float32)
            elif nxt.op == "Add" and len(nxt.inputs) == 2:
                other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
                c = _const_value(other)
                if c is None or c.dtype.kind != "f" or c.size != cout or \
                        c.ndim not in (1, 3, 4) or c.shape[-3 if c.ndim >= 3 else 0] != cout:
                    break
                if c.ndim == 1 and W.ndim != 3:
                    break  # [C] broadcasts over the last axis (width), not channels
                W2, b2 = W, (b + c.reshape(-1)).astype(np.float32)
            else:
                break
            conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_f", W2)
            bias = gs.Constant((conv.name or "conv") + f"_bias_f{n}", b2)
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias
            else:
                conv.inputs.append(bias)
            z = nxt.outputs[0]
            nxt.outputs.clear()
            conv.outputs[0] = z
            y.inputs.clear()
            n += 1
    if n:
        graph.cleanup()
    return n


def _div_to_mul(graph: gs.Graph) -> int:
    """``Div(x, c)`` by a float constant becomes ``Mul(x, 1/c)`` (one rounding apart), which has an
    integer kernel (QLinearMul) where Div has none: hard-swish ``x * clip(x + 3, 0, 6) / 6`` then
    runs on integers end to end."""
    n = 0
    for node in graph.nodes:
        if node.op != "Div" or len(node.inputs) != 2:
            continue
        c = _const_value(node.inputs[1])
        if c is None or c.dtype != np.float32 or c.size > 4096 or not np.all(np.isfinite(c)) or np.any(c == 0):
            continue
        node.op = "Mul"
        node.inputs[1] = gs.Constant((node.inputs[1].name or "c") + f"_reciprocal{n}", np.asarray(1.0 / c, dtype=np.float32))
        n += 1
    return n


def prepare_float_graph(graph: gs.Graph, div_to_mul: bool = False) -> dict:
    """Lossless canonicalization the quantizer needs: Constant nodes to initializers, constant
    subgraphs folded, Conv+BN and Conv+Add(bias) folded, every node named."""
    stats = {"constants_to_initializers": _constants_to_initializers(graph)}
    try:
        graph.fold_constants(error_ok=True).cleanup()
    except Exception:
        pass
    stats["folded_into_conv"] = _fold_conv_affine(graph)
    if div_to_mul:
        stats["div_to_mul"] = _div_to_mul(graph)
    seen = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}"
        seen.add(node.name)
    graph.toposort()
    return stats
