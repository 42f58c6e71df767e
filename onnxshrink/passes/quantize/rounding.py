"""Weight rounding that minimises each layer's output error (GPTQ / OBQ error feedback), training-free.

A weighted layer computes ``y = W x`` per output channel (a Conv on im2col patches, a MatMul or
Gemm on rows). With the integer grid fixed (``s_c``, the per-channel symmetric scale the quantizer
chose, and ``[-qmax, qmax]``), rounding to nearest minimises ``|W - Q|`` but not the output error

    E(Q) = sum_c (w_c - s_c q_c)^T H (w_c - s_c q_c),      H = sum_x x x^T  (= X^T X),

with ``x`` the layer's input patches over the calibration samples. GPTQ (Frantar et al. 2022,
after Optimal Brain Quantization) rounds the columns one at a time, in order of decreasing
``H_jj`` ("act order"), and pushes each column's rounding error onto the columns not yet rounded
so that the error is compensated where the inputs are correlated:

    q_j = clip(round(w_j / s), -qmax, qmax),   e = (w_j - s q_j) / U_jj,
    w_k <- w_k - e U_jk   for k > j,            U = chol(H^-1)^T (upper),

with ``H`` damped by ``damp * mean(diag H)``. The per-channel scale stays fixed, so the result
is a drop-in replacement of nearest rounding (same scales, same int8 tensor shape). Columns of
``H`` that are zero (dead inputs) get weight 0. A layer whose ``E`` is not lower than nearest
rounding's keeps nearest rounding.

Grouped and depthwise convolutions are a batch of independent problems (one ``H`` per group,
``[groups, D, D]`` with ``D = C_in/groups * k_h * k_w``; a depthwise 3x3 conv is C problems of
size 9). ``H`` is accumulated in one streaming run over the calibration samples with at most
``max_rows`` random patches per sample and layer (``graph.patches.patch_covariance``); layers are
processed in chunks whose ``H`` matrices together stay under ``memory_mb``. The error-feedback loop
itself is ``passes.gptq.gptq_feedback`` with the integer grid as its per-column quantizer.
"""

from __future__ import annotations

__all__ = ["layer_hessian", "gptq_round", "output_error", "round_units"]

from typing import Callable, Iterable

import numpy as np

from onnxshrink.graph.patches import ConvGeometry, patch_covariance, sample_positions
from onnxshrink.passes.gptq import gptq_feedback


# ---------------------------------------------------------------------- the layer's H = X^T X
def layer_hessian(op: str, attrs: dict, x: np.ndarray, w_shape, max_rows: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    """``H = X^T X`` per group, ``[groups, D, D]`` float64 (summed in float32), of one input sample of a Conv
    (its patch rows, see ``graph.patches``), MatMul or Gemm (transA = 0), over at most ``max_rows`` random rows."""
    if op == "Conv":
        geometry = ConvGeometry.from_attrs(attrs, w_shape[2:])
        positions = sample_positions(geometry.n_positions(np.shape(x)), max_rows, rng)
        return patch_covariance(x, geometry, positions, dtype=np.float32)
    x = np.asarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    if max_rows and rows.shape[0] > max_rows:
        rows = rows[np.sort(rng.choice(rows.shape[0], size=max_rows, replace=False))]
    X = np.ascontiguousarray(rows[None])                     # [1, P, D]
    return np.matmul(X.transpose(0, 2, 1), X).astype(np.float64)


def _to_groups(op: str, attrs: dict, W: np.ndarray, axis: int) -> np.ndarray:
    """Weights as ``[groups, rows (output channels), D]`` in the column order of the input rows."""
    if op == "Conv":
        g = int(attrs.get("group", 1))
        return W.reshape(g, W.shape[0] // g, -1)
    return (W.T if axis == 1 else W)[None]  # MatMul [K, N] / Gemm transB=0: rows are columns of W


def _from_groups(op: str, Wg: np.ndarray, shape, axis: int) -> np.ndarray:
    if op == "Conv":
        return Wg.reshape(shape)
    return Wg[0].T if axis == 1 else Wg[0]


# ---------------------------------------------------------------------- the rounding
def output_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """``sum_g tr((W - Q) H (W - Q)^T)`` for ``[g, R, D]`` weights (dequantized ``Q``)."""
    d = (W - Q).astype(np.float64)
    return float(np.sum(np.matmul(d, H) * d))


def gptq_round(W: np.ndarray, H: np.ndarray, scale: np.ndarray, qmax: int, damp: float = 0.01,
               block: int = 128, act_order: bool = True) -> np.ndarray:
    """Integer weights ``[g, R, D]`` for weights ``W [g, R, D]``, Hessians ``H [g, D, D]`` and fixed
    scales ``scale [g, R]`` on the grid ``[-qmax, qmax]`` (GPTQ error feedback, see the module doc)."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    g, R, D = W.shape
    s = np.asarray(scale, np.float64).reshape(g, R)
    diag = np.einsum("gii->gi", H)
    dead = diag <= 0
    if dead.any():
        gi, di = np.nonzero(dead)
        H[gi, di, di] = 1.0
        W[gi, :, di] = 0.0
    diag = np.einsum("gii->gi", H)
    idx = np.arange(D)
    H[:, idx, idx] += damp * diag.mean(axis=1, keepdims=True)
    perm = np.argsort(-diag, axis=1, kind="stable") if act_order else np.broadcast_to(idx, (g, D))
    W = np.take_along_axis(W, perm[:, None, :], axis=2)
    H = np.take_along_axis(np.take_along_axis(H, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    U = None
    for d in (0.0, 0.1, 1.0):  # more damping when H is numerically singular
        try:
            Hd = H if d == 0 else H + d * diag.mean(axis=1)[:, None, None] * np.eye(D)
            U = np.swapaxes(np.linalg.cholesky(np.linalg.inv(Hd)), 1, 2)
            break
        except np.linalg.LinAlgError:
            continue
    if U is None or not np.all(np.isfinite(U)):
        q = np.clip(np.round(W / s[:, :, None]), -qmax, qmax)
        return np.take_along_axis(q, np.argsort(perm, axis=1)[:, None, :], axis=2).astype(np.int8)
    inv_s = 1.0 / s

    def to_grid(_, w):
        q = np.clip(np.round(w * inv_s), -qmax, qmax)
        return q, q * s

    Q = gptq_feedback(W, U, to_grid, features_axis=2, block=block, code_dtype=np.int8)
    return np.take_along_axis(Q, np.argsort(perm, axis=1)[:, None, :], axis=2).astype(np.int8)


def round_units(model, graph, units: list, weight_quant: Callable, samples: Callable[[], Iterable[dict]],
                capture: Callable, qmax: int, n_samples: int = 16, max_rows: int = 2048,
                memory_mb: float = 256.0, seed: int = 0) -> tuple[dict, dict]:
    """GPTQ rounding of ``units`` (a list of ``(node name, weight axis)`` in ``graph``).

    ``weight_quant(W, axis) -> (q_nearest, scale)`` gives the grid; ``capture(model, names, samples)``
    streams the inputs. Returns ``({node name: int8 weights}, stats)``; stats give, per layer, the
    output error ``E`` relative to nearest rounding's."""
    nodes = {n.name: n for n in graph.nodes}
    rng = np.random.default_rng(seed)
    jobs = []
    for name, axis in units:
        node = nodes[name]
        if node.op not in ("Conv", "MatMul", "Gemm") or (
                node.op == "Conv" and node.inputs[1].values.ndim not in (3, 4)):
            continue
        W = np.asarray(node.inputs[1].values, np.float32)
        attrs = dict(node.attrs)
        Wg = _to_groups(node.op, attrs, W, axis)
        jobs.append({"name": name, "op": node.op, "attrs": attrs, "axis": axis, "W": W, "x": node.inputs[0].name,
                     "bytes": Wg.shape[0] * Wg.shape[2] ** 2 * 8})
    out, rel = {}, {}
    budget = memory_mb * 2 ** 20
    chunk: list = []

    def flush(chunk):
        if not chunk:
            return
        hs = {j["name"]: None for j in chunk}
        names = sorted({j["x"] for j in chunk})
        feed = []
        for i, s in enumerate(samples()):
            if i >= n_samples:
                break
            feed.append(s)
        for cap in capture(model, names, feed):
            for j in chunk:
                h = layer_hessian(j["op"], j["attrs"], cap[j["x"]], j["W"].shape, max_rows, rng)
                hs[j["name"]] = h if hs[j["name"]] is None else hs[j["name"]] + h
        for j in chunk:
            H = hs.pop(j["name"])
            if H is None:
                continue
            q0, s = weight_quant(j["W"], j["axis"])
            Wg = _to_groups(j["op"], j["attrs"], j["W"], j["axis"]).astype(np.float64)
            g, R, D = Wg.shape
            if np.ndim(s) == 0 or np.size(s) == 1:
                sg = np.full((g, R), float(np.reshape(s, -1)[0]))
            else:
                sg = np.asarray(s, np.float64).reshape(g, R)
            Qg = gptq_round(Wg, H, sg, qmax)
            q0g = _to_groups(j["op"], j["attrs"], q0.astype(np.float64), j["axis"])
            e0 = output_error(Wg, q0g * sg[:, :, None], H)
            e1 = output_error(Wg, Qg * sg[:, :, None], H)
            if e1 < e0:
                out[j["name"]] = _from_groups(j["op"], Qg, j["W"].shape, j["axis"]).astype(np.int8)
            rel[j["name"]] = round(min(e1, e0) / e0, 4) if e0 > 0 else 1.0  # of the rounding kept

    used = 0
    for j in jobs:
        if chunk and used + j["bytes"] > budget:
            flush(chunk)
            chunk, used = [], 0
        chunk.append(j)
        used += j["bytes"]
    flush(chunk)
    vals = np.array(list(rel.values())) if rel else np.array([1.0])
    stats = {"method": "gptq", "layers": len(out), "of": len(jobs),
             "output_error_vs_nearest": {"median": round(float(np.median(vals)), 4),
                                         "min": round(float(vals.min()), 4), "max": round(float(vals.max()), 4)},
             "per_layer": rel}
    return out, stats
