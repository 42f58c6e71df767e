"""Transformers side by side: fp32, onnxruntime ``quantize_dynamic`` and ``quantize_static``, onnxshrink
``cleanup,quantize`` and onnxshrink ``cleanup,prune --target-macs 0.8 --budget cosine>=0.98``, on the
transformers trained on scikit-learn's digits (models/trained.py: ``digits_vit``, ``digits_text``,
``digits_vit_s``; torch exports, opset 17 unless ``--opset 14``) and PP-OCRv4 rec (SVTR blocks).

    python benchmarks/transformer_bench.py                                   # all four, every tool
    python benchmarks/transformer_bench.py --models digits_vit --tools ort_dyn,prune --rounds 20

Samples: digits models calibrate on 64 training images and get the 497 held-out images as ``--val``
(with labels); the onnxshrink runs decide on its even positions, and every figure here is measured
on the odd ones (248 images no decision saw), accuracy against their labels. PP-OCRv4 rec: 32
rendered text lines are ``--calib`` (16 calibrate, 8 select, 8 test, as in docs/prune.md), 24
others are measured.

Tools (each in its own subprocess, timed; the first three through ``benchmarks/quantize_bench.py``'s
worker): ``ort_dyn`` onnxruntime ``quantize_dynamic`` (int8 weights, per-token activations at run
time), ``ort_pc`` onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel), ``shrink`` onnxshrink
``cleanup,quantize`` at ``--budget none`` (the pass alone, as the other tools run), ``prune``
onnxshrink ``cleanup,prune --target-macs 0.8 --budget cosine>=0.98`` (the allocator's head/neuron
choice, the budget checked on the test half of ``--val``). Speed: one intra-op thread, the variants'
runs interleaved round by round, medians (``quantize_bench.measure``). MACs: ``graph.cost`` at batch 1
(integer kernels counted as their float op; "-" where the cost model has no rule).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quantize_bench import measure, run_tool, valid  # noqa: E402

MODELS = ["digits_vit", "digits_text", "digits_vit_s", "ppocr_rec"]
TOOLS = ["ort_dyn", "ort_pc", "shrink", "prune"]
LABELS = {"fp32": "fp32", "ort_dyn": "ORT quantize_dynamic", "ort_pc": "ORT quantize_static per-channel",
          "shrink": "onnxshrink cleanup,quantize", "prune": "onnxshrink cleanup,prune --target-macs 0.8"}


def prepare(name: str, folder: Path, opset: int) -> dict:
    """The model's path, its calibration and --val folders, the measured samples (and labels), and
    its input shapes at batch 1."""
    if name == "ppocr_rec":
        from models.real import real_model, real_samples, write_samples
        s = real_samples(name, 56, seed=0)
        return {"path": real_model(name), "calib": write_samples(s[:32], folder / "calib"), "val": None,
                "held": s[32:56], "labels": None,
                "shapes": {"x": [1, 3, 48, 320]}, "extra": ["--input-shape", "x:1,3,48,320"]}
    from models.trained import digits_inputs, trained_model, write_digits_folders
    calib, val = write_digits_folders(name, folder)
    feeds, labels = digits_inputs(name, "test")
    shapes = {k: [1, *v.shape[1:]] for k, v in feeds[0].items()}
    return {"path": trained_model(name, opset), "calib": calib, "val": val, "held": feeds[1::2],
            "labels": labels[1::2], "shapes": shapes, "extra": []}


def run_prune(model: Path, p: dict, out: Path, target_macs: float, budget: str) -> dict:
    """``onnxshrink optimize --passes cleanup,prune --target-macs F --budget B`` in a subprocess."""
    rep = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "onnxshrink", "optimize", str(model), str(out), "--passes", "cleanup,prune",
           "--target-macs", str(target_macs), "--budget", budget, "--calib", str(p["calib"]), "--report", str(rep),
           "-q", *p["extra"], *(["--val", str(p["val"])] if p["val"] else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    info = {"wall_s": time.perf_counter() - t0}
    if r.returncode != 0 or not out.exists():
        info["error"] = f"exit {r.returncode}: " + ((r.stderr.strip().splitlines() or ["failed"])[-1][:200])
        return info
    report = json.loads(rep.read_text())
    prune = next(x for x in report["passes"] if x["name"] == "prune")
    info["removed"] = prune.get("reason", "")
    info["tool_test_cosine"] = report["fidelity"]["cosine"]
    return info


def macs(path: Path, shapes: dict) -> int | None:
    import onnx

    from onnxshrink.graph.cost import model_cost
    return model_cost(onnx.load(str(path)), shapes)["macs"]


def bench_model(name: str, tools: list, rounds: int, opset: int, target_macs: float, budget: str) -> list[dict]:
    from models.trained import accuracy
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        p = prepare(name, d, opset)
        variants, infos = {"fp32": p["path"]}, {"fp32": {}}
        for tool in tools:
            out = d / f"{tool}.onnx"
            if tool == "prune":
                info = run_prune(p["path"], p, out, target_macs, budget)
            else:
                info = run_tool(tool, p["path"], p["calib"], out)
            infos[tool] = info
            if "error" not in info and out.exists() and valid(out) == "yes":
                variants[tool] = out
            elif "error" not in info:
                info["error"] = valid(out) if out.exists() else "no output"
        meas = measure(variants, p["held"], rounds)
        size0, macs0 = Path(p["path"]).stat().st_size, macs(p["path"], p["shapes"])
        for k in ["fp32", *tools]:
            row = {"model": name, "variant": LABELS[k], "tool_s": infos[k].get("wall_s")}
            if k not in variants:
                row["error"] = infos[k].get("error", "failed")
                rows.append(row)
                continue
            m = macs(variants[k], p["shapes"])
            row.update(meas[k], size=Path(variants[k]).stat().st_size / size0,
                       macs=(m / macs0 if m and macs0 else None), removed=infos[k].get("removed"))
            if p["labels"] is not None:
                row["accuracy"] = accuracy(variants[k], p["held"], p["labels"])
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """Markdown rows: model, tool, size, MACs, speed (ms), cosine mean / min, accuracy, tool time."""
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['variant']} | fails: {r['error']} | | | | | |")
            continue
        print(f"| {r['model']} | {r['variant']} | {f(r['size'], '.3f')}x | {f(r.get('macs'), '.3f')}x | "
              f"{f(r['speed'], '.2f')}x ({f(r['ms'], '.2f')} ms) | "
              f"{f(r['cos_mean'], '.4f')} / {f(r['cos_min'], '.4f')} | "
              f"{f(r.get('accuracy'), '.4f')} | {f(r.get('tool_s'), '.1f')} s |")
        if r.get("removed"):
            print(f"|   | removed: {r['removed']} | | | | | | |")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--opset", type=int, default=17, choices=(14, 17), help="export of the digits models")
    ap.add_argument("--target-macs", type=float, default=0.8)
    ap.add_argument("--budget", default="cosine>=0.98")
    ap.add_argument("--json", default="", help="write the rows to this file")
    a = ap.parse_args(argv)
    print("| model | tool | size | MACs | speed vs fp32 (1 thread) | cosine mean / min | accuracy | tool time |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in a.models.split(","):
        r = bench_model(name, a.tools.split(","), a.rounds, a.opset, a.target_macs, a.budget)
        print_table(r)
        rows.extend(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
