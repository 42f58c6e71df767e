"""Shared machinery of the cleanup sweeps: run the cleanup pass on a model, check the result is
valid and keeps the interface, and compare its onnxruntime outputs with the original's.

``check_case(model, feeds_list)`` returns ("run", None) when the outputs are equal,
("skipped", reason) with an explicit reason, or ("failed", message).
"""

from __future__ import annotations

import collections
import glob
import os
import traceback

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.passes.base import Context
from onnxshrink.passes.cleanup import CleanupPass

ort.set_default_logger_severity(4)  # the sweep feeds ops onnxruntime rejects; keep its log quiet


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


# float32 round-off, relative to the output's scale; half-precision outputs get a few of their ulps
TOL = {np.dtype(np.float16): 4e-3}


def _equal(a, b, tol: float | None = None) -> str | None:
    """None when ``a`` and ``b`` are equal (floats to ``tol`` of the scale, default by dtype), else why not."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
            return "sequence length/type differs"
        for x, y in zip(a, b):
            r = _equal(x, y, tol)
            if r:
                return r
        return None
    if a is None or b is None:
        return None if a is None and b is None else "optional presence differs"
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if tol is None:
        tol = TOL.get(a.dtype, 1e-4) if a.dtype.kind in "fc" else 0.0
        if str(a.dtype) == "bfloat16" or a.dtype.itemsize == 1 and a.dtype.kind == "V":
            tol = 3e-2
    if a.dtype.kind in "fc":
        a64, b64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64), b.astype(
            np.complex128 if b.dtype.kind == "c" else np.float64)
        na, nb = np.isnan(a64), np.isnan(b64)
        if not np.array_equal(na, nb):
            return "NaN positions differ"
        fa, fb = a64[~na], b64[~nb]
        inf = ~np.isfinite(fa)
        if not np.array_equal(fa[inf], fb[inf]):
            return "inf values differ"
        fa, fb = fa[~inf], fb[~inf]
        if fa.size:
            scale = max(float(np.max(np.abs(fa))), 1e-6)
            err = float(np.max(np.abs(fa - fb)))
            if err > tol * scale + 1e-7:
                return f"max abs diff {err:.3e} > {tol:g} x scale {scale:.3e}"
        return None
    if a.dtype == object:
        return None if a.tolist() == b.tolist() else "string values differ"
    return None if np.array_equal(a, b) else "values differ"


def _io_signature(model: onnx.ModelProto):
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [(i.name, i.type.SerializeToString()) for i in g.input if i.name not in inits]
    outs = [(o.name, o.type.SerializeToString()) for o in g.output]
    return ins, outs


def run_cleanup(model: onnx.ModelProto, **options):
    """The cleanup pass through its PassResult and the export the manager does."""
    res = CleanupPass(**options).run(model_to_graph(model), Context(template=model))
    # the manager exports only a modified graph; an unmodified one leaves the model as it was
    return res, (graph_to_model(res.graph, model) if res.modified else None)


def check_case(model: onnx.ModelProto, feeds_list: list[dict]) -> tuple[str, str | None]:
    # the pass must not crash and its output must be valid with the same interface
    try:
        model_to_graph(model)
    except Exception as e:
        return "skipped", f"onnx-graphsurgeon cannot import the model ({type(e).__name__}), the manager keeps it"
    try:
        res, out = run_cleanup(model)
    except Exception as e:
        return "failed", f"pass raised {type(e).__name__}: {_first_line(e)}\n{traceback.format_exc()}"
    if not res.modified:
        # the manager keeps the model it gave the pass when nothing changed
        reason = res.reason
        if "cannot export" in reason:
            return "skipped", "pass declined: onnx-graphsurgeon cannot export the graph (optional types)"
        return "unchanged", None
    try:
        onnx.checker.check_model(model, full_check=True)
        strict = True
    except Exception:
        strict = False
    try:
        onnx.checker.check_model(out, full_check=strict)
    except Exception as e:
        return "failed", f"invalid output ({'full' if strict else 'basic'} check): {_first_line(e)}"
    if _io_signature(model) != _io_signature(out):
        return "failed", f"interface changed: {_io_signature(model)} -> {_io_signature(out)}"
    # wherever the original runs, outputs must be equal
    try:
        sess = _session(model)
        names = [o.name for o in sess.get_outputs()]
        ref = [sess.run(names, f) for f in feeds_list]
        ref2 = [sess.run(names, f) for f in feeds_list[:1]]
    except Exception:
        ref = None
    deterministic = ref is not None and all(_equal(a, b, 0.0) is None for a, b in zip(ref[0], ref2[0]))
    if ref is None:
        return "skipped", "original does not run in onnxruntime"
    try:
        sess2 = _session(out)
        got = [sess2.run(names, f) for f in feeds_list]
    except Exception as e:
        return "failed", f"output does not run in onnxruntime: {_first_line(e)}"
    if not deterministic:
        for r, o in zip(ref, got):
            for a, b in zip(r, o):
                if np.asarray(a).shape != np.asarray(b).shape:
                    return "failed", "nondeterministic op: output shapes differ"
        return "skipped", "nondeterministic original (random op): compared shapes only"
    for r, o in zip(ref, got):
        for name, a, b in zip(names, r, o):
            why = _equal(a, b)
            if why:
                return "failed", f"output '{name}': {why}"
    return "run", None


# ------------------------------------------------------------------ corpora


def _as_constants(model: onnx.ModelProto, inputs: list, keep_first: bool):
    """A copy of the model whose inputs (all, or all but the first) are initializers holding the
    test data, or None when an input is not a tensor."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    feeds = {}
    keep = []
    for k, (vi, v) in enumerate(zip(real, inputs)):
        if keep_first and k == 0:
            keep.append(vi)
            feeds[vi.name] = v
            continue
        if not vi.type.HasField("tensor_type") or not isinstance(v, np.ndarray):
            return None, None
        try:
            g.initializer.append(numpy_helper.from_array(v, vi.name))
        except Exception:
            return None, None
    others = [i for i in g.input if i.name in inits]
    del g.input[:]
    g.input.extend(keep + others)
    if m.ir_version < 4:
        m.ir_version = 4
    return m, feeds


def node_cases(variant: str = "inputs"):
    """(name, model, [feeds]) for every operator test case the onnx package ships.

    variant "inputs": as shipped; "constants": every input an initializer (the whole case folds);
    "weights": every input but the first an initializer (weights/parameters constant)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for c in cases:
        g = c.model.graph
        inits = {t.name for t in g.initializer}
        in_names = [i.name for i in g.input if i.name not in inits]
        if variant != "inputs":
            if not c.data_sets:
                continue
            m, feeds = _as_constants(c.model, c.data_sets[0][0], keep_first=variant == "weights")
            if m is None:
                continue
            yield c.name, m, [feeds]
            continue
        feeds_list = []
        for inputs, _ in c.data_sets or []:
            feeds_list.append({n: v for n, v in zip(in_names, inputs)})
        yield c.name, c.model, feeds_list


DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
HEAVY = ("light_vgg19", "light_densenet121", "light_inception_v2")


def _read_pb(path: str, type_proto: onnx.TypeProto | None):
    if type_proto is not None and type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        with open(path, "rb") as f:
            seq.ParseFromString(f.read())
        return numpy_helper.to_list(seq)
    if type_proto is not None and type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        with open(path, "rb") as f:
            opt.ParseFromString(f.read())
        return numpy_helper.to_optional(opt)
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def data_models():
    """(name, path, loader of [feeds]) for every model file under onnx/backend/test/data/."""
    for path in sorted(glob.glob(os.path.join(DATA_DIR, "**", "*.onnx"), recursive=True)):
        rel = os.path.relpath(path, DATA_DIR)
        yield rel, path


def data_feeds(path: str, model: onnx.ModelProto) -> list[dict]:
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    feeds_list = []
    for ds in sorted(glob.glob(os.path.join(os.path.dirname(path), "test_data_set_*"))):
        feeds = {}
        for k, i in enumerate(inputs):
            f = os.path.join(ds, f"input_{k}.pb")
            if os.path.exists(f):
                feeds[i.name] = _read_pb(f, i.type)
        if len(feeds) == len(inputs):
            feeds_list.append(feeds)
    if not feeds_list:  # light models ship only outputs: seeded random inputs at the declared shapes
        rng = np.random.default_rng(0)
        feeds = {}
        for i in inputs:
            tt = i.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
            dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            feeds[i.name] = (rng.standard_normal(shape).astype(dt) if np.dtype(dt).kind == "f"
                             else rng.integers(0, 2, shape).astype(dt))
        feeds_list.append(feeds)
    return feeds_list


def summarize(results: dict) -> str:
    """Counts: run / skipped by reason / failed (with the first failures)."""
    c = collections.Counter(s for s, _ in results.values())
    reasons = collections.Counter(r for s, r in results.values() if s == "skipped")
    lines = [f"cases: {len(results)}  run, changed and outputs equal: {c['run']}  run, pass made no change: "
             f"{c['unchanged']}  skipped: {c['skipped']}  failed: {c['failed']}"]
    short = collections.Counter()
    for r, k in reasons.items():
        short[r.split(":")[0] if r.startswith("original does not run") else r] += k
    reasons = short
    for r, k in reasons.most_common():
        lines.append(f"  skipped {k}: {r}")
    for name, (s, r) in results.items():
        if s == "failed":
            lines.append(f"  FAILED {name}: {r.splitlines()[0] if r else ''}")
    return "\n".join(lines)
