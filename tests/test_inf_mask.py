"""Infinities in the inputs: a ``-inf`` additive attention mask is a normal transformer input.

NaN is refused (tests/test_data.py); infinities are accepted unless they make the original
model's outputs non-finite (then exit 3 naming the input and the sample). onnx's own
``test_attention_4d_softcap_neginf_mask`` case (fused Attention-23 and its expanded form) and a
small masked-attention model with weights go through cleanup and quantize via the Python API.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.errors import InputError
from onnxshrink.metrics import fidelity
from tests.helpers import run_ort

N, D = 6, 16


def _onnx_case(name: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        return next(c for c in collect_testcases() if c.name == name)


def _causal_mask(n: int = N) -> np.ndarray:
    return np.triu(np.full((n, n), -np.inf, np.float32), k=1)


def masked_attention(seed: int = 0) -> onnx.ModelProto:
    """One-head attention with weights and an additive mask input:
    y = softmax(x Wq (x Wk)^T / sqrt(D) + attn_mask) x Wv Wo."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), f"W{k}")
             for k in "qkvo"]
    inits.append(numpy_helper.from_array(np.array(np.sqrt(D), np.float32), "scale"))
    nodes = [helper.make_node("MatMul", ["x", f"W{k}"], [k]) for k in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Div", ["s", "scale"], ["ss"]),
              helper.make_node("Add", ["ss", "attn_mask"], ["sm"]),
              helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o"]),
              helper.make_node("MatMul", ["o", "Wo"], ["y"])]
    g = helper.make_graph(nodes, "masked_attention",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N, D]),
                           helper.make_tensor_value_info("attn_mask", TensorProto.FLOAT, [N, N])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _samples(n: int = 16, mask: np.ndarray | None = None) -> list[dict]:
    rng = np.random.default_rng(1)
    mask = _causal_mask() if mask is None else mask
    return [{"x": rng.standard_normal((1, N, D)).astype(np.float32), "attn_mask": mask} for _ in range(n)]


@pytest.mark.parametrize("case", ["test_attention_4d_softcap_neginf_mask",
                                  "test_attention_4d_softcap_neginf_mask_expanded"])
def test_onnx_neginf_mask_case_cleanup(case):
    c = _onnx_case(case)
    names = [i.name for i in c.model.graph.input]
    given = dict(zip(names, c.data_sets[0][0]))
    assert np.isneginf(given["attn_mask"]).any()
    rng = np.random.default_rng(0)
    samples = [given] + [{k: (a if k == "attn_mask" else rng.random(a.shape).astype(a.dtype))
                          for k, a in given.items()} for _ in range(11)]
    model, report = onnxshrink.optimize(c.model, None, passes=["cleanup"], data=samples)
    fused = len(c.model.graph.node) == 1
    assert report.passes[0].status == ("not applicable" if fused else "applied"), report.passes[0]
    assert len(model.graph.node) == (1 if fused else 25)
    assert report.fidelity["cosine"] > 0.99999
    got = run_ort(model, given)[0]
    np.testing.assert_allclose(got, c.data_sets[0][1][0], rtol=1e-4, atol=1e-5)
    # quantize refuses the model for what it is (no weights at all), not for its -inf mask
    with pytest.raises(InputError, match="no float Conv/MatMul/Gemm weights"):
        onnxshrink.optimize(c.model, None, passes=["cleanup", "quantize"], data=samples)


def test_masked_attention_cleanup_quantize():
    m = masked_attention()
    samples = _samples()
    # guard off: int8 activations even where they are not faster on this CPU, so the QDQ placement runs
    model, report = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"guard": False}}], data=samples,
                                        budget="cosine>=0.99")
    status = {p.name: p.status for p in report.passes}
    assert status["quantize"] == "applied", report.passes[-1]
    assert report.fidelity["cosine"] >= 0.99
    ref = run_ort(m, samples[3])[0]
    out = run_ort(model, samples[3], optimize=True)[0]
    assert np.isfinite(out).all()
    assert fidelity([[ref]], [[out]])["cosine"] >= 0.99
    # the mask reaches the Add unquantized: a QuantizeLinear would saturate -inf to a finite logit
    q_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert {"x", "q", "s"} <= q_inputs and "attn_mask" not in q_inputs


def test_infinite_mask_breaking_the_reference_is_refused():
    mask = _causal_mask()
    mask[2, :] = -np.inf  # a fully masked row: softmax of all -inf is NaN
    samples = _samples(16)
    samples[5] = {"x": samples[5]["x"], "attn_mask": mask}  # a selection sample (of every 4, the 2nd)
    with pytest.raises(InputError, match=r"^sample 5: input 'attn_mask' contains infinities and the original "
                                         r"model's outputs on this sample are not finite"):
        onnxshrink.optimize(masked_attention(), None, passes=["cleanup"], data=samples)


def test_metrics_with_infinite_inputs():
    """The metrics compare outputs; infinite inputs reach a user metric as they are."""
    samples = _samples(4)
    m = masked_attention()
    ref = [run_ort(m, s) for s in samples]
    seen = []
    res = fidelity(ref, ref, lambda outs, smp: seen.append(np.isneginf(smp[0]["attn_mask"]).sum()) or 1.0, samples)
    assert res["cosine"] == pytest.approx(1.0) and res["max_abs"] == 0.0 and res["user"] == 1.0
    assert seen == [N * (N - 1) // 2]
