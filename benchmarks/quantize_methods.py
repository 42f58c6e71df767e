"""Each data-aware method of the quantize pass against plain rounding, on real models.

    python benchmarks/quantize_methods.py                                  # 4 models x the variants below
    python benchmarks/quantize_methods.py --models ppocr_rec --variants '{}' '{"rounding":"gptq"}'

Same samples as ``quantize_bench.py`` (``real_samples(name, 56, seed=0)``: the first 32 calibrate,
the next 24 are held out). The model is ``cleanup``-ed once, then ``quantize`` runs with the guard
*off* (no mixed precision, no speed search), so the variants differ only by the method; fidelity is
the held-out cosine (per sample, the worst output's; mean and min) against fp32 with onnxruntime's
optimizations on, as the benchmark measures it, and the largest absolute output difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

VARIANTS = ['{}', '{"rounding": "gptq"}', '{"equalize": true}', '{"bias_correction": true}',
            '{"elementwise": false}', '{"elementwise": false, "rounding": "gptq"}',
            '{"elementwise": false, "equalize": true}']


def run(name: str, variants: list[str], n_calib: int = 32, n_held: int = 24) -> list[dict]:
    from models.real import real_model, real_samples
    from onnxshrink.metrics import compare_outputs
    from onnxshrink.pipeline.manager import optimize
    from onnxshrink.runtime import make_session
    samples = real_samples(name, n_calib + n_held, seed=0)
    calib, held = samples[:n_calib], samples[n_calib:]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        clean = Path(d) / "clean.onnx"
        optimize(str(real_model(name)), str(clean), passes=["cleanup"], data=calib[:4])
        ref_s = make_session(onnx.load(str(real_model(name))), optimize=True, threads=1)
        ref = [ref_s.run(None, s) for s in held]
        for spec in variants:
            opts = {"guard": False, **json.loads(spec)}
            t = time.perf_counter()
            m, rep = optimize(str(clean), passes=[{"quantize": opts}], data=calib, val_data=calib[:8],
                              budget="none")  # the methods' own error, no verdict
            wall = time.perf_counter() - t
            st = rep.passes[-1].stats
            s = make_session(m, optimize=True, threads=1)
            outs = [s.run(None, x) for x in held]
            cos = [compare_outputs(r, o)["cosine"] for r, o in zip(ref, outs)]
            # cosine saturates on a 2-class softmax (PP-OCR cls): the largest output change says more
            diff = max(float(np.max(np.abs(a - b))) for r, o in zip(ref, outs) for a, b in zip(r, o))
            row = {"model": name, "options": spec, "cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
                   "max_abs_diff": diff, "wall_s": wall}
            if "rounding" in st:
                row["layer_error_vs_nearest"] = st["rounding"]["output_error_vs_nearest"]["median"]
            if "equalize" in st:
                row["equalized_pairs"] = st["equalize"]["pairs"]
            rows.append(row)
            extra = " ".join(f"{k}={row[k]}" for k in ("layer_error_vs_nearest", "equalized_pairs") if k in row)
            print(f"{name:10} {spec:45} cos mean {row['cos_mean']:.5f} min {row['cos_min']:.5f} "
                  f"max|d| {diff:.4g} "
                  f"{wall:6.1f}s {extra}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ppocr_cls,ppocr_det,ppocr_rec,yolov8n")
    ap.add_argument("--variants", nargs="*", default=VARIANTS, help="JSON options of the quantize pass")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        rows.extend(run(name, a.variants))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
