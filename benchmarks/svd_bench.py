"""Real-model figures of the svd pass: PP-OCRv4 rec (SVTR MatMul blocks + PPLCNetV3 convs) and
YOLOv8n (a plain CNN), on real inputs (rendered text lines / scikit-image photos).

Per model, three runs through the PassManager (every 4th sample held out for validation):
  budget   ``cleanup,svd`` with rule=fit (whitened, sensitivity-weighted), budget cosine>=0.99:
           params, MACs, fidelity and single-thread latency before/after, and the cosine on 16
           fresh inputs (seed 1: new text lines / new photo crops) that neither calibration nor
           validation saw ("test cos").
  (--plain-fit) the same budget run with plain SVD (whiten=false), for params at equal fidelity.
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
from onnxshrink.passes.registry import registry  # noqa: E402
from onnxshrink.pipeline.manager import PassManager  # noqa: E402


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


def _fidelity_on(reference_model, model, samples, yolo=False) -> dict:
    from onnxshrink.metrics import fidelity
    from onnxshrink.runtime import make_session

    ref = make_session(reference_model, optimize=False)
    got = make_session(model, optimize=True)
    r = [ref.run(None, s) for s in samples]
    o = [got.run(None, s) for s in samples]
    fid = fidelity(r, o)
    if yolo and r and r[0][0].ndim == 3:
        # YOLOv8 (1, 4 box + classes rows, anchors): box coordinates in pixels dominate the plain
        # cosine, so the class-score rows are scored on their own too
        fid["class_cosine"] = fidelity([[x[0][:, 4:]] for x in r], [[x[0][:, 4:]] for x in o])["cosine"]
    return fid


def bench(name: str, n: int, ratio: float, samples: int, positions: int, n_test: int = 16,
          plain_fit: bool = False) -> dict:
    model, pre, how = _load(name)
    data = real_samples(name, n)
    common = {"samples": samples, "max_positions": positions}
    res = {"model": name, "cleanup": how}

    out, rep, rec, dt = _run(model, pre + [{"svd": dict(common, rule="fit")}], data, "cosine>=0.99", latency=True)
    # fresh inputs neither calibration nor validation saw: new text lines (seed 1), or new random
    # crops of the photos (real_samples returns the whole photos first, then seeded crops)
    test = real_samples(name, max(n, 32) + n_test, seed=1)[-n_test:]
    res["budget"] = {"status": rec.status, "reason": rec.reason, "params": [rep.before["params"], rep.after["params"]],
                     "macs": [rep.before["macs"], rep.after["macs"]], "fidelity": rep.fidelity,
                     "test_fidelity": (_fidelity_on(model, out, test, name.startswith('yolo'))
                                       if out is not None else {}),
                     "latency_ms": rep.latency_ms, "factorized": rec.stats.get("factorized"),
                     "candidates": rec.stats.get("candidates"), "seconds": dt}

    if plain_fit:  # the same budget with plain SVD: how much it can cut at equal fidelity
        out_p, rep_pf, rec_pf, dt_pf = _run(model, pre + [{"svd": dict(common, rule="fit", whiten=False)}], data,
                                            "cosine>=0.99")
        res["plain_fit"] = {"status": rec_pf.status, "params": [rep_pf.before["params"], rep_pf.after["params"]],
                            "macs": [rep_pf.before["macs"], rep_pf.after["macs"]], "fidelity": rep_pf.fidelity,
                            "test_fidelity": (_fidelity_on(model, out_p, test, name.startswith('yolo'))
                                              if out_p is not None else {}),
                            "seconds": dt_pf}

    _, rep_w, rec_w, dt_w = _run(model, pre + [{"svd": dict(common, rule="params", ratio=ratio)}], data)
    ranks = [f"{L['layer']}={L['form']}:{L['rank']}" for L in rec_w.stats.get("layers", []) if L.get("rank")]
    _, rep_p, rec_p, dt_p = _run(model, pre + [{"svd": dict(common, whiten=False, ranks=ranks)}], data)
    for key, rep_, rec_, dt_ in (("whitened", rep_w, rec_w, dt_w), ("plain", rep_p, rec_p, dt_p)):
        res[key] = {"params": [rep_.before["params"], rep_.after["params"]],
                    "macs": [rep_.before["macs"], rep_.after["macs"]],
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


def _arrow(pair, div, unit):
    a, b = pair
    if div == 1:
        return f"{a:,}->{b:,} ({_pct(a, b)})"
    return f"{a / div:.1f}{unit}->{b / div:.1f}{unit} ({_pct(a, b)})"


def table(results: list[dict]) -> str:
    lines = [f"{'model':10} {'run':22} {'params':>24} {'MACs':>26} {'cosine':>8} {'sqnr dB':>8} {'layer err':>9} "
             f"{'latency ms':>13} {'test cos':>8} {'test top1':>9} {'test cls cos':>12}"]
    for r in results:
        b = r["budget"]
        lat = b.get("latency_ms") or {}
        lines.append(f"{r['model']:10} {'budget cos>=0.99 (fit)':22} "
                     f"{_arrow(b['params'], 1, ''):>24} {_arrow(b['macs'], 1e6, 'M'):>26} "
                     f"{b['fidelity'].get('cosine', float('nan')):8.5f} {b['fidelity'].get('sqnr', float('nan')):8.2f} "
                     f"{'':>9} {lat.get('before', float('nan')):6.2f}->{lat.get('after', float('nan')):<6.2f} "
                     f"{b['test_fidelity'].get('cosine', float('nan')):8.5f} "
                     f"{b['test_fidelity'].get('top1', float('nan')):9.4f} "
                     f"{b['test_fidelity'].get('class_cosine', float('nan')):12.5f}")
        if "plain_fit" in r:
            p = r["plain_fit"]
            lines.append(f"{'':10} {'plain, same budget':22} {_arrow(p['params'], 1, ''):>24} "
                         f"{_arrow(p['macs'], 1e6, 'M'):>26} "
                         f"{p['fidelity'].get('cosine', float('nan')):8.5f} "
                         f"{p['fidelity'].get('sqnr', float('nan')):8.2f} "
                         f"{'':>9} {'':>13} {p['test_fidelity'].get('cosine', float('nan')):8.5f} "
                         f"{p['test_fidelity'].get('top1', float('nan')):9.4f} "
                         f"{p['test_fidelity'].get('class_cosine', float('nan')):12.5f}")
        for key in ("whitened", "plain"):
            w = r[key]
            err = w["mean_measured_layer_error"]
            lines.append(f"{'':10} {key + ' ratio=%g' % r['ratio']:22} "
                         f"{_arrow(w['params'], 1, ''):>24} {_arrow(w['macs'], 1e6, 'M'):>26} "
                         f"{w['fidelity'].get('cosine', float('nan')):8.5f} "
                         f"{w['fidelity'].get('sqnr', float('nan')):8.2f} "
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
    ap.add_argument("--test", type=int, default=16, help="fresh samples (seed 1) for the test cosine")
    ap.add_argument("--plain-fit", action="store_true", help="also run the budget with plain SVD")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    results = [bench(m, a.n, a.ratio, a.samples, a.positions, a.test, a.plain_fit) for m in a.models.split(",") if m]
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
