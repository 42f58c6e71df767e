"""Structured pruning of transformers: MLP hidden neurons and attention heads of a ViT-style
encoder exported PyTorch-style (models/build.vit_encoder: opset 14 with LayerNorm decomposed, opset
17 with the fused op; GELU as Erf; MatMul + Add projections; Reshape to [B,N,H,D] + Transpose)."""

from __future__ import annotations

import pytest

import onnxshrink
from models.build import smooth_images, vit_encoder
from onnxshrink.runtime import ort_message
from tests.helpers import check

VARIANTS = {"opset14_decomposed": dict(opset=14, layernorm="decomposed"), "opset17_fused": dict(opset=17)}


def _samples(n: int = 16, seed: int = 5) -> list[dict]:
    x = smooth_images(n, (32, 32), seed=seed)
    return [{"pixel_values": x[i:i + 1]} for i in range(n)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vit_mlp_neurons_importance_prune_with_refit(variant):
    """The issue's command on a ViT export: it used to be rolled back with an onnxruntime error (the
    refit of a MatMul sink captured the '_nobias' tensor the bias folding had renamed)."""
    m = vit_encoder(**VARIANTS[variant])
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", {"prune": {"mode": "importance", "ratio": 0.3}}],
                                      data=_samples())
    rec = report.passes[-1]
    assert rec.status == "applied", rec.reason
    fc1 = {g["producers"][0]: g["removed_units"] for g in rec.stats["per_group"]}
    assert fc1["/blocks.0.mlp.fc1/MatMul"] > 0 and fc1["/blocks.1.mlp.fc1/MatMul"] > 0
    refit = {r["node"]: r for r in rec.stats["refit"]["layers"]}
    assert refit["/blocks.0.mlp.fc2/MatMul"]["err_after"] < refit["/blocks.0.mlp.fc2/MatMul"]["err_before"]
    assert rec.stats["refit"]["refit"] >= 2
    check(out)
    assert report.fidelity["cosine"] >= 0.99


def test_ort_message_keeps_the_meaningful_part():
    e = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/graph.cc:1617 void "
                     "onnxruntime::Graph::InitializeStateFromModelFileGraphProto() This is an invalid model. Graph "
                     "output (y_nobias) does not exist in the graph.")
    assert ort_message(e) == "This is an invalid model. Graph output (y_nobias) does not exist in the graph."
    e = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                     "Reshape node. Name:'r' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/"
                     "reshape_helper.h:47 onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, "
                     "onnxruntime::TensorShapeVector&, bool) input_shape_size == size was false.")
    assert ort_message(e) == ("Non-zero status code returned while running Reshape node. Name:'r' Status Message: "
                              "input_shape_size == size was false.")
    assert ort_message(ValueError("")) == "ValueError"
    assert ort_message(ValueError("first\nsecond")) == "first"
