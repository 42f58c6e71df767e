"""Parameters and MACs per node, and the statistics of a model (op histogram, I/O, parameters,
weight bytes, MACs) ``inspect`` and the report show.

MACs (multiply-accumulates) for one inference at the model's input shapes:
  Conv:          N * Cout * prod(out spatial) * (Cin / group) * prod(kernel)
  ConvTranspose: N * Cin * prod(in spatial) * (Cout / group) * prod(kernel)
  Gemm / MatMul: prod(batch dims of the output) * M * K * N
Other ops count no MACs. Parameters are elements of float initializers/Constant tensors
(integer shape constants do not count).
"""

from __future__ import annotations

__all__ = ["node_macs", "model_cost", "model_stats", "value_info_dict"]

import collections
import copy
import hashlib

import numpy as np
import onnx

from onnxshrink.graph.shapes import fix_input_shapes, infer_shapes, value_shapes, value_types
from onnxshrink.model import all_graphs, is_placeholder, tensor_bytes, weightless_copy


def _prod(xs):
    p = 1
    for x in xs:
        if x is None:
            return None
        p *= int(x)
    return p


def node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """MACs of one node from the value shapes; None when a needed shape is unknown."""
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        xi, wi, yo = (0, 1, 0) if op != "QLinearConv" else (0, 3, 0)
        w = shapes.get(node.input[wi])
        y = shapes.get(node.output[yo])
        if not w or not y or len(y) < 3:
            return None
        n = _prod([y[0]])
        k = _prod(w[1:])
        o = _prod(y[1:])
        return None if None in (n, k, o) else n * o * k
    if op == "ConvTranspose":
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[1])
        if not x or not w:
            return None
        p = _prod(x)
        k = _prod(w[1:])
        return None if None in (p, k) else p * k  # Cin*spatial_in * (Cout/group)*kernel
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        ai, bi = (0, 3) if op == "QLinearMatMul" else (0, 1)
        a = shapes.get(node.input[ai])
        b = shapes.get(node.input[bi])
        y = shapes.get(node.output[0])
        if not a or not b or not y:
            return None
        if op == "Gemm":
            trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        p = _prod(y)
        return None if None in (p, k) else p * int(k)
    if op == "Einsum":
        return _einsum_macs(node, shapes)
    if op in RECURRENT_GATES:  # T x batch x directions x gates x H x (input + H): the W and R products
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[1])
        if not x or not w or len(x) != 3 or len(w) != 3:
            return None
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        t, b = (x[0], x[1]) if layout == 0 else (x[1], x[0])
        # onnxruntime's DynamicQuantizeLSTM holds W transposed: [directions, input, 4 H]
        dirs, gates_h, inp = (w[0], w[2], w[1]) if op == "DynamicQuantizeLSTM" else w
        h = None if gates_h is None else gates_h // RECURRENT_GATES[op]
        return _prod([t, b, dirs, gates_h]) * (inp + h) if None not in (t, b, dirs, gates_h, inp) else None
    return 0


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}


def _einsum_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """MACs of an Einsum of ``n >= 2`` operands: one multiply-add per combination of its letters'
    values for each of the ``n - 1`` products (``bhid,bhjd->bhij``: b h i j d), an ellipsis' dimensions
    labelled by their distance from its right end (they broadcast from the right); 0 for one operand
    (a transpose or a sum); None when an operand's shape is unknown."""
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    terms = eq.split("->")[0].split(",")
    if len(terms) < 2:
        return 0
    sizes: dict = {}
    for term, name in zip(terms, node.input):
        shape = shapes.get(name)
        if shape is None or any(d is None for d in shape):
            return None
        before, dots, after = term.partition("...")
        n_ell = len(shape) - len(before) - len(after) if dots else 0
        labels = list(before) + [f".{n_ell - j}" for j in range(n_ell)] + list(after)
        if len(labels) != len(shape):
            return None
        for label, d in zip(labels, shape):
            sizes[label] = max(sizes.get(label, 1), int(d))
    return _prod(list(sizes.values())) * (len(terms) - 1)


def model_cost(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """{'params', 'macs', 'macs_known', 'per_node': {node name or index: macs}, 'integer_macs'} of the
    main graph. Computed on a weightless copy (``_strip_weights``: every count here reads dims, not
    values), so the same model structure at the same shapes is costed once per process
    (``_COST_MEMO``: a pass's result is costed for its record, by the quantize pass's share check
    and for the report)."""
    # shapes on a light copy (no weights): shape inference needs only dims, and serializes the model
    # twice (measured on a ViT-S: +57 MB peak with the weights)
    light = _strip_weights(model)
    key = (hashlib.blake2b(light.SerializeToString(), digest_size=16).digest(),
           tuple(sorted((k, tuple(v)) for k, v in (input_shapes or {}).items())))
    if key not in _COST_MEMO:
        if len(_COST_MEMO) >= COST_MEMO_SIZE:
            _COST_MEMO.pop(next(iter(_COST_MEMO)))
        _COST_MEMO[key] = _light_cost(light, input_shapes)
    return copy.deepcopy(_COST_MEMO[key])


_COST_MEMO: dict = {}
COST_MEMO_SIZE = 8  # models costed per process and kept (a pipeline costs its input and each pass's result)


def _light_cost(light: onnx.ModelProto, input_shapes: dict | None) -> dict:
    """``model_cost`` of the weightless copy ``light`` (modified in place)."""
    g = light.graph
    params = 0
    for t in g.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                           onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            params += _prod(t.dims) or (1 if not t.dims else 0)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in (
                        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                    params += _prod(a.t.dims) or 1
    if input_shapes:
        try:
            fix_input_shapes(light, {k: list(v) for k, v in input_shapes.items()})
        except Exception:
            pass
    light = infer_shapes(light)
    shapes = value_shapes(light)
    macs, known, per, int_macs = _macs(light, shapes)
    if not known and input_shapes:
        folded = _fold_shape_arithmetic(_weights_as_inputs(light), shapes)
        if folded is not None:
            again = _macs(folded, value_shapes(folded))
            if again[1]:
                macs, known, per, int_macs = again
    return {"params": int(params), "macs": int(macs) if macs or known else None, "macs_known": known, "per_node": per,
            "integer_macs": int(int_macs) if known else None}


def _weights_as_inputs(light: onnx.ModelProto) -> onnx.ModelProto:
    """``light`` (a weightless copy) with its data-less weights (``model.is_placeholder``, main graph:
    initializers and Constant nodes) turned into graph inputs of their type and dims: shape inference
    reads the same dims, and constant folding evaluates only what needs no weight's values (the
    shape arithmetic), never a weight's DequantizeLinear or Transpose."""
    g = light.graph
    moved, keep = [], []
    for t in g.initializer:
        if is_placeholder(t):
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    nodes = []
    for n in g.node:
        t = next((a.t for a in n.attribute if a.type == onnx.AttributeProto.TENSOR), None) \
            if n.op_type == "Constant" else None
        if t is not None and is_placeholder(t):
            moved.append(onnx.helper.make_tensor_value_info(n.output[0], t.data_type, list(t.dims)))
        else:
            nodes.append(n)
    if not moved:
        return light
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(nodes)
    g.input.extend(moved)
    return light


def _fold_shape_arithmetic(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto | None:
    """``model`` (its input dims fixed and its ``shapes`` inferred, ``value_shapes``; changed in
    place) with its shape arithmetic evaluated into constants and shapes inferred again; None when
    that fails. onnx's shape inference leaves a Reshape or Slice whose target is computed from a
    Shape unknown when the arithmetic goes through an op its data propagation lacks (Slice of a
    shape: Hugging Face's ``position_ids[:, :input_ids.size(1)]``, PaddlePaddle's Reshape to a shape
    read off the previous Reshape's output), and every shape after it is lost.

    A round (``_shape_constants``): each Shape (or Size) whose input's dims are all known is that
    constant, and the small standard-op subgraph computed from those and the model's constants
    (every output at most ``FOLDED_MAX_ELEMENTS`` elements, ``_small``) is run in onnxruntime once; its values
    read by the rest of the graph become initializers, those nodes go, and shapes are inferred
    again. A shape so made known makes the values after it known, whose own Shape ops fold on the
    next round: rounds repeat until the MACs are known or a round resolves no more shapes
    (PP-OCRv4 rec's SVTR blocks: 3 rounds, 40 ms in all, where folding the whole graph with
    onnx-graphsurgeon took 0.4 s). ``model`` is weightless (``_weights_as_inputs``): no weight's
    values are ever read."""
    try:
        m, unknown = model, _unknown_shapes(model, shapes)
        for _ in range(FOLD_ROUNDS):
            if not _shape_constants(m, shapes):
                break
            del m.graph.value_info[:]  # inferred afresh: the folded values now give their readers' shapes
            m = infer_shapes(m)
            shapes = value_shapes(m)
            now = _unknown_shapes(m, shapes)
            if _macs(m, shapes)[1] or now >= unknown:
                break
            unknown = now
        return m
    except Exception:
        return None


FOLD_ROUNDS = 8  # evaluate-and-infer rounds of _fold_shape_arithmetic (PP-OCRv4 rec: 3)
FOLDED_MAX_ELEMENTS = 4096  # shape arithmetic handles a few numbers; a bigger constant is not evaluated


def _shape_constants(model: onnx.ModelProto, shapes: dict) -> int:
    """One round of ``_fold_shape_arithmetic``: the values computed from Shape/Size ops of known dims
    (and constants) that other nodes read, evaluated in onnxruntime and made initializers, their
    nodes removed. Returns how many values were made constant."""
    import onnxruntime as ort  # noqa: PLC0415  (heavy: only where a shape is folded)

    from onnxshrink.runtime import make_session  # noqa: PLC0415
    g = model.graph
    elem = value_types(model)
    inits = {t.name: t for t in g.initializer}
    known = set(inits)  # values computable without the data: constants, then the computable nodes' outputs
    from_shape: set = set()  # the computable values that depend on a Shape/Size (worth folding)
    computable: list = []
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                  for a in n.attribute) or "Random" in n.op_type:
            continue
        if n.op_type in ("Shape", "Size"):
            dims = shapes.get(n.input[0])
            if dims is None or None in dims:
                continue
            from_shape.update(n.output)
        elif not all(x == "" or x in known for x in n.input) or not _small(n, shapes):
            continue
        elif any(x in from_shape for x in n.input):
            from_shape.update(n.output)
        computable.append(n)
        known.update(n.output)
    # what subgraphs (If/Loop/Scan bodies) read from the main graph is read outside too
    in_subgraphs = {x for sub in all_graphs(g) if sub is not g for n in sub.node for x in n.input}

    def read_except(ids: set) -> set:
        """The values read by the main graph's nodes but those of ``ids``, its outputs and subgraphs."""
        return {x for n in g.node if id(n) not in ids for x in n.input} | {o.name for o in g.output} | in_subgraphs
    read_outside = read_except({id(n) for n in computable})
    wanted = [o for n in computable for o in n.output if o in from_shape and o in read_outside]
    if not wanted:
        return 0
    # the nodes the wanted values need, and every value of theirs read by a node not among them
    producer = {o: n for n in computable for o in n.output}
    needed, stack = {}, list(wanted)
    while stack:
        n = producer.get(stack.pop())
        if n is not None and id(n) not in needed:
            needed[id(n)] = n
            stack.extend(x for x in n.input if x in producer)
    nodes = [n for n in computable if id(n) in needed]
    read_by_rest = read_except(set(needed))
    targets = [o for n in nodes for o in n.output if o in read_by_rest]
    if any(not elem.get(t) for t in targets):
        return 0  # a value without an inferred type cannot be an output of the evaluating graph
    sub_nodes = []
    for n in nodes:
        if n.op_type in ("Shape", "Size"):
            sub_nodes.append(onnx.helper.make_node("Constant", [], [n.output[0]], value=onnx.numpy_helper.from_array(
                _shape_value(n, shapes[n.input[0]]), n.output[0])))
        else:
            sub_nodes.append(n)
    used = {x for n in sub_nodes for x in n.input}
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(sub_nodes, "shape_arithmetic", [],
                               [onnx.helper.make_tensor_value_info(t, elem[t], None) for t in targets],
                               [inits[x] for x in used if x in inits]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing evaluation raises (the fold gives up); no error log on stderr
    values = make_session(sub, optimize=False).run(targets, {}, quiet)
    keep = [n for n in g.node if id(n) not in needed]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(onnx.numpy_helper.from_array(v, t) for t, v in zip(targets, values))
    return len(targets)


# ops whose output has no more elements than their inputs together (Gather: than the product of its
# data's and indices' sizes): evaluated even where inference left the output's shape open (a Slice
# whose end comes from a Shape)
SIZE_BOUNDED_OPS = {"Slice", "Gather", "Squeeze", "Unsqueeze", "Cast", "Identity", "Concat", "Reshape", "Flatten"}


def _small(node: onnx.NodeProto, shapes: dict) -> bool:
    """Whether ``node``'s outputs are known to hold at most ``FOLDED_MAX_ELEMENTS`` elements each: by
    their inferred shapes, or, for a ``SIZE_BOUNDED_OPS`` op, by its inputs' sizes."""
    def numel(name):
        dims = shapes.get(name)
        return None if dims is None else _prod(dims)
    if all((numel(o) is not None and numel(o) <= FOLDED_MAX_ELEMENTS) for o in node.output):
        return True
    sizes = [numel(x) for x in node.input if x]
    if node.op_type not in SIZE_BOUNDED_OPS or None in sizes:
        return False
    bound = _prod(sizes) if node.op_type == "Gather" else sum(sizes)
    return bound <= FOLDED_MAX_ELEMENTS


def _shape_value(node: onnx.NodeProto, dims: list):
    """The value of a Shape (its ``start``/``end`` attributes, opset 15) or Size node of an input of
    known ``dims``."""
    if node.op_type == "Size":
        return np.array(_prod(dims), np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    return np.array(dims[slice(attrs.get("start", 0), attrs.get("end", len(dims)))], np.int64)


def _unknown_shapes(model: onnx.ModelProto, shapes: dict) -> int:
    """How many node outputs of ``model`` have a dim (or the whole shape) unknown in ``shapes``
    (``value_shapes``)."""
    return sum(1 for n in model.graph.node for o in n.output if o and None in shapes.get(o, [None]))


def _macs(model: onnx.ModelProto, shapes: dict) -> tuple[int, bool, dict, int]:
    """(MACs, whether every node's MACs were known, {node: MACs}, MACs in integer kernels) from
    value shapes."""
    macs, known, int_macs = 0, True, 0
    per = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict = collections.defaultdict(list)
    for n in model.graph.node:
        for x in n.input:
            readers[x].append(n)
    for i, n in enumerate(model.graph.node):
        try:
            m = node_macs(n, shapes)
        except (IndexError, TypeError, ValueError):  # a malformed node (missing inputs): MACs unknown
            m = None
        if m is None:
            known = False
            continue
        if m:
            per[n.name or f"{n.op_type}_{i}"] = m
            if integer_kernel(n, producers, readers):
                int_macs += m
        macs += m
    return macs, known, per, int_macs


INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM"}


def integer_kernel(node: onnx.NodeProto, producers: dict, readers: dict) -> bool:
    """Whether onnxruntime's CPU EP computes ``node`` with an integer kernel: an integer op itself; a
    Conv whose input and weight come from DequantizeLinear and whose output goes only to a
    QuantizeLinear, directly or through a Relu/Clip (which onnxruntime removes before a Q whose range
    clips alike; its QDQ fusion makes it QLinearConv); a MatMul/Gemm whose two inputs come from
    DequantizeLinear (QLinearMatMul, QGemm, or MatMulIntegerToFloat without an output Q); MatMulNBits
    with ``accuracy_level`` 4 (int8 compute on the CPU)."""
    op = node.op_type
    if op in INTEGER_OPS:
        return True
    if op == "MatMulNBits":
        return any(a.name == "accuracy_level" and a.i == 4 for a in node.attribute)
    if op not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
        return False
    dq = all(getattr(producers.get(x), "op_type", None) == "DequantizeLinear" for x in node.input[:2])
    if op != "Conv" or not dq:
        return dq
    outs = readers.get(node.output[0], [])
    if len(outs) == 1 and outs[0].op_type in ("Relu", "Clip"):  # removed before a Q whose range clips alike
        outs = readers.get(outs[0].output[0], [])
    return len(outs) == 1 and outs[0].op_type == "QuantizeLinear"


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large float initializers hold no data (dims kept) so shape inference is cheap;
    built without ever copying the weights (see model.weightless_copy)."""
    return weightless_copy(model, threshold=256)


def model_stats(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Statistics of a model: opset, I/O, op histogram, node count, parameters, weight bytes, MACs."""
    g = model.graph
    init_names = {t.name for t in g.initializer}
    ops = collections.Counter()
    for sub in all_graphs(g):
        ops.update(n.op_type for n in sub.node)
    cost = model_cost(model, input_shapes)
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [value_info_dict(i) for i in g.input if i.name not in init_names],
        "outputs": [value_info_dict(o) for o in g.output],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "params": cost["params"],
        "weight_bytes": tensor_bytes(model),
        "macs": cost["macs"],
        "integer_macs": cost["integer_macs"],
    }


def value_info_dict(v: onnx.ValueInfoProto) -> dict:
    """Name, numpy dtype name and shape (dim values, parameters or '?') of a graph input/output."""
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
    except Exception:
        dtype = str(t.elem_type)
    return {"name": v.name, "dtype": dtype, "shape": shape}
