"""Least-squares refit of the consumers of pruned channels, and the mean compensation.

Compensation: a removed channel's calibration mean E[x_p] is folded into its consumers' biases
(as for constant channels, see ``remove``). Refit (ThiNet / He et al. 2017): each consumer whose
input lost channels is refit by ridge least squares, inputs X from the pruned model, targets Y
from the unpruned one (kept output channels),
    [W'; b'] = argmin ||[X 1][W; b] - Y||^2 + lam ||W - W0||^2,
    A = sum X~^T X~, B = sum X~^T Y  (accumulated streaming over samples; conv inputs are
    im2col patches at randomly sampled output positions),
and a refit is kept only when its reconstruction error on held-out statistics is lower.
Consumers are refit level by level: a layer is fit after every refit layer upstream of it
(``StageStream`` computes each node once over all levels).
"""

from __future__ import annotations

__all__ = ["compensate_with_means", "refit_consumers", "ridge_solutions"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels import ChannelAnalysis
from onnxshrink.graph.patches import ConvGeometry, conv_patches
from onnxshrink.graph.values import constant_value
from onnxshrink.passes.base import Context
from onnxshrink.passes.prune.remove import matmul_bias_add
from onnxshrink.passes.prune.stage_stream import StageStream


def compensate_with_means(a: ChannelAnalysis, chan_stats: dict, fill: dict) -> None:
    """Set the fill value (the value folded into the consumer's bias when a position is removed)
    of every varying input channel of each sink to its calibration mean, in place: ``chan_stats``
    maps a sink's input tensor to (mean, mean square) per channel (``select.sink_statistics``)."""
    for k, s in enumerate(a.sinks):
        st = chan_stats.get(s.node.inputs[0].name)
        if st is None or s.kind == "convtranspose":
            continue
        mean = st[0]
        fill[k] = np.where(np.isnan(fill[k]), mean, fill[k]) if k in fill else mean


def refit_consumers(graph: gs.Graph, ctx: Context, original: onnx.ModelProto, samples: list, info: dict, *,
                    max_dim: int, stages: int, positions: int, ridge: float) -> dict:
    """Least-squares refit of every consumer whose input lost channels (``info`` from
    ``remove_units``; see the module docstring): consumers with more than ``max_dim`` input
    features are skipped, levels are merged into at most ``stages`` stages (0: no merging),
    ``positions`` output positions are sampled per sample for convs, ``ridge`` is the smallest
    ridge strength tried."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    todo = []
    skipped = 0
    for name, keep in info["in_keep"].items():
        n = nodes.get(name)
        if n is None or keep.all():
            continue
        kind = _refit_kind(n)
        if kind is None:
            continue
        w = constant_value(n.inputs[1], numeric_attrs=True)
        dim = int(np.prod(w.shape[1:])) if kind == "conv" else w.shape[0] if kind != "gemm" else (
            w.shape[1] if int(n.attrs.get("transB", 0)) else w.shape[0])
        if dim > max_dim:
            skipped += 1
            continue
        todo.append(n)
    todo.sort(key=lambda n: order[n.name])
    res = {"refit": 0, "kept_old": 0, "skipped_dim": skipped, "layers": []}
    if not todo:
        return res
    # stages by dependency level: no layer is refit together with one upstream of it, so each
    # layer is fit to inputs that already come from its refit predecessors
    level = _refit_levels(graph, {n.name for n in todo})
    by_level: dict = {}
    for n in todo:
        by_level.setdefault(level[n.name], []).append(n)
    keys = sorted(by_level)
    if stages > 0 and len(keys) > stages:
        # merge consecutive levels (approximate: later layers of a stage see unrefit predecessors)
        chunks = np.array_split(np.arange(len(keys)), stages)
        stages_list = [[n for k in c for n in by_level[keys[k]]] for c in chunks]
    else:
        stages_list = [by_level[k] for k in keys]
    res["stages"] = len(stages_list)
    rng = np.random.default_rng(0)
    # targets once: sampled rows of the unpruned model's outputs (kept channels), float32
    targets: dict = {n.name: [] for n in todo}
    plan: dict = {n.name: [] for n in todo}
    for s_orig in ctx.capture(original, [_fit_output(n).name for n in todo], samples):
        for n in todo:
            Y, pos = _target_rows(n, s_orig[_fit_output(n).name], info["out_keep"].get(n.name), positions, rng)
            targets[n.name].append(Y)
            plan[n.name].append(pos)
    n_hold = max(1, len(samples) // 4) if len(samples) >= 4 else 0
    stream = StageStream(ctx.to_model(graph), [[n.name for n in st] for st in stages_list], samples)
    res["forward_nodes"] = 0
    for k, stage in enumerate(stages_list):
        acc = {n.name: None for n in stage}
        hold = {n.name: None for n in stage}
        for si, vals in enumerate(stream.inputs_of_stage(k, ctx.to_model(graph) if k else None)):
            target = hold if si >= len(samples) - n_hold else acc
            for n in stage:
                X = _input_rows(n, vals[n.inputs[0].name], plan[n.name][si], targets[n.name][si].shape[0])
                Y = targets[n.name][si]
                A, B, yy = target[n.name] or (0.0, 0.0, 0.0)
                target[n.name] = (A + (X.T @ X).astype(np.float64), B + (X.T @ Y).astype(np.float64),
                                  yy + float(np.sum(Y.astype(np.float64) ** 2)))
        for n in stage:
            if acc[n.name] is None:
                continue
            kind = _refit_kind(n)
            theta_old = _current_theta(n, kind)
            Ah, Bh, yyh = hold[n.name] if hold[n.name] is not None else acc[n.name]

            def err(t, A_=Ah, B_=Bh, yy_=yyh):
                return yy_ - 2 * float(np.sum(t * B_)) + float(np.sum(t * (A_ @ t)))

            lams = [ridge * 10] if hold[n.name] is None else [ridge, ridge * 10, ridge * 100]
            best, best_e, best_lam = None, None, None
            for lam, theta in zip(lams, ridge_solutions(acc[n.name][0], acc[n.name][1], kind != "matmul", lams,
                                                         theta_old)):
                e = err(theta)
                if best_e is None or e < best_e:
                    best, best_e, best_lam = theta, e, lam
            e_old = err(theta_old)
            res["layers"].append({"node": n.name, "dim": int(acc[n.name][0].shape[0]), "ridge": best_lam,
                                  "err_before": e_old / max(yyh, 1e-30), "err_after": best_e / max(yyh, 1e-30)})
            if best_e < e_old:
                _write_theta(n, kind, best, graph)
                res["refit"] += 1
            else:
                res["kept_old"] += 1
    res["forward_nodes"] = stream.nodes_run
    return res


def ridge_solutions(A: np.ndarray, B: np.ndarray, bias: bool, lams: list, prior: np.ndarray | None = None):
    """Ridge least-squares solutions [W; b] of the accumulated normal equations (A = sum X~^T X~,
    B = sum X~^T Y, X~ = [X 1] when ``bias``), one per strength in ``lams`` (relative to the mean
    diagonal), pulled towards the current weights W0 (``prior``, [W0; b0]) rather than towards 0,
    so a strong ridge falls back to the unrefit layer instead of shrinking it. The bias is not
    penalised: with n rows, s_x = sum X, s_y = sum Y,
        C = A_xx - s_x s_x^T / n,  D = B_x - s_x s_y^T / n      (centred statistics)
        W = (C + lam I)^-1 (D + lam W0)  (float64 Cholesky),   b = (s_y - s_x^T W) / n."""
    if bias:
        n = A[-1, -1]
        sx, sy = A[:-1, -1], B[-1]
        C = A[:-1, :-1] - np.outer(sx, sx) / n
        D = B[:-1] - np.outer(sx, sy) / n
    else:
        C, D = A, B
    d = C.shape[0]
    scale = float(np.trace(C)) / max(d, 1) or 1.0
    W0 = np.zeros_like(D) if prior is None else prior[:d]
    for lam in lams:
        reg = C.copy()
        reg[np.arange(d), np.arange(d)] += lam * scale
        rhs = D + (lam * scale) * W0
        try:
            from scipy.linalg import solve_triangular
            L = np.linalg.cholesky(reg)
            W = solve_triangular(L.T, solve_triangular(L, rhs, lower=True, check_finite=False), lower=False,
                                 check_finite=False)
        except Exception:  # no scipy, or not positive definite in float64
            try:
                W = np.linalg.solve(reg, rhs)
            except np.linalg.LinAlgError:
                W = np.linalg.lstsq(reg, rhs, rcond=None)[0]
        yield np.vstack([W, ((sy - sx @ W) / n)[None]]) if bias else W


def _fit_output(node: gs.Node):
    """The tensor a refit matches to the unpruned model's: the consumer's output, or for a MatMul
    with a bias Add (``remove.matmul_bias_add``), the Add's output (a name the unpruned model has:
    ``remove`` renames a MatMul's output when it puts a new Add after it)."""
    found = matmul_bias_add(node) if node.op == "MatMul" else None
    return found[0].outputs[0] if found is not None else node.outputs[0]


def _refit_kind(node: gs.Node) -> str | None:
    """"conv" (group 1, explicit padding), "gemm" (transA = 0), "matmul" or "matmul_bias" (a MatMul
    whose bias Add is fit too, see ``remove.matmul_bias_add``) for a refittable consumer with
    constant weights; None otherwise."""
    w = constant_value(node.inputs[1], numeric_attrs=True) if len(node.inputs) > 1 else None
    if w is None:
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and w.ndim == 4 \
            and str(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID", "b'NOTSET'"):
        return "conv"
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        return "gemm"
    if node.op == "MatMul" and w.ndim == 2:
        return "matmul_bias" if matmul_bias_add(node) is not None else "matmul"
    return None


def _refit_levels(graph: gs.Graph, names: set) -> dict:
    """Level of each node among the refit nodes ``names``: 0 when no refit node is upstream,
    else 1 + the highest level upstream."""
    depth: dict = {}  # refit nodes on the longest path ending at (and including) the node
    for n in graph.nodes:  # topological order
        up = max((depth.get(p.name, 0) for t in n.inputs for p in t.inputs), default=0)
        depth[n.name] = up + (1 if n.name in names else 0)
    return {k: depth[k] - 1 for k in names if k in depth}


def _target_rows(n: gs.Node, y, keep, positions: int, rng):
    """Regression targets of one sample (kept output channels of the unpruned model's output) and
    the sampled output positions (conv; None: all)."""
    kind = _refit_kind(n)
    y = np.asarray(y, np.float32)
    pos = None
    if kind == "conv":
        if keep is not None:
            y = y[:, keep]
        HW = y.shape[2] * y.shape[3]
        if positions < HW:
            pos = np.sort(rng.choice(HW, size=positions, replace=False))
        Y = y.reshape(y.shape[0], y.shape[1], -1)
        Y = (Y[:, :, pos] if pos is not None else Y).transpose(0, 2, 1).reshape(-1, y.shape[1])
        return np.ascontiguousarray(Y), (pos, (y.shape[2], y.shape[3]))
    Y = y.reshape(-1, y.shape[-1])
    if keep is not None:
        Y = Y[:, keep]
    return np.ascontiguousarray(Y), None


def _input_rows(n: gs.Node, x, plan, rows: int):
    """Regression inputs of one sample (im2col patches for convs), with a ones column except for
    MatMul (no bias)."""
    kind = _refit_kind(n)
    x = np.asarray(x, np.float32)
    if kind == "conv":
        w = constant_value(n.inputs[1], numeric_attrs=True)
        pos, (oh, ow) = plan
        if pos is not None:  # the same output positions in every sample
            pos = (np.arange(x.shape[0])[:, None] * oh * ow + np.asarray(pos)[None]).ravel()
        X = conv_patches(x, ConvGeometry.from_attrs(n.attrs, w.shape[2:]), pos)
        X = X.reshape(-1, int(np.prod(w.shape[1:])))
    else:
        X = x.reshape(-1, x.shape[-1])
    if kind != "matmul":
        X = np.concatenate([X, np.ones((X.shape[0], 1), np.float32)], axis=1)
    return X


def _current_theta(n: gs.Node, kind: str) -> np.ndarray:
    """The consumer's current [W; b] in the regression's layout (inputs x outputs, bias row last)."""
    w = constant_value(n.inputs[1], numeric_attrs=True).astype(np.float64)
    b = None
    if len(n.inputs) > 2 and n.inputs[2].name:
        b = constant_value(n.inputs[2], numeric_attrs=True).astype(np.float64)
    if kind == "conv":
        wm = w.reshape(w.shape[0], -1).T
        bb = np.zeros(w.shape[0]) if b is None else b
        return np.vstack([wm, bb[None]])
    if kind == "gemm":
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        wk = (w.T if int(n.attrs.get("transB", 0)) else w) * alpha
        N = wk.shape[1]
        if b is None:
            bb = np.zeros(N)
        else:
            bb = np.broadcast_to(b.reshape(-1) if b.size == N else b.reshape(-1)[:1], (N,)) * beta
        return np.vstack([wk, bb[None]])
    if kind == "matmul_bias":
        add, slot = matmul_bias_add(n)
        return np.vstack([w, np.asarray(add.inputs[slot].values, np.float64).reshape(1, -1)])
    return w


def _write_theta(n: gs.Node, kind: str, theta: np.ndarray, graph: gs.Graph) -> None:
    """Write a refit [W; b] back as the consumer's new weight and bias constants."""
    w = constant_value(n.inputs[1], numeric_attrs=True)
    dt = w.dtype
    if kind == "conv":
        W = theta[:-1].T.reshape(w.shape).astype(dt)
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", W)
        b = theta[-1].astype(dt)
        if len(n.inputs) > 2 and n.inputs[2].name:
            n.inputs[2] = gs.Constant(f"{n.inputs[2].name}_refit", b)
        else:
            while len(n.inputs) < 2:
                n.inputs.append(gs.Variable.empty())
            n.inputs.append(gs.Constant(f"{n.name}_bias_refit", b))
    elif kind == "gemm":
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        wk = theta[:-1] / alpha
        W = (wk.T if int(n.attrs.get("transB", 0)) else wk).astype(dt)
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", W)
        if len(n.inputs) > 2 and n.inputs[2].name:
            c = constant_value(n.inputs[2], numeric_attrs=True)
            shape = c.shape if c.size == theta.shape[1] else (theta.shape[1],)
            n.inputs[2] = gs.Constant(f"{n.inputs[2].name}_refit", (theta[-1] / beta).reshape(shape).astype(dt))
        else:
            n.attrs["beta"] = 1.0
            n.inputs.append(gs.Constant(f"{n.name}_bias_refit", theta[-1].astype(dt)))
    elif kind == "matmul_bias":
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", theta[:-1].astype(dt))
        add, slot = matmul_bias_add(n)
        add.inputs[slot] = gs.Constant(f"{add.inputs[slot].name}_refit", theta[-1].astype(dt))
    else:
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_refit", theta.astype(dt))
    graph.cleanup()
