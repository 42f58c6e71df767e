"""Side by side: fp32, onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel and per-tensor) and
onnxshrink ``cleanup,quantize`` on real models, same calibration and held-out samples.

    python benchmarks/quantize_bench.py                      # all four models, 32 calib / 24 held-out
    python benchmarks/quantize_bench.py --models ppocr_cls --calib 8 --heldout 8 --rounds 10
    python benchmarks/quantize_bench.py --models vit_s,ppocr_rec --tools ort_dyn,ort_pc,shrink   # transformers

``crnn`` is ``models.build.crnn_small`` (conv + bidirectional LSTM) fed rendered text lines.
``vit_s`` is not a downloaded model: ``models.build.vit_encoder`` at ViT-S width (384 wide, 6 heads,
MLP 1536, 4 blocks, 64x64 photos in 8x8 patches: 65 tokens), exported PyTorch-style, fed photos.
Tools: ``ort_pc`` / ``ort_pt`` onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel / per-tensor;
``ort_pt_checked``: then its output checked as onnxshrink checks its own, ``check_like_onnxshrink``),
``ort_dyn`` onnxruntime ``quantize_dynamic`` (int8 weights, activations at run time), ``shrink``
onnxshrink ``cleanup,quantize`` (at ``--budget none``: the pass alone, as the tools run).

Each tool runs in its own subprocess, so its wall time and peak memory (VmHWM of that process,
which counts onnxruntime's C++ allocations) are measured alike. Speed: one intra-op thread, the
variants' runs interleaved round by round on held-out samples, medians. Fidelity: cosine of each
held-out sample's worst output against fp32 (mean and min over samples).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODELS = ["ppocr_cls", "ppocr_det", "ppocr_rec", "yolov8n"]


# ---------------------------------------------------------------------- tool workers (subprocess)


def worker(tool: str, model: str, calib_dir: str, out: str, options: str) -> dict:
    import onnx
    t0 = time.perf_counter()
    info = {}
    if tool.startswith("ort"):
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        files = sorted(f for f in Path(calib_dir).glob("*.np[yz]") if f.stem != "labels")
        m = onnx.load(model, load_external_data=False)
        inits = {t.name for t in m.graph.initializer}
        in_name = next(i.name for i in m.graph.input if i.name not in inits)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(files)

            def get_next(self):
                f = next(self.it, None)
                if f is not None and f.suffix == ".npz":   # a multi-input sample
                    with np.load(f) as z:
                        return dict(z)
                return None if f is None else {in_name: np.load(f)}

        if tool == "ort_dyn":
            from onnxruntime.quantization import quantize_dynamic
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        else:
            quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=(tool == "ort_pc"),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        if tool.endswith("_checked"):
            reader = Reader()
            info["check"] = check_like_onnxshrink(model, out, [reader.get_next() for _ in files])
    elif tool == "shrink_cli":
        # the user's command line, at the budget the user gives (``options``: the budget; empty = default)
        from onnxshrink.cli import main as cli_main
        argv = ["optimize", model, out, "--passes", "cleanup,quantize", "--calib", calib_dir, "--no-cache", "--quiet"]
        if options:
            argv += ["--budget", options]
        try:
            cli_main(argv)
        except SystemExit as e:
            if e.code:
                raise
        info["passes"] = ["cleanup", "quantize"]
    else:
        from onnxshrink.passes.registry import registry
        from onnxshrink.pipeline.manager import optimize

        passes = ["cleanup", "quantize"] if "cleanup" in registry() else ["quantize"]
        opts = json.loads(options) if options else {}
        spec = [p if p != "quantize" else {"quantize": opts} for p in passes]
        # the manager checks each pass on 8 of the calibration samples (the held-out ones are the
        # benchmark's alone); the pass calibrates on all of them
        from onnxshrink.data import DirectorySource, Subset, input_specs
        src = DirectorySource(calib_dir, input_specs(onnx.load(model, load_external_data=False)))
        val = Subset(src, list(range(min(8, len(src)))), "8 calibration samples")
        # --budget none: quantize alone at its guard's floor, as onnxruntime's tool runs (no verdict)
        _, rep = optimize(model, out, passes=spec, data=src, val_data=val, budget="none")
        rec = rep.passes[-1]
        info = {"passes": passes, "status": rec.status, "reason": rec.reason,
                "units": rec.stats.get("quantized_units"), "opset": rec.stats.get("opset"),
                "scheme": rec.stats.get("scheme")}
    info["wall_s"] = time.perf_counter() - t0
    info["peak_rss_mb"] = _peak_rss_mb()
    return info


def check_like_onnxshrink(model: str, out: str, samples: list) -> dict:
    """What a user runs to check a quantizer's output the way onnxshrink checks its own result, with
    onnxshrink's own functions: the input's outputs (unoptimized, onnxshrink's reference) and the
    output's (optimized, as the user runs it) on the 16 samples onnxshrink would hold out of 32 for
    selection and test (of every four the 2nd and the 4th), their fidelity, and the output timed
    against the input on one of them (``runtime.compare_speed`` deciding "slower", the speed
    contract's rule). onnxshrink checks more than this (each pass's validation, its placement search,
    the stored weights), so this is a floor of what its checks cost, not their equal."""
    from onnxshrink.metrics import fidelity
    from onnxshrink.runtime import compare_speed, make_session

    held = [s for k, s in enumerate(samples) if k % 4 in (1, 3)]
    sess_in = make_session(model, optimize=False, low_memory=True)
    reference = [sess_in.run(None, s) for s in held]
    del sess_in
    sess_out = make_session(out, optimize=True, low_memory=True)
    outputs = [sess_out.run(None, s) for s in held]
    del sess_out
    cmp = compare_speed(model, out, held[0], decides=(("slower", 1.0),))
    return {"cosine": round(fidelity(reference, outputs).get("cosine", 0.0), 5), "speed": round(cmp.speedup, 3),
            "rounds": cmp.rounds}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image, so it starts afresh
    at exec; ru_maxrss would carry the parent's peak over (the benchmark's own sessions)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@functools.cache
def _bytecode() -> None:
    """Byte-compile the package in place (its ``__pycache__``, which git ignores) before a tool is timed,
    as pip does when it installs a wheel: onnxruntime's and onnx's modules come with their bytecode, and
    on a machine that sets PYTHONDONTWRITEBYTECODE an editable checkout would compile its ~140 modules
    from source in every run (0.2 s of each onnxshrink run here), which no installed user pays. Once per
    benchmark process."""
    import compileall
    compileall.compile_dir(str(ROOT / "onnxshrink"), quiet=1)


def run_tool(tool, model, calib_dir, out, options="") -> dict:
    _bytecode()
    cmd = [sys.executable, __file__, "--worker", tool, str(model), str(calib_dir), str(out), options]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- measurements
def _session(path, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def valid(path) -> str:
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
        _session(path)
        return "yes"
    except Exception as e:
        return "NO: " + str(e).strip().splitlines()[0][:80]


def measure(variants: dict, heldout: list, rounds: int) -> dict:
    from onnxshrink.metrics import compare_outputs
    sess = {k: _session(p) for k, p in variants.items()}
    ref = [sess["fp32"].run(None, s) for s in heldout]
    res = {}
    for k, s in sess.items():
        cos = [compare_outputs(r, s.run(None, x))["cosine"] for r, x in zip(ref, heldout)]
        res[k] = {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos))}
    times = {k: [] for k in sess}
    for k, s in sess.items():  # warm-up
        s.run(None, heldout[0])
    for r in range(rounds):
        x = heldout[r % len(heldout)]
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, x)
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"])
    for k in sess:
        res[k]["ms"] = statistics.median(times[k]) * 1e3
        res[k]["speed"] = base / statistics.median(times[k])
    return res


def op_counts(path) -> dict:
    """Integer kernels in onnxruntime's optimized graph (the test of placement)."""
    import collections

    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        c = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    q = {k: v for k, v in c.items() if k.startswith("QLinear") or k in ("QGemm", "MatMulIntegerToFloat",
                                                                          "DynamicQuantizeMatMul", "MatMulInteger")}
    return {"integer": sum(q.values()), "Q": c.get("QuantizeLinear", 0), "DQ": c.get("DequantizeLinear", 0),
            "float_conv": c.get("Conv", 0) + c.get("FusedConv", 0)}


def _built_model(name: str, folder: Path, n: int) -> tuple[Path, list[dict]]:
    """A model built by models/build.py (``vit_s``) saved in ``folder``, and ``n`` photo samples."""
    import onnx

    from models.build import crnn_small, demo_samples, vit_encoder
    from models.real import preprocess, text_lines
    if name == "vit_s":
        model = vit_encoder(depth=4, dim=384, heads=6, hw=64, patch=8)
        xs = demo_samples(n, seed=0, hw=64)
    elif name == "crnn":
        model = crnn_small()
        xs = preprocess(text_lines(n, (32, 320), seed=0), "crnn")
    else:
        raise SystemExit(f"unknown model {name}")
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, [{model.graph.input[0].name: x} for x in xs]


def bench_model(name, n_calib, n_held, rounds, options, tools) -> list[dict]:
    from models.real import real_model, real_samples, write_samples
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if name in MODELS:
            path, samples = real_model(name), real_samples(name, n_calib + n_held, seed=0)
        else:
            path, samples = _built_model(name, d, n_calib + n_held)
        calib, held = samples[:n_calib], samples[n_calib:]
        cdir = write_samples(calib, d / "calib")
        variants = {"fp32": path}
        infos = {"fp32": {}}
        labels = {"ort_pc": "ORT per-channel", "ort_pt": "ORT per-tensor", "ort_dyn": "ORT dynamic",
                  "shrink": "onnxshrink"}
        for tool in tools:
            out = d / f"{tool}.onnx"
            info = run_tool(tool, path, cdir, out, options)
            infos[tool] = info
            if "error" not in info and out.exists():
                variants[tool] = out
        ok = {k: p for k, p in variants.items() if k == "fp32" or valid(p) == "yes"}
        meas = measure(ok, held, rounds)
        size0 = Path(path).stat().st_size
        for k in ["fp32"] + list(tools):
            info = infos.get(k, {})
            row = {"model": name, "variant": "fp32" if k == "fp32" else labels[k]}
            if k != "fp32" and k not in variants:
                row.update(valid="NO: " + info.get("error", "failed"))
                rows.append(row)
                continue
            row["valid"] = "yes" if k == "fp32" else valid(variants[k])
            row["size"] = Path(variants[k]).stat().st_size / size0
            if k in meas:
                row.update(meas[k])
                if k != "fp32":
                    row.update(op_counts(variants[k]))
            row["wall_s"] = info.get("wall_s")
            row["peak_rss_mb"] = info.get("peak_rss_mb")
            if k == "shrink":
                row["note"] = info.get("opset") or ""
            rows.append(row)
    return rows


def print_table(rows):
    hdr = f"{'model':10} {'variant':16} {'valid':6} {'size':>5} {'speed':>6} {'ms':>7} {'cos mean':>8} " \
          f"{'cos min':>8} {'int ops':>7} {'tool s':>7} {'tool MB':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        def f(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['model']:10} {r['variant']:16} {str(r.get('valid'))[:6]:6} {f('size', '5.2f')} "
              f"{f('speed', '5.2f')}x "
              f"{f('ms', '7.1f')} {f('cos_mean', '8.4f')} {f('cos_min', '8.4f')} {f('integer', '7d')} "
              f"{f('wall_s', '7.1f')} {f('peak_rss_mb', '7.0f')}")
        if str(r.get("valid", "")).startswith("NO"):
            print(f"{'':28}{r['valid']}")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--tools", default="ort_pc,ort_pt,shrink")
    ap.add_argument("--options", default="", help="JSON options of the quantize pass")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    from onnxshrink.passes.registry import registry
    if "cleanup" not in registry():
        print("note: the cleanup pass is not on this branch yet: onnxshrink runs 'quantize' alone (it folds "
              "Constant nodes, constant subgraphs and Conv+BN/Add itself)")
    rows = []
    for name in a.models.split(","):
        r = bench_model(name, a.calib, a.heldout, a.rounds, a.options, a.tools.split(","))
        print_table(r)
        print()
        rows.extend(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
