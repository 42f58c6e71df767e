"""Weight-only block-wise int4/int8 quantization of MatMul (and Gemm) for transformer models.

onnxruntime's own tool does the quantization: ``onnxruntime.quantization.matmul_nbits_quantizer``
(``MatMulNBitsQuantizer``) replaces ``MatMul(x, W)`` with a constant ``W [K, N]`` by the contrib op
``MatMulNBits``: along ``K`` each block of ``B`` weights of a column gets its own scale (and zero
point when asymmetric), ``W[k, n] ~ s[b, n] (q[k, n] - z[b, n])`` with ``b = k // B`` and ``q`` 4 or
8 bits; activations stay float (``accuracy_level`` 4 lets the CPU kernel compute in int8).
Its default algorithm (block-wise round to nearest, C++ kernels) is used as it is (the tool's GPTQ
needs torch); this module only adds what the tool does not do:

- ``Gemm(A, B, C)`` with ``transA = 0`` and a constant ``B`` is rewritten first (exactly) as
  ``MatMul(A, alpha op(B))`` plus ``Add(beta C)`` so the tool sees it (it only handles MatMul).
- Block size chosen from the calibration samples (``block_size = 0``): of 128, 64 and 32, the one
  with the smallest file among those whose mean cosine against the float model on up to 8
  calibration samples reaches ``min_cosine``, else the most faithful one. Larger blocks store fewer
  scales, but a block longer than a weight's K is padded (transformer_block: K = 64, so 32 gives
  0.22x of fp32 and 128 gives 0.29x), so the sizes are measured, not assumed.
"""

from __future__ import annotations

__all__ = ["weight_only_quantize", "run_weights_only"]

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError
from onnxshrink.passes.quantize.calibrate import CalibrationSamples
from onnxshrink.targets.rewrites import gemm_to_matmul

BLOCK_SIZES = (128, 64, 32)


def weight_only_quantize(model: onnx.ModelProto, bits: int = 4, block_size: int = 128, symmetric: bool = False,
                         accuracy_level: int | None = None, exclude: list | None = None) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer`` of onnxruntime on ``model`` (MatMul with constant 2-D weights)."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    except ImportError as e:  # it imports onnx_ir, which onnxruntime does not install
        raise InputError(f"weights_only needs onnxruntime's MatMulNBits quantizer, which failed to import "
                         f"({e}); pip install onnx-ir") from e
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                           accuracy_level=accuracy_level, bits=bits)
    m = onnx.ModelProto()
    m.CopyFrom(model)  # the tool rewrites the model it is given in place
    q = mnq.MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=list(exclude or []),
                                 algo_config=cfg)
    q.process()
    return q.model.model


def run_weights_only(graph: gs.Graph, o, ctx, stats: dict):
    """The ``weights_only`` mode of the quantize pass: returns (graph, modified, stats)."""
    from onnxshrink.graph.convert import model_to_graph
    from onnxshrink.metrics import fidelity
    from onnxshrink.runtime import make_session
    bits = {"int4": 4, "int8": 8}[o.weights_only]
    stats["scheme"] = {"weights": f"int{bits} block-wise (MatMulNBits)", "activations": "float"}
    stats["gemm_to_matmul"] = gemm_to_matmul(graph, constant_weights_only=True)
    if stats["gemm_to_matmul"]:
        graph.cleanup().toposort()
    n_mm = sum(1 for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2 and
               isinstance(n.inputs[1], gs.Constant) and np.asarray(n.inputs[1].values).ndim == 2)
    if not n_mm:
        raise InputError("weights_only: the model has no MatMul/Gemm with constant 2-D float weights")
    model_f = ctx.to_model(graph)
    source = CalibrationSamples(ctx.calib, ctx.val)
    samples = list(source.take(8)) if source.source is not None else []
    sizes = [o.block_size] if o.block_size else list(BLOCK_SIZES)
    acc = o.accuracy_level or None
    ref = None
    if samples and len(sizes) > 1:
        sess = make_session(model_f, optimize=False)
        ref = [sess.run(None, s) for s in samples]
    tried = []
    for bs in sizes:
        qm = weight_only_quantize(model_f, bits, bs, o.symmetric, acc, o.exclude)
        fid = None
        if ref is not None:
            sess = make_session(qm, optimize=True)
            fid = fidelity(ref, [sess.run(None, s) for s in samples])
        tried.append((bs, qm, fid, qm.ByteSize()))
    ok = [t for t in tried if t[2] is None or t[2].get("cosine", 0.0) >= o.min_cosine]
    bs, qm, fid, _ = min(ok, key=lambda t: t[3]) if ok else max(tried, key=lambda t: t[2].get("cosine", 0.0))
    stats["block_size"] = bs
    stats["block_search"] = [{"block_size": b, "cosine": round(f.get("cosine", 0.0), 6) if f else None, "bytes": n}
                             for b, _, f, n in tried]
    stats["matmul_nbits"] = sum(1 for n in qm.graph.node if n.op_type == "MatMulNBits")
    stats["of_matmuls"] = n_mm
    return model_to_graph(qm), stats["matmul_nbits"] > 0, stats
