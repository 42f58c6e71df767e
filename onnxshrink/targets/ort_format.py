"""The ORT format (.ort): onnxruntime's flatbuffer model format for its mobile/minimal builds,
written with onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``)."""

from __future__ import annotations

__all__ = ["save_ort_format"]

import os
import subprocess
import sys
from pathlib import Path

from onnxshrink.errors import InputError


def save_ort_format(onnx_path: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                    optimization_style: str = "Fixed", target_platform: str | None = None) -> Path:
    """Convert a saved .onnx model to the ORT format with onnxruntime's converter
    (``python -m onnxruntime.tools.convert_onnx_models_to_ort``); returns the .ort path.
    onnxruntime's guidance: 'Runtime' style for NNAPI/CoreML, 'Fixed' otherwise."""
    onnx_path = Path(onnx_path)
    out_dir = Path(output_dir) if output_dir else onnx_path.parent
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
           "--output_dir", str(out_dir), "--optimization_style", optimization_style]
    if target_platform:
        cmd += ["--target_platform", target_platform]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(out_dir.glob(onnx_path.stem + "*.ort"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not found:
        raise InputError(f"ORT format conversion failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return found[-1]
