"""Example models for tests and docs, built with onnx.helper and deterministic numpy weights.

    from models.build import resnet_small, mobilenet_small, transformer_block, mlp
    model = mobilenet_small()                     # onnx.ModelProto, opset 17
    python models/build.py --out models/demo      # the bundled demo model + calibration data

Every builder takes a ``seed`` and returns the same bytes for the same arguments. The weights are
random but *structured* the way trained weights are, so compression has something to find:

- Conv / Gemm / MatMul weights have a decaying singular spectrum: ``W = U diag(s) V^T`` with
  ``s_i = exp(-i / (tau * r)) + floor`` (r = min(rows, cols)), rescaled to He variance
  ``Var(w) = 2 / fan_in``. A low rank keeps most of the energy (svd has work to do).
- BatchNormalization scales ``gamma`` are log-normal (a spread of channel importance) and about
  a fifth of the channels are weak (``gamma`` x 0.02): structured pruning can remove them.
- BatchNormalization running statistics are set from the data (data-dependent init): each BN's
  ``mean``/``var`` are the per-channel mean and variance of its input on smooth random images,
  layer by layer in topological order, so activations have trained-like ranges (quantization
  calibration and fidelity measurements are meaningful, nothing explodes through residuals).

Builders (all float32, static batch 1 unless ``dynamic_batch=True``):

- ``resnet_small()``     input [1,3,32,32] -> logits [1,10]: Conv+BN+Relu stem, two basic
  residual blocks (identity and strided 1x1 downsample), GlobalAveragePool, Flatten, Gemm.
- ``mobilenet_small()``  input [1,3,64,64] -> logits [1,10]: MobileNetV2 inverted residuals
  (1x1 expand, 3x3 depthwise, 1x1 linear project, Relu6 as Clip), residual Adds, a two-branch
  Concat, GlobalAveragePool, Flatten, Gemm. ``pytorch_style=True`` exports it the way
  ``torch.onnx.export`` does (BN unfused, Clip bounds and shape constants as Constant nodes,
  Identity nodes, ``x.view(x.size(0), -1)`` as Shape/Gather/Unsqueeze/Concat/Reshape).
- ``transformer_block()`` input [1,16,64] -> [1,16,64]: pre-LN encoder block, 4-head softmax
  attention (MatMul+Add projections, scaled Q K^T, Softmax), residual Adds, LayerNormalization,
  erf-GELU MLP as Gemm on the flattened tokens.
- ``vit_encoder()``      input [1,3,32,32] -> logits [1,10]: a ViT exported the way
  ``torch.onnx.export`` writes timm/Hugging Face ViTs (opset 14 or 17): Conv patch embedding,
  class token, position embedding, pre-LN blocks with separate (or one fused) Q/K/V projections (MatMul + Add,
  Reshape to [B,N,H,D] and Transpose, Q K^T scaled by 1/sqrt(D), Softmax, merge, out projection),
  erf-GELU MLP (MatMul + Add), LayerNorm decomposed (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div,
  as PyTorch exports it below opset 17) or fused (LayerNormalization), shape arithmetic as
  Shape/Gather/Unsqueeze/Concat (cleanup folds it for a static batch). Heads and MLP neurons have a
  spread of importance (a quarter of the heads and a fifth of the neurons weak), as trained ones do.
- ``crnn_small()``       input [1,3,32,320] -> logits [80,1,97]: a CRNN text recognizer (conv + LSTM),
  as PaddleOCR's and the classic CRNN export it: Conv+BN+Relu stages with MaxPool down to height 1,
  Squeeze and Transpose to a [T, N, C] sequence, a bidirectional LSTM (the ONNX LSTM op), its two
  directions merged by Transpose+Reshape, and a per-step MatMul+Add classifier.
- ``mlp()``              input [1,64] -> logits [1,10]: three Gemm layers with Relu.
"""

from __future__ import annotations

__all__ = ["resnet_small", "mobilenet_small", "mobilenet_v3_small", "picodet_small", "transformer_block",
           "vit_encoder", "crnn_small", "mlp", "demo_model", "demo_samples", "write_demo", "OPSET", "IR_VERSION"]

import argparse
import collections
import functools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; every onnxruntime release reads it
PRODUCER = "onnxshrink-models"

# ImageNet normalisation (what torchvision-style CNNs expect)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ---------------------------------------------------------------------------- weights
def structured_weight(rng: np.random.Generator, shape, tau: float = 0.25, floor: float = 0.02,
                      fan_in: int | None = None) -> np.ndarray:
    """A weight of ``shape`` (rows = shape[0], cols = the rest) with singular values
    ``exp(-i / (tau * r)) + floor``, scaled to He variance 2 / fan_in."""
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    g = rng.standard_normal((rows, cols))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    r = min(rows, cols)
    s = np.exp(-np.arange(r) / max(tau * r, 1e-6)) + floor
    w = (u * s) @ vt
    fan_in = fan_in or cols
    w *= np.sqrt(2.0 / fan_in) / (w.std() + 1e-12)
    return w.reshape(shape).astype(np.float32)


def channel_scales(rng: np.random.Generator, c: int, weak_fraction: float = 0.2, spread: float = 0.5,
                   weak_scale: float = 0.02) -> np.ndarray:
    """Per-channel scales: log-normal(0, spread), with ``weak_fraction`` of channels (at seeded
    random positions) multiplied by ``weak_scale``."""
    g = np.exp(rng.normal(0.0, spread, c))
    n_weak = int(round(weak_fraction * c))
    if n_weak:
        g[rng.choice(c, n_weak, replace=False)] *= weak_scale
    return g.astype(np.float32)


def smooth_images(n: int, hw: tuple[int, int], seed: int = 1234, channels: int = 3) -> np.ndarray:
    """``n`` smooth random images [n, C, H, W] (low-resolution noise upsampled, plus a gradient),
    roughly zero-mean unit-variance like normalised photos."""
    rng = np.random.default_rng(seed)
    h, w = hw
    out = np.empty((n, channels, h, w), np.float32)
    for i in range(n):
        lo = rng.standard_normal((channels, max(2, h // 8), max(2, w // 8)))
        ry = np.linspace(0, lo.shape[1] - 1, h)
        rx = np.linspace(0, lo.shape[2] - 1, w)
        y0 = np.floor(ry).astype(int).clip(0, lo.shape[1] - 2)
        x0 = np.floor(rx).astype(int).clip(0, lo.shape[2] - 2)
        fy = (ry - y0)[None, :, None]
        fx = (rx - x0)[None, None, :]
        a = lo[:, y0][:, :, x0]
        b = lo[:, y0][:, :, x0 + 1]
        c = lo[:, y0 + 1][:, :, x0]
        d = lo[:, y0 + 1][:, :, x0 + 1]
        img = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
        img += 0.2 * rng.standard_normal((channels, h, w))
        out[i] = img / (img.std() + 1e-6)
    return out


# ---------------------------------------------------------------------------- graph builder
class _Builder:
    """Accumulates nodes and initializers with PyTorch-like names."""

    def __init__(self, seed: int, pytorch_style: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.pytorch_style = pytorch_style
        self.bn_nodes: list[onnx.NodeProto] = []
        self._count = collections.Counter()

    def _uniq(self, base: str) -> str:
        self._count[base] += 1
        k = self._count[base]
        return base if k == 1 else f"{base}_{k - 1}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, scope: str, arr: np.ndarray) -> str:
        """A constant input: a Constant node (pytorch_style) or an initializer."""
        arr = np.asarray(arr)
        if self.pytorch_style:
            out = self._uniq(f"{scope}/Constant_output_0")
            self.nodes.append(helper.make_node("Constant", [], [out], name=self._uniq(f"{scope}/Constant"),
                                               value=numpy_helper.from_array(arr)))
            return out
        return self.init(self._uniq(f"{scope}.const"), arr)

    def node(self, op: str, inputs, scope: str, n_out: int = 1, **attrs):
        name = self._uniq(f"/{scope}/{op}")
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        nd = helper.make_node(op, list(inputs), outs, name=name, **attrs)
        self.nodes.append(nd)
        return outs[0] if n_out == 1 else outs

    # layers ---------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, scope: str, stride: int = 1, group: int = 1,
             bias: bool = False, tau: float = 0.25) -> str:
        w = structured_weight(self.rng, (cout, cin // group, k, k), tau=tau)
        ins = [x, self.init(f"{scope}.weight", w)]
        if bias:
            ins.append(self.init(f"{scope}.bias", (0.05 * self.rng.standard_normal(cout)).astype(np.float32)))
        pad = k // 2
        return self.node("Conv", ins, scope, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad, pad, pad, pad], group=group, dilations=[1, 1])

    def bn(self, x: str, c: int, scope: str, weak_fraction: float = 0.2) -> str:
        gamma = channel_scales(self.rng, c, weak_fraction)
        beta = (0.1 * self.rng.standard_normal(c) * np.minimum(gamma, 1.0)).astype(np.float32)
        ins = [x, self.init(f"{scope}.weight", gamma), self.init(f"{scope}.bias", beta),
               self.init(f"{scope}.running_mean", np.zeros(c, np.float32)),
               self.init(f"{scope}.running_var", np.ones(c, np.float32))]
        out = self.node("BatchNormalization", ins, scope, epsilon=1e-5, momentum=0.9)
        self.bn_nodes.append(self.nodes[-1])
        return out

    def relu(self, x: str, scope: str) -> str:
        return self.node("Relu", [x], scope)

    def relu6(self, x: str, scope: str) -> str:
        lo = self.const(scope, np.array(0.0, np.float32))
        hi = self.const(scope, np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi], scope)

    def conv_bn(self, x, cin, cout, k, scope, stride=1, group=1, act="relu", weak_fraction=0.2):
        y = self.conv(x, cin, cout, k, f"{scope}.conv", stride, group)
        y = self.bn(y, cout, f"{scope}.bn", weak_fraction)
        if act == "relu":
            y = self.relu(y, scope)
        elif act == "relu6":
            y = self.relu6(y, scope)
        elif act == "hardswish":  # torch.nn.Hardswish exports as HardSwish (opset 14+)
            y = self.node("HardSwish", [y], scope)
        elif act is not None:
            raise ValueError(f"activation {act!r}")
        return y

    def squeeze_excite(self, x: str, c: int, scope: str) -> str:
        """MobileNetV3 squeeze-excite: x * HardSigmoid(conv(relu(conv(GlobalAveragePool(x))))), as
        torch.nn.Hardsigmoid exports it (alpha 1/6)."""
        s = self.node("GlobalAveragePool", [x], f"{scope}.avgpool")
        s = self.relu(self.conv(s, c, max(8, c // 4), 1, f"{scope}.fc1", bias=True), f"{scope}.fc1")
        s = self.conv(s, max(8, c // 4), c, 1, f"{scope}.fc2", bias=True)
        s = self.node("HardSigmoid", [s], f"{scope}.hsig", alpha=1.0 / 6.0, beta=0.5)
        return self.node("Mul", [x, s], scope)

    def gemm(self, x: str, fin: int, fout: int, scope: str, tau: float = 0.25, weak_fraction: float = 0.0) -> str:
        """PyTorch Linear: Gemm(x, W[out, in], b, transB=1)."""
        w = structured_weight(self.rng, (fout, fin), tau=tau)
        if weak_fraction:
            w *= channel_scales(self.rng, fout, weak_fraction, spread=0.3)[:, None]
        b = (0.02 * self.rng.standard_normal(fout)).astype(np.float32)
        return self.node("Gemm", [x, self.init(f"{scope}.weight", w), self.init(f"{scope}.bias", b)], scope,
                         alpha=1.0, beta=1.0, transB=1)

    def flatten(self, x: str, scope: str) -> str:
        if not self.pytorch_style:
            return self.node("Flatten", [x], scope, axis=1)
        # x.view(x.size(0), -1) as torch.onnx exports it
        shape = self.node("Shape", [x], scope)
        idx = self.const(scope, np.array(0, np.int64))
        n = self.node("Gather", [shape, idx], scope, axis=0)
        axes = self.const(scope, np.array([0], np.int64))
        n1 = self.node("Unsqueeze", [n, axes], scope)
        minus1 = self.const(scope, np.array([-1], np.int64))
        target = self.node("Concat", [n1, minus1], scope, axis=0)
        return self.node("Reshape", [x, target], scope, allowzero=0)

    def identity(self, x: str, scope: str) -> str:
        return self.node("Identity", [x], scope) if self.pytorch_style else x

    def model(self, name: str, inputs, outputs, doc: str = "") -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER,
                              producer_version="1", doc_string=doc)
        m.ir_version = IR_VERSION
        return m


def _input(name: str, shape, dynamic_batch: bool, elem=TensorProto.FLOAT):
    shape = list(shape)
    if dynamic_batch:
        shape[0] = "batch"
    return helper.make_tensor_value_info(name, elem, shape)


def _set_batch(model: onnx.ModelProto, dynamic: bool) -> onnx.ModelProto:
    """Inputs and outputs: batch dim symbolic ('batch') or 1."""
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            if dynamic:
                dims[0].dim_param = "batch"
            else:
                dims[0].dim_value = 1
    return model


def _data_dependent_bn(model: onnx.ModelProto, bn_nodes, images: np.ndarray) -> None:
    """Set each BatchNormalization's running mean/var to the per-channel statistics of its input
    on ``images`` (layer by layer, so later layers see already-normalised inputs)."""
    import onnxruntime as ort

    if not bn_nodes:
        return
    inits = {t.name: t for t in model.graph.initializer}
    in_name = model.graph.input[0].name
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for bn in bn_nodes:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        _set_batch(probe, dynamic=True)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_tensor_value_info(bn.input[0], TensorProto.FLOAT, None))
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = sess.run(None, {in_name: images})[0].astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes).astype(np.float32)
        var = (x.var(axis=axes) + 1e-3).astype(np.float32)
        inits[bn.input[3]].CopyFrom(numpy_helper.from_array(mean, bn.input[3]))
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(var, bn.input[4]))


def _data_dependent_head(model: onnx.ModelProto, gemm: onnx.NodeProto, images: np.ndarray,
                         logit_std: float = 2.0) -> None:
    """Centre and scale the classifier: with features f on ``images``, set the Gemm's bias to
    ``-W mean(f)`` and scale W, b so the logits have standard deviation ``logit_std``. Without
    this, post-ReLU features share a large positive mean and one class wins for every input."""
    import onnxruntime as ort

    inits = {t.name: t for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _set_batch(probe, dynamic=True)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(gemm.input[0], TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    f = sess.run(None, {model.graph.input[0].name: images})[0].astype(np.float64)
    w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float64)  # [out, in] (transB=1)
    logits = (f - f.mean(axis=0)) @ w.T
    scale = logit_std / (logits.std() + 1e-12)
    w *= scale
    b = -(f.mean(axis=0) @ w.T) + 0.1 * np.random.default_rng(0).standard_normal(w.shape[0])
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), gemm.input[2]))


def _cached(fn):
    """Cache a builder's proto; every call returns a fresh copy (callers may mutate it)."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        m = onnx.ModelProto()
        m.CopyFrom(cached(*args, **kwargs))
        return m

    wrapper.cache_clear = cached.cache_clear
    return wrapper


# ---------------------------------------------------------------------------- models
@_cached
def resnet_small(seed: int = 0, num_classes: int = 10, width: int = 16, hw: int = 32,
                 dynamic_batch: bool = False) -> onnx.ModelProto:
    """ResNet-style CNN: stem, a basic block with identity shortcut, a strided basic block with a
    1x1 downsample shortcut, GlobalAveragePool, Flatten, Gemm. Input 'input' [1,3,hw,hw], output
    'logits' [1,num_classes]."""
    b = _Builder(seed)
    x = "input"
    c1, c2 = width, 2 * width
    y = b.conv_bn(x, 3, c1, 3, "conv1", weak_fraction=0.0)
    y = b.node("MaxPool", [y], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    # layer1: identity shortcut
    h = b.conv_bn(y, c1, c1, 3, "layer1.0.conv1")
    h = b.conv_bn(h, c1, c1, 3, "layer1.0.conv2", act=None)
    y = b.relu(b.node("Add", [h, y], "layer1.0"), "layer1.0")
    # layer2: strided, 1x1 downsample shortcut
    h = b.conv_bn(y, c1, c2, 3, "layer2.0.conv1", stride=2)
    h = b.conv_bn(h, c2, c2, 3, "layer2.0.conv2", act=None)
    s = b.conv_bn(y, c1, c2, 1, "layer2.0.downsample", stride=2, act=None)
    y = b.relu(b.node("Add", [h, s], "layer2.0"), "layer2.0")
    # layer3: identity shortcut at the wider width
    h = b.conv_bn(y, c2, c2, 3, "layer3.0.conv1")
    h = b.conv_bn(h, c2, c2, 3, "layer3.0.conv2", act=None)
    y = b.relu(b.node("Add", [h, y], "layer3.0"), "layer3.0")
    y = b.node("GlobalAveragePool", [y], "avgpool")
    y = b.node("Flatten", [y], "flatten", axis=1)
    y = b.gemm(y, c2, num_classes, "fc")
    b.nodes[-1].output[0] = "logits"
    m = b.model("resnet_small", [_input("input", [1, 3, hw, hw], True)],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
                doc="ResNet-style CNN built by models/build.py (deterministic structured weights)")
    images = smooth_images(16, (hw, hw), seed=1000 + seed)
    _data_dependent_bn(m, b.bn_nodes, images)
    _data_dependent_head(m, next(n for n in m.graph.node if n.op_type == "Gemm"), images)
    return _set_batch(m, dynamic_batch)


def _inverted_residual(b: _Builder, x: str, cin: int, cout: int, expand: int, stride: int, scope: str) -> str:
    hidden = cin * expand
    h = x
    if expand != 1:
        h = b.conv_bn(h, cin, hidden, 1, f"{scope}.conv.0", act="relu6")
    h = b.conv_bn(h, hidden, hidden, 3, f"{scope}.conv.1", stride=stride, group=hidden, act="relu6",
                  weak_fraction=0.1)
    h = b.conv_bn(h, hidden, cout, 1, f"{scope}.conv.2", act=None, weak_fraction=0.1)
    if stride == 1 and cin == cout:
        h = b.node("Add", [x, h], scope)
    return h


@_cached
def mobilenet_small(seed: int = 0, num_classes: int = 10, hw: int = 64, pytorch_style: bool = False,
                    dynamic_batch: bool = False) -> onnx.ModelProto:
    """MobileNetV2-style CNN (see ``_mobilenet``); BN statistics from smooth random images."""
    return _mobilenet(seed, num_classes, hw, pytorch_style, dynamic_batch,
                      smooth_images(16, (hw, hw), seed=2000 + seed))


def _mobilenet(seed: int, num_classes: int, hw: int, pytorch_style: bool, dynamic_batch: bool,
               init_images: np.ndarray) -> onnx.ModelProto:
    """MobileNetV2-style CNN: strided stem, inverted residual blocks (1x1 expand + Relu6, 3x3
    depthwise + Relu6, 1x1 linear projection, residual Add when shapes allow), a two-branch block
    joined by Concat, a 1x1 head conv, GlobalAveragePool, Flatten, Gemm.
    Input 'input' [1,3,hw,hw], output 'logits' [1,num_classes]."""
    b = _Builder(seed, pytorch_style=pytorch_style)
    y = b.conv_bn("input", 3, 16, 3, "features.0", stride=2, act="relu6", weak_fraction=0.0)
    cfg = [  # (cin, cout, expand, stride)
        (16, 16, 1, 1),
        (16, 24, 4, 2),
        (24, 24, 4, 1),
        (24, 32, 4, 2),
        (32, 32, 4, 1),
    ]
    for i, (ci, co, t, s) in enumerate(cfg, start=1):
        y = _inverted_residual(b, y, ci, co, t, s, f"features.{i}")
    # two branches joined by Concat (Inception/FPN style): 1x1, and depthwise 3x3 + 1x1
    k = len(cfg) + 1
    a = b.conv_bn(y, 32, 24, 1, f"features.{k}.branch0", act="relu6")
    d = b.conv_bn(y, 32, 32, 3, f"features.{k}.branch1.0", group=32, act="relu6")
    d = b.conv_bn(d, 32, 24, 1, f"features.{k}.branch1.1", act="relu6")
    y = b.node("Concat", [a, d], f"features.{k}", axis=1)
    y = b.conv_bn(y, 48, 64, 1, f"features.{k + 1}", act="relu6")
    y = b.node("GlobalAveragePool", [y], "avgpool")
    y = b.flatten(y, "flatten")
    y = b.identity(y, "classifier.0")  # Dropout in eval mode exports as Identity
    y = b.gemm(y, 64, num_classes, "classifier.1")
    out = b.identity(y, "output") if pytorch_style else y
    for nd in b.nodes:
        for i, o in enumerate(nd.output):
            if o == out:
                nd.output[i] = "logits"
    doc = "MobileNetV2-style CNN built by models/build.py (deterministic structured weights)"
    if pytorch_style:
        doc += "; exported in torch.onnx style (BN unfused, Constant and Identity nodes, view-as-Reshape)"
    m = b.model("mobilenet_small", [_input("input", [1, 3, hw, hw], True)],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])], doc=doc)
    _data_dependent_bn(m, b.bn_nodes, init_images)
    _data_dependent_head(m, next(n for n in m.graph.node if n.op_type == "Gemm"), init_images)
    return _set_batch(m, dynamic_batch)


def _v3_block(b: _Builder, x: str, cin: int, k: int, hidden: int, cout: int, se: bool, act: str, stride: int,
              scope: str) -> str:
    """MobileNetV3 inverted residual: 1x1 expand, kxk depthwise, optional squeeze-excite, 1x1 linear
    projection, residual Add when shapes allow."""
    h = x
    if hidden != cin:
        h = b.conv_bn(h, cin, hidden, 1, f"{scope}.expand", act=act)
    h = b.conv_bn(h, hidden, hidden, k, f"{scope}.dw", stride=stride, group=hidden, act=act, weak_fraction=0.1)
    if se:
        h = b.squeeze_excite(h, hidden, f"{scope}.se")
    h = b.conv_bn(h, hidden, cout, 1, f"{scope}.project", act=None, weak_fraction=0.1)
    return b.node("Add", [x, h], scope) if stride == 1 and cin == cout else h


@_cached
def mobilenet_v3_small(seed: int = 0, num_classes: int = 10, hw: int = 64) -> onnx.ModelProto:
    """MobileNetV3-Small-style classifier as torch.onnx exports it: HardSwish stem, inverted
    residual blocks with ReLU or HardSwish and squeeze-excite (HardSigmoid gates), a 1x1 head conv,
    GlobalAveragePool, a HardSwish Gemm and the classifier Gemm. BN statistics from photo crops (a
    trained model's come from its images). Input 'input' [1,3,hw,hw], output 'logits'."""
    b = _Builder(seed)
    y = b.conv_bn("input", 3, 16, 3, "features.0", stride=2, act="hardswish", weak_fraction=0.0)
    cfg = [  # (kernel, hidden, out, squeeze-excite, activation, stride), MobileNetV3-Small's first blocks
        (3, 16, 16, True, "relu", 2),
        (3, 72, 24, False, "relu", 2),
        (3, 88, 24, False, "relu", 1),
        (5, 96, 40, True, "hardswish", 2),
        (5, 240, 40, True, "hardswish", 1),
        (5, 120, 48, True, "hardswish", 1),
    ]
    cin = 16
    for i, (k, hidden, cout, se, act, stride) in enumerate(cfg, start=1):
        y = _v3_block(b, y, cin, k, hidden, cout, se, act, stride, f"features.{i}")
        cin = cout
    y = b.conv_bn(y, cin, 288, 1, f"features.{len(cfg) + 1}", act="hardswish")
    y = b.node("GlobalAveragePool", [y], "avgpool")
    y = b.node("Flatten", [y], "flatten", axis=1)
    y = b.node("HardSwish", [b.gemm(y, 288, 128, "classifier.0")], "classifier.1")
    b.gemm(y, 128, num_classes, "classifier.3")
    b.nodes[-1].output[0] = "logits"
    m = b.model("mobilenet_v3_small", [_input("input", [1, 3, hw, hw], False)],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])],
                doc="MobileNetV3-Small-style classifier built by models/build.py")
    images = np.concatenate(demo_samples(24, seed=11 + seed, hw=hw), axis=0)
    _data_dependent_bn(m, b.bn_nodes, images)
    _data_dependent_head(m, next(n for n in reversed(m.graph.node) if n.op_type == "Gemm"), images)
    return m


@_cached
def picodet_small(seed: int = 0, num_classes: int = 5, hw: int = 96, reg_bins: int = 8) -> onnx.ModelProto:
    """PicoDet-style layout detector (ESNet-like backbone, PAN neck, GFL head) as Paddle2ONNX
    writes it: HardSwish depthwise-separable blocks with squeeze-excite, strides 8/16/32 fused
    top-down by nearest Resize + Concat, per level a shared-style head of depthwise + 1x1 convs
    giving class scores (Sigmoid) and a box distribution of ``reg_bins`` bins per side (raw logits,
    the post-processing applies Softmax), flattened to [1, HW, .] and concatenated over the levels.
    Inputs 'image' [1,3,hw,hw]; outputs 'scores' [1,N,num_classes], 'boxes' [1,N,4*reg_bins]."""
    b = _Builder(seed)
    y = b.conv_bn("image", 3, 16, 3, "backbone.conv1", stride=2, act="hardswish", weak_fraction=0.0)
    levels = []
    cin = 16
    for i, (hidden, cout, stride, se) in enumerate([(32, 24, 2, False), (64, 32, 2, True), (96, 48, 1, True),
                                                    (128, 64, 2, True), (192, 96, 2, True)]):
        y = _v3_block(b, y, cin, 3, hidden, cout, se, "hardswish", stride, f"backbone.stage{i}")
        cin = cout
        if i in (1, 3, 4):  # strides 8, 16, 32
            levels.append((y, cout))
    width = 32
    lat = [b.conv_bn(t, c, width, 1, f"neck.lateral{k}", act="hardswish") for k, (t, c) in enumerate(levels)]
    scales = b.init("neck.upsample_scales", np.array([1, 1, 2, 2], np.float32))
    roi = b.init("neck.roi", np.zeros(0, np.float32))
    top = lat[2]
    fused = [top]
    for k in (1, 0):  # top-down: upsample, concat, fuse
        up = b.node("Resize", [top, roi, scales], f"neck.up{k}", mode="nearest")
        cat = b.node("Concat", [up, lat[k]], f"neck.cat{k}", axis=1)
        top = b.conv_bn(cat, 2 * width, width, 1, f"neck.fuse{k}", act="hardswish")
        top = b.conv_bn(top, width, width, 3, f"neck.fuse{k}.dw", group=width, act="hardswish")
        fused.insert(0, top)
    scores, boxes = [], []
    for k, t in enumerate(fused):
        h = b.conv_bn(t, width, width, 3, f"head.level{k}.dw", group=width, act="hardswish")
        h = b.conv_bn(h, width, width, 1, f"head.level{k}.pw", act="hardswish")
        cls = b.conv(h, width, num_classes, 1, f"head.level{k}.cls", bias=True)
        reg = b.conv(h, width, 4 * reg_bins, 1, f"head.level{k}.reg", bias=True)
        for out, src, c in ((scores, cls, num_classes), (boxes, reg, 4 * reg_bins)):
            flat = b.node("Reshape", [src, b.init(f"head.level{k}.flat{c}", np.array([0, c, -1], np.int64))],
                          f"head.level{k}")
            out.append(b.node("Transpose", [flat], f"head.level{k}", perm=[0, 2, 1]))
    s = b.node("Sigmoid", [b.node("Concat", scores, "head.scores", axis=1)], "head.scores")
    r = b.node("Concat", boxes, "head.boxes", axis=1)
    n = sum((hw // st) ** 2 for st in (8, 16, 32))
    for nd in b.nodes:
        nd.output[:] = ["scores" if o == s else "boxes" if o == r else o for o in nd.output]
    m = b.model("picodet_small", [_input("image", [1, 3, hw, hw], False)],
                [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, n, num_classes]),
                 helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, n, 4 * reg_bins])],
                doc="PicoDet-style detector built by models/build.py")
    _data_dependent_bn(m, b.bn_nodes, np.concatenate(demo_samples(16, seed=13 + seed, hw=hw), axis=0))
    return m


@_cached
def transformer_block(seed: int = 0, seq: int = 16, d_model: int = 64, heads: int = 4, d_ff: int = 128,
                      dynamic_batch: bool = False) -> onnx.ModelProto:
    """Pre-LN transformer encoder block: x + Attn(LN(x)), then + MLP(LN(.)).

    Attention: Q,K,V = LN(x) W_{q,k,v} + b (MatMul+Add), split into heads by Reshape/Transpose,
    softmax(Q K^T / sqrt(d_head)) V, merged and projected (MatMul+Add). MLP: Gemm on the
    [batch*seq, d_model] flattened tokens, GELU(x) = 0.5 x (1 + erf(x / sqrt 2)) as PyTorch
    exports it at opset 17, Gemm back. Input 'x' [1,seq,d_model], output 'y' [1,seq,d_model].
    """
    b = _Builder(seed)
    dh = d_model // heads
    x = "x"

    def ln(v, scope):
        gamma = (1.0 + 0.2 * b.rng.standard_normal(d_model)).astype(np.float32)
        beta = (0.02 * b.rng.standard_normal(d_model)).astype(np.float32)
        return b.node("LayerNormalization", [v, b.init(f"{scope}.weight", gamma), b.init(f"{scope}.bias", beta)],
                      scope, axis=-1, epsilon=1e-5)

    def proj(v, fin, fout, scope, tau=0.25):
        w = structured_weight(b.rng, (fin, fout), tau=tau, fan_in=fin) * np.float32(np.sqrt(0.5))
        bias = (0.02 * b.rng.standard_normal(fout)).astype(np.float32)
        y = b.node("MatMul", [v, b.init(f"{scope}.weight", w)], scope)
        return b.node("Add", [y, b.init(f"{scope}.bias", bias)], scope)

    h = ln(x, "norm1")
    split = b.init("attn.head_shape", np.array([0, 0, heads, dh], np.int64))
    qkv = []
    for nm in ("q_proj", "k_proj", "v_proj"):
        t = proj(h, d_model, d_model, f"attn.{nm}")
        t = b.node("Reshape", [t, split], f"attn.{nm}")
        perm = [0, 2, 3, 1] if nm == "k_proj" else [0, 2, 1, 3]  # K goes in transposed
        qkv.append(b.node("Transpose", [t], f"attn.{nm}", perm=perm))
    q, kt, v = qkv
    s = b.node("MatMul", [q, kt], "attn")
    s = b.node("Div", [s, b.init("attn.scale", np.array(np.sqrt(dh), np.float32))], "attn")
    p = b.node("Softmax", [s], "attn", axis=-1)
    o = b.node("MatMul", [p, v], "attn")
    o = b.node("Transpose", [o], "attn", perm=[0, 2, 1, 3])
    o = b.node("Reshape", [o, b.init("attn.merge_shape", np.array([0, 0, d_model], np.int64))], "attn")
    o = proj(o, d_model, d_model, "attn.out_proj")
    x1 = b.node("Add", [x, o], "residual1")
    h = ln(x1, "norm2")
    tokens = b.node("Reshape", [h, b.init("mlp.tokens_shape", np.array([-1, d_model], np.int64))], "mlp")
    f = b.gemm(tokens, d_model, d_ff, "mlp.fc1", weak_fraction=0.2)
    e = b.node("Div", [f, b.init("mlp.sqrt2", np.array(np.sqrt(2.0), np.float32))], "mlp.gelu")
    e = b.node("Erf", [e], "mlp.gelu")
    e = b.node("Add", [e, b.init("mlp.one", np.array(1.0, np.float32))], "mlp.gelu")
    f = b.node("Mul", [f, e], "mlp.gelu")
    f = b.node("Mul", [f, b.init("mlp.half", np.array(0.5, np.float32))], "mlp.gelu")
    f = b.gemm(f, d_ff, d_model, "mlp.fc2")
    # back to [batch, seq, d_model]: the shape of x1, read at run time
    f = b.node("Reshape", [f, b.node("Shape", [x1], "mlp")], "mlp")
    b.node("Add", [x1, f], "residual2")
    b.nodes[-1].output[0] = "y"
    m = b.model("transformer_block", [_input("x", [1, seq, d_model], dynamic_batch)],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                               ["batch" if dynamic_batch else 1, seq, d_model])],
                doc="Pre-LN transformer encoder block built by models/build.py")
    return m


@_cached
def vit_encoder(seed: int = 0, depth: int = 2, dim: int = 64, heads: int = 4, mlp_ratio: int = 4, hw: int = 32,
                patch: int = 8, num_classes: int = 10, opset: int = 17, layernorm: str = "fused",
                dynamic_batch: bool = False, weak_heads: float = 0.25, weak_neurons: float = 0.2,
                qkv: str = "separate", attention: str = "matmul") -> onnx.ModelProto:
    """ViT encoder exported PyTorch-style (module docstring). ``layernorm``: "fused" (the
    LayerNormalization op, opset >= 17) or "decomposed". ``qkv``: "separate" (Hugging Face: three
    projections) or "fused" (timm: one [C, 3C] projection, Reshape to [B, N, 3, H, D], Transpose to
    [3, B, H, N, D], ``unbind(0)`` as Split + Squeeze). ``attention``: "matmul" (``Q K^T / sqrt(D)``)
    or "sdpa" (what torch.onnx writes for ``F.scaled_dot_product_attention``: the scale
    ``1/sqrt(D)`` computed at run time from ``Shape(q)[-1:]``, its square root multiplied into Q and
    into K^T). Input 'pixel_values' [1,3,hw,hw], output
    'logits' [1,num_classes] (the class token's features after the final LayerNorm)."""
    if layernorm == "fused" and opset < 17:
        raise ValueError("LayerNormalization needs opset >= 17")
    b = _Builder(seed, pytorch_style=True)
    dh, hidden, n_tok = dim // heads, dim * mlp_ratio, (hw // patch) ** 2 + 1

    def ln(v, scope):
        gamma = (1.0 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32)
        beta = (0.02 * b.rng.standard_normal(dim)).astype(np.float32)
        if layernorm == "fused":
            return b.node("LayerNormalization", [v, b.init(f"{scope}.weight", gamma), b.init(f"{scope}.bias", beta)],
                          scope, axis=-1, epsilon=1e-6)
        mean = b.node("ReduceMean", [v], scope, axes=[-1], keepdims=1)
        d = b.node("Sub", [v, mean], scope)
        var = b.node("ReduceMean", [b.node("Pow", [d, b.const(scope, np.array(2.0, np.float32))], scope)], scope,
                     axes=[-1], keepdims=1)
        std = b.node("Sqrt", [b.node("Add", [var, b.const(scope, np.array(1e-6, np.float32))], scope)], scope)
        y = b.node("Div", [d, std], scope)
        return b.node("Add", [b.node("Mul", [y, b.init(f"{scope}.weight", gamma)], scope),
                              b.init(f"{scope}.bias", beta)], scope)

    def linear(v, fin, fout, scope, out_scale=None, in_scale=None, gain=1.0):
        w = structured_weight(b.rng, (fin, fout), tau=0.3, fan_in=fin) * np.float32(gain)
        if out_scale is not None:
            w = w * out_scale[None, :]
        if in_scale is not None:
            w = w * in_scale[:, None]
        bias = (0.02 * b.rng.standard_normal(fout)).astype(np.float32)
        if out_scale is not None:
            bias = bias * np.minimum(out_scale, 1.0)
        y = b.node("MatMul", [v, b.init(f"{scope}.weight_t", w.astype(np.float32))], scope)
        return b.node("Add", [b.init(f"{scope}.bias", bias), y], scope)  # torch writes the bias first

    def runtime_shape(v, scope, tail):
        """[x.size(0), x.size(1), *tail] the way torch.onnx writes x.view(B, N, ...)."""
        shp = b.node("Shape", [v], scope)
        dims = []
        for k in (0, 1):
            g = b.node("Gather", [shp, b.const(scope, np.array(k, np.int64))], scope, axis=0)
            dims.append(b.node("Unsqueeze", [g, b.const(scope, np.array([0], np.int64))], scope)
                        if opset >= 13 else b.node("Unsqueeze", [g], scope, axes=[0]))
        return b.node("Concat", dims + [b.const(scope, np.array(tail, np.int64))], scope, axis=0)

    x = "pixel_values"
    w_pe = structured_weight(b.rng, (dim, 3, patch, patch), tau=0.3)
    t = b.node("Conv", [x, b.init("patch_embed.proj.weight", w_pe),
                        b.init("patch_embed.proj.bias", (0.02 * b.rng.standard_normal(dim)).astype(np.float32))],
               "patch_embed.proj", kernel_shape=[patch, patch], strides=[patch, patch], pads=[0, 0, 0, 0],
               dilations=[1, 1], group=1)
    flat = b.node("Reshape", [t, b.const("patch_embed", np.array([0, dim, -1], np.int64))], "patch_embed")
    t = b.node("Transpose", [flat], "patch_embed", perm=[0, 2, 1])
    cls = b.init("cls_token", (0.02 * b.rng.standard_normal((1, 1, dim))).astype(np.float32))
    bsz = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [t], "cls"), b.const("cls", np.array(0, np.int64))],
                                      "cls", axis=0), b.const("cls", np.array([0], np.int64))], "cls")
    cls_shape = b.node("Concat", [bsz, b.const("cls", np.array([1, dim], np.int64))], "cls", axis=0)
    cls = b.node("Expand", [cls, cls_shape], "cls")
    t = b.node("Concat", [cls, t], "cls", axis=1)
    pos = b.init("pos_embed", (0.1 * b.rng.standard_normal((1, n_tok, dim))).astype(np.float32))
    t = b.node("Add", [t, pos], "pos_embed")
    for i in range(depth):
        s = f"blocks.{i}"
        h = ln(t, f"{s}.norm1")
        head_gain = np.repeat(channel_scales(b.rng, heads, weak_heads, spread=0.3, weak_scale=0.05), dh)
        if qkv == "fused":
            gain = np.concatenate([np.ones(2 * dim, np.float32), head_gain])
            u = linear(h, dim, 3 * dim, f"{s}.attn.qkv", out_scale=gain)
            u = b.node("Reshape", [u, runtime_shape(u, f"{s}.attn", [3, heads, dh])], f"{s}.attn")
            u = b.node("Transpose", [u], f"{s}.attn", perm=[2, 0, 3, 1, 4])
            sizes = b.const(f"{s}.attn", np.array([1, 1, 1], np.int64))
            parts = b.node("Split", [u, sizes], f"{s}.attn", n_out=3, axis=0)
            q, k, v = (b.node("Squeeze", [t, b.const(f"{s}.attn", np.array([0], np.int64))], f"{s}.attn")
                       for t in parts)
        else:
            q = linear(h, dim, dim, f"{s}.attn.query")
            k = linear(h, dim, dim, f"{s}.attn.key")
            v = linear(h, dim, dim, f"{s}.attn.value", out_scale=head_gain)
            split = []
            for nm, u in (("query", q), ("key", k), ("value", v)):
                u = b.node("Reshape", [u, runtime_shape(u, f"{s}.attn.{nm}", [heads, dh])], f"{s}.attn.{nm}")
                split.append(b.node("Transpose", [u], f"{s}.attn.{nm}", perm=[0, 2, 1, 3]))
            q, k, v = split
        kt = b.node("Transpose", [k], f"{s}.attn", perm=[0, 1, 3, 2])
        if attention == "sdpa":
            d = b.node("Slice", [b.node("Shape", [q], f"{s}.attn"), b.const(f"{s}.attn", np.array([-1], np.int64)),
                                 b.const(f"{s}.attn", np.array([np.iinfo(np.int64).max], np.int64))], f"{s}.attn")
            d = b.node("Sqrt", [b.node("Cast", [d], f"{s}.attn", to=TensorProto.FLOAT)], f"{s}.attn")
            scale = b.node("Cast", [b.node("Div", [b.const(f"{s}.attn", np.array([1.0], np.float32)), d], f"{s}.attn")],
                           f"{s}.attn", to=TensorProto.FLOAT)
            q = b.node("Mul", [q, b.node("Sqrt", [scale], f"{s}.attn")], f"{s}.attn")
            kt = b.node("Mul", [kt, b.node("Sqrt", [scale], f"{s}.attn")], f"{s}.attn")
            sc = b.node("MatMul", [q, kt], f"{s}.attn")
        else:
            sc = b.node("MatMul", [q, kt], f"{s}.attn")
            sc = b.node("Div", [sc, b.const(f"{s}.attn", np.array(np.sqrt(dh), np.float32))], f"{s}.attn")
        p = b.node("Softmax", [sc], f"{s}.attn", axis=-1)
        o = b.node("MatMul", [p, v], f"{s}.attn")
        o = b.node("Transpose", [o], f"{s}.attn", perm=[0, 2, 1, 3])
        o = b.node("Reshape", [o, runtime_shape(o, f"{s}.attn.merge", [dim])], f"{s}.attn")
        o = linear(o, dim, dim, f"{s}.attn.proj", in_scale=head_gain, gain=0.5)
        t = b.node("Add", [t, o], f"{s}.residual1")
        h = ln(t, f"{s}.norm2")
        neuron_gain = channel_scales(b.rng, hidden, weak_neurons, spread=0.3, weak_scale=0.05)
        f = linear(h, dim, hidden, f"{s}.mlp.fc1", out_scale=neuron_gain)
        e = b.node("Div", [f, b.const(f"{s}.mlp.act", np.array(np.sqrt(2.0), np.float32))], f"{s}.mlp.act")
        e = b.node("Add", [b.node("Erf", [e], f"{s}.mlp.act"), b.const(f"{s}.mlp.act", np.array(1.0, np.float32))],
                   f"{s}.mlp.act")
        f = b.node("Mul", [b.node("Mul", [f, e], f"{s}.mlp.act"), b.const(f"{s}.mlp.act", np.array(0.5, np.float32))],
                   f"{s}.mlp.act")
        f = linear(f, hidden, dim, f"{s}.mlp.fc2", gain=0.5)
        t = b.node("Add", [t, f], f"{s}.residual2")
    t = ln(t, "norm")
    c = b.node("Gather", [t, b.const("head", np.array(0, np.int64))], "head", axis=1)
    linear(c, dim, num_classes, "head")
    b.nodes[-1].output[0] = "logits"
    m = b.model("vit_encoder", [_input(x, [1, 3, hw, hw], dynamic_batch)],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                               ["batch" if dynamic_batch else 1, num_classes])],
                doc=f"ViT encoder ({depth} blocks, {heads} heads, width {dim}, MLP {hidden}, LayerNorm {layernorm}) "
                    "built by models/build.py")
    m.opset_import[0].version = opset
    return m


@_cached
def crnn_small(seed: int = 0, hw: tuple[int, int] = (32, 320), hidden: int = 256,
               num_classes: int = 97, widths: tuple = (64, 128, 256, 256, 256)) -> onnx.ModelProto:
    """CRNN text recognizer (module docstring): input 'x' [1,3,H,W] (a text line), output 'logits'
    [W/4, 1, num_classes] (per time step). LSTM weights uniform in +-1/sqrt(hidden), as torch
    initializes them; BN statistics from smooth images."""
    h, w = hw
    b = _Builder(seed)
    y, cin = "x", 3
    for i, (cout, pool) in enumerate(zip(widths, [(2, 2), (2, 2), (2, 1), (2, 1), (2, 1)])):
        y = b.conv_bn(y, cin, cout, 3, f"backbone.{i}")
        y = b.node("MaxPool", [y], f"backbone.{i}.pool", kernel_shape=list(pool), strides=list(pool))
        cin = cout
    t_steps = w // 4
    y = b.node("Squeeze", [y, b.const("neck", np.array([2], np.int64))], "neck")  # [1, C, T]
    y = b.node("Transpose", [y], "neck", perm=[2, 0, 1])  # [T, 1, C]
    bound = 1.0 / np.sqrt(hidden)

    def uniform(*shape):
        return b.rng.uniform(-bound, bound, shape).astype(np.float32)

    lstm_w = b.init("rnn.W", uniform(2, 4 * hidden, cin))
    lstm_r = b.init("rnn.R", uniform(2, 4 * hidden, hidden))
    lstm_b = b.init("rnn.B", uniform(2, 8 * hidden))
    seq = b.node("LSTM", [y, lstm_w, lstm_r, lstm_b], "rnn", n_out=3, hidden_size=hidden,
                 direction="bidirectional")[0]  # [T, 2, 1, hidden]
    seq = b.node("Transpose", [seq], "rnn", perm=[0, 2, 1, 3])
    seq = b.node("Reshape", [seq, b.const("rnn", np.array([0, 0, -1], np.int64))], "rnn")
    wf = structured_weight(b.rng, (2 * hidden, num_classes), tau=0.3, fan_in=2 * hidden)
    logits = b.node("MatMul", [seq, b.init("head.weight_t", wf)], "head")
    b.node("Add", [logits, b.init("head.bias", np.zeros(num_classes, np.float32))], "head")
    b.nodes[-1].output[0] = "logits"
    m = b.model("crnn_small", [_input("x", [1, 3, h, w], False)],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [t_steps, 1, num_classes])],
                doc="CRNN text recognizer (conv + bidirectional LSTM) built by models/build.py")
    _data_dependent_bn(m, b.bn_nodes, smooth_images(16, (h, w), seed=21 + seed))
    return m


@_cached
def mlp(seed: int = 0, d_in: int = 64, hidden: int = 128, num_classes: int = 10,
        dynamic_batch: bool = False) -> onnx.ModelProto:
    """Three-layer perceptron: Gemm+Relu, Gemm+Relu, Gemm. Input 'x' [1,d_in], output 'logits'."""
    b = _Builder(seed)
    y = b.relu(b.gemm("x", d_in, hidden, "fc1", weak_fraction=0.2), "fc1")
    y = b.relu(b.gemm(y, hidden, hidden, "fc2", weak_fraction=0.2), "fc2")
    b.gemm(y, hidden, num_classes, "fc3")
    b.nodes[-1].output[0] = "logits"
    return b.model("mlp", [_input("x", [1, d_in], dynamic_batch)],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                  ["batch" if dynamic_batch else 1, num_classes])],
                   doc="MLP built by models/build.py")


# ---------------------------------------------------------------------------- demo
DEMO_HW = 64
DEMO_SAMPLES = 32


def demo_model(seed: int = 0) -> onnx.ModelProto:
    """The bundled demo: mobilenet_small exported torch.onnx-style (cleanup has real work), its
    BN statistics and classifier centring taken from 24 photo crops (seed 7, not the calibration
    seed) the way a trained model's come from its training images."""
    init = np.concatenate(demo_samples(24, seed=7 + seed), axis=0)
    return _mobilenet(seed, 10, DEMO_HW, True, False, init)


def demo_samples(n: int = DEMO_SAMPLES, seed: int = 0, hw: int = DEMO_HW) -> list[np.ndarray]:
    """``n`` demo inputs [1,3,hw,hw] float32: seeded crops of scikit-image's photos, resized and
    ImageNet-normalised."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.real import photos

    out = []
    for im in photos(n, (hw, hw), seed=seed):
        x = (im.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32))
    return out


def write_demo(out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``demo_cnn.onnx`` and ``calib/0000.npy ..`` into ``out_dir``; returns the model path."""
    out = Path(out_dir)
    calib = out / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    for f in calib.glob("*.npy"):
        f.unlink()
    path = out / "demo_cnn.onnx"
    onnx.save_model(demo_model(seed), str(path))
    for i, x in enumerate(demo_samples(DEMO_SAMPLES, seed)):
        np.save(calib / f"{i:04d}.npy", x)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"), help="output folder for the demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="also write every example model into --out")
    args = ap.parse_args(argv)
    path = write_demo(args.out, args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes) and {DEMO_SAMPLES} samples in {path.parent / 'calib'}")
    if args.all:
        for fn in (resnet_small, mobilenet_small, transformer_block, mlp):
            p = Path(args.out) / f"{fn.__name__}.onnx"
            onnx.save_model(fn(seed=args.seed), str(p))
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
