"""Low-rank factorization of Gemm/MatMul/Conv weights, whitened by calibration activations.

Linear layers. A MatMul/Gemm with a constant weight computes ``y = x W`` with W (n x m) (for
Gemm ``W = alpha * op(B)``, transB applied; ``beta * C`` stays on the second factor). It becomes
``y = (x A) B`` with A (n x k), B (k x m): params and MACs per row go from n m to k (n + m), so a
rank pays only when ``k < n m / (n + m)``.

The math of the factorization is in ``factorization.py``, the layers and their forms in
``layers.py``, the rank choice across layers in ``ranks.py``.

Per layer the stats hold: form, rank (and full rank), energy kept, params and MACs before and
after, the predicted relative output error and the error measured on the validation samples
(``tr(E^T Cv E) / tr(W^T Cv W)`` with Cv the validation inputs' (patch) covariance and E the
weight error: exactly the layer's relative output error on those samples, bias excluded).
"""

from __future__ import annotations

__all__ = ["SvdOptions", "SvdPass", "parse_ranks"]

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import UsageError
from onnxshrink.graph.values import constant_value
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.options import keyed_items
from onnxshrink.passes.registry import register
from onnxshrink.passes.svd.factorization import factorize, whitened_svd
from onnxshrink.passes.svd.knob import SvdKnob
from onnxshrink.passes.svd.layers import (
    as_int,
    covariance_key,
    covariances,
    emit_factors,
    find_layers,
    layer_latency,
    layer_value_shapes,
    set_costs,
)
from onnxshrink.passes.svd.ranks import (
    allocate_budget,
    allocate_error,
    cost_columns,
    form_cost,
    pick_form_energy,
    pick_form_global,
)

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


_NOT_RUN = object()  # SvdPass._distinct_weaker before a run


def data_ranks(covs: dict, rows: dict, cache: dict) -> dict:
    """{cov key: (rank, dims)} of the covariances summed over fewer rows than their dims (``rows``):
    their numerical rank (repeated samples add rows but no rank; ``covariance_rank``). A covariance
    of at least as many rows as dims is taken at full rank (not computed)."""
    out = {}
    for k, c in covs.items():
        d = c.shape[0]
        if rows.get(k, d) >= d:
            continue
        ck = ("svd.data_rank", k, rows[k], d)
        if ck not in cache:
            cache[ck] = covariance_rank(c, rows[k])
        out[k] = (cache[ck], d)
    return out


def covariance_rank(c: np.ndarray, rows: int, seed: int = 0) -> int:
    """The numerical rank of a d x d covariance summed over ``rows`` < d rows (so of rank <= rows): the
    rank of ``Y = C G`` for a Gaussian G of ``rows + 10`` columns (the range of C, of dimension <=
    rows, is Y's with probability 1), by numpy's default tolerance (singular values of Y above
    ``max(s) max(d, l) eps``); C's own eigenvalues when rows + 10 is half of d or more. d^2 (rows + 10)
    + d (rows + 10)^2 flops instead of the d^3 of C's eigenvalues: a 3x3 convolution's patches over
    300 rows, d = 2304, in 4.7 s instead of 26 s on loaded cores (ResNet-18 at 160 x 160, whose
    512-channel layers have d = 4608, spent minutes here)."""
    d = c.shape[0]
    width = min(d, int(rows) + 10)
    if 2 * width > d:  # no cheaper than C's own eigenvalues
        return int(np.linalg.matrix_rank(c, hermitian=True))
    g = np.random.default_rng(seed).standard_normal((d, width))
    return int(np.linalg.matrix_rank(c.astype(np.float64) @ g))


def weaker_options(o: SvdOptions) -> SvdOptions | None:
    """The next weaker strength of ``o``'s rule: more energy kept (the unkept part / 3), a larger
    ratio (half the way to 1), a wider fit margin (+0.3), a smaller max_error (/ 4); None at the end."""
    if o.rule == "energy":
        return None if o.energy >= 0.99999 else dataclasses.replace(o, energy=1 - (1 - o.energy) / 3)
    if o.rule == "params":
        return None if o.ratio >= 0.97 else dataclasses.replace(o, ratio=o.ratio + (1 - o.ratio) / 2)
    if o.rule == "fit":
        return None if o.margin >= 0.9 else dataclasses.replace(o, margin=min(0.9, o.margin + 0.3))
    return None if o.max_error <= 1e-5 else dataclasses.replace(o, max_error=o.max_error / 4)


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
        """The next weaker strength (``weaker_options``); after a run, the first of them whose rank
        choice differs from the run's (``_first_distinct_weaker``): a strength that picks the same
        ranks builds the same model, so the manager's back-off would refuse it again."""
        o = getattr(self, "_distinct_weaker", _NOT_RUN)
        if o is _NOT_RUN:
            o = weaker_options(self.options)
        return None if o is None else SvdPass(o)

    # ---------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        stats: dict = {"rule": o.rule}
        folded = []
        if o.fold:
            from onnxshrink.passes.fold import fold_linear_pairs
            folded = fold_linear_pairs(graph, ctx)
            stats["folded"] = folded
        layers, skipped = find_layers(graph, o)
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
        covs, seen, rows = ({}, {}, {})
        if calib is not None:
            covs, seen, rows = covariances(layers, ctx, graph, calib, o.samples, o.max_positions, "calibration")
        # only the energy rule reads them (``_starved``); a numerical rank is O(d^3)
        self._data_ranks = data_ranks(covs, rows, ctx.cache) if o.rule == "energy" and not o.ranks else {}
        stats["whitened"] = calib is not None
        if calib is None:
            stats["whitening"] = ("off (whiten=false)" if not o.whiten else
                                  "off: no calibration data (plain SVD of the weights)")
        sample = None
        src = calib or val or ctx.calib
        if src is not None and len(src):
            sample = src.get(0)
        shapes = layer_value_shapes(graph, ctx, sample) if not seen else {}
        for L in layers:
            set_costs(L, seen.get(L.x.name) or shapes.get(L.x.name))
            if o.conv_mode == "channel":
                L.forms = [f for f in L.forms if f.name != "spatial"]
            elif o.conv_mode != "auto" and L.kind == "conv":
                L.forms = [f for f in L.forms if f.name == o.conv_mode]
            cov = covs.get(covariance_key(L))
            for f in L.forms:
                fcov = f.cov_from_patch(cov) if cov is not None else None
                ck = ("svd.svd", L.node.name, L.node.inputs[1].name, L.x.name, f.name, fcov is not None, o.ridge)
                if ck not in ctx.cache:
                    ctx.cache[ck] = whitened_svd(f.W, fcov, o.ridge)
                f.svd = ctx.cache[ck]
                f.whitened = f.svd[0] != "plain"

        self._choose_ranks(layers, ctx, graph, o)
        self._distinct_weaker = self._first_distinct_weaker(layers, ctx, graph, o, stats)
        chosen = [L for L in layers if L.form is not None]
        vcovs = {}
        if val is not None and chosen:
            vcovs, _, _ = covariances(chosen, ctx, graph, val, 8, o.max_positions, "validation", keep=np.float32)

        records = []
        p_before = p_after = 0
        m_before = m_after = 0.0
        macs_known = True
        emitted = 0
        for L in layers:
            rec = {"layer": L.node.name, "op": L.node.op, "shape": list(np.shape(constant_value(L.node.inputs[1]))),
                   "params_before": L.params, "macs_before": as_int(L.macs)}
            if L.form is None:
                rec.update(rank=None, params_after=L.params, macs_after=as_int(L.macs),
                           reason=L.record.get("starved") or L.record.get(
                               "reason", "no rank pays (k(n+m) >= nm, or more MACs)"))
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
                       macs_after=as_int(form_cost(L, f, k, "macs")) if L.macs is not None else None)
            if "sensitivity" in L.record:
                rec["sensitivity"] = L.record["sensitivity"]
            if o.latency:
                t = layer_latency(L, A, B, ctx)
                if t is not None:
                    rec["latency_ms"] = [t[0], t[1]]
                    if t[1] >= t[0]:
                        rec.update(rank=None, params_after=L.params, macs_after=as_int(L.macs),
                                   reason=f"factor pair measured slower ({t[1]:.3f} ms >= {t[0]:.3f} ms)")
                        records.append(rec)
                        continue
            vc = vcovs.get(covariance_key(L))
            if vc is not None:
                vc = vc.astype(np.float64)
                E = f.to_view(f.W - A @ B)
                ref = L.ref.astype(np.float64)
                # tr(X^T C X) as sum((C X) * X): one BLAS product (numpy's 3-operand einsum without
                # optimize= is one unblocked loop: 67 s instead of 1 s for a 4608 x 512 weight)
                den = float(np.sum((vc @ ref) * ref))
                num = float(np.sum((vc @ E) * E))
                rec["measured_error"] = num / den if den > 0 else None
            emit_factors(graph, L, A, B)
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
        starved = sum(1 for L in layers if L.record.get("starved"))
        reason = "" if emitted else f"no layer has a paying rank at {self.describe_strength()}" + (
            f" ({starved} whitened by calibration data of no higher rank than the one they would take: give "
            f"more samples, or whiten=false)" if starved else "")
        return PassResult(graph, bool(emitted) or bool(folded), stats, reason=reason)

    # ---------------------------------------------------------------- ranks
    def _first_distinct_weaker(self, layers, ctx, graph, o, stats):
        """The first of the weaker strengths (``weaker_options``, in turn) whose rank choice differs
        from this run's, or None when none does; the skipped ones go in ``stats["same_ranks"]``.
        Only where the choice is a function of the spectra (rules energy, params, error); ``fit``
        measures its candidates end to end, so its next strength is taken as it is. The layers'
        choice is restored. (A 2 GiB embedding model whose head is whitened by 8 calibration rows
        kept the same rank from energy 0.99 to 0.9999: five back-off attempts of 20 s, each
        refused at the same cosine.)"""
        nxt = weaker_options(o)
        if o.ranks or (o.rule == "fit" and ctx.budget is not None and ctx.evaluator is not None):
            return nxt
        mine = [(L.form, L.rank) for L in layers]
        starved = [L.record.get("starved") for L in layers]
        skipped = []
        try:
            while nxt is not None:
                self._choose_ranks(layers, ctx, graph, nxt)
                if [(L.form, L.rank) for L in layers] != mine:
                    break
                skipped.append(SvdPass(nxt).describe_strength())
                nxt = weaker_options(nxt)
        finally:
            for L, (form, rank), why in zip(layers, mine, starved):
                L.form, L.rank, L.record["starved"] = form, rank, why
        if skipped:
            stats["same_ranks"] = skipped
        return nxt

    def _starved(self, L) -> str:
        """Why ``L``'s rank says nothing about its weight, or "": whitened by a covariance of rank
        N < d (N calibration rows, positions or patches, that span N directions of d inputs), the
        whitened spectrum has N values above the ridge, so the energy rule's rank k >= N is the
        calibration's rank, and the factorization is exact on those rows whatever the weight does
        elsewhere (a 2 GiB embedding model's head, 2048 inputs whitened by 8 pooled rows: rank 8
        predicted 1e-5 error and measured 0.10 on the selection samples; every weaker energy was
        refused, 20 s each). A rank under N is the weight's and stays."""
        f = L.form
        n = self._data_ranks.get(covariance_key(L))
        if f is None or not f.whitened or n is None or L.rank < n[0]:
            return ""
        rank, d = n
        return (f"whitened by calibration data spanning {rank} of its {d} inputs: rank {L.rank} is the data's "
                f"rank, not the weight's (give more samples, or whiten=false)")

    def _choose_ranks(self, layers, ctx, graph, o):
        what = cost_columns(o)
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
                L.form, L.rank = pick_form_energy(L, o.energy, o.rank_multiple)
                L.record["starved"] = self._starved(L)
                if L.record["starved"]:
                    L.form, L.rank = None, 0
            return
        for L in layers:
            L.form = pick_form_global(L)
        if o.rule == "params":
            ranks = allocate_budget(layers, o.ratio, what, o.rank_multiple)
        elif o.rule == "error" or ctx.budget is None or ctx.evaluator is None:
            ranks = allocate_error(layers, o.max_error, what, o.rank_multiple)
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
                emit_factors(g, tmp, A, B)
            g.cleanup().toposort()
            return ctx.evaluate(g)

        weights = self._sensitivities(layers, ctx, build) if o.sensitivity else None

        def trial(err):
            ranks = allocate_error(layers, err, what, o.rank_multiple, weights)
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
