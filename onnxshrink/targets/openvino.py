"""The OpenVINO EP, checked for real: placement, fidelity and speed on this CPU.

``onnxruntime-openvino`` is its own wheel with its own ``onnxruntime`` module, so it cannot share
an environment with onnxruntime: it runs in another interpreter (``openvino_python``):
``$ONNXSHRINK_OPENVINO_PYTHON``, else the virtual environment onnxshrink manages
(``$ONNXSHRINK_CACHE/venvs/openvino``, default ``~/.cache/onnxshrink/venvs/openvino``), created
only when asked (``onnxshrink setup openvino``: ``python -m venv`` + ``pip install
onnxruntime-openvino``), else this Python when its onnxruntime has the OpenVINO EP.

``openvino_check`` (through ``targets.ep_process.run_on_ep``) builds sessions on
OpenVINOExecutionProvider (``device_type=CPU``, one thread; ``OPENVINO_OPTIONS`` overridden by
``$ONNXSHRINK_OPENVINO_OPTIONS``) with CPU fallback disabled for the result and for the fp32 model
the passes started from, then:

- placement: the result loads with fallback disabled (every node on the EP; otherwise the
  fallback session's placements name the nodes left to the CPU EP);
- fidelity: the result's outputs on the samples against the fp32 original's on the CPU EP;
- speed: the fp32 model and the result timed on the EP in interleaved rounds, one run each per
  round, two blocks warmed afresh; ``runtime.speed_comparison`` gives the median ratio
  ``t_fp32 / t_result`` and its ~95 % interval; "slower" when the whole interval lies below
  ``1 / CLEAR_MARGIN`` (``SpeedComparison.slower_than``).

``openvino_verdict`` turns that into problems for the target verdict (exit 4).
``openvino_compare_speed`` is the same timing alone, for the quantize guard's speed decisions.
"""

from __future__ import annotations

__all__ = ["openvino_check", "openvino_verdict", "openvino_compare_speed", "openvino_python", "openvino_available",
           "openvino_provider_options", "setup_openvino", "managed_venv", "OPENVINO_OPTIONS", "OPENVINO_PACKAGE"]

import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxshrink.errors import UsageError
from onnxshrink.runtime import SpeedComparison
from onnxshrink.targets.ep_process import env_provider_options, fidelity_on_ep, run_on_ep
from onnxshrink.targets.layout import ChannelsLastIO

PROVIDER = "OpenVINOExecutionProvider"
OPENVINO_PACKAGE = "onnxruntime-openvino"
# CPU device, one inference thread (the speed contract's condition), latency mode
OPENVINO_OPTIONS = {"device_type": "CPU", "num_of_threads": "1",
                    "load_config": '{"CPU": {"PERFORMANCE_HINT": "LATENCY"}}'}
SETUP_HINT = "run `onnxshrink setup openvino` or set $ONNXSHRINK_OPENVINO_PYTHON"
# the decision taken on the result's timing against the fp32 model: "slower" (``SpeedComparison.slower_than``
# at 1.0: the speed contract's roll-back, the verdict's exit 4); the report's "faster" is a label of what
# was measured, no decision, so a result at 1.07x is not timed in full to settle it
SPEED_DECISIONS = (("slower", 1.0),)


def openvino_check(model: onnx.ModelProto, samples, reference=None, baseline: onnx.ModelProto | None = None,
                   required: bool = False, timeout: int = 1800, outputs_back: ChannelsLastIO | None = None,
                   seconds: float = 6.0, decides: tuple = SPEED_DECISIONS) -> dict:
    """Run ``model`` (and ``baseline``, the fp32 model, for the speed comparison) on the OpenVINO EP
    in ``openvino_python()``; returns {"available", "accepted", "placements", "fidelity", "speed", ...}.
    ``decides``: the decisions taken on the speed comparison (``run_on_ep``'s early look;
    ``SPEED_DECISIONS`` by default; ``()`` times in full)."""
    py = openvino_python()
    if py is None:
        res = {"available": False, "reason": f"no Python with {OPENVINO_PACKAGE} ({SETUP_HINT})"}
        if required:
            raise UsageError(res["reason"])
        return res
    models = {"model": model}
    timed = baseline is not None and not (outputs_back is not None and outputs_back.inputs)
    if timed:
        models["fp32"] = baseline
    run = run_on_ep(py, PROVIDER, models, samples, provider_options=openvino_provider_options(), run=("model",),
                    timing=("fp32", "model") if timed else None, seconds=seconds, timeout=timeout,
                    prefix="onnxshrink_openvino_", decides=decides)
    if not run.ok:
        return {"available": True, "accepted": False, "python": py, "error": run.info["error"]}
    res = {**run.info, **run.models.get("model", {}), "available": True, "python": py}
    got = run.outputs.get("model")
    if got and reference is not None:
        res.update(fidelity_on_ep(got, reference, [o.name for o in model.graph.output], outputs_back))
    if not timed:
        res["speed"] = {"measured": False, "reason": "no fp32 model to compare with" if baseline is None
                        else "channel-last inputs: the fp32 model takes other feeds"}
    elif not run.models.get("fp32", {}).get("accepted"):
        res["speed"] = {"measured": False, "reason": "the fp32 model does not load on the OpenVINO EP alone: "
                                                     + str(run.models.get("fp32", {}).get("error", ""))[:300]}
    elif run.timing:
        cmp = run.speed()
        res["speed"] = {"measured": True, "vs_fp32": cmp.as_dict(), "baseline": "the fp32 model on the same EP",
                        "verdict": "slower" if cmp.slower_than(1.0) else "faster" if cmp.faster_than(1.0)
                        else "not slower"}
    else:
        res["speed"] = {"measured": False, "reason": "the result did not load with CPU fallback disabled"}
    return res


def openvino_compare_speed(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds: dict,
                           seconds: float = 3.0, decides: tuple = ()) -> SpeedComparison:
    """``runtime.compare_speed`` on the OpenVINO EP: how much faster ``model_b`` runs than ``model_a``
    there (one thread, interleaved rounds in two blocks; a first block settling ``decides`` by a wide
    margin alone, ``run_on_ep``). Raises RuntimeError when no verifier is there or a model does not
    load on the EP alone."""
    py = openvino_python()
    if py is None:
        raise RuntimeError(f"no Python with {OPENVINO_PACKAGE} ({SETUP_HINT})")
    run = run_on_ep(py, PROVIDER, {"a": model_a, "b": model_b}, [feeds], provider_options=openvino_provider_options(),
                    timing=("a", "b"), seconds=seconds, prefix="onnxshrink_openvino_", decides=decides)
    if not run.ok or not run.timing:
        why = run.info.get("error") or "; ".join(f"{k}: {v.get('error')}" for k, v in run.models.items()
                                                 if not v.get("accepted"))
        raise RuntimeError(f"cannot time the models on the OpenVINO EP: {why}")
    return run.speed()


def openvino_verdict(res: dict, allow_partial: bool, budget_holds=None) -> tuple[list[str], list[str]]:
    """(problems, notes) of an ``openvino_check`` result: the EP does not take every node (a note with
    ``allow_partial``), the result is clearly slower than fp32 on the EP, or ``budget_holds`` (the
    budget's test of a fidelity dict, or None) rejects the fidelity measured on the EP."""
    problems: list[str] = []
    notes: list[str] = []
    if not res.get("available"):
        notes.append(f"not verified on OpenVINO: {res.get('reason', 'no verifier')}")
        return problems, notes
    if not res.get("accepted", False):
        cpu = res.get("nodes_on_cpu")
        where = f"{cpu} node(s) left to the CPU EP" if cpu else (res.get("error") or "not every node on the EP")
        (notes if allow_partial else problems).append(f"the OpenVINO EP does not take the whole model ({where})")
    speed = res.get("speed") or {}
    if speed.get("verdict") == "slower":
        s = speed["vs_fp32"]
        problems.append(f"slower than the fp32 model on the OpenVINO EP ({s['speedup']:.2f}x its speed, 95 % "
                        f"interval {s['interval'][0]:.2f}-{s['interval'][1]:.2f}x)")
    fid = res.get("fidelity")
    if fid and budget_holds is not None:
        held = budget_holds(fid)
        if held is False:
            problems.append(f"the budget is not met on the OpenVINO EP (cosine {fid.get('cosine', float('nan')):.4f} "
                            f"on {res.get('samples', '?')} samples)")
    return problems, notes


def openvino_provider_options() -> dict:
    """OPENVINO_OPTIONS overridden by $ONNXSHRINK_OPENVINO_OPTIONS ("key=value,key=value"; "key=" drops one)."""
    return env_provider_options(OPENVINO_OPTIONS, "ONNXSHRINK_OPENVINO_OPTIONS")


def managed_venv() -> Path:
    """The virtual environment ``onnxshrink setup openvino`` creates."""
    root = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))
    return root / "venvs" / "openvino"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def openvino_python() -> str | None:
    """The Python with onnxruntime-openvino: $ONNXSHRINK_OPENVINO_PYTHON, else the managed venv's when
    it exists, else this one when its onnxruntime has the OpenVINO EP; None otherwise."""
    env = os.environ.get("ONNXSHRINK_OPENVINO_PYTHON")
    if env:
        return env
    py = _venv_python(managed_venv())
    if py.exists():
        return str(py)
    return sys.executable if PROVIDER in ort.get_available_providers() else None


def openvino_available() -> bool:
    """A Python with onnxruntime-openvino is there (``openvino_python``)."""
    return openvino_python() is not None


def setup_openvino(venv: str | os.PathLike | None = None, package: str = OPENVINO_PACKAGE, log=print) -> str:
    """Create the venv (``python -m venv``) and ``pip install`` ``package`` into it; verify that its
    onnxruntime lists the OpenVINO EP. Returns its Python; raises UsageError with pip's reason."""
    venv = Path(venv) if venv else managed_venv()
    py = _venv_python(venv)
    if not py.exists():
        log(f"creating {venv}")
        _step([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    log(f"pip install {package} (into {venv})")
    _step([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", package], f"pip install {package}")
    probe = "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    out = _step([str(py), "-c", probe], "the installed onnxruntime")
    if PROVIDER not in out:
        raise UsageError(f"{package} installed in {venv} but its onnxruntime lists no {PROVIDER}: {out.strip()}")
    log(f"ready: {out.strip()}")
    return str(py)


def _step(cmd: list[str], what: str) -> str:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        tail = [ln for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith("WARNING")][-4:]
        raise UsageError(f"{what} failed (exit {p.returncode}): {' | '.join(tail)[:800]} (Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}, {sys.platform})")
    return p.stdout
