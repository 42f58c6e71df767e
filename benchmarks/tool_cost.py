"""What the tool costs: wall time and peak memory of quantizing a model, onnxshrink beside
onnxruntime's own quantizers (and NNCF where installed), with what each output is worth.

    PYTHONPATH=. python benchmarks/tool_cost.py                       # all models, 3 repeats
    PYTHONPATH=. python benchmarks/tool_cost.py --models yolov8n,crnn --repeats 5
    PYTHONPATH=. python benchmarks/tool_cost.py --budget ""           # onnxshrink's default budget

Per model: 32 calibration samples written as .npy, 16 held-out samples no tool sees. Tools, each in
its own subprocess so that its wall time and peak RSS (VmHWM, which counts onnxruntime's C++
allocations) are measured alike (``quantize_bench.run_tool``; every tool imports from bytecode, as
installed packages do: the checkout's modules are byte-compiled first):

- ``ort_static``: onnxruntime ``quantize_static`` as a user calls it (QDQ, per-tensor, MinMax, all 32
  samples calibrate);
- ``ort_checked``: ``quantize_static`` as above, then its output checked the way onnxshrink checks its
  own (``quantize_bench.check_like_onnxshrink``: the input's and the output's outputs on the 16 samples
  onnxshrink holds out for selection and test, their fidelity, the output timed against the input by
  the speed contract's rule). onnxshrink's ``vs chk`` ratios are against this: the cost of a checked
  int8 model from onnxruntime's tool, a floor of onnxshrink's own checks (it also validates each pass,
  searches a placement and checks stored weights);
- ``ort_dyn``: onnxruntime ``quantize_dynamic`` (no calibration);
- ``nncf``: ``nncf.quantize`` on the ONNX model with its defaults, when nncf is installed (else the row
  says so; it brings many dependencies, so install it beside the others:
  ``python -m venv --system-site-packages /tmp/nncf && /tmp/nncf/bin/pip install nncf==3.4.0`` and run
  this script with ``/tmp/nncf/bin/python``);
- ``onnxshrink``: ``onnxshrink optimize IN OUT --passes cleanup,quantize --calib DIR --budget B``, the
  user's command line: 32 samples split into calibration / selection / test, the verdict on the test
  samples, the speed contract on (the result is timed against the input), on-disk cache off.

Each tool runs ``--repeats`` times: the table gives the median wall time and the median peak RSS, and
onnxshrink's ratio to ``quantize_static``. The outputs are then compared on the held-out samples (one
intra-op thread, interleaved rounds, medians: ``quantize_bench.measure``): speed vs fp32, cosine mean
and min against fp32, and the share of MACs onnxruntime runs in integer kernels
(``graph.cost.integer_kernel``).

``--profile`` also runs onnxshrink once under cProfile and prints where its time goes, by phase;
``--purposes`` runs it once counting its onnxruntime runs (and their seconds) by what they are for:
timing, calibration, unit analysis, the placement search, the stored-weights check, the reference
outputs, each pass's validation and the verdict, and session creation.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import onnx  # noqa: E402
import quantize_bench as qb  # noqa: E402

from onnxshrink.graph.cost import model_stats  # noqa: E402

MODELS = ["ppocr_cls", "ppocr_det", "yolov8n", "ppocr_rec", "crnn", "vit_s"]
TOOLS = {"ort_static": "ort_pt", "ort_checked": "ort_pt_checked", "ort_dyn": "ort_dyn", "nncf": "nncf",
         "onnxshrink": "shrink_cli"}
SAME_OUTPUT = {"ort_checked": "ort_static"}  # a tool writing another's model: measured once
PHASES = {  # profile phase -> functions whose cumulative time it is (first match wins, outermost)
    "imports": ["<module>"],
    "calibration": ["calibrate_ranges"],
    "quantize guard: fidelity": ["measure"],
    "speed timing (guard and contract)": ["compare_speed"],
    "reference and validation runs": ["_outputs", "_final_outputs"],
    "session creation": ["make_session"],
    "cleanup": ["cleanup_pass.py:run"],
}


def _nncf_worker(model: str, calib_dir: str, out: str) -> None:
    import nncf  # noqa: F401  (raises ImportError where absent: the row says "not installed")
    import numpy as np
    import onnx
    files = sorted(Path(calib_dir).glob("*.npy"))
    m = onnx.load(model)
    name = m.graph.input[0].name
    ds = nncf.Dataset([np.load(f) for f in files], lambda x: {name: x})
    q = nncf.quantize(m, ds, subset_size=len(files))
    onnx.save(q, out)


def run_nncf(model, calib, out, python: str = sys.executable) -> dict:
    """``nncf.quantize`` of ``model`` on the .npy samples of ``calib`` into ``out``, in its own process of
    the interpreter ``python``: {"wall_s", "peak_rss_mb"}, or {"error"}. onnx (and this script's own
    imports) load before the clock starts, as in the other tools' workers; nncf's import is its own
    cost, like onnxruntime.quantization's in ``ort_static``."""
    code = ("import sys, json, time; sys.path[:0] = [%r, %r]; import tool_cost, quantize_bench as qb; "
            "t = time.perf_counter(); tool_cost._nncf_worker(*sys.argv[1:4]); "
            "print(json.dumps({'wall_s': time.perf_counter() - t, 'peak_rss_mb': qb._peak_rss_mb()}))"
            % (str(ROOT), str(ROOT / "benchmarks")))
    p = subprocess.run([python, "-c", code, str(model), str(calib), str(out)], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "not installed" if "No module named 'nncf'" in last else last[:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(tool: str, model: Path, calib: Path, out: Path, budget: str) -> dict:
    if tool == "nncf":
        return run_nncf(model, calib, out)
    return qb.run_tool(TOOLS[tool], model, calib, out, budget if tool == "onnxshrink" else "")


def profile_phases(model: Path, calib: Path, out: Path, budget: str) -> list[tuple[str, float]]:
    """onnxshrink's CLI under cProfile, in this process: the cumulative seconds of each phase."""
    from onnxshrink.cli import main as cli_main
    argv = ["optimize", str(model), str(out), "--passes", "cleanup,quantize", "--calib", str(calib),
            "--no-cache", "--quiet"] + (["--budget", budget] if budget else [])
    prof = cProfile.Profile()
    prof.enable()
    try:
        cli_main(argv)
    except SystemExit:
        pass
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    total = max(v[3] for v in st.stats.values())
    rows = []
    for phase, keys in PHASES.items():
        best = 0.0
        for (file, line, func), v in st.stats.items():
            label = f"{Path(file).name}:{func}"
            if any(k == func or k == label for k in keys) and "onnxshrink" in file or \
                    (phase == "imports" and func == "<module>" and "site-packages" in file):
                best = max(best, v[3])
        rows.append((phase, best))
    rows.append(("total", total))
    return rows


# what an onnxruntime run is for, by the onnxshrink functions on its call stack (first match wins)
PURPOSES = [("timing (guard and contract)", ["compare_speeds", "measure_latency"]),
            ("calibration", ["collect_minmax", "calibrate_ranges"]),
            ("unit analysis", ["analyse_units"]),
            ("stored-weights check", ["fallback.py:"]),
            ("placement search", ["guard.py:", "judge_trial", "dynamic.py:"]),
            ("verdict (test samples)", ["_final_outputs"]),
            ("pass validation", ["_validate"]),
            ("cleanup's constant folding", ["cleanup_pass.py:", "folding.py:"]),
            ("quantize's preparation (opset, SmoothQuant)", ["scheme.py:", "smooth.py:", "prepare.py:", "_smooth",
                                                             "upgrade_opset"]),
            ("MACs' shape fold", ["cost.py:"]),
            ("reference outputs (input)", ["manager.py:_outputs_of_sets"])]


def runs_by_purpose(model: Path, calib: Path, out: Path, budget: str) -> tuple[float, dict]:
    """onnxshrink's CLI in this process with onnxruntime's session creation and runs counted and timed
    by purpose (``PURPOSES``): (wall seconds, {purpose: [count, seconds]})."""
    import collections
    import time
    import traceback

    import onnxruntime as ort

    from onnxshrink.cli import main as cli_main
    stats: dict = collections.defaultdict(lambda: [0, 0.0])

    def purpose() -> str:
        stack = [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_stack()[:-3]
                 if "onnxshrink" in f.filename and "benchmarks" not in f.filename and not f.name.startswith("<")]
        def match(label: str, key: str) -> bool:  # "file.py:" a module, "file.py:func" or "func" a function
            return label.startswith(key) if key.endswith(":") else key in (label, label.split(":")[1])
        for name, keys in PURPOSES:
            if any(match(label, k) for label in stack for k in keys):
                return name
        return "other: " + (stack[-1] if stack else "?")

    run, init = ort.InferenceSession.run, ort.InferenceSession.__init__

    def timed(kind):
        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return (run if kind == "run" else init)(self, *args, **kwargs)
            finally:
                s = stats[purpose() if kind == "run" else "session creation"]
                s[0] += 1
                s[1] += time.perf_counter() - t
        return wrapper
    ort.InferenceSession.run, ort.InferenceSession.__init__ = timed("run"), timed("init")
    argv = ["optimize", str(model), str(out), "--passes", "cleanup,quantize", "--calib", str(calib),
            "--no-cache", "--quiet"] + (["--budget", budget] if budget else [])
    t0 = time.perf_counter()
    try:
        cli_main(argv)
    except SystemExit:
        pass
    finally:
        ort.InferenceSession.run, ort.InferenceSession.__init__ = run, init
    return time.perf_counter() - t0, dict(stats)


def bench(name: str, repeats: int, budget: str, tools: list[str], heldout: int, rounds: int) -> list[dict]:
    from models.real import real_model, real_samples, write_samples
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if name in qb.MODELS:
            path, samples = real_model(name), real_samples(name, 32 + heldout, seed=0)
        else:
            path, samples = qb._built_model(name, d, 32 + heldout)
        calib = write_samples(samples[:32], d / "calib")
        held = samples[32:]
        variants, costs = {"fp32": Path(path)}, {}
        for tool in tools:
            out = d / f"{tool}.onnx"
            runs = [run(tool, path, calib, out, budget) for _ in range(repeats)]
            errs = [r["error"] for r in runs if "error" in r]
            if errs:
                costs[tool] = {"error": errs[0]}
                continue
            costs[tool] = {"wall_s": statistics.median(r["wall_s"] for r in runs),
                           "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                           "walls": [round(r["wall_s"], 1) for r in runs]}
            if any("check" in r for r in runs):  # ort_checked: what its checks found, each run
                costs[tool]["checks"] = [r.get("check") for r in runs]
            if out.exists() and SAME_OUTPUT.get(tool) not in tools:
                variants[tool] = out
        meas = qb.measure(variants, held, rounds)
        for tool, same in SAME_OUTPUT.items():
            if same in meas and tool not in meas and tool in costs and "error" not in costs[tool]:
                meas[tool], variants[tool] = meas[same], variants[same]
        ref, checked = costs.get("ort_static", {}), costs.get("ort_checked", {})
        shapes = {k: list(v.shape) for k, v in held[0].items()}
        for tool in tools:
            c = costs[tool]
            row = {"model": name, "tool": tool, **c, **meas.get(tool, {})}
            if tool in variants:
                st = model_stats(onnx.load(str(variants[tool])), shapes)
                if st["macs"] and st["integer_macs"] is not None:
                    row["int_macs"] = st["integer_macs"] / st["macs"]
            if "error" not in c and "wall_s" in ref:
                row["time_ratio"] = c["wall_s"] / ref["wall_s"]
                row["rss_ratio"] = c["peak_rss_mb"] / ref["peak_rss_mb"]
            if tool == "onnxshrink" and "error" not in c and "wall_s" in checked:
                row["time_ratio_checked"] = c["wall_s"] / checked["wall_s"]
                row["rss_ratio_checked"] = c["peak_rss_mb"] / checked["peak_rss_mb"]
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    hdr = (f"{'model':10} {'tool':11} {'tool s':>7} {'vs ORT':>6} {'vs chk':>6} {'peak MB':>8} {'vs ORT':>6} "
           f"{'vs chk':>6} {'speed':>6} {'cos mean':>8} {'cos min':>8} {'int MACs':>8}  runs (s)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10} {r['tool']:11} {r['error']}")
            continue

        def f(k, fmt, suffix=""):
            v = r.get(k)
            return (format(v, fmt) + suffix) if isinstance(v, (int, float)) else "-"
        print(f"{r['model']:10} {r['tool']:11} {f('wall_s', '7.1f')} {f('time_ratio', '5.2f', 'x'):>6} "
              f"{f('time_ratio_checked', '5.2f', 'x'):>6} {f('peak_rss_mb', '8.0f')} {f('rss_ratio', '5.2f', 'x'):>6} "
              f"{f('rss_ratio_checked', '5.2f', 'x'):>6} {f('speed', '5.2f', 'x'):>6} "
              f"{f('cos_mean', '8.4f')} {f('cos_min', '8.4f')} {f('int_macs', '7.0%'):>8}  {r.get('walls', '')}")
    sys.stdout.flush()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", default="cosine>=0.99", help="onnxshrink's --budget ('' = its default)")
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds of the outputs")
    ap.add_argument("--profile", action="store_true", help="also profile onnxshrink by phase")
    ap.add_argument("--purposes", action="store_true",
                    help="also count onnxshrink's onnxruntime runs and their time by purpose")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        r = bench(name, a.repeats, a.budget, a.tools.split(","), a.heldout, a.rounds)
        print_rows(r)
        rows += r
        if a.profile or a.purposes:
            from models.real import real_model, real_samples, write_samples
            with tempfile.TemporaryDirectory() as d:
                d = Path(d)
                path, samples = (real_model(name), real_samples(name, 32, seed=0)) if name in qb.MODELS else \
                    qb._built_model(name, d, 32)
                calib = write_samples(samples, d / "calib")
                if a.profile:
                    for phase, sec in profile_phases(path, calib, d / "p.onnx", a.budget):
                        print(f"    {phase:36} {sec:6.1f} s")
                if a.purposes:
                    wall, stats = runs_by_purpose(path, calib, d / "p.onnx", a.budget)
                    ort_s = sum(v[1] for v in stats.values())
                    print(f"    wall {wall:.2f} s: onnxruntime {ort_s:.2f} s (sessions and runs), the rest "
                          f"{wall - ort_s:.2f} s")
                    for k, (n, sec) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
                        print(f"    {k:46} {n:5d} {sec:6.2f} s")
        print()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
