"""Conversion between onnx.ModelProto and the onnx-graphsurgeon Graph passes work on."""

from __future__ import annotations

__all__ = ["model_to_graph", "graph_to_model", "graph_to_skeleton", "write_graph", "fill_placeholders", "values_bytes"]

from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.model import all_graphs, bare_tensor, copy_model_fields, is_placeholder, raw_bytes, write_external

# onnx-graphsurgeon's warnings (missing opset info, colour module) are noise on a user's terminal;
# our own validation reports what matters
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def model_to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


# A tensor of 2 GiB or more cannot be copied from one protobuf message into another: python
# protobuf (upb) copies a message across arenas by serializing it, and protobuf refuses to
# serialize 2 GiB. onnx-graphsurgeon's export copies every initializer into the new graph, so big
# tensors are exported as data-less placeholders and their bytes set on the new model afterwards.
# Done from 64 MiB on: it also halves the transient memory of the copy (bytes once, not
# serialized-then-parsed; measured on a 1 GiB model: export peak +1.5 GiB instead of +2 GiB).
HUGE_TENSOR_BYTES = 64 * 2**20


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph``; with a template, keep its metadata, producer, doc string, custom opset
    domains and functions, and never lower its IR version. Works with tensors past 2 GiB."""
    model, held = _export_holding_huge(graph)
    if held:
        _fill_huge_constants(model, held)
    _finish(model, template)
    return model


def write_graph(graph: gs.Graph, path, template: onnx.ModelProto | None = None,
                weights_of: Collection[str] | None = None) -> Path:
    """Write ``graph_to_model(graph, template)`` to ``path`` with its weights in an external file beside
    it (``model.write_external``), the constants of ``HUGE_TENSOR_BYTES`` or more streamed from their
    values into that file: the export is never whole in memory (a 2 GiB model: one copy of it less).

    With ``weights_of`` (constant names), a skeleton for a tool that reads only those weights: the
    other constants of ``SKELETON_MIN_BYTES`` or more (INT64 shape data excepted) are written as
    data-less placeholders (name, type, dims), which ``fill_placeholders`` gives their bytes back in
    the tool's output (onnxruntime's ``quantize_dynamic`` reads MatMul weights: a 2 GiB embedding
    table, which it cannot serialize, stays out of it)."""
    skipped = [] if weights_of is None else _hold_huge_constants(graph, SKELETON_MIN_BYTES, keep_int64=True,
                                                                keep=set(weights_of))
    try:
        model, held = _export_holding_huge(graph, keep={const.name for const, _ in skipped})
    finally:
        for const, values in skipped:
            const._values = values
    _finish(model, template)
    values = {const.name: v for const, v in held}
    # every huge constant is past the threshold, so each one is written with its values (a placeholder as it is)
    return write_external(model, path, threshold=min(1024, HUGE_TENSOR_BYTES - 1),
                          data_of=lambda t: values_bytes(values[t.name]) if t.name in values else None)


def fill_placeholders(graph: gs.Graph, source: gs.Graph) -> None:
    """Give every data-less placeholder constant of ``graph`` (``model.is_placeholder``: a tool's output
    of a skeleton ``write_graph`` wrote) the values of ``source``'s constant of the same name, shared,
    not copied. A placeholder ``source`` has no constant for stays as it is."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    consts = {t.name: t for t in source.tensors().values() if isinstance(t, gs.Constant)}
    for t in graph.tensors().values():
        if (isinstance(t, gs.Constant) and t.name in consts and isinstance(t._values, LazyValues)
                and is_placeholder(t._values.tensor)):
            t._values = consts[t.name]._values


def _export_holding_huge(graph: gs.Graph, min_bytes: int | None = None, keep_int64: bool = False,
                         keep: Collection[str] = ()) -> tuple[onnx.ModelProto, list]:
    """onnx-graphsurgeon's export of ``graph`` with its huge constants as data-less placeholders
    (``_hold_huge_constants``), and [(constant, values)] of those; ``graph`` is left as it was."""
    held = _hold_huge_constants(graph, min_bytes, keep_int64, keep)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for const, values in held:
            const._values = values
    return model, held


def _finish(model: onnx.ModelProto, template: onnx.ModelProto | None) -> None:
    """What an export keeps of ``template`` and what the ONNX IR requires (``graph_to_model``)."""
    if template is not None:
        copy_model_fields(template, model)
        _restore_initializer_inputs(model, template)
        _restore_io_types(model, template)
    _hoist_shared_subgraph_initializers(model)
    if model.ir_version and model.ir_version < 4:
        _list_initializers_as_inputs(model)


# a skeleton keeps the data of constants under this size (shape data, scalars, small tables)
SKELETON_MIN_BYTES = 16 * 2**10


def graph_to_skeleton(graph: gs.Graph, min_bytes: int = SKELETON_MIN_BYTES) -> onnx.ModelProto:
    """Export ``graph`` with every constant of ``min_bytes`` or more, INT64 ones excepted, as a
    data-less placeholder (name, type, dims): what shape inference reads, without a copy of the
    weights (a 2 GiB model is exported in a few MB). ``graph`` is left as it was."""
    return _export_holding_huge(graph, min_bytes, keep_int64=True)[0]


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _subgraphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield sg
                    yield from _subgraphs(sg)


def _hoist_shared_subgraph_initializers(model: onnx.ModelProto) -> None:
    """onnx-graphsurgeon writes an outer-scope constant that only subgraphs read into *each*
    subgraph that reads it (an If's two branches, every Loop body): one initializer per name goes
    back to the main graph, where every subgraph sees it, when the copies are identical."""
    g = model.graph
    subs = list(_subgraphs(g))
    if len(subs) < 2:
        return
    copies: dict[str, list] = {}
    for sg in subs:
        for t in sg.initializer:
            copies.setdefault(t.name, []).append((sg, t))
    main_names = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    for name, found in copies.items():
        if len(found) < 2 or name in main_names:
            continue
        first = found[0][1].SerializeToString()
        if any(t.SerializeToString() != first for _, t in found[1:]):
            continue
        kept = onnx.TensorProto()
        kept.CopyFrom(found[0][1])
        for sg, t in found:
            sg.initializer.remove(t)
        g.initializer.append(kept)


def _restore_initializer_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """onnx-graphsurgeon drops graph inputs that are also initializers (weights listed as inputs,
    as IR < 4 requires, or overridable defaults). Put those still present back at their place."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    have = {i.name for i in g.input}
    if (template.ir_version or 0) >= 4:
        # overridable defaults are part of the interface: one no node reads any more keeps its
        # input and its default value
        tpl_inits = {t.name: t for t in template.graph.initializer}
        for i in template.graph.input:
            if i.name in tpl_inits and i.name not in inits and i.name not in have:
                g.initializer.append(tpl_inits[i.name])
                inits.add(i.name)
    missing = {i.name for i in template.graph.input if i.name in inits and i.name not in have}
    if not missing:
        return
    current = {i.name: i for i in g.input}
    ordered = []
    for i in template.graph.input:
        if i.name in current:
            ordered.append(current.pop(i.name))
        elif i.name in missing:
            ordered.append(i)
    ordered.extend(current.values())  # inputs the template did not have (none for a cleanup)
    new = [onnx.ValueInfoProto() for _ in ordered]
    for n, o in zip(new, ordered):
        n.CopyFrom(o)
    del g.input[:]
    g.input.extend(new)


def _restore_io_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """onnx-graphsurgeon keeps only tensor types: give graph inputs/outputs of the template that
    are sequences, optionals or maps (same name) their original type back."""
    types = {v.name: v.type for v in list(template.graph.input) + list(template.graph.output)
             if v.type.WhichOneof("value") not in (None, "tensor_type")}
    if not types:
        return
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in types:
            v.type.CopyFrom(types[v.name])


def _list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too."""
    g = model.graph
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in have:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _hold_huge_constants(graph: gs.Graph, min_bytes: int | None = None, keep_int64: bool = False,
                         keep: Collection[str] = ()) -> list:
    """Swap the values of constants of ``min_bytes`` (default HUGE_TENSOR_BYTES) or more (INT64 ones
    kept with ``keep_int64``, those named in ``keep`` always) for data-less placeholders; returns
    [(constant, original values)]."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    min_bytes = HUGE_TENSOR_BYTES if min_bytes is None else min_bytes
    held = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or t.name in keep:
            continue
        v = t._values
        nbytes = v.nbytes if isinstance(v, (LazyValues, np.ndarray)) else 0
        if nbytes < min_bytes or (keep_int64 and np.dtype(v.dtype) == np.int64):
            continue
        if isinstance(v, LazyValues):
            bare = bare_tensor(v.tensor)
        else:
            bare = onnx.TensorProto(name=t.name, dims=list(v.shape),
                                    data_type=onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
        held.append((t, v))
        t._values = LazyValues(bare)
    return held


def _fill_huge_constants(model: onnx.ModelProto, held: list) -> None:
    """Set the bytes of the placeholders ``_hold_huge_constants`` left, in every graph of ``model``."""
    values = {t.name: v for t, v in held}
    for g in all_graphs(model.graph):
        for init in g.initializer:
            v = values.get(init.name)
            if v is not None and not init.HasField("raw_data"):
                data = values_bytes(v)
                init.raw_data = data if isinstance(data, bytes) else data.tobytes()


def values_bytes(v) -> bytes | memoryview:
    """The little-endian bytes of a constant's values (gs ``LazyValues`` or numpy), without a copy where
    the values are a little-endian contiguous array already."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(v, LazyValues):
        return raw_bytes(v.tensor)
    a = np.ascontiguousarray(v)
    return memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False)).cast("B")
