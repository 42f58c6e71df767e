"""Transposes above a target's rank limit written at lower rank (``graph/rank.py``): exact on random
shapes and permutations, and through the target emission (QNN and CoreML take rank 5 at most)."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph.fresh import FreshNames
from onnxshrink.graph.rank import reduce_transpose_rank
from onnxshrink.targets.coverage import coverage
from onnxshrink.targets.prepare import prepare_for_target
from onnxshrink.targets.profiles import get_target
from tests.helpers import model_samples, run_ort, window_partition_block


def _case(rng: random.Random):
    """A random Transpose (rank 3-7, sizes 1-4, size-1 axes likely) read from a graph input, or from
    a Reshape of a flat input, and read by the output, or by a Reshape (with a copied 0 dimension or -1)."""
    r = rng.randint(3, 7)
    shape = [rng.choice([1, 1, 2, 3, 4]) for _ in range(r)]
    perm = list(range(r))
    rng.shuffle(perm)
    before, after = rng.random() < 0.5, rng.random() < 0.5
    nodes, inits, x_shape, src = [], [], shape, "x"
    if before:
        x_shape = [int(np.prod(shape))]
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), "s_in"))
        nodes.append(helper.make_node("Reshape", ["x", "s_in"], ["x_full"]))
        src = "x_full"
    nodes.append(helper.make_node("Transpose", [src], ["t"], perm=perm))
    out = "t"
    if after:
        target = [0, -1] if rng.random() < 0.5 else [shape[perm[0]], -1]
        inits.append(numpy_helper.from_array(np.array(target, np.int64), "s_out"))
        nodes.append(helper.make_node("Reshape", ["t", "s_out"], ["y"]))
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return model, x_shape, shape, perm


def test_a_transpose_at_lower_rank_moves_the_same_elements():
    """300 random Transposes rewritten to rank 2 where they fit: the outputs are bit-identical, and
    every rewritten one needs at most rank 2 (size-1 axes dropped, runs of neighbouring axes merged)."""
    rng = random.Random(0)
    reduced = 0
    for _ in range(300):
        model, x_shape, shape, perm = _case(rng)
        g = gs.import_onnx(model)
        k = reduce_transpose_rank(g, 2, FreshNames(g).fresh)
        g.cleanup().toposort()
        out = gs.export_onnx(g)
        x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
        assert np.array_equal(run_ort(out, {"x": x})[0], run_ort(model, {"x": x})[0]), (shape, perm)
        if k:
            reduced += 1
            t = next(n for n in out.graph.node if n.op_type == "Transpose")
            assert len(t.attribute[0].ints) <= 2, (shape, perm)
    assert reduced > 100  # the corpus exercises the rewrite, not only the cases it declines


def test_a_rank_six_window_partition_fits_the_rank_limit_of_qnn_and_coreml():
    """Swin's window partition (Reshape to 6-D, Transpose, Reshape back, twice): the static checks of
    QNN and CoreML (rank 5 at most) refused its four 6-D tensors; the target's preparation writes the
    Transposes at rank 4 (the size-1 batch axis dropped, the channel run kept whole) and both Reshapes
    around each reshape to that directly, with the same outputs."""
    model = window_partition_block()
    for name in ("qnn", "coreml"):
        profile = get_target(name)
        assert any("rank 6" in u["reason"] for u in coverage(model, profile)["unsupported"])
        prepared, info = prepare_for_target(model, profile)
        assert info["rewrites"]["reduce_transpose_rank"] == 2
        ranks = [len(n.attribute[0].ints) for n in prepared.graph.node if n.op_type == "Transpose"]
        assert ranks == [4, 4]
        assert not any("rank" in u["reason"] for u in coverage(prepared, profile)["unsupported"])
        for feeds in model_samples(model, 2):
            assert np.array_equal(run_ort(prepared, feeds)[0], run_ort(model, feeds)[0])
