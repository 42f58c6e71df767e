"""Structured pruning of transformers: MLP hidden neurons and attention heads of a ViT-style
encoder exported PyTorch-style (models/build.vit_encoder: opset 14 with LayerNorm decomposed, opset
17 with the fused op; GELU as Erf; MatMul + Add projections; Reshape to [B,N,H,D] + Transpose)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import onnxshrink
from models.build import smooth_images, transformer_block, vit_encoder
from onnxshrink.graph.channels import transformer_summary
from onnxshrink.runtime import ort_message
from tests.helpers import check, normal_samples, run_ort
from tests.reliability_helpers import run_cli

VARIANTS = {"opset14_decomposed": dict(opset=14, layernorm="decomposed"), "opset17_fused": dict(opset=17),
            "opset17_fused_qkv": dict(opset=17, qkv="fused"),
            "opset14_sdpa": dict(opset=14, layernorm="decomposed", qkv="fused", attention="sdpa")}


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


def _zero(model, name: str, cols) -> None:
    """Zero columns ``cols`` of the 2-D initializer ``name`` (a 1-D one: those entries), in place."""
    t = next(t for t in model.graph.initializer if t.name == name)
    v = numpy_helper.to_array(t).copy()
    v[..., cols] = 0
    t.CopyFrom(numpy_helper.from_array(v, name))


def _max_rel_err(a: onnx.ModelProto, b: onnx.ModelProto, samples: list) -> float:
    err = 0.0
    for s in samples:
        ra, rb = run_ort(a, s)[0].astype(np.float64), run_ort(b, s)[0].astype(np.float64)
        err = max(err, float(np.max(np.abs(ra - rb)) / np.max(np.abs(ra))))
    return err


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zeroed_heads_and_neurons_are_removed_exactly(variant):
    """A head whose value projection (columns of V, or of the V third of a fused QKV) is zero and MLP
    neurons whose fc1 column and bias are zero contribute nothing: prune (mode zeros) removes them
    (the head's Q, K and V columns, the Reshape constants' head count, the output projection's
    rows; fc1 columns, fc2 rows), max relative error <= 1e-5, the 1/sqrt(D) scale untouched."""
    m = vit_encoder(**VARIANTS[variant])
    dh, v0 = 16, (128 if VARIANTS[variant].get("qkv") == "fused" else 0)   # fused: V after Q and K
    value = "blocks.0.attn.qkv" if v0 else "blocks.0.attn.value"
    _zero(m, f"{value}.weight_t", slice(v0 + 2 * dh, v0 + 3 * dh))      # head 2 of block 0
    _zero(m, f"{value}.bias", slice(v0 + 2 * dh, v0 + 3 * dh))
    _zero(m, "blocks.1.mlp.fc1.weight_t", [3, 50, 51, 200])            # 4 neurons of block 1
    _zero(m, "blocks.1.mlp.fc1.bias", [3, 50, 51, 200])
    samples = _samples(8)
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=samples, budget="none")
    rec = report.passes[-1]
    assert rec.status == "applied", rec.reason
    kinds = {(g["kind"], g["removed_units"]) for g in rec.stats["per_group"]}
    assert kinds == {("heads", 1), ("neurons", 4)}
    assert "/blocks.0.attn/MatMul: heads [2] of 4 removed" in rec.reason
    assert "/blocks.1.mlp.fc1/MatMul: 4 of 256 neurons removed" in rec.reason
    check(out)
    assert _max_rel_err(m, out, samples) <= 1e-5
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    by_shape = sorted(v.shape for k, v in inits.items() if k.startswith("blocks.0.attn.") and v.ndim == 2)
    assert by_shape == ([(48, 64), (64, 144)] if v0 else [(48, 64), (64, 48), (64, 48), (64, 48)])  # proj rows; qkv
    assert [v.shape for k, v in inits.items() if k.startswith("blocks.1.mlp.fc1") and v.ndim == 2] == [(64, 252)]
    specs = [v.tolist() for v in inits.values() if v.dtype == np.int64 and v.ndim == 1 and v.size == (5 if v0 else 4)]
    if v0:
        assert [1, 17, 3, 3, 16] in specs and [1, 17, 3, 4, 16] in specs   # block 0 has 3 heads, block 1 still 4
    else:
        assert [1, 17, 3, 16] in specs and [1, 17, 4, 16] in specs
    scales = [float(v.ravel()[0]) for v in inits.values() if v.size == 1 and v.dtype == np.float32]
    if VARIANTS[variant].get("attention") == "sdpa":                 # sqrt(1/sqrt(D)) into Q and K^T
        assert scales.count(0.5) >= 1
    else:
        assert scales.count(4.0) >= 1                                # sqrt(D) = 4 for both blocks


def test_bundled_transformer_block_head_removed_exactly():
    """models/build.transformer_block: K goes to [B, H, D, N] in one Transpose, MLP as Gemm."""
    m = transformer_block()
    _zero(m, "attn.v_proj.weight", slice(16, 32))   # head 1
    _zero(m, "attn.v_proj.bias", slice(16, 32))
    samples = normal_samples(8, name="x", shape=(1, 16, 64))
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=samples, budget="none")
    rec = report.passes[-1]
    assert rec.status == "applied" and "heads [1] of 4 removed" in rec.reason, rec.reason
    assert _max_rel_err(m, out, samples) <= 1e-5


def test_dynamic_batch_heads_removed_exactly():
    """A dynamic batch: the head split's shape is Concat(x.size(0), x.size(1), [H, D]) at run time;
    Shape nodes that read only the batch and token dims do not block the heads, the [H, D] piece
    is rewritten, and the result runs at another batch size."""
    m = vit_encoder(dynamic_batch=True)
    _zero(m, "blocks.1.attn.value.weight_t", slice(0, 16))   # head 0 of block 1
    _zero(m, "blocks.1.attn.value.bias", slice(0, 16))
    samples = _samples(8)
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=samples, budget="none")
    rec = report.passes[-1]
    assert rec.status == "applied" and rec.reason == "/blocks.1.attn/MatMul: heads [0] of 4 removed", rec.reason
    tails = [numpy_helper.to_array(t).tolist() for t in out.graph.initializer
             if t.data_type == onnx.TensorProto.INT64 and list(t.dims) == [2]]
    assert [3, 16] in tails and [4, 16] in tails
    batch = {"pixel_values": smooth_images(3, (32, 32), seed=9)}
    assert _max_rel_err(m, out, [batch]) <= 1e-5


def test_inspect_shows_heads_and_mlp_width(tmp_path):
    """``onnxshrink inspect``: heads (x head width) and MLP neurons per block, before and after a
    pruning that removed one head of block 0 and 8 neurons of block 1 (zeroed first)."""
    m = vit_encoder(qkv="fused")
    p = tmp_path / "vit.onnx"
    onnx.save(m, str(p))
    r = run_cli("inspect", p, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["transformer"] == [
        {"attention": "/blocks.0.attn/MatMul", "heads": 4, "head_dim": 16, "prunable": True},
        {"mlp": "/blocks.0.mlp.fc1/MatMul", "neurons": 256},
        {"attention": "/blocks.1.attn/MatMul", "heads": 4, "head_dim": 16, "prunable": True},
        {"mlp": "/blocks.1.mlp.fc1/MatMul", "neurons": 256}]
    _zero(m, "blocks.0.attn.qkv.weight_t", slice(128 + 48, 192))   # V of head 3
    _zero(m, "blocks.0.attn.qkv.bias", slice(128 + 48, 192))
    _zero(m, "blocks.1.mlp.fc1.weight_t", slice(0, 8))
    _zero(m, "blocks.1.mlp.fc1.bias", slice(0, 8))
    out, _ = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=_samples(4), budget="none")
    onnx.save(out, str(p))
    r = run_cli("inspect", p)
    assert r.code == 0, r.err
    assert "attention /blocks.0.attn/MatMul: 3 heads x 16" in r.out
    assert "attention /blocks.1.attn/MatMul: 4 heads x 16" in r.out
    assert "MLP /blocks.0.mlp.fc1/MatMul: 256 neurons" in r.out and "MLP /blocks.1.mlp.fc1/MatMul: 248 neurons" in r.out


@pytest.mark.slow
def test_ppocr_rec_svtr_head_removed_exactly():
    """PP-OCRv4 rec (PaddlePaddle export, opset 12): its two SVTR blocks' fused QKV is sliced per
    q/k/v (Slice + Squeeze); a zeroed head is removed exactly (max relative error <= 1e-5)."""
    from models.real import real_model, real_samples

    samples = real_samples("ppocr_rec", 8, seed=0)
    m, _ = onnxshrink.optimize(onnxshrink.load(real_model("ppocr_rec")), None, passes=["cleanup"], data=samples,
                               input_shapes={"x": [1, 3, 48, 320]})
    heads = [r for r in transformer_summary(gs.import_onnx(m)) if "attention" in r]
    assert [(r["heads"], r["head_dim"], r["prunable"]) for r in heads] == [(8, 15, True), (8, 15, True)]
    qkv = next(n for n in m.graph.node if n.op_type == "MatMul" and
               next(t for t in m.graph.initializer if t.name == n.input[1]).dims[1] == 360)
    bias_add = next(n for n in m.graph.node if qkv.output[0] in n.input)
    _zero(m, qkv.input[1], slice(240 + 75, 240 + 90))   # V of head 5
    _zero(m, next(i for i in bias_add.input if i != qkv.output[0]), slice(240 + 75, 240 + 90))
    out, report = onnxshrink.optimize(m, None, passes=["prune"], data=samples, budget="none")
    assert report.passes[-1].reason == f"{heads[0]['attention']}: heads [5] of 8 removed", report.passes[-1].reason
    assert _max_rel_err(m, out, samples) <= 1e-5


@pytest.mark.slow
def test_vit_target_macs_removes_heads_and_neurons_within_budget():
    """The issue's command on the test ViT: ``cleanup,prune --target-macs 0.8 --budget cosine>=0.98``
    removes heads and MLP neurons physically, MACs <= 0.8x, the budget held on held-out samples."""
    m = vit_encoder(opset=14, layernorm="decomposed")
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=_samples(32), target_macs=0.8,
                                      budget="cosine>=0.98")
    rec = report.passes[-1]
    assert {g["kind"] for g in rec.stats["per_group"]} == {"heads", "neurons"}, rec.stats["per_group"]
    assert report.after["macs"] <= 0.8 * report.before["macs"]
    assert report.fidelity["cosine"] >= 0.98 and report.samples["disjoint"]
    check(out)


def test_sdpa_scale_from_shape_does_not_block_heads():
    """torch.onnx's ``scaled_dot_product_attention`` computes 1/sqrt(D) from ``Shape(q)[-1:]`` at run
    time (with a dynamic batch the Shape stays after cleanup's folding too): reading the head width D
    of heads whose D channels are tied does not block them; the model, with a zeroed head, loses it
    exactly and runs at another batch size."""
    m = vit_encoder(qkv="fused", attention="sdpa", dynamic_batch=True)
    assert all(r["prunable"] for r in transformer_summary(gs.import_onnx(m)) if "attention" in r)
    _zero(m, "blocks.1.attn.qkv.weight_t", slice(128 + 16, 128 + 32))   # V of head 1
    _zero(m, "blocks.1.attn.qkv.bias", slice(128 + 16, 128 + 32))
    out, report = onnxshrink.optimize(m, None, passes=["prune"], data=_samples(4), budget="none")
    assert report.passes[-1].reason == "/blocks.1.attn/MatMul: heads [1] of 4 removed", report.passes[-1].reason
    batch = {"pixel_values": smooth_images(3, (32, 32), seed=9)}
    assert _max_rel_err(m, out, [batch] + _samples(4)) <= 1e-5


def test_macs_known_through_a_position_ids_slice():
    """Hugging Face's ``position_ids[:, :input_ids.size(1)]`` is a Slice whose end comes from a Shape:
    onnx's shape inference leaves its result (and, through the broadcasting Add, the batch dim of
    every later tensor) unknown; with the input shapes given, the shape arithmetic is folded and the
    MACs are known (the allocator's ``--target-macs`` needs them)."""
    from onnx import TensorProto, helper

    from onnxshrink.graph.cost import model_cost

    def c(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name))

    nodes = [c("pos_ids", np.arange(65, dtype=np.int64)[None]), c("i1", np.array(1, np.int64)),
             c("ax", np.array([0], np.int64)), c("zero", np.array([0], np.int64)), c("one", np.array([1], np.int64)),
             helper.make_node("Shape", ["input_ids"], ["shp"]),
             helper.make_node("Gather", ["shp", "i1"], ["len"], axis=0),
             helper.make_node("Unsqueeze", ["len", "ax"], ["len1"]),
             helper.make_node("Slice", ["pos_ids", "zero", "len1", "one", "one"], ["pos"]),
             helper.make_node("Gather", ["word", "input_ids"], ["we"]),
             helper.make_node("Gather", ["posemb", "pos"], ["pe"]),
             helper.make_node("Add", ["we", "pe"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("word", (19, 16)), ("posemb", (65, 16)), ("w", (16, 8)))]
    g = helper.make_graph(nodes, "hf_positions", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                ["batch", "seq"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    check(m)
    assert model_cost(m)["macs"] is None                                   # no shapes: unknown, not a guess
    assert model_cost(m, {"input_ids": [1, 65]})["macs"] == 65 * 16 * 8
    assert model_cost(m, {"input_ids": [2, 40]})["macs"] == 2 * 40 * 16 * 8


def test_where_masked_attention_head_removed_exactly():
    """``scores.masked_fill(~keep, -inf)`` as torch exports it (Where on the attention logits, the
    condition a [B, 1, 1, N] input broadcast over the heads) does not block the heads: a zeroed head is
    removed exactly, with masked tokens in the samples."""
    from onnx import TensorProto, helper
    m = transformer_block()
    div = next(n for n in m.graph.node if n.op_type == "Div" and n.input[1] == "attn.scale")
    soft = next(n for n in m.graph.node if n.op_type == "Softmax")
    m.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "attn.neg_inf"))
    where = helper.make_node("Where", ["keep", div.output[0], "attn.neg_inf"], ["attn.masked"], name="attn.mask")
    soft.input[0] = "attn.masked"
    nodes = list(m.graph.node)
    nodes.insert(nodes.index(soft), where)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.input.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 1, 16]))
    check(m)
    _zero(m, "attn.v_proj.weight", slice(32, 48))   # head 2
    _zero(m, "attn.v_proj.bias", slice(32, 48))
    rng = np.random.default_rng(0)
    samples = [{**s, "keep": (np.arange(16) < rng.integers(8, 17)).reshape(1, 1, 1, 16)}
               for s in normal_samples(8, name="x", shape=(1, 16, 64))]
    out, report = onnxshrink.optimize(m, None, passes=["cleanup", "prune"], data=samples, budget="none")
    rec = report.passes[-1]
    assert rec.status == "applied" and "heads [2] of 4 removed" in rec.reason, rec.reason
    assert _max_rel_err(m, out, samples) <= 1e-5
