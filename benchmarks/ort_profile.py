"""Where a model's time goes in onnxruntime: the kernel time per op type of fp32 and of onnxshrink's
output at the budget, from onnxruntime's own session profiler (one intra-op thread).

    PYTHONPATH=. python benchmarks/ort_profile.py                          # the tool-cost models
    PYTHONPATH=. python benchmarks/ort_profile.py --models yolov8n --runs 50 --budget "cosine>=0.99"

Per model: 32 calibration samples (``models.real.real_samples``, or the built models of
``benchmarks/quantize_bench.py``), ``onnxshrink optimize M OUT --passes cleanup,quantize --calib DIR
--budget B``; then each of fp32 and OUT runs ``--runs`` times on one sample under
``SessionOptions.enable_profiling`` (after 5 warm-up runs, which the table leaves out) and the
profile's node events (``cat == "Node"``, ``*_kernel_time``) are summed per op type of the graph
onnxruntime actually runs (after its fusions). The table gives, per op type, the milliseconds per
run and the share of the model's kernel time, and whether it is an integer kernel
(``graph.cost.INTEGER_OPS``, the QLinear* / DequantizeLinear / QuantizeLinear ops of the QDQ
fusions, and any kernel whose first input the profiler recorded as 8- or 16-bit integers: Resize,
MaxPool, Split between Q/DQ pairs onnxruntime dropped): the float islands of the quantized model are
the float rows of its table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import quantize_bench as qb  # noqa: E402

from onnxshrink.graph.cost import INTEGER_OPS  # noqa: E402

MODELS = ["ppocr_cls", "yolov8n", "ppocr_rec", "crnn", "vit_s"]
WARMUP = 5


QUANTIZED_TYPES = ("uint8", "int8", "uint16", "int16")  # a kernel reading these runs on quantized data


def integer_op(op: str, first_input: str | None = None) -> bool:
    """Whether onnxruntime runs the kernel on integers: its integer kernels and the QDQ fusions'
    QLinear ops (QuantizeLinear/DequantizeLinear convert between the two worlds and count here
    too), or any op whose first input is quantized data (``first_input``, the type the profiler
    recorded: Resize, MaxPool, Split, Transpose between Q/DQ pairs run on uint8 once onnxruntime
    drops the pairs; by op type alone they were counted float)."""
    return op in INTEGER_OPS or op.startswith("QLinear") or op in (
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") or first_input in QUANTIZED_TYPES


def op_times(model: Path, feeds: dict, runs: int) -> dict[tuple[str, bool], float]:
    """{(op type, integer kernel): kernel milliseconds per run} of ``model`` on one thread
    (onnxruntime's profiler; ``integer_op`` of the op type and the first input's recorded type)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "prof")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP + runs):
            sess.run(None, feeds)
        events = json.load(open(sess.end_profiling()))
    per_run: collections.Counter = collections.Counter()
    runs_seen = 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs_seen += 1
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        if runs_seen <= WARMUP:  # the run's node events come before its model_run event
            continue
        args = ev["args"]
        types = [next(iter(t)) for t in args.get("input_type_shape", []) if t]
        op = args["op_name"]
        per_run[(op, integer_op(op, types[0] if types else None))] += ev["dur"] / 1e3
    return {op: t / runs for op, t in per_run.items()}


def profile(name: str, runs: int, budget: str) -> list[str]:
    from models.real import real_model, real_samples, write_samples
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if name in qb.MODELS:
            path, samples = real_model(name), real_samples(name, 33, seed=0)
        else:
            path, samples = qb._built_model(name, d, 33)
        calib = write_samples(samples[:32], d / "calib")
        out = d / "shrink.onnx"
        cmd = [sys.executable, "-m", "onnxshrink", "optimize", str(path), str(out), "--passes", "cleanup,quantize",
               "--calib", str(calib), "--no-cache", "-q"] + (["--budget", budget] if budget else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode != 0:
            return [f"{name}: onnxshrink exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}"]
        feeds = samples[32]
        base, shrunk = op_times(Path(path), feeds, runs), op_times(out, feeds, runs)
    lines = [f"### {name}: fp32 {sum(base.values()):.2f} ms, onnxshrink {sum(shrunk.values()):.2f} ms of kernel "
             f"time per run ({sum(base.values()) / max(sum(shrunk.values()), 1e-9):.2f}x); onnxshrink's float "
             f"kernels: {sum(t for (_, i), t in shrunk.items() if not i) / max(sum(shrunk.values()), 1e-9):.0%}",
             "", "| op type (onnxshrink) | kernel | ms per run | share |", "|---|---|---|---|"]
    total = sum(shrunk.values())
    for (op, integer), t in sorted(shrunk.items(), key=lambda kv: -kv[1]):
        if t / total < 0.01:
            continue
        lines.append(f"| {op} | {'integer' if integer else 'float'} | {t:.2f} | {t / total:.0%} |")
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--budget", default="cosine>=0.99", help="onnxshrink's --budget ('' = its default)")
    a = ap.parse_args(argv)
    for name in a.models.split(","):
        print("\n".join(profile(name, a.runs, a.budget)), flush=True)


if __name__ == "__main__":
    main()
