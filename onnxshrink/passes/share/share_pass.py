"""share: weight sharing (k-means codebooks, "palettization") with bit-packed indices.

Math
----
Each large float weight W (per layer, or per group of output channels) is replaced by a
codebook c in R^K, K = 2^b with b in {2, ..., 8}, and one index a_i in [0, K) per weight:
W_i ~= s_o c[a_i], s_o the RMS of output channel o (``channel_scale``; else s_o = 1).
The codebook minimises the weighted squared error (here on u_i = W_i / s_o, weights h_i s_o^2)

    E(c, a) = sum_i h_i (W_i - c[a_i])^2

- plain k-means: h_i = 1 (weight error);
- data-aware: h_i = E[x_j^2], the energy of the input feature/channel j that W_i multiplies,
  i.e. the diagonal of X^T X / N accumulated by streaming the calibration samples through
  ``ctx.capture``. For a layer y = W x the output error is E||dW x||^2 = sum_o dW_o^T (X^T X / N)
  dW_o, whose diagonal part is sum_i h_i dW_i^2: the clusters minimise (an estimate of) the
  layer's output error, not its weight error. Conv: j = the input channel (per kernel tap the
  energy is the channel's, up to borders); MatMul X@W: j = the row of W; Gemm likewise.

Error feedback (MatMul, group-1 Conv via im2col): with H = E[x x^T] over the K input features
(+1 % damping) and U the upper Cholesky factor of H^-1, the rows of W (as [K, Cout]) are
assigned in order of decreasing H_jj: a_j = nearest(W_j / s), and the not yet assigned rows
absorb the error, W_{j+1:} -= U_{j,j+1:}^T (W_j - s c[a_j]) / U_jj (GPTQ with a codebook grid),
which greedily minimises the layer's output error tr(dW^T H dW) (the loop is
``passes.gptq.gptq_feedback`` with the nearest centroid as its quantizer). It is kept only where
that error is lower than with nearest assignment.

Bit widths per layer (under a budget) come from a Lagrangian allocation:
minimise sum_l bytes_l(b_l) subject to sum_l g_l e_l(b_l) <= D, where e_l(b) is layer l's
relative weighted error sum h dW^2 / sum h W^2 and g_l its measured sensitivity (model output
relative MSE per unit of e_l, from one ``ctx.evaluate`` per layer with only that layer shared
at 3 bits; e_l uses tr(dW^T H dW) / tr(W^T H W) where H is known). Every layer may also stay
float (e = 0). For a multiplier lam each layer takes argmin_b bytes_l(b) + lam g_l e_l(b); a
binary search over the allocation breakpoints finds the smallest model whose outputs
(``ctx.evaluate``) keep the budget tightened by ``margin``. Layers interact, so when the step
at the boundary breaks the budget, the layers that stepped down there keep their bits and the
search runs again (``refine_rounds``).

The 1-D k-means is in ``codebook.py``, the bit-plane storage and its unpacking graph in
``packing.py``.
"""

from __future__ import annotations

__all__ = ["ShareOptions", "SharePass", "input_energy"]

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxshrink.graph.patches import ConvGeometry, conv_patches, sample_positions
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.gptq import gptq_feedback
from onnxshrink.passes.registry import register
from onnxshrink.passes.share.codebook import SortedValues, kmeans_1d, nearest_centroid
from onnxshrink.passes.share.packing import bit_planes, pack_indices

BIT_CHOICES = (2, 3, 4, 5, 6, 7, 8)
_FLOATS = (np.float32, np.float16, np.float64)
_NODE_OVERHEAD = 120  # bytes of graph protobuf per unpack node, for the size model


# --------------------------------------------------------------------------- the pass
@dataclass
class ShareOptions:
    """Options of the share pass (bit widths, data awareness, error feedback, search; see the module doc)."""

    bits: int | None = field(default=None, metadata={
        "help": "fixed bit width for every layer (2,3,4,6,8); default: chosen per layer under the budget "
                "(4 without a budget)"})
    bit_choices: list[int] = field(default_factory=lambda: list(BIT_CHOICES), metadata={
        "help": "bit widths the per-layer search may pick"})
    min_bits: int = field(default=2, metadata={"help": "smallest bit width the search may pick (weaker() raises it)"})
    data_aware: bool = field(default=True, metadata={
        "help": "weight each error by its input's activation energy (needs calibration data)"})
    energy_floor: float = field(default=1e-4, metadata={
        "help": "data-aware weights are at least this fraction of the layer's mean input energy"})
    error_feedback: bool = field(default=True, metadata={
        "help": "GPTQ-style assignment for MatMul/group-1 Conv weights: quantize input rows in turn and move the "
                "remaining rows to cancel the output error (uses E[x x^T] from calibration data)"})
    groups: int = field(default=1, metadata={
        "help": "codebooks per layer: 1 = per layer, G = one per group of output channels"})
    min_elements: int = field(default=1024, metadata={"help": "tensors smaller than this stay float"})
    channel_scale: bool = field(default=True, metadata={
        "help": "divide each output channel by its RMS before clustering, multiply back after the lookup"})
    codebook_dtype: Literal["float32", "float16"] = field(default="float32", metadata={
        "help": "codebook storage type (float16 adds a Cast)"})
    pin_zero: Literal["auto", "always", "never"] = field(default="auto", metadata={
        "help": "keep 0.0 as a centroid: auto = when >= 1% of the tensor is exactly zero"})
    allow_float: bool = field(default=True, metadata={"help": "the search may keep sensitive layers float"})
    sensitivity: Literal["measured", "proxy"] = field(default="measured", metadata={
        "help": "measured: one evaluate per layer for its output sensitivity; proxy: equal sensitivity"})
    refine_rounds: int = field(default=3, metadata={
        "help": "search rounds that keep back the layers whose step down broke the budget"})
    margin: float = field(default=0.2, metadata={
        "help": "tighten the budget by this fraction of its slack during the search (held-out headroom)"})
    max_samples: int = field(default=16, metadata={"help": "calibration samples for the activation energies"})


@register
class SharePass(Pass):
    """Replace large weights by a k-means codebook and bit-packed indices (Gather rebuilds them)."""

    name = "share"
    summary = "weight sharing: per-layer k-means codebooks, 2-8 bit packed indices, bits chosen under the budget"
    lossless = False
    needs_data = False
    min_opset = 11
    Options = ShareOptions

    # -------------------------------------------------------------- strength
    def weaker(self):
        o = self.options
        choices = sorted(set(o.bit_choices))
        if o.bits is not None:
            up = [b for b in choices if b > o.bits]
            return SharePass(dataclasses.replace(o, bits=up[0])) if up else None
        up = [b for b in choices if b > o.min_bits]
        return SharePass(dataclasses.replace(o, min_bits=up[0], margin=min(0.9, o.margin + 0.2))) if up else None

    def describe_strength(self) -> str:
        o = self.options
        return f"bits={o.bits}" if o.bits is not None else f"min_bits={o.min_bits}, margin={o.margin:g}"

    # -------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        for b in list(o.bit_choices) + ([o.bits] if o.bits else []):
            if not 1 <= int(b) <= 8:
                raise ValueError(f"share: bit widths must be 1..8 (got {b})")
        weights = self._find_weights(graph, o.min_elements)
        if not weights:
            return PassResult(graph, False, reason=f"no float weight with >= {o.min_elements} elements")
        base_bytes = ctx.to_model(graph).ByteSize()
        energy_used = False
        if o.data_aware and ctx.calib is not None:
            energy_used = self._energies(graph, weights, ctx)

        search = o.bits is None and ctx.budget is not None and ctx.evaluator is not None
        if o.bits is not None:
            allowed = [int(o.bits)]
        elif search:
            allowed = sorted({int(b) for b in o.bit_choices if int(b) >= o.min_bits}) or [max(o.bit_choices)]
        else:
            allowed = [max(4, o.min_bits)]
        table = {w.name: self._cluster(w, allowed, ctx) for w in weights}
        for w in weights:
            table[w.name][0] = _Choice(0, nbytes=w.values.nbytes)

        stats: dict = {"data_aware": energy_used, "layers": []}
        gains = {w.name: 1.0 for w in weights}
        if search:
            pick, gains, search_stats = self._search(graph, weights, table, allowed, ctx)
            stats.update(search_stats)
        else:
            pick = {w.name: allowed[0] for w in weights}

        consts: dict = {}
        for w in weights:
            ch = table[w.name][pick[w.name]]
            rec = {"name": w.name, "shape": list(w.values.shape), "bits": ch.bits or "float",
                   "codebook": int(ch.codebook.size) if ch.codebook is not None else 0,
                   "weight_err": ch.err_w, "output_err_est": ch.err_h,
                   "model_mse_pred": gains[w.name] * ch.err_h, "bytes_before": int(w.values.nbytes)}
            if ch.bits:
                self._emit(graph, w, ch, consts)
            stats["layers"].append(rec)
        graph.cleanup().toposort()
        shared = [r for r in stats["layers"] if r["bits"] != "float"]
        if not shared:
            return PassResult(graph, False, stats, reason="every layer stays float under the budget")
        after = ctx.to_model(graph).ByteSize()
        stats.update({
            "layers_shared": len(shared), "layers_float": len(stats["layers"]) - len(shared),
            "bits_histogram": {str(b): sum(1 for r in shared if r["bits"] == b)
                               for b in sorted({r["bits"] for r in shared})},
            "mean_bits": float(sum(r["bits"] * np.prod(r["shape"]) for r in shared)
                               / sum(np.prod(r["shape"]) for r in shared)),
            "model_bytes_before": int(base_bytes), "model_bytes_after": int(after),
            "size_ratio": after / base_bytes,
        })
        return PassResult(graph, True, stats)

    # -------------------------------------------------------------- weights
    @staticmethod
    def _find_weights(graph: gs.Graph, min_elements: int) -> list[_Weight]:
        out, seen = [], set()
        for node in graph.nodes:
            if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                v = _values(node.attrs["value"])
                if v.dtype.type in _FLOATS and v.size >= min_elements and node.outputs:
                    var = node.outputs[0]
                    out.append(_Weight(var.name, v, node=node, consumer=_consumer(var), axis=_out_axis(var, v.ndim)))
                continue
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name not in seen:
                    seen.add(t.name)
                    v = _values(t)
                    if v.dtype.type in _FLOATS and v.size >= min_elements:
                        out.append(_Weight(t.name, v, const=t, consumer=_consumer(t), axis=_out_axis(t, v.ndim)))
        return out

    def _energies(self, graph: gs.Graph, weights: list[_Weight], ctx: Context) -> bool:
        """Stream the calibration set once and accumulate E[x_j^2] for every layer's input."""
        key = ("share.energy", tuple(w.name for w in weights), self.options.max_samples)
        if key in ctx.cache:
            for w in weights:
                w.energy, w.hessian = ctx.cache[key].get(w.name, (None, None))
            return any(w.energy is not None for w in weights)
        graph_inputs = {t.name for t in graph.inputs}
        acts = sorted({w.consumer[2] for w in weights if w.consumer})
        if not acts:
            return False
        capture = [a for a in acts if a not in graph_inputs]
        sums: dict = {}
        hs: dict = {}
        count = 0
        model = ctx.to_model(graph)
        src = _limit(ctx.calib, self.options.max_samples)
        stream = ctx.capture(model, capture, samples=src) if capture else ({} for _ in src)
        for sample, got in zip(src, stream):
            vals = dict(got)
            for a in acts:
                if a in graph_inputs:
                    vals[a] = sample[a]
            for w in weights:
                if not w.consumer:
                    continue
                op, attrs, act, idx = w.consumer
                e = input_energy(op, attrs, w.values.shape, vals[act], idx)
                if e is not None:
                    sums[w.name] = sums.get(w.name, 0) + e
                if self.options.error_feedback:
                    x2 = _feature_rows(op, attrs, w.values.shape, vals[act], idx)
                    if x2 is not None:
                        hs[w.name] = hs.get(w.name, 0) + x2.T @ x2 / x2.shape[0]
            count += 1
        res = {}
        for w in weights:
            if w.name in sums and count:
                e = sums[w.name] / count
                # a feature (nearly) silent on the calibration set still gets a floor weight, so its
                # weights stay bounded when other inputs do wake it up
                floor = self.options.energy_floor * float(np.mean(e)) if np.mean(e) > 0 else 1.0
                w.energy = np.maximum(e, max(floor, 1e-30))
            if w.name in hs and count:
                w.hessian = hs[w.name] / count
            res[w.name] = (w.energy, w.hessian)
        ctx.cache[key] = res
        return any(w.energy is not None for w in weights)

    # -------------------------------------------------------------- clustering per layer
    def _cluster(self, w: _Weight, bit_list: list[int], ctx: Context) -> dict:
        """{bits: _Choice} for one weight: codebooks, labels, rebuilt tensor, errors and bytes.

        Layout: channel-major (output-channel axis first). With ``channel_scale`` the k-means
        runs on u = W / s_o (s_o the RMS of output channel o) with weights h * s_o^2, which is
        the same objective sum h (W - s_o c[a])^2 with one codebook shared by all channels."""
        o = self.options
        key = ("share.cluster", w.name, tuple(bit_list), o.groups, o.pin_zero, o.codebook_dtype, o.channel_scale,
               w.energy is not None)
        if key in ctx.cache:
            return dict(ctx.cache[key])
        v = w.values
        ax = w.axis if (w.axis is not None and v.ndim >= 2) else 0
        vt = np.moveaxis(v, ax, 0).astype(np.float64)
        h = np.moveaxis(np.broadcast_to(w.energy, v.shape), ax, 0) if w.energy is not None else None
        c_out = vt.shape[0] if v.ndim >= 2 else 1
        scale = None
        if o.channel_scale and v.ndim >= 2 and w.axis is not None:
            rms = np.sqrt(np.mean(vt.reshape(c_out, -1) ** 2, axis=1))
            # a channel of (sub)denormal weights gets scale 0: exact zeros instead of denormal products
            scale = np.where(rms > 1e-30, rms, np.where(rms > 0, 0.0, 1.0)).astype(np.float32)
        sb = scale.astype(np.float64).reshape((-1,) + (1,) * (vt.ndim - 1)) if scale is not None else 1.0
        u = vt / np.where(sb == 0, 1.0, sb) if scale is not None else vt
        hu = (h if h is not None else 1.0) * (sb ** 2 if scale is not None else 1.0)
        hu = None if (h is None and scale is None) else np.broadcast_to(hu, vt.shape)
        pin = {"always": True, "never": False}.get(o.pin_zero, float(np.mean(v == 0)) >= 0.01)
        g = _n_groups(c_out, o.groups) if v.ndim >= 2 else 1
        ug = u.reshape(g, -1)
        hg = hu.reshape(g, -1) if hu is not None else None
        half = o.codebook_dtype == "float16" or v.dtype == np.float16
        sorted_groups = [SortedValues(ug[i], None if hg is None else hg[i]) for i in range(g)]
        v64 = v.astype(np.float64)
        w2 = v64 ** 2
        hv = np.broadcast_to(w.energy, v.shape) if w.energy is not None else None
        out = {}
        for bits in bit_list:
            k = 2 ** bits
            cb = np.zeros((g, k))
            labels = np.zeros(ug.shape, np.int64)
            for i in range(g):
                c, lab = kmeans_1d(ug[i], k, pin_zero=pin, _sorted=sorted_groups[i])
                # a centroid that is zero in all but name (the mean of many tiny weights) becomes 0.0:
                # its products would be denormal floats, which slow Conv kernels by 20x
                c = np.where(np.abs(c) < 1e-6 * max(float(np.abs(c).max()), 1e-30), 0.0, c)
                if half:
                    c = np.sort(c.astype(np.float16).astype(np.float64))
                    lab = nearest_centroid(ug[i], c)
                cb[i], labels[i] = c, lab
            cb_store = cb.astype(np.float16 if half else np.float32)
            if w.hessian is not None and g == 1:
                # keep the GPTQ assignment only where its (calibration) output error is lower
                alt = _gptq_labels(w, ax, cb_store[0].astype(np.float64),
                                   scale.astype(np.float64) if scale is not None else None,
                                   pin=pin).reshape(ug.shape)
                if _hform(w, ax, cb_store, alt, scale, vt.shape) < _hform(w, ax, cb_store, labels, scale, vt.shape):
                    labels = alt
            # the same float arithmetic the graph does: lookup in the stored dtype, cast, times scale
            rt = np.take_along_axis(cb_store, labels, axis=1).astype(v.dtype).reshape(vt.shape)
            if scale is not None:
                rt = (rt * scale.reshape((-1,) + (1,) * (vt.ndim - 1)).astype(v.dtype)).astype(v.dtype)
            rebuilt = np.ascontiguousarray(np.moveaxis(rt, 0, ax))
            d2 = (v64 - rebuilt) ** 2
            err_w = float(d2.sum() / max(w2.sum(), 1e-30))
            err_h = float((d2 * hv).sum() / max((w2 * hv).sum(), 1e-30)) if hv is not None else err_w
            if w.hessian is not None:  # the full quadratic form: tr(dW^T H dW) / tr(W^T H W)
                wm, dm = _as_rows(v64, w), _as_rows(v64 - rebuilt, w)
                err_h = float(_quad(dm, w.hessian) / max(_quad(wm, w.hessian), 1e-30))
            nodes = 3 + 5 * len(bit_planes(bits)) + (1 if scale is not None else 0) + (1 if ax else 0)
            nbytes = (-(-v.size * bits // 8) + g * k * (2 if half else 4) + (scale.nbytes if scale is not None else 0)
                      + nodes * _NODE_OVERHEAD)
            out[bits] = _Choice(bits, cb_store, labels, scale, ax, rebuilt, err_w, err_h, int(nbytes))
        ctx.cache[key] = out
        return dict(out)

    # -------------------------------------------------------------- bit allocation
    def _search(self, graph, weights, table, allowed, ctx):
        """Per-layer bits: sensitivity-weighted Lagrangian allocation, binary search on the budget."""
        o = self.options
        fake = _FakeQuant(ctx.to_model(graph), weights)
        probe = min([b for b in allowed if b >= 3] or [max(allowed)])
        gains = {}
        sens_key = ("share.gain", probe, o.groups, o.pin_zero, tuple(w.name for w in weights))
        if o.sensitivity == "measured" and sens_key in ctx.cache:
            gains = ctx.cache[sens_key]
        elif o.sensitivity == "measured":
            for w in ctx.progress.track(weights, "share: layer sensitivity"):
                ch = table[w.name][probe]
                with fake.applied({w.name: ch.rebuilt}) as m:
                    d = _distortion(ctx.evaluate(m))
                gains[w.name] = d / max(ch.err_h, 1e-12)
            ctx.cache[sens_key] = gains
        else:
            gains = {w.name: 1.0 for w in weights}

        base_opts = {}
        for w in weights:
            cand = [(table[w.name][b].nbytes, gains[w.name] * table[w.name][b].err_h, b) for b in allowed]
            if o.allow_float:
                cand.append((table[w.name][0].nbytes, 0.0, 0))
            base_opts[w.name] = cand
        frozen: dict = {}  # layer -> bytes floor, after lowering it alone broke the budget
        tried: list = []
        seen: dict = {}

        def alloc(opts, lam):
            return {n: min(c, key=lambda t: (t[0] + lam * t[1], -t[2] if t[2] else -99))[2] for n, c in opts.items()}

        def size(pick):
            return sum(table[n][b].nbytes for n, b in pick.items())

        def ok(pick, lam):
            key = tuple(sorted(pick.items()))
            if key not in seen:
                upd = {w.name: table[w.name][pick[w.name]].rebuilt for w in weights if pick[w.name]}
                with fake.applied(upd) as m:
                    fid = ctx.evaluate(m)
                seen[key] = (ctx.budget_holds(fid, o.margin), fid)
                tried.append({"lambda": lam, "ok": seen[key][0], "fidelity": fid, "bytes": size(pick)})
            return seen[key]

        # the most accurate allocation first: if even that fails, nothing will pass
        best = alloc(base_opts, 1e300)
        good, best_fid = ok(best, float("inf"))
        rounds = 0
        while good and rounds <= o.refine_rounds:
            rounds += 1
            opts = {n: [t for t in c if t[0] >= frozen.get(n, 0)] for n, c in base_opts.items()}
            lams = sorted({lam for c in opts.values() for lam in _breakpoints(c)} | {0.0})
            lams.append(lams[-1] * 2 + 1e30)
            lo, hi = 0, len(lams) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                pick = alloc(opts, lams[mid])
                g_ok, fid = ok(pick, lams[mid])
                if g_ok:
                    hi = mid
                    if size(pick) < size(best):
                        best, best_fid = pick, fid
                else:
                    lo = mid + 1
            if hi == 0:
                break
            # the search is only as good as the sensitivity model: the layers whose step down broke
            # the budget at the boundary keep their bits, and the others are searched again
            here, below = alloc(opts, lams[hi]), alloc(opts, lams[hi - 1])
            culprits = [n for n in here if here[n] != below[n]]
            if not culprits:
                break
            for n in culprits:
                frozen[n] = table[n][here[n]].nbytes
        return best, gains, {"search": {"probe_bits": probe, "evaluations": len(tried) + (len(weights) if
                             o.sensitivity == "measured" else 0), "fidelity": best_fid, "steps": tried,
                             "rounds": rounds, "kept_back": sorted(frozen)}}

    # -------------------------------------------------------------- emission
    def _emit(self, graph: gs.Graph, w: _Weight, ch: _Choice, consts: dict) -> None:
        """packed planes -> indices -> Gather(codebook) -> Reshape [-> Transpose] [-> Mul scale] = weight."""
        n = w.values.size
        g, k = ch.codebook.shape
        base = _safe(w.name)
        dt = w.values.dtype
        planes = pack_indices(ch.labels.reshape(-1), ch.bits)
        idx = None
        for wd, off, packed in planes:
            tag = f"{wd}o{off}"
            p = gs.Constant(f"{base}.share.q{tag}", packed)
            t = _node(graph, "Cast", [p], f"{base}.share.c{tag}", np.int32, attrs={"to": onnx.TensorProto.INT32})
            if wd < 8:
                per = 8 // wd
                div = _const(consts, f"share.div{wd}",
                             (np.int32(1) << (wd * np.arange(per, dtype=np.int32))).reshape(1, -1))
                mod = _const(consts, f"share.mod{wd}", np.array(1 << wd, np.int32))
                t = _node(graph, "Div", [t, div], f"{base}.share.d{tag}", np.int32)
                t = _node(graph, "Mod", [t, mod], f"{base}.share.m{tag}", np.int32)
            t = _node(graph, "Reshape", [t, _const(consts, "share.flat", np.array([-1], np.int64))],
                      f"{base}.share.f{tag}", np.int32)
            if packed.shape[0] * (8 // wd) != n:
                t = _node(graph, "Slice", [t, _const(consts, "share.zero", np.array([0], np.int64)),
                                           gs.Constant(f"{base}.share.n{tag}", np.array([n], np.int64))],
                          f"{base}.share.s{tag}", np.int32)
            if off:
                t = _node(graph, "Mul", [t, _const(consts, f"share.shift{off}", np.array(1 << off, np.int32))],
                          f"{base}.share.o{tag}", np.int32)
            idx = t if idx is None else _node(graph, "Add", [idx, t], f"{base}.share.a{tag}", np.int32)
        cb_dtype = ch.codebook.dtype
        if g == 1:
            cb = gs.Constant(f"{base}.share.codebook", ch.codebook.reshape(-1))
            t = _node(graph, "Gather", [cb, idx], f"{base}.share.lookup", cb_dtype, attrs={"axis": 0})
        else:
            cb = gs.Constant(f"{base}.share.codebook", ch.codebook)
            idx2 = _node(graph, "Reshape", [idx, gs.Constant(f"{base}.share.gshape", np.array([g, -1], np.int64))],
                         f"{base}.share.gidx", np.int32)
            t = _node(graph, "GatherElements", [cb, idx2], f"{base}.share.lookup", cb_dtype, attrs={"axis": 1})
        if cb_dtype != dt:
            t = _node(graph, "Cast", [t], f"{base}.share.cast", dt,
                      attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dt)})
        steps = []  # the remaining (op, inputs, attrs); the last one writes the weight tensor
        tshape = list(np.moveaxis(np.empty(w.values.shape, np.int8), ch.axis, 0).shape)
        steps.append(("Reshape", [gs.Constant(f"{base}.share.shape", np.array(tshape, np.int64))], {}))
        if ch.axis:
            perm = list(range(1, ch.axis + 1)) + [0] + list(range(ch.axis + 1, w.values.ndim))
            steps.append(("Transpose", [], {"perm": perm}))
        if ch.scale is not None:
            bshape = [1] * w.values.ndim
            bshape[ch.axis] = -1
            steps.append(("Mul", [gs.Constant(f"{base}.share.scale", ch.scale.astype(dt).reshape(bshape))], {}))
        for op, extra, attrs in steps[:-1]:
            t = _node(graph, op, [t] + extra, f"{base}.share.{op.lower()}", dt, attrs=attrs)
        op, extra, attrs = steps[-1]
        if w.node is not None:  # a Constant node: its output variable is now made by the last step
            out = w.node.outputs[0]
            w.node.outputs.clear()
        else:
            out = gs.Variable(f"{base}.share.w", dtype=dt, shape=list(w.values.shape))
            for node in list(graph.nodes):
                for i, x in enumerate(node.inputs):
                    if x is w.const:
                        node.inputs[i] = out
        graph.nodes.append(gs.Node(op, f"{base}.share.rebuild", attrs=attrs, inputs=[t] + extra, outputs=[out]))


# --------------------------------------------------------------------------- clustering
def input_energy(op: str, attrs: dict, weight_shape: tuple, x: np.ndarray, weight_input: int) -> np.ndarray | None:
    """Per-feature energy E[x_j^2] of the activation ``x`` a weight multiplies, shaped to broadcast
    against the weight; None when the consumer is not a layer we know."""
    x = np.asarray(x, np.float64)
    if op in ("Conv", "ConvTranspose") and weight_input == 1 and x.ndim >= 3:
        e = np.mean(x ** 2, axis=tuple(i for i in range(x.ndim) if i != 1))
        group = int(attrs.get("group", 1))
        if op == "Conv":
            cout, cin_g = weight_shape[0], weight_shape[1]
            if e.size != cin_g * group:
                return None
            per_out = cout // group
            grp = np.arange(cout) // per_out
            h = e[grp[:, None] * cin_g + np.arange(cin_g)[None, :]]
            return h.reshape((cout, cin_g) + (1,) * (len(weight_shape) - 2))
        if e.size != weight_shape[0]:
            return None
        return e.reshape((-1,) + (1,) * (len(weight_shape) - 1))
    if op == "MatMul" and len(weight_shape) >= 2:
        if weight_input == 1:  # X[..., K] @ W[..., K, N]: row k of W sees feature k
            e = np.mean(x ** 2, axis=tuple(range(x.ndim - 1))) if x.ndim >= 1 else None
            if e is None or e.size != weight_shape[-2]:
                return None
            return e.reshape(-1, 1)
        e = np.mean(x ** 2, axis=tuple(i for i in range(x.ndim) if i != x.ndim - 2))  # W[M,K] @ X[K,N]
        if e.size != weight_shape[-1]:
            return None
        return e.reshape(1, -1)
    if op == "Gemm" and weight_input == 1 and x.ndim == 2 and len(weight_shape) == 2:
        xa = x.T if int(attrs.get("transA", 0)) else x
        e = np.mean(xa ** 2, axis=0)
        if int(attrs.get("transB", 0)):
            return e.reshape(1, -1) if e.size == weight_shape[1] else None
        return e.reshape(-1, 1) if e.size == weight_shape[0] else None
    return None


# --------------------------------------------------------------------------- weights and choices
@dataclass
class _Weight:
    """One shareable float tensor: an initializer (gs.Constant) or a Constant node's value."""

    name: str                # the tensor name in the exported model (initializer or Constant output)
    values: np.ndarray
    const: gs.Constant | None = None   # initializer form
    node: gs.Node | None = None        # Constant-node form
    consumer: tuple | None = None      # (op, attrs, activation name, weight input index)
    axis: int | None = None            # output-channel axis (None: no per-channel scale)
    energy: np.ndarray | None = None
    factor: tuple | None = None        # (feature order, upper Cholesky factor of H^-1) for error feedback
    hessian: np.ndarray | None = None  # E[x x^T] over the input features of a MatMul / group-1 Conv


@dataclass
class _Choice:
    bits: int                  # 0 = keep float
    codebook: np.ndarray | None = None   # [G, K]
    labels: np.ndarray | None = None     # [G, n/G], channel-major order
    scale: np.ndarray | None = None      # per-output-channel scale (float32), or None
    axis: int = 0              # the output-channel axis the layout is channel-major in
    rebuilt: np.ndarray | None = None
    err_w: float = 0.0         # relative weight error  sum dW^2 / sum W^2
    err_h: float = 0.0         # relative weighted (output) error sum h dW^2 / sum h W^2
    nbytes: int = 0


# --------------------------------------------------------------------------- helpers
class _FakeQuant:
    """The exported model with chosen weights swapped in place (numerically what the Gather
    graph rebuilds), restored afterwards: the search evaluates candidates without rebuilding."""

    def __init__(self, model: onnx.ModelProto, weights: list[_Weight]):
        self.model = model
        self.where = {}
        names = {w.name for w in weights}
        for t in model.graph.initializer:
            if t.name in names:
                self.where[t.name] = t
        for n in model.graph.node:
            if n.op_type == "Constant" and n.output and n.output[0] in names:
                for a in n.attribute:
                    if a.name == "value":
                        self.where[n.output[0]] = a.t

    class _Applied:
        def __init__(self, fq, upd):
            self.fq, self.upd, self.saved = fq, upd, {}

        def __enter__(self):
            for name, arr in self.upd.items():
                t = self.fq.where[name]
                self.saved[name] = onnx.TensorProto()
                self.saved[name].CopyFrom(t)
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name=t.name))
            return self.fq.model

        def __exit__(self, *exc):
            for name, saved in self.saved.items():
                self.fq.where[name].CopyFrom(saved)
            return False

    def applied(self, upd: dict):
        return self._Applied(self, upd)


def _values(c: gs.Constant) -> np.ndarray:
    v = c.values
    if hasattr(v, "load"):
        v = v.load()
    return np.asarray(v)


def _consumer(t) -> tuple | None:
    """(op, attrs, activation name, weight input index) when ``t`` feeds exactly one known layer."""
    users = list(t.outputs)
    if len(users) != 1:
        return None
    n = users[0]
    if n.op not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        return None
    idx = next((i for i, x in enumerate(n.inputs) if x is t), None)
    if idx is None or idx > 1:
        return None
    other = n.inputs[1 - idx]
    if isinstance(other, gs.Constant) or (n.op != "MatMul" and idx != 1):
        return None
    return (n.op, dict(n.attrs), other.name, idx)


def _feature_rows(op, attrs, wshape, x, widx, max_rows: int = 4096, max_cost: float = 1e9) -> np.ndarray | None:
    """The activation as rows of input features [samples, K] for layers whose weight is a plain
    [K, N] map: MatMul X @ W (2-D W), and group-1 Conv through im2col (K = Cin * kh * kw, in the
    order of W.reshape(Cout, -1)); positions are subsampled to ``max_rows``. None otherwise, and
    when the error feedback would cost more than ``max_cost`` (K^2 * Cout) flops."""
    x = np.asarray(x, np.float32)
    if op == "MatMul" and widx == 1 and len(wshape) == 2 and x.shape[-1] == wshape[0]:
        rows = x.reshape(-1, wshape[0])
    elif (op == "Conv" and widx == 1 and len(wshape) == 4 and int(attrs.get("group", 1)) == 1 and x.ndim == 4
          and x.shape[1] == wshape[1] and float(np.prod(wshape[1:])) ** 2 * wshape[0] <= max_cost
          and str(attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID", "b'NOTSET'", "b'VALID'")):
        geometry = ConvGeometry.from_attrs(attrs, wshape[2:])
        positions = sample_positions(geometry.n_positions(x.shape), max_rows, np.random.default_rng(0), sort=False)
        rows = conv_patches(x, geometry, positions).reshape(len(positions), -1)
    else:
        return None
    if rows.shape[0] > max_rows:
        rows = rows[np.random.default_rng(0).choice(rows.shape[0], max_rows, replace=False)]
    return rows.astype(np.float64)


def _hform(w: "_Weight", ax: int, cb: np.ndarray, labels: np.ndarray, scale, tshape) -> float:
    """tr(dW^T H dW) of an assignment (channel-major labels) against the weight."""
    rt = np.take_along_axis(cb.astype(np.float64), labels.reshape(cb.shape[0], -1), axis=1).reshape(tshape)
    if scale is not None:
        rt = rt * scale.astype(np.float64).reshape((-1,) + (1,) * (len(tshape) - 1))
    d = _as_rows(w.values.astype(np.float64) - np.moveaxis(rt, 0, ax), w)
    return _quad(d, w.hessian)


def _quad(d: np.ndarray, h: np.ndarray) -> float:
    """tr(d^T h d) through one matrix product."""
    return float(np.sum((h @ d) * d))


def _as_rows(v: np.ndarray, w: "_Weight") -> np.ndarray:
    """The weight as [K inputs, N outputs] (MatMul layout)."""
    return v.reshape(v.shape[0], -1).T if v.ndim == 4 else v


def _gptq_labels(w: "_Weight", ax: int, c: np.ndarray, scale: np.ndarray | None, pin: bool = False,
                 damp: float = 0.01) -> np.ndarray:
    """Codebook indices by GPTQ error feedback (Frantar et al. 2022, with a codebook grid).

    With H = E[x x^T] (+ damping) and U the upper Cholesky factor of H^-1, input rows are
    assigned in turn, q_j = nearest(w_j), and the not yet assigned rows absorb the error:
    W[j+1:] -= U[j, j+1:]^T (w_j - q_j) / U[j, j], which minimises tr(dW^T H dW) greedily.
    With ``pin`` the weights that were exactly zero keep the zero centroid (their error is
    still fed forward). Returns labels in the channel-major layout the codebook uses."""
    W = _as_rows(w.values.astype(np.float64), w).copy()       # [K, N]
    zeros = (W == 0) if pin else None
    z = int(np.argmin(np.abs(c)))
    K = W.shape[0]
    if w.factor is None:  # the same for every bit width: computed once per weight
        H = w.hessian.copy()
        dead = np.diag(H) <= 0
        H[dead, dead] = 1.0
        # "act order": the features with the most energy first, while there is most room to compensate
        order = np.argsort(-np.diag(H), kind="stable")
        H = H[np.ix_(order, order)]
        H += damp * float(np.mean(np.diag(H))) * np.eye(K)
        try:
            U = np.linalg.cholesky(np.linalg.inv(H)).T
        except np.linalg.LinAlgError:
            U = np.diag(1 / np.sqrt(np.diag(H)))
        w.factor = (order, U)
    order, U = w.factor
    W = W[order]
    zeros = zeros[order] if zeros is not None else None
    s = scale if scale is not None else np.ones(W.shape[1])
    sd = np.where(s == 0, 1.0, s)  # dead channels (scale 0) rebuild as 0 whatever their label
    mids = (c[:-1] + c[1:]) / 2

    def nearest(j, col):  # col [1, N]: row j (in ``order``) of W
        lab = np.searchsorted(mids, col / sd, side="left")
        if zeros is not None:
            lab[0][zeros[j]] = z
        return lab, c[lab] * s

    lab = gptq_feedback(W[None], U[None], nearest, features_axis=1)[0]
    inv = np.empty_like(order)
    inv[order] = np.arange(K)
    lab = lab[inv]
    # back to the weight's own layout, then channel-major (output axis first)
    full = lab.T.reshape(w.values.shape) if w.values.ndim == 4 else lab
    return np.moveaxis(full, ax, 0)


def _out_axis(t, ndim: int) -> int | None:
    """The output-channel axis of a weight from its (single) consumer; None when unknown."""
    users = list(t.outputs)
    if ndim < 2 or len(users) != 1:
        return None
    n = users[0]
    idx = next((i for i, x in enumerate(n.inputs) if x is t), None)
    if n.op == "Conv" and idx == 1:
        return 0
    if n.op == "ConvTranspose" and idx == 1:
        return 1 if int(n.attrs.get("group", 1)) == 1 else None
    if n.op == "MatMul":
        return ndim - 1 if idx == 1 else (ndim - 2 if idx == 0 else None)
    if n.op == "Gemm" and idx == 1 and ndim == 2:
        return 0 if int(n.attrs.get("transB", 0)) else 1
    return None


def _n_groups(channels: int, groups: int) -> int:
    if groups <= 1:
        return 1
    return math.gcd(int(channels), int(groups))


def _breakpoints(cand: list[tuple]) -> list[float]:
    """Multipliers where a layer's argmin of bytes + lam * distortion changes (lower hull)."""
    pts = sorted(cand, key=lambda t: (t[0], t[1]))
    out = []
    for i in range(len(pts)):
        for j in range(len(pts)):
            si, di, _ = pts[i]
            sj, dj, _ = pts[j]
            if sj > si and dj < di:
                out.append((sj - si) / (di - dj))
    return out


def _distortion(fid: dict) -> float:
    mse = fid.get("mse")
    if mse is not None and np.isfinite(mse):
        return max(float(mse), 0.0)
    return max(1.0 - float(fid.get("cosine", 0.0)), 0.0)


def _limit(src, n):
    """The first ``n`` samples of a source (a fresh iterator each call)."""
    if src is None:
        return []
    if hasattr(src, "get") and hasattr(src, "__len__"):
        return [src.get(i) for i in range(min(n, len(src)))]
    out = []
    for s in src:
        if len(out) >= n:
            break
        out.append(s)
    return out


def _safe(name: str) -> str:
    return name.replace(":", "_")


def _const(consts: dict, name: str, value: np.ndarray) -> gs.Constant:
    if name not in consts:
        consts[name] = gs.Constant(name, value)
    return consts[name]


def _node(graph: gs.Graph, op: str, inputs: list, out_name: str, dtype, attrs: dict | None = None) -> gs.Variable:
    out = gs.Variable(out_name, dtype=dtype)
    graph.nodes.append(gs.Node(op, out_name + ".node", attrs=attrs or {}, inputs=inputs, outputs=[out]))
    return out
