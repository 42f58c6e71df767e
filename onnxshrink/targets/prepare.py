"""Target emission: make a model runtime-ready for one execution provider, and say how much of it
the EP takes.

Steps (each lossless; the result is checked numerically against the input model, and a step
whose outputs move by more than ``EMIT_TOL`` relative max-abs error is rolled back):

1. opset into the profile's range (``onnx.version_converter``);
2. constant and static-shape folding (Constant nodes become initializers); with every input
   dimension fixed, shape inference with data propagation gives every shape-arithmetic value
   (Shape -> Gather -> Range -> Expand -> Reshape ...) a constant; onnx-graphsurgeon's
   ``fold_constants`` evaluates those subgraphs into initializers. Quantize/Dequantize nodes are
   never folded, so QDQ weights stay quantized;
3. exact rewrites of ops the target lacks and fusions it prefers (``onnxshrink.targets.rewrites``);
4. with the ``channels_last`` option: 4-D float graph inputs/outputs become NHWC through exact
   Transposes (``onnxshrink.targets.layout``), checked numerically;
5. coverage: per node, whether the EP takes it and why not (``onnxshrink.targets.coverage``);
6. for ``qnn`` when ``onnxruntime-qnn`` is installed: a real HTP-backend session
   (``onnxshrink.targets.qnn``), fidelity against the original fp32 model on the CPU; for
   ``openvino`` when a Python with ``onnxruntime-openvino`` is there: a real OpenVINO EP session
   (``onnxshrink.targets.openvino``): placement, fidelity against the same reference, and speed
   against the fp32 model the passes started from (``ctx.template``) on the same EP.

``prepare_for_target`` runs steps 1-3 before the passes (ops inside a QDQ group are never split,
so rewrites must happen before quantization); ``emit_for_target`` runs them again after the
passes, then 4-6.
"""

from __future__ import annotations

__all__ = ["prepare_for_target", "emit_for_target", "target_verdict", "convert_opset", "fold_static_shapes",
           "FOLD_SIZE_LIMIT", "EMIT_TOL"]

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.data import SyntheticSource, input_specs
from onnxshrink.graph.shapes import infer_shapes
from onnxshrink.graph.values import is_weight_decode
from onnxshrink.model import copy_model_fields
from onnxshrink.targets.coverage import activation_qtypes, coverage
from onnxshrink.targets.layout import ChannelsLastIO, to_channels_last
from onnxshrink.targets.openvino import openvino_check, openvino_verdict
from onnxshrink.targets.profiles import QDQ_OPS
from onnxshrink.targets.qnn import qnn_htp_check
from onnxshrink.targets.rewrites import apply_rewrites, export_graph, op_counts

FOLD_SIZE_LIMIT = 1 << 24  # bytes: never fold a subgraph into a constant larger than this
EMIT_TOL = 1e-4            # emission is lossless: relative max-abs error allowed vs the input model


def prepare_for_target(model: onnx.ModelProto, profile, ctx=None) -> tuple[onnx.ModelProto, dict]:
    """Before the passes: opset into range, shape folding (when the inputs are static), exact
    rewrites of ops the target lacks. Lossless; returns (model, info)."""
    return _transform(model, profile, ctx)


def emit_for_target(model: onnx.ModelProto, profile, ctx=None, qnn: bool | None = None,
                    device: bool | None = None) -> tuple[onnx.ModelProto, dict]:
    """After the passes: the preparation steps again (the passes may have added foldable
    subgraphs), channel-last I/O when the profile asks for it, then the coverage report; for qnn
    the real HTP check, for openvino the real OpenVINO EP check, when available (``device=False``
    skips it, ``device=True`` requires it; ``qnn`` is the older name of ``device``), fed NHWC
    samples and compared in NCHW for a channel-last model."""
    device = qnn if device is None else device
    model, steps = _transform(model, profile, ctx)
    info = {"target": profile.name, "provider": profile.provider, "emission": steps,
            "scheme": {"activations": ", ".join(activation_qtypes(model)) or "float",
                       "profile_activations": profile.activation_dtype, "weights": profile.weight_dtype,
                       "symmetric_weights": profile.symmetric_weights, "per_channel": profile.per_channel,
                       "activations_in_model": activation_qtypes(model)},
            "opset": _opset(model), "static_inputs": _static_inputs(model)}
    if getattr(profile, "channels_last", False):
        model, info["channels_last"] = _apply_channels_last(model, ctx)
    io = ChannelsLastIO(info.get("channels_last"))
    info["coverage"] = coverage(model, profile)
    ref = getattr(ctx, "reference", None)
    if profile.name == "qnn" and device is not False:
        samples = _samples(model, ctx, n=int(os.environ.get("ONNXSHRINK_QNN_SAMPLES", "8")))
        info["qnn_htp"] = qnn_htp_check(model, io.feeds(samples), ref[:len(samples)] if ref is not None else None,
                                        required=bool(device), outputs_back=io, htp_arch=profile.htp_arch)
    if profile.name == "openvino" and device is not False:
        samples = _samples(model, ctx, n=int(os.environ.get("ONNXSHRINK_OPENVINO_SAMPLES", "8")))
        info["openvino"] = openvino_check(model, io.feeds(samples), ref[:len(samples)] if ref is not None else None,
                                          baseline=getattr(ctx, "template", None), required=bool(device),
                                          outputs_back=io)
    info["verdict"] = target_verdict(info, profile, _device_budget(ctx))
    return model, info


def target_verdict(info: dict, profile, budget_holds=None) -> dict:
    """Whether the emitted model is what the target asked for: the EP takes all of it (coverage; where
    the QNN HTP simulator ran and took every node with CPU fallback disabled, its verdict stands over
    the static analysis, which is only a stand-in for it), no
    node computes in float on an HTP without a float unit (``integer_only``: before v73), the QNN HTP
    run accepts it where onnxruntime-qnn is installed and keeps the budget (``budget_holds``) on its
    outputs, the OpenVINO EP run takes all of it,
    is not clearly slower than the fp32 model there and keeps the budget (``budget_holds``) there,
    and requested channel-last I/O was kept. ``{"ok": bool, "problems": [...]}``; with
    ``allow_partial`` a partial placement is a note, not a problem. The manager fails closed (exit 4)
    on problems."""
    problems, notes = [], []
    cov = info.get("coverage") or {}
    htp = info.get("qnn_htp") or {}
    if cov and not cov.get("accepted", True):
        first = cov.get("rejected_because") or []
        why = (f"the {profile.provider} check rejects the model ({cov.get('taken', '?')}/{cov.get('nodes', '?')} "
               f"nodes taken; it requires that {cov.get('accepted_means', 'the EP takes the model')}"
               + (f"; first problem: {first[0]}" if first else "") + ")")
        if htp.get("available") and htp.get("accepted"):
            # the static analysis is a stand-in for the EP: where the EP itself ran, its verdict stands
            notes.append(why + "; the QNN HTP run takes every node with CPU fallback disabled, and its "
                               "verdict stands")
        else:
            (notes if profile.allow_partial else problems).append(why)
    if getattr(profile, "integer_only", False) and cov.get("float_nodes"):
        names = ", ".join(cov.get("float_node_names", [])[:5])
        problems.append(f"{cov['float_nodes']} node(s) compute in float (e.g. {names}) "
                        f"and HTP v{profile.htp_arch} has no float unit: every compute op must sit between Q/DQ "
                        f"(the quantize pass could not hold the budget with integer activations, or did not run)")
    if htp.get("available") and not htp.get("accepted", False):
        why = f"the QNN HTP run rejects the model ({htp.get('error') or htp.get('reason') or 'not every node on HTP'})"
        (notes if profile.allow_partial else problems).append(why)
    if htp.get("accepted") and htp.get("fidelity") and budget_holds is not None and \
            budget_holds(htp["fidelity"]) is False:
        fid = htp["fidelity"]
        problems.append(f"the budget is not met on the QNN HTP's outputs (cosine {fid.get('cosine', 0):.5f} "
                        f"mean, {fid.get('cosine_min', 0):.5f} worst against fp32, "
                        f"{htp.get('samples', '?')} samples)")
    if "openvino" in info:
        p, n = openvino_verdict(info["openvino"], profile.allow_partial, budget_holds)
        problems += p
        notes += n
    cl = info.get("channels_last") or {}
    if cl.get("rolled_back"):
        problems.append(f"the requested channel-last I/O was rolled back ({cl.get('reason', '')})")
    return {"ok": not problems, "problems": problems, "notes": notes}


def _device_budget(ctx):
    """The budget's test of a fidelity dict measured on a device (None without a budget; the test
    answers None when the dict lacks the budget's metric, e.g. accuracy without labels)."""
    budget = getattr(ctx, "budget", None)
    if budget is None:
        return None
    return lambda fid: ctx.budget_holds(fid) if budget.metric in fid else None


def convert_opset(model: onnx.ModelProto, lo: int, hi: int) -> tuple[onnx.ModelProto, dict]:
    """Convert the default-domain opset into [lo, hi]; returns (model, info)."""
    cur = _opset(model)
    want = min(max(cur, lo), hi)
    if want == cur:
        return model, {"opset": cur, "changed": False}
    try:
        from onnx import version_converter
        out = version_converter.convert_version(model, want)
        copy_model_fields(model, out)
        for o in out.opset_import:  # copy_model_fields does not lower; set the converted default opset
            if o.domain in ("", "ai.onnx"):
                o.version = want
        onnx.checker.check_model(out)
        return out, {"opset": want, "from": cur, "changed": True}
    except Exception as e:
        return model, {"opset": cur, "changed": False,
                       "error": f"cannot convert opset {cur} -> {want}: {str(e).splitlines()[0][:200]}"}


FOLD_ROUNDS = 8  # shape inference and folding rounds at most (each round's folds let inference see further)


def fold_static_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold constant and shape subgraphs into initializers (Q/DQ nodes excluded). With static
    input shapes this removes Shape/Gather/Range/Expand/ConstantOfShape arithmetic entirely.

    Shape inference, then folding, repeated until nothing more folds (``FOLD_ROUNDS`` at most): a
    shape computed by a folded subgraph (a Pad's pads, a Reshape's target) is known to inference only
    in the next round. torchvision's Swin-T (window shifts and paddings computed from shapes): one
    round left 2776 nodes (295 Shape, 90 Range), five leave 593 (2 Shape), and its QNN coverage
    check no longer rejects what the HTP itself takes."""
    before = op_counts(model)
    out, counts, rounds = model, before, 0
    for rounds in range(1, FOLD_ROUNDS + 1):
        m = infer_shapes(out, data_prop=True)
        g = gs.import_onnx(m)
        try:
            g.fold_constants(fold_shapes=True, error_ok=True, size_threshold=FOLD_SIZE_LIMIT,
                             should_exclude_node=lambda n: n.op in QDQ_OPS or is_weight_decode(n))
        except TypeError:  # older onnx-graphsurgeon without should_exclude_node
            return model, {"changed": False, "error": "onnx-graphsurgeon too old for QDQ-safe folding"}
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        folded = export_graph(g, out)
        folded_counts = op_counts(folded)
        if folded_counts == counts:
            break
        out, counts = folded, folded_counts
    after = counts
    if after == before:
        return model, {"changed": False, "nodes": sum(before.values())}
    removed = {k: before[k] - after.get(k, 0) for k in before if before[k] > after.get(k, 0)}
    return out, {"changed": True, "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                 "removed": removed, "rounds": rounds}


def _transform(model: onnx.ModelProto, profile, ctx, fold: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Opset, folding and rewrites, each kept only if the outputs stay within EMIT_TOL."""
    info: dict = {}
    samples = _samples(model, ctx)
    try:
        base = _run(model, samples)
    except Exception as e:
        return model, {"error": f"the model does not run on the CPU EP: {str(e).splitlines()[0][:200]}"}
    cur = model
    steps = [("opset", lambda m: convert_opset(m, profile.opset_min, profile.opset_max))]
    if fold:
        steps.append(("fold", fold_static_shapes))
    steps.append(("rewrites", lambda m: apply_rewrites(m, profile.rewrites, profile)))
    for name, fn in steps:
        try:
            cand, st = fn(cur)
        except Exception as e:
            info[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            continue
        if cand is cur:
            info[name] = st
            continue
        try:
            onnx.checker.check_model(cand)
            err = _max_rel_err(base, _run(cand, samples))
        except Exception as e:
            info[name] = {**(st if isinstance(st, dict) else {}), "rolled_back": True,
                          "reason": f"invalid or does not run: {str(e).splitlines()[0][:200]}"}
            continue
        if err > EMIT_TOL:
            info[name] = {**(st if isinstance(st, dict) else {}), "rolled_back": True,
                          "reason": f"outputs changed (relative max error {err:.2e})"}
            continue
        info[name] = st if isinstance(st, dict) else {"applied": st}
        info[name]["max_rel_err"] = err
        cur = cand
    return cur, info


def _apply_channels_last(model: onnx.ModelProto, ctx) -> tuple[onnx.ModelProto, dict]:
    """``to_channels_last``, kept only when its outputs (back in NCHW) match the input model's."""
    cand, info = to_channels_last(model)
    if cand is model:
        return model, {**info, "changed": False, "reason": "no 4-D float graph input or output"}
    samples = _samples(model, ctx)
    try:
        onnx.checker.check_model(cand)
        err = _max_rel_err(_run(model, samples), ChannelsLastIO(info).run(cand, samples, optimize=False))
    except Exception as e:
        return model, {**info, "rolled_back": True,
                       "reason": f"invalid or does not run: {str(e).splitlines()[0][:200]}"}
    if err > EMIT_TOL:
        return model, {**info, "rolled_back": True, "reason": f"outputs changed (relative max error {err:.2e})"}
    return cand, {**info, "changed": True, "max_rel_err": err}


def _samples(model: onnx.ModelProto, ctx, n: int = 4) -> list[dict]:
    """Up to n validation samples from ctx.val, else 2 synthetic ones (seed 0)."""
    src = getattr(ctx, "val", None) if ctx is not None else None
    if src is not None and len(src):
        return [src.get(i) for i in range(min(n, len(src)))]
    return [s for s in SyntheticSource(input_specs(model), n=2, seed=0)]


def _run(model: onnx.ModelProto, samples) -> list[list[np.ndarray]]:
    """The model's outputs per sample on the CPU EP, graph optimizations off."""
    from onnxshrink.runtime import make_session
    sess = make_session(model, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, s) for s in samples]


def _max_rel_err(a, b) -> float:
    """max over outputs of max|x - y| / max|x| (inf on a shape or integer-value mismatch)."""
    worst = 0.0
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            if x.shape != y.shape:
                return float("inf")
            if x.dtype.kind not in "fc":
                if not np.array_equal(x, y):
                    return float("inf")
                continue
            scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-12)
            err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            worst = max(worst, err / scale)
    return worst


def _opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version (0 when none is imported)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _static_inputs(model: onnx.ModelProto) -> bool:
    """Every graph input (not an initializer) has a fixed positive size in every dimension."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not tt.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in tt.shape.dim):
            return False
    return True
