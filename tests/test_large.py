"""Models past protobuf's 2 GB limit.

``write_large_model`` writes a language-model-shaped network whose bulk is one embedding table
(vocab x dim float32, 2 GiB at the default size) followed by a small MLP head, straight to
``model.onnx`` + ``model.onnx.data`` (external data) one chunk at a time, so generating it never
holds the model in memory.

The slow test runs ``onnxshrink optimize`` on it in a subprocess (lossless pass, then ``svd`` and
``quantize`` when registered) and reports the child's peak RSS (``ru_maxrss``) against the model
size; the output must come out with external data, load, pass the checker by path and compute
the original's outputs. The default suite runs the same code on a tiny model with the size
threshold lowered, so the plumbing is exercised on every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxshrink.model as model_io
from onnxshrink.passes.registry import registry
from tests.reliability_helpers import sha256, write_npy_dir

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_OVER_MODEL = 6.0


def _external(name: str, dims, location: str, offset: int, length: int, dtype=TensorProto.FLOAT) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def write_large_model(folder, vocab: int = 262_144, dim: int = 2048, hidden: int = 256, classes: int = 16,
                      seq: int = 8, seed: int = 0, chunk_rows: int = 16_384) -> Path:
    """ids [1,seq] int64 -> Gather from two tables [vocab/2, dim] at ids mod vocab/2, summed ->
    ReduceMean over seq -> Identity ->
    Gemm(dim->hidden, low-rank) -> Relu -> Gemm(hidden->classes) -> logits [1,classes].
    Weights go to ``model.onnx.data`` (4 kB-aligned), written chunk by chunk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    inits = []
    with open(folder / data_name, "wb") as f:
        def add(name, arr_or_chunks, dims):
            off = f.tell()
            pad = (-off) % 4096
            f.write(b"\0" * pad)
            off += pad
            n = 0
            for a in arr_or_chunks:
                b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
                f.write(b)
                n += len(b)
            inits.append(_external(name, dims, data_name, off, n))

        def table_chunks(n_rows):
            for r0 in range(0, n_rows, chunk_rows):
                rows = min(chunk_rows, n_rows - r0)
                yield rng.standard_normal((rows, dim), dtype=np.float32)

        # two tables (token and "segment" embeddings, summed): each 1 GiB at the default size. A
        # single tensor of 2 GiB or more cannot pass onnx-graphsurgeon's export (python protobuf
        # copies a message between arenas by serializing it): documented in docs/errors.md.
        half = vocab // 2
        add("embed.weight", table_chunks(half), (half, dim))
        add("embed2.weight", table_chunks(half), (half, dim))
        a = rng.standard_normal((hidden, 32)).astype(np.float32)
        b = rng.standard_normal((32, dim)).astype(np.float32)
        w1 = ((a @ b + 0.05 * rng.standard_normal((hidden, dim)).astype(np.float32))
              * np.float32(np.sqrt(2.0 / dim) / np.sqrt(32)))
        add("fc1.weight", [w1], (hidden, dim))
        add("fc1.bias", [0.01 * rng.standard_normal(hidden)], (hidden,))
        add("fc2.weight", [rng.standard_normal((classes, hidden)) * np.sqrt(2.0 / hidden)], (classes, hidden))
        add("fc2.bias", [np.zeros(classes)], (classes,))
    inits.append(onnx.numpy_helper.from_array(np.array(vocab // 2, np.int64), "half"))
    nodes = [
        helper.make_node("Mod", ["ids", "half"], ["ids_a"], name="ids_a"),
        helper.make_node("Gather", ["embed.weight", "ids_a"], ["emb_a"], name="embed", axis=0),
        helper.make_node("Gather", ["embed2.weight", "ids_a"], ["emb_b"], name="embed2", axis=0),
        helper.make_node("Add", ["emb_a", "emb_b"], ["emb"], name="embed_sum"),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Identity", ["pooled"], ["pooled_id"], name="dropout"),
        helper.make_node("Gemm", ["pooled_id", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="act"),
        helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    g = helper.make_graph(nodes, "large_lm_head", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxshrink-tests")
    m.ir_version = 8
    (folder / "model.onnx").write_bytes(m.SerializeToString())  # small: the weights are external
    return folder / "model.onnx"


def _calib(folder, n: int, vocab: int, seq: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    return write_npy_dir(folder, [rng.integers(0, vocab, (1, seq)).astype(np.int64) for _ in range(n)])


def _pipeline() -> list[str]:
    reg = registry()
    passes = ["cleanup" if "cleanup" in reg else "t_strip_identity"]
    passes += [p for p in ("svd", "quantize") if p in reg]
    return passes


_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {root!r})
    import tests.fake_passes
    from onnxshrink.cli import main
    t = time.time()
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code or 0
    finally:
        with open({stats!r}, "w") as f:
            json.dump({{"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       "seconds": time.time() - t, "exit": code}}, f)
""")


def test_large_plumbing_on_tiny_model(tmp_path, monkeypatch):
    """The same generator and pipeline, tiny, with the external-data threshold lowered."""
    from onnxshrink import optimize

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    src = write_large_model(tmp_path / "in", vocab=512, dim=64, hidden=16, classes=4, chunk_rows=100)
    cal = _calib(tmp_path / "cal", 8, 512, 8)
    h = (sha256(src), sha256(src.with_name("model.onnx.data")))
    out, rep = optimize(src, tmp_path / "out.onnx", passes=["t_strip_identity"], data=str(cal))
    assert rep.passes[0].status == "applied"
    assert (tmp_path / "out.onnx.data").exists()
    back = model_io.load(tmp_path / "out.onnx")
    ids = {"ids": np.arange(8, dtype=np.int64)[None]}
    from onnxshrink.runtime import make_session
    ref = make_session(model_io.load(src), optimize=False).run(None, ids)[0]
    got = make_session(back, optimize=False).run(None, ids)[0]
    np.testing.assert_allclose(ref, got, rtol=1e-5, atol=1e-6)
    assert (sha256(src), sha256(src.with_name("model.onnx.data"))) == h


def test_a_large_input_is_released_once_a_pass_replaced_it(tmp_path, monkeypatch):
    """Past the external-data threshold (lowered here), once a pass has replaced the input the manager
    keeps the input as a weightless skeleton (its big tensors without data) and exports with it; the
    result still equals the input's outputs, with its own weights intact."""
    from onnxshrink.pipeline.manager import PassManager

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    src = write_large_model(tmp_path / "in", vocab=512, dim=64, hidden=16, classes=4, chunk_rows=100)
    cal = _calib(tmp_path / "cal", 8, 512, 8)
    pm = PassManager(["cleanup"], data=str(cal))
    result, rep = pm.run(src)
    assert rep.passes[0].status == "applied"
    assert model_io.is_large(pm.original)  # a skeleton of the same model: its dims still count
    big = [t for t in pm.original.graph.initializer if t.name == "embed.weight"]
    assert big and not big[0].raw_data and not big[0].float_data  # no data kept
    assert {t.name for t in result.graph.initializer} >= {"embed.weight", "embed2.weight"}
    assert all(len(t.raw_data) == 4 * int(np.prod(t.dims)) for t in result.graph.initializer
               if t.name.startswith("embed"))
    ids = {"ids": (np.arange(8, dtype=np.int64) * 37 % 512)[None]}
    from onnxshrink.runtime import make_session
    ref = make_session(model_io.load(src), optimize=False).run(None, ids)[0]
    got = make_session(result, optimize=False).run(None, ids)[0]
    np.testing.assert_allclose(ref, got, rtol=1e-5, atol=1e-6)


def test_a_big_model_is_written_once_per_validation_and_its_input_never(tmp_path, monkeypatch):
    """A model past the external-data threshold (lowered here) goes to the checker and onnxruntime as a
    file: the input read from a file is checked and run from that file (never written), and each
    candidate is written once for its check, every session of its validation and, once it is the
    current model, every later session (``model.kept_written``)."""
    from onnxshrink.pipeline.manager import PassManager

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    events = []
    real_write = model_io.write_external
    monkeypatch.setattr(model_io, "write_external", lambda *a, **k: events.append("write") or real_write(*a, **k))
    real_validate = PassManager._validate

    def validate(self, *a, **k):
        events.append("validate")
        out = real_validate(self, *a, **k)
        events.append("validated")
        return out

    monkeypatch.setattr(PassManager, "_validate", validate)
    src = write_large_model(tmp_path / "in", vocab=512, dim=64, hidden=16, classes=4, chunk_rows=100)
    cal = _calib(tmp_path / "cal", 8, 512, 8)
    _, rep = PassManager(["cleanup"], data=str(cal)).run(src)
    assert rep.passes[0].status == "applied"
    # written once in the whole run: the verdict's session reads the file of its validation
    assert events == ["validate", "write", "validated"], events
    assert not model_io._KEPT  # and the file is gone with the run


def test_a_released_large_input_comes_back_whole_when_the_contract_undoes_the_passes(tmp_path, monkeypatch):
    """Past the external-data threshold (lowered here) the input read from a file is kept as a skeleton
    once a pass replaced it; when the speed contract finds the result slower (a stand-in timing), every
    pass is undone at once and the output is the input, read whole from its file again."""
    from onnxshrink.pipeline import manager
    from onnxshrink.pipeline.manager import PassManager
    from onnxshrink.runtime import SpeedComparison

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    monkeypatch.setattr(manager, "compare_speed", lambda a, b, feeds, decides=(): SpeedComparison(
        speedup=0.5, low=0.45, high=0.55, t_a=1.0, t_b=2.0, rounds=12))
    src = write_large_model(tmp_path / "in", vocab=512, dim=64, hidden=16, classes=4, chunk_rows=100)
    cal = _calib(tmp_path / "cal", 8, 512, 8)
    pm = PassManager(["cleanup"], data=str(cal), speed="never-slower")
    out, rep = pm.run(src)
    assert pm._original_released  # the reload path ran
    assert rep.passes[0].status == "rolled back" and "undone together" in rep.passes[0].reason
    back = model_io.load(src)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in back.graph.node]  # cleanup's change undone
    tables = {t.name: t for t in out.graph.initializer}
    for t in back.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tables[t.name]), onnx.numpy_helper.to_array(t))


def test_the_dynamic_trial_hands_onnxruntime_only_the_weights_it_quantizes(tmp_path, monkeypatch):
    """onnxruntime's quantize_dynamic reads a skeleton: the embedding tables (not MatMul weights) are
    data-less placeholders in the file it is given (a 2 GiB table made it fail to serialize its
    output), and the result has them back, byte for byte, and computes the float model's outputs."""
    from onnxshrink.passes.quantize import dynamic
    from onnxshrink.runtime import make_session

    src = write_large_model(tmp_path / "in", vocab=512, dim=64, hidden=16, classes=4, chunk_rows=100)
    seen = {}
    real = dynamic._ort_quantize_dynamic

    def spy(path, *a, **k):
        given = onnx.load(str(path))
        seen.update({t.name: model_io.is_placeholder(t) for t in given.graph.initializer})
        return real(path, *a, **k)

    monkeypatch.setattr(dynamic, "_ort_quantize_dynamic", spy)
    model = model_io.load(src)
    q = dynamic.dynamic_quantize(model)
    assert seen["embed.weight"] and seen["embed2.weight"]  # 64 kB tables: never handed over
    weights = [k for k in seen if k.startswith("fc1_")]  # the MatMul weight of Gemm fc1 (rewritten)
    assert weights and not any(seen[k] for k in weights) and not seen["half"]  # nor INT64 data
    assert "MatMulInteger" in {n.op_type for n in q.graph.node}
    tables = {t.name: t for t in q.graph.initializer if t.name.startswith("embed")}
    for t in model.graph.initializer:
        if t.name in tables:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(tables[t.name]), onnx.numpy_helper.to_array(t))
    ids = {"ids": (np.arange(8, dtype=np.int64) * 37 % 512)[None]}
    ref = make_session(model, optimize=False).run(None, ids)[0]
    got = make_session(q, optimize=False).run(None, ids)[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


@pytest.mark.slow
def test_past_2gb_roundtrip(tmp_path, record_property):
    """A 2 GiB+ model through cleanup (+ svd, quantize when registered): output with external
    data, valid (checker by path), same outputs; peak RSS reported."""
    vocab, dim, seq = 262_144, 2048, 8
    t0 = time.time()
    src = write_large_model(tmp_path / "in", vocab=vocab, dim=dim, seq=seq)
    gen_s = time.time() - t0
    data_bytes = src.with_name("model.onnx.data").stat().st_size
    assert data_bytes > 2**31
    cal = _calib(tmp_path / "cal", 8, vocab, seq)
    h_model = sha256(src)
    h_data_size_mtime = (src.with_name("model.onnx.data").stat().st_size,
                         src.with_name("model.onnx.data").stat().st_mtime_ns)
    stats = tmp_path / "stats.json"
    passes = _pipeline()
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    cmd = [sys.executable, "-c", _CHILD.format(root=str(ROOT), stats=str(stats)), "optimize", str(src), str(out),
           "--calib", str(cal), "--passes", ",".join(passes), "--budget", "cosine>=0.99",
           "--report", str(tmp_path / "report.json"), "-q"]
    # a watchdog: the machine is shared, so a run past MAX_RSS_OVER_MODEL x the model is stopped
    # (SIGTERM: the CLI exits 143 and cleans up) and the test fails saying so
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    watched_peak, t_start = 0, time.time()
    while proc.poll() is None:
        try:
            rss = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            rss = 0
        watched_peak = max(watched_peak, rss)
        if rss > MAX_RSS_OVER_MODEL * data_bytes or time.time() - t_start > 3600:
            proc.terminate()
            proc.wait(60)
            pytest.fail(f"stopped: RSS {rss / 2**30:.1f} GiB ({rss / data_bytes:.1f}x the model) after "
                        f"{time.time() - t_start:.0f} s with passes {passes}")
        time.sleep(1)
    _, err = proc.communicate()
    r = subprocess.CompletedProcess(cmd, proc.returncode, "", err)
    st = json.loads(stats.read_text())
    assert st["exit"] == 0, r.stderr[-2000:]
    assert out.exists() and out.with_name("model.onnx.data").exists()
    assert out.stat().st_size < 1_000_000  # the graph; weights are external
    onnx.checker.check_model(str(out), full_check=True)
    rep = json.loads((tmp_path / "report.json").read_text())
    # the input is untouched (the data file is 2 GiB: compare size and mtime, and the graph by hash)
    assert sha256(src) == h_model
    assert (src.with_name("model.onnx.data").stat().st_size,
            src.with_name("model.onnx.data").stat().st_mtime_ns) == h_data_size_mtime
    ratio = st["peak_rss_bytes"] / data_bytes
    summary = {"model_bytes": data_bytes, "generate_s": round(gen_s, 1), "optimize_s": round(st["seconds"], 1),
               "peak_rss_bytes": st["peak_rss_bytes"], "peak_rss_over_model": round(ratio, 2), "passes": passes,
               "statuses": {p["name"]: f"{p['status']} {p['reason'][:80]}".strip() for p in rep["passes"]},
               "out_data_bytes": out.with_name("model.onnx.data").stat().st_size,
               "fidelity": rep["fidelity"]}
    for k, v in summary.items():
        record_property(k, v)
    print("\nLARGE MODEL:", json.dumps(summary))
    # measured: 5.56x (11.1 GiB), its peak inside onnxruntime's quantize_dynamic (the dynamic trial;
    # 8.3 GiB when run alone on this model); everything else under 2.4x
    assert ratio < MAX_RSS_OVER_MODEL, summary
