"""Helpers of the reliability tests: run the CLI in-process exactly as the console script does
(``onnxshrink.cli.main``: errors mapped to one line and an exit code), hash files, snapshot
folders, and build small odd models with onnx.helper."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tests.fake_passes  # noqa: F401  (registers the t_* passes)
from onnxshrink.cli import main

OPSET = [helper.make_opsetid("", 17)]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def run_cli(*argv) -> CliResult:
    """Run ``onnxshrink ARGV`` in-process; returns exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden temporaries included)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def model(nodes, inputs, outputs, inits=(), opsets=None, ir_version=8) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                          opset_imports=opsets or OPSET)
    m.ir_version = ir_version
    return m


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def two_input_model() -> onnx.ModelProto:
    """y = MatMul(a, W) + b_in; z = ReduceSum(a); inputs 'a' [1,8] float and 'b' [1,4] float."""
    rng = np.random.default_rng(0)
    return model([helper.make_node("MatMul", ["a", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
                  helper.make_node("ReduceSum", ["a"], ["z"], keepdims=1)],
                 [vi("a", [1, 8]), vi("b", [1, 4])], [vi("y", [1, 4]), vi("z", [1, 1])],
                 [init("W", rng.standard_normal((8, 4)).astype(np.float32))])


def write_npy_dir(folder, arrays) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.save(folder / f"{i:04d}.npy", a)
    return folder


def mlp_with_calib(folder) -> tuple[Path, Path]:
    """``models.build.mlp`` saved in ``folder`` with 12 random calibration inputs beside it."""
    from models.build import mlp
    folder = Path(folder)
    p = folder / "mlp.onnx"
    onnx.save(mlp(), str(p))
    rng = np.random.default_rng(0)
    return p, write_npy_dir(folder / "calib", [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(12)])


def no_tmp_leftovers(folder) -> bool:
    """No temporary files/folders of an atomic write are left behind."""
    return not [p for p in os.listdir(folder) if p.startswith(".")]
