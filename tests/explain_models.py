"""Test models for explain: a small CNN whose second convolution has a few outlier output channels
(x100, scaled back down by the next convolution's weights, so the float function is an ordinary one),
its calibration and held-out samples, and onnxruntime's ``quantize_static`` of it (QDQ, per-tensor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTLIER_NODE = "conv2"
OUTLIER_CHANNELS = (3, 11)


def outlier_cnn(seed: int = 0, outlier: float = 100.0) -> onnx.ModelProto:
    """x[1,3,16,16] -> conv1 -> relu -> conv2 (channels 3 and 11 x ``outlier``) -> relu -> conv3 (those
    input channels / ``outlier``) -> relu -> conv4 -> GlobalAveragePool -> Flatten -> out[1,8]."""
    rng = np.random.default_rng(seed)
    s2 = np.ones(16, np.float32)
    s2[list(OUTLIER_CHANNELS)] = outlier
    nodes, inits = [], []
    layers = [("conv1", "x", 3, 16, None, None), ("conv2", "conv1_r", 16, 16, s2, None),
              ("conv3", "conv2_r", 16, 16, None, 1 / s2), ("conv4", "conv3_r", 16, 8, None, None)]
    for name, x, cin, cout, out_scale, in_scale in layers:
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, cout).astype(np.float32)
        if out_scale is not None:
            w *= out_scale[:, None, None, None]
            b *= out_scale
        if in_scale is not None:
            w *= in_scale[None, :, None, None]
        inits += [numpy_helper.from_array(w, name + "_W"), numpy_helper.from_array(b, name + "_B")]
        nodes.append(helper.make_node("Conv", [x, name + "_W", name + "_B"], [name + "_y"], name=name, pads=[1] * 4))
        if name != "conv4":
            nodes.append(helper.make_node("Relu", [name + "_y"], [name + "_r"], name=name + "_relu"))
    nodes.append(helper.make_node("GlobalAveragePool", ["conv4_y"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["out"], name="flat"))
    g = helper.make_graph(nodes, "outlier_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def samples(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(n)]


def write_samples(folder: Path, arrays) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.save(folder / f"{i:04d}.npy", a)
    return folder


def ort_quantize(model_path: Path, out_path: Path, calib: list[np.ndarray], exclude=()) -> Path:
    """onnxruntime's quantize_static: QDQ, MinMax, uint8 activations, int8 per-tensor weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": a} for a in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(model_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude))
    return out_path
