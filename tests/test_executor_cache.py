"""Executor interface (serial and process pool give identical results) and the measurement cache."""

import numpy as np
import onnx
import pytest

from onnxshrink.cache import MeasurementCache, data_digest, digest, model_digest
from onnxshrink.executor import ProcessExecutor, SerialExecutor, get_executor
from onnxshrink.errors import UsageError


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


def test_cache_roundtrip(tmp_path):
    c = MeasurementCache(tmp_path)
    k = digest("unit", 0.5, data_digest([{"x": np.ones(3)}]))
    assert c.get(k) is None
    c.put(k, {"cosine": 0.99})
    assert MeasurementCache(tmp_path).get(k) == {"cosine": 0.99}
    assert c.misses == 1
    off = MeasurementCache(tmp_path, enabled=False)
    assert off.get(k) is None
