"""What quantizing a model past 2 GB costs: wall time and peak RSS of onnxshrink beside onnxruntime's
``quantize_static`` and ``quantize_dynamic`` on the same model, each tool in its own process.

    PYTHONPATH=. python benchmarks/large_model_cost.py                 # 2 GiB, cleanup,quantize
    PYTHONPATH=. python benchmarks/large_model_cost.py --vocab 131072  # 1 GiB
    PYTHONPATH=. python benchmarks/large_model_cost.py --passes cleanup,svd,quantize

The model is ``tests/test_large.write_large_model`` (two embedding tables summed, a pooled low-rank
Gemm head; weights in an external data file), with 8 calibration samples of token ids. onnxshrink
runs the user's command line (``--budget "cosine>=0.99"``, on-disk cache off); onnxruntime's tools
write external data (``use_external_data_format``: their output passes 2 GB). Peak RSS is the
process's ``ru_maxrss`` (onnxruntime's C++ allocations included). The table gives each tool's time
and peak, the peak over the model's bytes, and onnxshrink's ratios to ``quantize_static``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_WORKER = r"""
import json, resource, sys, time
tool, model, calib, out, passes = sys.argv[1:6]
t = time.perf_counter()
if tool == "onnxshrink":
    from onnxshrink.cli import main
    try:
        main(["optimize", model, out, "--calib", calib, "--passes", passes, "--budget", "cosine>=0.99",
              "--no-cache", "-q"])
    except SystemExit as e:
        if e.code:
            raise
else:
    import glob
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    if tool == "ort_dynamic":
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, use_external_data_format=True)
    else:
        files = sorted(glob.glob(calib + "/*.npy"))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(files)

            def get_next(self):
                f = next(self.it, None)
                return None if f is None else {"ids": np.load(f)}

        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True)
print(json.dumps({"wall_s": time.perf_counter() - t,
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

TOOLS = ["ort_static", "ort_dynamic", "onnxshrink"]


def run(tool: str, model: Path, calib: Path, out_dir: Path, passes: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-c", _WORKER, tool, str(model), str(calib), str(out_dir / "model.onnx"),
                        passes], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262_144, help="rows of the two embedding tables together")
    ap.add_argument("--passes", default="cleanup,quantize", help="onnxshrink's passes")
    ap.add_argument("--tools", default=",".join(TOOLS))
    args = ap.parse_args(argv)
    from tests.test_large import _calib, write_large_model
    with tempfile.TemporaryDirectory(prefix="onnxshrink_large_") as d:
        d = Path(d)
        model = write_large_model(d / "in", vocab=args.vocab)
        calib = _calib(d / "cal", 8, args.vocab, 8)
        model_bytes = model.with_name("model.onnx.data").stat().st_size
        rows = {}
        for tool in args.tools.split(","):
            rows[tool] = run(tool, model, calib, d / tool, args.passes)
            for f in (d / tool).glob("*"):
                f.unlink()  # one output of 2 GB on disk at a time
    ref = rows.get("ort_static", {})
    print(f"model: {model_bytes / 2**30:.2f} GiB of weights; onnxshrink --passes {args.passes}")
    print(f"{'tool':12s} {'time s':>8s} {'peak GiB':>9s} {'x model':>8s} {'time vs static':>15s} "
          f"{'peak vs static':>15s}")
    for tool, r in rows.items():
        if "error" in r:
            print(f"{tool:12s} {r['error']}")
            continue
        vs = (f"{r['wall_s'] / ref['wall_s']:14.2f}x {r['peak_bytes'] / ref['peak_bytes']:14.2f}x"
              if "wall_s" in ref else "")
        peak = r["peak_bytes"]
        print(f"{tool:12s} {r['wall_s']:8.1f} {peak / 2**30:9.2f} {peak / model_bytes:7.2f}x {vs}")


if __name__ == "__main__":
    main()
