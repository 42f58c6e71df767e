"""fp16: convert float32 weights and activations to float16, keeping the model's I/O types.

For GPU/NPU targets that compute in half precision (CoreML, OpenVINO GPU/NPU, QNN GPU).
Every float32 initializer and value becomes float16 (values beyond the float16 range are
clamped to +-65504, magnitudes below 5.96e-8 flushed to +-5.96e-8 as onnxruntime's converter
does); graph inputs and outputs stay float32 with a Cast at the boundary. Ops on the block
list stay float32 with Casts around them: ops whose float16 result is numerically unsafe
(Exp, Log, Pow, Softmax, reductions that sum many terms, ...) and onnxruntime's own list of ops
without float16 kernels. The conversion itself is onnxruntime's
``onnxruntime.transformers.float16.convert_float_to_float16``. Error: each float16 rounding
adds a relative error of at most 2^-11 per value; the manager measures the effect on outputs.
"""

from __future__ import annotations

__all__ = ["Fp16Pass", "UNSAFE_FP16_OPS"]

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register

# float16 overflows (exp, pow, sum of many terms) or loses too much (log near 1, reciprocal)
UNSAFE_FP16_OPS = ("Exp", "Log", "Pow", "Reciprocal", "Softmax", "LogSoftmax", "ReduceSum", "ReduceSumSquare",
                   "ReduceL2", "ReduceLogSumExp", "ReduceProd", "ReduceMean", "CumSum", "Einsum",
                   "LayerNormalization", "InstanceNormalization", "Range", "TopK", "NonMaxSuppression")


@dataclass
class Fp16Options:
    """Options of the fp16 pass: what stays float32."""

    block_ops: list[str] = field(default_factory=lambda: list(UNSAFE_FP16_OPS),
                                 metadata={"help": "ops kept in float32 (Casts around them)"})
    block_nodes: list[str] = field(default_factory=list, metadata={"help": "node names kept in float32"})
    keep_io_types: bool = field(default=True, metadata={"help": "graph inputs/outputs stay float32"})


@register
class Fp16Pass(Pass):
    """Float16 conversion with float32 I/O and a block list of numerically unsafe ops."""

    name = "fp16"
    summary = "float16 weights and activations, float32 I/O, unsafe ops kept in float32"
    lossless = False
    needs_data = False
    min_opset = 7
    Options = Fp16Options

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = ctx.to_model(graph)
        n_float = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        if n_float == 0 and not any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                                    for v in list(model.graph.input) + list(model.graph.value_info)):
            return PassResult(graph, False, reason="no float32 tensors")
        block = sorted(set(self.options.block_ops) | set(DEFAULT_OP_BLOCK_LIST))
        try:
            out = convert_float_to_float16(model, keep_io_types=self.options.keep_io_types, op_block_list=block,
                                           node_block_list=list(self.options.block_nodes) or None)
        except AssertionError:  # the converter's own consistency checks carry no message
            raise RuntimeError("onnxruntime's float16 converter refused this graph (its internal check failed; "
                               "a float initializer read both outside and inside an If/Loop body trips it)") from None
        kept = sorted({n.op_type for n in out.graph.node if n.op_type in block})
        n16 = sum(1 for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        g = gs.import_onnx(out)
        g.toposort()  # the converter appends its boundary Casts at the end of the node list
        return PassResult(g, True, {
            "fp16_initializers": n16, "float_initializers_before": n_float,
            "kept_float32_ops": kept, "casts_added": sum(1 for n in out.graph.node if n.op_type == "Cast") -
            sum(1 for n in model.graph.node if n.op_type == "Cast")})

    def weaker(self):
        """Keep Conv/MatMul-free ops of the tail in float32: block every op but the heavy ones."""
        if "Add" in self.options.block_ops:
            return None
        more = ["Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Resize", "Concat"]
        return type(self)(block_ops=list(self.options.block_ops) + more, block_nodes=self.options.block_nodes,
                          keep_io_types=self.options.keep_io_types)

    def describe_strength(self) -> str:
        return f"{len(self.options.block_ops)} op types kept in float32"
