"""Knobs: how a lossy pass exposes per-unit strengths to the cost-target allocation.

A pass that can compress its units one by one declares a ``Knob`` as its class attribute
``knob`` (None on passes without one); ``pipeline.sensitivity`` finds the knobs through the pass
registry. A knob lists the pass's compressible units of a model (``units``: (unit, size) pairs),
turns per-unit choices ``{unit: strength}`` into the pass's own options (``options``), so a unit is
always compressed by the pass itself, and lays those options over the user's (``merge``). This
module also holds what the knobs share: ``weighted_nodes`` (the nodes with a constant float weight)
and ``unit_of_node`` (the layer a node came from).
"""

from __future__ import annotations

__all__ = ["Knob", "LAYER_OPS", "unit_of_node", "weighted_nodes"]

import re
from typing import Iterator

import numpy as np
import onnx

# the ops whose constant weight (input 1) makes a layer
LAYER_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class Knob:
    """How one pass exposes per-unit strengths: ``units(model, shapes)`` lists (unit, size) pairs;
    ``options(model, choices)`` gives the pass options applying exactly ``{unit: strength}``;
    ``merge(user, knob_options)`` lays them over the user's options of the pass; ``probe`` are the
    options the sensitivity measurement adds (fewer samples: a ranking, not the final result);
    ``capped`` says whether ``max_units`` limits its units to the largest ones; ``exclude_option``
    names the pass option whose units the user keeps out (never measured); ``closure`` says whether
    the allocation finally tries raising the pass's remaining units to full strength (strength 1),
    kept only when that measures faster."""

    pass_name = ""
    strengths: tuple = ()
    probe: dict = {}
    capped = True
    exclude_option: str | None = None
    closure = False

    def units(self, model: onnx.ModelProto, shapes: dict | None) -> list[tuple[str, int]]:
        raise NotImplementedError

    def options(self, model: onnx.ModelProto, choices: dict) -> dict:
        raise NotImplementedError

    def merge(self, user: dict, knob_options: dict) -> dict:
        """The user's options of the pass under the knob's per-unit ones."""
        return {**user, **knob_options}


def unit_of_node(name: str) -> str:
    """The layer a node came from: svd's factor pair ``L_svd_1``/``L_svd_2`` belongs to ``L``."""
    return re.sub(r"_svd_[12]$", "", name)


def weighted_nodes(model: onnx.ModelProto, min_params: int = 0,
                   ops: tuple = LAYER_OPS) -> Iterator[tuple[onnx.NodeProto, int]]:
    """(node, weight size) of the nodes of ``ops`` whose input 1 is a float initializer of at
    least ``min_params`` elements and whose input 0 is not an initializer, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ops:
            continue
        if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
            continue
        t = inits[n.input[1]]
        if t.data_type not in FLOAT_TYPES:
            continue
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        if size >= min_params:
            yield n, size
