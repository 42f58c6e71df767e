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
``max_rows`` random patches per sample and layer; layers are processed in chunks whose ``H``
matrices together stay under ``memory_mb``.
"""

from __future__ import annotations

__all__ = ["conv_patches", "layer_hessian_rows", "gptq_round", "output_error", "round_units"]

from typing import Callable, Iterable

import numpy as np


# ---------------------------------------------------------------------- inputs as rows
def _conv_geometry(attrs: dict, x_shape, w_shape):
    nd = len(w_shape) - 2
    k = list(w_shape[2:])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            n = x_shape[2 + i]
            out = -(-n // strides[i])
            total = max(0, (out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - n)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + nd] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    return nd, k, strides, dil, pads


def conv_patches(x: np.ndarray, attrs: dict, w_shape, max_rows: int | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """im2col rows of a Conv input: ``[P, groups, C_in/groups * prod(k)]`` (column order matches
    ``W[c_out, c_in/groups, *k]`` flattened), at most ``max_rows`` random output positions."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3:  # 1-D conv: a 2-D one of height 1
        x = x[:, :, None, :]
        w_shape = (w_shape[0], w_shape[1], 1, w_shape[2])
        a = dict(attrs)
        for key in ("strides", "dilations"):
            if key in a:
                a[key] = [1] + list(a[key])
        if "pads" in a:
            p = list(a["pads"])
            a["pads"] = [0, p[0], 0, p[1]]
        attrs = a
    nd, k, st, dil, pads = _conv_geometry(attrs, x.shape, w_shape)
    if nd != 2:
        raise ValueError("only 1-D and 2-D convolutions")
    g = int(attrs.get("group", 1))
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ek = [(k[i] - 1) * dil[i] + 1 for i in range(2)]
    ho = (xp.shape[2] - ek[0]) // st[0] + 1
    wo = (xp.shape[3] - ek[1]) // st[1] + 1
    total = n * ho * wo
    if max_rows and total > max_rows:
        rng = rng or np.random.default_rng(0)
        pick = np.sort(rng.choice(total, size=max_rows, replace=False))
    else:
        pick = np.arange(total)
    bi, rem = np.divmod(pick, ho * wo)
    hi, wi = np.divmod(rem, wo)
    rows = np.empty((len(pick), c, k[0], k[1]), np.float32)
    for a in range(k[0]):
        for b in range(k[1]):
            rows[:, :, a, b] = xp[bi, :, hi * st[0] + a * dil[0], wi * st[1] + b * dil[1]]
    return rows.reshape(len(pick), g, (c // g) * k[0] * k[1])


def layer_hessian_rows(op: str, attrs: dict, x: np.ndarray, w_shape, max_rows: int | None,
                       rng: np.random.Generator) -> np.ndarray:
    """Input rows ``[P, groups, D]`` of a Conv, MatMul or Gemm (transA = 0) for ``H = X^T X``."""
    if op == "Conv":
        return conv_patches(x, attrs, w_shape, max_rows, rng)
    x = np.asarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    if max_rows and rows.shape[0] > max_rows:
        rows = rows[np.sort(rng.choice(rows.shape[0], size=max_rows, replace=False))]
    return rows[:, None, :]


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
    Q = np.zeros_like(W)
    inv_s = 1.0 / s
    for i1 in range(0, D, block):
        i2 = min(i1 + block, D)
        W1 = W[:, :, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            q = np.clip(np.round(w * inv_s), -qmax, qmax)
            Q[:, :, i1 + i] = q
            e = (w - q * s) / U1[:, i, i][:, None]
            W1[:, :, i:] -= e[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = e
        if i2 < D:
            W[:, :, i2:] -= np.matmul(E1, U[:, i1:i2, i2:])
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
        if node.op not in ("Conv", "MatMul", "Gemm") or (node.op == "Conv" and node.inputs[1].values.ndim not in (3, 4)):
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
                X = layer_hessian_rows(j["op"], j["attrs"], cap[j["x"]], j["W"].shape, max_rows, rng)
                Xt = np.ascontiguousarray(X.transpose(1, 0, 2))          # [g, P, D]
                h = np.matmul(Xt.transpose(0, 2, 1), Xt).astype(np.float64)  # [g, D, D]
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
