"""The shared im2col (onnxshrink/graph/patches.py): patch rows reproduce the convolution, their covariance and
the position sampling."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxshrink.graph.patches import ConvGeometry, conv_patches, patch_covariance, sample_positions

RNG = np.random.default_rng(11)


def direct_conv(x, W, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """The convolution from its definition, one output position and kernel tap at a time."""
    N, C, H, Wd = x.shape
    Cout, Cg, kh, kw = W.shape
    (sh, sw), (dh, dw) = strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    OH = (H + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    OW = (Wd + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((N, Cout, OH, OW))
    per_group = Cout // group
    for o in range(Cout):
        first = (o // per_group) * Cg
        for oy in range(OH):
            for ox in range(OW):
                for i in range(kh):
                    for j in range(kw):
                        y[:, o, oy, ox] += xp[:, first:first + Cg, oy * sh + i * dh, ox * sw + j * dw] @ W[o, :, i, j]
    return y


def patch_product(P, W, group):
    """``W_flat @ patches``: output ``[positions, Cout]`` from patch rows ``[positions, groups, D]``."""
    Wg = W.reshape(group, W.shape[0] // group, -1)                  # [g, R, D]
    return np.einsum("pgd,grd->pgr", P, Wg).reshape(P.shape[0], -1)


CASES = [
    ({}, (4, 3, 3, 3)),
    ({"pads": [1, 1, 1, 1]}, (4, 3, 3, 3)),
    ({"pads": [0, 2, 1, 0], "strides": [2, 1]}, (5, 3, 3, 2)),
    ({"strides": [2, 3], "dilations": [2, 1]}, (2, 3, 2, 3)),
    ({"pads": [2, 1, 0, 1], "strides": [1, 2], "dilations": [1, 3]}, (3, 3, 3, 2)),
    ({"group": 3, "pads": [1, 1, 1, 1]}, (6, 1, 3, 3)),       # depthwise, channel multiplier 2
    ({"group": 3, "strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, (3, 1, 3, 3)),
    ({"group": 6, "kernel_shape": [1, 1]}, (6, 1, 1, 1)),
]


@pytest.mark.parametrize("attrs,wshape", CASES)
def test_patches_times_weights_is_the_convolution(attrs, wshape):
    C = 3 if attrs.get("group", 1) in (1, 3) else 6
    x = RNG.standard_normal((2, C, 9, 11))
    W = RNG.standard_normal(wshape)
    group = attrs.get("group", 1)
    y = direct_conv(x, W, attrs.get("strides", (1, 1)), attrs.get("pads", (0, 0, 0, 0)),
                    attrs.get("dilations", (1, 1)), group)
    g = ConvGeometry.from_attrs(attrs, wshape[2:])
    assert g.out_hw(9, 11) == y.shape[2:]
    assert g.n_positions(x.shape) == y.shape[0] * y.shape[2] * y.shape[3]
    P = conv_patches(x, g, dtype=np.float64)
    assert P.shape == (g.n_positions(x.shape), group, (C // group) * wshape[2] * wshape[3])
    ref = y.transpose(0, 2, 3, 1).reshape(-1, wshape[0])
    np.testing.assert_allclose(patch_product(P, W, group), ref, rtol=1e-10, atol=1e-10)
    # a subset of positions gives those rows of the output, in the order asked
    pos = sample_positions(len(ref), 17, np.random.default_rng(0), sort=False)
    np.testing.assert_allclose(patch_product(conv_patches(x, g, pos, dtype=np.float64), W, group), ref[pos],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("strides", [[1, 1], [2, 2], [3, 2]])
def test_auto_pad_matches_onnxruntime(auto_pad, strides):
    x = RNG.standard_normal((1, 2, 8, 7)).astype(np.float32)
    W = RNG.standard_normal((3, 2, 3, 2)).astype(np.float32)
    attrs = {"auto_pad": auto_pad, "strides": strides}
    node = oh.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], **attrs)
    graph = oh.make_graph([node], "c", [oh.make_tensor_value_info("x", TP.FLOAT, list(x.shape))],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], [onnx.numpy_helper.from_array(W, "w")])
    y = run_ort(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), {"x": x})[0]
    g = ConvGeometry.from_attrs(attrs, (3, 2))
    assert g.out_hw(8, 7) == y.shape[2:]
    out = patch_product(conv_patches(x, g), W, 1)
    np.testing.assert_allclose(out, y.transpose(0, 2, 3, 1).reshape(-1, 3), rtol=1e-4, atol=1e-4)


def test_one_d_conv_is_height_one():
    x = RNG.standard_normal((2, 4, 15))
    W = RNG.standard_normal((4, 2, 3))
    attrs = {"pads": [2, 1], "strides": [2], "dilations": [3], "group": 2}
    y = direct_conv(x[:, :, None], W[:, :, None], (1, 2), (0, 2, 0, 1), (1, 3), 2)[:, :, 0]
    P = conv_patches(x, ConvGeometry.from_attrs(attrs, (3,)), dtype=np.float64)
    np.testing.assert_allclose(patch_product(P, W, 2), y.transpose(0, 2, 1).reshape(-1, 4), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_patch_covariance_is_the_sum_of_outer_products(chunk):
    x = RNG.standard_normal((2, 4, 7, 6))
    g = ConvGeometry.from_attrs({"pads": [1, 0, 1, 2], "strides": [1, 2], "group": 2}, (2, 3))
    pos = sample_positions(g.n_positions(x.shape), 20, np.random.default_rng(1))
    P = conv_patches(x, g, pos, dtype=np.float64)                  # [20, 2, 12]
    ref = np.einsum("pgd,pge->gde", P, P)
    np.testing.assert_allclose(patch_covariance(x, g, pos, chunk=chunk), ref, rtol=1e-12, atol=1e-12)
    full = conv_patches(x, g, dtype=np.float64)
    np.testing.assert_allclose(patch_covariance(x, g), np.einsum("pgd,pge->gde", full, full), rtol=1e-12)


def test_sample_positions():
    assert np.array_equal(sample_positions(5, 10, np.random.default_rng(0)), np.arange(5))
    assert np.array_equal(sample_positions(50, 0, np.random.default_rng(0)), np.arange(50))
    pick = sample_positions(50, 10, np.random.default_rng(0))
    assert len(set(pick)) == 10 and np.all(np.diff(pick) > 0) and pick.max() < 50
    unsorted = sample_positions(50, 10, np.random.default_rng(0), sort=False)
    assert np.array_equal(np.sort(unsorted), pick)
