"""explain on real models quantized by onnxruntime: time against one quantize_static run, the top
culprits, and the held-out cosine of onnxruntime's model against the recipe's.

    python benchmarks/explain_bench.py [yolov8n ppocr_det] [--calib 32] [--heldout 16] [--per-channel]

For each model: onnxruntime's quantize_static (QDQ, MinMax, uint8 activations, int8 weights; per-tensor
unless --per-channel) on the calibration samples, timed; ``onnxshrink explain`` of it (timed, 16 samples,
--top 8) writing a recipe; the recipe replayed by ``onnxshrink optimize --recipe`` with ``--budget none``
(the fixes alone decide, no fidelity search); the cosine and the channel-balanced SQNR
(``explain.measure.balanced_nsr``: a detection head's class scores count as much as its boxes) of both
on held-out samples.
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
import yaml  # noqa: E402

from onnxshrink.cli import main  # noqa: E402
from onnxshrink.explain.measure import output_nsr  # noqa: E402
from onnxshrink.metrics import fidelity  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402


def ort_quantize(model, out, calib, per_channel) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t0


def cli(*argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def held_out(orig, model, held) -> dict:
    ref = make_session(onnx.load(str(orig)), optimize=False)
    sess = make_session(onnx.load(str(model)), optimize=True)
    r, o = [ref.run(None, s) for s in held], [sess.run(None, s) for s in held]
    f = fidelity(r, o)
    f["balanced_sqnr"] = -10 * np.log10(max(output_nsr(r, o), 1e-30))
    return f


def bench(name: str, n_calib: int, n_held: int, per_channel: bool) -> dict:
    from models.real import real_model, real_samples, write_samples
    path = real_model(name)
    samples = real_samples(name, n_calib + n_held, seed=0)
    calib, held = samples[:n_calib], samples[n_calib:]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cdir = write_samples(calib, d / "calib")
        cand = d / "ort.onnx"
        t_ort = ort_quantize(path, cand, calib, per_channel)
        t0 = time.perf_counter()
        rc = cli("explain", path, cand, "--calib", cdir, "--json", d / "ex.json", "--write-recipe", d / "r.yaml",
                 "--budget", "none", "-q")
        t_explain = time.perf_counter() - t0
        assert rc == 0, f"explain exit {rc}"
        res = json.loads((d / "ex.json").read_text())
        t0 = time.perf_counter()
        rc = cli("optimize", path, d / "fixed.onnx", "--recipe", d / "r.yaml", "-q")
        t_fix = time.perf_counter() - t0
        f_ort = held_out(path, cand, held)
        f_fix = held_out(path, d / "fixed.onnx", held) if rc == 0 else {}
        return {"model": name, "quantize_static_s": round(t_ort, 1), "explain_s": round(t_explain, 1),
                "recipe_replay_s": round(t_fix, 1), "replay_exit": rc,
                "top3": [(r["node"], round(r["share"], 3) if r["share"] is not None else None,
                          r["causes"][0]["cause"] if r["causes"] else "") for r in res["ranking"][:3]],
                "recipe": yaml.safe_load((d / "r.yaml").read_text()),
                "ort_cosine": [round(f_ort["cosine"], 5), round(f_ort["cosine_min"], 5)],
                "recipe_cosine": [round(f_fix.get("cosine", float("nan")), 5),
                                  round(f_fix.get("cosine_min", float("nan")), 5)],
                "ort_balanced_sqnr_db": round(f_ort["balanced_sqnr"], 2),
                "recipe_balanced_sqnr_db": round(f_fix.get("balanced_sqnr", float("nan")), 2)}


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["yolov8n", "ppocr_det"])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--per-channel", action="store_true")
    a = ap.parse_args(argv)
    for m in a.models:
        r = bench(m, a.calib, a.heldout, a.per_channel)
        print(json.dumps(r, default=str, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main_())
