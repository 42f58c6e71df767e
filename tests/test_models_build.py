"""models/build.py: every example model is valid (full checker), runs in onnxruntime, is
deterministic, and has the structure the docs promise; the bundled demo matches the builder."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import build
from tests.helpers import run_ort

ROOT = Path(__file__).resolve().parents[1]

BUILDERS = {
    "resnet_small": (build.resnet_small, {"input": (1, 3, 32, 32)}, [(1, 10)]),
    "mobilenet_small": (build.mobilenet_small, {"input": (1, 3, 64, 64)}, [(1, 10)]),
    "transformer_block": (build.transformer_block, {"x": (1, 16, 64)}, [(1, 16, 64)]),
    "mlp": (build.mlp, {"x": (1, 64)}, [(1, 10)]),
}


def _ops(m: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in m.graph.node)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_valid_and_runs(name):
    fn, inputs, out_shapes = BUILDERS[name]
    m = fn()
    onnx.checker.check_model(m, full_check=True)
    assert any(o.domain in ("", "ai.onnx") and o.version == build.OPSET for o in m.opset_import)
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    outs = run_ort(m, feeds)
    assert [o.shape for o in outs] == out_shapes
    assert all(np.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_deterministic_and_seeded(name):
    fn = BUILDERS[name][0]
    a = fn().SerializeToString()
    fn.cache_clear()
    assert fn().SerializeToString() == a  # rebuilt from scratch: same bytes
    assert fn(seed=1).SerializeToString() != a


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_returns_independent_copies(name):
    fn = BUILDERS[name][0]
    m = fn()
    m.graph.node.pop()
    assert len(fn().graph.node) == len(m.graph.node) + 1


def test_dynamic_batch():
    m = build.resnet_small(dynamic_batch=True)
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    out = run_ort(m, {"input": np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert out.shape == (3, 10)


def test_structure_resnet():
    ops = _ops(build.resnet_small())
    assert ops["Conv"] == 8 and ops["BatchNormalization"] == 8
    assert ops["Add"] == 3 and ops["GlobalAveragePool"] == 1 and ops["Flatten"] == 1 and ops["Gemm"] == 1


def test_structure_mobilenet():
    m = build.mobilenet_small()
    ops = _ops(m)
    depthwise = [n for n in m.graph.node if n.op_type == "Conv"
                 and next(a.i for a in n.attribute if a.name == "group") > 1]
    assert len(depthwise) >= 5
    assert ops["Concat"] == 1 and ops["Add"] >= 2 and ops["Clip"] >= 10
    assert ops["Constant"] == 0 and ops["Identity"] == 0


def test_structure_transformer():
    ops = _ops(build.transformer_block())
    assert ops["LayerNormalization"] == 2 and ops["Softmax"] == 1
    assert ops["MatMul"] >= 6 and ops["Gemm"] == 2 and ops["Erf"] == 1


def test_weights_have_structure():
    """Low-rank-ish weights (svd has work) and weak BN channels (prune has work)."""
    m = build.mobilenet_small()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w = inits["features.7.conv.weight"].reshape(64, -1)
    s = np.linalg.svd(w, compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert np.searchsorted(energy, 0.95) + 1 <= 0.6 * len(s)
    gamma = inits["features.2.conv.0.bn.weight"]
    assert (np.abs(gamma) < 0.1 * np.median(np.abs(gamma))).sum() >= 0.15 * gamma.size


def test_pytorch_style_export_equals_plain():
    """The torch-style export (Constant/Identity nodes, view-as-Reshape) computes the same function."""
    plain = build.mobilenet_small()
    torch_like = build.mobilenet_small(pytorch_style=True)
    onnx.checker.check_model(torch_like, full_check=True)
    ops = _ops(torch_like)
    assert ops["Constant"] >= 10 and ops["Identity"] >= 2 and ops["Shape"] == 1 and ops["Flatten"] == 0
    x = build.smooth_images(1, (64, 64), seed=3)
    np.testing.assert_allclose(run_ort(plain, {"input": x})[0], run_ort(torch_like, {"input": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_demo_files_match_builder(tmp_path):
    """models/demo is what ``python models/build.py --out models/demo`` writes (byte-identical)."""
    demo = ROOT / "models" / "demo"
    model = demo / "demo_cnn.onnx"
    assert model.exists(), "run: python models/build.py --out models/demo"
    assert model.stat().st_size < 1_000_000
    calib = sorted((demo / "calib").glob("*.npy"))
    assert len(calib) == build.DEMO_SAMPLES
    assert sum(f.stat().st_size for f in calib) < 2_100_000
    path = build.write_demo(tmp_path)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(model.read_bytes()).digest()
    for f in calib:
        assert (tmp_path / "calib" / f.name).read_bytes() == f.read_bytes()


def test_demo_runs_on_its_data_and_classes_differ():
    m = onnx.load(str(ROOT / "models" / "demo" / "demo_cnn.onnx"))
    onnx.checker.check_model(m, full_check=True)
    ops = _ops(m)
    assert ops["BatchNormalization"] > 10 and ops["Constant"] > 10 and ops["Identity"] >= 2
    xs = [np.load(f) for f in sorted((ROOT / "models" / "demo" / "calib").glob("*.npy"))]
    assert all(x.shape == (1, 3, 64, 64) and x.dtype == np.float32 for x in xs)
    assert abs(float(np.mean(xs))) < 1.0 and 0.3 < float(np.std(xs)) < 2.0  # ImageNet-normalised photos
    top1 = [int(np.argmax(run_ort(m, {"input": x})[0])) for x in xs]
    assert len(set(top1)) >= 4  # real inputs give different classes: top1 agreement is meaningful
