"""Fuzz: mutated models fed to ``onnxshrink inspect`` and ``onnxshrink optimize``.

Valid seed models (tiny MLP and CNN, an If model, a two-input model, the torch-style demo CNN)
are mutated with a seeded RNG: a node dropped, an element type or a shape changed, an input
renamed, an attribute changed, nodes reordered, the opset or IR version changed, an
initializer's dims changed or removed, bytes flipped, the file truncated. Every mutated model
goes through ``inspect`` and ``optimize -p <lossless passes>`` in a child process (so a native
crash or a hang is caught and blamed on the case) and every run must end in

- exit 0 with a valid output (checker), or
- exit 2/3 with exactly one ``onnxshrink: error:`` line,

never a traceback, an internal error (exit 1), a crash, a hang (30 s per run), a partial output,
or a changed input file (sha256 before/after). The default suite runs 320 cases; the slow marker
runs 2000 more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.build import mlp, mobilenet_small
from onnxshrink.passes.registry import registry
from tests.reliability_helpers import init, model, sha256, two_input_model, vi

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 30


def _tiny_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return model(
        [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"], name="relu"),
         helper.make_node("Identity", ["r"], ["ri"], name="id"),
         helper.make_node("Add", ["ri", "x4"], ["s"], name="add"),
         helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc")],
        [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])],
        [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), init("g", np.ones(4, np.float32)),
         init("b", np.zeros(4, np.float32)), init("m", np.zeros(4, np.float32)), init("v", np.ones(4, np.float32)),
         init("x4", rng.standard_normal((1, 4, 1, 1)).astype(np.float32)),
         init("fw", rng.standard_normal((5, 4)).astype(np.float32)), init("fb", np.zeros(5, np.float32))])


def _if_model() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Relu", ["xi"], ["t"])], "then", [], [vi("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["xi"], ["e"])], "else", [], [vi("e", [1, 4])])
    return model([helper.make_node("Identity", ["x"], ["xi"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                 [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])])


def seed_models() -> dict[str, onnx.ModelProto]:
    return {"mlp": mlp(d_in=16, hidden=16, num_classes=4), "cnn": _tiny_cnn(), "if": _if_model(),
            "two_inputs": two_input_model(), "demo_cnn": mobilenet_small(pytorch_style=True, hw=32)}


# ---------------------------------------------------------------------------- mutations
DTYPES = [TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32, TensorProto.UINT8,
          TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, 0, 99]


def _values(m):
    return list(m.graph.input) + list(m.graph.output)


def m_drop_node(m, rng):
    if m.graph.node:
        del m.graph.node[int(rng.integers(len(m.graph.node)))]


def m_dtype(m, rng):
    vs = _values(m)
    vs[int(rng.integers(len(vs)))].type.tensor_type.elem_type = int(rng.choice(DTYPES))


def m_init_dtype(m, rng):
    if m.graph.initializer:
        m.graph.initializer[int(rng.integers(len(m.graph.initializer)))].data_type = int(rng.choice(DTYPES))


def m_shape(m, rng):
    v = _values(m)[int(rng.integers(len(_values(m))))]
    dims = v.type.tensor_type.shape.dim
    r = rng.random()
    if r < 0.4 and len(dims):
        dims[int(rng.integers(len(dims)))].dim_value = int(rng.choice([0, 2, 7, 1000]))
    elif r < 0.6 and len(dims):
        dims[int(rng.integers(len(dims)))].dim_param = "n"
    elif r < 0.8:
        dims.add().dim_value = 3
    elif len(dims):
        del dims[-1]


def m_init_dims(m, rng):
    if m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        if len(t.dims) and rng.random() < 0.7:
            t.dims[int(rng.integers(len(t.dims)))] += int(rng.choice([-1, 1, 5]))
        else:
            t.dims.append(2)


def m_drop_init(m, rng):
    if m.graph.initializer:
        del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]


def m_rename_input(m, rng):
    nodes = [n for n in m.graph.node if len(n.input)]
    if nodes:
        n = nodes[int(rng.integers(len(nodes)))]
        n.input[int(rng.integers(len(n.input)))] = str(rng.choice(["nowhere", "", n.output[0] if n.output else "z"]))


def m_duplicate_output(m, rng):
    if len(m.graph.node) >= 2:
        a, b = rng.choice(len(m.graph.node), 2, replace=False)
        m.graph.node[int(a)].output[0] = m.graph.node[int(b)].output[0]


def m_attribute(m, rng):
    nodes = [n for n in m.graph.node if len(n.attribute)]
    if not nodes:
        return
    a = nodes[int(rng.integers(len(nodes)))].attribute
    at = a[int(rng.integers(len(a)))]
    if at.type == onnx.AttributeProto.INT:
        at.i = int(rng.choice([-5, 0, 7, 2**40]))
    elif at.type == onnx.AttributeProto.INTS:
        del at.ints[:]
        at.ints.extend([int(x) for x in rng.integers(-2, 9, int(rng.integers(0, 5)))])
    elif at.type == onnx.AttributeProto.FLOAT:
        at.f = float(rng.choice([np.nan, -1.0, 1e30]))
    elif at.type == onnx.AttributeProto.GRAPH:
        del at.g.node[:]
    else:
        at.name = "bogus_attr"


def m_reorder(m, rng):
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def m_opset(m, rng):
    m.opset_import[0].version = int(rng.choice([1, 6, 10, 13, 25, 99]))


def m_ir_version(m, rng):
    m.ir_version = int(rng.choice([0, 1, 3, 12, 99]))


def m_op_type(m, rng):
    if m.graph.node:
        n = m.graph.node[int(rng.integers(len(m.graph.node)))]
        n.op_type = str(rng.choice(["Relu", "Softmax", "Conv", "NoSuchOp", "If", "Gemm"]))


def m_domain(m, rng):
    if m.graph.node:
        m.graph.node[int(rng.integers(len(m.graph.node)))].domain = str(
            rng.choice(["com.microsoft", "x.y", "ai.onnx.ml"]))


def m_drop_output(m, rng):
    if rng.random() < 0.5 and len(m.graph.output):
        del m.graph.output[:]
    else:
        m.graph.output.append(vi("ghost", [1]))


def m_init_raw(m, rng):
    if m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        t.raw_data = t.raw_data[: int(rng.integers(0, max(1, len(t.raw_data))))]


def m_nan_weights(m, rng):
    fl = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.raw_data]
    if fl:
        t = fl[int(rng.integers(len(fl)))]
        a = onnx.numpy_helper.to_array(t).copy()
        a.flat[int(rng.integers(a.size))] = rng.choice([np.nan, np.inf])
        t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))


PROTO_MUTATIONS = [m_drop_node, m_dtype, m_init_dtype, m_shape, m_init_dims, m_drop_init, m_rename_input,
                   m_duplicate_output, m_attribute, m_reorder, m_opset, m_ir_version, m_op_type, m_domain,
                   m_drop_output, m_init_raw, m_nan_weights]


def mutate(models: dict, case: int, seed: int = 0) -> tuple[str, bytes]:
    """Case ``case``: (description, model bytes)."""
    rng = np.random.default_rng((seed, case))
    name = sorted(models)[case % len(models)]
    m = onnx.ModelProto()
    m.CopyFrom(models[name])
    kind = int(rng.integers(len(PROTO_MUTATIONS) + 2))
    if kind < len(PROTO_MUTATIONS):
        muts = [PROTO_MUTATIONS[kind]] + ([PROTO_MUTATIONS[int(rng.integers(len(PROTO_MUTATIONS)))]]
                                          if rng.random() < 0.25 else [])
        for mu in muts:
            mu(m, rng)
        return f"{name}:{'+'.join(mu.__name__ for mu in muts)}", m.SerializeToString()
    data = bytearray(m.SerializeToString())
    if kind == len(PROTO_MUTATIONS):  # flip bytes
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return f"{name}:corrupt_bytes", bytes(data)
    return f"{name}:truncate", bytes(data[: int(rng.integers(0, len(data)))])


# ---------------------------------------------------------------------------- child process
_CHILD = textwrap.dedent("""
    import json, signal, sys
    sys.path.insert(0, {root!r})
    from tests.test_fuzz import child_main
    child_main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:])
""")


def child_main(cases_dir: str, results_path: str, passes: list[str], extra: list[str] = ()) -> None:
    """Run inspect and optimize on every case file; append one JSON line per run (flushed, so a
    crash is pinned on the case after the last line)."""
    import signal

    import onnx as _onnx

    from tests.reliability_helpers import run_cli

    def on_alarm(signum, frame):
        raise TimeoutError("hang")

    signal.signal(signal.SIGALRM, on_alarm)
    files = sorted(Path(cases_dir).glob("*.onnx"))
    with open(results_path, "a") as out:
        for f in files:
            for cmd in ("inspect", "optimize"):
                o = f.with_suffix(".out.onnx")
                out.write(json.dumps({"case": f.name, "cmd": cmd, "started": True}) + "\n")
                out.flush()
                signal.alarm(CASE_TIMEOUT_S)
                try:
                    if cmd == "inspect":
                        r = run_cli("inspect", f, "--json")
                    else:
                        r = run_cli("optimize", f, o, "-p", ",".join(passes), "-q", *extra)
                    hang = False
                except TimeoutError:
                    r, hang = None, True
                finally:
                    signal.alarm(0)
                rec = {"case": f.name, "cmd": cmd, "hang": hang}
                if r is not None:
                    rec.update(code=r.code, err=r.err[-1000:], out_exists=o.exists())
                    if cmd == "optimize" and r.code == 0:
                        try:
                            _onnx.checker.check_model(_onnx.load(str(o)))
                            rec["out_valid"] = True
                        except Exception as e:
                            rec["out_valid"] = str(e)[:300]
                if o.exists():
                    o.unlink()
                out.write(json.dumps(rec) + "\n")
                out.flush()


# every registered pass, on random inputs with checking off: the pipeline must end in exit 0 with a
# valid model or a clean one-line error whatever the model, never a crash (fidelity is not the point)
EVERY_PASS = ["cleanup", "prune", "sparsify", "svd", "share", "equalize", "fold", "quantize", "fp16"]
EVERY_PASS_ARGS = ["--synthetic", "--budget", "none", "-o", "prune.mode=importance"]


def run_fuzz(tmp_path: Path, cases: range, seed: int = 0, passes: list[str] | None = None,
             extra: tuple = ()) -> dict:
    models = seed_models()
    cdir = tmp_path / "cases"
    cdir.mkdir()
    desc = {}
    for c in cases:
        d, data = mutate(models, c, seed)
        p = cdir / f"{c:05d}.onnx"
        p.write_bytes(data)
        desc[p.name] = d
    before = {p.name: sha256(p) for p in cdir.iterdir()}
    reg = registry()
    if passes is None:
        passes = ["cleanup"] if "cleanup" in reg else ["t_strip_identity"]
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT)), str(cdir), str(results),
                           ",".join(passes), *extra],
                          capture_output=True, text=True, env=env, timeout=CASE_TIMEOUT_S * 2 * len(cases) + 120)
    lines = [json.loads(ln) for ln in results.read_text().splitlines()] if results.exists() else []
    done = [r for r in lines if not r.get("started")]
    problems = []
    if proc.returncode != 0:
        last = lines[-1] if lines else {}
        problems.append(f"child died (exit {proc.returncode}) in {last.get('case')} {last.get('cmd')} "
                        f"({desc.get(last.get('case'))}): {proc.stderr[-500:]}")
    for r in done:
        where = f"{r['case']} {r['cmd']} ({desc[r['case']]})"
        if r["hang"]:
            problems.append(f"{where}: hang")
            continue
        err_lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        if "Traceback" in r["err"]:
            problems.append(f"{where}: traceback")
        if r["code"] == 0:
            if r["cmd"] == "optimize" and r.get("out_valid") is not True:
                problems.append(f"{where}: exit 0 but output invalid: {r.get('out_valid')}")
        elif r["code"] in (2, 3):
            if len(err_lines) != 1 or not err_lines[0].startswith("onnxshrink: error: "):
                problems.append(f"{where}: exit {r['code']} with {err_lines}")
            if r["out_exists"]:
                problems.append(f"{where}: failed but wrote output")
        else:
            problems.append(f"{where}: exit {r['code']}: {err_lines[:2]}")
    after = {p.name: sha256(p) for p in cdir.glob("*.onnx")}
    changed = [k for k in before if after.get(k) != before[k]]
    if changed:
        problems.append(f"inputs changed: {changed[:5]}")
    leftovers = [p.name for p in cdir.iterdir() if p.name.startswith(".") or p.name.endswith(".out.onnx")]
    if leftovers:
        problems.append(f"left behind: {leftovers[:5]}")
    codes = {}
    for r in done:
        codes[f"{r['cmd']}:{r.get('code', 'hang')}"] = codes.get(f"{r['cmd']}:{r.get('code', 'hang')}", 0) + 1
    return {"problems": problems, "runs": len(done), "codes": codes}


def test_mutations_are_deterministic():
    models = seed_models()
    assert [mutate(models, c) for c in range(20)] == [mutate(models, c) for c in range(20)]


def test_seed_models_are_valid():
    for name, m in seed_models().items():
        onnx.checker.check_model(m, full_check=True)


@pytest.mark.parametrize("batch", range(4))
def test_fuzz_default(tmp_path, batch):
    """320 cases (4 x 80), each through inspect and optimize."""
    res = run_fuzz(tmp_path, range(batch * 80, (batch + 1) * 80))
    print(f"\nfuzz batch {batch}: {res['runs']} runs, exit codes {res['codes']}")
    assert res["runs"] == 160
    assert not res["problems"], "\n".join(res["problems"][:20])


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(10))
def test_fuzz_slow(tmp_path, batch):
    """2000 more cases with another seed."""
    res = run_fuzz(tmp_path, range(batch * 200, (batch + 1) * 200), seed=1)
    print(f"\nfuzz slow batch {batch}: {res['runs']} runs, exit codes {res['codes']}")
    assert res["runs"] == 400
    assert not res["problems"], "\n".join(res["problems"][:20])


def test_fuzz_every_pass(tmp_path):
    """40 cases through inspect and every pass at once (random inputs, checking off)."""
    res = run_fuzz(tmp_path, range(40), seed=2, passes=EVERY_PASS, extra=tuple(EVERY_PASS_ARGS))
    print(f"\nfuzz every pass: {res['runs']} runs, exit codes {res['codes']}")
    assert res["runs"] == 80
    assert not res["problems"], "\n".join(res["problems"][:20])


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(5))
def test_fuzz_every_pass_slow(tmp_path, batch):
    """400 more cases through every pass."""
    res = run_fuzz(tmp_path, range(batch * 80, (batch + 1) * 80), seed=3, passes=EVERY_PASS,
                   extra=tuple(EVERY_PASS_ARGS))
    assert res["runs"] == 160
    assert not res["problems"], "\n".join(res["problems"][:20])
