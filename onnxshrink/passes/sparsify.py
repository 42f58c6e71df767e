"""sparsify: magnitude (unstructured) pruning of Conv / ConvTranspose / Gemm / MatMul weights.

Per layer, weights with |w| <= t become exactly zero, where (Han et al., 2015, "Learning both
Weights and Connections")
    t = q * std(W)                         (method=std; q is the quality parameter), or
    t = the s-quantile of |W|              (method=sparsity; s = target fraction of zeros).
Biases and layers smaller than ``min_size`` are left dense. Zeros alone do not make a dense
kernel faster; they make the file compress, and ``onnxshrink.sparse_storage`` stores such weights as ONNX
sparse initializers (COO: the nonzero values plus their linear indices, int64 as the ONNX
checker requires, so 12 bytes per nonzero float: smaller below 1/3 density) when that is
smaller than the dense tensor and onnxruntime loads the result with identical outputs, else
keeps them dense. (onnxruntime would also load int16/int32 indices, but the checker rejects them.
ONNX shape inference types a sparse initializer as a sparse tensor, so the result passes
``onnx.checker.check_model`` but not its ``full_check``; onnxruntime densifies it at load.)

The pass itself works on onnx-graphsurgeon graphs, which have no sparse initializers; with
``storage=sparse`` (default) its stats say so and ``onnxshrink.optimize(..., output)`` saves
through ``model.save(..., sparse_initializers=True)``, which applies ``sparse_storage`` (with the
onnxruntime load check) to the file only: the returned in-memory model stays dense.
What onnxruntime 1.32 accepts (checked): COO sparse initializers with int64 linear indices
(shape [nnz]) or int64 coordinate indices ([nnz, rank]); float32/float16 values; it densifies
them at session creation, so latency and outputs are those of the dense model.
"""

from __future__ import annotations

__all__ = ["SparsifyPass"]

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import constant_value
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class SparsifyOptions:
    method: Literal["std", "sparsity"] = field(default="std", metadata={
        "help": "std: threshold = q x std of the layer's weights (Han et al. 2015); "
                "sparsity: zero the smallest `sparsity` fraction"})
    q: float = field(default=0.5, metadata={
        "help": "quality parameter of method=std (threshold in standard deviations)"})
    sparsity: float = field(default=0.5, metadata={
        "help": "fraction of each layer's weights set to zero (method=sparsity)"})
    min_size: int = field(default=4096, metadata={"help": "leave weights with fewer elements dense"})
    storage: Literal["sparse", "dense"] = field(default="sparse", metadata={
        "help": "sparse: the saved file stores the zeroed weights as ONNX sparse initializers where that is smaller "
                "and onnxruntime loads the result with identical outputs; dense: plain initializers"})


@register
class SparsifyPass(Pass):
    name = "sparsify"
    summary = "magnitude pruning: zero each layer's smallest weights (q x std threshold or target sparsity)"
    lossless = False
    needs_data = False
    Options = SparsifyOptions

    def weaker(self):
        o = self.options
        if o.method == "std":
            return None if o.q * 0.6 < 0.05 else SparsifyPass(dataclasses.replace(o, q=round(o.q * 0.6, 4)))
        return None if o.sparsity * 0.6 < 0.05 else SparsifyPass(
            dataclasses.replace(o, sparsity=round(o.sparsity * 0.6, 4)))

    def describe_strength(self) -> str:
        o = self.options
        return f"q={o.q:g}" if o.method == "std" else f"sparsity={o.sparsity:g}"

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        layers = []
        done = {}
        total = zeros = 0
        for n in graph.nodes:
            slot = _WEIGHT_OPS.get(n.op)
            if slot is None or len(n.inputs) <= slot:
                continue
            t = n.inputs[slot]
            w = constant_value(t, numeric_attrs=True)
            if w is None or w.dtype.kind != "f" or w.size < o.min_size:
                continue
            if t.name in done:
                continue
            a = np.abs(w.astype(np.float64))
            if o.method == "std":
                thr = o.q * float(np.std(w.astype(np.float64)))
            else:
                k = int(np.floor(o.sparsity * w.size))
                thr = float(np.partition(a.ravel(), k - 1)[k - 1]) if k > 0 else -1.0
            mask = a <= thr
            before = int((w == 0).sum())
            if int(mask.sum()) <= before:
                continue
            new = np.where(mask, 0, w).astype(w.dtype)
            c = gs.Constant(f"{t.name}_sparse", new)
            for consumer in list(t.outputs):
                for i, inp in enumerate(consumer.inputs):
                    if inp is t:
                        consumer.inputs[i] = c
            done[t.name] = c
            z = int((new == 0).sum())
            total += w.size
            zeros += z
            layers.append({"node": n.name, "size": int(w.size), "threshold": thr, "sparsity": round(z / w.size, 4)})
        if not layers:
            return PassResult(graph, False, reason="no weights to sparsify")
        graph.cleanup()
        return PassResult(graph, True, {"layers": layers, "weights": total, "zeros": zeros,
                                        "sparsity": round(zeros / max(total, 1), 4), "storage": o.storage,
                                        "min_size": o.min_size})
