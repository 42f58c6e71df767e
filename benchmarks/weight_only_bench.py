"""Weight-only int4/int8 (``quantize.weights_only``) on ``models/build.py``'s transformer_block.

    python benchmarks/weight_only_bench.py
    python benchmarks/weight_only_bench.py '{"weights_only": "int4", "block_size": 32}'

16 random calibration inputs, 24 held out (seed 0); fidelity against fp32 (cosine mean and min over
the held-out inputs), file size against fp32, one-thread latency (median of 300 runs) against fp32.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

VARIANTS = ['{"weights_only": "int4"}', '{"weights_only": "int4", "block_size": 128}',
            '{"weights_only": "int4", "accuracy_level": 4}', '{"weights_only": "int4", "symmetric": true}',
            '{"weights_only": "int8"}', '{"guard": false}']


def main(argv=None):
    from models.build import transformer_block
    from onnxshrink.metrics import compare_outputs
    from onnxshrink.pipeline.manager import optimize
    from onnxshrink.runtime import make_session, measure_latency
    variants = (argv if argv is not None else sys.argv[1:]) or VARIANTS
    m = transformer_block()
    r = np.random.default_rng(0)
    data = [{"x": r.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(40)]
    calib, held = data[:16], data[16:]
    ref_s = make_session(m, optimize=True, threads=1)
    ref = [ref_s.run(None, s) for s in held]
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(m, src)
        base = measure_latency(m, held[0], runs=300)
        print(f"fp32: {os.path.getsize(src)} bytes, {base:.3f} ms")
        for spec in variants:
            out, rep = optimize(src, dst, passes=[{"quantize": json.loads(spec)}], data=calib,
                                budget="none")  # measured below on held-out samples
            st = rep.passes[0].stats
            s = make_session(out, optimize=True, threads=1)
            cos = [compare_outputs(a, s.run(None, x))["cosine"] for a, x in zip(ref, held)]
            ms = measure_latency(out, held[0], runs=300)
            print(f"{spec:50} {rep.passes[0].status:8} size {os.path.getsize(dst) / os.path.getsize(src):.3f}  "
                  f"cos {np.mean(cos):.5f} / {np.min(cos):.5f}  speed {base / ms:.2f}x  block {st.get('block_size')}",
                  flush=True)


if __name__ == "__main__":
    main()
