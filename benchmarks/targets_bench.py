"""Target emission on the real models: coverage per EP, the real QNN HTP check, fidelity.

    PYTHONPATH=. python benchmarks/targets_bench.py [--models yolov8n,ppocr_det] [--targets qnn,xnnpack,nnapi]
        [--quantizer onnxshrink|ort] [--calib 32] [--val 16] [--json out.json] [--htp-arch v73,v68]

The QNN HTP check (done-when of issue 16):

    ONNXSHRINK_QNN_SAMPLES=8 PYTHONPATH=. python benchmarks/targets_bench.py \
        --models yolov8n,ppocr_det,ppocr_cls,mobilenet_v3_small --targets qnn --htp-arch v73,v68 --calib 16 --val 16

``--htp-arch`` runs each qnn target once per HTP architecture (``-o target.htp_arch=...``); the row gives
the activation precision per region, the simulator's options, and the fidelity on HTP (mean, worst,
per sample). ``mobilenet_v3_small`` is ``models.build.mobilenet_v3_small`` (synthetic weights, BN
statistics and head from photo crops) fed ``models.build.demo_samples`` photo crops.

Calibration: random crops of scikit-image's photos (seed 0); validation (held out): the full
photos. ``--quantizer onnxshrink`` runs the project's ``quantize`` pass (with the target's
scheme from its profile); ``ort`` is a stand-in that runs onnxruntime's ``quantize_static``
(QNN: ``get_qnn_qdq_config``) with the same scheme, for use before the quantize pass exists.
Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnxshrink.passes.base import Pass, PassResult  # noqa: E402


class OrtQDQ(Pass):
    """Stand-in quantizer: onnxruntime's quantize_static in QDQ format with the target's scheme."""

    name = "ort_qdq"
    needs_data = True

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize, quantize_static

        prof = ctx.target
        model = ctx.to_model(graph)
        samples = [ctx.calib.get(i) for i in range(len(ctx.calib))]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(samples)

            def get_next(self):
                return next(self.it, None)

        qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16,
              "int16": QuantType.QInt16}
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
            onnx.save(model, src)
            if prof is not None and prof.name == "qnn":
                from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
                cfg = get_qnn_qdq_config(src, Reader(), activation_type=qt[prof.activation_dtype],
                                         weight_type=QuantType.QUInt8)
                quantize(src, dst, cfg)
            else:
                act = qt[prof.activation_dtype] if prof else QuantType.QUInt8
                wt = qt[prof.weight_dtype] if prof else QuantType.QInt8
                quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=act,
                                weight_type=wt, per_channel=bool(prof.per_channel) if prof else True,
                                extra_options={"WeightSymmetric": bool(prof.symmetric_weights) if prof else True,
                                               "ActivationSymmetric": (bool(prof.symmetric_activations) if prof
                                                                       else False)})
            q = onnx.load(dst)
        return PassResult(gs.import_onnx(q), True, {"quantizer": "onnxruntime quantize_static"})


def run_one(name: str, target: str, quantizer: str, n_calib: int, n_val: int, htp_arch: str | None = None) -> dict:
    """One model on one target (``qnn+channels_last`` style options allowed; ``htp_arch`` for qnn); every
    figure measured here. A run the target refuses (exit 4) is reported with ``exit_4`` and its report."""
    from onnxshrink.errors import BudgetError
    from onnxshrink.pipeline.manager import PassManager

    source, allp = _model_and_samples(name, 26 + n_calib)
    calib, val = allp[26:], allp[:n_val]
    passes = ["cleanup"] if _has_pass("cleanup") else []
    passes.append("quantize" if quantizer == "onnxshrink" else OrtQDQ())
    t0 = time.time()
    tgt = {"name": target, "htp_arch": htp_arch} if htp_arch else target
    pm = PassManager(passes, data=calib, val_data=val, target=tgt, seed=0)
    refused = None
    try:
        model, report = pm.run(source)
    except BudgetError as e:
        model, report, refused = None, e.report, str(e)
    tr = report.target_report or {}
    cov = tr.get("coverage", {})
    out = {"model": name, "target": target, "htp_arch": htp_arch, "quantizer": quantizer, "exit_4": refused,
           "wall_s": round(time.time() - t0, 1),
           "fidelity_cpu": {k: report.fidelity.get(k) for k in ("cosine", "cosine_min", "sqnr")},
           "passes": [(p.name, p.status, p.reason) for p in report.passes],
           "nodes": cov.get("nodes"), "taken": cov.get("taken"), "partitions": cov.get("partitions"),
           "accepted_static": cov.get("accepted"), "unsupported_ops": cov.get("unsupported_ops"),
           "reasons": cov.get("reasons"), "heavy_ops": cov.get("heavy_ops"),
           "usability_checker": cov.get("usability_checker"),
           "prepare": tr.get("prepare"), "emission": tr.get("emission"), "opset": tr.get("opset"),
           "float_nodes": cov.get("float_nodes"), "channels_last": tr.get("channels_last")}
    qst = next((p.stats or {} for p in report.passes if p.name == "quantize"), {})
    if qst:
        out["quantize"] = {"activations": (qst.get("scheme") or {}).get("activations"),
                           "activation_choice": qst.get("activation_choice"),
                           "kept_float": len(qst.get("kept_float") or []),
                           "quantized_units": qst.get("quantized_units"), "reason": qst.get("reason"),
                           "placement": qst.get("placement"), "wide_units": qst.get("wide_units")}
    regions = tr.get("precision_regions") or []
    out["precision_regions"] = [{k: r[k] for k in ("precision", "units", "weighted", "why")} for r in regions]
    out["precision_summary"] = {p: {"regions": sum(1 for r in regions if r["precision"] == p),
                                    "units": sum(r["units"] for r in regions if r["precision"] == p)}
                                for p in dict.fromkeys(r["precision"] for r in regions)}
    out["fidelity_cpu_text"] = _text_subset(model, val, report) if name == "ppocr_det" and model else None
    q = tr.get("qnn_htp")
    if q:
        out["qnn_htp"] = {k: q.get(k) for k in ("available", "accepted", "error", "nodes_on_cpu", "cpu_nodes",
                                                "session_s", "run_s_per_sample", "samples", "reason",
                                                "provider_options")}
        if q.get("fidelity"):
            out["qnn_htp"]["fidelity"] = {k: q["fidelity"].get(k) for k in ("cosine", "cosine_min", "sqnr")}
            ps = q.get("per_sample") or []
            out["qnn_htp"]["per_sample_cosine"] = [round(p["cosine"], 4) for p in ps]
            txt = [p["cosine"] for p in ps if p["ref_max"] > 0.5]
            if name == "ppocr_det" and txt:
                out["qnn_htp"]["cosine_text_photos"] = (sum(txt) / len(txt), len(txt))
    return out


def _model_and_samples(name: str, n: int):
    """The model (a path, or a ModelProto for the built ones) and ``n`` samples for it."""
    if name == "mobilenet_v3_small":
        from models.build import demo_samples, mobilenet_v3_small
        return mobilenet_v3_small(), [{"input": x} for x in demo_samples(n, seed=3, hw=64)]
    from models.real import real_model, real_samples
    return str(real_model(name)), real_samples(name, n, seed=0)


def _text_subset(model, val, report) -> dict:
    """PP-OCR det on photos: the fp32 probability map is ~1e-9 everywhere on photos without text,
    where a cosine only measures noise; score the photos whose fp32 map finds text (max > 0.5):
    cosine, and IoU of the text masks at the detector's threshold 0.3."""
    import numpy as np

    from models.real import real_model
    from onnxshrink.runtime import make_session
    from onnxshrink.targets.layout import ChannelsLastIO
    ref = make_session(str(real_model("ppocr_det")), optimize=False)
    io = ChannelsLastIO(report.target_report.get("channels_last"))  # NHWC I/O when the target asked for it
    cos, iou = [], []
    for s, got in zip(val, io.run(model, val, optimize=True)):
        b = ref.run(None, s)[0]
        if b.max() <= 0.5:
            continue
        a = got[0]
        cos.append(float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        A, B = a > 0.3, b > 0.3
        iou.append(float((A & B).sum() / max((A | B).sum(), 1)))
    return {"photos_with_text": len(cos), "cosine": float(np.mean(cos)) if cos else None,
            "mask_iou@0.3": float(np.mean(iou)) if iou else None}


def _has_pass(n):
    from onnxshrink.passes.registry import registry
    return n in registry()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n,ppocr_det")
    ap.add_argument("--targets", default="qnn,xnnpack,nnapi,cpu")
    ap.add_argument("--quantizer", default="onnxshrink" if _has_pass("quantize") else "ort",
                    choices=["onnxshrink", "ort"])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--htp-arch", default="", help="qnn targets: HTP architectures to run, e.g. v73,v68")
    a = ap.parse_args()
    rows = []
    for m in a.models.split(","):
        for t in a.targets.split(","):
            archs = a.htp_arch.split(",") if a.htp_arch and t.split("+")[0] == "qnn" else [None]
            for arch in archs:
                try:
                    r = run_one(m, t, a.quantizer, a.calib, a.val, arch)
                except Exception as e:  # report, keep going
                    r = {"model": m, "target": t, "htp_arch": arch, "error": f"{type(e).__name__}: {e}"}
                rows.append(r)
                print(json.dumps(r, default=str), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
