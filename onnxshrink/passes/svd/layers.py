"""The layers svd factors: their forms, costs, input covariances, and the factor pair written back.

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
"""

from __future__ import annotations

__all__ = ["Form", "Layer", "find_layers", "layer_value_shapes", "set_costs", "covariance_key", "covariances",
           "emit_factors", "layer_latency", "graph_opset", "as_int"]

import dataclasses
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.patches import ConvGeometry, patch_covariance, sample_positions
from onnxshrink.graph.values import constant_value, node_attr
from onnxshrink.passes.base import Context
from onnxshrink.passes.svd.knob import weight_view

# ------------------------------------------------------------------------------------ layers


@dataclass
class Form:
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
class Layer:
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
    form: Form | None = None
    rank: int = 0
    record: dict = field(default_factory=dict)


def find_layers(graph: gs.Graph, o) -> tuple[list[Layer], list[dict]]:
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
            layers.append(Layer(node, "matmul", node.inputs[0], w, int(w.size), None))
        elif view.kind == "gemm":
            W = (w.T if node_attr(node, "transB", 0) else w) * float(node_attr(node, "alpha", 1.0))
            layers.append(Layer(node, "gemm", node.inputs[0], W, int(w.size), None))
        else:
            Cout, Cin, kh, kw = w.shape
            geom = ConvGeometry.from_attrs(node.attrs, (kh, kw))
            ref = w.reshape(Cout, -1).T
            layers.append(Layer(node, "conv", node.inputs[0], ref, int(w.size), None, geom=geom, weight=w))
        if node.outputs and id(node.outputs[0]) in outputs:
            pass  # the second factor writes the same tensor, so graph outputs are fine
    return layers, skipped


def layer_value_shapes(graph: gs.Graph, ctx: Context, sample: dict | None) -> dict:
    from onnxshrink.graph.shapes import fix_input_shapes, infer_shapes, value_shapes
    try:
        model = ctx.to_model(graph)
        if sample:
            fix_input_shapes(model, {k: list(v.shape) for k, v in sample.items()})
        return value_shapes(infer_shapes(model))
    except Exception:
        return {}


def known_shape(shape) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)


def set_costs(layer: Layer, x_shape) -> None:
    """Rows/positions, MACs before, and the candidate forms with their per-rank costs."""
    layer.x_shape = list(x_shape) if known_shape(x_shape) else None
    if layer.kind in ("matmul", "gemm"):
        n, m = layer.ref.shape
        layer.rows = float(np.prod(x_shape[:-1])) if known_shape(x_shape) and len(x_shape) >= 2 else None
        layer.macs = layer.rows * n * m if layer.rows is not None else None
        rows = layer.rows if layer.rows is not None else 1.0
        layer.forms = [Form("linear", layer.ref, lambda c: c, n + m, rows * (n + m), True, to_view=lambda M: M)]
        return
    w, g = layer.weight, layer.geom
    Cout, Cin, kh, kw = w.shape
    if known_shape(x_shape) and len(x_shape) == 4:
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
    forms = [Form("channel_out", layer.ref, lambda c: c, D + Cout, out_pos * (D + Cout), True,
                   to_view=lambda M: M)]
    if kh * kw > 1 and g.auto_pad in ("", "NOTSET"):
        Wb = w.transpose(1, 0, 2, 3).reshape(Cin, Cout * kh * kw)

        def cov_b(c, Cin=Cin, kh=kh, kw=kw):
            c6 = c.reshape(Cin, kh, kw, Cin, kh, kw)
            return np.mean([c6[:, i, j, :, i, j] for i in range(kh) for j in range(kw)], axis=0)

        def view_b(M, Cin=Cin, Cout=Cout, kh=kh, kw=kw):
            return M.reshape(Cin, Cout, kh, kw).transpose(1, 0, 2, 3).reshape(Cout, -1).T

        forms.append(Form("channel_in", Wb, cov_b, Cin + Cout * kh * kw,
                           in_pos * Cin + out_pos * Cout * kh * kw, False, to_view=view_b))
        if kh > 1 and kw > 1:
            Ws = w.transpose(1, 2, 0, 3).reshape(Cin * kh, Cout * kw)

            def cov_s(c, Cin=Cin, kh=kh, kw=kw):
                c6 = c.reshape(Cin, kh, kw, Cin, kh, kw)
                return np.mean([c6[:, :, j, :, :, j].reshape(Cin * kh, Cin * kh) for j in range(kw)], axis=0)

            def view_s(M, Cin=Cin, Cout=Cout, kh=kh, kw=kw):
                return M.reshape(Cin, kh, Cout, kw).transpose(2, 0, 1, 3).reshape(Cout, -1).T

            forms.append(Form("spatial", Ws, cov_s, Cin * kh + Cout * kw,
                               row_pos * Cin * kh + out_pos * Cout * kw, False, to_view=view_s))
    layer.forms = forms


# ------------------------------------------------------------------------------ covariances


def covariance_key(layer: Layer) -> tuple:
    if layer.kind == "conv":
        g = layer.geom
        return ("patch", layer.x.name, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, tuple(g.pads), g.auto_pad)
    return ("rows", layer.x.name)


def covariances(layers: list[Layer], ctx: Context, graph, source, n: int, max_positions: int, tag: str,
                keep=np.float64):
    """{cov key: mean covariance} of the layers' inputs over the first n samples of ``source``,
    streamed one sample at a time; also returns {tensor name: shape of the first sample} and
    {cov key: the rows (positions, patches) each covariance was summed over}.

    Each covariance is computed once per ``ctx.cache`` and kept under its own key: the manager's
    back-off asks for the validation covariances of a different set of layers at each strength, and a
    cache of whole sets held one copy of a shared layer's covariance per set (ResNet-18 at 160 x 160:
    four 4608 x 4608 float64 copies of each of its widest layers, 4.6 GB). The conv patches sampled
    (``max_positions`` of them where there are more) come from a generator of their own per covariance
    key, so a covariance depends on its input, geometry and samples alone, not on which other layers
    were asked with it.
    ``keep`` is the type the covariances are summed and kept in: float64, or float32 for the
    validation covariances, which only weigh a reported error (half the memory)."""
    from onnxshrink.data import Subset
    keys = {}
    for L in layers:
        keys.setdefault(covariance_key(L), L)
    base = ("svd.cov", tag, n, max_positions, np.dtype(keep).name)
    missing = {k: L for k, L in keys.items() if base + (k,) not in ctx.cache}
    if missing:
        sub = Subset(source, range(min(n, len(source))))
        names = sorted({L.x.name for L in missing.values()})
        sums = {k: None for k in missing}
        counts = {k: 0 for k in missing}
        shapes = {}
        rngs = {k: np.random.default_rng([int(ctx.seed or 0), zlib.crc32(repr(k).encode())]) for k in missing}
        for acts in ctx.progress.track(ctx.capture(graph, names, sub), f"svd: {tag} activations", total=len(sub)):
            for k, L in missing.items():
                x = np.asarray(acts[L.x.name])
                shapes.setdefault(L.x.name, list(x.shape))
                if L.kind == "conv":
                    if x.ndim != 4:
                        continue
                    pos = sample_positions(L.geom.n_positions(x.shape), max_positions, rngs[k])
                    c, cnt = patch_covariance(x, L.geom, pos, chunk=1024)[0], len(pos)
                else:
                    X = x.reshape(-1, x.shape[-1]).astype(np.float64)
                    c, cnt = X.T @ X, X.shape[0]
                if sums[k] is None:
                    sums[k] = c.astype(keep, copy=False)
                else:
                    sums[k] += c
                counts[k] += cnt
        for k, L in missing.items():
            cov = None
            if sums[k] is not None and counts[k]:
                cov = sums[k]
                cov /= counts[k]
            sums[k] = None
            ctx.cache[base + (k,)] = (cov, shapes.get(L.x.name), counts[k])
    covs, shapes, rows = {}, {}, {}
    for k, L in keys.items():
        cov, shape, count = ctx.cache[base + (k,)]
        if shape is not None:
            shapes.setdefault(L.x.name, shape)
        if cov is not None:
            covs[k], rows[k] = cov, count
    return covs, shapes, rows


# ------------------------------------------------------------------------------ rank choice


def emit_factors(graph: gs.Graph, layer: Layer, A: np.ndarray, B: np.ndarray) -> None:
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


def layer_latency(layer: Layer, A: np.ndarray, B: np.ndarray, ctx: Context, runs: int = 20):
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
        g = gs.Graph(nodes=[n], inputs=[x], outputs=[y], opset=graph_opset(ctx))
        if factored:
            emit_factors(g, dataclasses.replace(layer, node=n), A, B)
            g.cleanup().toposort()
        model = gs.export_onnx(g, do_type_check=False)
        feeds = {"x": np.random.default_rng(0).standard_normal(layer.x_shape).astype(dtype)}
        times.append(measure_latency(model, feeds, runs=runs, warmup=3, threads=1))
    return times[0], times[1]


def graph_opset(ctx: Context) -> int:
    t = ctx.template
    if t is not None:
        for o in t.opset_import:
            if o.domain in ("", "ai.onnx"):
                return int(o.version)
    return 17


def as_int(v):
    return None if v is None else int(round(v))
