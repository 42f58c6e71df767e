"""Model I/O: load with external data, atomic save (external data past the protobuf limit),
and model statistics (op histogram, parameters, weight bytes, MACs)."""

from __future__ import annotations

__all__ = ["load", "save", "model_stats", "tensor_bytes", "PROTOBUF_LIMIT", "check_model", "copy_model_fields",
           "check_output_path", "external_data_files"]

import collections
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import InputError, UsageError

# protobuf refuses to serialize a message of 2 GiB or more; leave head room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_THRESHOLD = int(1.8 * 2**30)


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data. Never writes to the file.

    Raises InputError (one line) for a missing, unreadable, truncated or non-ONNX file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if p.is_dir():
        raise InputError(f"model path is a directory, not a file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"model file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, truncated files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: not a readable ONNX model ({msg})") from None
    missing = [f for f in _external_locations(model, p.parent) if not f.is_file()]
    if missing:
        raise InputError(f"{p}: external data file missing: {missing[0]}")
    if _external_locations(model, p.parent):
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # short or corrupt data file, a location outside the model's folder
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{p}: cannot read external data ({msg[:200]})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers and Constant nodes (the weights), subgraphs included."""
    total = 0
    for g in _all_graphs(model.graph):
        for t in g.initializer:
            total += _tensor_nbytes(t)
        for t in g.sparse_initializer:
            total += _tensor_nbytes(t.values) + _tensor_nbytes(t.indices)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        total += _tensor_nbytes(a.t)
    return total


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        for kv in t.external_data:
            if kv.key == "length":
                return int(kv.value)
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        itemsize = 4
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_graphs(g)


def check_model(model: onnx.ModelProto, full_check: bool = True) -> None:
    """Run the ONNX checker (and strict shape inference with full_check); works past 2 GB."""
    if _weights_size(model) < _EXTERNAL_THRESHOLD:
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, path, save_as_external_data=True, location="m.onnx.data")
        onnx.checker.check_model(path, full_check=full_check)


def _weights_size(model: onnx.ModelProto) -> int:
    return tensor_bytes(model)


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
         input_path: str | os.PathLike | None = None) -> Path:
    """Write the model atomically: into a temporary folder beside the target, then rename.

    external_data=None stores weights externally (``<name>.data``) only when the model would
    pass protobuf's 2 GB limit. Refuses to overwrite ``input_path``. The in-memory model is left
    with its weights inline.
    """
    out = Path(path)
    check_output_path(out, input_path)
    parent = out.parent if str(out.parent) else Path(".")
    if external_data is None:
        external_data = _weights_size(model) >= _EXTERNAL_THRESHOLD
    tmpdir = None
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
        tmp_model = Path(tmpdir) / out.name
        if external_data:
            location = out.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=1024)
            # bring the weights back inline so the caller's model stays usable
            external_data_helper.load_external_data_for_model(model, tmpdir)
            os.replace(Path(tmpdir) / location, parent / location)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _external_locations(model: onnx.ModelProto, base: Path) -> list[Path]:
    """Files named by the external-data tensors (initializers and attribute tensors, subgraphs
    included) of a model loaded without its external data."""
    files = set()
    for g in _all_graphs(model.graph):
        tensors = list(g.initializer)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append(a.t)
                elif a.type == onnx.AttributeProto.TENSORS:
                    tensors.extend(a.tensors)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for kv in t.external_data:
                    if kv.key == "location":
                        files.add(base / kv.value)
    return sorted(files)


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (read from the proto without loading the
    data); [] when it has none or cannot be read."""
    p = Path(path)
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:
        return []
    return _external_locations(m, p.parent)


def check_output_path(out: str | os.PathLike, input_path: str | os.PathLike | None = None) -> None:
    """Fail early (UsageError, one line) when ``out`` cannot be written or would overwrite the
    input model or one of its external data files (``out`` itself, or ``out.data`` written next to
    it for large models). Called before any work is done and again by ``save``."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if input_path is not None:
        inp = Path(input_path)
        if _same_file(out, inp):
            raise UsageError(f"output path is the input file ({out}); refusing to overwrite the input")
        for f in external_data_files(inp) if inp.exists() else []:
            for candidate in (out, out.with_name(out.name + ".data")):
                if _same_file(candidate, f):
                    raise UsageError(f"writing {out} would overwrite the input's external data file {f}; "
                                     "choose another output name")
    if not parent.exists():
        raise UsageError(f"cannot write {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: {parent} is not a folder")
    if out.is_dir():
        raise UsageError(f"cannot write {out}: it is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: folder {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"cannot write {out}: the file exists and is read-only")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    """Carry model-level fields (metadata, producer, doc, custom opset domains, functions)
    from src to dst; onnx-graphsurgeon does not keep all of them."""
    dst.ir_version = max(dst.ir_version, src.ir_version) if dst.ir_version else src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    have = {o.domain for o in dst.opset_import}
    for o in src.opset_import:
        if o.domain not in have:
            dst.opset_import.append(o)
    if not dst.functions and src.functions:
        dst.functions.extend(src.functions)
    return dst


def model_stats(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Statistics of a model: opset, I/O, op histogram, node count, parameters, weight bytes, MACs."""
    from .graph.cost import model_cost  # local: cost needs shape inference, heavier

    g = model.graph
    init_names = {t.name for t in g.initializer}
    ops = collections.Counter()
    for sub in _all_graphs(g):
        ops.update(n.op_type for n in sub.node)
    cost = model_cost(model, input_shapes)
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_vi(i) for i in g.input if i.name not in init_names],
        "outputs": [_vi(o) for o in g.output],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "params": cost["params"],
        "weight_bytes": tensor_bytes(model),
        "macs": cost["macs"],
    }


def _vi(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
    except Exception:
        dtype = str(t.elem_type)
    return {"name": v.name, "dtype": dtype, "shape": shape}
