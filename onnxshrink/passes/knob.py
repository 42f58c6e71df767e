"""Knobs: how a lossy pass exposes per-unit strengths to the cost-target allocation.

A pass that can compress its units one by one declares a ``Knob`` as its class attribute
``knob`` (None on passes without one); ``pipeline.sensitivity`` finds the knobs through the pass
registry. A knob lists the pass's compressible units of a model (``units``: (unit, size) pairs),
turns per-unit choices ``{unit: strength}`` into the pass's own options (``options``), so a unit is
always compressed by the pass itself, and lays those options over the user's (``merge``). This
module also holds what the knobs share: ``weighted_nodes`` (the nodes with a constant float weight)
and ``unit_of_node`` (the layer a node came from).

Proxy (optional, ``Knob.proxy``): what applying one unit at one strength does to the float weights,
without running the pass, from ``LayerStats`` captured once per layer (``pipeline/proxy.py``). A
layer's weight is seen as ``K x N`` (``y = x W_kn``: MatMul's own, Gemm's transposed with transB,
a Conv's ``Cout x (Cin kh kw)`` transposed). For a weight change ``D`` (K x N) the layer's output
error relative to its output power is

    e_w = tr(D^T C D) / (N E[y^2])          C = E[x x^T] over the K inputs (a Conv: E[x^2] I),

and uniform quantization of the input with step ``d`` (noise variance d^2 / 12 per element,
independent of x) adds ``e_a = d^2 / 12 |W|_F^2 / (N E[y^2])``.
"""

from __future__ import annotations

__all__ = ["Knob", "LAYER_OPS", "LayerStats", "unit_of_node", "weighted_nodes"]

import re
from dataclasses import dataclass
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
    the allocation finally tries raising the pass's remaining units to a stronger strength
    together (each of ``closure_strengths``), kept only when that measures faster;
    ``unit_strengths(model, unit)`` narrows ``strengths`` for one unit (default: all of them)."""

    pass_name = ""
    strengths: tuple = ()
    probe: dict = {}
    capped = True
    exclude_option: str | None = None
    closure = False
    closure_strengths: tuple = (1.0,)

    def units(self, model: onnx.ModelProto, shapes: dict | None) -> list[tuple[str, int]]:
        raise NotImplementedError

    def proxy(self, model: onnx.ModelProto, unit: str, strength: float, layers: dict, shared: dict) -> dict | None:
        """What ``unit`` at ``strength`` does, without running the pass (None: no proxy, measure it end
        to end): ``{"weights": {initializer: new value}, "saving": {params, weight_bytes, macs},
        "noise": {layer: e_w + e_a}}`` (the local output errors of the layers it changes, see the
        module docstring) or ``{"unchanged": reason}``; with ``"exact": True`` the new weights are
        measured end to end instead, with ``"anchor": s`` the loss is the one of strength s scaled by
        the ratio of local errors. ``layers``:
        {node name: LayerStats}; ``shared``: a dict the knob may memoize per-model work in."""
        return None

    def unit_strengths(self, model: onnx.ModelProto, unit: str) -> tuple:
        """The strengths ``unit`` is measured at."""
        return self.strengths

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


@dataclass
class LayerStats:
    """One weighted layer seen on the sensitivity samples (the module docstring's notation):
    ``kn`` its weight as K x N, ``cov`` E[x x^T] (K x K; None for a Conv), ``in_ms`` E[x^2],
    ``chan_ms`` E[x^2] per input channel (the channel axis of the input: last for MatMul/Gemm, 1 for
    a Conv), ``in_ranges`` (min, max) of the input per sample, ``out_ms`` E[y^2], ``out_range``
    (min, max) of the output over the samples, ``macs`` the layer's MACs; ``eval_cov`` E[x x^T] on
    other samples (those the loss is measured on): a change fitted to ``cov`` (svd's whitening) is
    judged on them, as the pass's result is."""

    node: onnx.NodeProto
    weight_name: str
    weight: np.ndarray
    cov: np.ndarray | None
    in_ms: float
    chan_ms: np.ndarray | None
    in_ranges: list
    out_ms: float
    out_range: tuple
    macs: float
    eval_cov: np.ndarray | None = None

    @property
    def kn(self) -> np.ndarray:
        """The weight as K x N."""
        return self.kn_of(self.weight)

    def from_kn(self, kn: np.ndarray) -> np.ndarray:
        """A K x N matrix back in the weight's own layout."""
        w = self.weight
        if self.node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in self.node.attribute):
            return np.ascontiguousarray(kn.T).astype(w.dtype)
        if self.node.op_type == "Conv":
            return np.ascontiguousarray(kn.T).reshape(w.shape).astype(w.dtype)
        return np.ascontiguousarray(kn).astype(w.dtype)

    def weight_noise(self, new_weight: np.ndarray) -> float:
        """e_w of replacing the weight by ``new_weight`` (its own layout)."""
        d = (self.kn_of(new_weight) - self.kn).astype(np.float64)
        cov = self.eval_cov if self.eval_cov is not None else self.cov
        power = float(np.sum((cov @ d) * d)) if cov is not None else self.in_ms * float(np.sum(d * d))
        return power / max(d.shape[1] * self.out_ms, 1e-30)

    def input_noise(self, step2: float) -> float:
        """e_a of quantizing the input with mean squared step ``step2``."""
        kn = self.kn.astype(np.float64)
        return step2 / 12.0 * float(np.sum(kn * kn)) / max(kn.shape[1] * self.out_ms, 1e-30)

    def kn_of(self, w: np.ndarray) -> np.ndarray:
        """Any weight of this layer's layout as K x N."""
        if self.node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in self.node.attribute):
            return w.T
        if self.node.op_type == "Conv":
            return w.reshape(w.shape[0], -1).T
        return w
