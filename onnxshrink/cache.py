"""On-disk cache of measurements (sensitivities, latencies) keyed by content hashes.

Keys hash what the measurement depends on: the model's bytes (graph and weights), the unit, the
strength, the data and the metric, so a second run with the same inputs reuses every
measurement and a changed input misses. Entries are small JSON files written atomically under
``$ONNXSHRINK_CACHE/measurements`` (default ``~/.cache/onnxshrink``).
"""

from __future__ import annotations

__all__ = ["MeasurementCache", "model_digest", "data_digest", "digest"]

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from onnxshrink.model import graph_without_initializers, raw_bytes


def digest(*parts: Any) -> str:
    """sha256 of a canonical JSON rendering of ``parts``."""
    h = hashlib.sha256()
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 over the graph structure, every weight's bytes (streamed tensor by tensor: no copy of the
    model at once, and it works past protobuf's 2 GB limit), the opsets and the model-local functions
    (when there are any): what the model computes, not its metadata."""
    h = hashlib.sha256()
    h.update(graph_without_initializers(model.graph).SerializeToString(deterministic=True))
    for t in model.graph.initializer:
        h.update(t.name.encode())
        h.update(str(t.data_type).encode())
        h.update(str(list(t.dims)).encode())
        h.update(raw_bytes(t))
    for o in model.opset_import:
        h.update(f"{o.domain}:{o.version}".encode())
    for f in model.functions:
        h.update(f.SerializeToString(deterministic=True))
    return h.hexdigest()


def data_digest(samples: Iterable[dict]) -> str:
    """sha256 over the samples' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            a = np.ascontiguousarray(s[k])
            h.update(f"{k}|{a.dtype}|{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def environment() -> str:
    """What else a measurement depends on: the versions of onnxshrink, onnxruntime and numpy, and
    the machine (processor, cores); part of every cache key, so an upgrade or another machine never
    reads a figure measured elsewhere."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"
    return "|".join([version("onnxshrink"), version("onnxruntime") if version("onnxruntime") != "?" else
                     version("onnxruntime-qnn"), np.__version__, platform.machine(), platform.processor(),
                     str(os.cpu_count())])


class MeasurementCache:
    """get(key) / put(key, value) of JSON-able values; ``enabled=False`` makes it a no-op. The file of
    a key also hashes ``environment()``."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        base = Path(root) if root else Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))
        self.root = base / "measurements"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.environment = environment()

    def _path(self, key: str) -> Path:
        full = hashlib.sha256(f"{key}|{self.environment}".encode()).hexdigest()
        return self.root / full[:2] / f"{full}.json"

    def get(self, key: str):
        if not self.enabled:
            self.misses += 1
            return None
        p = self._path(key)
        try:
            value = json.loads(p.read_text())["value"]
        except (OSError, ValueError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        if not self.enabled:
            return
        p = self._path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"value": value}, f, default=float)
            os.replace(tmp, p)
        except OSError:
            pass  # a cache that cannot be written only costs time
