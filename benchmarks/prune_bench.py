"""Prune benchmark on real models: lossless removal of zeroed channels, and importance pruning
with and without the least-squares refit.

    PYTHONPATH=. python benchmarks/prune_bench.py lossless            # all seven models
    PYTHONPATH=. python benchmarks/prune_bench.py importance yolov8n  # refit vs no refit
    PYTHONPATH=. python benchmarks/prune_bench.py importance ppocr_det --target-macs 0.75
    PYTHONPATH=. python benchmarks/prune_bench.py all --json out.json

Models: YOLOv8n (nudenet 320n.onnx) and PP-OCRv4 det (rapidocr) with real photos from
scikit-image, and the 'light' ResNet-50, DenseNet-121, Inception-v1, ShuffleNet and SqueezeNet
of the onnx package (their weights are a constant 0.02; we give conv/gemm weights seeded
He-normal values and BN plausible statistics so channels differ; inputs are photos with
ImageNet normalisation).

Lossless check (the issue's first "done when"): fold constants (the cleanup pass when it is
registered, else onnx-graphsurgeon's fold_constants as a stand-in), zero 30% of the units of
every prunable group (tests/prune_helpers.zero_channels: random units for the light models,
the least important by activation energy for the real ones so they keep working), then run
``cleanup,prune`` through the PassManager: every zeroed unit must be removed, the outputs must
match to 1e-4 of the output scale, and parameters must fall by >= 25%.
For PP-OCR det, samples are photos with rendered text pasted on (models/real.py), so fidelity is
not measured on all-zero maps. The DB probability map of the zeroed model is exactly 0 everywhere (30% of every
layer zeroed kills the detector), so the pre-sigmoid logits are added as a second output and
checked too; otherwise the comparison would be vacuous.

Importance check (the second): ``prune`` with mode=importance, ratio=0.3 (activation
importance, kept counts rounded to 8), with and without refit; fidelity on held-out samples
(the manager keeps every 4th sample for validation) and onnxruntime CPU latency (1 thread,
median of 30 runs, graph optimizations on) before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from prune_helpers import fold_constants, randomize_weights, zero_channels  # noqa: E402

from models.real import photos, real_model, real_samples  # noqa: E402
from onnxshrink.graph.cost import model_cost  # noqa: E402
from onnxshrink.passes.registry import registry  # noqa: E402
from onnxshrink.pipeline.manager import optimize  # noqa: E402
from onnxshrink.runtime import measure_latency  # noqa: E402

LIGHT = ["resnet50", "densenet121", "inception_v1", "shufflenet", "squeezenet"]
REAL = ["yolov8n", "ppocr_det"]
MODELS = REAL + LIGHT


def light_path(name: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def _input_name(m: onnx.ModelProto) -> str:
    inits = {t.name for t in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def prepare(name: str, n_samples: int = 8, seed: int = 0):
    """(folded model, samples) of a benchmark model."""
    if name in REAL:
        # PP-OCR det: real_samples gives photos with rendered text pasted on (its DB map is ~0 on
        # text-free photos, where cosine/SQNR would measure float noise)
        return fold_constants(onnx.load(str(real_model(name)))), real_samples(name, n_samples, seed)
    m = fold_constants(onnx.load(str(light_path(name))))
    m = randomize_weights(m, seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs = [((im.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None].copy()
          for im in photos(n_samples, (224, 224), seed)]
    inp = _input_name(m)
    return m, [{inp: x} for x in xs]


def _add_logits_output(m: onnx.ModelProto) -> onnx.ModelProto:
    """Also output the logits (the input of the final Sigmoid / Softmax): PP-OCR det's map and
    the light classifiers' softmax saturate, which would make the comparison vacuous."""
    out = m.graph.output[0].name
    sig = next((n for n in m.graph.node if out in n.output and n.op_type in ("Sigmoid", "Softmax")), None)
    if sig is None:
        return m
    vi = onnx.helper.make_tensor_value_info(sig.input[0], onnx.TensorProto.FLOAT, None)
    inferred = onnx.shape_inference.infer_shapes(m)
    for v in inferred.graph.value_info:
        if v.name == sig.input[0]:
            vi = v
    m.graph.output.append(vi)
    return m


def _passes(prune_opts: dict) -> list:
    ps = [{"prune": prune_opts}]
    if "cleanup" in registry():
        ps.insert(0, "cleanup")
    return ps


def lossless(name: str) -> dict:
    t0 = time.perf_counter()
    m, samples = prepare(name, 4)
    shapes = {k: list(v.shape) for k, v in samples[0].items()}
    by = "activation" if name in REAL else "random"
    z, info = zero_channels(m, 0.3, seed=0, input_shapes=shapes, by=by, samples=samples)
    z = _add_logits_output(z)
    out, rep = optimize(z, passes=_passes({"mode": "zeros", "latency": False}), data=samples)
    rec = next(r for r in rep.passes if r.name == "prune")
    pb, pa = model_cost(z, shapes)["params"], model_cost(out, shapes)["params"]
    return {
        "model": name, "status": rec.status, "reason": rec.reason,
        "groups": rec.stats.get("groups"), "prunable_groups": rec.stats.get("prunable_groups"),
        "zeroed_units": info["units"], "removed_units": rec.stats.get("removed_units", 0),
        "unprunable": [u["reason"] for u in rec.stats.get("unprunable", [])],
        "max_rel_err": (rec.fidelity or {}).get("max_abs"),
        "params_before": pb, "params_after": pa, "params_drop": 1 - pa / pb,
        "passes": [r.name for r in rep.passes], "seconds": round(time.perf_counter() - t0, 1),
    }


def importance(name: str, refit: bool, n_samples: int = 16, ratio: float = 0.3, target_macs: float = 0.0,
               scope: str = "layer", target_latency: float = 0.0) -> dict:
    t0 = time.perf_counter()
    m, samples = prepare(name, n_samples)
    shapes = {k: list(v.shape) for k, v in samples[0].items()}
    out, rep = optimize(m, passes=_passes({"mode": "importance", "ratio": ratio, "refit": refit, "latency": False,
                                           "target_macs": target_macs, "target_latency": target_latency,
                                           "scope": scope, "samples": n_samples}),
                        data=samples, budget="none")  # the given ratio, unchecked: the table reports cosine
    rec = next(r for r in rep.passes if r.name == "prune")
    cb, ca = model_cost(m, shapes), model_cost(out, shapes)
    feeds = samples[0]
    lat_b = measure_latency(m, feeds, runs=30, threads=1)
    lat_a = measure_latency(out, feeds, runs=30, threads=1)
    fid = rep.fidelity or {}
    return {
        "model": name, "refit": refit, "ratio": ratio, "target_macs": target_macs, "target_latency": target_latency,
        "scope": scope, "status": rec.status, "reason": rec.reason, "pass_seconds": rec.stats.get("seconds"),
        "cosine": fid.get("cosine"), "sqnr_db": fid.get("sqnr"), "mse": fid.get("mse"),
        "params_before": cb["params"], "params_after": ca["params"],
        "macs_before": cb["macs"], "macs_after": ca["macs"],
        "latency_ms_before": lat_b, "latency_ms_after": lat_a,
        "refit_stats": {k: v for k, v in rec.stats.get("refit", {}).items() if k != "layers"},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fmt(v, f="{:.4g}"):
    return "-" if v is None else (f.format(v) if isinstance(v, float) else str(v))


def lossless_table(rows) -> str:
    out = ["| model | status | zeroed units | removed | max rel. err | params before | after | drop "
           "| unprunable groups |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['status']} | {r['zeroed_units']} | {r['removed_units']} | "
                   f"{_fmt(r['max_rel_err'], '{:.1e}')} | {r['params_before']:,} | {r['params_after']:,} | "
                   f"{r['params_drop'] * 100:.1f}% | {len(r['unprunable'])}: "
                   f"{'; '.join(sorted(set(x.split(' (')[0] for x in r['unprunable'])))[:90]} |")
    return "\n".join(out)


def _strength(r) -> str:
    if r.get("target_latency"):
        return f"target_latency={r['target_latency']:g}"
    if r.get("target_macs"):
        return f"target_macs={r['target_macs']:g}"
    return f"ratio={r['ratio']:g}" + (", global" if r.get("scope") == "global" else "")


def importance_table(rows) -> str:
    """One line per model and setting: the refit and no-refit runs side by side (same channels
    removed, so params, MACs and latency are those of the refit run)."""
    out = ["| model | pruning | params | MACs | latency ms (ORT CPU, 1 thread, median) | cosine no refit "
           "| cosine refit "
           "| SQNR dB no refit / refit | pass s no refit / refit |",
           "|---|---|---|---|---|---|---|---|---|"]
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["model"], _strength(r)), {})[r["refit"]] = r
    for (model, strength), p in pairs.items():
        r = p.get(True) or p.get(False)
        no, yes = p.get(False, {}), p.get(True, {})
        out.append(f"| {model} | {strength} | {r['params_before']:,} -> {r['params_after']:,} | "
                   f"{r['macs_before'] / 1e6:.0f}M -> {r['macs_after'] / 1e6:.0f}M | "
                   f"{r['latency_ms_before']:.2f} -> {r['latency_ms_after']:.2f} | "
                   f"{_fmt(no.get('cosine'), '{:.4f}')} | "
                   f"{_fmt(yes.get('cosine'), '{:.4f}')} | {_fmt(no.get('sqnr_db'), '{:.2f}')} / "
                   f"{_fmt(yes.get('sqnr_db'), '{:.2f}')} | {_fmt(no.get('pass_seconds'))} / "
                   f"{_fmt(yes.get('pass_seconds'))} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["lossless", "importance", "all"])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--ratio", type=float, default=0.3, help="importance ratio")
    ap.add_argument("--target-macs", type=float, default=0.0,
                    help="importance: prune to this MAC fraction by sensitivity")
    ap.add_argument("--target-latency", type=float, default=0.0, help="importance: prune to this latency fraction")
    ap.add_argument("--scope", default="layer", choices=["layer", "global"])
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (every 4th held out for validation)")
    args = ap.parse_args(argv)
    res = {}
    if args.what in ("lossless", "all"):
        rows = []
        for n in args.models or MODELS:
            rows.append(lossless(n))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        res["lossless"] = rows
        print(lossless_table(rows))
    if args.what in ("importance", "all"):
        rows = []
        for n in args.models or REAL:
            for refit in (False, True):
                rows.append(importance(n, refit, n_samples=args.samples, ratio=args.ratio, target_macs=args.target_macs,
                                       scope=args.scope, target_latency=args.target_latency))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        res["importance"] = rows
        print(importance_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
