"""Runtime targets: execution-provider profiles, and preparing and emitting a model for one.

``profiles`` holds what each EP takes (QDQ scheme, opset range, op lists); ``rewrites`` the exact
graph rewrites; ``layout`` channel-last image I/O; ``prepare`` the emission driver (opset, static
shapes, rewrites, numeric checks); ``coverage`` which nodes an EP takes and why not; ``qnn`` the
real QNN HTP check; ``openvino`` the real OpenVINO EP check (both run in another interpreter
through ``ep_process``); ``ort_format`` the .ort writer. Modules depend top-down in that order, so
``profiles`` imports none of the others.
"""

from __future__ import annotations

__all__ = ["TargetProfile", "TARGETS", "TARGET_OPTIONS", "get_target", "with_options", "prepare_for_target",
           "emit_for_target", "convert_opset", "fold_static_shapes", "apply_rewrites", "gemm_to_matmul", "REWRITES",
           "to_channels_last", "channels_last_samples", "ChannelsLastIO", "TO_NCHW", "TO_NHWC", "coverage",
           "qnn_available", "qnn_htp_check", "save_qnn_context", "openvino_available", "openvino_check",
           "setup_openvino", "save_ort_format"]

from onnxshrink.targets.coverage import coverage
from onnxshrink.targets.layout import TO_NCHW, TO_NHWC, ChannelsLastIO, channels_last_samples, to_channels_last
from onnxshrink.targets.openvino import openvino_available, openvino_check, setup_openvino
from onnxshrink.targets.ort_format import save_ort_format
from onnxshrink.targets.prepare import convert_opset, emit_for_target, fold_static_shapes, prepare_for_target
from onnxshrink.targets.profiles import TARGET_OPTIONS, TARGETS, TargetProfile, get_target, with_options
from onnxshrink.targets.qnn import qnn_available, qnn_htp_check, save_qnn_context
from onnxshrink.targets.rewrites import REWRITES, apply_rewrites, gemm_to_matmul
