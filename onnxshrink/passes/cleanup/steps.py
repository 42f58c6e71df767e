"""Lossless canonicalization: constants, folding, BatchNorm/scale folding, dead code.

Every step leaves the outputs equal up to float32 round-off:

* ``Constant`` nodes become initializers (PaddlePaddle exports hold their weights in hundreds
  of them). A Constant whose output is a graph output stays a node (an output cannot be an
  initializer and keep its producer).
* Shape folding: ``Shape``/``Size`` of a tensor whose shape is static (onnx shape inference)
  and ``Gather``/``Slice`` of a partly static shape that only pick static dims become constants.
* Constant folding: nodes whose inputs are all constant are evaluated once with onnxruntime
  (onnx-graphsurgeon's ``fold_constants``). Guarded: random ops, custom domains, sequences and
  optionals are never folded, and a node whose output would exceed ``fold_size_limit`` bytes
  and its inputs' size (ConstantOfShape, Expand, Tile, broadcasting, ...) is left to run time.
* BatchNormalization ``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` folds
  into a preceding Conv / ConvTranspose / Gemm, per output channel ``o``:
  ``W'[o] = W[o] * s[o]``, ``b' = (b - mean) * s + beta``. Conv weights are [M, C/g, k...]
  (output channel axis 0); ConvTranspose weights are [C, M/g, k...] whose output channel is
  ``group(c) * M/g + j`` (axis 1, per group); Gemm scales the columns of op(B) and
  ``C' = (beta*C - mean) * s + bn_beta`` with ``beta' = 1``.
* A BatchNormalization feeding a Conv folds into it (per *input* channel ``c``):
  ``W'[m, c] = W[m, c] * s[c]``, ``b'[m] = b[m] + sum_{c,k} W[m, c, k] * t[c]`` with
  ``t = beta - mean * s``. Only exact when the Conv has no padding (padded zeros would have to
  become ``t[c]`` and are not transformed), so padded Convs are left alone.
* ``Mul``/``Div``/``Add``/``Sub`` by a constant that is a scalar or per output channel
  (broadcast over every other axis) after Conv/ConvTranspose/Gemm: ``Mul(c)``: ``W' = W*c``,
  ``b' = b*c``; ``Div(c)``: the same with ``1/c``; ``Add(c)``: ``b' = b + c``; ``Sub(c)``:
  ``b' = b - c``. Only when the intermediate tensor has one consumer and is not a graph output.
* ``Identity`` and inference ``Dropout`` (no training_mode, mask unused) are removed; when one
  produces a graph output, its producer is renamed to keep the output's name.
* Dead nodes and unused initializers are removed; identical initializers (dtype, shape, bytes)
  are merged.

Graph inputs, outputs (names, order, types), opsets and metadata stay as they were; initializers
that are also graph inputs of an IR >= 4 model (overridable defaults) are never folded.
Subgraphs (If/Loop/Scan) are processed recursively; references to outer-scope values are kept
(tensors are shared objects, consumer counts include subgraph uses). Custom-domain ops are
left alone.
"""

from __future__ import annotations

__all__ = ["CleanupPass"]

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import register
from onnxshrink.passes.quantize.weight_storage import is_weight_decode

_DEFAULT_DOMAINS = ("", "ai.onnx")
# never folded: nondeterministic, sequence/optional producing, or stateful
_NO_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "Dropout", "Loop", "Scan", "If",
}
# may produce outputs much larger than their inputs; folded only with a known, bounded output size
_EXPANDING = {
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "CenterCropPad", "Col2Im", "Where",
}
_FLOAT_TYPES = (np.float16, np.float32, np.float64)


@register
class CleanupPass(Pass):
    """Lossless graph canonicalization: fold constants and shapes, fold BatchNorm and constant
    scales into Conv/Gemm, drop Identity/Dropout, dead code and duplicate initializers."""

    name = "cleanup"
    summary = "lossless: constant/shape folding, BatchNorm and scale folding, dead-code removal"
    lossless = True
    needs_data = False

    @dataclass
    class Options:
        constants_to_initializers: bool = field(default=True, metadata={"help": "turn Constant nodes into initializers"})
        fold_shapes: bool = field(default=True, metadata={"help": "fold Shape/Size (and Gather/Slice of shapes) of statically shaped tensors"})
        fold_constants: bool = field(default=True, metadata={"help": "evaluate nodes whose inputs are all constant (onnxruntime)"})
        fold_size_limit: int = field(default=1 << 20, metadata={"help": "bytes: do not fold a node whose output is larger than this and than its inputs"})
        flatten_if: bool = field(default=False, metadata={"help": "inline the taken branch of If nodes whose condition is constant (off: inlining can expose shape errors the If hid from strict checking)"})
        fold_batchnorm: bool = field(default=True, metadata={"help": "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"})
        fold_batchnorm_forward: bool = field(default=True, metadata={"help": "fold BatchNormalization into a following unpadded Conv"})
        fold_scale_bias_forward: bool = field(default=True, metadata={"help": "fold Mul/Div/Add/Sub by scalar or per-channel constants into a following unpadded Conv"})
        fold_scale_bias: bool = field(default=True, metadata={"help": "fold Mul/Div/Add/Sub by scalar or per-channel constants into the preceding Conv/Gemm"})
        fold_constant_of_shape: bool = field(default=True, metadata={"help": "fold Add/Sub/Mul/Div of a ConstantOfShape by a one-element constant into its fill value"})
        fold_constant_chains: bool = field(default=True, metadata={"help": "merge consecutive Mul/Div (or Add/Sub) by constants into one (x*a/b -> x*(a/b))"})
        merge_duplicate_nodes: bool = field(default=True, metadata={"help": "merge nodes with the same op, attributes and inputs (common subexpressions)"})
        remove_identity: bool = field(default=True, metadata={"help": "remove Identity and inference Dropout"})
        remove_dead: bool = field(default=True, metadata={"help": "remove nodes and initializers no output depends on"})
        merge_initializers: bool = field(default=True, metadata={"help": "merge identical initializers (dtype, shape, bytes)"})
        subgraphs: bool = field(default=True, metadata={"help": "also rewrite inside If/Loop/Scan bodies"})

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        return _Cleanup(graph, self.options, ctx).run()


# ---------------------------------------------------------------------------------------------
# graph helpers


def all_graphs(graph: gs.Graph):
    """The graph and every nested subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from all_graphs(sub)


def count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in all_graphs(graph))


def _is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of ``old`` (in any graph, subgraphs included) reads ``new`` instead."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


@contextlib.contextmanager
def _quiet_gs():
    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR + 10
    try:
        yield
    finally:
        G_LOGGER.severity = old


def _const(t) -> bool:
    return isinstance(t, gs.Constant)


def _np_dtype(t: gs.Tensor):
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.dtype))
        except Exception:
            return None


class _Cleanup:
    def __init__(self, graph: gs.Graph, opts, ctx: Context):
        self.g = graph
        self.o = opts
        self.ctx = ctx
        self.stats = {}
        self.names = set()
        self.protected: dict[str, tuple[gs.Tensor, np.ndarray]] = {}
        self.annotated: list[tuple[gs.Tensor, object, object]] = []
        self.annotated_ids: set[int] = set()
        self.inferred: dict[str, list] = {}
        self.opset = graph.opset or 0

    # ----------------------------------------------------------------- driver
    def run(self) -> PassResult:
        g = self.g
        st = self.stats
        st["nodes_before"] = count_nodes(g)
        n_init_before = self._count_initializers()
        try:  # onnx-graphsurgeon cannot export every graph (optional types, some attributes)
            with _quiet_gs():
                exported = gs.export_onnx(g, do_type_check=False)
        except Exception as e:
            st["reason"] = f"onnx-graphsurgeon cannot export this graph ({type(e).__name__}: {e}); left unchanged"
            return PassResult(g, False, st)
        self._collect_names()
        self._record_io()
        self._protect_overridable()
        changed = False

        if self.o.constants_to_initializers:
            st["constants_to_initializers"] = self._constants_to_initializers()
        # folding rounds: what one round folds (a Shape, a Range limit) gives shape inference the
        # sizes the guard needs in the next round
        st["shapes_folded"] = st["folded_nodes"] = 0
        for round_ in range(4):
            if not (self.o.fold_shapes or self.o.fold_constants):
                break
            if round_:
                try:
                    with _quiet_gs():
                        exported = gs.export_onnx(g, do_type_check=False)
                except Exception:
                    break
            self._annotate_shapes(exported)
            exported = None
            n = 0
            if self.o.fold_shapes:
                k = self._fold_shapes()
                st["shapes_folded"] += k
                n += k
            if self.o.fold_constants:
                k = self._fold_constants()
                st["folded_nodes"] += k
                n += k
            if self.o.remove_dead:
                self._cleanup()
            if not n:
                break
        del exported

        st["initializers_merged"] = 0
        if self.o.merge_initializers:  # first here, so equal constants make equal nodes for merging
            st["initializers_merged"] += self._merge_initializers()

        # local rewrites to a fixed point (a Conv -> BN -> Mul -> Add chain folds step by step)
        for k in ("identity_removed", "dropout_removed", "bn_folded", "bn_folded_forward", "scale_bias_folded",
                  "constant_of_shape_folded", "constant_chains_folded", "duplicate_nodes_merged",
                  "scale_bias_folded_forward"):
            st.setdefault(k, 0)
        for _ in range(20):
            n = 0
            graphs = list(all_graphs(g)) if self.o.subgraphs else [g]
            for sub in graphs:
                if self.o.remove_identity:
                    n += self._remove_identities(sub)
                if self.o.fold_batchnorm:
                    n += self._fold_bn_backward(sub)
                if self.o.fold_batchnorm_forward:
                    n += self._fold_bn_forward(sub)
                if self.o.fold_scale_bias:
                    n += self._fold_scale_bias(sub)
                if self.o.fold_scale_bias_forward:
                    n += self._fold_scale_bias_forward(sub)
                if self.o.fold_constant_of_shape:
                    n += self._fold_constant_of_shape(sub)
                if self.o.fold_constant_chains:
                    n += self._fold_constant_chains(sub)
                if self.o.merge_duplicate_nodes:
                    n += self._merge_duplicate_nodes(sub)
            if not n:
                break
            changed = True
            if self.o.remove_dead:
                self._cleanup()

        if self.o.merge_initializers:
            st["initializers_merged"] += self._merge_initializers()
        if self.o.remove_dead:
            self._cleanup()
        self._outputs_from_constants()
        self._restore()
        self._restore_io()
        with _quiet_gs(), contextlib.suppress(Exception):
            g.toposort(recurse_subgraphs=True)

        st["nodes_after"] = count_nodes(g)
        n_init_after = self._count_initializers()
        st["initializers_before"], st["initializers_after"] = n_init_before, n_init_after
        changed = changed or st["nodes_after"] != st["nodes_before"] or n_init_after != n_init_before or any(
            v for k, v in st.items() if k not in ("nodes_before", "nodes_after", "initializers_before",
                                                  "initializers_after"))
        if not changed:
            st["reason"] = "nothing to clean up"
        return PassResult(g, changed, st)

    def _count_initializers(self) -> int:
        n = 0
        for sub in all_graphs(self.g):
            n += sum(1 for t in sub.tensors().values() if _const(t))
        return n

    def _collect_names(self):
        for sub in all_graphs(self.g):
            self.names.update(sub.tensors().keys())
            self.names.update(n.name for n in sub.nodes if n.name)

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def _new_const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._fresh(base), np.ascontiguousarray(values))

    def _graph_outputs(self) -> set[int]:
        return {id(t) for sub in all_graphs(self.g) for t in sub.outputs}

    def _graph_inputs(self) -> set[int]:
        return {id(t) for sub in all_graphs(self.g) for t in sub.inputs}

    # ----------------------------------------------------------------- protection
    def _protect_overridable(self):
        """Initializers that are also graph inputs of an IR >= 4 model may be fed at run time:
        hide their values (make them Variables) while folding, restore them at the end."""
        tpl = self.ctx.template if self.ctx is not None else None
        if tpl is None or (tpl.ir_version or 0) < 4:
            return
        inits = {t.name for t in tpl.graph.initializer}
        names = {i.name for i in tpl.graph.input if i.name in inits}
        if not names:
            return
        for name, t in self.g.tensors().items():
            if name in names and _const(t):
                vals = t.values
                self.protected[name] = (t, vals)
                t.to_variable(dtype=vals.dtype, shape=list(vals.shape))

    def _restore(self):
        for t, vals in self.protected.values():
            t.to_constant(vals)
        # keep value_info as it was: shapes we inferred were only for folding decisions
        for t, dtype, shape in self.annotated:
            if isinstance(t, gs.Variable):
                t.dtype, t.shape = dtype, shape

    # ----------------------------------------------------------------- constants
    def _constants_to_initializers(self) -> int:
        outs = self._graph_outputs()
        n = 0
        for sub in all_graphs(self.g):
            for node in list(sub.nodes):
                if node.op != "Constant" or not _is_default_domain(node) or len(node.outputs) != 1:
                    continue
                out = node.outputs[0]
                if id(out) in outs or len(node.attrs) != 1:
                    continue
                (attr, val), = node.attrs.items()
                if attr == "value" and _const(val):
                    arr = val.values
                elif attr in ("value_float", "value_int"):
                    arr = np.array(val, dtype=np.float32 if attr == "value_float" else np.int64)
                elif attr in ("value_floats", "value_ints"):
                    arr = np.array(list(val), dtype=np.float32 if attr == "value_floats" else np.int64)
                else:  # sparse_value, strings, attribute references: leave the node
                    continue
                if arr.dtype == object:
                    continue
                node.outputs.clear()
                out.to_constant(arr)
                n += 1
            sub.nodes = [nd for nd in sub.nodes if nd.outputs or nd.op != "Constant"]
        return n

    # ----------------------------------------------------------------- shapes
    def _annotate_shapes(self, model: onnx.ModelProto):
        """Shapes and types from onnx shape inference on an export of the graph, written onto
        tensors that lack them (reset at the end so value_info stays as it was).

        Inference starts from the graph inputs only: the model's own value_info and output shapes
        are dropped first, since an exporter's stale value_info must not turn into folded shapes.
        Shape folding reads ``self.inferred`` (these shapes), never the tensors' imported shapes."""
        try:
            if self.ctx is not None and self.ctx.template is not None:
                from onnxshrink.model import copy_model_fields
                copy_model_fields(self.ctx.template, model)
            del model.graph.value_info[:]
            for o in model.graph.output:
                if o.type.HasField("tensor_type"):
                    o.type.tensor_type.ClearField("shape")
            for t in model.graph.initializer:  # inference needs dims, and values of small ones only
                if int(np.prod(t.dims, dtype=np.int64)) > 4096 and t.data_type != onnx.TensorProto.INT64:
                    for f in ("raw_data", "float_data", "double_data", "int32_data", "external_data"):
                        t.ClearField(f)
                    t.data_location = onnx.TensorProto.DEFAULT
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
            return
        info = {}
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            shape = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            dtype = None
            if tt.elem_type:
                with contextlib.suppress(Exception):
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            info[vi.name] = (dtype, shape)
        self.inferred = {k: v[1] for k, v in info.items() if v[1] is not None}
        for name, t in self.g.tensors().items():
            if isinstance(t, gs.Variable) and name in info and name not in self.protected:
                dtype, shape = info[name]
                better_shape = shape is not None and (t.shape is None or (
                    not self._static(t.shape) and self._static(shape) and len(shape) == len(t.shape)))
                if better_shape or (t.dtype is None and dtype is not None):
                    if id(t) not in self.annotated_ids:
                        self.annotated_ids.add(id(t))
                        self.annotated.append((t, t.dtype, t.shape))
                    if better_shape:
                        t.shape = shape
                    if t.dtype is None and dtype is not None:
                        t.dtype = dtype

    @staticmethod
    def _static(shape) -> bool:
        return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)

    def _fold_shapes(self) -> int:
        n = 0
        for sub in all_graphs(self.g):
            for node in list(sub.nodes):
                if not _is_default_domain(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Shape":
                    x = node.inputs[0]
                    if _const(x) or not isinstance(x, gs.Variable) or self.inferred.get(x.name) is None:
                        continue
                    dims = list(self.inferred[x.name])
                    r = len(dims)
                    start = node.attrs.get("start", 0)
                    end = node.attrs.get("end", r)
                    dims = dims[start:end] if end is not None else dims[start:]
                    if self._static(dims):
                        n += self._to_const(node, np.array(dims, dtype=np.int64))
                    else:
                        n += self._fold_partial_shape(node, dims)
                elif node.op == "Size":
                    x = node.inputs[0]
                    if isinstance(x, gs.Variable) and not _const(x) and self._static(self.inferred.get(x.name)):
                        n += self._to_const(node, np.array(int(np.prod(self.inferred[x.name], dtype=np.int64)),
                                                           dtype=np.int64))
            sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _to_const(self, node: gs.Node, value: np.ndarray, out_index: int = 0) -> int:
        out = node.outputs[out_index]
        node.outputs.clear()
        out.to_constant(value)
        return 1

    def _fold_partial_shape(self, shape_node: gs.Node, dims: list) -> int:
        """Gather/Slice consumers of a partly dynamic shape that pick only static dims."""
        out = shape_node.outputs[0]
        n = 0
        for c in list(out.outputs):
            if not _is_default_domain(c) or not c.outputs or c.inputs[0] is not out:
                continue
            picked = None
            try:
                if c.op == "Gather" and len(c.inputs) > 1 and _const(c.inputs[1]) and c.attrs.get("axis", 0) == 0:
                    idx = np.asarray(c.inputs[1].values)
                    if np.issubdtype(idx.dtype, np.integer):
                        arr = np.array(dims, dtype=object)
                        picked = arr[idx]
                        picked = picked.tolist() if isinstance(picked, np.ndarray) else picked
                elif c.op == "Slice":
                    if len(c.inputs) >= 3 and all(_const(t) for t in c.inputs[1:] if not t.is_empty()):
                        starts = c.inputs[1].values.tolist()
                        ends = c.inputs[2].values.tolist()
                        axes = c.inputs[3].values.tolist() if len(c.inputs) > 3 and not c.inputs[3].is_empty() else [0]
                        steps = c.inputs[4].values.tolist() if len(c.inputs) > 4 and not c.inputs[4].is_empty() else [1]
                    elif "starts" in c.attrs and "ends" in c.attrs:
                        starts, ends = list(c.attrs["starts"]), list(c.attrs["ends"])
                        axes, steps = list(c.attrs.get("axes", [0])), [1]
                    else:
                        continue
                    if len(starts) == 1 and axes in ([0], [-1]) and steps[0] != 0:
                        picked = dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
            except Exception:
                picked = None
            if picked is None:
                continue
            if isinstance(picked, list):
                if not self._static(picked):
                    continue
                val = np.array(picked, dtype=np.int64)
            else:
                if not isinstance(picked, (int, np.integer)) or picked < 0:
                    continue
                val = np.array(int(picked), dtype=np.int64)
            n += self._to_const(c, val)
        return n

    # ----------------------------------------------------------------- constant folding
    def _fold_constants(self) -> int:
        limit = int(self.o.fold_size_limit)
        before = count_nodes(self.g)

        def nbytes(t) -> int | None:
            if _const(t):
                return int(t.values.nbytes)
            dt = _np_dtype(t)
            if not self._static(t.shape) or dt is None:
                return None
            return int(np.prod(t.shape, dtype=np.int64)) * dt.itemsize

        def exclude(node: gs.Node) -> bool:
            if not _is_default_domain(node) or node.op in _NO_FOLD or is_weight_decode(node):
                return True  # (stored int8 weights: folding would undo the compression)
            if "Sequence" in node.op or "Optional" in node.op:
                return True
            ins = [nbytes(t) for t in node.inputs if not t.is_empty()]
            outs = [nbytes(t) for t in node.outputs if not t.is_empty()]
            if any(o is None for o in outs):
                return node.op in _EXPANDING
            grow = sum(outs)
            return grow > limit and grow > sum(i or 0 for i in ins)

        with _quiet_gs():
            self.g.toposort(recurse_subgraphs=True)
            # graph by graph, outermost first, so that our guard applies to subgraphs too (gs's own
            # recursion drops should_exclude_node) and its If flattening (which rebinds outer-scope
            # producers) never runs
            graphs = list(all_graphs(self.g)) if self.o.subgraphs else [self.g]
            for sub in graphs:
                try:
                    sub.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning=None,
                                       error_ok=False, flatten_subgraphs=False, size_threshold=None,
                                       should_exclude_node=exclude, recurse_functions=False)
                except Exception:
                    # one node onnxruntime cannot evaluate: peel failing nodes off ("basic" partitioning
                    # recurses forever on a failure in onnx-graphsurgeon 0.6)
                    with contextlib.suppress(Exception):
                        sub.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning="recursive",
                                           error_ok=True, flatten_subgraphs=False, size_threshold=None,
                                           should_exclude_node=exclude, recurse_functions=False)
            if self.o.flatten_if:
                self.stats["if_flattened"] = self.stats.get("if_flattened", 0) + sum(
                    self._flatten_ifs(sub) for sub in list(all_graphs(self.g)))
            self.g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        return max(0, before - count_nodes(self.g))

    def _flatten_ifs(self, g: gs.Graph) -> int:
        """Inline the taken branch of an If whose condition is constant. A branch output that is not produced inside the branch (an outer-scope value,
        a branch constant or a branch input) is passed on through an Identity."""
        n = 0
        index = 0
        while index < len(g.nodes):
            node = g.nodes[index]
            if not (node.op == "If" and _is_default_domain(node) and node.inputs and _const(node.inputs[0])):
                index += 1
                continue
            cond = np.asarray(node.inputs[0].values)
            if cond.size != 1:
                index += 1
                continue
            branch = node.attrs["then_branch"] if bool(cond.reshape(-1)[0]) else node.attrs["else_branch"]
            if len(branch.outputs) != len(node.outputs):
                index += 1
                continue
            # names are unique across scopes (SSA over subgraphs), so branch tensors keep theirs
            new_nodes = list(branch.nodes)
            pairs = list(zip(list(node.outputs), list(branch.outputs)))  # clearing inputs edits node.outputs
            node.inputs.clear()
            node.outputs.clear()
            for node_out, sub_out in pairs:
                producer = sub_out.inputs[0] if len(sub_out.inputs) == 1 else None
                if producer is not None and producer in branch.nodes and not _const(sub_out):
                    node_out.inputs.clear()
                    k = next(i for i, t in enumerate(producer.outputs) if t is sub_out)
                    producer.outputs[k] = node_out
                else:
                    node_out.inputs.clear()
                    new_nodes.append(gs.Node("Identity", name=self._fresh("flattened_if_identity"),
                                             inputs=[sub_out], outputs=[node_out]))
            del g.nodes[index]
            g.nodes[index:index] = new_nodes
            index += len(new_nodes)
            n += 1
        return n

    def _cleanup(self):
        with _quiet_gs():
            self.g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)

    # ----------------------------------------------------------------- identities
    def _remove_identities(self, sub: gs.Graph) -> int:
        n = 0
        outs = self._graph_outputs()
        ins = self._graph_inputs()
        for node in list(sub.nodes):
            if not node.outputs or not _is_default_domain(node):
                continue
            if node.op == "Identity":
                kind = "identity_removed"
            elif node.op == "Dropout" and self._dropout_is_identity(node, outs):
                kind = "dropout_removed"
            else:
                continue
            if not node.inputs or node.inputs[0].is_empty():
                continue
            x, y = node.inputs[0], node.outputs[0]
            if not isinstance(x, (gs.Variable, gs.Constant)) or not isinstance(y, gs.Variable):
                continue
            if id(y) not in outs:
                _replace_uses(y, x)
                _detach(node)
            else:
                # y names a graph output: let x's producer write y directly, when x is local
                prod = x.inputs[0] if len(x.inputs) == 1 else None
                if (prod is None or prod not in sub.nodes or id(x) in outs or id(x) in ins or _const(x)
                        or any(c not in sub.nodes for c in x.outputs)):
                    continue
                if y.dtype is None:
                    y.dtype = x.dtype
                others = [c for c in x.outputs if c is not node]
                _detach(node)
                for c in others:
                    for i, t in enumerate(c.inputs):
                        if t is x:
                            c.inputs[i] = y
                k = next(i for i, t in enumerate(prod.outputs) if t is x)
                prod.outputs[k] = y
            self.stats[kind] += 1
            n += 1
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _dropout_is_identity(self, node: gs.Node, outs: set[int]) -> bool:
        if self.opset and self.opset < 7 and node.attrs.get("is_test", 0) != 1:
            return False
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            tm = node.inputs[2]
            if not _const(tm) or bool(np.any(tm.values)):
                return False
        for m in node.outputs[1:]:
            if not m.is_empty() and (m.outputs or id(m) in outs):
                return False
        return True

    # ----------------------------------------------------------------- BatchNorm
    def _bn_params(self, bn: gs.Node, outs: set[int]):
        """(s, t) of an inference BatchNormalization (y = x*s + t per channel), or None."""
        if bn.op != "BatchNormalization" or not _is_default_domain(bn) or len(bn.inputs) < 5:
            return None
        if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
            return None
        for m in bn.outputs[1:]:
            if not m.is_empty() and (m.outputs or id(m) in outs):
                return None
        params = bn.inputs[1:5]
        if not all(_const(p) for p in params):
            return None
        gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
        if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1):
            return None
        if not (gamma.shape == beta.shape == mean.shape == var.shape):
            return None
        if params[0].values.dtype not in _FLOAT_TYPES:
            return None
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        return s, t

    def _single_use(self, x: gs.Tensor, consumer: gs.Node, outs: set[int], ins: set[int]) -> bool:
        return (isinstance(x, gs.Variable) and id(x) not in outs and id(x) not in ins
                and len(x.outputs) == 1 and x.outputs[0] is consumer)

    def _producer(self, x: gs.Tensor, sub: gs.Graph, ops) -> gs.Node | None:
        if len(x.inputs) != 1:
            return None
        p = x.inputs[0]
        if p.op not in ops or not _is_default_domain(p) or p not in sub.nodes or p.outputs[0] is not x:
            return None
        if len([o for o in p.outputs if not o.is_empty()]) != 1:
            return None
        return p

    def _linear_params(self, p: gs.Node):
        """(W, b or None, channels M) of a Conv/ConvTranspose/Gemm with constant float weights."""
        if len(p.inputs) < 2 or not _const(p.inputs[1]):
            return None
        w = p.inputs[1].values
        if w.dtype not in _FLOAT_TYPES:
            return None
        b = None
        if len(p.inputs) > 2 and not p.inputs[2].is_empty():
            if not _const(p.inputs[2]) or p.inputs[2].values.dtype != w.dtype:
                return None
            b = p.inputs[2].values
        if p.op == "Conv":
            if w.ndim < 3:
                return None
            m = w.shape[0]
        elif p.op == "ConvTranspose":
            if w.ndim < 3:
                return None
            m = w.shape[1] * int(p.attrs.get("group", 1))
        else:  # Gemm
            if w.ndim != 2:
                return None
            m = w.shape[0] if p.attrs.get("transB", 0) else w.shape[1]
        if p.op != "Gemm" and b is not None and b.shape != (m,):
            return None
        return w, b, m

    def _scale_linear(self, p: gs.Node, w, b, scale: np.ndarray, shift: np.ndarray):
        """Rewrite p so that its output becomes ``y * scale + shift`` (per output channel)."""
        dt = w.dtype
        scale = np.asarray(scale, dtype=np.float64)
        shift = np.asarray(shift, dtype=np.float64)
        w64 = w.astype(np.float64)
        if p.op == "Conv":
            w_new = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif p.op == "ConvTranspose":
            g = int(p.attrs.get("group", 1))
            cin, mg = w.shape[0], w.shape[1]
            w_new = (w64.reshape((g, cin // g, mg) + w.shape[2:])
                     * scale.reshape((g, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)
        else:
            w_new = w64 * (scale[:, None] if p.attrs.get("transB", 0) else scale[None, :])
        base = p.inputs[1].name
        p.inputs[1] = self._new_const(base + "_folded", w_new.astype(dt))
        if p.op == "Gemm":
            beta = float(p.attrs.get("beta", 1.0))
            c = b.astype(np.float64) * beta if b is not None else np.zeros(1)
            c_new = c * scale + shift
            if b is None and c_new.shape == (1,):
                c_new = np.broadcast_to(c_new, scale.shape)
            tensor = self._new_const((p.inputs[2].name if b is not None else base) + "_bias_folded", c_new.astype(dt))
            p.attrs["beta"] = 1.0
        else:
            b64 = b.astype(np.float64) if b is not None else np.zeros(scale.shape)
            tensor = self._new_const((p.inputs[2].name if b is not None else base) + "_bias_folded",
                                     (b64 * scale + shift).astype(dt))
        if len(p.inputs) > 2:
            p.inputs[2] = tensor
        else:
            p.inputs.append(tensor)

    def _fold_bn_backward(self, sub: gs.Graph) -> int:
        n = 0
        outs, ins = self._graph_outputs(), self._graph_inputs()
        for bn in list(sub.nodes):
            if bn.op != "BatchNormalization" or not bn.outputs:
                continue
            st = self._bn_params(bn, outs)
            if st is None:
                continue
            x = bn.inputs[0]
            p = self._producer(x, sub, ("Conv", "ConvTranspose", "Gemm"))
            if p is None or not self._single_use(x, bn, outs, ins):
                continue
            lp = self._linear_params(p)
            if lp is None:
                continue
            w, b, m = lp
            s, t = st
            if s.shape != (m,) or bn.inputs[1].values.dtype != w.dtype:
                continue
            self._scale_linear(p, w, b, s, t)
            y = bn.outputs[0]
            _detach(bn)
            p.outputs[0] = y
            n += 1
        self.stats["bn_folded"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _following_unpadded_conv(self, y: gs.Tensor, sub: gs.Graph, outs: set[int]):
        """(conv, W, b, M) when ``y`` is read only by an unpadded Conv as its data input."""
        if not (isinstance(y, gs.Variable) and id(y) not in outs and len(y.outputs) == 1):
            return None
        conv = y.outputs[0]
        if conv.op != "Conv" or not _is_default_domain(conv) or conv not in sub.nodes or conv.inputs[0] is not y:
            return None
        if any(t is y for t in conv.inputs[1:]):
            return None
        # padding would pad x with zeros where the original padded affine(x) with zeros
        if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        if any(int(v) != 0 for v in conv.attrs.get("pads", [])):
            return None
        lp = self._linear_params(conv)
        if lp is None:
            return None
        return (conv,) + lp

    def _fold_input_affine(self, conv: gs.Node, w, b, m, s: np.ndarray, t: np.ndarray, x: gs.Tensor) -> bool:
        """Conv(x * s + t) with per-input-channel s, t (length C) -> Conv'(x): W'[m, c] = W[m, c] * s[c],
        b'[m] = b[m] + sum_{c,k} W[m, c, k] * t[c] (grouped: input channel c of output m's group)."""
        g = int(conv.attrs.get("group", 1))
        cg = w.shape[1]
        if s.shape != (cg * g,) or t.shape != (cg * g,) or m % g:
            return False
        mg = m // g
        w64 = w.astype(np.float64)
        extra = (1,) * (w.ndim - 2)
        wg = w64.reshape((g, mg, cg) + w.shape[2:])
        w_new = (wg * s.reshape((g, 1, cg) + extra)).reshape(w.shape)
        b_add = (wg * t.reshape((g, 1, cg) + extra)).reshape(m, -1).sum(axis=1)
        b64 = b.astype(np.float64) if b is not None else np.zeros(m)
        base = conv.inputs[1].name
        conv.inputs[1] = self._new_const(base + "_folded", w_new.astype(w.dtype))
        if np.any(t != 0) or b is not None:
            bias = self._new_const((conv.inputs[2].name if b is not None else base) + "_bias_folded",
                                   (b64 + b_add).astype(w.dtype))
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias
            else:
                conv.inputs.append(bias)
        conv.inputs[0] = x
        return True

    def _fold_bn_forward(self, sub: gs.Graph) -> int:
        n = 0
        outs = self._graph_outputs()
        for bn in list(sub.nodes):
            if bn.op != "BatchNormalization" or not bn.outputs:
                continue
            st = self._bn_params(bn, outs)
            if st is None:
                continue
            found = self._following_unpadded_conv(bn.outputs[0], sub, outs)
            if found is None or bn.inputs[1].values.dtype != found[1].dtype:
                continue
            conv, w, b, m = found
            if self._fold_input_affine(conv, w, b, m, st[0], st[1], bn.inputs[0]):
                _detach(bn)
                n += 1
        self.stats["bn_folded_forward"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _fold_scale_bias_forward(self, sub: gs.Graph) -> int:
        """Mul/Div/Add/Sub of x by a scalar or per-channel constant that only an unpadded Conv reads
        (PP-LCNet's learnable affine before a pointwise conv). x must already have the Conv input's
        rank, so the constant does not broadcast x to a bigger shape."""
        n = 0
        outs = self._graph_outputs()
        for e in list(sub.nodes):
            if not e.outputs:
                continue
            op = self._const_operand(e)
            if op is None:
                continue
            x, c64, dt, fam = op
            found = self._following_unpadded_conv(e.outputs[0], sub, outs)
            if found is None or dt != found[1].dtype:
                continue
            conv, w, b, m = found
            rank = w.ndim
            xs = self.inferred.get(x.name) if isinstance(x, gs.Variable) else None
            xs = xs if xs is not None else x.shape
            if xs is None or len(xs) != rank or c64.ndim > rank:
                continue
            cs = c64.reshape((1,) * (rank - c64.ndim) + c64.shape)
            cin = w.shape[1] * int(conv.attrs.get("group", 1))
            if any(d != 1 for i, d in enumerate(cs.shape) if i != 1) or cs.shape[1] not in (1, cin):
                continue
            vec = np.broadcast_to(cs.reshape(-1), (cin,))
            s, t = (vec, np.zeros(cin)) if fam == "Mul" else (np.ones(cin), vec)
            if self._fold_input_affine(conv, w, b, m, np.asarray(s, np.float64), np.asarray(t, np.float64), x):
                _detach(e)
                n += 1
        self.stats["scale_bias_folded_forward"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    # ----------------------------------------------------------------- Mul/Add by constants
    def _fold_scale_bias(self, sub: gs.Graph) -> int:
        n = 0
        outs, ins = self._graph_outputs(), self._graph_inputs()
        for e in list(sub.nodes):
            if e.op not in ("Mul", "Div", "Add", "Sub") or not _is_default_domain(e) or not e.outputs:
                continue
            if len(e.inputs) != 2:
                continue
            a, c = e.inputs
            if _const(a) and not _const(c) and e.op in ("Mul", "Add"):
                a, c = c, a
            if not _const(c) or _const(a):
                continue
            p = self._producer(a, sub, ("Conv", "ConvTranspose", "Gemm"))
            if p is None or not self._single_use(a, e, outs, ins):
                continue
            lp = self._linear_params(p)
            if lp is None:
                continue
            w, b, m = lp
            cv = c.values
            if cv.dtype != w.dtype:
                continue
            rank = 2 if p.op == "Gemm" else w.ndim
            if cv.ndim > rank:
                continue
            cs = cv.reshape((1,) * (rank - cv.ndim) + cv.shape)
            if any(d != 1 for i, d in enumerate(cs.shape) if i != 1) or cs.shape[1] not in (1, m):
                continue
            vec = np.broadcast_to(cs.reshape(-1).astype(np.float64), (m,))
            if e.op in ("Mul", "Div"):
                if e.op == "Div":
                    if np.any(vec == 0) or not np.all(np.isfinite(vec)):
                        continue
                    vec = 1.0 / vec
                self._scale_linear(p, w, b, vec, np.zeros(m))
            else:
                self._scale_linear(p, w, b, np.ones(m), vec if e.op == "Add" else -vec)
            y = e.outputs[0]
            _detach(e)
            p.outputs[0] = y
            n += 1
        self.stats["scale_bias_folded"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _fold_constant_of_shape(self, sub: gs.Graph) -> int:
        """``ConstantOfShape(s, value=v) (op) c`` with a one-element float constant ``c`` whose rank
        does not exceed the fill's: a fill of ``v (op) c`` (computed in the tensor's dtype, as at
        run time). Dynamic shapes keep this (YOLOv8's stride tensors)."""
        n = 0
        outs, ins = self._graph_outputs(), self._graph_inputs()
        for e in list(sub.nodes):
            if e.op not in ("Mul", "Div", "Add", "Sub") or not _is_default_domain(e) or not e.outputs:
                continue
            if len(e.inputs) != 2:
                continue
            for k in (0, 1):
                a, c = e.inputs[k], e.inputs[1 - k]
                if _const(c) and not _const(a):
                    break
            else:
                continue
            p = self._producer(a, sub, ("ConstantOfShape",))
            if p is None or not self._single_use(a, e, outs, ins) or not p.inputs:
                continue
            cv = np.asarray(c.values)
            val = p.attrs.get("value")
            v = np.asarray(val.values) if _const(val) else np.zeros(1, np.float32)
            if cv.size != 1 or v.size != 1 or cv.dtype != v.dtype or v.dtype not in _FLOAT_TYPES:
                continue
            shp = p.inputs[0]
            rank = shp.values.shape[0] if _const(shp) and shp.values.ndim == 1 else (
                shp.shape[0] if shp.shape is not None and len(shp.shape) == 1 and isinstance(shp.shape[0], int) else None)
            if rank is None or cv.ndim > rank:
                continue
            x, y = (v.reshape(()), cv.reshape(())) if k == 0 else (cv.reshape(()), v.reshape(()))
            with np.errstate(all="ignore"):
                r = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[e.op](x, y)
            p.attrs["value"] = gs.Constant(self._fresh(p.name or "fill") if p.name else self._fresh("fill"),
                                           np.asarray(r, dtype=v.dtype).reshape(1))
            out = e.outputs[0]
            _detach(e)
            p.outputs[0] = out
            n += 1
        self.stats["constant_of_shape_folded"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    @staticmethod
    def _const_operand(e: gs.Node):
        """(x, c as a 'Mul'-or-'Add' operand, family) of x*c, c*x, x/c, x+c, c+x, x-c; else None."""
        if e.op not in ("Mul", "Div", "Add", "Sub") or not _is_default_domain(e) or len(e.inputs) != 2:
            return None
        a, b = e.inputs
        if _const(b) and not _const(a):
            x, c = a, np.asarray(b.values)
        elif _const(a) and not _const(b) and e.op in ("Mul", "Add"):
            x, c = b, np.asarray(a.values)
        else:
            return None
        if c.dtype not in _FLOAT_TYPES:
            return None
        c64 = c.astype(np.float64)
        if e.op == "Div":
            if np.any(c64 == 0) or not np.all(np.isfinite(c64)):
                return None
            c64 = 1.0 / c64
        elif e.op == "Sub":
            c64 = -c64
        return x, c64, c.dtype, ("Mul" if e.op in ("Mul", "Div") else "Add")

    def _fold_constant_chains(self, sub: gs.Graph) -> int:
        """``(x (op) c1) (op) c2`` with both ops multiplicative (Mul, Div by a constant) or both
        additive (Add, Sub of a constant): one ``x * (c1*c2)`` or ``x + (c1+c2)``. Broadcasting is
        associative, so the output shape is unchanged; the merged constant may not be larger than
        the larger of the two. One rounding instead of two: equal to float round-off."""
        n = 0
        outs, ins = self._graph_outputs(), self._graph_inputs()
        for e1 in list(sub.nodes):
            if not e1.outputs:
                continue
            first = self._const_operand(e1)
            if first is None:
                continue
            x, c1, dt1, fam = first
            t = e1.outputs[0]
            if not (isinstance(t, gs.Variable) and id(t) not in outs and id(t) not in ins and len(t.outputs) == 1):
                continue
            e2 = t.outputs[0]
            if e2 not in sub.nodes or not e2.outputs:
                continue
            second = self._const_operand(e2)
            if second is None or second[0] is not t or second[3] != fam or second[2] != dt1:
                continue
            c2 = second[1]
            try:
                merged = c1 * c2 if fam == "Mul" else c1 + c2
            except ValueError:
                continue
            if merged.size > max(c1.size, c2.size) or not np.all(np.isfinite(merged)):
                continue
            y = e2.outputs[0]
            _detach(e2)
            e1.op = fam
            e1.inputs.clear()
            e1.inputs.extend([x, self._new_const((e1.name or "const") + "_merged", merged.astype(dt1))])
            e1.outputs[0] = y
            n += 1
        self.stats["constant_chains_folded"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    def _merge_duplicate_nodes(self, sub: gs.Graph) -> int:
        """Common subexpressions: a deterministic node with the same op, domain, attributes and
        input tensors as an earlier one computes the same values; its consumers read the earlier
        node's outputs. Nodes with subgraphs and graph-output producers are kept."""
        n = 0
        outs = self._graph_outputs()
        seen: dict[tuple, gs.Node] = {}
        with _quiet_gs(), contextlib.suppress(Exception):
            sub.toposort(recurse_subgraphs=False)
        for node in list(sub.nodes):
            if not node.outputs or node.op in _NO_FOLD or node.op == "Constant":
                continue
            key = self._node_key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if any(id(o) in outs for o in node.outputs) or len(first.outputs) != len(node.outputs):
                continue
            for mine, theirs in zip(list(node.outputs), list(first.outputs)):
                if not mine.is_empty():
                    if theirs.is_empty():
                        break
                    _replace_uses(mine, theirs)
            else:
                _detach(node)
                n += 1
        self.stats["duplicate_nodes_merged"] += n
        sub.nodes = [nd for nd in sub.nodes if nd.outputs]
        return n

    @staticmethod
    def _node_key(node: gs.Node):
        attrs = []
        for k in sorted(node.attrs):
            v = node.attrs[k]
            if isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(x, gs.Graph) for x in v)):
                return None
            if _const(v):
                vals = np.asarray(v.values)
                if vals.dtype == object:
                    return None
                v = ("tensor", vals.dtype.str, vals.shape, vals.tobytes())
            elif isinstance(v, list):
                v = tuple(v)
            elif not isinstance(v, (int, float, str, bytes, bool, tuple, type(None))):
                v = repr(v)
            attrs.append((k, v))
        ins = tuple(("", None) if t.is_empty() else id(t) for t in node.inputs)
        return node.op, node.domain or "", ins, tuple(attrs), len(node.outputs)

    # ----------------------------------------------------------------- initializers
    def _merge_initializers(self) -> int:
        seen: dict[tuple, gs.Constant] = {}
        outs = self._graph_outputs()
        n = 0
        for name, t in list(self.g.tensors().items()):
            if not _const(t) or id(t) in outs:
                continue
            try:
                v = t.values
            except Exception:
                continue
            if v.dtype == object:
                continue
            key = (v.dtype.str, v.shape, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest())
            first = seen.get(key)
            if first is None:
                seen[key] = t
                continue
            _replace_uses(t, first)
            n += 1
        return n

    # ----------------------------------------------------------------- outputs
    def _outputs_from_constants(self):
        """A graph output that became a constant is produced by a node again, so the output keeps
        its name and stays an output rather than an initializer: a Constant node (opset >= 13,
        where Constant takes every tensor type), else an Identity of an initializer."""
        for sub in all_graphs(self.g):
            for t in sub.outputs:
                if _const(t) and t.name not in self.protected:
                    vals = t.values
                    t.to_variable(dtype=vals.dtype, shape=list(vals.shape))
                    if self.opset >= 13:
                        node = gs.Node("Constant", name=self._fresh(t.name + "_const"),
                                       attrs={"value": gs.Constant(t.name + "_value", vals)}, outputs=[t])
                    else:
                        init = gs.Constant(self._fresh(t.name + "_value"), vals)
                        node = gs.Node("Identity", name=self._fresh(t.name + "_identity"), inputs=[init], outputs=[t])
                    sub.nodes.append(node)

    def _record_io(self):
        self.io_types = [(t, t.dtype, t.shape) for t in list(self.g.inputs) + list(self.g.outputs)]

    def _restore_io(self):
        """Graph inputs and outputs keep the types and shapes they were declared with."""
        for t, dtype, shape in self.io_types:
            if isinstance(t, gs.Variable):
                t.dtype, t.shape = dtype, shape
