"""Test models for the svd pass whose weights are rank r plus small noise (deterministic).

``mlp(...)``: x (B, d_in) -> MatMul+Add -> Relu -> MatMul+Add -> Relu -> Gemm(transB=1, alpha,
beta, C) -> y. ``encoder(...)``: one pre-LayerNorm transformer encoder block on x (1, S, d):
Q/K/V/O projections (MatMul on 3-D activations + Add), multi-head softmax attention, residual,
LayerNorm, FFN d -> 4d -> d with erf-GELU, residual. Every projection weight is
``U diag(s) V^T`` (rank r, s in [1, 2]) plus Gaussian noise of ``noise`` times the low-rank part's
RMS, so the true ranks are known. ``samples(model, n)`` draws standard-normal inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def low_rank(n: int, m: int, r: int, rng: np.random.Generator, noise: float = 0.01) -> np.ndarray:
    """An (n x m) float32 matrix of rank r plus noise (relative RMS ``noise``)."""
    U, _ = np.linalg.qr(rng.standard_normal((n, r)))
    V, _ = np.linalg.qr(rng.standard_normal((m, r)))
    s = np.linspace(2.0, 1.0, r)
    W = (U * s) @ V.T
    rms = float(np.sqrt(np.mean(W ** 2)))
    W = W + rng.standard_normal((n, m)) * noise * rms
    return (W / rms * 0.5 / np.sqrt(n)).astype(np.float32)  # fan-in scaling keeps activations O(1)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def mlp(d_in: int = 256, hidden: int = 512, d_out: int = 128, rank: int = 16, noise: float = 0.01,
        batch: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    W1 = low_rank(d_in, hidden, rank, rng, noise)
    W2 = low_rank(hidden, hidden, rank, rng, noise)
    W3 = low_rank(hidden, d_out, rank, rng, noise)
    inits = [_init("W1", W1), _init("b1", rng.standard_normal(hidden) * 0.1),
             _init("W2", W2), _init("b2", rng.standard_normal(hidden) * 0.1),
             _init("W3t", W3.T / 0.5), _init("C3", rng.standard_normal((1, d_out)) * 0.1)]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1m"], name="fc1"),
        helper.make_node("Add", ["h1m", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "W2"], ["h2m"], name="fc2"),
        helper.make_node("Add", ["h2m", "b2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Relu", ["h2b"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "W3t", "C3"], ["y"], name="fc3", transB=1, alpha=0.5, beta=2.0),
    ]
    g = helper.make_graph(nodes, "svd_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="svd_models")
    m.ir_version = 8
    return m


def encoder(d: int = 128, heads: int = 4, seq: int = 32, rank: int = 16, noise: float = 0.01,
            seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dh = d // heads
    inits = [_init("ln1_g", 1 + 0.1 * rng.standard_normal(d)), _init("ln1_b", 0.1 * rng.standard_normal(d)),
             _init("ln2_g", 1 + 0.1 * rng.standard_normal(d)), _init("ln2_b", 0.1 * rng.standard_normal(d)),
             numpy_helper.from_array(np.array([1, seq, heads, dh], np.int64), "shape_heads"),
             numpy_helper.from_array(np.array([1, seq, d], np.int64), "shape_model"),
             _init("scale", np.array(1.0 / np.sqrt(dh))), _init("half", np.array(0.5)),
             _init("one", np.array(1.0)), _init("rsqrt2", np.array(1 / np.sqrt(2.0)))]
    for nm, (n, m) in {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "f1": (d, 4 * d), "f2": (4 * d, d)}.items():
        inits.append(_init(f"W_{nm}", low_rank(n, m, rank, rng, noise)))
        inits.append(_init(f"b_{nm}", 0.05 * rng.standard_normal(m)))
    N = helper.make_node
    nodes = [N("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["ln1"], name="ln1", axis=-1, epsilon=1e-5)]
    for p in "qkv":
        nodes += [N("MatMul", ["ln1", f"W_{p}"], [f"{p}m"], name=f"proj_{p}"),
                  N("Add", [f"{p}m", f"b_{p}"], [f"{p}a"], name=f"proj_{p}_bias"),
                  N("Reshape", [f"{p}a", "shape_heads"], [f"{p}r"], name=f"{p}_heads"),
                  N("Transpose", [f"{p}r"], [f"{p}h"], name=f"{p}_t", perm=[0, 2, 1, 3] if p != "k" else [0, 2, 3, 1])]
    nodes += [N("MatMul", ["qh", "kh"], ["scores_raw"], name="scores"),
              N("Mul", ["scores_raw", "scale"], ["scores_s"], name="scores_scale"),
              N("Softmax", ["scores_s"], ["attn"], name="softmax", axis=-1),
              N("MatMul", ["attn", "vh"], ["ctx_h"], name="attn_v"),
              N("Transpose", ["ctx_h"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              N("Reshape", ["ctx_t", "shape_model"], ["ctx"], name="ctx_merge"),
              N("MatMul", ["ctx", "W_o"], ["om"], name="proj_o"),
              N("Add", ["om", "b_o"], ["oa"], name="proj_o_bias"),
              N("Add", ["x", "oa"], ["res1"], name="residual1"),
              N("LayerNormalization", ["res1", "ln2_g", "ln2_b"], ["ln2"], name="ln2", axis=-1, epsilon=1e-5),
              N("MatMul", ["ln2", "W_f1"], ["f1m"], name="ffn1"),
              N("Add", ["f1m", "b_f1"], ["f1a"], name="ffn1_bias"),
              N("Mul", ["f1a", "rsqrt2"], ["g0"], name="gelu_scale"),
              N("Erf", ["g0"], ["g1"], name="gelu_erf"),
              N("Add", ["g1", "one"], ["g2"], name="gelu_add"),
              N("Mul", ["f1a", "g2"], ["g3"], name="gelu_mul"),
              N("Mul", ["g3", "half"], ["gelu"], name="gelu_half"),
              N("MatMul", ["gelu", "W_f2"], ["f2m"], name="ffn2"),
              N("Add", ["f2m", "b_f2"], ["f2a"], name="ffn2_bias"),
              N("Add", ["res1", "f2a"], ["y"], name="residual2")]
    g = helper.make_graph(nodes, "svd_encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="svd_models")
    m.ir_version = 8
    return m


def samples(model: onnx.ModelProto, n: int, seed: int = 0) -> list[dict]:
    """``n`` standard-normal input dicts for a model with static float inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = {}
        for vi in model.graph.input:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            s[vi.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(s)
    return out


#: the true rank of every factorizable weight (layer name -> rank) for the default arguments
TRUE_RANKS = {"mlp": {"fc1": 16, "fc2": 16, "fc3": 16},
              "encoder": {"proj_q": 16, "proj_k": 16, "proj_v": 16, "proj_o": 16, "ffn1": 16, "ffn2": 16}}
