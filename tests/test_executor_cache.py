"""Executor interface (serial and process pool give identical results; tests/test_executor_ray.py has
Ray's) and the measurement cache."""

import numpy as np
import onnx
import pytest

from onnxshrink.cache import MeasurementCache, data_digest, digest, model_digest
from onnxshrink.errors import UsageError
from onnxshrink.pipeline.executor import ProcessExecutor, SerialExecutor, get_executor


def _square_sum(seed):
    rng = np.random.default_rng(seed)
    return float(np.sum(rng.standard_normal(100) ** 2))


def test_process_pool_matches_serial():
    items = list(range(6))
    serial = SerialExecutor().map(_square_sum, items)
    with ProcessExecutor(2) as ex:
        parallel = ex.map(_square_sum, items)
    assert serial == parallel


def test_get_executor_names():
    assert get_executor("serial").name == "serial"
    assert get_executor("auto", n_tasks=1).name == "serial"
    with pytest.raises(UsageError):
        get_executor("bogus")


def test_ray_missing_is_a_usage_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(UsageError, match="pip install ray"):
        get_executor("ray")


def test_share_file_is_a_no_op_where_workers_see_the_files(tmp_path):
    f = tmp_path / "bundle.pkl"
    f.write_bytes(b"x")
    SerialExecutor().share_file(str(f))
    with ProcessExecutor(1) as ex:
        ex.share_file(str(f))
        assert ex.map(_square_sum, [0]) == [_square_sum(0)]


def _model(w):
    return onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(np.asarray(w, np.float32), "w")]))


def test_model_digest_sees_weights():
    a = model_digest(_model([[1, 2], [3, 4]]))
    assert a == model_digest(_model([[1, 2], [3, 4]]))
    assert a != model_digest(_model([[1, 2], [3, 5]]))


def test_model_digest_sees_model_local_functions_not_metadata():
    """The manager's selection memo is keyed by it: a model-local function is part of what the model
    computes (two models differing only there are two models); the doc string and metadata are not."""
    base = _model([[1, 2], [3, 4]])
    a = model_digest(base)
    described = _model([[1, 2], [3, 4]])
    described.doc_string = "exported by a test"
    onnx.helper.set_model_props(described, {"author": "test"})
    assert model_digest(described) == a
    with_relu, with_neg = model_digest(_with_function("Relu")), model_digest(_with_function("Neg"))
    assert len({a, with_relu, with_neg}) == 3
    assert with_relu == model_digest(_with_function("Relu"))


def _with_function(op: str) -> onnx.ModelProto:
    m = _model([[1, 2], [3, 4]])
    m.functions.append(onnx.helper.make_function("local", "f", ["a"], ["b"], [
        onnx.helper.make_node(op, ["a"], ["b"])], [onnx.helper.make_opsetid("", 17)]))
    return m


def test_cache_roundtrip(tmp_path):
    c = MeasurementCache(tmp_path)
    k = digest("unit", 0.5, data_digest([{"x": np.ones(3)}]))
    assert c.get(k) is None
    c.put(k, {"cosine": 0.99})
    assert MeasurementCache(tmp_path).get(k) == {"cosine": 0.99}
    assert c.misses == 1
    off = MeasurementCache(tmp_path, enabled=False)
    assert off.get(k) is None


def test_cache_entries_belong_to_their_environment(tmp_path):
    """A measurement taken with other versions of onnxshrink/onnxruntime/numpy or on another machine
    is never read back."""
    c = MeasurementCache(tmp_path)
    k = digest("unit", 0.25)
    c.put(k, {"cosine": 0.9})
    other = MeasurementCache(tmp_path)
    other.environment = c.environment.replace(c.environment.split("|")[1], "0.0.0-other-onnxruntime")
    assert other.environment != c.environment
    assert other.get(k) is None and MeasurementCache(tmp_path).get(k) == {"cosine": 0.9}
