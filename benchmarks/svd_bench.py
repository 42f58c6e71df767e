"""Real-model figures of the svd pass: PP-OCRv4 rec (SVTR MatMul blocks + PPLCNetV3 convs) and
YOLOv8n (a plain CNN), on real inputs (rendered text lines / scikit-image photos).

Per model, three runs through the PassManager (every 4th sample held out for validation):
  budget   ``cleanup,svd`` with rule=fit (whitened, sensitivity-weighted), budget cosine>=0.99:
           params, MACs, fidelity and single-thread latency before/after.
  whitened ``svd`` rule=params ratio=R, whitened, no budget.
  plain    ``svd`` with whiten=false and exactly the whitened run's per-layer forms and ranks
           (option ``ranks``), so both have the same parameter count; fidelity of each.
When the ``cleanup`` pass is not registered (not yet merged), onnx-graphsurgeon's
``fold_constants()`` stands in for it (PaddlePaddle models keep weights in Constant nodes).

    python benchmarks/svd_bench.py                       # both models, table on stdout
    python benchmarks/svd_bench.py --models yolov8n --n 16 --ratio 0.4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402

from models.real import real_model, real_samples  # noqa: E402
from onnxshrink.errors import BudgetError  # noqa: E402
from onnxshrink.manager import PassManager  # noqa: E402
from onnxshrink.passes.base import registry  # noqa: E402


def _load(name: str):
    model = onnx.load(str(real_model(name)))
    if "cleanup" in registry():
        return model, ["cleanup"], "cleanup pass"
    g = gs.import_onnx(model)
    g.fold_constants().cleanup()
    return gs.export_onnx(g), [], "gs.fold_constants() stand-in"


def _run(model, passes, data, budget=None, latency=False):
    t = time.perf_counter()
    pm = PassManager(passes, data=data, budget=budget, measure_speed=latency)
    try:
        out, rep = pm.run(model)
    except BudgetError as e:
        out, rep = None, e.report
    rec = [p for p in rep.passes if p.name == "svd"][0]
    return out, rep, rec, time.perf_counter() - t


def bench(name: str, n: int, ratio: float, samples: int, positions: int) -> dict:
    model, pre, how = _load(name)
    data = real_samples(name, n)
    common = {"samples": samples, "max_positions": positions}
    res = {"model": name, "cleanup": how}

    _, rep, rec, dt = _run(model, pre + [{"svd": dict(common, rule="fit")}], data, "cosine>=0.99", latency=True)
    res["budget"] = {"status": rec.status, "reason": rec.reason, "params": [rep.before["params"], rep.after["params"]],
                     "macs": [rep.before["macs"], rep.after["macs"]], "fidelity": rep.fidelity,
                     "latency_ms": rep.latency_ms, "factorized": rec.stats.get("factorized"),
                     "candidates": rec.stats.get("candidates"), "seconds": dt}

    _, rep_w, rec_w, dt_w = _run(model, pre + [{"svd": dict(common, rule="params", ratio=ratio)}], data)
    ranks = [f"{L['layer']}={L['form']}:{L['rank']}" for L in rec_w.stats.get("layers", []) if L.get("rank")]
    _, rep_p, rec_p, dt_p = _run(model, pre + [{"svd": dict(common, whiten=False, ranks=ranks)}], data)
    for key, rep_, rec_, dt_ in (("whitened", rep_w, rec_w, dt_w), ("plain", rep_p, rec_p, dt_p)):
        res[key] = {"params": [rep_.before["params"], rep_.after["params"]], "macs": [rep_.before["macs"], rep_.after["macs"]],
                    "fidelity": rep_.fidelity, "factorized": rec_.stats.get("factorized"), "seconds": dt_,
                    "mean_measured_layer_error": _mean([L.get("measured_error") for L in rec_.stats.get("layers", [])
                                                        if L.get("rank")])}
    res["ratio"] = ratio
    return res


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(a, b):
    return f"{100.0 * (b - a) / a:+.1f}%" if a and b is not None else "?"


def table(results: list[dict]) -> str:
    lines = [f"{'model':10} {'run':22} {'params':>21} {'MACs':>25} {'cosine':>8} {'sqnr dB':>8} {'layer err':>9} "
             f"{'latency ms':>13}"]
    for r in results:
        b = r["budget"]
        lat = b.get("latency_ms") or {}
        lines.append(f"{r['model']:10} {'budget cos>=0.99 (fit)':22} "
                     f"{b['params'][0]:>9,}->{b['params'][1]:<9,}{_pct(*b['params']):>0} "
                     f"{b['macs'][0] / 1e6:>8.1f}M->{b['macs'][1] / 1e6:<7.1f}M{_pct(*b['macs']):>0} "
                     f"{b['fidelity'].get('cosine', float('nan')):8.5f} {b['fidelity'].get('sqnr', float('nan')):8.2f} "
                     f"{'':>9} {lat.get('before', float('nan')):6.2f}->{lat.get('after', float('nan')):<6.2f}")
        for key in ("whitened", "plain"):
            w = r[key]
            err = w["mean_measured_layer_error"]
            lines.append(f"{'':10} {key + ' ratio=%g' % r['ratio']:22} "
                         f"{w['params'][0]:>9,}->{w['params'][1]:<9,}{_pct(*w['params']):>0} "
                         f"{w['macs'][0] / 1e6:>8.1f}M->{w['macs'][1] / 1e6:<7.1f}M{_pct(*w['macs']):>0} "
                         f"{w['fidelity'].get('cosine', float('nan')):8.5f} {w['fidelity'].get('sqnr', float('nan')):8.2f} "
                         f"{(err if err is not None else float('nan')):9.4f}")
        lines.append(f"{'':10} cleanup: {r['cleanup']}; budget run: {b['status']} "
                     f"({b['factorized']}/{b['candidates']} layers factorized, {b['seconds']:.0f}s)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr_rec,yolov8n")
    ap.add_argument("--n", type=int, default=24, help="real samples (every 4th held out for validation)")
    ap.add_argument("--ratio", type=float, default=0.5, help="params kept in the equal-parameter comparison")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples used for whitening")
    ap.add_argument("--positions", type=int, default=1024, help="conv patches sampled per calibration sample")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    results = [bench(m, a.n, a.ratio, a.samples, a.positions) for m in a.models.split(",") if m]
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
