"""Channel-last (NHWC) image I/O for a target (emission option ``channels_last``).

4-D float graph inputs and outputs become NHWC through exact Transposes,
``x_nchw = Transpose(x_nhwc, (0, 3, 1, 2))`` and ``y_nhwc = Transpose(y_nchw, (0, 2, 3, 1))``;
next to a per-tensor QuantizeLinear/DequantizeLinear the Transpose moves to its integer side (an
elementwise map with one scale commutes with any permutation). ``ChannelsLastIO`` runs such a
model on NCHW samples and gives NCHW outputs back, so it is measured against the original.
"""

from __future__ import annotations

__all__ = ["TO_NCHW", "TO_NHWC", "to_channels_last", "channels_last_samples", "ChannelsLastIO"]

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.targets.profiles import QDQ_OPS
from onnxshrink.targets.rewrites import export_graph, unique_name

TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def to_channels_last(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """4-D float graph inputs and outputs become channel-last (NHWC), names kept; exact:

        x (N,H,W,C) -> Transpose(0,3,1,2) -> the NCHW graph -> Transpose(0,2,3,1) -> y (N,H,W,C)

    Where the input's only consumer is a per-tensor QuantizeLinear (or the output's producer a
    per-tensor DequantizeLinear) the Transpose moves to the integer side of it (an elementwise map
    with one scale commutes with a permutation): ``x -> Q -> Transpose -> DQ``, so no float node is
    added. onnxruntime's layout transformation for an NHWC EP (QNN, NNAPI, XNNPACK) then cancels it
    against the Transpose it inserts before the first (after the last) convolution.
    Returns (model, {"inputs": [...], "outputs": [...]}) naming the tensors changed."""
    g = gs.import_onnx(model)
    info = {"inputs": [], "outputs": []}
    for k, old in enumerate(list(g.inputs)):
        if not _image_tensor(old):
            continue
        name = old.name
        old.name = unique_name(g, f"{name}_nchw")
        new = gs.Variable(name, dtype=old.dtype, shape=[old.shape[i] for i in TO_NHWC])
        users = list(old.outputs)
        if len(users) == 1 and users[0].op == "QuantizeLinear" and _per_tensor_qdq(users[0]) \
                and users[0].outputs[0] not in g.outputs:
            q = users[0]
            qy = q.outputs[0]
            qn = gs.Variable(unique_name(g, f"{qy.name}_nhwc"), dtype=qy.dtype,
                             shape=[qy.shape[i] for i in TO_NHWC] if qy.shape is not None else None)
            q.inputs[0] = new
            q.outputs[0] = qn
            g.nodes.append(gs.Node("Transpose", unique_name(g, f"{name}_to_nchw"), {"perm": list(TO_NCHW)},
                                   inputs=[qn], outputs=[qy]))
            old.outputs.clear()
        else:
            g.nodes.append(gs.Node("Transpose", unique_name(g, f"{name}_to_nchw"), {"perm": list(TO_NCHW)},
                                   inputs=[new], outputs=[old]))
        g.inputs[k] = new
        info["inputs"].append(name)
    for k, old in enumerate(list(g.outputs)):
        if not _image_tensor(old) or old in g.inputs:
            continue
        name = old.name
        old.name = unique_name(g, f"{name}_nchw")
        new = gs.Variable(name, dtype=old.dtype, shape=[old.shape[i] for i in TO_NHWC])
        prod = old.inputs[0] if old.inputs else None
        if prod is not None and prod.op == "DequantizeLinear" and _per_tensor_qdq(prod) and not old.outputs:
            xq = prod.inputs[0]
            tq = gs.Variable(unique_name(g, f"{xq.name}_nhwc"), dtype=xq.dtype,
                             shape=[xq.shape[i] for i in TO_NHWC] if xq.shape is not None else None)
            g.nodes.append(gs.Node("Transpose", unique_name(g, f"{name}_to_nhwc"), {"perm": list(TO_NHWC)},
                                   inputs=[xq], outputs=[tq]))
            prod.inputs[0] = tq
            prod.outputs[0] = new
        else:
            g.nodes.append(gs.Node("Transpose", unique_name(g, f"{name}_to_nhwc"), {"perm": list(TO_NHWC)},
                                   inputs=[old], outputs=[new]))
        g.outputs[k] = new
        info["outputs"].append(name)
    if not info["inputs"] and not info["outputs"]:
        return model, info
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return export_graph(g, model), info


def channels_last_samples(samples, names) -> list[dict]:
    """Feeds for a channel-last model: the named NCHW inputs transposed to NHWC."""
    return [{k: (np.ascontiguousarray(v.transpose(TO_NHWC)) if k in names else v) for k, v in s.items()}
            for s in samples]


class ChannelsLastIO:
    """Runs a model whose image I/O went channel-last (``to_channels_last``) on NCHW samples and
    gives NCHW outputs back, so it is measured against the original model's outputs.
    ``layout`` is the emission's ``channels_last`` info ({"inputs": [...], "outputs": [...]}) or None."""

    def __init__(self, layout: dict | None):
        layout = layout if layout and not layout.get("rolled_back") else {}
        self.inputs = set(layout.get("inputs", ()))
        self.outputs = set(layout.get("outputs", ()))

    @property
    def identity(self) -> bool:
        """No image I/O is channel-last: the model runs on the samples as they are."""
        return not self.inputs and not self.outputs

    def feeds(self, samples) -> list[dict]:
        return channels_last_samples(samples, self.inputs) if self.inputs else samples

    def shapes(self, shapes: dict | None) -> dict | None:
        if not shapes or not self.inputs:
            return shapes
        return {k: ([v[i] for i in TO_NHWC] if k in self.inputs and len(v) == 4 else v) for k, v in shapes.items()}

    def back(self, outputs, names) -> list:
        """Per-sample output lists (in ``names`` order) with the channel-last ones back in NCHW."""
        return [[o.transpose(TO_NCHW) if n in self.outputs else o for n, o in zip(names, outs)]
                for outs in outputs]

    def run(self, model: onnx.ModelProto, samples, optimize: bool = True) -> list:
        return self.run_sets(model, [samples], optimize)[0]

    def run_sets(self, model: onnx.ModelProto, sample_sets, optimize: bool = True) -> list:
        """``run`` on each of ``sample_sets`` (a list of outputs per set), from one session."""
        from onnxshrink.runtime import make_session
        sess = make_session(model, optimize=optimize)
        names = [o.name for o in sess.get_outputs()]
        return [self.back([sess.run(names, s) for s in self.feeds(samples)], names) for samples in sample_sets]


def _per_tensor_qdq(node: gs.Node) -> bool:
    """A QuantizeLinear/DequantizeLinear with one scale (it maps every element alike, so it commutes
    with any permutation of the elements)."""
    return node.op in QDQ_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) and \
        np.asarray(node.inputs[1].values).size == 1


def _image_tensor(t) -> bool:
    """A 4-D float tensor (N, C, H, W)."""
    return t.shape is not None and len(t.shape) == 4 and t.dtype is not None and np.dtype(t.dtype).kind == "f"
