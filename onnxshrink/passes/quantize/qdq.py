"""Writing a QDQ graph: Q/DQ pairs on unit activations, int8 weights and int32 biases.

Numerics (``x`` an activation, ``W`` a weight, ``b`` a bias; grids in ``scheme.py``):

- Activations: for a calibrated range ``[lo, hi]`` widened to contain 0,
  ``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)``. A folded Relu/Clip(c_lo, c_hi)
  clips the range, sets ``z = qmin`` when ``c_lo = 0`` and shrinks ``s`` until the grid's top
  ``(qmax - z) s`` lies within ``c_hi`` (onnxruntime drops the clip as redundant only then).
- Weights: symmetric int8 per output channel, ``s_c = max|W_c| / wmax``, ``W_q = round(W / s_c)``
  (``weight_storage.int8_channels``; per tensor below opset 13), or GPTQ's integers on the same grid.
- Bias: int32 with ``s_b = s_x * s_w,c`` and zero point 0: ``b_q = round(b / s_b)``; bias correction
  subtracts the per-channel mean shift from ``b`` first.
- Constant operands of Add/Mul: the activation grid on their own ``[min, max]``.

Mixed precision (``wide`` and ``wide_units``: the units, by node name, that run at 16 bits on a
target taking both, QNN HTP): a unit computes at one precision, its inputs and its output on that grid;
a tensor is quantized at its producer unit's precision (a passthrough unit's outputs at its input's, a
tensor no unit produces at 16 bits when a 16-bit unit reads it). A consumer unit of the other precision
reads it through a conversion, as onnxruntime's quantizer writes it for a TensorQuantOverrides
``convert`` (``qdq_quantizer.py``: ``Q(u8) -> DQ -> Q(u16) -> DQ``), the pair the QNN EP maps to one QNN
Convert op (its DQ -> Q fusion): ``t -> Q(t; s8, z8) -> DQ -> Q(s16, z16) -> DQ -> consumer``, where
``(s16, z16)`` is ``t``'s calibrated range on the consumer's grid. Up (8 -> 16 bits) the conversion is
exact (the 8-bit values lie on the finer grid up to rounding of the scale ratio); down it rounds once more.
Every Q/DQ of a mixed graph is in the 16-bit scheme's domain (com.microsoft below opset 21).

Placement of the Q/DQ pairs: by default on every unit input and output (onnxruntime's CPU EP fuses
``DQ -> op -> Q`` into one integer kernel, and float consumers of a quantized tensor read a shared
DQ). With ``inputs_only`` (a target whose ``qdq_placement`` is ``"inputs"``: OpenVINO, which reads
Q/DQ as FakeQuantize the way NNCF places it) a tensor gets a Q/DQ pair only where an integer unit
reads it: float consumers read the float tensor, and a unit output no integer unit reads stays float.
"""

from __future__ import annotations

__all__ = ["QdqBuilder", "activation_params", "bias_int32", "drop_qdq_value_info"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.passes.quantize.plan import QuantUnit
from onnxshrink.passes.quantize.scheme import QuantScheme
from onnxshrink.passes.quantize.weight_storage import int8_channels


def activation_params(scheme: QuantScheme, lo: float, hi: float, clip: tuple | None = None) -> tuple[float, int]:
    """(scale, zero point) of the activation grid for the range ``[lo, hi]`` (module docstring)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if clip is not None:
        lo = max(lo, clip[0])
        hi = min(hi, clip[1])
    if hi - lo < 1e-8:
        hi = lo + 1e-8 if lo < 0 else 1e-8
    levels = scheme.qmax - scheme.qmin
    scale = (hi - lo) / levels
    zp = int(np.clip(round(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax))
    if clip is not None:
        # the Relu/Clip is redundant (and dropped by onnxruntime) only when the grid lies inside it
        rep_hi = (scheme.qmax - zp) * np.float32(scale)
        if rep_hi > clip[1]:
            scale = float(np.float32(clip[1] / (scheme.qmax - zp)) * np.float32(1 - 1e-6))
        if clip[0] == 0.0:
            zp = scheme.qmin
    return float(np.float32(scale)), zp


def bias_int32(b: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """``b_q = round(b / s_b)`` on the int32 grid (computed in float64 and clipped, so a tiny scale
    saturates instead of overflowing float32)."""
    return np.clip(np.round(np.asarray(b, np.float64) / sb), -2 ** 31 + 1, 2 ** 31 - 1).astype(np.int32)


def drop_qdq_value_info(graph: gs.Graph) -> None:
    """No value_info for Q/DQ outputs: their shapes are their inputs', which any consumer (onnxruntime,
    shape inference) re-derives; on YOLOv8n they were 107 kB of a 3.5 MB file."""
    outs = {id(t) for t in graph.outputs}
    for n in graph.nodes:
        if n.op in ("QuantizeLinear", "DequantizeLinear"):
            for t in n.outputs:
                if id(t) not in outs:
                    t.shape, t.dtype = None, None


class QdqBuilder:
    """Builds QDQ graphs of one prepared float model for any set of units, from the calibrated ranges
    (tensor -> (lo, hi)), the folded clips (tensor -> (min, max)), the weights GPTQ rounded
    (``rounded``: node -> int8) and the bias correction's shifts (``bias_shift``: node -> [C]);
    ``inputs_only``: Q/DQ only where an integer unit reads a tensor (module docstring)."""

    def __init__(self, scheme: QuantScheme, model_f: onnx.ModelProto, graph_f: gs.Graph, ranges: dict, clips: dict):
        self.scheme = scheme
        self.model_f = model_f
        self.graph_f = graph_f
        self.nodes_f = {n.name: n for n in graph_f.nodes}
        self.ranges = ranges
        self.clips = clips
        self.rounded: dict = {}
        self.bias_shift: dict | None = None
        self.inputs_only = False
        # float Conv/Gemm units between integer ones read a per-axis DQ (``_float_weighted_reader``): on the
        # CPU EP, where the guard measures; an EP profile checks its ops one by one and is left as it was
        self.float_readers_per_axis = False
        self.wide: QuantScheme | None = None  # the 16-bit scheme of mixed precision (module docstring)
        self.wide_units: set = set()          # units (node names) at the wide precision

    # -------------------------------------------------------------- precision
    def unit_scheme(self, name: str) -> QuantScheme:
        """The grid a (non-passthrough) unit computes on."""
        return self.wide if self.wide is not None and name in self.wide_units else self.scheme

    def tensor_schemes(self, units: dict) -> dict:
        """tensor -> the scheme it is quantized with (empty without mixed precision: every tensor is on
        ``scheme``): its producer unit's, a passthrough unit's input's, or, for a tensor no unit produces,
        the wide one when a wide unit reads it."""
        if self.wide is None or not self.wide_units:
            return {}
        wide_read = {t for u in units.values() if u.kind != "passthrough" and u.node in self.wide_units
                     for t in u.inputs}
        out: dict = {}
        for node in self.graph_f.nodes:
            u = units.get(node.name)
            if u is None:
                continue
            for t in u.inputs:
                out.setdefault(t, self.wide if t in wide_read else self.scheme)
            if u.kind == "passthrough":
                for t in node.outputs:
                    out[t.name] = out[u.inputs[0]]
            else:
                out[u.output] = self.unit_scheme(u.node)
        return out

    def read_scheme(self, u: QuantUnit, tensor: str, schemes: dict) -> QuantScheme:
        """The grid unit ``u`` reads ``tensor`` on: a passthrough unit the tensor's own, others their own."""
        return schemes.get(tensor, self.scheme) if u.kind == "passthrough" else self.unit_scheme(u.node)

    @property
    def domain(self) -> str:
        """The Q/DQ domain: the wide scheme's when some unit runs wide (com.microsoft for 16 bits below opset 21)."""
        if self.wide is not None and self.wide_units:
            return self.wide.qdq_domain or self.scheme.qdq_domain
        return self.scheme.qdq_domain

    # -------------------------------------------------------------- parameters
    def weight_quant(self, W: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """(int8 weights, scales): symmetric, per channel along ``axis`` (scales [C]) or per tensor
        (a 0-d scale), on ``[-wmax, wmax]``."""
        per_channel = self.scheme.per_channel
        q, s = int8_channels(W, axis if per_channel else None, self.scheme.wmax)
        return q, (s.reshape(-1) if per_channel else s.reshape(()))

    def unit_weight_quant(self, name: str, W: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """``weight_quant`` with the integer weights of ``rounding`` (same scales) where it chose them."""
        q, s = self.weight_quant(W, axis)
        r = self.rounded.get(name)
        return (r, s) if r is not None and r.shape == q.shape else (q, s)

    def range_of(self, tensor: str) -> tuple[float, float]:
        """The calibrated range of ``tensor``; a tensor calibration never saw is an error (the pass is
        rolled back with this reason), never a made-up range."""
        if tensor not in self.ranges:
            raise RuntimeError(f"no calibration range for tensor '{tensor}' (calibration did not capture it)")
        return self.ranges[tensor]

    def params_at(self, tensor: str, scheme: QuantScheme) -> tuple[float, int]:
        """(scale, zero point) of ``tensor``'s calibrated range (and folded clip) on ``scheme``'s grid."""
        lo, hi = self.range_of(tensor)
        return activation_params(scheme, lo, hi, self.clips.get(tensor))

    def params(self, units: dict) -> dict:
        """(scale, zero point) of every activation tensor the units quantize, on its own grid
        (``tensor_schemes``)."""
        schemes = self.tensor_schemes(units)
        params = {}
        for u in units.values():
            if u.kind == "passthrough":
                continue
            for t in u.inputs + [u.output]:
                if t not in params:
                    lo, hi = self.range_of(t)
                    params[t] = activation_params(schemes.get(t, self.scheme), lo, hi,
                                                  self.clips.get(t) if t == u.output else None)
            sch = schemes.get(u.output, self.scheme)
            if u.kind == "elementwise" and sch.qmax > 255 and u.output == u.raw_output and \
                    self.nodes_f[u.node].op == "Sigmoid":
                # QNN HTP's 16-bit Sigmoid has a fixed output encoding (onnxruntime's QNN config sets it too)
                params[u.output] = (1.0 / (sch.qmax - sch.qmin + 1), 0) if sch.qmin == 0 else (1.0 / 32768, 0)
        # passthrough outputs share their input's params (resolved in graph order)
        for node in self.graph_f.nodes:
            u = units.get(node.name)
            if u is not None and u.kind == "passthrough":
                src = params.get(u.inputs[0])
                if src is None:
                    lo, hi = self.range_of(u.inputs[0])
                    src = params[u.inputs[0]] = activation_params(schemes.get(u.inputs[0], self.scheme), lo, hi)
                for t in node.outputs:
                    params[t.name] = src
        return params

    # -------------------------------------------------------------- emission
    def build(self, units: dict) -> gs.Graph:
        """The QDQ graph of ``units`` with their calibrated parameters and the bias correction."""
        return self.emit(units, self.params(units), self.bias_shift)

    def emit(self, units: dict, params: dict, bias_shift: dict | None = None) -> gs.Graph:
        """A QDQ graph: the float model with Q/DQ on unit inputs and outputs and quantized weights."""
        g = gs.import_onnx(self.model_f)
        nodes = {n.name: n for n in g.nodes}
        tmap = g.tensors()
        domain = self.domain
        schemes = self.tensor_schemes(units)
        consts: dict[str, tuple] = {}

        def qparams(tname, sch=None, suffix=""):
            key = tname + suffix
            if key not in consts:
                s, z = params[tname] if sch is None else self.params_at(tname, sch)
                dt = (sch or schemes.get(tname, self.scheme)).activation_dtype
                consts[key] = (gs.Constant(key + "_scale", np.array(s, np.float32)),
                               gs.Constant(key + "_zero_point", np.array(z, dt)))
            return consts[key]

        int_consumers = set(units)
        qtensors = []
        for u in units.values():
            qtensors.extend(u.inputs)
            if u.kind == "passthrough":
                node = nodes[u.node]
                qtensors.extend(t.name for t in node.outputs if t.name in params)
            else:
                qtensors.append(u.output)
        graph_out = {t.name for t in g.outputs}
        quantized = set(qtensors)
        for tname in dict.fromkeys(qtensors):
            t = tmap[tname]
            final = None
            if tname in graph_out and t.inputs:
                # a quantized graph output (every-op placement): op -> t_float -> Q -> DQ -> t (name kept)
                final, t = t, self._rename_output(t)
            consumers = [c for c in list(t.outputs) if not self.inputs_only or c.name in int_consumers]
            if not consumers and final is None:
                continue
            s_c, z_c = qparams(tname)
            own = schemes.get(tname, self.scheme)
            tq = gs.Variable(tname + "_quantized", dtype=own.activation_dtype, shape=t.shape)
            qnode = gs.Node("QuantizeLinear", name=tname + "_QuantizeLinear", inputs=[t, s_c, z_c], outputs=[tq],
                            domain=domain)
            g.nodes.append(qnode)
            shared_dq = None
            converted: dict = {}  # a consumer's grid -> (quantized tensor, scale, zero point) on it
            for k, c in enumerate(consumers):
                if c.name in int_consumers:
                    src = (tq, s_c, z_c)
                    want = self.read_scheme(units[c.name], tname, schemes)
                    if want is not own:
                        if id(want) not in converted:
                            converted[id(want)] = self._convert(g, t, tname, (tq, s_c, z_c), want,
                                                                qparams(tname, want, "_convert"), domain)
                        src = converted[id(want)]
                    dq_out = gs.Variable(f"{tname}_dequantized_{k}", dtype=np.float32, shape=t.shape)
                    g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear_{k}",
                                           inputs=list(src), outputs=[dq_out], domain=domain))
                elif self.float_readers_per_axis and (along := self._float_weighted_reader(
                        c, t, g, domain, quantized)) is not None:
                    # a float Conv/Gemm reads its own DQ, per axis (``_float_weighted_reader``: onnxruntime's
                    # WeightBiasQuantization would quantize its weight per tensor behind a scalar DQ)
                    axis, width = along
                    dq_out = gs.Variable(f"{tname}_dequantized_{k}", dtype=np.float32, shape=t.shape)
                    g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear_{k}", inputs=[
                        tq, gs.Constant(f"{tname}_scale_{k}", np.full(width, s_c.values, np.float32)),
                        gs.Constant(f"{tname}_zero_point_{k}", np.full(width, z_c.values, z_c.values.dtype))],
                        outputs=[dq_out], attrs={"axis": axis}, domain=domain))
                else:
                    if shared_dq is None:
                        shared_dq = gs.Variable(f"{tname}_dequantized", dtype=np.float32, shape=t.shape)
                        g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear",
                                               inputs=[tq, s_c, z_c], outputs=[shared_dq], domain=domain))
                    dq_out = shared_dq
                for i, inp in enumerate(c.inputs):
                    if inp is t:
                        c.inputs[i] = dq_out
            if final is not None:
                g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_DequantizeLinear_output",
                                       inputs=[tq, s_c, z_c], outputs=[final], domain=domain))
        # weights, bias and constant operands
        for u in units.values():
            node = nodes[u.node]
            if u.kind == "weighted":
                x = u.inputs[0]
                want = self.unit_scheme(u.node)
                sx = params[x][0] if want is schemes.get(x, self.scheme) else self.params_at(x, want)[0]
                self._quantize_weights(g, node, u, sx, (bias_shift or {}).get(u.node))
            elif u.kind == "elementwise":
                for i, t in enumerate(node.inputs):
                    if isinstance(t, gs.Constant) and (u.const_inputs is None or i in u.const_inputs):
                        node.inputs[i] = self._const_dq(g, t, f"{u.node}_in{i}", self.unit_scheme(u.node))
        g.cleanup().toposort()
        drop_qdq_value_info(g)  # every graph built alike: the one the guard measured is the one written
        return g

    @staticmethod
    def _float_weighted_reader(c: gs.Node, t: gs.Variable, g: gs.Graph, domain: str,
                               quantized: set) -> tuple[int, int] | None:
        """``(axis, width)`` of ``t``'s input-feature axis when ``c`` is a float Conv/ConvTranspose/Gemm reading
        ``t`` as its data input with a constant weight and its output is quantized (a tensor of ``quantized``,
        directly or through one Relu/Clip, which onnxruntime drops before a Q), so that ``c`` reads ``t``
        through a DequantizeLinear of its own along that axis (the same scale and zero point repeated:
        exact); else None (the shared DQ).

        onnxruntime's level-1 ``WeightBiasQuantization`` rewrites ``DQ(scalar scale) -> Conv/Gemm(float
        weight initializer) -> Q`` (a kept-float weight stored int8 is such an initializer once folded) into
        a QDQ node unit with the weight quantized per tensor, symmetric int8: the integer kernel runs a
        unit the plan keeps float, on a coarser weight grid than the plan's own (the demo CNN with its
        most sensitive depthwise conv kept float: cosine 0.836 instead of 0.907 on 16 calibration
        samples). It takes only a scalar activation scale: a per-axis DQ keeps the unit float. Needs
        ``axis`` (opset 13, the standard domain) and a width above 1, read from the weight's shape."""
        if c.op not in ("Conv", "ConvTranspose", "Gemm") or len(c.inputs) < 2 or c.inputs[0] is not t:
            return None
        w = c.inputs[1]
        if not isinstance(w, gs.Constant) or w.values.ndim < 2 or domain or int(g.opset or 0) < 13:
            return None
        out = c.outputs[0]
        act = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op in ("Relu", "Clip") else None
        if out.name not in quantized and (act is None or act.outputs[0].name not in quantized):
            return None  # no Q after it: onnxruntime leaves the unit float (its WeightBiasQuantization needs one)
        shape = w.values.shape
        if c.op == "Conv":
            axis, width = 1, shape[1] * int(c.attrs.get("group", 1))
        elif c.op == "ConvTranspose":
            axis, width = 1, shape[0]
        else:  # Gemm: K, on axis 1 of A (axis 0 with transA)
            axis = 0 if int(c.attrs.get("transA", 0)) else 1
            width = shape[1] if int(c.attrs.get("transB", 0)) else shape[0]
        return (axis, int(width)) if width > 1 else None

    @staticmethod
    def _rename_output(t: gs.Variable) -> gs.Variable:
        """The graph output ``t``'s producer writes ``t + "_float"`` instead, which every consumer of ``t`` now
        reads; ``t`` is left without producer (the caller's final DequantizeLinear writes it)."""
        pre = gs.Variable(t.name + "_float", dtype=t.dtype, shape=t.shape)
        for c in list(t.outputs):
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = pre
        producer = t.inputs[0]
        producer.outputs[list(producer.outputs).index(t)] = pre
        return pre

    @staticmethod
    def _convert(g: gs.Graph, t, tname: str, src: tuple, want: QuantScheme, qp: tuple, domain: str) -> tuple:
        """``src`` (quantized ``t``, scale, zero point) requantized onto ``want``'s grid with the parameters
        ``qp``: DQ -> Q, the pair the QNN EP runs as one Convert op; returns (quantized, scale, zero point)."""
        mid = gs.Variable(f"{tname}_convert_dequantized", dtype=np.float32, shape=t.shape)
        g.nodes.append(gs.Node("DequantizeLinear", name=f"{tname}_convert_DequantizeLinear", inputs=list(src),
                               outputs=[mid], domain=domain))
        out = gs.Variable(f"{tname}_convert_quantized", dtype=want.activation_dtype, shape=t.shape)
        g.nodes.append(gs.Node("QuantizeLinear", name=f"{tname}_convert_QuantizeLinear", inputs=[mid, *qp],
                               outputs=[out], domain=domain))
        return (out, *qp)

    def _const_dq(self, g: gs.Graph, t: gs.Constant, name: str, scheme: QuantScheme | None = None) -> gs.Variable:
        sch = scheme or self.scheme
        c = np.asarray(t.values).astype(np.float32)
        lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
        s, z = activation_params(sch, lo, hi)
        qv = np.asarray(np.clip(np.round(c / s) + z, sch.qmin, sch.qmax)).astype(sch.activation_dtype)
        out = gs.Variable(name + "_dequantized", dtype=np.float32, shape=list(c.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=name + "_DequantizeLinear",
                               inputs=[gs.Constant(name + "_quantized", qv),
                                       gs.Constant(name + "_scale", np.array(s, np.float32)),
                                       gs.Constant(name + "_zero_point", np.array(z, sch.activation_dtype))],
                               outputs=[out], domain=self.domain))
        return out

    def _quantize_weights(self, g: gs.Graph, node: gs.Node, u: QuantUnit, sx: float, shift) -> None:
        """Int8 weights and the int32 bias (``s_b = sx * s_w``, ``sx`` the input's scale on the unit's grid)."""
        per_channel, domain = self.scheme.per_channel, self.domain
        W = np.asarray(node.inputs[1].values).astype(np.float32)
        axis = u.weight_axis
        wq, ws = self.unit_weight_quant(node.name, W, axis)
        dq_w = gs.Variable(node.name + "_W_dequantized", dtype=np.float32, shape=list(W.shape))
        attrs = {"axis": axis} if per_channel else {}
        g.nodes.append(gs.Node("DequantizeLinear", name=node.name + "_W_DequantizeLinear", attrs=attrs,
                               inputs=[gs.Constant(node.name + "_W_quantized", wq),
                                       gs.Constant(node.name + "_W_scale", ws),
                                       gs.Constant(node.name + "_W_zero_point", np.zeros(ws.shape, np.int8))],
                               outputs=[dq_w], domain=domain))
        node.inputs[1] = dq_w
        bias_idx = 2
        b = None
        if len(node.inputs) > bias_idx and node.inputs[bias_idx].name:
            b = np.asarray(node.inputs[bias_idx].values).astype(np.float32).reshape(-1)
        if shift is not None and node.op in ("Conv", "ConvTranspose", "Gemm"):  # MatMul has no bias to carry it
            b = (np.zeros(len(shift), np.float32) if b is None else b) - shift.astype(np.float32)
        if b is None:
            return
        n_out = W.shape[axis] if node.op != "Gemm" else W.shape[0 if int(node.attrs.get("transB", 0)) else 1]
        if b.size == 1 and n_out > 1:
            b = np.full(n_out, b[0], np.float32)
        sb = (np.float32(sx) * (ws if ws.ndim else np.full(n_out, ws, np.float32))).astype(np.float32)
        sb = np.broadcast_to(sb, b.shape).astype(np.float32)
        bq = bias_int32(b, sb)
        dq_b = gs.Variable(node.name + "_B_dequantized", dtype=np.float32, shape=list(b.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=node.name + "_B_DequantizeLinear",
                               attrs={"axis": 0} if per_channel else {},
                               inputs=[gs.Constant(node.name + "_B_quantized", bq),
                                       gs.Constant(node.name + "_B_scale", sb if per_channel else
                                                   np.array(sb.reshape(-1)[0], np.float32)),
                                       gs.Constant(node.name + "_B_zero_point",
                                                   np.zeros(sb.shape if per_channel else (), np.int32))],
                               outputs=[dq_b], domain=domain))
        if len(node.inputs) > bias_idx:
            node.inputs[bias_idx] = dq_b
        else:
            while len(node.inputs) < bias_idx:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(dq_b)
