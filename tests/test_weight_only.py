"""Weight-only block-wise int4/int8 (onnxruntime's MatMulNBits quantizer) through the quantize pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

pytest.importorskip("onnx_ir")  # onnxruntime's matmul_nbits_quantizer imports it

from helpers import assert_outputs_close, run_ort

from models.build import transformer_block
from onnxshrink.metrics import fidelity
from onnxshrink.pipeline.manager import optimize
from onnxshrink.targets.rewrites import gemm_to_matmul

RNG = np.random.default_rng(11)


def _data(n):
    return [{"x": RNG.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(n)]


def test_gemm_to_matmul_is_exact():
    m = transformer_block()
    g = gs.import_onnx(m)
    n = gemm_to_matmul(g, constant_weights_only=True)
    g.cleanup().toposort()
    assert n >= 1 and not any(x.op == "Gemm" for x in g.nodes)
    out = gs.export_onnx(g)
    for f in _data(2):
        assert_outputs_close(run_ort(m, f), run_ort(out, f), 1e-5)


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_weights_only_transformer_block(bits, tmp_path):
    m = transformer_block()
    src = tmp_path / "f.onnx"
    onnx.save(m, src)
    calib, held = _data(8), _data(6)
    out, rep = optimize(str(src), str(tmp_path / "q.onnx"), passes=[{"quantize": {"weights_only": bits}}],
                        data=calib)
    rec = rep.passes[0]
    assert rec.status == "applied", rec.reason
    ops = [n.op_type for n in out.graph.node]
    consts = {t.name for t in out.graph.initializer}
    assert ops.count("MatMulNBits") == rec.stats["of_matmuls"] >= 6  # the 4 projections and the 2 MLP Gemms
    assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in consts for n in out.graph.node)
    # auto block size: the smallest file among the candidates that hold the floor (all do here);
    # K = 64 pads 128-blocks, so 128 is never the smallest
    tried = rec.stats["block_search"]
    assert len(tried) == 3 and len({t["bytes"] for t in tried}) > 1
    assert rec.stats["block_size"] == min(tried, key=lambda t: t["bytes"])["block_size"] != 128
    ratio = (tmp_path / "q.onnx").stat().st_size / src.stat().st_size
    assert ratio < (0.25 if bits == "int4" else 0.35)
    ref = [run_ort(m, f) for f in held]
    got = [run_ort(out, f, optimize=True) for f in held]
    assert fidelity(ref, got)["cosine"] >= (0.98 if bits == "int4" else 0.999)


def test_weights_only_fixed_block_size_and_symmetric():
    out, rep = optimize(transformer_block(), passes=[{"quantize": {"weights_only": "int4", "block_size": 32,
                                                                   "symmetric": True}}], data=_data(4))
    rec = rep.passes[0]
    assert rec.status == "applied" and rec.stats["block_size"] == 32
    nb = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert nb and all(next(a.i for a in n.attribute if a.name == "block_size") == 32 for n in nb)
    assert all(len(n.input) < 4 or not n.input[3] for n in nb)  # symmetric: no zero points
