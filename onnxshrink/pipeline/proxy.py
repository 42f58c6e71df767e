"""Proxy sensitivity: every (unit, strength) of the knobs from one capture and one shared session.

The measured sweep (``sensitivity.measure_sensitivity``) runs each pass once per (unit, strength)
and opens a session on each result: on a 22M-parameter ViT-S that is ~400 pass runs of seconds
each. The proxy instead

1. captures, once, every weighted layer's input and output on the calibration samples, reduced to
   ``passes.knob.LayerStats`` (input covariance C = E[x x^T] for MatMul/Gemm, a group-1 Conv's
   patch covariance when its patches are short, mean squares, ranges per sample), and the input
   covariance on the validation samples (``eval_cov``);
2. asks each knob (``Knob.proxy``, beside its pass) what its unit at a strength does to the
   weights and the local output error of each layer it changes, ``e = tr(D^T C D) / (N E[y^2])``
   (plus input quantization noise for the strengths that quantize activations; ``passes/knob.py``),
   and what it saves (the knob's arithmetic);
3. measures, end to end, each layer's gain once: its weight perturbed alone by seeded Gaussian
   noise of local error ``PROBE_NOISE``, run in ONE session of the model whose weights are graph
   inputs (``weights_as_inputs``, bound once, ``bound_runner``) on ``PROXY_SAMPLES`` validation
   samples: ``gain = loss / e``. A row's loss is ``sum_layers gain x e`` ("local"), except where the
   knob asks for its new weights to be run through the same session ("exact": svd's first
   strength, since a rank cut is far from white noise in the output) or for an exact row's loss
   scaled by the ratio of local errors ("scaled": svd's second strength).

The rows say which (``row["proxy"]``). Approximations: prune's zeroing has no least-squares refit
(an upper bound of the pass's error), activation quantization is modelled as independent uniform
noise, and the loss is assumed linear in the local noise power. The allocation then measures the
approximate rows near its decision boundary by their passes (``allocate.verify_boundary``), and
every configuration it keeps is measured end to end anyway. Units without a proxy (a
ConvTranspose) are measured as before.
"""

from __future__ import annotations

__all__ = ["PROXY_BYTES", "bound_runner", "capture_layer_stats", "free_batch", "layer_gains", "one_blas_thread",
           "proxy_rows", "use_proxy", "weights_as_inputs"]

import contextlib
import copy
import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.graph.cost import model_cost
from onnxshrink.graph.patches import ConvGeometry, patch_covariance, sample_positions
from onnxshrink.metrics import fidelity
from onnxshrink.passes.knob import LAYER_OPS, LayerStats, weighted_nodes
from onnxshrink.runtime import capture_activations, make_session

# sensitivity="auto" takes the proxy from this many bytes of weights (the measured sweep of a 7 MB
# model already takes minutes on two cores; the bundled test models stay measured)
PROXY_BYTES = 8 * 2**20
MAX_PATCH = 2304  # a Conv's patch covariance (Cin kh kw)^2 only up to this patch length (42 MB float64)
MAX_POSITIONS = 2048  # patch positions per sample in a Conv's covariance
# the local output error of a layer's gain probe: small enough for the loss to be linear in it,
# large enough to stand above float round-off
PROBE_NOISE = 1e-3
GRAM_ROWS = 256  # rows of a layer's input gathered before one x^T x product (GramRows)
PROXY_SAMPLES = 4  # validation samples of each end-to-end run (gain probes): a ranking, not a verdict


class GramRows:
    """``sum_r x_r x_r^T`` (float64) over the rows added, the rows gathered ``GRAM_ROWS`` at a time
    (kept in their own dtype until then) and multiplied in one product: a sample's few rows (17
    tokens of a ViT) against a K x K accumulator spent the capture's time adding K x K matrices
    (measured: 193 s of a 12-block ViT-S's 216 s capture on 265 samples). The sum is the same up to
    float64 round-off (the rows are grouped differently)."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.pending: list = []
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.rows += rows.shape[0]
        if self.rows >= GRAM_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = np.concatenate(self.pending).astype(np.float64)
        g = x.T @ x
        self.total = g if self.total is None else self.total + g
        self.pending, self.rows = [], 0

    def result(self) -> np.ndarray:
        self.flush()
        return self.total


def one_blas_thread(on: bool = True):
    """A context in which numpy's BLAS/LAPACK use one thread (``on``; threadpoolctl when installed,
    else nothing changes). The proxy mode's pass runs take it: on two cores shared with onnxruntime
    and other processes, a two-thread OpenBLAS SVD or Cholesky ran 10-18x slower than one thread
    (busy-waiting threads; measured 14.8 s against 1.4 s for a 384 x 1536 SVD under load). It also
    fixes their rounding whatever the machine's core count."""
    if on:
        try:
            from threadpoolctl import threadpool_limits
            return threadpool_limits(limits=1, user_api="blas")
        except ImportError:
            pass
    return contextlib.nullcontext()


def use_proxy(mode: str, model: onnx.ModelProto, latency: bool) -> bool:
    """Whether the sweep uses the proxy: ``mode`` proxy, or auto on a model with at least
    ``PROXY_BYTES`` of weights (never for a latency target: the proxy measures no latency)."""
    if mode == "proxy":
        return not latency
    if mode != "auto" or latency:
        return False
    return sum(t.ByteSize() for t in model.graph.initializer) >= PROXY_BYTES


def weights_as_inputs(model: onnx.ModelProto, names: set) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs (fed on every run)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [t for t in m.graph.initializer if t.name not in names]
    moved = [t for t in m.graph.initializer if t.name in names]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for t in moved:
        m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def capture_layer_stats(model: onnx.ModelProto, samples: list, shapes: dict | None) -> dict:
    """{node name: LayerStats} of the layers with a constant float weight (Conv/Gemm/MatMul), from
    their inputs and outputs on ``samples`` (streamed one sample at a time)."""
    nodes = [n for n, _ in weighted_nodes(model, ops=LAYER_OPS) if n.name]
    if not nodes:
        return {}
    per = model_cost(model, shapes).get("per_node", {}) or {}
    inits = {t.name: t for t in model.graph.initializer}
    geometries = {}  # group-1 Convs whose patch covariance stays small get one (svd's whitening)
    for n in nodes:
        dims = list(inits[n.input[1]].dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv" and len(dims) == 4 and int(attrs.get("group", 1)) == 1 \
                and int(np.prod(dims[1:])) <= MAX_PATCH:
            geometries[n.name] = ConvGeometry.from_attrs(attrs, dims[2:])
    rng = np.random.default_rng(0)
    names = sorted({n.input[0] for n in nodes} | {n.output[0] for n in nodes})
    acc: dict = {n.name: {"cov": None, "rows": 0, "sq": 0.0, "count": 0, "chan": None, "ranges": [],
                          "osq": 0.0, "ocount": 0, "olo": math.inf, "ohi": -math.inf, "gram": GramRows()}
                 for n in nodes}
    with one_blas_thread():  # the x^T x products: one thread beside onnxruntime's (see one_blas_thread)
        for vals in capture_activations(model, names, samples):
            for n in nodes:
                a = acc[n.name]
                x = np.asarray(vals[n.input[0]], np.float64)
                y = np.asarray(vals[n.output[0]], np.float64)
                a["ranges"].append((float(x.min()), float(x.max())))
                a["sq"] += float(np.sum(x * x))
                a["count"] += x.size
                if n.op_type == "Conv":
                    c = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
                    geo = geometries.get(n.name)
                    if geo is not None:
                        pos = sample_positions(geo.n_positions(x.shape), MAX_POSITIONS, rng)
                        a["cov"] = (a["cov"] if a["cov"] is not None else 0.0) + patch_covariance(x, geo, pos)[0]
                        a["prows"] = a.get("prows", 0) + len(pos)
                else:
                    c = x.reshape(-1, x.shape[-1]).T
                    a["gram"].add(vals[n.input[0]].reshape(-1, x.shape[-1]))
                a["chan"] = (a["chan"] if a["chan"] is not None else 0.0) + (c * c).sum(axis=1)
                a["rows"] += c.shape[1]
                a["osq"] += float(np.sum(y * y))
                a["ocount"] += y.size
                a["olo"], a["ohi"] = min(a["olo"], float(y.min())), max(a["ohi"], float(y.max()))
        for a in acc.values():
            if a["gram"].total is not None or a["gram"].pending:
                a["cov"] = a["gram"].result()
    out = {}
    for n in nodes:
        a = acc[n.name]
        if not a["count"]:
            continue
        rows = max(a["rows"], 1)
        out[n.name] = LayerStats(
            node=n, weight_name=n.input[1], weight=numpy_helper.to_array(inits[n.input[1]]),
            cov=a["cov"] / max(a.get("prows", rows), 1) if a["cov"] is not None else None, in_ms=a["sq"] / a["count"],
            chan_ms=a["chan"] / rows, in_ranges=a["ranges"], out_ms=a["osq"] / max(a["ocount"], 1),
            out_range=(a["olo"], a["ohi"]), macs=float(per.get(n.name) or 0.0))
    return out


def bound_runner(sess, weights: dict, outputs: list, samples: list, batched=None):
    """``run(changed) -> [outputs per sample]``: the session with ``weights`` bound once as inputs
    (an IOBinding; nothing is copied per run) and ``changed`` {name: value} bound over them for one
    run of the samples, then the originals bound back. ``batched``: a session of the same model
    with a free batch dimension, fed all samples at once when it gives the per-sample outputs."""
    from onnxruntime import OrtValue, RunOptions

    base = {k: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    sessions = [sess] if batched is None else [sess, batched]
    ios = [s.io_binding() for s in sessions]
    for io in ios:
        for k, v in base.items():
            io.bind_ortvalue_input(k, v)
    stacked = None
    if batched is not None and samples:
        stacked = {name: np.ascontiguousarray(np.concatenate([s[name] for s in samples], axis=0))
                   for name in samples[0]}

    quiet = RunOptions()
    quiet.log_severity_level = 4  # the batch check may fail by design: no error on the terminal

    def one(io, session, feeds):
        for name, x in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(x))
        for o in outputs:
            io.bind_output(o)
        session.run_with_iobinding(io, quiet if session is not sess else None)
        return io.copy_outputs_to_cpu()

    def split(outs) -> list:
        return [[o[i:i + 1] for o in outs] for i in range(len(samples))]

    def run(changed: dict, use_batch: bool = True) -> list:
        tmp = {k: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in changed.items()}
        io, session = (ios[1], sessions[1]) if use_batch and stacked is not None else (ios[0], sessions[0])
        for k, v in tmp.items():
            io.bind_ortvalue_input(k, v)
        try:
            if io is not ios[0]:
                return split(one(io, session, stacked))
            return [one(io, session, s) for s in samples]
        finally:
            for k in tmp:
                io.bind_ortvalue_input(k, base[k])

    if stacked is not None:  # the batched model must give every sample's own outputs
        try:
            ok = all(np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))
                     for x, y in zip(run({}), run({}, use_batch=False)) for a, b in zip(x, y))
        except Exception:  # a graph that fixes the batch inside (a Reshape to 1 x ...)
            ok = False
        if not ok:
            stacked = None
    return run


def free_batch(model: onnx.ModelProto, keep: set = frozenset()) -> onnx.ModelProto | None:
    """``model`` (a copy) with the first dimension of every input (but ``keep``) and output made
    symbolic, or None when one is not 1 there."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [v for v in m.graph.input if v.name not in keep] + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            return None
        if dims[0].HasField("dim_value") and dims[0].dim_value != 1:
            return None
        dims[0].dim_param = "proxy_batch"
    del m.graph.value_info[:]
    return m


def proxy_rows(model: onnx.ModelProto, choices: list, data, loss) -> tuple[dict, dict]:
    """{Choice key: measurement-like result} for the choices ([(Choice, Knob)]) whose knob has a
    proxy, and the info for the report; choices without one are left out (measure them). A result
    is ``{"loss", "saving", "proxy": "local" | "exact" | "scaled", "noise"}`` (module docstring) or
    ``{"unchanged": reason}``; ``loss(scores)`` turns fidelity scores into the allocation's loss."""
    t0 = time.perf_counter()
    layers = capture_layer_stats(model, data.calib, data.shapes)
    for name, held in capture_layer_stats(model, data.val, data.shapes).items():
        if name in layers:
            layers[name].eval_cov = held.cov
    t_capture = time.perf_counter() - t0
    shared: dict = {"shapes": data.shapes}
    planned, out = [], {}
    # numpy's SVDs and solves here are small; BLAS threads only contend on a shared machine
    with one_blas_thread():
        for choice, knob in choices:
            p = knob.proxy(model, choice.unit, choice.strength, layers, shared)
            if p is not None:
                planned.append((choice, p))
    t_plan = time.perf_counter() - t0 - t_capture
    probed = sorted({name for _, p in planned if not p.get("exact") and "anchor" not in p
                     for name in p.get("noise", {})})
    data = copy.copy(data)  # the runs: the first PROXY_SAMPLES validation samples
    data.val, data.reference = data.val[:PROXY_SAMPLES], data.reference[:PROXY_SAMPLES]
    data.labels = data.labels[:PROXY_SAMPLES] if data.labels is not None else None
    exact = [(c, p) for c, p in planned if p.get("exact")]
    gains, measured = layer_gains(model, [layers[n] for n in probed], data, loss,
                                  [p["weights"] for _, p in exact]) if probed or exact else ({}, [])
    exact_loss = {(c.pass_name, c.unit, c.strength): (v, p) for (c, p), v in zip(exact, measured)}
    for choice, p in planned:
        if "unchanged" in p:
            out[choice.key()] = {"unchanged": True, "reason": p["unchanged"]}
            continue
        noise, kind = p["noise"], "local"
        if p.get("exact"):
            value, kind = exact_loss[(choice.pass_name, choice.unit, choice.strength)][0], "exact"
        elif "anchor" in p:
            a = exact_loss.get((choice.pass_name, choice.unit, p["anchor"]))
            if a is None or "noise" not in a[1]:
                continue
            ea, e = sum(a[1]["noise"].values()), sum(noise.values())
            value, kind = a[0] * e / ea if ea > 0 else math.inf, "scaled"
        else:
            if not noise or any(gains.get(n) is None or not math.isfinite(e) for n, e in noise.items()):
                continue  # nothing to scale (no probe gain, no local error): measured by the pass
            value = float(sum(gains[n] * e for n, e in noise.items()))
        out[choice.key()] = {"loss": float(value), "saving": p["saving"], "proxy": kind,
                             "noise": {n: float(e) for n, e in noise.items()}}
    info = {"mode": "proxy", "layers": len(layers), "proxied": len(planned), "probed_layers": len(gains),
            "capture_seconds": round(t_capture, 2), "plan_seconds": round(t_plan, 2),
            "probe_seconds": round(time.perf_counter() - t0 - t_capture - t_plan, 2)}
    return out, info


def layer_gains(model: onnx.ModelProto, layers: list, data, loss, exact: list) -> tuple[dict, list]:
    """({layer: loss per unit of local output error, None when unusable}, [loss of each of
    ``exact``]): each layer's weight perturbed alone by seeded Gaussian noise of local error ``PROBE_NOISE``
    (``LayerStats.weight_noise``), and each {initializer: value} of ``exact``, run end to end on the
    validation samples through one shared session (``weights_as_inputs``, ``bound_runner``)."""
    names = {L.weight_name for L in layers} | {k for w in exact for k in w}
    wm = weights_as_inputs(model, names)
    sess = make_session(wm, optimize=True)
    outputs = [o.name for o in sess.get_outputs()]
    fb = free_batch(wm, names)
    batched = None
    if fb is not None:
        try:
            batched = make_session(fb, optimize=True)
        except Exception:  # onnxruntime refuses the free batch (a shape fixed inside): one sample at a time
            batched = None
    del wm, fb
    base_w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    run = bound_runner(sess, base_w, outputs, data.val, batched)
    gains = {}
    for i, L in enumerate(layers):
        noise = np.random.default_rng(i).standard_normal(L.weight.shape).astype(L.weight.dtype)
        e1 = L.weight_noise(L.weight + noise)
        c = math.sqrt(PROBE_NOISE / e1) if e1 > 0 else 0.0
        probe = (L.weight + c * noise).astype(L.weight.dtype)
        e = L.weight_noise(probe)
        scores = fidelity(data.reference, run({L.weight_name: probe}), data.user_metric, data.val, data.labels)
        g = loss(scores) / e if e > 0 else math.nan
        gains[L.node.name] = g if math.isfinite(g) and g > 0 else None  # no usable probe: measure its rows
    measured = [loss(fidelity(data.reference, run(w), data.user_metric, data.val, data.labels)) for w in exact]
    return gains, measured
