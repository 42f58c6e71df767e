"""``--passes cleanup,quantize --target openvino`` on real models, verified on the OpenVINO EP.

    PYTHONPATH=. python benchmarks/openvino_bench.py [--models yolov8n,ppocr_cls] [--placements inputs,fused]
        [--calib 32] [--val 16] [--json out.json]

Needs a Python with onnxruntime-openvino (``onnxshrink setup openvino`` or
``$ONNXSHRINK_OPENVINO_PYTHON``). Calibration and held-out samples as in ``targets_bench.py``. For
each model and Q/DQ placement of the openvino profile (``inputs``: the profile's, Q/DQ only where an
integer op reads a tensor; ``fused``: onnxruntime's CPU placement, what the profile used before) it
prints one row: placement on the EP, fidelity on the EP (8 held-out samples, against the fp32
original on the CPU EP), fidelity on the CPU EP (all held-out samples), speed vs the fp32 model on the
same EP (one thread, interleaved rounds, median ratio and ~95 % interval: ``runtime.speed_comparison``;
the check's timing stops at 6 or 12 rounds when its "slower" decision is clear, so the interval is
wider than a full timing's), and the exit the CLI would give (0, or 4 with the reason). Every figure
is measured in this run.

``--nncf-python PY``: also NNCF's output on the same samples (``nncf.quantize`` on the ONNX model with
its defaults, the same calibration samples; NNCF is OpenVINO's own quantizer, so this is the peer on
its home runtime), run by the interpreter ``PY`` that has nncf (``benchmarks/tool_cost.py`` says how
to make one), then measured on the OpenVINO EP exactly as onnxshrink's result is
(``targets.openvino.openvino_check``: every node on the EP, fidelity against the fp32 original on
the CPU EP over the held-out samples, speed against the fp32 model on the same EP): a row with
placement ``NNCF``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxshrink.errors import BudgetError  # noqa: E402
from onnxshrink.targets.profiles import TARGETS  # noqa: E402


def run_one(name: str, placement: str, n_calib: int, n_val: int) -> dict:
    """One model with one Q/DQ placement of the openvino profile."""
    from models.real import real_model, real_samples
    from onnxshrink.pipeline.manager import PassManager

    allp = real_samples(name, 26 + n_calib, seed=0)
    calib, val = allp[26:], allp[:n_val]
    profile = dataclasses.replace(TARGETS["openvino"], qdq_placement=placement)
    t0 = time.time()
    pm = PassManager(["cleanup", "quantize"], data=calib, val_data=val, target=profile, seed=0)
    try:
        _, report = pm.run(str(real_model(name)))
        exit_code, why = 0, ""
    except BudgetError as e:
        report, exit_code, why = e.report, 4, str(e)
    ov = (report.target_report or {}).get("openvino") or {}
    speed = ov.get("speed") or {}
    row = {"model": name, "placement": placement, "wall_s": round(time.time() - t0, 1), "exit": exit_code,
           "why": why[:300], "available": ov.get("available"), "accepted": ov.get("accepted"),
           "placements": {k: v.get("count") for k, v in (ov.get("placements") or {}).items()},
           "nodes_on_cpu": ov.get("nodes_on_cpu", 0),
           "fidelity_ov": {k: (ov.get("fidelity") or {}).get(k) for k in ("cosine", "cosine_min")},
           "samples_ov": ov.get("samples"),
           "fidelity_cpu": {k: (report.fidelity or {}).get(k) for k in ("cosine", "cosine_min")},
           "speed_ov": speed.get("vs_fp32"), "speed_verdict": speed.get("verdict"),
           "onnxruntime": ov.get("onnxruntime")}
    q = next((p.stats or {} for p in report.passes if p.name == "quantize"), {})
    row["quantized_units"] = q.get("quantized_units")
    row["quantize_reason"] = next((p.reason for p in report.passes if p.name == "quantize"), "")
    return row


def run_nncf(name: str, n_calib: int, n_val: int, nncf_python: str) -> dict:
    """NNCF's quantization of ``name`` (in ``nncf_python``), measured on the OpenVINO EP like onnxshrink's."""
    import tempfile

    import onnx
    from tool_cost import run_nncf as nncf_quantize

    from models.real import real_model, real_samples, write_samples
    from onnxshrink.metrics import fidelity
    from onnxshrink.runtime import make_session
    from onnxshrink.targets.openvino import openvino_check

    allp = real_samples(name, 26 + n_calib, seed=0)
    calib, val = allp[26:], allp[:n_val]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "nncf.onnx"
        info = nncf_quantize(real_model(name), write_samples(calib, Path(d) / "calib"), out, python=nncf_python)
        if "error" in info:
            return {"model": name, "placement": "NNCF", "error": info["error"]}
        q, fp32 = onnx.load(str(out)), onnx.load(str(real_model(name)))
    sess = make_session(fp32, optimize=False)
    reference = [sess.run(None, s) for s in val]
    ov = openvino_check(q, val, reference=reference, baseline=fp32)  # timed as onnxshrink's check times
    cpu = make_session(q)
    fc = fidelity(reference, [cpu.run(None, s) for s in val])
    speed = ov.get("speed") or {}
    return {"model": name, "placement": "NNCF", "wall_s": round(info["wall_s"], 1), "exit": "-",
            "accepted": ov.get("accepted"),
            "nodes_on_cpu": ov.get("nodes_on_cpu", 0), "error_ov": ov.get("error"),
            "fidelity_ov": {k: (ov.get("fidelity") or {}).get(k) for k in ("cosine", "cosine_min")},
            "samples_ov": ov.get("samples"), "fidelity_cpu": {k: fc.get(k) for k in ("cosine", "cosine_min")},
            "speed_ov": speed.get("vs_fp32"), "speed_verdict": speed.get("verdict")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n,ppocr_cls")
    ap.add_argument("--placements", default="inputs,fused")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--nncf-python", default="", help="an interpreter with nncf: also NNCF's output on the EP")
    a = ap.parse_args()
    rows = []
    for m in a.models.split(","):
        jobs = [(p, lambda p=p: run_one(m, p, a.calib, a.val)) for p in a.placements.split(",") if p]
        if a.nncf_python:
            jobs.append(("NNCF", lambda: run_nncf(m, a.calib, a.val, a.nncf_python)))
        for p, job in jobs:
            try:
                r = job()
            except Exception as e:  # report, keep going
                r = {"model": m, "placement": p, "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            print(json.dumps(r, default=str), flush=True)
    print("\n| model | Q/DQ placement | on the OpenVINO EP | cosine on the EP, mean / min | cosine on the CPU EP "
          "| speed vs fp32 on the EP (95 % interval) | exit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['placement']} | error: {r['error'][:80]} | | | | |")
            continue
        s = r.get("speed_ov") or {}
        place = "every node" if r["accepted"] else f"{r['nodes_on_cpu']} node(s) on CPU"
        fo, fc = r["fidelity_ov"], r["fidelity_cpu"]
        if fo.get("cosine") is None:
            print(f"| {r['model']} | {r['placement']} | {place}: {str(r.get('error_ov'))[:80]} | - | "
                  f"{fc['cosine']:.4f} / {fc['cosine_min']:.4f} | - | {r['exit']} |")
            continue
        sp = f"{s['speedup']:.2f}x ({s['interval'][0]:.2f}-{s['interval'][1]:.2f})" if s else "-"
        print(f"| {r['model']} | {r['placement']} | {place} | {fo['cosine']:.4f} / {fo['cosine_min']:.4f} "
              f"| {fc['cosine']:.4f} / {fc['cosine_min']:.4f} | {sp} | {r['exit']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
