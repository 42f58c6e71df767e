"""Low-rank factorization of Gemm/MatMul/Conv weights, whitened by calibration activations.

Linear layers. A MatMul/Gemm with a constant weight computes ``y = x W`` with W (n x m) (for
Gemm ``W = alpha * op(B)``, transB applied; ``beta * C`` stays on the second factor). It becomes
``y = (x A) B`` with A (n x k), B (k x m): params and MACs per row go from n m to k (n + m), so a
rank pays only when ``k < n m / (n + m)``.

Whitening. Let X (rows = every position of every calibration sample) be the layer's input and
``C = X^T X / N + ridge * mean(diag) * I = L L^T`` (Cholesky; the ridge makes a singular C usable).
The layer-output error of any replacement W' is ``|X (W - W')|_F^2 = |L^T (W - W')|_F^2`` (up to
the ridge). So we take the SVD ``L^T W = U S V^T`` and keep ``A = L^-T U_k S_k^1/2``,
``B = S_k^1/2 V_k^T``: the output error is then exactly ``sum_{i>k} s_i^2`` (Eckart-Young in the
whitened space), and ``1 - sum_{i>k} s_i^2 / sum s_i^2`` is the fraction of output energy kept.
Without data (or ``whiten=false``) the plain SVD of W is used and the same ratio measures weight
energy instead.

Convolutions (2-D, group 1; grouped convs are skipped with a reason). Three forms, the cheapest
in MACs that pays is taken (``conv_mode=auto``):
  * channel-out: W (Cout, Cin kh kw) ~ P Q -> kxk conv to r channels (original strides, pads,
    dilations), then a 1x1 conv to Cout with the bias. Whitened with the covariance of the input
    patches (im2col view, Cin kh kw square), accumulated in chunks of sampled positions so the
    patch matrix never exists whole. This is exact whitening, as for linear layers.
  * channel-in: W permuted to (Cin, Cout kh kw) ~ Q P -> a 1x1 conv to r channels, then the kxk
    conv. Whitened with the per-pixel channel covariance (the mean diagonal block of the patch
    covariance; an approximation, the predicted error is approximate).
  * spatial: W permuted to (Cin kh, Cout kw) ~ H V -> a (kh x 1) conv to r channels with the
    vertical stride/pads/dilation, then a (1 x kw) conv with the horizontal ones and the bias.
    Whitened with the vertical-patch covariance (approximate).
MACs per output position: channel-out r (Cin kh kw + Cout); channel-in r Cin (in/out positions)
+ r Cout kh kw; spatial r Cin kh (OH x W_in)/(OH x OW) + r Cout kw. A form is used only when
both its parameters and its MACs are below the original's.

Rank choice (``rule``):
  * ``energy``: per layer, the smallest k keeping ``energy`` of the (whitened) spectrum.
  * ``params``: globally, keep ``ratio`` of the candidate layers' params (or MACs with
    ``budget_on=macs``), spending it on the singular values with the largest relative output
    energy per unit of cost, ``(s_i^2 / sum_j s_j^2) / cost_per_rank``.
  * ``error``: globally, drop the singular values of least relative output error per unit of
    cost saved until the predicted relative errors, summed over layers, reach ``max_error``.
  * ``fit``: bisect ``max_error`` of the ``error`` rule with ``ctx.evaluate`` so the model keeps
    the manager's budget (needs validation data and a budget; otherwise acts as ``error``).
Ranks can be rounded up to a multiple (``rank_multiple=8``). ``weaker()`` keeps more energy,
a larger ratio or a smaller error. With ``fold=true`` (default) the ``fold`` pass runs first, so
factor pairs left by an earlier run whose rank no longer pays are merged and re-factored.

Per layer the stats hold: form, rank (and full rank), energy kept, params and MACs before and
after, the predicted relative output error and the error measured on the validation samples
(``tr(E^T Cv E) / tr(W^T Cv W)`` with Cv the validation inputs' (patch) covariance and E the
weight error: exactly the layer's relative output error on those samples, bias excluded).
"""

from __future__ import annotations

__all__ = ["SvdOptions", "SvdPass", "factorize", "parse_ranks", "whitened_svd"]

import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import UsageError
from onnxshrink.graph.patches import ConvGeometry, patch_covariance, sample_positions
from onnxshrink.graph.values import constant_value, node_attr
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.options import keyed_items
from onnxshrink.passes.registry import register
from onnxshrink.passes.svd_knob import SvdKnob, weight_view

# ---------------------------------------------------------------------------------- the pass


@dataclass
class SvdOptions:
    """Options of the svd pass (rank rule, whitening, conv forms; see the module doc)."""

    rule: Literal["energy", "params", "error", "fit"] = field(default="energy", metadata={
        "help": "rank rule: per-layer energy kept, global params/MACs ratio, global summed predicted "
                "error, or fit (bisect the error to hold the budget)"})
    energy: float = field(default=0.99, metadata={"help": "rule=energy: fraction of the (whitened) spectrum kept"})
    ratio: float = field(default=0.5, metadata={"help": "rule=params: fraction of the candidates' cost kept"})
    budget_on: Literal["params", "macs"] = field(default="params", metadata={
        "help": "rule=params/error: the cost counted (params or MACs)"})
    max_error: float = field(default=0.01, metadata={
        "help": "rule=error: summed predicted relative layer-output error"})
    whiten: bool = field(default=True, metadata={"help": "whiten with calibration activations when given"})
    ridge: float = field(default=1e-4, metadata={"help": "ridge added to X^T X, relative to its mean diagonal"})
    rank_multiple: int = field(default=1, metadata={"help": "round ranks up to a multiple of this (e.g. 8)"})
    min_params: int = field(default=4096, metadata={"help": "skip weights with fewer elements"})
    ops: list[str] = field(default_factory=lambda: ["MatMul", "Gemm", "Conv"], metadata={
        "help": "op types considered"})
    conv_mode: Literal["auto", "channel", "channel_out", "channel_in", "spatial"] = field(default="auto", metadata={
        "help": "conv factorization: cheapest paying form, channel forms only, one form only"})
    samples: int = field(default=32, metadata={"help": "calibration samples used for whitening"})
    max_positions: int = field(default=2048, metadata={"help": "conv patches sampled per calibration sample"})
    measure: bool = field(default=True, metadata={"help": "measure each layer's output error on validation data"})
    fold: bool = field(default=True, metadata={"help": "run the fold pass first (merge linear pairs)"})
    latency: bool = field(default=False, metadata={
        "help": "factorize a layer only when its factor pair measures faster (one thread, layer alone)"})
    ranks: dict[str, list] = field(default_factory=dict, metadata={
        "help": "fixed ranks, overriding the rule: a mapping {LAYER: [FORM, RANK]} or LAYER=FORM:RANK items "
                "(FORM linear, channel_out, channel_in or spatial; empty: the layer's only form); other layers "
                "are left alone"})
    sensitivity: bool = field(default=True, metadata={
        "help": "rule=fit: weight layers by their measured effect on the model output"})
    margin: float = field(default=0.2, metadata={
        "help": "rule=fit: keep this fraction of the budget's slack in reserve during the search (headroom for "
                "the test samples that judge the result; weaker() raises it)"})

    def __post_init__(self):
        self.ranks = parse_ranks(self.ranks)


@register
class SvdPass(Pass):
    """Replace Gemm/MatMul/Conv weights by rank-k factor pairs chosen on whitened spectra."""

    name = "svd"
    summary = "low-rank factorization of MatMul/Gemm/Conv (activation-whitened SVD), with folding"
    lossless = False
    needs_data = False

    Options = SvdOptions
    knob = SvdKnob()

    def describe_strength(self) -> str:
        o = self.options
        return {"energy": f"energy={o.energy:g}", "params": f"ratio={o.ratio:g}",
                "error": f"max_error={o.max_error:g}", "fit": f"fit (margin={o.margin:g})"}[o.rule]

    def weaker(self):
        o = self.options
        if o.rule == "energy":
            e = 1 - (1 - o.energy) / 3
            return None if o.energy >= 0.99999 else SvdPass(dataclasses.replace(o, energy=e))
        if o.rule == "params":
            r = o.ratio + (1 - o.ratio) / 2
            return None if o.ratio >= 0.97 else SvdPass(dataclasses.replace(o, ratio=r))
        if o.rule == "fit":
            return None if o.margin >= 0.9 else SvdPass(dataclasses.replace(o, margin=min(0.9, o.margin + 0.3)))
        return None if o.max_error <= 1e-5 else SvdPass(dataclasses.replace(o, max_error=o.max_error / 4))

    # ---------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        stats: dict = {"rule": o.rule}
        folded = []
        if o.fold:
            from onnxshrink.passes.fold import fold_linear_pairs
            folded = fold_linear_pairs(graph, ctx)
            stats["folded"] = folded
        layers, skipped = _find_layers(graph, o)
        if o.ranks:  # fixed ranks: only the named layers need statistics and a spectrum
            layers = [L for L in layers if (L.node.name or L.node.outputs[0].name) in o.ranks]
        stats["skipped"] = skipped
        if not layers:
            return PassResult(graph, bool(folded), stats,
                              reason=f"no MatMul/Gemm/Conv with a constant weight of at least {o.min_params} elements")

        calib = ctx.calib if (o.whiten and ctx.calib is not None and not getattr(ctx.calib, "synthetic", False)
                              and len(ctx.calib)) else None
        val = ctx.val if (o.measure and ctx.val is not None and not getattr(ctx.val, "synthetic", False)
                          and len(ctx.val)) else None
        covs, seen = ({}, {})
        if calib is not None:
            covs, seen = _covariances(layers, ctx, graph, calib, o.samples, o.max_positions, "calibration")
        stats["whitened"] = calib is not None
        if calib is None:
            stats["whitening"] = ("off (whiten=false)" if not o.whiten else
                                  "off: no calibration data (plain SVD of the weights)")
        sample = None
        src = calib or val or ctx.calib
        if src is not None and len(src):
            sample = src.get(0)
        shapes = _value_shapes(graph, ctx, sample) if not seen else {}
        for L in layers:
            _set_costs(L, seen.get(L.x.name) or shapes.get(L.x.name))
            if o.conv_mode == "channel":
                L.forms = [f for f in L.forms if f.name != "spatial"]
            elif o.conv_mode != "auto" and L.kind == "conv":
                L.forms = [f for f in L.forms if f.name == o.conv_mode]
            cov = covs.get(_cov_key(L))
            for f in L.forms:
                fcov = f.cov_from_patch(cov) if cov is not None else None
                ck = ("svd.svd", L.node.name, L.node.inputs[1].name, L.x.name, f.name, fcov is not None, o.ridge)
                if ck not in ctx.cache:
                    ctx.cache[ck] = whitened_svd(f.W, fcov, o.ridge)
                f.svd = ctx.cache[ck]
                f.whitened = f.svd[0] is not None

        self._choose_ranks(layers, ctx, graph, o)
        chosen = [L for L in layers if L.form is not None]
        vcovs = {}
        if val is not None and chosen:
            vcovs, _ = _covariances(chosen, ctx, graph, val, 8, o.max_positions, "validation")

        records = []
        p_before = p_after = 0
        m_before = m_after = 0.0
        macs_known = True
        emitted = 0
        for L in layers:
            rec = {"layer": L.node.name, "op": L.node.op, "shape": list(np.shape(constant_value(L.node.inputs[1]))),
                   "params_before": L.params, "macs_before": _int(L.macs)}
            if L.form is None:
                rec.update(rank=None, params_after=L.params, macs_after=_int(L.macs),
                           reason=L.record.get("reason", "no rank pays (k(n+m) >= nm, or more MACs)"))
                records.append(rec)
                continue
            f, k = L.form, L.rank
            s = f.svd[2].astype(np.float64)
            e = s ** 2
            tot = max(float(e.sum()), 1e-300)
            A, B = factorize(f.W, k, svd=f.svd)
            pred = float(e[k:].sum()) / tot
            rec.update(form=f.name, rank=int(k), full_rank=int(len(s)), whitened=bool(f.whitened),
                       exact_prediction=bool(f.whitened and f.exact_whitening),
                       energy_kept=1.0 - pred, predicted_error=pred,
                       params_after=int(k * f.params_per_rank),
                       macs_after=_int(_form_cost(L, f, k, "macs")) if L.macs is not None else None)
            if "sensitivity" in L.record:
                rec["sensitivity"] = L.record["sensitivity"]
            if o.latency:
                t = _layer_latency(L, A, B, ctx)
                if t is not None:
                    rec["latency_ms"] = [t[0], t[1]]
                    if t[1] >= t[0]:
                        rec.update(rank=None, params_after=L.params, macs_after=_int(L.macs),
                                   reason=f"factor pair measured slower ({t[1]:.3f} ms >= {t[0]:.3f} ms)")
                        records.append(rec)
                        continue
            vc = vcovs.get(_cov_key(L))
            if vc is not None:
                E = f.to_view(f.W - A @ B)
                ref = L.ref.astype(np.float64)
                den = float(np.einsum("ij,ik,kj->", ref, vc, ref))
                num = float(np.einsum("ij,ik,kj->", E, vc, E))
                rec["measured_error"] = num / den if den > 0 else None
            _emit(graph, L, A, B)
            emitted += 1
            records.append(rec)
        for r in records:
            p_before += r["params_before"]
            p_after += r["params_after"]
            if r["macs_before"] is None or r["macs_after"] is None:
                macs_known = False
            else:
                m_before += r["macs_before"]
                m_after += r["macs_after"]
        graph.cleanup().toposort()
        stats["layers"] = records
        stats["factorized"] = emitted
        stats["candidates"] = len(layers)
        stats["params_before"] = p_before
        stats["params_after"] = p_after
        stats["macs_before"] = int(m_before) if macs_known else None
        stats["macs_after"] = int(m_after) if macs_known else None
        reason = "" if emitted else f"no layer has a paying rank at {self.describe_strength()}"
        return PassResult(graph, bool(emitted) or bool(folded), stats, reason=reason)

    # ---------------------------------------------------------------- ranks
    def _choose_ranks(self, layers, ctx, graph, o):
        what = _cost_cols(o)
        if o.ranks:
            for L in layers:
                form, k = o.ranks.get(L.node.name, (None, 0))
                match = [f for f in L.forms if f.name == form or (not form and len(L.forms) == 1)]
                L.form, L.rank = (match[0], min(k, len(match[0].svd[2]))) if match and k > 0 else (None, 0)
                if L.form is None:
                    L.record["reason"] = "not in the given ranks"
            return
        if o.rule == "energy":
            for L in layers:
                L.form, L.rank = _pick_form_energy(L, o.energy, o.rank_multiple)
            return
        for L in layers:
            L.form = _pick_form_global(L)
        if o.rule == "params":
            ranks = _allocate_budget(layers, o.ratio, what, o.rank_multiple)
        elif o.rule == "error" or ctx.budget is None or ctx.evaluator is None:
            ranks = _allocate_error(layers, o.max_error, what, o.rank_multiple)
        else:
            ranks = self._fit(layers, ctx, graph, o, what)
        for L in layers:
            if id(L) in ranks:
                L.rank = ranks[id(L)]
            else:
                L.form = None

    def _fit(self, layers, ctx, graph, o, what):
        """Bisect log(max_error) so the factored model keeps ctx.budget (evaluated end to end).

        With ``sensitivity`` each layer's relative error is first weighted by its measured effect:
        the layer alone is factored at a probe rank (predicted relative error e_l), the model's
        relative output MSE d_l is measured, and w_l = d_l / e_l; the allocation then spends a
        budget of predicted model-output MSE, ``sum_l w_l e_l``."""
        pos = {id(n): i for i, n in enumerate(graph.nodes)}
        index = {id(L): pos[id(L.node)] for L in layers}

        def build(ranks):
            g = graph.copy()
            nodes = list(g.nodes)
            for L in layers:
                if id(L) not in ranks:
                    continue
                A, B = factorize(L.form.W, ranks[id(L)], svd=L.form.svd)
                tmp = dataclasses.replace(L, node=nodes[index[id(L)]])
                tmp.form = L.form
                _emit(g, tmp, A, B)
            g.cleanup().toposort()
            return ctx.evaluate(g)

        weights = self._sensitivities(layers, ctx, build) if o.sensitivity else None

        def trial(err):
            ranks = _allocate_error(layers, err, what, o.rank_multiple, weights)
            return ranks, ctx.budget_holds(build(ranks), o.margin)

        lo, hi = math.log(1e-6), math.log(1.0) if weights else math.log(max(o.max_error, 1e-4) * 30)
        best = {}
        ranks, ok = trial(math.exp(hi))
        if ok:
            return ranks
        for _ in range(7):
            mid = (lo + hi) / 2
            ranks, ok = trial(math.exp(mid))
            if ok:
                lo, best = mid, ranks
            else:
                hi = mid
        if not best:
            ranks, ok = trial(math.exp(lo))
            best = ranks if ok else {}
        return best

    def _sensitivities(self, layers, ctx, build):
        """{id(layer): d_l / e_l}: measured relative output MSE per unit of predicted relative
        layer error, each layer factored alone at a probe rank (cached across back-off attempts)."""
        weights = {}
        for L in ctx.progress.track(layers, "svd: layer sensitivity"):
            s = L.form.svd[2].astype(np.float64)
            e = s ** 2
            tot = max(float(e.sum()), 1e-300)
            tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]]) / tot  # tail[k] = error at rank k
            limit = max(1, int(0.5 * L.params / L.form.params_per_rank))
            k = min(limit, max(1, int(np.searchsorted(-tail, -0.01))))
            k = min(k, len(s) - 1) if len(s) > 1 else 1
            key = ("svd.sens", L.node.name, L.node.inputs[1].name, L.form.name, bool(L.form.whitened), k)
            if key not in ctx.cache:
                pred = float(tail[k])
                d = float(build({id(L): k}).get("mse", 0.0)) if pred > 0 else 0.0
                ctx.cache[key] = max(d, 1e-12) / max(pred, 1e-12)
            weights[id(L)] = ctx.cache[key]
            L.record["sensitivity"] = weights[id(L)]
        return weights


# ------------------------------------------------------------------------------------- options


def parse_ranks(value) -> dict[str, list]:
    """``ranks`` as {layer: [form, rank]}, from a mapping (values [form, rank] or "FORM:RANK"), a
    list of LAYER=FORM:RANK items or one comma-separated string of them (CLI, recipes); an item
    splits at its last ``=`` and the spec at its last ``:`` (``LAYER=RANK``: form "", the layer's
    only form); a later item of the same layer wins. UsageError for a malformed item."""
    out = {}
    for layer, spec in keyed_items(value, "svd.ranks", "LAYER=FORM:RANK"):
        if isinstance(spec, str):
            form, _, rank = spec.rpartition(":")
        elif isinstance(spec, (list, tuple)) and len(spec) == 2:
            form, rank = spec
        else:
            raise UsageError(f"option svd.ranks: the rank of {layer!r} must be [FORM, RANK] (got {spec!r})")
        try:
            out[str(layer)] = [str(form or ""), int(rank)]
        except (TypeError, ValueError):
            raise UsageError(f"option svd.ranks: the rank of {layer!r} is no whole number (got {rank!r})") from None
    return out


# ---------------------------------------------------------------------------------------- math


def _ridge(cov: np.ndarray, ridge: float) -> np.ndarray:
    d = float(np.mean(np.diag(cov))) if cov.size else 0.0
    if not np.isfinite(d) or d <= 0:
        return np.eye(cov.shape[0])
    return cov + (ridge * d) * np.eye(cov.shape[0])


def whitened_svd(W: np.ndarray, cov: np.ndarray | None, ridge: float = 1e-4):
    """SVD of ``L^T W`` (``L L^T = cov + ridge``), or of W when cov is None.

    Returns (Linv_T, U, s, Vt) with ``W = Linv_T @ U @ diag(s) @ Vt``; Linv_T is None when plain."""
    W = W.astype(np.float64)
    if cov is None:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return None, U, s, Vt
    c = _ridge(cov.astype(np.float64), ridge)
    for attempt in range(4):
        try:
            L = np.linalg.cholesky(c)
            break
        except np.linalg.LinAlgError:  # numerically not PD yet: raise the ridge tenfold
            c = _ridge(cov.astype(np.float64), ridge * 10 ** (attempt + 1))
    else:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return None, U, s, Vt
    U, s, Vt = np.linalg.svd(L.T @ W, full_matrices=False)
    Linv_T = np.linalg.solve(L.T, np.eye(L.shape[0]))
    return Linv_T, U, s, Vt


def factorize(W: np.ndarray, k: int, cov: np.ndarray | None = None, ridge: float = 1e-4, svd=None):
    """Rank-k factors (A, B) of W (n x m) minimising ``|L^T (W - A B)|_F`` (plain Frobenius without cov)."""
    Linv_T, U, s, Vt = svd if svd is not None else whitened_svd(W, cov, ridge)
    r = np.sqrt(s[:k])
    A = U[:, :k] * r
    if Linv_T is not None:
        A = Linv_T @ A
    B = r[:, None] * Vt[:k]
    return A, B


def _energy_rank(s: np.ndarray, energy: float) -> int:
    e = s.astype(np.float64) ** 2
    tot = float(e.sum())
    if tot <= 0:
        return 1
    kept = np.cumsum(e) / tot
    return int(min(len(s), np.searchsorted(kept, energy - 1e-12) + 1))


def _round_rank(k: int, multiple: int, full: int) -> int:
    if multiple > 1:
        k = int(math.ceil(k / multiple) * multiple)
    return max(1, min(k, full))


# ------------------------------------------------------------------------------------ layers


@dataclass
class _Form:
    """One way to factor a layer: the matrix to factor, its whitening covariance, its costs."""

    name: str
    W: np.ndarray            # (n x m) matrix factored as A (n x k) B (k x m)
    cov_from_patch: object   # callable(full cov) -> cov for this form's rows, or None (no data)
    params_per_rank: int
    macs_per_rank: float     # MACs per rank unit, for one inference at the seen shapes (or per row)
    exact_whitening: bool
    svd: tuple | None = None
    to_view: object = None   # callable(mat n x m) -> the layer's reference matrix view (for errors)
    whitened: bool = False   # the svd is of the whitened matrix (set with ``svd``)


@dataclass
class _Layer:
    node: gs.Node
    kind: str                # matmul | gemm | conv
    x: gs.Tensor
    ref: np.ndarray          # reference view: linear W (n x m); conv channel-out matrix (Cin kh kw, Cout)
    params: int
    macs: float | None
    rows: float | None = None  # linear: rows per inference; conv: output positions
    geom: ConvGeometry | None = None
    weight: np.ndarray | None = None
    in_hw: tuple | None = None
    out_hw: tuple | None = None
    forms: list = field(default_factory=list)
    x_shape: list | None = None
    cov_key: tuple = ()
    form: _Form | None = None
    rank: int = 0
    record: dict = field(default_factory=dict)


def _find_layers(graph: gs.Graph, o) -> tuple[list[_Layer], list[dict]]:
    layers, skipped = [], []
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op not in o.ops or node.op not in ("MatMul", "Gemm", "Conv"):
            continue
        name = node.name or node.outputs[0].name
        if len(node.inputs) < 2:
            continue
        w = constant_value(node.inputs[1])
        if w is None or constant_value(node.inputs[0]) is not None:
            continue
        if w.dtype.kind != "f":
            skipped.append({"layer": name, "op": node.op, "reason": f"weight dtype {w.dtype} is not float"})
            continue
        if w.size < o.min_params:
            continue
        view, why_not = weight_view(node.op, w.shape, node.attrs)
        if view is None:
            skipped.append({"layer": name, "op": node.op, "reason": why_not})
            continue
        if view.kind == "matmul":
            layers.append(_Layer(node, "matmul", node.inputs[0], w, int(w.size), None))
        elif view.kind == "gemm":
            W = (w.T if node_attr(node, "transB", 0) else w) * float(node_attr(node, "alpha", 1.0))
            layers.append(_Layer(node, "gemm", node.inputs[0], W, int(w.size), None))
        else:
            Cout, Cin, kh, kw = w.shape
            geom = ConvGeometry.from_attrs(node.attrs, (kh, kw))
            ref = w.reshape(Cout, -1).T
            layers.append(_Layer(node, "conv", node.inputs[0], ref, int(w.size), None, geom=geom, weight=w))
        if node.outputs and id(node.outputs[0]) in outputs:
            pass  # the second factor writes the same tensor, so graph outputs are fine
    return layers, skipped


def _value_shapes(graph: gs.Graph, ctx: Context, sample: dict | None) -> dict:
    from onnxshrink.graph.shapes import fix_input_shapes, infer_shapes, value_shapes
    try:
        model = ctx.to_model(graph)
        if sample:
            fix_input_shapes(model, {k: list(v.shape) for k, v in sample.items()})
        return value_shapes(infer_shapes(model))
    except Exception:
        return {}


def _known(shape) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)


def _set_costs(layer: _Layer, x_shape) -> None:
    """Rows/positions, MACs before, and the candidate forms with their per-rank costs."""
    layer.x_shape = list(x_shape) if _known(x_shape) else None
    if layer.kind in ("matmul", "gemm"):
        n, m = layer.ref.shape
        layer.rows = float(np.prod(x_shape[:-1])) if _known(x_shape) and len(x_shape) >= 2 else None
        layer.macs = layer.rows * n * m if layer.rows is not None else None
        rows = layer.rows if layer.rows is not None else 1.0
        layer.forms = [_Form("linear", layer.ref, lambda c: c, n + m, rows * (n + m), True, to_view=lambda M: M)]
        return
    w, g = layer.weight, layer.geom
    Cout, Cin, kh, kw = w.shape
    if _known(x_shape) and len(x_shape) == 4:
        H, W = x_shape[2], x_shape[3]
        OH, OW = g.out_hw(H, W)
        layer.in_hw, layer.out_hw = (H, W), (OH, OW)
        out_pos, known = float(OH * OW * x_shape[0]), True
        in_pos, row_pos = float(H * W * x_shape[0]), float(OH * W * x_shape[0])
    else:  # unknown sizes: costs per output position, inputs estimated from the strides
        out_pos, known = 1.0, False
        in_pos, row_pos = float(g.sh * g.sw), float(g.sw)
    layer.rows = out_pos
    layer.macs = out_pos * w.size if known else None
    D = Cin * kh * kw
    forms = [_Form("channel_out", layer.ref, lambda c: c, D + Cout, out_pos * (D + Cout), True,
                   to_view=lambda M: M)]
    if kh * kw > 1 and g.auto_pad in ("", "NOTSET"):
        Wb = w.transpose(1, 0, 2, 3).reshape(Cin, Cout * kh * kw)

        def cov_b(c, Cin=Cin, kh=kh, kw=kw):
            c6 = c.reshape(Cin, kh, kw, Cin, kh, kw)
            return np.mean([c6[:, i, j, :, i, j] for i in range(kh) for j in range(kw)], axis=0)

        def view_b(M, Cin=Cin, Cout=Cout, kh=kh, kw=kw):
            return M.reshape(Cin, Cout, kh, kw).transpose(1, 0, 2, 3).reshape(Cout, -1).T

        forms.append(_Form("channel_in", Wb, cov_b, Cin + Cout * kh * kw,
                           in_pos * Cin + out_pos * Cout * kh * kw, False, to_view=view_b))
        if kh > 1 and kw > 1:
            Ws = w.transpose(1, 2, 0, 3).reshape(Cin * kh, Cout * kw)

            def cov_s(c, Cin=Cin, kh=kh, kw=kw):
                c6 = c.reshape(Cin, kh, kw, Cin, kh, kw)
                return np.mean([c6[:, :, j, :, :, j].reshape(Cin * kh, Cin * kh) for j in range(kw)], axis=0)

            def view_s(M, Cin=Cin, Cout=Cout, kh=kh, kw=kw):
                return M.reshape(Cin, kh, Cout, kw).transpose(2, 0, 1, 3).reshape(Cout, -1).T

            forms.append(_Form("spatial", Ws, cov_s, Cin * kh + Cout * kw,
                               row_pos * Cin * kh + out_pos * Cout * kw, False, to_view=view_s))
    layer.forms = forms


# ------------------------------------------------------------------------------ covariances


def _cov_key(layer: _Layer) -> tuple:
    if layer.kind == "conv":
        g = layer.geom
        return ("patch", layer.x.name, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, tuple(g.pads), g.auto_pad)
    return ("rows", layer.x.name)


def _covariances(layers: list[_Layer], ctx: Context, graph, source, n: int, max_positions: int, tag: str):
    """{cov key: mean covariance} of the layers' inputs over the first n samples of ``source``,
    streamed one sample at a time; also returns {tensor name: shape of the first sample}."""
    from onnxshrink.data import Subset
    keys = {}
    for L in layers:
        keys.setdefault(_cov_key(L), L)
    cache_key = ("svd.cov", tag, n, max_positions, tuple(sorted(keys)))
    if cache_key in ctx.cache:
        return ctx.cache[cache_key]
    sub = Subset(source, range(min(n, len(source))))
    names = sorted({L.x.name for L in layers})
    sums = {k: None for k in keys}
    counts = {k: 0 for k in keys}
    shapes = {}
    rng = np.random.default_rng(ctx.seed)
    for acts in ctx.progress.track(ctx.capture(graph, names, sub), f"svd: {tag} activations", total=len(sub)):
        for k, L in keys.items():
            x = np.asarray(acts[L.x.name])
            shapes.setdefault(L.x.name, list(x.shape))
            if L.kind == "conv":
                if x.ndim != 4:
                    continue
                pos = sample_positions(L.geom.n_positions(x.shape), max_positions, rng)
                c, cnt = patch_covariance(x, L.geom, pos, chunk=1024)[0], len(pos)
            else:
                X = x.reshape(-1, x.shape[-1]).astype(np.float64)
                c, cnt = X.T @ X, X.shape[0]
            sums[k] = c if sums[k] is None else sums[k] + c
            counts[k] += cnt
    covs = {k: (sums[k] / counts[k]) for k in keys if sums[k] is not None and counts[k]}
    ctx.cache[cache_key] = (covs, shapes)
    return covs, shapes


# ------------------------------------------------------------------------------ rank choice


def _cost_cols(o):
    return "macs" if o.budget_on == "macs" else "params"


def _form_cost(layer, form, k, what):
    return k * (form.params_per_rank if what == "params" else form.macs_per_rank)


def _orig_cost(layer, what):
    if what == "params":
        return float(layer.params)
    return float(layer.rows * layer.params) if layer.rows is not None else float(layer.params)


def _pays(layer, form, k) -> bool:
    return (k * form.params_per_rank < layer.params
            and _form_cost(layer, form, k, "macs") < _orig_cost(layer, "macs"))


def _pick_form_energy(layer, energy, multiple):
    """Per layer: the paying form with the fewest MACs at the rank keeping ``energy``."""
    best = None
    for f in layer.forms:
        s = f.svd[2]
        k = _round_rank(_energy_rank(s, energy), multiple, len(s))
        if not _pays(layer, f, k):
            continue
        key = (_form_cost(layer, f, k, "macs"), k * f.params_per_rank)
        if best is None or key < best[0]:
            best = (key, f, k)
    return (best[1], best[2]) if best else (None, 0)


def _pick_form_global(layer):
    """For global allocation one form per layer: the lowest predicted error at half the cost."""
    best = None
    for f in layer.forms:
        s = f.svd[2]
        e = s.astype(np.float64) ** 2
        tot = max(float(e.sum()), 1e-300)
        k = max(1, int(0.5 * layer.params / f.params_per_rank))
        k = min(k, len(s))
        err = float(e[k:].sum()) / tot
        if best is None or err < best[0]:
            best = (err, f)
    return best[1]


def _allocate_error(layers, max_error, what, multiple, weights=None):
    """Drop the cheapest singular values (relative error per cost saved) until the summed
    predicted relative error reaches max_error; layers whose rank does not pay drop out and the
    allocation is redone without them. ``weights`` ({id(layer): w}) scale each layer's relative
    error into its measured effect on the model's output (sensitivity)."""
    weights = weights or {}
    active = list(layers)
    ranks = {}
    for _ in range(4):
        items = []
        for L in active:
            s = L.form.svd[2]
            e = s.astype(np.float64) ** 2
            tot = max(float(e.sum()), 1e-300) / weights.get(id(L), 1.0)
            cpr = _form_cost(L, L.form, 1, what)
            for i in range(len(s) - 1, 0, -1):  # never below rank 1
                items.append((e[i] / tot / cpr, e[i] / tot, id(L), i))
        items.sort()
        spent = 0.0
        k = {id(L): len(L.form.svd[2]) for L in active}
        for ratio, err, lid, i in items:
            if spent + err > max_error:
                break
            spent += err
            k[lid] = min(k[lid], i)
        new_active = []
        for L in active:
            kk = _round_rank(k[id(L)], multiple, len(L.form.svd[2]))
            ranks[id(L)] = kk
            if _pays(L, L.form, kk):
                new_active.append(L)
        if len(new_active) == len(active):
            break
        active = new_active
    return {id(L): ranks[id(L)] for L in active}


def _allocate_budget(layers, ratio, what, multiple):
    """Spend ``ratio`` of the layers' original cost on singular values in order of relative
    output energy per unit cost (a layer whose factors would not pay keeps its original cost)."""
    total = sum(_orig_cost(L, what) for L in layers)
    budget = ratio * total
    heap = []
    k = {}
    for L in layers:
        s = L.form.svd[2]
        e = s.astype(np.float64) ** 2
        tot = max(float(e.sum()), 1e-300)
        k[id(L)] = 0
        cpr = _form_cost(L, L.form, 1, what)
        heapq.heappush(heap, (-(e[0] / tot) / cpr, id(L), 0, L))
    spent = 0.0
    chosen = {}
    while heap:
        neg, lid, i, L = heapq.heappop(heap)
        cpr = _form_cost(L, L.form, 1, what)
        if spent + cpr > budget:
            break
        spent += cpr
        k[lid] = i + 1
        s = L.form.svd[2]
        if i + 1 < len(s):
            e = s.astype(np.float64) ** 2
            heapq.heappush(heap, (-(e[i + 1] / max(float(e.sum()), 1e-300)) / cpr, lid, i + 1, L))
    for L in layers:
        kk = _round_rank(max(k[id(L)], 1), multiple, len(L.form.svd[2]))
        if _pays(L, L.form, kk):
            chosen[id(L)] = kk
    return chosen


# ------------------------------------------------------------------------------- emission


def _emit(graph: gs.Graph, layer: _Layer, A: np.ndarray, B: np.ndarray) -> None:
    node, form = layer.node, layer.form
    dtype = np.asarray(constant_value(node.inputs[1])).dtype
    base = node.name or node.outputs[0].name
    y = node.outputs[0]
    x = node.inputs[0]
    t = gs.Variable(f"{base}_svd_mid", dtype=dtype)
    k = A.shape[1]
    if layer.kind in ("matmul", "gemm"):
        a = gs.Constant(f"{base}_svd_A", A.astype(dtype))
        b = gs.Constant(f"{base}_svd_B", B.astype(dtype))
        n1 = gs.Node("MatMul", f"{base}_svd_1", inputs=[x, a], outputs=[t])
        if layer.kind == "gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            n2 = gs.Node("Gemm", f"{base}_svd_2", attrs={"alpha": 1.0, "beta": float(node_attr(node, "beta", 1.0)),
                                                           "transA": 0, "transB": 0},
                         inputs=[t, b, node.inputs[2]], outputs=[y])
        else:
            n2 = gs.Node("MatMul", f"{base}_svd_2", inputs=[t, b], outputs=[y])
    else:
        g = layer.geom
        Cout, Cin, kh, kw = layer.weight.shape
        bias = list(node.inputs[2:3]) if len(node.inputs) > 2 and node.inputs[2].name else []
        common = {k_: v for k_, v in node.attrs.items() if k_ not in ("kernel_shape", "strides", "pads",
                                                                     "dilations", "group", "auto_pad")}
        if form.name == "channel_out":
            w1 = A.T.reshape(k, Cin, kh, kw)
            w2 = B.T.reshape(Cout, k, 1, 1)
            a1 = dict(node.attrs)
            a1.update(kernel_shape=[kh, kw], group=1)
            a2 = dict(common, kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        elif form.name == "channel_in":
            w1 = A.T.reshape(k, Cin, 1, 1)
            w2 = B.reshape(k, Cout, kh, kw).transpose(1, 0, 2, 3)
            a1 = dict(common, kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
            a2 = dict(node.attrs)
            a2.update(kernel_shape=[kh, kw], group=1)
        else:  # spatial
            t_, l_, b_, r_ = g.pads
            w1 = A.T.reshape(k, Cin, kh)[..., None]
            w2 = B.reshape(k, Cout, kw).transpose(1, 0, 2)[:, :, None, :]
            a1 = dict(common, kernel_shape=[kh, 1], strides=[g.sh, 1], pads=[t_, 0, b_, 0], dilations=[g.dh, 1],
                      group=1)
            a2 = dict(common, kernel_shape=[1, kw], strides=[1, g.sw], pads=[0, l_, 0, r_], dilations=[1, g.dw],
                      group=1)
        c1 = gs.Constant(f"{base}_svd_W1", np.ascontiguousarray(w1).astype(dtype))
        c2 = gs.Constant(f"{base}_svd_W2", np.ascontiguousarray(w2).astype(dtype))
        n1 = gs.Node("Conv", f"{base}_svd_1", attrs=a1, inputs=[x, c1], outputs=[t])
        n2 = gs.Node("Conv", f"{base}_svd_2", attrs=a2, inputs=[t, c2] + bias, outputs=[y])
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend([n1, n2])


def _layer_latency(layer: _Layer, A: np.ndarray, B: np.ndarray, ctx: Context, runs: int = 20):
    """(original ms, factor pair ms) of the layer alone at its seen input shape, one thread;
    None when the input shape is unknown."""
    from onnxshrink.runtime import measure_latency
    if layer.x_shape is None:
        return None
    node = layer.node
    dtype = np.asarray(constant_value(node.inputs[1])).dtype
    times = []
    for factored in (False, True):
        x = gs.Variable("x", dtype=dtype, shape=layer.x_shape)
        y = gs.Variable("y", dtype=dtype)
        ins = [x] + [gs.Constant(f"c{i}", np.asarray(constant_value(t))) if t.name else t
                     for i, t in enumerate(node.inputs[1:], 1)]
        n = gs.Node(node.op, "layer", attrs=dict(node.attrs), inputs=ins, outputs=[y])
        g = gs.Graph(nodes=[n], inputs=[x], outputs=[y], opset=_opset(ctx))
        if factored:
            _emit(g, dataclasses.replace(layer, node=n), A, B)
            g.cleanup().toposort()
        model = gs.export_onnx(g, do_type_check=False)
        feeds = {"x": np.random.default_rng(0).standard_normal(layer.x_shape).astype(dtype)}
        times.append(measure_latency(model, feeds, runs=runs, warmup=3, threads=1))
    return times[0], times[1]


def _opset(ctx: Context) -> int:
    t = ctx.template
    if t is not None:
        for o in t.opset_import:
            if o.domain in ("", "ai.onnx"):
                return int(o.version)
    return 17


def _int(v):
    return None if v is None else int(round(v))
