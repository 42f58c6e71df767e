"""The QNN EP's HTP (NPU) backend, checked for real when ``onnxruntime-qnn`` is installed.

``qnn_htp_check`` saves the model and samples, builds a QNN HTP session with CPU fallback
disabled (``session.disable_cpu_ep_fallback=1``) in a subprocess (the HTP simulator on x86-64
Linux; the worker script ``_QNN_WORKER``), runs the samples, and compares the outputs with the
fp32 original's on the CPU. The verbose session log gives the node placements and the EP's own
per-node-unit validation verdicts. The Python with ``onnxruntime-qnn`` is this one or
``$ONNXSHRINK_QNN_PYTHON``; provider options are ``QNN_HTP_OPTIONS`` overridden by
``$ONNXSHRINK_QNN_OPTIONS``.
"""

from __future__ import annotations

__all__ = ["qnn_htp_check", "qnn_available", "qnn_python", "qnn_provider_options", "QNN_HTP_OPTIONS"]

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.errors import UsageError
from onnxshrink.metrics import compare_outputs, fidelity
from onnxshrink.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from onnxshrink.targets.layout import ChannelsLastIO

# The HTP device the simulator emulates. Without a soc_model the simulator cannot finalize graphs
# that keep float nodes (QNN_COMMON_ERROR_MEM_ALLOC); 43 = Snapdragon 8 Gen 2 (SM8550, HTP v73).
# enable_htp_fp16_precision: float nodes run in fp16 as they do on the device (v73+).
QNN_HTP_OPTIONS = {"backend_type": "htp", "soc_model": "43", "enable_htp_fp16_precision": "1"}


def qnn_htp_check(model: onnx.ModelProto, samples, reference=None, required: bool = False,
                  timeout: int = 1800, outputs_back: ChannelsLastIO | None = None) -> dict:
    """Build a QNN HTP session with CPU fallback disabled (``session.disable_cpu_ep_fallback=1``)
    in a subprocess, run ``samples`` on it, and compare with ``reference`` (the fp32 original's
    outputs on the CPU). Returns {"available", "accepted", "placements", "fidelity", ...}."""
    py = qnn_python()
    if py is None:
        res = {"available": False, "reason": "onnxruntime-qnn is not installed (pip install onnxruntime-qnn)"}
        if required:
            raise UsageError(res["reason"])
        return res
    with tempfile.TemporaryDirectory(prefix="onnxshrink_qnn_") as d:
        mp = os.path.join(d, "model.onnx")
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, mp, save_as_external_data=tensor_bytes(m) >= EXTERNAL_DATA_THRESHOLD,
                        location="model.onnx.data")
        sp = os.path.join(d, "samples.npz")
        arrays = {"__n__": np.array(len(samples))}
        for k, s in enumerate(samples):
            for name, v in s.items():
                arrays[f"{k}/{name}"] = v
        np.savez(sp, **arrays)
        op = os.path.join(d, "outputs.npz")
        lp = os.path.join(d, "log.txt")
        try:
            with open(lp, "w") as logf:
                proc = subprocess.run([py, "-c", _QNN_WORKER, mp, sp, op, lp, json.dumps(qnn_provider_options())],
                                      stdout=subprocess.PIPE,
                                      stderr=logf, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"available": True, "accepted": False, "error": f"QNN check timed out after {timeout}s"}
        log = Path(lp).read_text(errors="replace")
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not last:
            tail = [ln for ln in log.splitlines() if "rror" in ln][-3:]
            return {"available": True, "accepted": False,
                    "error": f"QNN worker exited with {proc.returncode}: {' | '.join(tail)[:600]}"}
        res = json.loads(last[-1])
        res["available"] = True
        res["python"] = py
        res["placements"] = _parse_placements(log)
        cpu = res["placements"].get("CPUExecutionProvider")
        if cpu:
            res["nodes_on_cpu"] = cpu["count"]
            res["cpu_nodes"] = cpu["nodes"][:100]
        res["ep_validation_failed"] = _parse_qnn_validation(log)
        res["errors_in_log"] = [ln.split("]", 1)[-1].strip()[:300] for ln in log.splitlines()
                                if "[E:" in ln][:10]
        if Path(op).exists() and reference is not None:
            outs = np.load(op)
            got = [[outs[f"{k}/{j}"] for j in range(len(reference[k]))] for k in range(res.get("samples", 0))]
            if outputs_back is not None:  # channel-last outputs compared in the reference's NCHW layout
                got = outputs_back.back(got, [o.name for o in model.graph.output])
            res["fidelity"] = fidelity(reference[:len(got)], got)
            res["per_sample"] = [{"cosine": compare_outputs(r, o)["cosine"],
                                  "ref_max": float(max(np.max(np.abs(x)) for x in r))}
                                 for r, o in zip(reference, got)]
            res["fidelity_vs"] = "fp32 original on the CPU EP"
    return res


def qnn_provider_options() -> dict:
    """QNN_HTP_OPTIONS overridden by $ONNXSHRINK_QNN_OPTIONS ("key=value,key=value")."""
    opts = dict(QNN_HTP_OPTIONS)
    for kv in filter(None, os.environ.get("ONNXSHRINK_QNN_OPTIONS", "").split(",")):
        k, _, v = kv.partition("=")
        if v == "":
            opts.pop(k.strip(), None)
        else:
            opts[k.strip()] = v.strip()
    return opts


def qnn_python() -> str | None:
    """The Python that has onnxruntime-qnn: $ONNXSHRINK_QNN_PYTHON, else this one if it has it."""
    env = os.environ.get("ONNXSHRINK_QNN_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("onnxruntime_qnn") is not None else None


def qnn_available() -> bool:
    """A Python with onnxruntime-qnn is there (``qnn_python``)."""
    return qnn_python() is not None


def _parse_placements(log: str) -> dict:
    """onnxruntime's 'Node placements' verbose log -> {provider: [op (name), ...] or count}."""
    out: dict = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            cur = m.group(2)
            out.setdefault(cur, {"count": int(m.group(3)), "nodes": []})
            continue
        if cur and "VerifyEachNodeIsAssignedToAnEp" in line:
            txt = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1].strip()
            if txt and "placed on" not in txt and txt != "Node placements":
                out[cur]["nodes"].append(txt)
        elif cur and "VerifyEachNodeIsAssignedToAnEp" not in line:
            cur = None
    return out


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


# run by qnn_htp_check in the Python that has onnxruntime-qnn: argv = model, samples.npz, outputs.npz,
# log path, provider options (JSON); prints one JSON line of results
_QNN_WORKER = r'''
import json, re, sys, time
import numpy as np
import onnxruntime as ort
import onnxruntime_qnn as qnn
model, samples_path, out_path, log_path, options = sys.argv[1:6]
options = json.loads(options)
ort.register_execution_provider_library("QNNExecutionProvider", qnn.get_library_path())
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
res = {"onnxruntime": ort.__version__, "onnxruntime_qnn": getattr(qnn, "__version__", "?"), "provider_options": options}
if not devs:
    res["error"] = "no QNN EP device"
    print(json.dumps(res)); sys.exit(0)
def session(fallback):
    so = ort.SessionOptions()
    so.log_severity_level = 0 if not fallback else 0
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.intra_op_num_threads = 1
    so.add_provider_for_devices(devs, options)
    return ort.InferenceSession(model, so)
t = time.time()
try:
    sess = session(False)
    res["accepted"] = True
except Exception as e:
    res["accepted"] = False
    res["error"] = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    sess = None
res["session_s"] = round(time.time() - t, 2)
if sess is None:
    try:
        sess = session(True)
        res["ran_with_cpu_fallback"] = True
    except Exception as e:
        res["fallback_error"] = str(e).strip().splitlines()[0][:400]
if sess is not None:
    data = np.load(samples_path, allow_pickle=False)
    n = int(data["__n__"])
    names = [o.name for o in sess.get_outputs()]
    outs = {}
    t = time.time()
    for k in range(n):
        feeds = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}/")}
        for j, v in enumerate(sess.run(names, feeds)):
            outs[f"{k}/{j}"] = v
    res["run_s_per_sample"] = round((time.time() - t) / max(n, 1), 3)
    np.savez(out_path, **outs)
    res["samples"] = n
print(json.dumps(res))
'''
