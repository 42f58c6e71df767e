"""The QNN EP's HTP (NPU) backend, checked for real when ``onnxruntime-qnn`` is installed.

``qnn_htp_check`` builds a QNN HTP session with CPU fallback disabled
(``session.disable_cpu_ep_fallback=1``) in a subprocess (the HTP simulator on x86-64 Linux;
``targets.ep_process.run_on_ep`` with the ``onnxruntime_qnn`` plugin library), runs the samples,
and compares the outputs with the fp32 original's on the CPU. The verbose session log gives the
node placements and the EP's own per-node-unit validation verdicts. The Python with
``onnxruntime-qnn`` is this one or ``$ONNXSHRINK_QNN_PYTHON``; provider options are ``QNN_HTP_OPTIONS`` overridden by
``$ONNXSHRINK_QNN_OPTIONS``.
"""

from __future__ import annotations

__all__ = ["qnn_htp_check", "qnn_available", "qnn_python", "qnn_provider_options", "QNN_HTP_OPTIONS"]

import importlib.util
import os
import re
import sys

import onnx

from onnxshrink.errors import UsageError
from onnxshrink.targets.ep_process import env_provider_options, fidelity_on_ep, run_on_ep
from onnxshrink.targets.layout import ChannelsLastIO

# The HTP device the simulator emulates. Without a soc_model the simulator cannot finalize graphs
# that keep float nodes (QNN_COMMON_ERROR_MEM_ALLOC); 43 = Snapdragon 8 Gen 2 (SM8550, HTP v73).
# enable_htp_fp16_precision: float nodes run in fp16 as they do on the device (v73+).
QNN_HTP_OPTIONS = {"backend_type": "htp", "soc_model": "43", "enable_htp_fp16_precision": "1"}


def qnn_htp_check(model: onnx.ModelProto, samples, reference=None, required: bool = False,
                  timeout: int = 1800, outputs_back: ChannelsLastIO | None = None) -> dict:
    """Build a QNN HTP session with CPU fallback disabled (``session.disable_cpu_ep_fallback=1``)
    in a subprocess (``ep_process.run_on_ep``), run ``samples`` on it, and compare with ``reference``
    (the fp32 original's outputs on the CPU). Returns {"available", "accepted", "placements", "fidelity", ...}."""
    py = qnn_python()
    if py is None:
        res = {"available": False, "reason": "onnxruntime-qnn is not installed (pip install onnxruntime-qnn)"}
        if required:
            raise UsageError(res["reason"])
        return res
    run = run_on_ep(py, "QNNExecutionProvider", {"model": model}, samples, provider_options=qnn_provider_options(),
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


def qnn_provider_options() -> dict:
    """QNN_HTP_OPTIONS overridden by $ONNXSHRINK_QNN_OPTIONS ("key=value,key=value")."""
    return env_provider_options(QNN_HTP_OPTIONS, "ONNXSHRINK_QNN_OPTIONS")


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
