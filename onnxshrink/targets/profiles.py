"""Execution-provider profiles: what each edge EP of onnxruntime fuses and accepts.

A TargetProfile tells the quantize pass the QDQ scheme (activation/weight types, symmetry,
per-channel), and the emission step (``onnxshrink.targets.prepare``) the opset range, whether shapes must
be static, which operators the EP takes, which exact rewrites to apply, and how to check the
result. The facts, with their sources:

- cpu: onnxruntime's MLAS kernels fuse QDQ Conv/MatMul/Gemm with uint8 or int8 activations and
  int8 per-channel weights; every ONNX op runs.
- xnnpack: the XNNPACK EP takes Conv, ConvTranspose, MaxPool, AveragePool, Softmax, Resize, Gemm
  and MatMul (``node_support_checker.cc``), fusing a following Relu/Clip; QDQ groups of
  Conv/ConvTranspose/MaxPool/AveragePool/Softmax/Resize. Per-channel weights only as int8
  symmetric with int8 activations ("qc8"); uint8 tensors must be per-tensor ("qu8"), and u8
  activations with s8 weights are not handled (``detail/utils.cc: GetTensorQuantType``). All
  other ops stay on the CPU EP by design.
- nnapi: uint8 asymmetric tensors (TENSOR_QUANT8_ASYMM), per-tensor; every value static;
  the op list is onnxruntime's own ``nnapi_supported_ops.md`` read by its mobile usability
  checker (``onnxruntime.tools.mobile_helpers.usability_checker``).
- coreml: op list from the same checker (``coreml_supported_mlprogram_ops.md``), rank <= 5;
  CoreML computes in float16/float32, QDQ weights are dequantized by the EP.
- qnn: the HTP (NPU) backend runs only quantized graphs (uint8 or uint16 activations,
  asymmetric; int8 symmetric per-channel or uint8 per-tensor weights, int32 bias) and needs
  static shapes with constant shape operands (the EP rejects Shape/Range/ConstantOfShape, so
  shape arithmetic must be folded away). Checked for real when ``onnxruntime-qnn`` is installed.
  HTP architectures (``htp_arch``): v73 and later (Snapdragon 8 Gen 2, SM8550, and newer) also run
  float nodes, in fp16; v68 (SM8350) and v69 (SM8450) have no float unit: every compute op must sit
  between Q/DQ (``integer_only``).
- openvino: uint8 activations, int8 symmetric per-channel weights; dynamic shapes allowed. OpenVINO
  reads each Q/DQ pair as a FakeQuantize and runs its own low-precision transformations; NNCF, its
  quantizer, places FakeQuantize only at the inputs of compute ops. Measured on the OpenVINO EP
  (onnxruntime-openvino 1.24, OpenVINO 2025.4, x86-64 AVX2 CPU, YOLOv8n): onnxruntime's fused
  placement (Q/DQ on every unit's output too, integer Concat/Sigmoid/Mul) gives cosine 0.985 against
  fp32 (0.9988 on the CPU EP) at 1.19x fp32's speed; Q/DQ only at Conv inputs gives 0.998 at 1.5x.
  Integer Concat alone costs the fidelity, integer Sigmoid/Mul the speed. Hence
  ``qdq_placement="inputs"``. On x86 without VNNI its int8 kernels saturate like onnxruntime's
  (u8 x s8 pairs summed in int16): with 8-bit weights YOLOv8n reaches 0.998 and PP-OCR cls 0.954 on
  its worst sample, with 7-bit weights 0.9995 and 1.0000 (``x86_int8``). Checked for real when a
  Python with onnxruntime-openvino is there (``onnxshrink.targets.openvino``).
"""

from __future__ import annotations

__all__ = ["TargetProfile", "TARGETS", "TARGET_OPTIONS", "get_target", "with_options", "target_has_op", "checker_ops",
           "HTP_ARCHS", "HTP_FP16_FROM", "QDQ_OPS", "QNN_HTP_OPS", "XNNPACK_OPS", "XNNPACK_QDQ_OPS",
           "XNNPACK_FUSED_ACTIVATIONS", "USABILITY_CHECKER_FILES"]

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from onnxshrink.errors import UsageError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# Ops the QNN EP builds for the HTP backend (onnxruntime/core/providers/qnn/builder/op_builder_factory.cc).
# Shape, Range, ConstantOfShape, NonZero, Loop/If have no builder: they must be folded away.
QNN_HTP_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Conv ConvTranspose Cos
CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish
Identity InstanceNormalization LRN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
LpNormalization MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear Reciprocal
ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize Round ScatterND Sigmoid
Sign Sin Slice Softmax SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze
Upsample Where
""".split())

# HTP architectures the qnn target takes (``-o target.htp_arch=v68``) -> the Snapdragon SoC the simulator
# emulates for it (QNN's soc_model numbers: SM8350 30, SM8450 36, SM8550 43, SM8650 57, SM8750 69)
HTP_ARCHS = {68: 30, 69: 36, 73: 43, 75: 57, 79: 69}
HTP_FP16_FROM = 73  # HTP v73 and later compute float nodes in fp16; earlier HTPs have no float unit

# Ops the XNNPACK EP takes (float, or as a QDQ node group where marked in XNNPACK_QDQ_OPS).
XNNPACK_OPS = frozenset("Conv ConvTranspose MaxPool AveragePool Softmax Resize Gemm MatMul QLinearConv".split())
XNNPACK_QDQ_OPS = frozenset("Conv ConvTranspose MaxPool AveragePool Softmax Resize".split())
# Activations XNNPACK fuses into a preceding float Conv/MaxPool/AveragePool it takes.
XNNPACK_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
# onnxruntime's supported-op lists its mobile usability checker reads, per EP (profile ops="usability_checker")
USABILITY_CHECKER_FILES = {"nnapi": "nnapi_supported_ops.md", "coreml": "coreml_supported_mlprogram_ops.md"}


@dataclass(frozen=True)
class TargetProfile:
    """What an execution provider fuses and accepts.

    activation_dtype / weight_dtype / symmetric_* / per_channel / int32_bias: the QDQ scheme the
        quantize pass should emit for this EP.
    opset_min / opset_max: the opset range the emitted model is converted into.
    static_shapes: every input dimension must be fixed (taken from the calibration data) and shape
        arithmetic folded away.
    ops: the ONNX ops the EP takes (None: every op; "usability_checker": onnxruntime's mobile
        usability checker's list for this EP); contrib_ops: the com.microsoft ops it takes (QNN: Gelu,
        which the ``fuse_gelu`` rewrite writes below opset 20; checked on the QNN HTP simulator).
    fp16: the EP computes in float16 natively (the ``fp16`` pass is a sensible choice).
    max_rank: the largest tensor rank the EP takes.
    rewrites: exact rewrites applied at emission for this EP (see ``onnxshrink.targets.rewrites.REWRITES``);
        decompositions of ops the EP lacks are applied whenever the op is missing from ``ops``.
    float_ops_run: the EP runs float (not quantized) compute nodes; False for QNN HTP.
    wide_activation_dtype: a 16-bit activation type the EP also takes; the quantize pass (with
        activation_dtype=auto) uses it when the 8-bit plan misses the fidelity floor or needs float units.
    x86_int8: the EP runs its int8 kernels on this kind of CPU with u8 x s8 instructions (VPMADDUBSW),
        whose pairwise int16 sums saturate on x86 without VNNI: the quantize pass then uses 7-bit
        weights (``reduce_range=auto``).
    qdq_placement: "fused" puts Q/DQ on every integer unit's inputs and output, as onnxruntime's
        kernels fuse them; "inputs" only where an integer op reads a tensor, with no integer
        elementwise ops (the NNCF placement OpenVINO expects; see the openvino facts above).
    """

    name: str
    description: str
    provider: str                       # onnxruntime execution provider name
    activation_dtype: str = "uint8"     # uint8 | int8 | uint16 | int16
    wide_activation_dtype: str | None = None  # a 16-bit type the EP also takes (the quantizer's fallback)
    weight_dtype: str = "int8"          # int8 | uint8
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    per_channel: bool = True
    opset_min: int = 13
    opset_max: int = 21
    static_shapes: bool = False
    int32_bias: bool = True
    notes: tuple = field(default_factory=tuple)
    ops: frozenset | str | None = None
    fp16: bool = False
    max_rank: int = 8
    rewrites: tuple = ()
    float_ops_run: bool = True
    fallback_ok: bool = True            # nodes the EP does not take run on the CPU EP by design
    ort_format: bool = False            # also write the ORT format (.ort) next to the output
    channels_last: bool = False         # emit 4-D image inputs/outputs as NHWC (exact Transposes)
    allow_partial: bool = False         # accept a model the EP takes only in part (else exit 4)
    qdq_placement: str = "fused"        # fused: Q/DQ on unit inputs and outputs; inputs: only where an integer op reads
    x86_int8: bool = False              # int8 kernels on x86 u8 x s8 instructions (saturate without VNNI)
    context: bool = False               # qnn: also write the compiled EPContext model beside the output
    htp_arch: int | None = None         # qnn: the HTP architecture (68, 69, 73, 75, 79); None for other targets
    contrib_ops: frozenset = frozenset()  # com.microsoft ops the EP takes (checked on the EP)

    @property
    def integer_only(self) -> bool:
        """The device has no float unit (HTP before v73): every compute op must sit between Q/DQ."""
        return self.htp_arch is not None and self.htp_arch < HTP_FP16_FROM

    def supports_op(self, op_type: str, domain: str = "") -> bool | None:
        """True/False when this profile's op list decides it; None when the usability checker does."""
        if self.ops is None:
            return True
        if isinstance(self.ops, str):
            return None
        return (domain in ("", "ai.onnx")) and op_type in self.ops


TARGETS: dict[str, TargetProfile] = {
    "cpu": TargetProfile(
        "cpu", "onnxruntime CPU EP (x86-64 / ARM64 MLAS kernels)", "CPUExecutionProvider",
        activation_dtype="uint8", per_channel=True, opset_min=13, ops=None, x86_int8=True),
    "xnnpack": TargetProfile(
        "xnnpack", "XNNPACK EP (ARM/x86 mobile CPUs)", "XnnpackExecutionProvider",
        activation_dtype="int8", symmetric_activations=False, weight_dtype="int8", symmetric_weights=True,
        per_channel=True, ops=XNNPACK_OPS, rewrites=("matmul_add_to_gemm",),
        notes=("per-channel weights only as int8 symmetric with int8 activations (qc8); uint8 tensors "
               "must be per-tensor; u8 activations with s8 weights are not taken",
               "ops XNNPACK does not take run on the CPU EP in the same session by design")),
    "nnapi": TargetProfile(
        "nnapi", "Android NNAPI EP", "NnapiExecutionProvider",
        activation_dtype="uint8", weight_dtype="uint8", symmetric_weights=False, per_channel=False,
        static_shapes=True, opset_max=21, ops="usability_checker",
        rewrites=("matmul_add_to_gemm", "fill_empty_resize_inputs"),
        notes=("NNAPI takes TENSOR_QUANT8_ASYMM (uint8, per-tensor); every value must have a static shape",
               "op list: onnxruntime's nnapi_supported_ops.md via its mobile usability checker")),
    "coreml": TargetProfile(
        "coreml", "Apple CoreML EP (MLProgram)", "CoreMLExecutionProvider",
        activation_dtype="uint8", per_channel=True, static_shapes=True, ops="usability_checker", fp16=True,
        rewrites=("fill_empty_resize_inputs",),
        max_rank=5, notes=("CoreML computes in float16/float32; QDQ weights are dequantized by the EP",)),
    "qnn": TargetProfile(
        "qnn", "Qualcomm QNN EP, HTP (NPU) backend", "QNNExecutionProvider",
        activation_dtype="uint8", wide_activation_dtype="uint16", symmetric_activations=False,
        weight_dtype="int8", symmetric_weights=True,
        per_channel=True, static_shapes=True, opset_min=13, opset_max=21, ops=QNN_HTP_OPS,
        float_ops_run=False, fallback_ok=False, max_rank=5, htp_arch=73, contrib_ops=frozenset({"Gelu"}),
        rewrites=("einsum_to_matmul",),
        notes=("HTP runs quantized graphs only: uint8 or uint16 asymmetric activations, int8 symmetric "
               "per-channel or uint8 per-tensor weights, int32 bias",
               "static shapes; Shape/Range/ConstantOfShape have no QNN builder and must fold away",
               "Einsum: the QNN EP takes four lowercase batched-MatMul equations only; every Einsum that is a "
               "batched matrix product is written as MatMul first")),
    "openvino": TargetProfile(
        "openvino", "Intel OpenVINO EP", "OpenVINOExecutionProvider",
        activation_dtype="uint8", per_channel=True, fp16=True, ops=None, qdq_placement="inputs", x86_int8=True,
        opset_min=14, rewrites=("fuse_hardswish",),
        notes=("Q/DQ only at the inputs of Conv/MatMul/Gemm (NNCF's placement): OpenVINO's low-precision "
               "transformations lose fidelity on integer Concat and speed on integer Sigmoid/Mul",
               "hard-swish as the HardSwish op (opset 14): OpenVINO runs x * HardSigmoid(x) far slower "
               "(PP-OCRv4 det 139 vs 87 ms, PP-OCR cls 2.4 vs 1.6 ms, one thread)",
               "verified on the OpenVINO EP when a Python with onnxruntime-openvino is there "
               "(onnxshrink setup openvino)")),
}


# emission options a target takes: ``--target qnn+channels_last+ort``, ``-o target.channels_last=true``
# or a recipe's ``target: {name: qnn, channels_last: true}``; option -> (TargetProfile field, aliases)
TARGET_OPTIONS = {"ort": ("ort_format", ("ort", "ort_format")),
                  "channels_last": ("channels_last", ("channels_last", "nhwc")),
                  "allow_partial": ("allow_partial", ("allow_partial", "partial")),
                  "context": ("context", ("context", "qnn_context")),
                  "htp_arch": ("htp_arch", ("htp_arch", "arch"))}


def _option_field(key: str) -> str:
    for fld, aliases in TARGET_OPTIONS.values():
        if key in aliases:
            return fld
    raise UsageError(f"unknown target option '{key}'; known: {', '.join(TARGET_OPTIONS)}")


def get_target(name: "str | dict | TargetProfile | None") -> TargetProfile | None:
    """A profile by name; ``+option`` suffixes switch emission options on (``nnapi+ort``: also the
    .ort file beside the output; ``qnn+channels_last``: NHWC image I/O). A mapping
    ``{"name": ..., option: value}`` is the recipe form."""
    if name is None or isinstance(name, TargetProfile):
        return name
    if isinstance(name, dict):
        opts = dict(name)
        return with_options(get_target(opts.pop("name", None) or opts.pop("target", None)), opts)
    base, *flags = str(name).split("+")
    if base not in TARGETS:
        raise UsageError(f"unknown target '{base}'; known targets: {', '.join(TARGETS)}")
    return with_options(TARGETS[base], {f: True for f in flags})


def with_options(profile: TargetProfile | None, options: dict) -> TargetProfile | None:
    """The profile with emission options set (``{"channels_last": True}``); values may be YAML-ish strings."""
    if not options:
        return profile
    if profile is None:
        raise UsageError(f"target options {sorted(options)} given without --target")
    vals = {}
    for k, v in options.items():
        if _option_field(k) == "htp_arch":
            vals["htp_arch"] = _htp_arch(profile, v)
            continue
        if isinstance(v, str):
            if v.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise UsageError(f"target option {k}={v!r}: expected true or false")
            v = v.strip().lower() in ("true", "1", "yes", "on")
        vals[_option_field(k)] = bool(v)
    if vals.get("context") and profile.name != "qnn":
        raise UsageError(f"target option context (a compiled QNN context binary) is for the qnn target, "
                         f"not {profile.name}")
    return dataclasses.replace(profile, **vals)


def _htp_arch(profile: TargetProfile, value) -> int:
    """``v68`` / ``68`` / ``V73`` -> 68 / 73; only for the qnn target and the architectures in HTP_ARCHS."""
    if profile.name != "qnn":
        raise UsageError(f"target option htp_arch (a QNN HTP architecture) is for the qnn target, not {profile.name}")
    txt = str(value).strip().lower().removeprefix("v")
    if not txt.isdigit() or int(txt) not in HTP_ARCHS:
        raise UsageError(f"target option htp_arch={value!r}: expected one of "
                         f"{', '.join('v%d' % a for a in HTP_ARCHS)}")
    return int(txt)


def target_has_op(profile: TargetProfile | None, op: str) -> bool:
    """The target's EP takes ``op`` (default domain); no profile: every op."""
    s = profile.supports_op(op) if profile is not None else True
    if s is None:  # decided by onnxruntime's usability checker list
        return checker_ops(profile).get(op, False)
    return bool(s)


def checker_ops(profile: TargetProfile) -> dict:
    """op -> True for the ops in onnxruntime's mobile usability checker list of this EP."""
    return _checker_ops_for(profile.name)


@functools.lru_cache(maxsize=None)
def _checker_ops_for(name: str) -> dict:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc  # onnxruntime: heavy
    path = Path(uc.__file__).parent / USABILITY_CHECKER_FILES[name]
    ops = uc._SupportedOpsChecker(str(path))._ops
    return {k.split(":", 1)[1]: True for k in ops if k.startswith("ai.onnx:")}
