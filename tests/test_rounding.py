"""GPTQ-style rounding (onnxshrink/passes/rounding.py) and the quantize pass's ``rounding`` option."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import check, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh
from test_quantize import quantize, samples, small_net

from onnxshrink.graph.patches import ConvGeometry, conv_patches
from onnxshrink.passes.quantize.rounding import gptq_round, output_error

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("attrs,wshape", [
    ({"pads": [1, 1, 1, 1]}, (4, 6, 3, 3)),
    ({"pads": [0, 1, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, (5, 6, 3, 3)),
    ({"pads": [1, 1, 1, 1], "group": 6}, (6, 1, 3, 3)),
    ({"group": 2, "strides": [2, 2]}, (4, 3, 2, 2)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 6, 3, 3)),
])
def test_conv_patches_reproduce_the_convolution(attrs, wshape):
    x = RNG.standard_normal((2, 6, 9, 8)).astype(np.float32)
    W = RNG.standard_normal(wshape).astype(np.float32)
    node = oh.make_node("Conv", ["x", "w"], ["y"], **attrs)
    g = oh.make_graph([node], "c", [oh.make_tensor_value_info("x", TP.FLOAT, list(x.shape))],
                      [oh.make_tensor_value_info("y", TP.FLOAT, None)], [onnx.numpy_helper.from_array(W, "w")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    y = run_ort(m, {"x": x})[0]                                    # [N, Cout, Ho, Wo]
    P = conv_patches(x, ConvGeometry.from_attrs(attrs, wshape[2:]))  # [N*Ho*Wo, g, D]
    grp = attrs.get("group", 1)
    Wg = W.reshape(grp, wshape[0] // grp, -1)                      # [g, R, D]
    out = np.einsum("pgd,grd->pgr", P, Wg).reshape(P.shape[0], -1)  # [P, Cout]
    ref = y.transpose(0, 2, 3, 1).reshape(-1, wshape[0])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_gptq_lowers_the_output_error_on_the_same_grid():
    D, R, n = 96, 16, 3000
    A = RNG.standard_normal((D, D)) * 0.4 + np.eye(D)
    X = RNG.standard_normal((n, D)) @ A                           # correlated inputs
    W = RNG.standard_normal((2, R, D))
    H = np.stack([X.T @ X, X.T @ X])
    s = np.abs(W).max(axis=2) / 127
    Q = gptq_round(W, H, s, 127)
    assert Q.dtype == np.int8 and Q.shape == W.shape and np.abs(Q).max() <= 127
    Q0 = np.clip(np.round(W / s[:, :, None]), -127, 127)
    e0 = output_error(W, Q0 * s[:, :, None], H)
    e1 = output_error(W, Q * s[:, :, None], H)
    assert e1 < 0.7 * e0
    # held-out inputs from the same distribution: the gain is not an overfit of the calibration rows
    Xh = RNG.standard_normal((n, D)) @ A
    Hh = np.stack([Xh.T @ Xh, Xh.T @ Xh])
    assert output_error(W, Q * s[:, :, None], Hh) < 0.8 * output_error(W, Q0 * s[:, :, None], Hh)


def test_gptq_dead_inputs_get_zero_weight():
    D = 8
    X = RNG.standard_normal((200, D))
    X[:, 3] = 0.0
    W = RNG.standard_normal((1, 4, D))
    s = np.abs(W).max(axis=2) / 127
    Q = gptq_round(W, (X.T @ X)[None], s, 127)
    assert np.all(Q[0, :, 3] == 0)


def test_quantize_with_gptq_rounding_keeps_scales_and_lowers_layer_error():
    m = small_net()
    out_n, rec_n = quantize(m, rounding="nearest")
    out_g, rec_g = quantize(m, rounding="gptq", rounding_samples=8)
    check(out_g)
    st = rec_g.stats["rounding"]
    assert st["layers"] >= 1 and all(v <= 1.0 for v in st["per_layer"].values())
    inits_n = {t.name: onnx.numpy_helper.to_array(t) for t in out_n.graph.initializer}
    inits_g = {t.name: onnx.numpy_helper.to_array(t) for t in out_g.graph.initializer}
    scales = [k for k in inits_n if k.endswith("_W_scale")]
    assert scales and all(np.array_equal(inits_n[k], inits_g[k]) for k in scales)
    changed = [k for k in inits_n if k.endswith("_W_quantized") and not np.array_equal(inits_n[k], inits_g[k])]
    assert changed
    x = samples(1, seed=7)[0]
    y = run_ort(out_g, x, optimize=True)[0]
    assert y.shape == (1, 10) and np.all(np.isfinite(y))
