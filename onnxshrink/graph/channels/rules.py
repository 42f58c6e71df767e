"""The per-op rules table of the channel analysis: which rule handles each op, which ops may see
a layout spread over several axes, and which read channels only through input 0.

An op without a rule blocks every channel id that reaches it; unary activations, broadcasting
elementwise ops and pooling ops without an entry of their own fall back to the generic rules.
"""

from __future__ import annotations

__all__ = ["RULES", "SPLIT_AXIS_OPS", "SLOT0_ONLY", "rule_for", "reads_channels_at_slot0_only"]

from onnxshrink.graph.channels.rules_channelwise import (
    ELEMENTWISE_OPS,
    FLOAT_UNARY,
    POOL_OPS,
    block_reads_shape_rule,
    clip_rule,
    elementwise_rule,
    pad_rule,
    pool_rule,
    qdq_rule,
    reduce_rule,
    resize_rule,
    softmax_rule,
    unary_rule,
    where_rule,
)
from onnxshrink.graph.channels.rules_layout import (
    concat_rule,
    flatten_rule,
    gather_rule,
    reshape_rule,
    slice_rule,
    split_rule,
    squeeze_unsqueeze_rule,
    transpose_rule,
)
from onnxshrink.graph.channels.rules_weighted import (
    batchnorm_rule,
    conv_rule,
    conv_transpose_rule,
    gemm_rule,
    instancenorm_rule,
    layernorm_rule,
    matmul_rule,
)

# ops whose rule handles a layout over several axes (between the Reshapes of a channel shuffle, and
# attention heads: [B, H, N, D] into the attention products)
SPLIT_AXIS_OPS = set(FLOAT_UNARY) | ELEMENTWISE_OPS | {"Transpose", "Reshape", "Clip", "MatMul", "Split", "Squeeze",
                                                      "Shape", "Gather", "Slice"}

# ops whose other inputs are parameters: a layout reaching them there is blocked
SLOT0_ONLY = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
              "Resize", "Upsample", "Pad", "Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
              "Softmax", "LogSoftmax", "Hardmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
              "Clip", "Transpose", "QuantizeLinear", "DequantizeLinear", "Dropout", "Gather"}

RULES = {
    "Conv": conv_rule,
    "ConvTranspose": conv_transpose_rule,
    "Gemm": gemm_rule,
    "MatMul": matmul_rule,
    "BatchNormalization": batchnorm_rule,
    "InstanceNormalization": instancenorm_rule,
    "LayerNormalization": layernorm_rule,
    "Clip": clip_rule,
    "Resize": resize_rule,
    "Upsample": resize_rule,
    "Pad": pad_rule,
    "Concat": concat_rule,
    "Split": split_rule,
    "Slice": slice_rule,
    "Transpose": transpose_rule,
    "Reshape": reshape_rule,
    "Flatten": flatten_rule,
    "Squeeze": squeeze_unsqueeze_rule,
    "Unsqueeze": squeeze_unsqueeze_rule,
    "Gather": gather_rule,
    "Softmax": softmax_rule,
    "LogSoftmax": softmax_rule,
    "Hardmax": softmax_rule,
    "ReduceMean": reduce_rule,
    "ReduceSum": reduce_rule,
    "ReduceMax": reduce_rule,
    "ReduceMin": reduce_rule,
    "QuantizeLinear": qdq_rule,
    "DequantizeLinear": qdq_rule,
    "Dropout": unary_rule,
    "Shape": block_reads_shape_rule,
    "Size": block_reads_shape_rule,
    "Where": where_rule,
}


def rule_for(op: str):
    """The rule of ``op``: its own, else the generic unary, elementwise or pooling rule; None
    when there is none (the op blocks its channels)."""
    rule = RULES.get(op)
    if rule is None:
        if op in FLOAT_UNARY:
            rule = unary_rule
        elif op in ELEMENTWISE_OPS:
            rule = elementwise_rule
        elif op in POOL_OPS:
            rule = pool_rule
    return rule


def reads_channels_at_slot0_only(op: str) -> bool:
    """True when only input 0 of ``op`` may carry channels (the rest are parameters)."""
    return op in SLOT0_ONLY or (op not in RULES and op in FLOAT_UNARY) or op in POOL_OPS
