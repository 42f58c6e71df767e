"""Running models on one onnxruntime execution provider in another Python interpreter.

Some EPs ship as their own onnxruntime wheel (``onnxruntime-openvino``) or need a separate
install (``onnxruntime-qnn``), so they run in a Python other than this one. ``run_on_ep`` saves the
models and the samples into a temporary folder, runs the worker script ``EP_WORKER`` there (it
needs only numpy and onnxruntime), and returns an ``EpRun``: per model whether a session with CPU
fallback disabled (``session.disable_cpu_ep_fallback=1``) was built, the node placements read
from onnxruntime's verbose log (each session logs under its own ``logid``; a rejected model is
run again with fallback allowed, so its placements say which nodes the EP left to the CPU), the
outputs on the samples, and, for a pair of models, interleaved timings on one thread.

Timing (``timing=(a, b)``): one run of each model per round, alternating, in two blocks that are
each warmed up afresh, as many rounds as fit in ``seconds`` (``min_rounds``..``max_rounds``); the
statistics (median ratio and its interval) are ``runtime.speed_comparison``'s, computed here from
the raw times. Given the decisions the caller takes (``decides``), the timing starts with
``compare_speeds``' early look, by its rules: a first block of ``EARLY_ROUNDS`` rounds every one of
which lies ``DECISIVE_FACTOR`` beyond every boundary is the timing (YOLOv8n int8 on the OpenVINO EP at
2.2x: 6 rounds instead of 61 for the emission's check); else a second such block, and when no decision
is a close call on the two (``runtime.close_call``) they are the timing (PP-OCRv4 det at 1.1x: 12
rounds instead of 40); else both grow to their full size. ``info["early"]`` says where it stopped.

Compiling (``compile_to``, plugin EPs such as onnxruntime-qnn): ``onnxruntime.ModelCompiler`` writes
the EP's compiled model (EPContext nodes, the EP's binary embedded), which then loads and runs like
the others.
"""

from __future__ import annotations

__all__ = ["EpRun", "run_on_ep", "parse_placements", "save_samples", "fidelity_on_ep", "env_provider_options",
           "EP_WORKER"]

import inspect
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.metrics import compare_outputs, fidelity
from onnxshrink.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from onnxshrink.runtime import (
    DECISIVE_FACTOR,
    EARLY_LOOK_MS,
    EARLY_ROUNDS,
    SpeedComparison,
    close_call,
    early_boundaries,
    settled_by_far,
    speed_comparison,
)
from onnxshrink.targets.layout import ChannelsLastIO


@dataclass
class EpRun:
    """What one worker run gave. ``info``: the worker's own facts (onnxruntime version, provider
    options) or ``error`` when it did not run; ``models``: per model name {accepted, error,
    session_s, ran_with_cpu_fallback, placements, nodes_on_cpu, cpu_nodes, samples, run_s_per_sample};
    ``outputs``: per model name, per sample, the output arrays; ``timing``: the raw blocks
    ``[(times_a, times_b), ...]`` in ms; ``log``: onnxruntime's verbose log."""

    info: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    timing: list = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        """The worker ran to its end (a model may still have been rejected)."""
        return "error" not in self.info

    def speed(self) -> SpeedComparison | None:
        """How much faster the second timed model ran than the first (``runtime.speed_comparison``)."""
        return speed_comparison(self.timing) if self.timing else None


def run_on_ep(python: str, provider: str, models: dict, samples: list[dict], *, provider_options: dict | None = None,
              plugin: str | None = None, run: tuple = (), timing: tuple | None = None, seconds: float = 6.0,
              min_rounds: int = 15, max_rounds: int = 61, timeout: int = 1800, prefix: str = "onnxshrink_ep_",
              compile_to: dict | None = None, decides: tuple = ()) -> EpRun:
    """Build a session per model (``{name: ModelProto}``) on ``provider`` in the interpreter
    ``python``, run ``samples`` through the models named in ``run`` and time the pair ``timing``
    (on the first sample). ``plugin``: a module providing the EP as a plugin library
    (``onnxruntime_qnn``: ``register_execution_provider_library`` + ``add_provider_for_devices``);
    without it the EP is one of the wheel's own providers. ``compile_to`` (``{name: path}``): compile
    those models for the EP first (``onnxruntime.ModelCompiler``: EPContext nodes with the EP's binary
    embedded, CPU fallback disabled) into ``path``; the compiled model then loads and runs as model
    ``name + ".context"`` (give that name in ``run`` too); ``info["compiled"][name]`` says how it went.
    ``decides``: the decisions the caller takes on the timed pair (``runtime.compare_speeds``' form), for
    the early look (module docstring; as in ``compare_speeds``, only where a round takes ``EARLY_LOOK_MS``
    or more, so the boundaries are ``runtime.early_boundaries``')."""
    if compile_to and not plugin:
        raise ValueError("compile_to needs an EP given as a plugin library (the worker's ModelCompiler path)")
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        paths = {}
        for name, model in models.items():
            paths[name] = os.path.join(d, f"{name}.onnx")
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(m, paths[name], save_as_external_data=tensor_bytes(m) >= EXTERNAL_DATA_THRESHOLD,
                            location=f"{name}.onnx.data")
        sp = save_samples(samples, os.path.join(d, "samples.npz"))
        op, lp, jp = (os.path.join(d, f) for f in ("outputs.npz", "log.txt", "job.json"))
        job = {"provider": provider, "plugin": plugin, "options": provider_options or {}, "models": paths,
               "samples": sp, "outputs": op, "run": list(run), "timing": list(timing) if timing else None,
               "seconds": seconds, "min_rounds": min_rounds, "max_rounds": max_rounds,
               "early": _early_look(decides),
               "compile": {k: str(v) for k, v in (compile_to or {}).items()}}
        Path(jp).write_text(json.dumps(job))
        try:
            with open(lp, "w") as logf:
                proc = subprocess.run([python, "-c", EP_WORKER, jp], stdout=subprocess.PIPE, stderr=logf, text=True,
                                      timeout=timeout)
        except subprocess.TimeoutExpired:
            return EpRun(info={"error": f"the {provider} worker timed out after {timeout}s"})
        except OSError as e:
            return EpRun(info={"error": f"cannot start {python}: {e}"})
        log = Path(lp).read_text(errors="replace")
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not last:
            tail = [ln for ln in log.splitlines() if "rror" in ln][-3:]
            return EpRun(info={"error": f"the {provider} worker exited with {proc.returncode}: "
                                        f"{' | '.join(tail)[:600]}"}, log=log)
        res = json.loads(last[-1])
        out = EpRun(info={k: v for k, v in res.items() if k not in ("models", "timing")}, models=res.get("models", {}),
                    timing=[(a, b) for a, b in (res.get("timing") or [])], log=log)
        for name, rec in out.models.items():
            rec["placements"] = parse_placements(log, name + (".fallback" if rec.get("ran_with_cpu_fallback") else ""))
            cpu = rec["placements"].get("CPUExecutionProvider")
            if cpu:
                rec["nodes_on_cpu"] = cpu["count"]
                rec["cpu_nodes"] = cpu["nodes"][:100]
        if Path(op).exists():
            arrays = np.load(op)
            for name in run:
                n = out.models.get(name, {}).get("samples", 0)
                k_out = sorted({int(k.split("/")[2]) for k in arrays.files if k.startswith(f"{name}/")})
                out.outputs[name] = [[arrays[f"{name}/{k}/{j}"] for j in k_out] for k in range(n)]
    return out


def _early_look(decides: tuple) -> dict | None:
    """The worker's early look for the decisions ``decides`` (None: none to take, time in full)."""
    if not decides:
        return None
    return {"rounds": EARLY_ROUNDS, "boundaries": early_boundaries(decides), "factor": DECISIVE_FACTOR,
            "min_round_ms": EARLY_LOOK_MS}


def fidelity_on_ep(got: list, reference: list, output_names: list[str], outputs_back: ChannelsLastIO | None = None
                   ) -> dict:
    """The EP's outputs ``got`` against ``reference`` (the fp32 original's on the CPU EP, per sample):
    ``{"fidelity", "per_sample": [{cosine, ref_max}], "fidelity_vs"}``; channel-last outputs are
    compared in the reference's NCHW layout."""
    if outputs_back is not None:
        got = outputs_back.back(got, output_names)
    ref = reference[:len(got)]
    return {"fidelity": fidelity(ref, got),
            "per_sample": [{"cosine": compare_outputs(r, o)["cosine"],
                            "ref_max": float(max(np.max(np.abs(x)) for x in r))} for r, o in zip(ref, got)],
            "fidelity_vs": "fp32 original on the CPU EP"}


def env_provider_options(defaults: dict, variable: str) -> dict:
    """``defaults`` overridden by the environment variable ``variable`` ("key=value,key=value";
    "key=" removes a key)."""
    opts = dict(defaults)
    for kv in filter(None, os.environ.get(variable, "").split(",")):
        k, _, v = kv.partition("=")
        if v == "":
            opts.pop(k.strip(), None)
        else:
            opts[k.strip()] = v.strip()
    return opts


def save_samples(samples: list[dict], path: str) -> str:
    """Samples as one .npz the worker reads: ``__n__`` and ``{k}/{input name}``."""
    arrays = {"__n__": np.array(len(samples))}
    for k, s in enumerate(samples):
        for name, v in s.items():
            arrays[f"{k}/{name}"] = v
    np.savez(path, **arrays)
    return path


def parse_placements(log: str, logid: str | None = None) -> dict:
    """onnxruntime's 'Node placements' verbose log -> {provider: {"count": n, "nodes": [op (name), ...]}};
    with ``logid`` only the lines of the session logging under it (``[V:onnxruntime:LOGID, ...]``).
    The first report per provider wins (a session reports once; a rejected one may report before
    failing)."""
    out: dict = {}
    cur = None
    for line in log.splitlines():
        if logid is not None:
            m = re.search(r"\[\w:onnxruntime:([^,\]]*),", line)
            if m and m.group(1) != logid:
                cur = None
                continue
        m = re.search(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            cur = m.group(2) if m.group(2) not in out else None
            if cur:
                out[cur] = {"count": int(m.group(3)), "nodes": []}
            continue
        if cur and "VerifyEachNodeIsAssignedToAnEp" in line:
            txt = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1].strip()
            if txt and "placed on" not in txt and txt != "Node placements":
                out[cur]["nodes"].append(txt)
        elif cur and "VerifyEachNodeIsAssignedToAnEp" not in line:
            cur = None
    return out


# run by run_on_ep in the Python that has the EP: argv = the job (JSON file); prints one JSON line.
# Needs only numpy and onnxruntime (the EP's own wheel): the timing loop is this simple on purpose,
# its statistics are runtime.speed_comparison's, in the caller; its early look applies runtime's own
# rules (close_call, settled_by_far: their source is prepended, EP_WORKER).
_WORKER_MAIN = r'''
import onnxruntime as ort
job = json.load(open(sys.argv[1]))
prov, opts = job["provider"], job["options"]
res = {"onnxruntime": ort.__version__, "provider": prov, "provider_options": opts, "models": {}}
devs = None
if job["plugin"]:
    mod = importlib.import_module(job["plugin"])
    res[job["plugin"]] = getattr(mod, "__version__", "?")
    ort.register_execution_provider_library(prov, mod.get_library_path())
    devs = [d for d in ort.get_ep_devices() if d.ep_name == prov]
    if not devs:
        res["error"] = f"no {prov} device"
elif prov not in ort.get_available_providers():
    res["error"] = f"{prov} is not among this onnxruntime's providers {ort.get_available_providers()}"
if "error" in res:
    print(json.dumps(res)); sys.exit(0)
def options(logid, fallback):
    so = ort.SessionOptions()
    so.log_severity_level = 0
    so.logid = logid
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.intra_op_num_threads = 1
    if devs is not None:
        so.add_provider_for_devices(devs, opts)
    return so
def session(path, logid, fallback):
    so = options(logid, fallback)
    if devs is not None:
        return ort.InferenceSession(path, so)
    return ort.InferenceSession(path, so, providers=[prov], provider_options=[opts])
def first_line(e):
    return str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
res["compiled"] = {}
for name, out in (job.get("compile") or {}).items():
    t = time.time()
    try:  # the EP's compiled model (EPContext nodes, binary embedded), with CPU fallback disabled
        ort.ModelCompiler(options(name + ".compile", False), job["models"][name],
                          embed_compiled_data_into_model=True).compile_to_file(out)
        res["compiled"][name] = {"path": out, "compile_s": round(time.time() - t, 2)}
        job["models"][name + ".context"] = out
    except Exception as e:
        res["compiled"][name] = {"error": first_line(e)}
sessions = {}
for name, path in job["models"].items():
    r = res["models"][name] = {}
    t = time.time()
    try:
        sessions[name] = session(path, name, False)
        r["accepted"] = True
    except Exception as e:
        r["accepted"] = False
        r["error"] = first_line(e)
    r["session_s"] = round(time.time() - t, 2)
    if not r["accepted"]:
        try:
            sessions[name] = session(path, name + ".fallback", True)
            r["ran_with_cpu_fallback"] = True
        except Exception as e:
            r["fallback_error"] = first_line(e)
data = np.load(job["samples"], allow_pickle=False)
n = int(data["__n__"])
samples = [{key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}/")} for k in range(n)]
outs = {}
for name in job["run"]:
    if name not in res["models"]:
        continue
    sess = sessions.get(name)
    if sess is None:
        continue
    names = [o.name for o in sess.get_outputs()]
    t = time.time()
    for k, feeds in enumerate(samples):
        for j, v in enumerate(sess.run(names, feeds)):
            outs[f"{name}/{k}/{j}"] = v
    res["models"][name]["run_s_per_sample"] = round((time.time() - t) / max(n, 1), 4)
    res["models"][name]["samples"] = n
np.savez(job["outputs"], **outs)
pair = job["timing"]
if pair and all(p in sessions for p in pair) and samples:
    sa, sb = sessions[pair[0]], sessions[pair[1]]
    feeds = samples[0]
    def once(s):
        t = time.perf_counter(); s.run(None, feeds); return (time.perf_counter() - t) * 1e3
    for s in (sa, sb):
        once(s)
    one = (once(sa) + once(sb)) / 1e3
    rounds = int(min(job["max_rounds"], max(job["min_rounds"], job["seconds"] / max(one, 1e-5))))
    early = job.get("early")
    sizes = (rounds // 2, rounds - rounds // 2)
    def timed(n, warmup):
        for s in (sa, sb):
            for _ in range(warmup):
                once(s)
        ta, tb = [], []
        for _ in range(n):
            ta.append(once(sa)); tb.append(once(sb))
        return [ta, tb]
    def ratios(blk):
        return [x / y for x, y in zip(*blk)]
    blocks = None
    if early and rounds > 2 * early["rounds"]:  # compare_speeds' condition: more rounds than two early blocks
        # compare_speeds' early look, by the same rules (runtime.settled_by_far, runtime.close_call)
        e, bounds = early["rounds"], early["boundaries"]
        first = timed(e, 2)
        r1 = ratios(first)
        if statistics.median(x + y for x, y in zip(*first)) >= early["min_round_ms"]:
            if settled_by_far(min(r1), max(r1), bounds, early["factor"]):
                blocks, res["early"] = [first], "decisive first block"
            else:
                second = timed(e, 0)
                r = r1 + ratios(second)
                if not close_call(min(r), statistics.median(r), max(r), bounds):
                    blocks, res["early"] = [first, second], "no close call"
                else:  # a close call: both blocks grow to full size, the early rounds count
                    blocks = [[t + m for t, m in zip(blk, timed(n - e, 1))] for blk, n in zip((first, second), sizes)]
        else:  # a tiny pair: the first block's rounds count towards the first full block
            blocks = [[t + m for t, m in zip(first, timed(sizes[0] - e, 0))], timed(sizes[1], 2)]
    if blocks is None:
        blocks = [timed(n, 2) for n in sizes]
    res["timing"] = blocks
print(json.dumps(res))
'''
EP_WORKER = ("import importlib, json, statistics, sys, time\nimport numpy as np\n\n"
             + inspect.getsource(close_call) + "\n\n" + inspect.getsource(settled_by_far) + _WORKER_MAIN)

