"""The cleanup pass: lossless canonicalization, every step exact up to float32 round-off.

Order: Constant nodes to initializers; up to four rounds of shape folding and constant folding
(what one round folds, a Shape or a Range limit, gives shape inference the sizes the next round's
guard needs); identical initializers merged (so equal constants make equal nodes); then local
rewrites to a fixed point (Identity/Dropout removal, hard-sigmoid and hard-swish chains fused into
HardSigmoid, BatchNorm and scale/bias folds backward and
forward, zero Pads folded into the Conv or AveragePool reading them, ConstantOfShape and
constant-chain folds, two-operand Einsums that are batched matrix products written as MatMul
(``graph.einsum``), duplicate nodes merged); dead code removed.
The steps live in ``constants``, ``folding``, ``shapes``, ``activations``, ``affine``, ``padding``,
``dedup`` and ``dead``.

Graph inputs, outputs (names, order, types), opsets and metadata stay as they were; initializers
that are also graph inputs of an IR >= 4 model (overridable defaults) are never folded.
Subgraphs (If/Loop/Scan) are processed recursively; references to outer-scope values are kept.
Custom-domain ops are left alone.
"""

from __future__ import annotations

__all__ = ["CleanupOptions", "CleanupPass"]

import contextlib
import dataclasses
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxshrink.graph.convert import graph_to_skeleton
from onnxshrink.graph.einsum import einsum_to_matmul
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.cleanup.activations import fuse_hard_activations, target_takes_hard_sigmoid
from onnxshrink.passes.cleanup.affine import (
    fold_batchnorm_backward,
    fold_batchnorm_forward,
    fold_scale_bias_backward,
    fold_scale_bias_forward,
)
from onnxshrink.passes.cleanup.constants import constants_to_initializers, fold_constant_chains, fold_constant_of_shape
from onnxshrink.passes.cleanup.dead import remove_dead, remove_identities
from onnxshrink.passes.cleanup.dedup import merge_duplicate_nodes, merge_initializers
from onnxshrink.passes.cleanup.folding import fold_constants
from onnxshrink.passes.cleanup.interface import (
    outputs_from_constants,
    protect_overridable,
    record_io,
    restore_io,
    restore_protected,
)
from onnxshrink.passes.cleanup.padding import fold_pad
from onnxshrink.passes.cleanup.rewrite import FreshNames, all_graphs, count_nodes, quiet_gs
from onnxshrink.passes.cleanup.shapes import InferredShapes, fold_shapes
from onnxshrink.passes.registry import register

FOLD_ROUNDS = 4
REWRITE_ROUNDS = 20
# counters of the local rewrites, in report order
REWRITE_STATS = ("identity_removed", "dropout_removed", "hard_activations_fused",
                 "bn_folded", "bn_folded_forward", "scale_bias_folded",
                 "constant_of_shape_folded", "constant_chains_folded", "duplicate_nodes_merged",
                 "scale_bias_folded_forward", "einsum_to_matmul", "pads_folded")
SIZE_STATS = ("nodes_before", "nodes_after", "initializers_before", "initializers_after")


@dataclass
class CleanupOptions:
    constants_to_initializers: bool = field(default=True, metadata={"help": "turn Constant nodes into initializers"})
    fold_shapes: bool = field(default=True, metadata={
        "help": "fold Shape/Size (and Gather/Slice of shapes) of statically shaped tensors"})
    fold_constants: bool = field(default=True, metadata={
        "help": "evaluate nodes whose inputs are all constant (onnxruntime)"})
    fold_size_limit: int = field(default=1 << 20, metadata={
        "help": "bytes: do not fold a node whose output is larger than this and than its inputs"})
    flatten_if: bool = field(default=False, metadata={
        "help": "inline the taken branch of If nodes whose condition is constant (off: inlining can expose "
                "shape errors the If hid from strict checking)"})
    fuse_hard_activations: bool = field(default=True, metadata={
        "help": "fuse Clip(x+3,0,6)/6 into HardSigmoid and x*Clip(x+3,0,6)/6 into x*HardSigmoid (hard-swish)"})
    fold_batchnorm: bool = field(default=True, metadata={
        "help": "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"})
    fold_batchnorm_forward: bool = field(default=True, metadata={
        "help": "fold BatchNormalization into a following unpadded Conv"})
    fold_scale_bias_forward: bool = field(default=True, metadata={
        "help": "fold Mul/Div/Add/Sub by scalar or per-channel constants into a following unpadded Conv"})
    fold_scale_bias: bool = field(default=True, metadata={
        "help": "fold Mul/Div/Add/Sub by scalar or per-channel constants into the preceding Conv/Gemm"})
    fold_constant_of_shape: bool = field(default=True, metadata={
        "help": "fold Add/Sub/Mul/Div of a ConstantOfShape by a one-element constant into its fill value"})
    fold_constant_chains: bool = field(default=True, metadata={
        "help": "merge consecutive Mul/Div (or Add/Sub) by constants into one (x*a/b -> x*(a/b))"})
    fold_pad: bool = field(default=True, metadata={
        "help": "fold a constant zero Pad of the spatial axes into the Conv, padding-counting AveragePool or "
                "MaxPool of values >= 0 reading it (exact; Keras' ZeroPadding2D)"})
    einsum_to_matmul: bool = field(default=True, metadata={
        "help": "write two-operand Einsums that are batched matrix products as Transpose/Reshape + MatMul "
                "(exact; integer kernels and every EP take MatMul; graph/einsum.py)"})
    merge_duplicate_nodes: bool = field(default=True, metadata={
        "help": "merge nodes with the same op, attributes and inputs (common subexpressions)"})
    remove_identity: bool = field(default=True, metadata={"help": "remove Identity and inference Dropout"})
    remove_dead: bool = field(default=True, metadata={
        "help": "remove nodes and initializers no output depends on"})
    merge_initializers: bool = field(default=True, metadata={
        "help": "merge identical initializers (dtype, shape, bytes)"})
    subgraphs: bool = field(default=True, metadata={"help": "also rewrite inside If/Loop/Scan bodies"})


@register
class CleanupPass(Pass):
    """Lossless graph canonicalization: fold constants and shapes, fold BatchNorm and constant
    scales into Conv/Gemm, drop Identity/Dropout, dead code and duplicate initializers."""

    name = "cleanup"
    summary = "lossless: constant/shape folding, BatchNorm and scale folding, dead-code removal"
    lossless = True
    needs_data = False
    Options = CleanupOptions

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        template = ctx.template if ctx is not None else None
        st: dict = {"nodes_before": count_nodes(graph)}
        n_init_before = _count_initializers(graph)
        try:  # onnx-graphsurgeon cannot export every graph (optional types, some attributes)
            with quiet_gs():
                exported = graph_to_skeleton(graph)
        except Exception as e:
            return PassResult(graph, False, st, reason=f"onnx-graphsurgeon cannot export this graph "
                                                       f"({type(e).__name__}: {e}); left unchanged")
        names = FreshNames(graph)
        io_types = record_io(graph)
        protected = protect_overridable(graph, template)
        shapes = InferredShapes()

        if o.constants_to_initializers:
            st["constants_to_initializers"] = constants_to_initializers(graph)
        _fold_rounds(graph, o, exported, template, protected, shapes, names, st)
        del exported

        st["initializers_merged"] = 0
        digests: dict = {}  # of the constants not loaded, for both merges
        if o.merge_initializers:  # first here, so equal constants make equal nodes for merging
            st["initializers_merged"] += merge_initializers(graph, digests)
        if o.fuse_hard_activations and not target_takes_hard_sigmoid(getattr(ctx, "target", None)):
            o = dataclasses.replace(o, fuse_hard_activations=False)  # its EP lacks the op the fusion writes
        changed = _rewrite_to_fixed_point(graph, o, names, shapes.shapes, graph.opset or 0, st)

        if o.merge_initializers:
            st["initializers_merged"] += merge_initializers(graph, digests)
        del digests
        if o.remove_dead:
            remove_dead(graph)
        outputs_from_constants(graph, names, graph.opset or 0, protected)
        restore_protected(protected)
        shapes.restore()
        restore_io(io_types)
        with quiet_gs(), contextlib.suppress(Exception):
            graph.toposort(recurse_subgraphs=True)

        st["nodes_after"] = count_nodes(graph)
        n_init_after = _count_initializers(graph)
        st["initializers_before"], st["initializers_after"] = n_init_before, n_init_after
        changed = changed or st["nodes_after"] != st["nodes_before"] or n_init_after != n_init_before or any(
            v for k, v in st.items() if k not in SIZE_STATS)
        return PassResult(graph, changed, st, reason="" if changed else "nothing to clean up")


def _fold_rounds(graph: gs.Graph, o: CleanupOptions, exported, template, protected: dict,
                 shapes: InferredShapes, names: FreshNames, st: dict) -> None:
    """Shape and constant folding, each round on shapes inferred from a fresh export."""
    st["shapes_folded"] = st["folded_nodes"] = 0
    for round_ in range(FOLD_ROUNDS):
        if not (o.fold_shapes or o.fold_constants):
            break
        if round_:
            try:
                with quiet_gs():
                    exported = graph_to_skeleton(graph)
            except Exception:
                break
        shapes.annotate(graph, exported, template, protected)
        exported = None
        n = 0
        if o.fold_shapes:
            k = fold_shapes(graph, shapes.shapes)
            st["shapes_folded"] += k
            n += k
        if o.fold_constants:
            k, flattened = fold_constants(graph, o.fold_size_limit, o.subgraphs, o.flatten_if, names)
            if o.flatten_if:
                st["if_flattened"] = st.get("if_flattened", 0) + flattened
            st["folded_nodes"] += k
            n += k
        if o.remove_dead:
            remove_dead(graph)
        if not n:
            break


def _rewrite_to_fixed_point(graph: gs.Graph, o: CleanupOptions, names: FreshNames, shapes: dict,
                            opset: int, st: dict) -> bool:
    """The local rewrites, repeated until none applies (a Conv -> BN -> Mul -> Add chain folds step
    by step); returns whether any applied."""
    for k in REWRITE_STATS:
        st.setdefault(k, 0)
    changed = False
    for _ in range(REWRITE_ROUNDS):
        n = 0
        for sub in (list(all_graphs(graph)) if o.subgraphs else [graph]):
            steps = []
            if o.remove_identity:
                identities, dropouts = remove_identities(sub, graph, opset)
                st["identity_removed"] += identities
                st["dropout_removed"] += dropouts
                n += identities + dropouts
            if o.fuse_hard_activations:  # before the scale folds, which would split the chain
                steps.append(("hard_activations_fused", fuse_hard_activations(sub, graph, names)))
            if o.fold_batchnorm:
                steps.append(("bn_folded", fold_batchnorm_backward(sub, graph, names)))
            if o.fold_batchnorm_forward:
                steps.append(("bn_folded_forward", fold_batchnorm_forward(sub, graph, names)))
            if o.fold_scale_bias:
                steps.append(("scale_bias_folded", fold_scale_bias_backward(sub, graph, names)))
            if o.fold_scale_bias_forward:
                steps.append(("scale_bias_folded_forward", fold_scale_bias_forward(sub, graph, names, shapes)))
            if o.fold_constant_of_shape:
                steps.append(("constant_of_shape_folded", fold_constant_of_shape(sub, graph, names)))
            if o.fold_constant_chains:
                steps.append(("constant_chains_folded", fold_constant_chains(sub, graph, names)))
            if o.einsum_to_matmul:
                steps.append(("einsum_to_matmul", einsum_to_matmul(sub, names.fresh)))
            if o.fold_pad:
                steps.append(("pads_folded", fold_pad(sub, graph)))
            if o.merge_duplicate_nodes:
                steps.append(("duplicate_nodes_merged", merge_duplicate_nodes(sub, graph)))
            for key, k in steps:
                st[key] += k
                n += k
        if not n:
            break
        changed = True
        if o.remove_dead:
            remove_dead(graph)
    return changed


def _count_initializers(graph: gs.Graph) -> int:
    return sum(1 for sub in all_graphs(graph) for t in sub.tensors().values() if isinstance(t, gs.Constant))
