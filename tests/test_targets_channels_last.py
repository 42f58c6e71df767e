"""Channel-last (NHWC) image I/O at emission: exact Transposes, the options that ask for it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import check, normal_samples, run_ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnxshrink import targets
from onnxshrink.cli import cli
from onnxshrink.errors import UsageError
from onnxshrink.pipeline.manager import optimize
from onnxshrink.targets.profiles import get_target, with_options


def conv_net(extra_output=False):
    """conv-relu-conv with a 4-D image output (and optionally a 2-D one beside it)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
             nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2")]
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="c1"),
             oh.make_node("Relu", ["c1"], ["r1"], name="r1"),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1] * 4, name="c2")]
    outs = [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 16, 16])]
    if extra_output:
        nodes += [oh.make_node("GlobalAveragePool", ["y"], ["gap"], name="gap"),
                  oh.make_node("Flatten", ["gap"], ["v"], name="fl")]
        outs.append(oh.make_tensor_value_info("v", TP.FLOAT, [1, 8]))
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])], outs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    check(m)
    return m


def samples(n=12, seed=1):
    return normal_samples(n, seed)


def _dims(vi):
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def _exact(model, cl, info):
    val = samples(3, 5)
    a = [run_ort(model, s) for s in val]
    b = [run_ort(cl, s) for s in targets.channels_last_samples(val, info["inputs"])]
    names = [o.name for o in cl.graph.output]
    for ra, rb in zip(a, b):
        for n, x, y in zip(names, ra, rb):
            y = y.transpose(targets.TO_NCHW) if n in info["outputs"] else y
            np.testing.assert_array_equal(x, y)


def test_float_model_goes_channel_last_exactly():
    m = conv_net(extra_output=True)
    cl, info = targets.to_channels_last(m)
    onnx.checker.check_model(cl, full_check=True)
    assert info == {"inputs": ["x"], "outputs": ["y"]}
    assert _dims(cl.graph.input[0]) == [1, 16, 16, 3] and cl.graph.input[0].name == "x"
    assert [o.name for o in cl.graph.output] == ["y", "v"]
    assert _dims(cl.graph.output[0]) == [1, 16, 16, 8] and _dims(cl.graph.output[1]) == [1, 8]
    perms = [list(n.attribute[0].ints) for n in cl.graph.node if n.op_type == "Transpose"]
    assert sorted(perms) == sorted([list(targets.TO_NCHW), list(targets.TO_NHWC)])
    _exact(m, cl, info)


def test_qdq_model_transposes_on_the_integer_side():
    m = conv_net()
    q, _ = optimize(m, passes=[{"quantize": {"guard": False}}], data=samples(), val_data=samples(3, 5), debug=True)
    cl, info = targets.to_channels_last(q)
    onnx.checker.check_model(cl, full_check=True)
    prod = {o: n for n in cl.graph.node for o in n.output}
    tr = [n for n in cl.graph.node if n.op_type == "Transpose"]
    into = [n for n in tr if list(n.attribute[0].ints) == list(targets.TO_NCHW)]
    assert len(into) == 1 and prod[into[0].input[0]].op_type == "QuantizeLinear"  # x -> Q -> Transpose -> DQ
    assert prod[into[0].input[0]].input[0] == "x"
    _exact(q, cl, info)
    # no float node added: static QNN coverage counts the same float nodes as before
    qnn = get_target("qnn")
    assert targets.coverage(cl, qnn).get("float_nodes") <= targets.coverage(q, qnn).get("float_nodes") + 1


def test_model_without_image_io_is_unchanged():
    g = oh.make_graph([oh.make_node("Relu", ["a"], ["b"])], "g", [oh.make_tensor_value_info("a", TP.FLOAT, [2, 5])],
                      [oh.make_tensor_value_info("b", TP.FLOAT, [2, 5])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    out, info = targets.to_channels_last(m)
    assert out is m and info == {"inputs": [], "outputs": []}


def test_target_option_spellings():
    assert get_target("qnn+channels_last").channels_last
    assert get_target("qnn+nhwc+ort").channels_last and get_target("qnn+nhwc+ort").ort_format
    assert get_target({"name": "xnnpack", "channels_last": True}).channels_last
    assert with_options(get_target("nnapi"), {"channels_last": "true"}).channels_last
    assert not get_target("qnn").channels_last
    with pytest.raises(UsageError):
        get_target("qnn+sideways")
    with pytest.raises(UsageError):
        with_options(get_target("qnn"), {"channels_last": "maybe"})
    with pytest.raises(UsageError):
        with_options(None, {"channels_last": True})


def test_manager_measures_channel_last_output_against_nchw_original():
    m = conv_net(extra_output=True)
    out, rep = optimize(m, passes=["cleanup"], data=samples(), val_data=samples(3, 5),
                        target=get_target("cpu+channels_last"), debug=True)
    assert rep.target_report["channels_last"]["changed"] and rep.target_report["channels_last"]["max_rel_err"] == 0
    assert _dims(out.graph.input[0]) == [1, 16, 16, 3]
    assert rep.fidelity["cosine"] > 0.99999 and rep.fidelity["max_abs"] < 1e-5


def test_cli_target_option(tmp_path):
    from models.real import write_samples
    m = conv_net()
    onnx.save(m, tmp_path / "f.onnx")
    write_samples(samples(), tmp_path / "calib")
    args = ["optimize", str(tmp_path / "f.onnx"), str(tmp_path / "o.onnx"), "--passes", "quantize",
            "--calib", str(tmp_path / "calib"), "--target", "cpu", "-o", "target.channels_last=true",
            "-o", "quantize.guard=false", "--report", str(tmp_path / "r.json"), "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = onnx.load(tmp_path / "o.onnx")
    assert _dims(out.graph.input[0]) == [1, 16, 16, 3] and _dims(out.graph.output[0]) == [1, 16, 16, 8]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["target_report"]["channels_last"]["inputs"] == ["x"] and rep["fidelity"]["cosine"] > 0.999
    from onnxshrink.cli import main
    with pytest.raises(SystemExit) as e:
        main(args[:-5] + ["-o", "target.bogus=true", "-q"])
    assert e.value.code == 2
