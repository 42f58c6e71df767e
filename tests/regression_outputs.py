"""Byte-identity regression: every pass and the allocated pipeline on the bundled models.

    python tests/regression_outputs.py            # compare with tests/data/regression_hashes.json
    python tests/regression_outputs.py --write    # record the current outputs as the reference

Each case runs the Python API on a bundled model (models/build.py, the demo CNN) with fixed
samples and seed, and hashes the serialized output model. Timing-based choices are switched off
(quantize's speed guard, prune's latency report, the allocation closure's timing, the speed
contract) so that a hash changes only when a rewrite changes. A refactoring must leave every hash
as it is; a deliberate behaviour change rewrites the file with ``--write`` in the same commit and
says why.

The bytes also depend on onnxruntime's numerics, which the CPU's instruction set picks (its float
GEMM and convolution kernels on AVX2 or AVX-512, its int8 kernels with or without VNNI: calibration
ranges, importance scores and the guard's fidelity all come from onnxruntime runs), so the hashes
are recorded per machine kind (``machine()``: the onnxruntime version and the CPU's kernel-selecting
features). On a kind with no record the test skips and says so; ``--write`` records this kind's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HASHES = ROOT / "tests" / "data" / "regression_hashes.json"
sys.path.insert(0, str(ROOT))

NO_TIMING = {"quantize": {"guard": False}, "prune": {"latency": False}}


def _closure_never_faster(model_a, model_b, feeds) -> dict:
    """The allocation closure's timing (``allocate.speed_verdict``) switched off: "not faster", the
    tie's deterministic choice."""
    return {"speedup": 1.0, "interval": [1.0, 1.0], "ms": [0.0, 0.0], "rounds": 0, "faster": False}


def _samples(model, n: int = 16, seed: int = 0) -> list[dict]:
    from onnxshrink.data import input_specs
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    out = []
    for _ in range(n):
        out.append({s.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape])
                    .astype(s.dtype) for s in specs})
    return out


def _models() -> dict:
    import onnx

    from models import build
    demo = onnx.load(str(ROOT / "models" / "demo" / "demo_cnn.onnx"))
    demo_data = [{"input": np.load(p)} for p in sorted((ROOT / "models" / "demo" / "calib").glob("*.npy"))]
    return {
        "demo": (demo, demo_data),
        "resnet": (build.resnet_small(), None),
        "mobilenet_pt": (build.mobilenet_small(pytorch_style=True), None),
        "transformer": (build.transformer_block(), None),
        "mlp": (build.mlp(), None),
    }


CASES = [  # (name, passes, extra PassManager arguments)
    ("cleanup", ["cleanup"], {}),
    ("prune_zeros", ["cleanup", "prune"], {}),
    ("prune_importance", ["cleanup", {"prune": {"mode": "importance", "ratio": 0.3}}], {"budget": "cosine>=0.9"}),
    ("sparsify", ["cleanup", {"sparsify": {"method": "sparsity", "sparsity": 0.5}}], {}),
    ("svd", ["cleanup", {"svd": {"energy": 0.95}}], {}),
    ("fold", ["cleanup", "fold"], {}),
    ("equalize", ["cleanup", "equalize"], {}),
    ("share", ["cleanup", {"share": {"bits": 4}}], {}),
    ("fp16", ["cleanup", "fp16"], {}),
    ("quantize", ["cleanup", "quantize"], {}),
    ("quantize_budget", ["cleanup", "quantize"], {"budget": "cosine>=0.995"}),
    ("quantize_xnnpack", ["cleanup", "quantize"], {"target": "xnnpack"}),
    ("quantize_qnn_a16", ["cleanup", {"quantize": {"activation_dtype": "uint16"}}], {"target": "qnn"}),
    ("allocate_size", ["cleanup", "prune", "svd"], {"budget": "cosine>=0.95", "target_size": 0.8,
                                                    "executor": "serial", "cache": False}),
    ("allocate_quantize", ["cleanup", "prune", "svd", "quantize"], {"budget": "cosine>=0.98", "target_size": 0.3,
                                                                    "executor": "serial", "cache": False}),
]
MODEL_CASES = {  # which models each case runs on (the transformer and mlp have no convs to prune)
    "demo": [c[0] for c in CASES],
    "resnet": ["cleanup", "prune_zeros", "prune_importance", "svd", "quantize", "allocate_size", "allocate_quantize"],
    "mobilenet_pt": ["cleanup", "prune_importance", "equalize", "quantize", "share"],
    "transformer": ["cleanup", "svd", "fold", "quantize", "fp16", "sparsify"],
    "mlp": ["cleanup", "svd", "fold", "quantize", "share", "allocate_size"],
}


# the CPU features that pick onnxruntime's (MLAS) kernels on x86-64, in the order they are listed
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> str:
    """The machine kind the hashes are recorded for: the onnxruntime version and the CPU features that
    select its kernels (``KERNEL_FEATURES`` from /proc/cpuinfo on x86-64; the architecture alone
    elsewhere), e.g. "onnxruntime 1.32.0, x86_64 avx2 fma avx512f avx512_vnni"."""
    import onnxruntime as ort
    arch = platform.machine()
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return " ".join([f"onnxruntime {ort.__version__}, {arch}", *(f for f in KERNEL_FEATURES if f in flags)])


def recorded_hashes() -> dict | None:
    """The hashes recorded for this machine kind (``machine()``), None when there are none."""
    return json.loads(HASHES.read_text()).get(machine())


def _with_no_timing(passes: list) -> list:
    out = []
    for p in passes:
        name, opts = (p, {}) if isinstance(p, str) else next(iter(p.items()))
        out.append({name: {**NO_TIMING.get(name, {}), **opts}})
    return out


def run_case(model, data, passes, extra) -> str:
    import onnxshrink
    from onnxshrink.errors import BudgetError
    data = data if data is not None else _samples(model)
    try:
        result, _ = onnxshrink.optimize(model, None, passes=_with_no_timing(passes), data=data, seed=0, speed="off",
                                        **extra)
    except BudgetError as e:
        return "budget-error:" + str(e).splitlines()[0][:80]
    return hashlib.sha256(result.SerializeToString(deterministic=True)).hexdigest()[:16]


def run_all(only: list[str] | None = None) -> dict:
    import onnxshrink.pipeline.allocate as allocate
    timed, allocate.speed_verdict = allocate.speed_verdict, _closure_never_faster
    try:
        return _run_cases(only)
    finally:  # the test suite runs other tests in this process
        allocate.speed_verdict = timed


def _run_cases(only: list[str] | None) -> dict:
    models = _models()
    cases = {c[0]: c for c in CASES}
    out = {}
    for mname, names in MODEL_CASES.items():
        model, data = models[mname]
        for cname in names:
            key = f"{mname}/{cname}"
            if only and key not in only:
                continue
            _, passes, extra = cases[cname]
            out[key] = run_case(model, data, passes, extra)
            print(f"{key:32s} {out[key]}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the outputs as the reference")
    ap.add_argument("cases", nargs="*", help="model/case keys (default: all)")
    args = ap.parse_args(argv)
    got = run_all(args.cases or None)
    kind = machine()
    if args.write:
        recorded = json.loads(HASHES.read_text()) if HASHES.exists() else {}
        recorded.setdefault(kind, {}).update(got)
        HASHES.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return 0
    want = recorded_hashes()
    if want is None:
        print(f"no hashes recorded for {kind}: --write records them")
        return 1
    bad = [k for k in got if want.get(k) != got[k]]
    for k in bad:
        print(f"CHANGED {k}: {want.get(k)} -> {got[k]}")
    print(f"{len(got) - len(bad)} identical, {len(bad)} changed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
