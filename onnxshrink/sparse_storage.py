"""Sparse-initializer storage (file format): float initializers that are mostly zero stored as
ONNX sparse initializers (COO) where that is smaller, as ``model.save(..., sparse_initializers=True)``
writes them after the ``sparsify`` pass.

A tensor of n elements with nnz nonzeros takes ``nnz * (itemsize + 8)`` bytes sparse (the nonzero
values plus their int64 linear indices, the only index type the ONNX checker accepts), against
``n * itemsize`` dense: for float32, smaller below 1/3 density. onnxruntime densifies sparse
initializers at session creation, so outputs and latency are the dense model's; a conversion is
kept only when onnxruntime loads the result (and, given feeds, gives identical outputs).
"""

from __future__ import annotations

__all__ = ["sparse_storage", "sparse_nbytes", "index_dtype", "unoptimized_session"]

import numpy as np
import onnx
from onnx import numpy_helper


def index_dtype(size: int):
    """The dtype of the COO indices of a tensor of ``size`` elements."""
    return np.int64  # the ONNX checker accepts only INT64 sparse indices


def sparse_nbytes(w: np.ndarray) -> int:
    """Bytes of ``w`` stored as a COO sparse tensor (values + int64 linear indices)."""
    nnz = int(np.count_nonzero(w))
    return nnz * w.dtype.itemsize + nnz * np.dtype(index_dtype(w.size)).itemsize


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
        ind = numpy_helper.from_array(idx.astype(index_dtype(w.size)), t.name + "_indices")
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
        try:
            sess = unoptimized_session(m)
            if feeds is not None:
                ref = unoptimized_session(model).run(None, feeds)
                out = sess.run(None, feeds)
                if not all(np.array_equal(a, b) for a, b in zip(ref, out)):
                    raise RuntimeError("outputs differ")
            info["loaded"] = True
        except Exception as e:
            info["loaded"] = False
            info["error"] = str(e)[:200]
            return model, info
    return m, info


def unoptimized_session(model: onnx.ModelProto):
    """An onnxruntime CPU session on ``model`` (serialized in memory) with graph optimizations off,
    so the check compares the stored graph itself."""
    import onnxruntime as ort  # heavy, and only needed for the load check

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
