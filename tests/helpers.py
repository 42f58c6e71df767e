"""Test helpers: run models on onnxruntime with graph optimizations disabled, compare, check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def run_ort(model: onnx.ModelProto, feeds: dict, optimize: bool = False) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_outputs_close(a: list, b: list, rtol_scale: float = 1e-4) -> None:
    """Every output equal within ``rtol_scale`` of the output's scale (max |a|)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-6)
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        assert err <= rtol_scale * scale, f"max abs diff {err:.3e} > {rtol_scale:g} x scale {scale:.3e}"


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def normal_samples(n: int = 12, seed: int = 1, name: str = "x", shape=(1, 3, 16, 16)) -> list[dict]:
    """``n`` seeded standard-normal float32 input dicts for a single-input test model."""
    r = np.random.default_rng(seed)
    return [{name: r.standard_normal(shape).astype(np.float32)} for _ in range(n)]
