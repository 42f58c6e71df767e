"""sparsify: magnitude (unstructured) pruning of Conv / ConvTranspose / Gemm / MatMul weights.

Per layer, weights with |w| <= t become exactly zero, where (Han et al., 2015, "Learning both
Weights and Connections")
    t = q * std(W)                         (method=std; q is the quality parameter), or
    t = the s-quantile of |W|              (method=sparsity; s = target fraction of zeros).
Biases and layers smaller than ``min_size`` are left dense. Zeros alone do not make a dense
kernel faster; they make the file compress, and ``sparse_storage`` stores such weights as ONNX
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

__all__ = ["SparsifyPass", "sparse_storage", "sparse_nbytes"]

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxshrink.graph.values import constant_value
from onnxshrink.passes.base import Context, Pass, PassResult, register

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class SparsifyOptions:
    method: Literal["std", "sparsity"] = field(default="std", metadata={
        "help": "std: threshold = q x std of the layer's weights (Han et al. 2015); sparsity: zero the smallest `sparsity` fraction"})
    q: float = field(default=0.5, metadata={"help": "quality parameter of method=std (threshold in standard deviations)"})
    sparsity: float = field(default=0.5, metadata={"help": "fraction of each layer's weights set to zero (method=sparsity)"})
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
        return None if o.sparsity * 0.6 < 0.05 else SparsifyPass(dataclasses.replace(o, sparsity=round(o.sparsity * 0.6, 4)))

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
            return PassResult(graph, False, {"reason": "no weights to sparsify"})
        graph.cleanup()
        return PassResult(graph, True, {"layers": layers, "weights": total, "zeros": zeros,
                                        "sparsity": round(zeros / max(total, 1), 4), "storage": o.storage,
                                        "min_size": o.min_size})


def _index_dtype(size: int):
    return np.int64  # the ONNX checker accepts only INT64 sparse indices


def sparse_nbytes(w: np.ndarray) -> int:
    """Bytes of ``w`` stored as a COO sparse tensor (values + int64 linear indices)."""
    nnz = int(np.count_nonzero(w))
    return nnz * w.dtype.itemsize + nnz * np.dtype(_index_dtype(w.size)).itemsize


def sparse_storage(model: onnx.ModelProto, min_size: int = 4096, check: bool = True,
                   feeds: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` whose float initializers with at least ``min_size`` elements are stored
    as sparse initializers when that is smaller. With ``check``, onnxruntime must load the result
    (and, given ``feeds``, produce the same outputs); otherwise the dense model is returned.
    Returns (model, info) with info = {'converted', 'dense_bytes', 'sparse_bytes', 'loaded'}."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep, sparse = [], []
    dense_b = sparse_b = 0
    for t in g.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) \
                or t.data_location == onnx.TensorProto.EXTERNAL:
            keep.append(t)
            continue
        w = numpy_helper.to_array(t)
        if w.size < min_size or sparse_nbytes(w) >= w.nbytes:
            keep.append(t)
            continue
        flat = w.ravel()
        idx = np.nonzero(flat)[0]
        vals = numpy_helper.from_array(flat[idx].astype(w.dtype), t.name)
        ind = numpy_helper.from_array(idx.astype(_index_dtype(w.size)), t.name + "_indices")
        sparse.append(onnx.helper.make_sparse_tensor(vals, ind, list(w.shape)))
        dense_b += w.nbytes
        sparse_b += sparse_nbytes(w)
    info = {"converted": len(sparse), "dense_bytes": dense_b, "sparse_bytes": sparse_b, "loaded": None}
    if not sparse:
        return model, info
    del g.initializer[:]
    g.initializer.extend(keep)
    g.sparse_initializer.extend(sparse)
    if check:
        from onnxshrink.runtime import make_session
        try:
            sess = make_session(m, optimize=False)
            if feeds is not None:
                ref = make_session(model, optimize=False).run(None, feeds)
                out = sess.run(None, feeds)
                if not all(np.array_equal(a, b) for a, b in zip(ref, out)):
                    raise RuntimeError("outputs differ")
            info["loaded"] = True
        except Exception as e:
            info["loaded"] = False
            info["error"] = str(e)[:200]
            return model, info
    return m, info
