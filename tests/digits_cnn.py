"""A small CNN trained in numpy on scikit-learn's ``load_digits`` (8x8 images, real labels),
exported as ONNX, with helpers writing its calibration / validation folders (labels.npy beside).

Network: Conv 3x3 (1->16, pad 1) -> Relu -> Conv 3x3 stride 2 (16->32, pad 1) -> Relu -> Flatten
-> Gemm 512->64 -> Relu -> Gemm 64->10 (logits). Trained with Adam on softmax cross-entropy,
convolutions as im2col matrix products (forward and backward), fixed seed: ~97 % test accuracy in
a few seconds on one core, no torch needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _im2col(x: np.ndarray, k: int, stride: int, pad: int):
    """x (B, C, H, W) -> patches (B, OH, OW, C*k*k) in (c, kh, kw) order, and (OH, OW)."""
    B, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    OH, OW = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    cols = np.empty((B, C, k, k, OH, OW), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + stride * OH:stride, j:j + stride * OW:stride]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(B, OH, OW, C * k * k), (OH, OW)


def _col2im(dcols: np.ndarray, shape, k: int, stride: int, pad: int, out_hw) -> np.ndarray:
    B, C, H, W = shape
    OH, OW = out_hw
    d = dcols.reshape(B, OH, OW, C, k, k).transpose(0, 3, 4, 5, 1, 2)
    dx = np.zeros((B, C, H + 2 * pad, W + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * OH:stride, j:j + stride * OW:stride] += d[:, :, i, j]
    return dx[:, :, pad:pad + H, pad:pad + W]


def _conv_fwd(x, W, b, stride, pad):
    cols, hw = _im2col(x, W.shape[2], stride, pad)
    y = cols @ W.reshape(W.shape[0], -1).T + b  # (B, OH, OW, Cout)
    return y.transpose(0, 3, 1, 2), (cols, hw)


def _conv_bwd(dy, x_shape, W, cache, stride, pad):
    cols, hw = cache
    d = dy.transpose(0, 2, 3, 1)  # (B, OH, OW, Cout)
    dW = (d.reshape(-1, d.shape[-1]).T @ cols.reshape(-1, cols.shape[-1])).reshape(W.shape)
    db = d.sum(axis=(0, 1, 2))
    dcols = d @ W.reshape(W.shape[0], -1)
    return _col2im(dcols, x_shape, W.shape[2], stride, pad, hw), dW, db


def digits_split():
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) scaled to [0, 1], a fixed split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


@functools.lru_cache(maxsize=1)
def train_digits_cnn(epochs: int = 8, seed: int = 0) -> dict:
    """Weights of the CNN trained on the training split (deterministic for a seed)."""
    xtr, ytr, _, _ = digits_split()
    rng = np.random.default_rng(seed)

    def he(*shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    p = {"W1": he(16, 1, 3, 3, fan_in=9), "b1": np.zeros(16, np.float32),
         "W2": he(32, 16, 3, 3, fan_in=144), "b2": np.zeros(32, np.float32),
         "W3": he(512, 64, fan_in=512), "b3": np.zeros(64, np.float32),
         "W4": he(64, 10, fan_in=64), "b4": np.zeros(10, np.float32)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    lr, b1, b2, t = 2e-3, 0.9, 0.999, 0
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for s in range(0, len(order), 32):
            idx = order[s:s + 32]
            x, y = xtr[idx], ytr[idx]
            h1, c1 = _conv_fwd(x, p["W1"], p["b1"], 1, 1)
            a1 = np.maximum(h1, 0)
            h2, c2 = _conv_fwd(a1, p["W2"], p["b2"], 2, 1)
            a2 = np.maximum(h2, 0)
            f = a2.reshape(len(x), -1)
            h3 = f @ p["W3"] + p["b3"]
            a3 = np.maximum(h3, 0)
            z = a3 @ p["W4"] + p["b4"]
            z = z - z.max(axis=1, keepdims=True)
            pr = np.exp(z)
            pr /= pr.sum(axis=1, keepdims=True)
            dz = pr
            dz[np.arange(len(y)), y] -= 1
            dz /= len(y)
            g = {"W4": a3.T @ dz, "b4": dz.sum(0)}
            da3 = dz @ p["W4"].T * (h3 > 0)
            g["W3"], g["b3"] = f.T @ da3, da3.sum(0)
            da2 = (da3 @ p["W3"].T).reshape(a2.shape) * (h2 > 0)
            da1, g["W2"], g["b2"] = _conv_bwd(da2, a1.shape, p["W2"], c2, 2, 1)
            da1 = da1 * (h1 > 0)
            _, g["W1"], g["b1"] = _conv_bwd(da1, x.shape, p["W1"], c1, 1, 1)
            t += 1
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return p


def digits_model(params: dict | None = None) -> onnx.ModelProto:
    """The trained CNN as an ONNX model: input ``image`` [1, 1, 8, 8], output ``logits`` [1, 10]."""
    p = params or train_digits_cnn()
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["image", "W1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "W2", "b2"], ["h2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Flatten", ["a2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["h3"], name="fc1"),
        helper.make_node("Relu", ["h3"], ["a3"], name="relu3"),
        helper.make_node("Gemm", ["a3", "W4", "b4"], ["logits"], name="fc2"),
    ]
    g = helper.make_graph(nodes, "digits_cnn",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="digits_cnn")
    model.ir_version = 8
    return model


def write_digits_folder(folder: Path, x: np.ndarray, y: np.ndarray | None) -> Path:
    """One .npy per image (file-name order) and, with ``y``, labels.npy beside them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        np.save(folder / f"{i:04d}.npy", img[None].astype(np.float32))
    if y is not None:
        np.save(folder / "labels.npy", np.asarray(y, dtype=np.int64))
    return folder


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = [int(np.argmax(sess.run(None, {"image": img[None]})[0])) for img in x]
    return float(np.mean(np.array(pred) == y))
