"""The QNN EP's HTP (NPU) backend, checked for real when ``onnxruntime-qnn`` is installed.

``qnn_htp_check`` builds a QNN HTP session with CPU fallback disabled
(``session.disable_cpu_ep_fallback=1``) in a subprocess (the HTP simulator on x86-64 Linux;
``targets.ep_process.run_on_ep`` with the ``onnxruntime_qnn`` plugin library), runs the samples,
and compares the outputs with the fp32 original's on the CPU. The verbose session log gives the
node placements and the EP's own per-node-unit validation verdicts. The Python with
``onnxruntime-qnn`` is this one or ``$ONNXSHRINK_QNN_PYTHON``; provider options are ``QNN_HTP_OPTIONS`` for
the profile's HTP architecture (``qnn_provider_options``) overridden by ``$ONNXSHRINK_QNN_OPTIONS``.

The simulator is configured for the architecture the target names (``-o target.htp_arch=v68``):
``htp_arch`` and the ``soc_model`` of a Snapdragon with that HTP (``profiles.HTP_ARCHS``: v68 SM8350 = 30,
v69 SM8450 = 36, v73 SM8550 = 43, v75 SM8650 = 57, v79 SM8750 = 69), and fp16 precision for float nodes
(``enable_htp_fp16_precision``) only from v73 on; before v73 it is off ("0": the EP's default is on), as
such a device has no float unit. The x86 simulator still runs a float node there (measured: a float
Conv model finalizes with ``htp_arch=68``, ``soc_model=30``), so "no float compute node" is checked
statically (``coverage["float_nodes"]``, the target verdict), and the simulator checks placement,
finalization and the outputs.

``save_qnn_context`` (``--target qnn+context``) compiles a saved QDQ model for the same HTP with
onnxruntime's ``ModelCompiler`` (CPU fallback disabled): the EPContext model, whose one node holds
the QNN context binary (embedded), so that the device loads the compiled graph instead of
finalizing it at every application start. It is written beside the model (``NAME_ctx.onnx``, the
name onnxruntime gives it by default) and checked: it loads with fallback disabled and its outputs
match the QDQ model's on the HTP (worst cosine >= ``CONTEXT_MIN_COSINE``; the relative max error is
reported) on two synthetic samples.
"""

from __future__ import annotations

__all__ = ["qnn_htp_check", "qnn_available", "qnn_python", "qnn_provider_options", "save_qnn_context", "context_path",
           "QNN_HTP_OPTIONS", "CONTEXT_MIN_COSINE"]

import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.data import SyntheticSource, input_specs
from onnxshrink.errors import UsageError
from onnxshrink.metrics import fidelity
from onnxshrink.targets.ep_process import env_provider_options, fidelity_on_ep, run_on_ep
from onnxshrink.targets.layout import ChannelsLastIO
from onnxshrink.targets.profiles import HTP_ARCHS, HTP_FP16_FROM

# The HTP device the simulator emulates by default. Without a soc_model the simulator cannot finalize graphs
# that keep float nodes (QNN_COMMON_ERROR_MEM_ALLOC); 43 = Snapdragon 8 Gen 2 (SM8550, HTP v73).
# enable_htp_fp16_precision: float nodes run in fp16 as they do on the device (v73+).
QNN_HTP_OPTIONS = {"backend_type": "htp", "soc_model": "43", "enable_htp_fp16_precision": "1"}
# the compiled context runs the same graph; its float (fp16) nodes may be compiled differently: on YOLOv8n
# the box decoding's coordinates move by up to 5.5 px of 320 in 1 % of the elements, the integer part
# is equal, cosine 0.999998 between the two
CONTEXT_MIN_COSINE = 1 - 1e-5


def qnn_htp_check(model: onnx.ModelProto, samples, reference=None, required: bool = False,
                  timeout: int = 1800, outputs_back: ChannelsLastIO | None = None, htp_arch: int | None = None) -> dict:
    """Build a QNN HTP session with CPU fallback disabled (``session.disable_cpu_ep_fallback=1``)
    in a subprocess (``ep_process.run_on_ep``), run ``samples`` on it, and compare with ``reference``
    (the fp32 original's outputs on the CPU). Returns {"available", "accepted", "placements", "fidelity", ...}."""
    py = qnn_python()
    if py is None:
        res = {"available": False, "reason": "onnxruntime-qnn is not installed (pip install onnxruntime-qnn)"}
        if required:
            raise UsageError(res["reason"])
        return res
    run = run_on_ep(py, "QNNExecutionProvider", {"model": model}, samples,
                    provider_options=qnn_provider_options(htp_arch),
                    plugin="onnxruntime_qnn", run=("model",), timeout=timeout, prefix="onnxshrink_qnn_")
    if not run.ok:
        return {"available": True, "accepted": False, "error": run.info["error"]}
    res = {**run.info, **run.models.get("model", {}), "available": True, "python": py}
    res["ep_validation_failed"] = _parse_qnn_validation(run.log)
    res["errors_in_log"] = [ln.split("]", 1)[-1].strip()[:300] for ln in run.log.splitlines() if "[E:" in ln][:10]
    got = run.outputs.get("model")
    if got and reference is not None:
        res.update(fidelity_on_ep(got, reference, [o.name for o in model.graph.output], outputs_back))
    return res


def context_path(onnx_path: str | os.PathLike) -> Path:
    """Where the EPContext model of ``NAME.onnx`` goes: ``NAME_ctx.onnx`` beside it."""
    p = Path(onnx_path)
    return p.with_name(p.stem + "_ctx.onnx")


def save_qnn_context(onnx_path: str | os.PathLike, timeout: int = 1800, htp_arch: int | None = None) -> dict:
    """Compile the saved QDQ model ``onnx_path`` for the HTP into ``context_path(onnx_path)`` and check
    it (module docstring). Returns {"ok", "path", "bytes", "compile_s", "cosine_min", "max_rel_err", "error"}; when
    not ok, no context file is left."""
    py = qnn_python()
    if py is None:
        raise UsageError("--target qnn+context needs onnxruntime-qnn (pip install onnxruntime-qnn)")
    model = onnx.load(str(onnx_path))
    out = context_path(onnx_path)
    samples = list(SyntheticSource(input_specs(model), n=2, seed=0))
    run = run_on_ep(py, "QNNExecutionProvider", {"model": model}, samples,
                    provider_options=qnn_provider_options(htp_arch),
                    plugin="onnxruntime_qnn", run=("model", "model.context"), timeout=timeout,
                    prefix="onnxshrink_qnn_ctx_", compile_to={"model": out})
    comp = run.info.get("compiled", {}).get("model", {})
    info = {"path": str(out), "qdq_model": str(onnx_path), "provider_options": qnn_provider_options(htp_arch),
            "compile_s": comp.get("compile_s"), "ok": False}
    loaded = run.models.get("model.context", {})
    if not run.ok:
        info["error"] = run.info["error"]
    elif "error" in comp:
        info["error"] = f"the QNN EP cannot compile the model: {comp['error']}"
    elif not loaded.get("accepted"):
        info["error"] = f"the context model does not load with CPU fallback disabled: {loaded.get('error', '?')}"
    elif not run.models.get("model", {}).get("accepted"):
        info["error"] = f"the QDQ model does not load on HTP alone: {run.models['model'].get('error', '?')}"
    else:
        a, b = run.outputs.get("model") or [], run.outputs.get("model.context") or []
        err = max((float(np.max(np.abs(x.astype(np.float64) - y))) / max(float(np.max(np.abs(x))), 1e-12)
                   for xs, ys in zip(a, b) for x, y in zip(xs, ys)), default=float("inf"))
        cos = fidelity(a, b).get("cosine_min", 0.0) if a and len(a) == len(b) else 0.0
        info.update(max_rel_err=err, cosine_min=cos, samples=len(b))
        info["ok"] = bool(a) and len(a) == len(b) and cos >= CONTEXT_MIN_COSINE
        if not info["ok"]:
            info["error"] = (f"the context model's outputs differ from the QDQ model's on HTP (cosine {cos:.7f}, "
                             f"relative max error {err:.2e})")
    if out.exists() and not info["ok"]:
        out.unlink()
    elif out.exists():
        info["bytes"] = out.stat().st_size
    return info


def qnn_provider_options(htp_arch: int | None = None) -> dict:
    """QNN_HTP_OPTIONS, for ``htp_arch`` (None: the default v73) its architecture, SoC and fp16 setting
    (module docstring), overridden by $ONNXSHRINK_QNN_OPTIONS ("key=value,key=value")."""
    opts = dict(QNN_HTP_OPTIONS)
    if htp_arch is not None:
        if htp_arch not in HTP_ARCHS:
            raise UsageError(f"unknown HTP architecture v{htp_arch}; known: {', '.join('v%d' % a for a in HTP_ARCHS)}")
        opts.update(htp_arch=str(htp_arch), soc_model=str(HTP_ARCHS[htp_arch]),
                    enable_htp_fp16_precision="1" if htp_arch >= HTP_FP16_FROM else "0")
    return env_provider_options(opts, "ONNXSHRINK_QNN_OPTIONS")


def qnn_python() -> str | None:
    """The Python that has onnxruntime-qnn: $ONNXSHRINK_QNN_PYTHON, else this one if it has it."""
    env = os.environ.get("ONNXSHRINK_QNN_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("onnxruntime_qnn") is not None else None


def qnn_available() -> bool:
    """A Python with onnxruntime-qnn is there (``qnn_python``)."""
    return qnn_python() is not None


def _parse_qnn_validation(log: str, limit: int = 50) -> list[dict]:
    """The QNN EP's own per-node-unit verdicts from its verbose log: 'Validation FAILED for N nodes
    in OrtNodeUnit (Op)' followed by the nodes and a 'REASON :' line."""
    out, cur = [], None
    for line in log.splitlines():
        if "Validation FAILED for" in line:
            m = re.search(r"OrtNodeUnit \((\w+)\)", line)
            cur = {"unit": m.group(1) if m else "?", "nodes": [], "reason": ""}
            out.append(cur)
        elif cur is not None and line.startswith("\tOperator type:"):
            m = re.search(r"Operator type: (\S+) Node name: (.*?) Node index", line)
            if m:
                cur["nodes"].append(f"{m.group(1)} ({m.group(2)})")
        elif cur is not None and "REASON" in line:
            cur["reason"] = line.split(":", 1)[1].strip()[:300]
            cur = None
        elif cur is not None and not line.strip():
            cur = None
    seen, uniq = set(), []
    for v in out:  # onnxruntime asks the EP twice (before and after layout transform)
        key = (v["unit"], tuple(v["nodes"]), v["reason"])
        if key not in seen:
            seen.add(key)
            uniq.append(v)
    return uniq[:limit]
