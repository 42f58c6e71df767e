"""Two-operand Einsums that are batched matrix products become MatMul (``graph/einsum.py``): exact on
random equations, left alone where they are not matrix products, through cleanup, quantize and the
QNN target (whose Einsum builder takes four lowercase patterns only)."""

from __future__ import annotations

import random
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph.einsum import einsum_to_matmul
from onnxshrink.graph.fresh import FreshNames
from onnxshrink.targets.coverage import coverage
from onnxshrink.targets.profiles import get_target
from tests.helpers import einsum_attention, model_samples, run_ort
from tests.test_cleanup import cleanup


def _einsum_model(eq: str, shape_a: list, shape_b: list, weight: np.ndarray | None = None,
                  rank_y: int | None = None, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """x (and w: an input, or the constant ``weight``) -> Einsum(eq) -> y, opset 17."""
    ins = [helper.make_tensor_value_info("x", dtype, shape_a)]
    inits = []
    if weight is None:
        ins.append(helper.make_tensor_value_info("w", dtype, shape_b))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
    rank_y = len(eq.split("->")[1].replace(" ", "")) if rank_y is None else rank_y
    y = helper.make_tensor_value_info("y", dtype, [None] * rank_y)
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "w"], ["y"], equation=eq)], "g", ins, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _rewritten(model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    g = gs.import_onnx(model)
    k = einsum_to_matmul(g, FreshNames(g).fresh)
    g.cleanup().toposort()
    out = gs.export_onnx(g)
    out.opset_import[0].version = 17
    return k, out


def _random_products(n: int, seed: int = 0):
    """``n`` random batched matrix products: letters in random roles (batch, rows, contraction,
    columns; at least one summed), in random order per term, sizes 1-4, the second operand a constant
    in 2 of 5, the first operand's first dimension symbolic in 3 of 10."""
    rng = random.Random(seed)
    made = 0
    while made < n:
        letters = rng.sample("abcdefghij", rng.randint(2, 7))
        roles = {c: rng.choice("bmkn") for c in letters}
        a = [c for c in letters if roles[c] in "bmk"]
        b = [c for c in letters if roles[c] in "bkn"]
        out = [c for c in letters if roles[c] in "bmn"]
        if "k" not in roles.values() or not out:
            continue
        for term in (a, b, out):
            rng.shuffle(term)
        sizes = {c: rng.randint(1, 4) for c in letters}
        eq = f"{''.join(a)},{''.join(b)}->{''.join(out)}"
        shape_a, shape_b = [sizes[c] for c in a], [sizes[c] for c in b]
        weight = np.random.default_rng(made).standard_normal(shape_b).astype(np.float32) \
            if rng.random() < 0.4 else None
        symbolic = rng.random() < 0.3
        made += 1
        yield eq, (["N"] + shape_a[1:] if symbolic else shape_a), shape_a, shape_b, weight


def test_every_random_batched_matrix_product_becomes_an_exact_matmul():
    """150 random equations (batch, row, contraction and column letters in every order and number, a
    constant or a run-time second operand, a symbolic first dimension): every one is rewritten, no
    Einsum is left, the model passes the strict checker and its outputs are the Einsum's."""
    rng = np.random.default_rng(0)
    for eq, declared_a, shape_a, shape_b, weight in _random_products(150):
        model = _einsum_model(eq, declared_a, shape_b, weight)
        k, out = _rewritten(model)
        assert k == 1, eq
        assert "Einsum" not in {n.op_type for n in out.graph.node} and \
            "MatMul" in {n.op_type for n in out.graph.node}, eq
        onnx.checker.check_model(out, full_check=True)
        feeds = {"x": rng.standard_normal(shape_a).astype(np.float32)}
        if weight is None:
            feeds["w"] = rng.standard_normal(shape_b).astype(np.float32)
        ref, got = run_ort(model, feeds)[0], run_ort(out, feeds)[0]
        assert got.shape == ref.shape, eq
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=eq)


@pytest.mark.parametrize("eq, shape_a, shape_b", [
    ("...id,...jd->...ij", [2, 3, 4], [2, 5, 4]),       # ellipsis
    ("bii,bij->bj", [2, 3, 3], [2, 3, 4]),              # a repeated letter: a diagonal
    ("ij,kl->ijkl", [2, 3], [4, 5]),                    # no letter summed: an outer product
    ("ij,jk->i", [2, 3], [3, 4]),                       # a letter of one operand summed away
    ("bxyk,bkn->bxyn", [2, "X", "Y", 3], [2, 3, 4]),    # two unknown sizes in one reshape
])
def test_einsums_that_are_not_matrix_products_stay_einsums(eq, shape_a, shape_b):
    model = _einsum_model(eq, shape_a, shape_b, rank_y=None if "." not in eq else 3)
    k, out = _rewritten(model)
    assert k == 0
    assert [n.op_type for n in out.graph.node] == ["Einsum"]


def test_an_integer_einsum_stays_an_einsum():
    """MatMul has no int8/int16 kernel in onnxruntime: only float Einsums are rewritten."""
    model = _einsum_model("ij,jk->ik", [2, 3], [3, 4], dtype=TensorProto.INT32)
    assert _rewritten(model)[0] == 0


def test_cleanup_writes_maxvit_and_einsum_dense_spellings_as_matmul():
    """A windowed attention block spelled as maxvit exports it (5-D, upper case) between EinsumDense
    projections, with a symbolic batch: cleanup writes all six Einsums as MatMul, the projections'
    weights as constant 2-D (or batched) MatMul weights, and the outputs stay the Einsum's."""
    model = einsum_attention(batch="N")
    res, out = cleanup(model)
    assert res.stats["einsum_to_matmul"] == 6
    ops = [n.op_type for n in out.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") == 6
    inits = {t.name: t for t in out.graph.initializer}
    weighted = [n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weighted) == 4 and sorted(len(inits[n.input[1]].dims) for n in weighted) == [2, 2, 2, 2]
    onnx.checker.check_model(out, full_check=True)
    for feeds in model_samples(model, 3):
        np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_quantize_takes_the_einsum_projections_as_integer_matmuls():
    """Before the rewrite the quantizer found no weights in an Einsum-only block ("the model has no
    float Conv/MatMul/Gemm weights to quantize"); now its four projections are integer units."""
    from onnxshrink.pipeline.manager import optimize
    model = einsum_attention()
    out, rep = optimize(model, passes=["cleanup", {"quantize": {"guard": False, "fallback": "float"}}],
                        data=model_samples(model, 16), budget="none")
    assert rep.passes[1].status == "applied", rep.passes[1].reason
    assert rep.passes[1].stats["quantized_units"]["weighted"] >= 4
    assert "Einsum" not in {n.op_type for n in out.graph.node}


def test_the_qnn_check_refuses_the_einsums_its_builder_refuses():
    """QNN's Einsum builder (onnxruntime ``qnn/builder/opbuilder/einsum_op_builder.cc``) takes four
    lowercase batched-MatMul patterns; the static check said every Einsum was taken (maxvit's
    ``BGHID,BGHJD->BGHIJ`` then failed on the HTP simulator)."""
    qnn = get_target("qnn")
    taken = _einsum_model("bhid,bhjd->bhij", [1, 2, 3, 4], [1, 2, 5, 4])
    assert coverage(taken, qnn)["not_taken"] == 0
    for eq in ("BHID,BHJD->BHIJ", "abc,cd->abd"):
        model = _einsum_model(eq, [1, 2, 3, 4] if len(eq.split(",")[0]) == 4 else [1, 2, 3],
                              [1, 2, 5, 4] if eq.startswith("B") else [3, 4])
        cov = coverage(model, qnn)
        assert cov["not_taken"] == 1 and not cov["accepted"], eq
        assert "Einsum builder takes only lowercase batched-MatMul equations" in cov["unsupported"][0]["reason"]


@pytest.mark.parametrize("eq, shape_a, shape_b, macs", [
    ("bhid,bhjd->bhij", [1, 2, 3, 4], [1, 2, 5, 4], 1 * 2 * 3 * 5 * 4),
    ("...id,...jd->...ij", [2, 3, 4], [2, 5, 4], 2 * 3 * 5 * 4),     # the ellipsis' dimension counted once
    ("bgnc,ce->bgne", [1, 4, 16, 32], [32, 8], 4 * 16 * 32 * 8),
])
def test_an_einsum_counts_its_multiply_adds(eq, shape_a, shape_b, macs):
    """MACs counted nothing for an Einsum: an Einsum-only model read 0 MACs, and --target-macs then
    divided by them (an internal error)."""
    from onnxshrink.graph.cost import model_cost
    model = _einsum_model(eq, shape_a, shape_b, rank_y=None if "." not in eq else 3)
    assert model_cost(model)["macs"] == macs


def test_heads_of_an_einsum_attention_prune_once_cleanup_writes_it_as_matmul():
    """The maxvit/EinsumDense-spelled block: the head analysis finds its 2 heads after cleanup and
    prune removes one (MACs 0.5x), where an Einsum attention had no channel rule."""
    from onnxshrink.pipeline.manager import optimize
    model = einsum_attention()
    out, rep = optimize(model, passes=["cleanup", "prune"], data=model_samples(model, 16), budget="cosine>=0.5",
                        target_macs=0.8)
    prune = rep.passes[1]
    assert prune.status == "applied", prune.reason
    assert re.search(r"heads \[\d\] of 2 removed", prune.reason), prune.reason
    assert rep.after["macs"] <= 0.8 * rep.before["macs"]
