"""Execution-provider profiles: what each edge EP of onnxruntime fuses and accepts.

A TargetProfile tells the quantize pass the QDQ scheme (activation/weight types, symmetry,
per-channel), and the emission step the opset range and whether shapes must be static.
"""

from __future__ import annotations

__all__ = ["TargetProfile", "TARGETS", "get_target"]

from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    provider: str                       # onnxruntime execution provider name
    activation_dtype: str = "uint8"     # uint8 | int8 | uint16 | int16
    weight_dtype: str = "int8"          # int8 | uint8
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    per_channel: bool = True
    opset_min: int = 13
    opset_max: int = 21
    static_shapes: bool = False
    int32_bias: bool = True
    notes: tuple = field(default_factory=tuple)


TARGETS: dict[str, TargetProfile] = {
    "cpu": TargetProfile("cpu", "onnxruntime CPU EP (x86-64 / ARM64 MLAS kernels)", "CPUExecutionProvider",
                         activation_dtype="uint8", per_channel=True, opset_min=13),
    "xnnpack": TargetProfile("xnnpack", "XNNPACK EP (ARM/x86 mobile CPUs)", "XnnpackExecutionProvider",
                             activation_dtype="int8", symmetric_activations=False, per_channel=True,
                             notes=("per-channel weights only with int8 activations",)),
    "nnapi": TargetProfile("nnapi", "Android NNAPI EP", "NnapiExecutionProvider",
                           activation_dtype="uint8", per_channel=False, static_shapes=True, opset_max=21),
    "coreml": TargetProfile("coreml", "Apple CoreML EP", "CoreMLExecutionProvider",
                            activation_dtype="uint8", per_channel=True, static_shapes=True),
    "qnn": TargetProfile("qnn", "Qualcomm QNN EP, HTP (NPU) backend", "QNNExecutionProvider",
                         activation_dtype="uint8", per_channel=True, static_shapes=True, opset_max=21),
    "openvino": TargetProfile("openvino", "Intel OpenVINO EP", "OpenVINOExecutionProvider",
                              activation_dtype="uint8", per_channel=True),
}


def get_target(name: "str | TargetProfile | None") -> TargetProfile | None:
    if name is None or isinstance(name, TargetProfile):
        return name
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]
