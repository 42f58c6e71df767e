"""Model I/O: load (external data), atomic save (external data past the limit or on request),
model-level fields kept, the input never modified, and the >2 GB code paths (checker by path,
onnxruntime session from a path, external-data output, in-place capture) exercised on tiny
models by lowering the size threshold (the real >2 GB run is in test_large.py, slow)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxshrink.model as model_io
from models.build import mlp, mobilenet_small
from onnxshrink import PassManager, optimize
from onnxshrink.errors import InputError, UsageError
from onnxshrink.runtime import capture_activations, make_session
from tests.helpers import assert_outputs_close, run_ort
from tests.reliability_helpers import sha256, snapshot


def _with_fields(m: onnx.ModelProto) -> onnx.ModelProto:
    m.producer_name, m.producer_version, m.doc_string, m.model_version = "pytorch", "2.3.0", "doc", 7
    m.domain = "ai.example"
    helper.set_model_props(m, {"author": "someone", "license": "MIT"})
    m.opset_import.append(helper.make_opsetid("com.example", 2))
    return m


def test_roundtrip_keeps_fields(tmp_path):
    m = _with_fields(mlp())
    p = model_io.save(m, tmp_path / "m.onnx")
    back = model_io.load(p)
    assert back == m
    assert {x.key: x.value for x in back.metadata_props} == {"author": "someone", "license": "MIT"}


def test_manager_keeps_fields():
    m = _with_fields(mobilenet_small(pytorch_style=True))
    out, _ = PassManager(["t_strip_identity"]).run(m)
    assert (out.producer_name, out.producer_version, out.doc_string, out.model_version, out.domain) == \
        ("pytorch", "2.3.0", "doc", 7, "ai.example")
    assert {o.domain: o.version for o in out.opset_import} == {"": 17, "com.example": 2}
    assert {x.key: x.value for x in out.metadata_props} == {"author": "someone", "license": "MIT"}
    assert out.ir_version == m.ir_version


def test_save_external_on_request_and_load(tmp_path):
    m = mlp()
    p = model_io.save(m, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    assert (tmp_path / "m.onnx").stat().st_size < 5000
    assert model_io.external_data_files(p) == [tmp_path / "m.onnx.data"]
    assert model_io.load(p) == m
    assert m == mlp()  # the caller's model keeps its weights inline
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_save_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    (tmp_path / "m.onnx").write_bytes(b"old")
    monkeypatch.setattr(model_io.onnx, "save_model", fail)
    with pytest.raises(UsageError, match="No space left on device"):
        model_io.save(mlp(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"old"


def test_save_refuses_input(tmp_path):
    p = model_io.save(mlp(), tmp_path / "m.onnx")
    h = sha256(p)
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        model_io.save(mlp(), tmp_path / "m.onnx", input_path=p)
    os.link(p, tmp_path / "hard.onnx")
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        model_io.save(mlp(), tmp_path / "hard.onnx", input_path=p)
    assert sha256(p) == h


def test_an_existing_output_outside_the_inputs_folder_is_checked_without_reading_the_input(tmp_path, monkeypatch):
    """An input's external data lies in its folder (onnx refuses locations outside it): an existing output
    elsewhere cannot be one of its files, so the input is not parsed to list them; a hard link to one
    of them elsewhere is still refused."""
    src, out = tmp_path / "models", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    onnx.save_model(mlp(), str(src / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (out / "o.onnx").write_bytes(b"an earlier run's output")
    os.link(src / "w.bin", out / "linked.bin")
    parsed = []
    listing = model_io.external_data_files
    monkeypatch.setattr(model_io, "external_data_files", lambda p: parsed.append(p) or listing(p))
    model_io.check_output_path(out / "o.onnx", src / "in.onnx")
    assert parsed == []
    with pytest.raises(UsageError, match="would overwrite the input's external data file"):
        model_io.check_output_path(out / "linked.bin", src / "in.onnx")
    assert len(parsed) == 1
    # the input was parsed once (for the hard link) for every output path checked against it, and is
    # parsed again once it changed
    loads = []
    load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    (src / "o.onnx").write_bytes(b"an earlier run's output, next to the input")
    for _ in range(3):
        model_io.check_output_path(src / "o.onnx", src / "in.onnx")
    assert loads == []
    (out / "linked.bin").unlink()  # onnx refuses to write external data that has another hard link
    onnx.save_model(mlp(), str(src / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    os.utime(src / "in.onnx", ns=(1, 1))
    model_io.check_output_path(src / "o.onnx", src / "in.onnx")
    assert len(loads) == 1


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        model_io.load(tmp_path / "x.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        model_io.load(tmp_path / "d.onnx")
    # a protobuf that parses but is not a model (an empty TensorProto's bytes are b"")
    (tmp_path / "t.onnx").write_bytes(onnx.numpy_helper.from_array(np.zeros(3, np.float32)).SerializeToString())
    with pytest.raises(InputError):
        model_io.load(tmp_path / "t.onnx")


def test_external_data_outside_folder_rejected(tmp_path):
    """A model whose external data location points outside its folder is refused, not read."""
    m = mlp()
    model_io.save(m, tmp_path / "m.onnx", external_data=True)
    mp = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in mp.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../../etc/passwd"
    (tmp_path / "evil.onnx").write_bytes(mp.SerializeToString())
    with pytest.raises(InputError):
        model_io.load(tmp_path / "evil.onnx")


# ---------------------------------------------------------------------------- >2 GB paths, small
@pytest.fixture
def tiny_threshold(monkeypatch):
    """Treat every model over 1 kB of weights as 'past the protobuf limit'."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)


def test_large_paths_check_and_session(tiny_threshold):
    m = mlp()
    assert model_io.is_large(m)
    before = m.SerializeToString()
    model_io.check_model(m, full_check=True)
    x = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    sess = make_session(m, optimize=False)
    assert_outputs_close(run_ort(m, x), sess.run(None, x))
    assert m.SerializeToString() == before  # weights back inline, nothing else changed


def test_large_paths_capture_in_place(tiny_threshold):
    m = mlp()
    before = m.SerializeToString()
    names = [n.output[0] for n in m.graph.node[:2]]
    x = [{"x": np.ones((1, 64), np.float32)}]
    got = list(capture_activations(m, names, x))
    assert set(got[0]) == set(names) and got[0][names[0]].shape == (1, 128)
    assert m.SerializeToString() == before  # outputs added for the session were removed again


def test_a_kept_model_is_written_once_while_held_and_afresh_when_changed(tiny_threshold, monkeypatch):
    """``kept_written``: every ``written`` of the held model reads one file, written at the first call;
    a model changed in place since (an output appended, as a capture does) is written afresh; the file
    is removed when the last hold exits."""
    m = mlp()
    writes = []
    real = model_io.write_external
    monkeypatch.setattr(model_io, "write_external", lambda model, path, *a, **k: writes.append(path) or
                        real(model, path, *a, **k))
    with model_io.kept_written(m, 1):
        assert not writes  # nothing written until a tool asks
        with model_io.kept_written(m, 1):  # nested holds share the file
            with model_io.written(m, 1) as first:
                pass
        with model_io.written(m, 1) as second:
            pass
        assert first == second and writes == [first] and os.path.exists(first)
        x = [{"x": np.ones((1, 64), np.float32)}]
        got = list(capture_activations(m, [m.graph.node[0].output[0]], x))  # outputs appended in place
        assert got[0][m.graph.node[0].output[0]].shape == (1, 128)
        assert len(writes) == 2 and writes[1] != first  # the changed model: a file of its own
        with model_io.written(m, 1) as third:  # changed back: the kept file again
            pass
        assert third == first and len(writes) == 2
    assert not os.path.exists(first) and not model_io._KEPT


def test_large_paths_end_to_end(tmp_path, tiny_threshold):
    """optimize writes OUT + OUT.data, which loads back and computes the same outputs."""
    src = tmp_path / "m.onnx"
    onnx.save(mobilenet_small(pytorch_style=True), str(src))
    h = sha256(src)
    out, rep = optimize(src, tmp_path / "o.onnx", passes=["t_strip_identity", "t_noop"])
    assert rep.passes[0].status == "applied"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx", "o.onnx.data"]
    back = model_io.load(tmp_path / "o.onnx")
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    assert_outputs_close(run_ort(onnx.load(str(src)), x), run_ort(back, x))
    assert sha256(src) == h


def test_large_input_with_external_data_unchanged(tmp_path, tiny_threshold):
    """An input stored with external data: both files unchanged; OUT never shares IN's data file."""
    model_io.save(mlp(), tmp_path / "in.onnx", external_data=True)
    snap = snapshot(tmp_path)
    optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["t_noop"])
    after = snapshot(tmp_path)
    assert {k: after[k] for k in snap} == snap
    assert set(after) == set(snap) | {"out.onnx", "out.onnx.data"}


def test_write_external_subgraphs_and_constants(tmp_path):
    """Big Constant-node tensors and big initializers inside subgraphs go external too; the model
    object is left byte-for-byte as it was; the written model loads back equal."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((64, 64)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 64])],
                               [onnx.numpy_helper.from_array(big, "wt")])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=onnx.numpy_helper.from_array(big[:1]))],
                               "else", [], [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1, 64])])
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(big)),
         helper.make_node("If", ["cond"], ["y0"], then_branch=then_g, else_branch=else_g),
         helper.make_node("MatMul", ["y0", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    before = m.SerializeToString()
    p = model_io.write_external(m, tmp_path / "m.onnx")
    assert m.SerializeToString() == before
    light = onnx.load(str(p), load_external_data=False)
    assert len(light.SerializeToString()) < 2000  # all three big tensors went to m.onnx.data
    onnx.checker.check_model(str(p), full_check=True)
    assert model_io.load(p) == m
    feeds = {"x": rng.standard_normal((1, 64)).astype(np.float32), "cond": np.array(True)}
    import onnxruntime as ort
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], run_ort(m, feeds)[0], rtol=1e-5, atol=1e-5)


def test_weightless_copy_keeps_structure():
    m = mobilenet_small()
    light = model_io.weightless_copy(m, threshold=64)
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in m.graph.node]
    assert len(light.SerializeToString()) < len(m.SerializeToString()) / 4
    from onnxshrink.graph.cost import model_cost
    assert model_cost(light)["macs"] == model_cost(m)["macs"]


@pytest.mark.parametrize("touch_values", [False, True])
def test_huge_tensor_export_path(monkeypatch, touch_values):
    """Tensors past 2 GiB are exported as placeholders and filled afterwards (exercised here by
    lowering the size limit): the exported model equals the plain export, lazily loaded or not."""
    import onnxshrink.graph.convert as convert

    m = mobilenet_small()
    plain = convert.graph_to_model(convert.model_to_graph(m), m)
    monkeypatch.setattr(convert, "HUGE_TENSOR_BYTES", 1000)
    g = convert.model_to_graph(m)
    if touch_values:  # a pass that loaded the values into numpy
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                _ = t.values
    filled = []
    real_fill = convert._fill_huge_constants
    monkeypatch.setattr(convert, "_fill_huge_constants",
                        lambda model, held: filled.extend(held) or real_fill(model, held))
    out = convert.graph_to_model(g, m)
    assert len(filled) > 10  # the placeholder path was taken
    assert out == plain
    big = [t for t in g.tensors().values() if isinstance(t, gs.Constant) and t.values.nbytes >= 1000]
    assert big and all(t.values.size == int(np.prod(t.shape)) for t in big)  # graph left as it was


@pytest.mark.parametrize("touch_values", [False, True])
def test_write_graph_streams_huge_constants_into_the_external_file(tmp_path, monkeypatch, touch_values):
    """``write_graph`` writes what ``graph_to_model`` exports, the huge constants (here: past a lowered
    limit) streamed from their values, lazily loaded or numpy, into the external data file."""
    import onnxshrink.graph.convert as convert

    m = mobilenet_small()
    plain = convert.graph_to_model(convert.model_to_graph(m), m)
    monkeypatch.setattr(convert, "HUGE_TENSOR_BYTES", 1000)
    g = convert.model_to_graph(m)
    if touch_values:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                _ = t.values
    path = convert.write_graph(g, tmp_path / "m.onnx", m)
    skeleton = onnx.load(str(path), load_external_data=False)
    external = [t for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 10
    assert model_io.load(path) == plain


def test_a_session_holds_no_copy_of_the_serialized_model():
    """onnxruntime's Python session keeps the bytes it was built from (for an EP fallback); a CPU
    session from ``make_session`` drops them (one model's worth of memory per open session) and
    still runs."""
    m = mlp()
    sess = make_session(m)
    assert getattr(sess, "_model_bytes", "attribute gone") is None
    x = np.zeros([d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim], np.float32)
    assert sess.run(None, {m.graph.input[0].name: x})[0].shape


def test_check_model_of_a_big_model_reads_a_file_and_still_finds_errors(monkeypatch):
    """Past ``VIA_FILE_BYTES`` of weights the checker reads a temporary file with external
    weights (no serialized copy in memory); a valid model passes, a broken one is still refused."""
    monkeypatch.setattr(model_io, "VIA_FILE_BYTES", 1024)
    calls = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, **k: (calls.append(type(m)), real(m, **k))[1])
    m = mlp()
    model_io.check_model(m)
    assert calls == [str]  # by path
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bad.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(onnx.checker.ValidationError):
        model_io.check_model(bad)
