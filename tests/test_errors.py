"""Every error path of ``onnxshrink optimize``/``inspect``: a one-line message saying what and
where, the documented exit code (docs/errors.md), no traceback unless --debug, no output file
(and no temporary left behind), and the input folder byte-for-byte unchanged.

Each case builds its files in a fresh folder, snapshots the folder (sha256 of every file), runs
the CLI in-process through ``onnxshrink.cli.main`` (what the console script runs), and checks
all of the above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.build import mlp
from onnxshrink.errors import EXIT_BUDGET, EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE
from onnxshrink.passes.registry import registry
from tests.reliability_helpers import (
    init,
    model,
    no_tmp_leftovers,
    run_cli,
    snapshot,
    two_input_model,
    vi,
    write_npy_dir,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _mlp(d: Path) -> Path:
    onnx.save(mlp(), str(d / "in.onnx"))
    return d / "in.onnx"


def _calib(d: Path, arrays) -> Path:
    return write_npy_dir(d / "calib", arrays)


def _good(n=4, shape=(1, 64)):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


# ---------------------------------------------------------------------------- setups
# Each setup(d) writes files into d and returns the argv after "onnxshrink".
def s_missing(d):
    return ["optimize", d / "nope.onnx", d / "out.onnx"]


def s_empty_file(d):
    (d / "in.onnx").write_bytes(b"")
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_truncated(d):
    p = _mlp(d)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return ["optimize", p, d / "out.onnx"]


def s_text_file(d):
    (d / "in.onnx").write_text("this is not a model\n")
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_png(d):
    (d / "in.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_invalid_utf8(d):  # found by the fuzz: a flipped byte inside a string field
    m = mlp()
    m.graph.node[1].name = "NODENAME"
    data = m.SerializeToString().replace(b"NODENAME", b"NODE\xcb\xcbME")
    (d / "in.onnx").write_bytes(data)
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_external_missing(d):
    m = mlp()
    onnx.save_model(m, str(d / "in.onnx"), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    (d / "in.onnx.data").unlink()
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_external_short(d):
    onnx.save_model(mlp(), str(d / "in.onnx"), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    data = (d / "in.onnx.data").read_bytes()
    (d / "in.onnx.data").write_bytes(data[: len(data) // 2])
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_invalid_graph(d):  # an op the ONNX standard does not have
    onnx.save(model([helper.make_node("FooBar", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])]),
              str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_custom_domain_no_kernel(d):  # valid ONNX, but onnxruntime has no kernel for the custom op
    m = model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MyOp", ["h"], ["y"], domain="my.domain")],
              [vi("x", [1, 4])], [vi("y", [1, 4])],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    onnx.save(m, str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_ort_no_kernel(d):  # valid ONNX, standard op, but no onnxruntime CPU kernel for the type
    m = model([helper.make_node("Erf", ["x"], ["y"])], [vi("x", [1, 4], TensorProto.DOUBLE)],
              [vi("y", [1, 4], TensorProto.DOUBLE)])
    onnx.save(m, str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx"]


def s_already_quantized(d):
    rng = np.random.default_rng(0)
    m = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq0"),
               helper.make_node("MatMul", ["dq", "w"], ["y"])],
              [vi("x", [1, 4])], [vi("y", [1, 4])],
              [init("w", rng.standard_normal((4, 4)).astype(np.float32)), init("s", np.float32(0.05)),
               init("z", np.uint8(128))])
    onnx.save(m, str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx", "--passes", "t_reject_quantized"]


def s_out_is_in(d):
    p = _mlp(d)
    return ["optimize", p, p]


def s_out_is_in_other_spelling(d):
    p = _mlp(d)
    (d / "sub").mkdir()
    return ["optimize", p, d / "sub" / ".." / "in.onnx"]


def s_out_is_in_symlink(d):
    p = _mlp(d)
    os.symlink(p, d / "link.onnx")
    return ["optimize", d / "link.onnx", p]


def s_out_is_in_external_data(d):
    onnx.save_model(mlp(), str(d / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    return ["optimize", d / "in.onnx", d / "w.bin"]


def s_out_folder_missing(d):
    p = _mlp(d)
    return ["optimize", p, d / "no" / "such" / "out.onnx"]


def s_out_parent_is_file(d):
    p = _mlp(d)
    return ["optimize", p, p / "out.onnx"]


def s_out_is_dir(d):
    p = _mlp(d)
    (d / "outdir").mkdir()
    return ["optimize", p, d / "outdir"]


def s_out_unwritable(d):
    p = _mlp(d)
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o500)
    return ["optimize", p, d / "ro" / "out.onnx"]


def s_report_unwritable(d):
    p = _mlp(d)
    return ["optimize", p, d / "out.onnx", "--report", p / "r.json"]


def s_report_is_input(d):
    p = _mlp(d)
    return ["optimize", p, d / "out.onnx", "--report", p]


def s_calib_missing(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", d / "nocalib"]


def s_calib_empty(d):
    (d / "calib").mkdir()
    (d / "calib" / "README.txt").write_text("no arrays here")
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", d / "calib"]


def s_calib_is_file(d):
    p = _mlp(d)
    return ["optimize", p, d / "out.onnx", "--calib", p]


def s_calib_wrong_shape(d):
    arrs = _good(4)
    arrs[2] = np.zeros((1, 63), np.float32)  # the third file is bad: found before any work
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, arrs)]


def s_calib_wrong_rank(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, [np.zeros((64,), np.float32)])]


def s_calib_wrong_dtype(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, [np.zeros((1, 64), np.uint8)])]


def s_calib_nan(d):
    arrs = _good(2)
    arrs[0][0, 5] = np.nan
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, arrs)]


def s_calib_nan_mid_stream(d):
    arrs = _good(12)
    arrs[5][0, 1] = np.nan  # a calibration-only sample (not held out): found when a pass streams it
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, arrs), "--passes", "t_needs_data"]


def s_inf_breaks_reference(d):
    arrs = _good(12)
    arrs[1][0, 1] = np.inf  # a selection sample: infinities are accepted, but the MLP's logits become inf/NaN
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", _calib(d, arrs)]


def s_calib_corrupt_npy(d):
    c = _calib(d, _good(2))
    (c / "0001.npy").write_bytes(b"\x93NUMPY garbage")
    return ["optimize", _mlp(d), d / "out.onnx", "--calib", c]


def s_npz_wrong_names(d):
    onnx.save(two_input_model(), str(d / "in.onnx"))
    (d / "calib").mkdir()
    np.savez(d / "calib" / "0.npz", a=np.zeros((1, 8), np.float32), c=np.zeros((1, 4), np.float32))
    return ["optimize", d / "in.onnx", d / "out.onnx", "--calib", d / "calib"]


def s_npy_for_two_inputs(d):
    onnx.save(two_input_model(), str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx", "--calib", _calib(d, [np.zeros((1, 8), np.float32)])]


def s_unknown_pass(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_noop,shrinkify"]


def s_empty_passes(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", ","]


def s_unknown_option(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_noise", "-o", "t_noise.strength=1"]


def s_bad_option_value(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_noise", "-o", "t_noise.ratio=lots"]


def s_malformed_option(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_noise", "-o", "ratio=0.1"]


def s_option_for_absent_pass(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_noop", "-o", "t_noise.ratio=0.1"]


def s_unknown_flag(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--fast"]


def s_missing_argument(d):
    return ["optimize", _mlp(d)]


def s_bad_budget(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--budget", "cosine=0.99"]


def s_unknown_metric(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--budget", "psnr>=30", "--calib", _calib(d, _good())]


def s_budget_without_data(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--budget", "cosine>=0.99", "--passes", "t_noise"]


def s_needs_data(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--passes", "t_needs_data"]


def s_target_of_nothing(d):
    """A fraction of MACs asked of a model with none to count (elementwise ops only): the allocation
    divided by the input's zero MACs (ZeroDivisionError, an internal error)."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "in.onnx"))
    return ["optimize", d / "in.onnx", d / "out.onnx", "--passes", "cleanup,prune", "--target-macs", "0.5",
            "--calib", _calib(d, _good(8)), "--budget", "cosine>=0.9"]


def s_unknown_target(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--target", "tpu9000"]


def s_bad_input_shape(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--input-shape", "x:1,sixty-four"]


def s_input_shape_unknown_name(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--input-shape", "image:1,64"]


def s_input_shape_conflict(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--input-shape", "x:1,32"]


def s_recipe_missing(d):
    return ["optimize", _mlp(d), d / "out.onnx", "--recipe", d / "recipe.yaml"]


def s_recipe_bad_yaml(d):
    (d / "recipe.yaml").write_text("passes: [t_noop\nbudget: : :\n")
    return ["optimize", _mlp(d), d / "out.onnx", "--recipe", d / "recipe.yaml"]


def s_recipe_unknown_key(d):
    (d / "recipe.json").write_text('{"passes": ["t_noop"], "bugdet": "cosine>=0.9"}')
    return ["optimize", _mlp(d), d / "out.onnx", "--recipe", d / "recipe.json"]


def s_recipe_not_mapping(d):
    (d / "recipe.yaml").write_text("- t_noop\n- t_noise\n")
    return ["optimize", _mlp(d), d / "out.onnx", "--recipe", d / "recipe.yaml"]


def s_inspect_missing(d):
    return ["inspect", d / "nope.onnx"]


def s_inspect_truncated(d):
    p = _mlp(d)
    p.write_bytes(p.read_bytes()[:100])
    return ["inspect", p]


def s_inspect_bad_shape_arg(d):
    return ["inspect", _mlp(d), "--input-shape", "x"]


# (id, setup, exit code, regex the one-line message must match)
CASES = [
    ("missing-file", s_missing, EXIT_INPUT, r"model file not found: .*nope\.onnx"),
    ("empty-file", s_empty_file, EXIT_INPUT, r"model file is empty: .*in\.onnx"),
    ("truncated-onnx", s_truncated, EXIT_INPUT, r"in\.onnx: not a readable ONNX model"),
    ("text-file", s_text_file, EXIT_INPUT, r"in\.onnx: not a(?: readable)? ONNX model"),
    ("png-bytes", s_png, EXIT_INPUT, r"in\.onnx: not a(?: readable)? ONNX model"),
    ("invalid-utf8-text", s_invalid_utf8, EXIT_INPUT,
     r"in\.onnx: not a valid ONNX model \(invalid UTF-8 text in model\.graph\.node\[1\]\.name\)"),
    ("external-data-missing", s_external_missing, EXIT_INPUT,
     r"in\.onnx: external data file missing: .*in\.onnx\.data$"),
    ("external-data-short", s_external_short, EXIT_INPUT, r"in\.onnx: cannot read external data"),
    ("invalid-graph", s_invalid_graph, EXIT_INPUT, r"invalid ONNX model: .*FooBar"),
    ("custom-op-no-kernel", s_custom_domain_no_kernel, EXIT_INPUT,
     r"does not run in onnxruntime: .*my\.domain:MyOp"),
    ("ort-no-kernel", s_ort_no_kernel, EXIT_INPUT, r"does not run in onnxruntime: .*Erf"),
    ("already-quantized", s_already_quantized, EXIT_INPUT, r"already quantized .*QuantizeLinear 'q0'"),
    ("out-is-in", s_out_is_in, EXIT_USAGE, r"output path is the input file"),
    ("out-is-in-other-spelling", s_out_is_in_other_spelling, EXIT_USAGE, r"output path is the input file"),
    ("out-is-in-symlink", s_out_is_in_symlink, EXIT_USAGE, r"output path is the input file"),
    ("out-is-input-external-data", s_out_is_in_external_data, EXIT_USAGE,
     r"would overwrite the input's external data file .*w\.bin"),
    ("out-folder-missing", s_out_folder_missing, EXIT_USAGE, r"cannot write .*out\.onnx: folder .* does not exist"),
    ("out-parent-is-file", s_out_parent_is_file, EXIT_USAGE, r"cannot write .*: .*in\.onnx is not a folder"),
    ("out-is-directory", s_out_is_dir, EXIT_USAGE, r"outdir.*(is a directory)"),
    pytest.param("out-folder-unwritable", s_out_unwritable, EXIT_USAGE, r"cannot write .*: folder .* is not writable",
                 marks=pytest.mark.skipif(IS_ROOT, reason="root can write into read-only folders")),
    ("report-unwritable", s_report_unwritable, EXIT_USAGE, r"cannot write .*r\.json: .* is not a folder"),
    ("report-is-input", s_report_is_input, EXIT_USAGE, r"output path is the input file"),
    ("calib-missing", s_calib_missing, EXIT_INPUT, r"calibration folder not found: .*nocalib"),
    ("calib-empty", s_calib_empty, EXIT_INPUT, r"calibration folder has no \.npy or \.npz files"),
    ("calib-is-file", s_calib_is_file, EXIT_INPUT, r"calibration path is not a folder"),
    ("calib-wrong-shape", s_calib_wrong_shape, EXIT_INPUT,
     r"0002\.npy: input 'x' has shape \[1, 63\], the model expects \[1,64\]"),
    ("calib-wrong-rank", s_calib_wrong_rank, EXIT_INPUT,
     r"0000\.npy: input 'x' has shape \[64\], the model expects rank 2"),
    ("calib-wrong-dtype", s_calib_wrong_dtype, EXIT_INPUT,
     r"0000\.npy: input 'x' has dtype uint8, the model expects float32"),
    ("calib-nan", s_calib_nan, EXIT_INPUT, r"0000\.npy: input 'x' contains NaN \(1 of 64 values\)"),
    ("calib-nan-mid-stream", s_calib_nan_mid_stream, EXIT_INPUT, r"0005\.npy: input 'x' contains NaN"),
    ("inf-breaks-reference", s_inf_breaks_reference, EXIT_INPUT,
     r"0001\.npy: input 'x' contains infinities and the original model's outputs on this sample are not finite"),
    ("calib-corrupt-npy", s_calib_corrupt_npy, EXIT_INPUT, r"0001\.npy: cannot read array"),
    ("npz-wrong-names", s_npz_wrong_names, EXIT_INPUT,
     r"0\.npz: missing input\(s\) \['b'\], unknown input\(s\) \['c'\]"),
    ("npy-for-two-inputs", s_npy_for_two_inputs, EXIT_INPUT,
     r"a \.npy file holds one array, but the model has 2 inputs"),
    ("unknown-pass", s_unknown_pass, EXIT_USAGE, r"unknown pass 'shrinkify'; known passes: "),
    ("empty-pass-list", s_empty_passes, EXIT_USAGE, r"--passes is empty"),
    ("unknown-option", s_unknown_option, EXIT_USAGE, r"unknown option 'strength' for pass 't_noise'; options: ratio"),
    ("bad-option-value", s_bad_option_value, EXIT_USAGE, r"option t_noise\.ratio takes a number \(got 'lots'\)"),
    ("malformed-option", s_malformed_option, EXIT_USAGE, r"expected PASS\.OPTION=VALUE"),
    ("option-for-absent-pass", s_option_for_absent_pass, EXIT_USAGE, r"not in the pipeline: t_noise"),
    ("unknown-flag", s_unknown_flag, EXIT_USAGE, r"No such option.*--fast"),
    ("missing-argument", s_missing_argument, EXIT_USAGE, r"Missing argument 'OUT'"),
    ("bad-budget", s_bad_budget, EXIT_USAGE, r"cannot parse budget 'cosine=0\.99'"),
    ("unknown-metric", s_unknown_metric, EXIT_USAGE, r"unknown metric 'psnr'"),
    ("budget-without-data", s_budget_without_data, EXIT_USAGE, r"a budget needs calibration or validation data"),
    ("pass-needs-data", s_needs_data, EXIT_USAGE, r"pass 't_needs_data' needs calibration data"),
    ("unknown-target", s_unknown_target, EXIT_USAGE, r"unknown target 'tpu9000'"),
    ("target-of-nothing", s_target_of_nothing, EXIT_USAGE,
     r"a MACs target needs an input whose MACs can be counted; this input's is 0"),
    ("bad-input-shape", s_bad_input_shape, EXIT_USAGE, r"--input-shape 'x:1,sixty-four': dimensions must be whole"),
    ("input-shape-unknown-name", s_input_shape_unknown_name, EXIT_USAGE, r"--input-shape names 'image'"),
    ("input-shape-conflict", s_input_shape_conflict, EXIT_INPUT, r"input 'x' dim 1 is fixed at 64"),
    ("recipe-missing", s_recipe_missing, EXIT_USAGE, r"recipe not found: .*recipe\.yaml"),
    ("recipe-bad-yaml", s_recipe_bad_yaml, EXIT_USAGE, r"cannot read recipe .*recipe\.yaml"),
    ("recipe-unknown-key", s_recipe_unknown_key, EXIT_USAGE, r"unknown key\(s\) \['bugdet'\]"),
    ("recipe-not-mapping", s_recipe_not_mapping, EXIT_USAGE, r"expected a mapping with 'passes'"),
    ("inspect-missing", s_inspect_missing, EXIT_INPUT, r"model file not found"),
    ("inspect-truncated", s_inspect_truncated, EXIT_INPUT, r"not a readable ONNX model"),
    ("inspect-bad-shape-arg", s_inspect_bad_shape_arg, EXIT_USAGE, r"expected NAME:D0,D1"),
]


def _values(case):
    return case.values if hasattr(case, "marks") else case


@pytest.mark.parametrize("case_id,setup,code,pattern", CASES, ids=[_values(c)[0] for c in CASES])
def test_error_path(tmp_path, case_id, setup, code, pattern):
    d = tmp_path / "work"
    d.mkdir()
    argv = setup(d)
    before = snapshot(d)
    listing = sorted(os.listdir(d))
    if argv[0] == "optimize" and len(argv) > 2:
        argv = [*argv, "-q"]
        if "--passes" not in argv and "--recipe" not in argv and "cleanup" not in registry():
            argv += ["--passes", "t_noop"]  # before the cleanup pass lands: a pass that changes nothing
    r = run_cli(*argv)
    assert r.code == code, (r.code, r.err, r.out)
    assert "Traceback" not in r.err + r.out
    lines = r.error_lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("onnxshrink: error: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert len(lines[0]) < 400
    assert snapshot(d) == before  # inputs byte-for-byte unchanged, nothing written
    assert sorted(os.listdir(d)) == listing
    for sub in d.rglob("*"):
        if sub.is_dir() and os.access(sub, os.R_OK):
            assert no_tmp_leftovers(sub)


def test_error_table_is_documented():
    """docs/errors.md lists every case of the table above with its exit code."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for c in CASES:
        case_id, _, code, _ = _values(c)
        row = next((ln for ln in doc.splitlines() if f"`{case_id}`" in ln), None)
        assert row is not None, f"docs/errors.md misses {case_id}"
        assert f"| {code} |" in row, row


# ---------------------------------------------------------------------------- beyond the table
def test_debug_shows_traceback(tmp_path):
    """--debug re-raises, so the traceback is shown."""
    import onnxshrink.cli as cli_mod
    from onnxshrink.errors import InputError

    with pytest.raises(InputError):
        cli_mod.main(["--debug", "optimize", str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx"), "-p", "t_noop"])
    r = run_cli("optimize", tmp_path / "nope.onnx", tmp_path / "o.onnx", "-p", "t_noop")  # debug does not stick
    assert r.code == EXIT_INPUT and "Traceback" not in r.err


def test_internal_error_is_one_line(tmp_path, monkeypatch):
    """A bug (an unexpected exception outside any pass) exits 1 with one line naming it."""
    import onnxshrink.pipeline.manager as mgr

    p = _mlp(tmp_path)
    before = snapshot(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(mgr.PassManager, "_prepare", boom)
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--passes", "t_noop")
    assert r.code == EXIT_INTERNAL
    assert r.error_lines == ["onnxshrink: internal error: RuntimeError: simulated bug "
                             "(rerun with --debug for the traceback)"]
    assert snapshot(tmp_path) == before
    with pytest.raises(RuntimeError):
        from onnxshrink.cli import main
        main(["--debug", "optimize", str(p), str(tmp_path / "out.onnx"), "--passes", "t_noop"])


def test_disk_full_while_saving_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves no output and no temporary files."""
    import errno

    import onnxshrink.model as model_io

    p = _mlp(tmp_path)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    real_save = onnx.save_model

    def half_save(m, path, *a, **k):
        with open(path, "wb") as f:
            f.write(m.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io.onnx, "save_model", half_save)
    r = run_cli("optimize", p, tmp_path / "out" / "m.onnx", "--passes", "t_noop", "-q")
    monkeypatch.setattr(model_io.onnx, "save_model", real_save)
    assert r.code == EXIT_USAGE and r.error_lines == [f"onnxshrink: error: cannot write {tmp_path}/out/m.onnx: "
                                                      "No space left on device"]
    assert snapshot(tmp_path) == before
    assert os.listdir(tmp_path / "out") == []


def test_existing_output_kept_when_run_fails(tmp_path):
    """A failed run leaves an existing OUT exactly as it was (the rename never happened)."""
    p = _mlp(tmp_path)
    (tmp_path / "out.onnx").write_bytes(b"previous result")
    c = _calib(tmp_path, [np.zeros((1, 64), np.uint8)])
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--calib", c, "-q", "--passes", "t_noop")
    assert r.code == EXIT_INPUT
    assert (tmp_path / "out.onnx").read_bytes() == b"previous result"


def test_keyboard_interrupt(tmp_path, monkeypatch):
    import onnxshrink.pipeline.manager as mgr

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mgr.PassManager, "run", interrupt)
    p = _mlp(tmp_path)
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--passes", "t_noop")
    assert r.code == 130 and r.error_lines == ["onnxshrink: interrupted"]
    assert not (tmp_path / "out.onnx").exists()


def test_crashing_pass_is_rolled_back_not_fatal(tmp_path):
    """A pass raising an unexpected exception is rolled back with the reason; the run succeeds
    with the model of the previous passes (documented in docs/design.md)."""
    import json

    p = _mlp(tmp_path)
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--passes", "t_crash", "--report", tmp_path / "r.json", "-q")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passes"][0]["status"] == "rolled back"
    assert rep["passes"][0]["reason"] == "pass failed: ZeroDivisionError: simulated bug in a pass"
    assert onnx.load(str(tmp_path / "out.onnx")).graph == onnx.load(str(p)).graph


def test_lossless_pass_that_changes_outputs_is_rolled_back(tmp_path):
    import json

    p = _mlp(tmp_path)
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--passes", "t_corrupt", "--report", tmp_path / "r.json", "-q")
    assert r.code == 0
    rec = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert rec["status"] == "rolled back" and rec["reason"].startswith("outputs changed")


def test_budget_not_met_exit_4_no_output(tmp_path, monkeypatch):
    """When the pipeline's final model misses the budget (here: the target emission step degrades
    it), nothing is written, the exit code is 4 and the report says how close it came."""
    import json

    import onnxshrink.pipeline.manager as manager

    def lossy_emit(model, target, ctx):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        t = m.graph.initializer[0]
        w = onnx.numpy_helper.to_array(t)
        t.CopyFrom(onnx.numpy_helper.from_array((w + np.random.default_rng(0).standard_normal(w.shape)
                                                 .astype(np.float32) * 2 * float(w.std())), t.name))
        return m, {"emitted": True}

    monkeypatch.setattr(manager, "emit_for_target", lossy_emit)
    p = _mlp(tmp_path)
    c = _calib(tmp_path, _good(8))
    before = snapshot(tmp_path)
    r = run_cli("optimize", p, tmp_path / "out.onnx", "--calib", c, "--budget", "cosine>=0.999",
                "--target", "cpu", "--passes", "t_noop", "--report", tmp_path / "r.json", "-q")
    assert r.code == EXIT_BUDGET, r.err
    assert len(r.error_lines) == 1 and re.match(
        r"onnxshrink: error: budget cosine>=0\.999 not met on the \d+ test samples: cosine=0\.\d+", r.error_lines[0])
    assert not (tmp_path / "out.onnx").exists()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["budget_met"] is False and rep["fidelity"]["cosine"] < 0.999
    after = snapshot(tmp_path)
    after.pop("r.json")
    assert after == before


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["optimize", "--help"], 0), (["--version"], 0),
                                       ([], 0), (["frobnicate"], EXIT_USAGE)])
def test_help_and_usage(argv, code):
    r = run_cli(*argv)
    assert r.code == code
    assert "Traceback" not in r.err


@pytest.mark.parametrize("pass_name", ["quantize", "t_reject_quantized"])
def test_already_quantized_through_cli(tmp_path, pass_name):
    """The quantize pass raises InputError on an already-quantized model; the CLI maps it to exit 3
    with one line and writes nothing (the t_ pass stands in until quantize is registered)."""
    if pass_name not in registry():
        pytest.skip(f"pass {pass_name} not registered in this branch")
    d = tmp_path / "w"
    d.mkdir()
    argv = s_already_quantized(d)
    argv[argv.index("--passes") + 1] = pass_name
    rng = np.random.default_rng(0)
    calib = write_npy_dir(d / "calib", [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(4)])
    before = snapshot(d)
    r = run_cli(*argv, "--calib", calib, "-q")
    assert r.code == EXIT_INPUT, r.err
    assert len(r.error_lines) == 1 and "quantized" in r.error_lines[0] and "Traceback" not in r.err
    assert snapshot(d) == before


def test_sigterm_leaves_nothing(tmp_path):
    """SIGTERM during a run (a pipeline timeout): exit 143, one line, no output, no temporaries."""
    import signal
    import subprocess
    import sys
    import time

    p = _mlp(tmp_path)
    before = snapshot(tmp_path)
    code = ("import sys; sys.path.insert(0, %r); import tests.fake_passes; from onnxshrink.cli import main; "
            "main(sys.argv[1:])" % str(Path(__file__).resolve().parents[1]))
    marker = tmp_path.parent / f"{tmp_path.name}.sleeping"
    proc = subprocess.Popen([sys.executable, "-c", code, "optimize", str(p), str(tmp_path / "out.onnx"), "-p",
                             "t_sleep", "-o", "t_sleep.seconds=60", "-o", f"t_sleep.marker={marker}", "-q"],
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.1)  # until the pass runs (imports and reference outputs done)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "pass never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["onnxshrink: terminated"]
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["in.onnx"]
