"""Per-unit analysis of a quantization plan on a shadow model (no training).

Each weighted unit is quantized alone on its float input: a shadow copy of the node, with
fake-quantized input, weights and bias, runs next to the float one. Over calibration samples:

- Sensitivity: ``NSR = |y_q - y|^2 / |y|^2``, the noise-to-signal ratio the unit adds on its own
  (the guard keeps the most sensitive units in float first).
- Bias correction: the mean shift of each output channel ``E[y_q,c - y_c]`` (the shift rounding adds,
  Nagel et al. 2019), subtracted from the bias: ``b_c <- b_c - (E[y_q,c] - E[y_c])``. It comes from
  the same run, so it corrects each layer's own error, not its inputs'.
"""

from __future__ import annotations

__all__ = ["UnitAnalysis", "analyse_units"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.convert import graph_to_model
from onnxshrink.passes.quantize.calibrate import CalibrationSamples
from onnxshrink.passes.quantize.qdq import QdqBuilder, bias_int32
from onnxshrink.runtime import capture_activations


class UnitAnalysis:
    """The analysis of the candidate units, run once on first use (most models never need it:
    the guard asks for it only when its fidelity floor fails); the top 20 NSRs go to ``stats``."""

    def __init__(self, builder: QdqBuilder, candidates: dict, samples: CalibrationSamples, stats: dict,
                 shifts: bool = True):
        self.builder = builder
        self.shifts = shifts  # also the per-channel mean shifts (bias correction asks for them)
        self.candidates = candidates
        self.samples = samples
        self.stats = stats
        self.results: dict | None = None
        self.nsr: dict = {}  # node -> noise-to-signal ratio, once analysed

    def run(self) -> dict:
        """{node: {"nsr": float, "shift": per-channel mean shift, or None without ``shifts``}} of the
        weighted candidates."""
        if self.results is None:
            self.results = analyse_units(self.builder, self.candidates, self.samples, shifts=self.shifts)
            self.nsr = {k: a["nsr"] for k, a in self.results.items()}
            self.stats["sensitivity"] = {k: float(f"{v:.3e}") for k, v in
                                         sorted(self.nsr.items(), key=lambda kv: -kv[1])[:20]}
        return self.results

    def order(self) -> list:
        """Weighted units, most sensitive first."""
        self.run()
        return [k for k, _ in sorted(self.nsr.items(), key=lambda kv: -kv[1])]


def analyse_units(builder: QdqBuilder, units: dict, samples: CalibrationSamples, n_samples: int = 8,
                  shifts: bool = True) -> dict:
    """Quantize each weighted unit alone on its float input (a shadow copy of the node with
    fake-quantized input, weights and bias next to the float one), and measure over calibration
    samples its noise-to-signal ratio ``|y_q - y|^2 / |y|^2`` (its sensitivity) and, with ``shifts``,
    the mean shift of each output channel ``E[y_q - y]`` (what bias correction removes; else None).

    The sums of squares are reduced in the graph: ``d = y_q - y`` in float32 (as numpy would
    subtract them), then ``sum d^2`` and ``sum y^2`` in float64 (``ReduceSumSquare`` of a Cast), so a
    run returns two numbers per unit instead of its two output tensors (PP-OCRv4 det: 62 units'
    outputs at 640 x 640, copied out and reduced by numpy, were half the analysis' time). Only the
    shifts need the tensors themselves."""
    w_units = [u for u in units.values() if u.kind == "weighted"]
    if not w_units:
        return {}
    params = builder.params(units)
    schemes = builder.tensor_schemes(units)  # mixed precision: each unit reads on its own grid
    g = gs.import_onnx(builder.model_f)
    nodes = {n.name: n for n in g.nodes}
    tmap = g.tensors()
    pairs = []
    for u in w_units:
        node = nodes[u.node]
        x = tmap[u.inputs[0]]
        scheme = builder.read_scheme(u, u.inputs[0], schemes)
        s, z = params[u.inputs[0]] if scheme is schemes.get(u.inputs[0], builder.scheme) else \
            builder.params_at(u.inputs[0], scheme)
        sc = gs.Constant(u.node + "_sh_scale", np.array(s, np.float32))
        zc = gs.Constant(u.node + "_sh_zp", np.array(z, scheme.activation_dtype))
        xq = gs.Variable(u.node + "_sh_xq", dtype=scheme.activation_dtype)
        xd = gs.Variable(u.node + "_sh_xd", dtype=np.float32)
        g.nodes.append(gs.Node("QuantizeLinear", inputs=[x, sc, zc], outputs=[xq], domain=builder.domain))
        g.nodes.append(gs.Node("DequantizeLinear", inputs=[xq, sc, zc], outputs=[xd], domain=builder.domain))
        W = np.asarray(node.inputs[1].values).astype(np.float32)
        wq, ws = builder.unit_weight_quant(u.node, W, u.weight_axis)
        shape = [1] * W.ndim
        if builder.scheme.per_channel:
            shape[u.weight_axis] = -1
        Wf = (wq.astype(np.float32) * ws.reshape(shape)).astype(np.float32)
        ins = [xd, gs.Constant(u.node + "_sh_W", Wf)]
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = np.asarray(node.inputs[2].values).astype(np.float32)
            sb = np.float32(s) * (ws if ws.ndim else np.float32(ws))
            bf = (bias_int32(b, sb) * np.asarray(sb, np.float64)).astype(np.float32)
            ins.append(gs.Constant(u.node + "_sh_B", bf))
        y = node.outputs[0]
        ys = gs.Variable(u.node + "_sh_y", dtype=np.float32)
        g.nodes.append(gs.Node(node.op, attrs=dict(node.attrs), inputs=ins, outputs=[ys]))
        e, s2 = _sums_of_squares(g, u.node, y, ys)
        pairs.append((u, y.name, ys.name, e, s2))
    g.toposort()
    model = graph_to_model(g, builder.model_f)
    names = [n for _, a, b, e, s2 in pairs for n in ((e, s2, a, b) if shifts else (e, s2))]
    acc = {u.node: {"d": 0.0, "n": 0, "e": 0.0, "s": 0.0} for u, *_ in pairs}
    for cap in capture_activations(model, names, list(samples.take(n_samples))):
        for u, a, b, e, s2 in pairs:
            r = acc[u.node]
            r["e"] += float(cap[e])
            r["s"] += float(cap[s2])
            r["n"] += 1
            if shifts:
                # a float64 mean without float64 copies of the activations (metrics.compare_outputs says why)
                yf, yq = (np.asarray(cap[t], np.float32 if cap[t].dtype.itemsize < 4 else None) for t in (a, b))
                d = yq - yf
                axis = 1 if nodes[u.node].op in ("Conv", "ConvTranspose") else yf.ndim - 1
                r["d"] = r["d"] + d.mean(axis=tuple(i for i in range(yf.ndim) if i != axis), dtype=np.float64)
    return {k: {"nsr": r["e"] / max(r["s"], 1e-30), "shift": np.asarray(r["d"]) / max(r["n"], 1) if shifts else None}
            for k, r in acc.items()}


def _sums_of_squares(g: gs.Graph, tag: str, y: gs.Variable, ys: gs.Variable) -> tuple[str, str]:
    """Add to ``g`` the scalars ``sum (ys - y)^2`` and ``sum y^2`` (the difference in float32, an
    output of another or unknown type first cast to float32; the squares summed in float64); returns
    their names."""
    def node(op, inputs, name, dtype, **attrs):
        out = gs.Variable(f"{tag}_sh_{name}", dtype=dtype)
        g.nodes.append(gs.Node(op, name=out.name, inputs=inputs, outputs=[out], attrs=attrs))
        return out
    if y.dtype != np.float32:  # float16 (the shadow node computes in float32 on dequantized inputs)
        y = node("Cast", [y], "yf32", np.float32, to=onnx.TensorProto.FLOAT)
        ys = node("Cast", [ys], "ysf32", np.float32, to=onnx.TensorProto.FLOAT)
    d = node("Sub", [ys, y], "d", np.float32)
    e = node("ReduceSumSquare", [node("Cast", [d], "d64", np.float64, to=onnx.TensorProto.DOUBLE)], "e",
             np.float64, keepdims=0)
    s2 = node("ReduceSumSquare", [node("Cast", [y], "y64", np.float64, to=onnx.TensorProto.DOUBLE)], "s",
              np.float64, keepdims=0)
    return e.name, s2.name
