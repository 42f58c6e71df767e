"""Small passes registered only by the reliability tests (names start with ``t_``), so CLI,
manager and error-path tests exercise every branch without depending on the real passes.

- t_strip_identity (lossless): removes Identity nodes (rewires consumers / graph outputs).
- t_noop (lossless): changes nothing.
- t_crash: raises an unexpected exception (a bug inside a pass) -> rolled back.
- t_corrupt (lossless, but is not): scales the first float initializer -> outputs change -> rolled back.
- t_noise (lossy, strength ``ratio``): adds seeded noise of relative size ``ratio`` to every float
  weight; weaker() halves the ratio, so the manager can back off until a budget holds.
- t_needs_data (lossless, needs_data): reads every calibration sample, changes nothing.
- t_rename_output (lossless): renames the first graph output -> rolled back (interface changed).
- t_sleep (lossless): sleeps ``seconds`` (to interrupt a run).
- t_reject_quantized: raises InputError on a model that already has QuantizeLinear /
  DequantizeLinear nodes, as the quantize pass does.
- t_clip_input (lossy): clips the first graph input to [-4, 4], the way a calibrated range
  saturates inputs larger than the calibration samples'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError
from onnxshrink.passes.base import Pass, PassResult
from onnxshrink.passes.registry import register


def strip_identity(graph: gs.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.inputs or not node.outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if dst in graph.outputs:
            if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant):
                continue  # keep: the graph output would alias an input or a constant
            # the producer writes the graph output directly
            idx = graph.outputs.index(dst)
            for c in list(src.outputs):
                if c is not node:
                    c.inputs[c.inputs.index(src)] = dst
            producer = src.inputs[0] if src.inputs else None
            if producer is None:
                continue
            producer.outputs[producer.outputs.index(src)] = dst
            graph.outputs[idx] = dst
        else:
            for c in list(dst.outputs):
                for i, t in enumerate(c.inputs):
                    if t is dst:
                        c.inputs[i] = src
        node.inputs.clear()
        node.outputs.clear()
        removed += 1
    graph.cleanup().toposort()
    return removed


@register
class StripIdentity(Pass):
    name = "t_strip_identity"
    summary = "test pass: remove Identity nodes"
    lossless = True

    def run(self, graph, ctx):
        n = strip_identity(graph)
        return PassResult(graph, n > 0, {"removed": n})


@register
class Noop(Pass):
    name = "t_noop"
    summary = "test pass: changes nothing"
    lossless = True

    def run(self, graph, ctx):
        return PassResult(graph, False, reason="nothing to do")


@register
class Crash(Pass):
    name = "t_crash"
    summary = "test pass: raises an unexpected error"
    lossless = True

    def run(self, graph, ctx):
        raise ZeroDivisionError("simulated bug in a pass")


def _float_constants(graph):
    return [t for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and t.values.dtype.kind == "f" and t.values.size > 1]


@register
class Corrupt(Pass):
    name = "t_corrupt"
    summary = "test pass: claims to be lossless but changes a weight"
    lossless = True

    def run(self, graph, ctx):
        consts = _float_constants(graph)
        if not consts:
            return PassResult(graph, False, reason="no weights")
        consts[0].values = (consts[0].values * 1.5).astype(consts[0].values.dtype)
        return PassResult(graph, True, {})


@dataclass
class NoiseOptions:
    ratio: float = field(default=0.5, metadata={"help": "relative size of the noise added to float weights"})


@register
class Noise(Pass):
    name = "t_noise"
    summary = "test pass: lossy weight noise with a strength knob"
    lossless = False
    Options = NoiseOptions

    def run(self, graph, ctx):
        consts = _float_constants(graph)
        for c in consts:  # seeded noise of relative size ``ratio`` (the seed visibly matters)
            v = c.values
            noise = ctx.rng.standard_normal(v.shape) * float(np.std(v)) * self.options.ratio
            c.values = (v + noise).astype(v.dtype)
        return PassResult(graph, bool(consts), {"perturbed": len(consts)})

    def weaker(self):
        r = self.options.ratio / 2
        return None if r < 1e-3 else Noise(ratio=r)

    def describe_strength(self):
        return f"ratio={self.options.ratio:g}"


@register
class NeedsData(Pass):
    name = "t_needs_data"
    summary = "test pass: needs calibration data, changes nothing"
    lossless = True
    needs_data = True

    def run(self, graph, ctx):
        n = sum(1 for _ in ctx.calib)  # streams every calibration sample (checked on the way)
        return PassResult(graph, False, reason=f"read {n} samples")


@register
class RejectQuantized(Pass):
    name = "t_reject_quantized"
    summary = "test pass: refuses already-quantized models like the quantize pass"
    lossless = True

    def run(self, graph, ctx):
        q = [n for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv",
                                                 "QLinearMatMul", "ConvInteger", "MatMulInteger")]
        if q:
            raise InputError(f"the model is already quantized ({len(q)} quantized-op nodes, first: {q[0].op} "
                             f"'{q[0].name}')")
        return PassResult(graph, False, reason="float model")



@register
class RenameOutput(Pass):
    name = "t_rename_output"
    summary = "test pass: renames the first graph output (values unchanged)"
    lossless = True

    def run(self, graph, ctx):
        graph.outputs[0].name = graph.outputs[0].name + "_renamed"
        return PassResult(graph, True, {})


@dataclass
class SleepOptions:
    seconds: float = field(default=1.0, metadata={"help": "how long to sleep"})
    marker: str = field(default="", metadata={"help": "a file to create when the sleep starts"})


@register
class Sleep(Pass):
    name = "t_sleep"
    summary = "test pass: sleeps (to interrupt a run)"
    lossless = True
    Options = SleepOptions

    def run(self, graph, ctx):
        import time
        if self.options.marker:
            open(self.options.marker, "w").close()
        time.sleep(self.options.seconds)
        return PassResult(graph, False, reason="slept")


@register
class ClipInput(Pass):
    name = "t_clip_input"
    summary = "test pass: clips the first input to [-4, 4] (lossy for large inputs only)"
    lossless = False

    def run(self, graph, ctx):
        x = graph.inputs[0]
        clipped = gs.Variable(x.name + "_clipped", dtype=x.dtype, shape=x.shape)
        for node in list(graph.nodes):
            node.inputs = [clipped if t is x else t for t in node.inputs]
        lo = gs.Constant(x.name + "_lo", np.array(-4.0, np.float32))
        hi = gs.Constant(x.name + "_hi", np.array(4.0, np.float32))
        graph.nodes.append(gs.Node("Clip", "t_clip", inputs=[x, lo, hi], outputs=[clipped]))
        graph.toposort()
        return PassResult(graph, True, {})
