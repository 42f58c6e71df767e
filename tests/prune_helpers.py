"""Test helpers for the prune pass: zero a fraction of the channels of every prunable group the
way a framework's structured-pruning mask would (filters, biases, BN scale and shift of the
channel), and fold constant subgraphs when the cleanup pass is not available."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels import analyze, balanced_selection
from onnxshrink.graph.values import constant_value

# members whose zeroing makes the channel's values exactly zero
ZERO_TAGS = {"conv_w", "conv_b", "gemm_w", "gemm_b", "convt_w", "convt_b", "matmul_w", "bn_scale", "bn_bias",
             "in_scale", "in_bias", "add_const", "sub_const", "dw_w", "dw_b"}


def _set_value(node: gs.Node, slot: int, values: np.ndarray) -> None:
    t = node.inputs[slot]
    if isinstance(t, gs.Constant):
        t.values = values
    else:  # Constant node output
        t.inputs[0].attrs["value"] = gs.Constant(t.name + "_value", values)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with onnx-graphsurgeon (a stand-in for the cleanup pass): ConstantOfShape /
    Constant / Unsqueeze-of-constant subgraphs become initializers."""
    g = gs.import_onnx(model)
    g.fold_constants(size_threshold=None).cleanup()
    g.cleanup().toposort()
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = max(model.ir_version, 4)
    for f in ("producer_name", "producer_version"):
        setattr(m, f, getattr(model, f))
    del m.opset_import[:]
    m.opset_import.extend(model.opset_import)
    return m


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Give conv/gemm weights seeded He-normal values and BN statistics plausible values (the
    'light' models of the onnx package hold a constant 0.02 everywhere, which makes every channel
    identical)."""
    rng = np.random.default_rng(seed)
    g = gs.import_onnx(model)
    done = set()
    for n in g.nodes:
        if n.op in ("Conv", "Gemm", "ConvTranspose") and isinstance(n.inputs[1], gs.Constant):
            w = n.inputs[1]
            if w.name in done:
                continue
            v = np.asarray(w.values)
            fan_in = int(np.prod(v.shape[1:])) if n.op == "Conv" else (
                v.shape[0] if n.op == "ConvTranspose" else
                v.shape[1] if n.attrs.get("transB", 0) else v.shape[0])
            w.values = (rng.standard_normal(v.shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(v.dtype)
            done.add(w.name)
            if len(n.inputs) > 2 and isinstance(n.inputs[2], gs.Constant) and n.inputs[2].name not in done:
                b = n.inputs[2]
                b.values = (rng.standard_normal(b.shape) * 0.05).astype(np.asarray(b.values).dtype)
                done.add(b.name)
        if n.op == "BatchNormalization":
            for slot, (lo, hi) in zip(range(1, 5), ((0.5, 1.5), (-0.2, 0.2), (-0.2, 0.2), (0.5, 2.0))):
                t = n.inputs[slot]
                if isinstance(t, gs.Constant) and t.name not in done:
                    t.values = rng.uniform(lo, hi, t.shape).astype(np.asarray(t.values).dtype)
                    done.add(t.name)
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = model.ir_version
    del m.opset_import[:]
    m.opset_import.extend(model.opset_import)
    return m


def zero_channels(model: onnx.ModelProto, ratio: float = 0.3, seed: int = 0, input_shapes: dict | None = None,
                  by: str = "random", samples: list | None = None):
    """Zero ``ratio`` of the units of every prunable group (at least one unit stays): random units
    (``by="random"``) or those with the smallest filter L2 norm (``by="norm"``, what a magnitude
    pruner's mask would hit), or the smallest activation energy x consumer weight norm on
    ``samples`` (``by="activation"``: keeps a trained model working best).

    Returns (model, info) with info = {'units': zeroed units, 'groups': groups touched,
    'prunable_units': units in prunable groups}."""
    rng = np.random.default_rng(seed)
    g = gs.import_onnx(model)
    a = analyze(g, input_shapes)
    chosen = set()
    scores = None
    if by in ("norm", "activation"):
        from onnxshrink.passes.base import Context
        from onnxshrink.passes.prune import sink_statistics, unit_scores
        stats = sink_statistics(a, Context(), model, samples) if by == "activation" else None
        scores = unit_scores(a, "activation" if stats else "l2", stats)
    touched = 0
    total = 0
    for grp in a.groups():
        if not grp.prunable or grp.units < 2:
            continue
        total += grp.units
        k = int(np.floor(ratio * grp.units))
        if k == 0:
            continue
        touched += 1
        if grp.balances:
            # grouped convs: every group must lose equally many channels (random or lowest scores)
            sc = scores if scores is not None else dict(zip(grp.unit_labels, rng.random(grp.units).tolist()))
            chosen |= balanced_selection(a, grp.unit_labels, sc, k)
        elif scores is None:
            chosen.update(rng.choice(np.asarray(grp.unit_labels), size=k, replace=False).tolist())
        else:
            order = sorted(grp.unit_labels, key=lambda u: scores.get(u, 0.0))
            chosen.update(order[:k])
    rem = np.fromiter(chosen, dtype=np.int64)
    masks: dict = {}
    for m in a.members:
        if m.tag not in ZERO_TAGS:
            continue
        z = np.isin(a.unit_of(m.ids), rem)
        if z.any():
            masks.setdefault((id(m.node), m.slot), (m.node, m.slot, []))[2].append((m.axis, z))
    for node, slot, lst in masks.values():
        v = constant_value(node.inputs[slot], numeric_attrs=True)
        if v is None:
            continue
        v = np.array(v, copy=True)
        for axis, z in lst:
            if z.ndim == 2:  # grouped conv input columns: row g of the mask for group g's output rows
                rows = v.shape[0] // z.shape[0]
                for gi in range(z.shape[0]):
                    v[gi * rows:(gi + 1) * rows, z[gi]] = 0
                continue
            idx = [slice(None)] * v.ndim
            idx[axis] = z
            v[tuple(idx)] = 0
        _set_value(node, slot, v)
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = model.ir_version
    del m.opset_import[:]
    m.opset_import.extend(model.opset_import)
    return m, {"units": len(chosen), "groups": touched, "prunable_units": total}


def single_input_model(nodes, inits, x_shape=(1, 3, 8, 8), out_name="y", opset=17) -> onnx.ModelProto:
    """A model of ``nodes`` from input 'x' (float, ``x_shape``) to one output ``out_name``, its
    output type from shape inference: the graphs of the channel and prune unit tests."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)
    m.graph.output[0].CopyFrom(inferred.graph.output[0])
    return m
