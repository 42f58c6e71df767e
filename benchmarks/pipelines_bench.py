"""Allocation across prune, svd and quantize vs quantization alone, on the real models.

For each model (yolov8n, ppocr_det, ppocr_rec; vit_s / vit_s4: ``models.build.vit_encoder`` at ViT-S
width, 12 / 4 blocks, 384 wide, 6 heads, 64x64 photos): writes 40 samples (``real_samples``, the
photos of ``demo_samples`` for the ViTs; the manager holds out every 4th), runs

    onnxshrink optimize M q.onnx --passes cleanup,quantize --budget "cosine>=0.99"
    onnxshrink optimize M a.onnx --passes cleanup,prune,svd,quantize --budget "cosine>=0.99" \
        --target-size 0.2 [--target-macs F] [--max-units 24 --sensitivity-samples 4] --plot a.png

(unless their outputs exist; the transformers without --max-units and --sensitivity-samples: the
proxy sensitivity measures every unit), then compares the written models on 16 fresh samples
(another seed): weight bytes and file size vs the input, MACs, cosine mean/min against the fp32
model, single-thread latency measured interleaved (the three models in turn, 8 rounds of 5 runs,
minimum of each) and each command's wall time.

    PYTHONPATH=. python benchmarks/pipelines_bench.py [yolov8n] [ppocr_det] [vit_s] [ppocr_rec]
        [--out /tmp/pipelines] [--target-size 0.15] [--target-macs 0.8] [--rounds 8] [--val 32]

``--val N`` writes N more samples (seed 2) passed as ``--val`` to both commands (issue 17's form:
all 40 ``--calib`` samples calibrate, the N alternate between selection and test).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.build import demo_samples, vit_encoder  # noqa: E402
from models.real import real_model, real_samples, write_samples  # noqa: E402
from onnxshrink.graph.cost import model_stats  # noqa: E402
from onnxshrink.metrics import fidelity  # noqa: E402
from onnxshrink.runtime import interleaved_latency, make_session  # noqa: E402


def _optimize(src, out, passes, extra, report, log):
    if Path(out).exists() or (Path(report).exists()
                              and json.loads(Path(report).read_text()).get("budget_met") is False):
        return None
    val = Path(out).parent / "val"
    cmd = [sys.executable, "-m", "onnxshrink", "optimize", str(src), str(out),
           "--calib", str(Path(out).parent / "calib"), *(["--val", str(val)] if val.exists() else []),
           "--passes", passes, "--budget", "cosine>=0.99", "--report", str(report), "-q", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                                           **__import__("os").environ})
    Path(log).write_text(" ".join(cmd) + f"\nexit {r.returncode}, {time.perf_counter() - t0:.0f} s\n"
                         + r.stdout + r.stderr)
    return r.returncode


TRANSFORMERS = {"vit_s": 12, "vit_s4": 4}  # name: blocks of the ViT-S-width encoder
TRANSFORMER_REAL = ("ppocr_rec",)


def _source(name: str, d: Path) -> Path:
    """The model file: a real model's cached download, or the ViT-S-width encoder written to ``d``."""
    if name not in TRANSFORMERS:
        return real_model(name)
    p = d / f"{name}.onnx"
    if not p.exists():
        onnx.save(vit_encoder(depth=TRANSFORMERS[name], dim=384, heads=6, hw=64, patch=8), str(p))
    return p


def _samples(name: str, n: int, seed: int) -> list[dict]:
    if name in TRANSFORMERS:
        return [{"pixel_values": x} for x in demo_samples(n, seed=seed, hw=64)]
    return real_samples(name, n, seed=seed)


def _wall(log: Path):
    """The wall time the log's first line recorded ("exit N, T s"), or None."""
    if not log.exists():
        return None
    first = log.read_text().splitlines()
    line = first[1] if len(first) > 1 else ""
    try:
        return float(line.split(",")[1].split()[0])
    except (IndexError, ValueError):
        return None


def _interleaved(models, feeds, rounds=8, runs=5):
    return [min(t) for t in interleaved_latency(models, feeds, rounds=rounds, runs=runs)]


def bench(name: str, out: Path, target_macs: float | None = None, rounds: int = 8,
          target_size: float = 0.2, val: int = 0) -> list[dict]:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    src = _source(name, d)
    if not (d / "calib").exists():
        write_samples(_samples(name, 40, seed=0), d / "calib")
    if val and not (d / "val").exists():  # --val: all of calib calibrates, these alternate selection / test
        write_samples(_samples(name, val, seed=2), d / "val")
    transformer = name in TRANSFORMERS or name in TRANSFORMER_REAL
    limits = [] if transformer else ["--max-units", "24", "--sensitivity-samples", "4"]
    codes = {
        "quantize": _optimize(src, d / "q.onnx", "cleanup,quantize", ["--latency"], d / "q.json", d / "q.log"),
        "allocated": _optimize(src, d / "a.onnx", "cleanup,prune,svd,quantize",
                               ["--latency", "--target-size", str(target_size), *limits,
                                "--plot", str(d / "a.png"),
                                *(["--target-macs", str(target_macs)] if target_macs else [])],
                               d / "a.json", d / "a.log"),
    }
    fp32 = onnx.load(str(src))
    models = {"fp32": fp32}
    for k, f in (("quantize", "q.onnx"), ("allocated", "a.onnx")):
        if (d / f).exists():
            models[k] = onnx.load(str(d / f))
    held = _samples(name, 16, seed=1)
    sess0 = make_session(fp32, optimize=False)
    ref = [sess0.run(None, s) for s in held]
    lat = _interleaved(list(models.values()), held[0], rounds=rounds)
    shapes = {k: list(v.shape) for k, v in held[0].items()}
    base = model_stats(fp32, shapes)
    rows = []
    for (k, m), t in zip(models.items(), lat):
        s = make_session(m, optimize=True)
        fid = fidelity(ref, [s.run(None, x) for x in held])
        st = model_stats(m, shapes)
        f = {"fp32": src, "quantize": d / "q.onnx", "allocated": d / "a.onnx"}[k]
        rows.append({"model": name, "pipeline": k, "weight_bytes": st["weight_bytes"],
                     "size_ratio": st["weight_bytes"] / base["weight_bytes"],
                     "file_ratio": Path(f).stat().st_size / Path(src).stat().st_size,
                     "params": st["params"], "macs": st["macs"], "latency_ms": t, "speed": lat[0] / t,
                     "cosine": fid["cosine"], "cosine_min": fid["cosine_min"], "exit": codes.get(k),
                     "macs_ratio": st["macs"] / base["macs"] if base["macs"] else None,
                     "tool_s": _wall(d / ("q.log" if k == "quantize" else "a.log")) if k != "fp32" else None})
    for k in ("quantize", "allocated"):
        rep = d / ("q.json" if k == "quantize" else "a.json")
        if rep.exists() and k not in models:
            r = json.loads(rep.read_text())
            rows.append({"model": name, "pipeline": k, "tool_s": _wall(d / ("q.log" if k == "quantize" else "a.log")),
                         "failed": (r.get("allocation") or {}).get("result", "budget not met")})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["yolov8n", "ppocr_det"])
    ap.add_argument("--out", default="/tmp/pipelines_bench")
    ap.add_argument("--target-macs", type=float, default=None, help="also a MACs target for the allocated run")
    ap.add_argument("--target-size", type=float, default=0.2, help="the allocated run's size target")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (5 runs each)")
    ap.add_argument("--val", type=int, default=0, help="also N samples (another seed) as --val: half select, "
                                                        "half test; all 40 --calib samples calibrate")
    a = ap.parse_args(argv)
    print("| model | pipeline | weight bytes (x input) | file (x input) | params | MACs (x input) | latency 1 thread | "
          "speed | cosine mean / min (16 unseen samples) | tool time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        for r in bench(name, Path(a.out), a.target_macs, a.rounds, a.target_size, a.val):
            tool = f"{r['tool_s']:.0f} s" if r.get("tool_s") is not None else ""
            if "failed" in r:
                print(f"| {r['model']} | {r['pipeline']} | exit 4: {r['failed']} | | | | | | | {tool} |")
                continue
            print(f"| {r['model']} | {r['pipeline']} | {r['weight_bytes'] / 1e6:.2f} MB ({r['size_ratio']:.3f}) | "
                  f"{r['file_ratio']:.3f} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.3f}G "
                  f"({r['macs_ratio']:.3f}) | {r['latency_ms']:.1f} ms | "
                  f"{r['speed']:.2f}x | {r['cosine']:.4f} / {r['cosine_min']:.4f} | {tool} |")


if __name__ == "__main__":
    main()
