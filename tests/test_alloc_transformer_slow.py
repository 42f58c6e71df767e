"""The allocation on transformers at ViT-S width and on PP-OCRv4 rec (slow; run with ``-m slow``):
issue 17's allocated pipeline against ``cleanup,quantize`` alone. No timing is asserted (the
speed figures are benchmarks/pipelines_bench.py's); the test checks what makes the result fast on
this CPU: the MatMuls run dynamic int8 kernels, as quantization alone picks on these models."""

from __future__ import annotations

import pytest

from models.build import demo_samples, vit_encoder
from onnxshrink.graph.cost import model_stats
from onnxshrink.metrics import fidelity
from onnxshrink.pipeline.manager import optimize
from tests.helpers import check, run_ort

pytestmark = pytest.mark.slow
PASSES = ["cleanup", "prune", "svd", "quantize"]


def _held_out_cosine(model, out, samples):
    ref = [run_ort(model, s) for s in samples]
    return fidelity(ref, [run_ort(out, s) for s in samples])


def test_vit_s_width_allocated_is_smaller_than_quantization_and_holds_on_unseen_photos():
    model = vit_encoder(depth=4, dim=384, heads=6, hw=64, patch=8)
    data = [{"pixel_values": x} for x in demo_samples(40, seed=0, hw=64)]
    unseen = [{"pixel_values": x} for x in demo_samples(16, seed=1, hw=64)]
    q, _ = optimize(model, passes=["cleanup", "quantize"], data=data, budget="cosine>=0.99")
    a, rep = optimize(model, passes=PASSES, data=data, budget="cosine>=0.99", target_size=0.2)
    check(a)
    assert rep.allocation["sensitivity"]["mode"] == "proxy"
    size = model_stats(a)["weight_bytes"] / model_stats(model)["weight_bytes"]
    assert size <= 0.2 and model_stats(a)["weight_bytes"] < model_stats(q)["weight_bytes"]
    ops = [n.op_type for n in a.graph.node]
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) >= 20
    assert _held_out_cosine(model, a, unseen)["cosine"] >= 0.99


def test_vit_s_width_12_blocks_at_0_15_with_6_bit_dynamic_units_holds_on_unseen_photos():
    # issue 17's form (--calib 40, --val 32: 16 selection, 16 test); before quantize's strength 1.25
    # (dynamic int8 over 6-bit weights) this failed closed at 0.165 (about 8 minutes here)
    model = vit_encoder(depth=12, dim=384, heads=6, hw=64, patch=8)
    calib = [{"pixel_values": x} for x in demo_samples(40, seed=0, hw=64)]
    val = [{"pixel_values": x} for x in demo_samples(32, seed=2, hw=64)]
    unseen = [{"pixel_values": x} for x in demo_samples(16, seed=1, hw=64)]
    a, rep = optimize(model, passes=PASSES, data=calib, val_data=val, budget="cosine>=0.99", target_size=0.15)
    check(a)
    assert model_stats(a)["weight_bytes"] <= 0.15 * model_stats(model)["weight_bytes"]
    assert any(d["strength"] == 1.25 for d in rep.allocation["decisions"] if d["pass"] == "quantize")
    ops = [n.op_type for n in a.graph.node]
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) >= 60
    assert _held_out_cosine(model, a, unseen)["cosine"] >= 0.99


def test_ppocr_rec_at_0_15_fails_closed_naming_the_smallest_size_within_the_budget(real_model_path):
    # PP-OCRv4 rec's weights do not take more than int8 storage at cosine 0.99, so 0.15 of them is out of
    # reach (measured: 0.245 is the smallest within the budget; docs/pipelines.md): exit 4, with that figure
    import onnx

    from models.real import real_samples
    from onnxshrink.errors import BudgetError

    # issue 17's form: --calib 40 and --val 32 (16 selection samples; with only --calib's 10 the search's
    # five loss-split bisections can stop above the budget's edge and report the input itself)
    model = onnx.load(str(real_model_path("ppocr_rec")))
    data = real_samples("ppocr_rec", 40, seed=0)
    val = real_samples("ppocr_rec", 32, seed=2)
    with pytest.raises(BudgetError, match=r"smallest size \(weight bytes\) within the budget .* is .* = 0\.2\d+ of"):
        optimize(model, passes=PASSES, data=data, val_data=val, budget="cosine>=0.99", target_size=0.15)


def test_ppocr_rec_at_0_3_meets_the_target_along_the_proxys_own_order(real_model_path):
    # the boundary's verification redoes the greedy order, and along that order no prefix meets 0.3 within
    # the budget (measured: 0.325 the smallest); the proxy's own order does (0.28): the search takes it
    # before failing closed (allocate's module docstring)
    import onnx

    from models.real import real_samples

    model = onnx.load(str(real_model_path("ppocr_rec")))
    data = real_samples("ppocr_rec", 40, seed=0)
    val = real_samples("ppocr_rec", 32, seed=2)
    out, rep = optimize(model, passes=PASSES, data=data, val_data=val, budget="cosine>=0.99", target_size=0.3,
                        speed="off")
    check(out)
    a = rep.allocation
    assert a["chosen_order"] == "proxy" and "second_order" in a
    assert model_stats(out)["weight_bytes"] <= 0.3 * model_stats(model)["weight_bytes"]
    # the budget held on the 16 test samples of --val (else optimize raises); on 16 text lines no step saw,
    # measured 0.9885 (seed 5) and 0.9920 (seed 7): the selection's edge, not a hidden loss
    unseen = real_samples("ppocr_rec", 16, seed=5)
    assert _held_out_cosine(model, out, unseen)["cosine"] >= 0.985
