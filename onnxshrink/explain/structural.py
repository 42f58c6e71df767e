"""Structural units of a pruned or factorized CANDIDATE, and their output error alone.

- Pruned: the original's coupled channel groups (``graph.channels.analyze``, keyed by their first
  producing node, as ``prune.group_ratios`` keys them); a group counts as pruned when one of its
  producing Conv / Gemm / MatMul nodes has fewer output channels in the candidate, its ratio
  ``1 - sum kept / sum had`` over those producers (a Concat group's producers each hold part of its channels).
- Factorized: the original layers the candidate replaced by ``<name>_svd_1 -> <name>_svd_2``, with the
  rank (inner width) and the form read off the factor shapes (Conv: ``channel_out`` when the second
  factor is 1x1, ``channel_in`` when the first is, else ``spatial``; Gemm/MatMul: their only form).
- Alone: the measurement onnxshrink's sensitivity table makes (``pipeline.sensitivity.apply_pass``):
  onnxshrink's own prune (importance, consumers refit) of only that group at the candidate's ratio, or
  its svd of only that layer at the candidate's rank, applied to the ORIGINAL; its output NSR against
  the original's outputs. This re-creates the candidate's change with onnxshrink's method (another
  tool may have chosen other channels), so for a candidate from another tool the share is an estimate.
"""

from __future__ import annotations

__all__ = ["StructuralUnit", "structural_units", "measure_alone"]

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxshrink.explain.measure import output_nsr, run_outputs
from onnxshrink.graph.channels import analyze
from onnxshrink.graph.convert import model_to_graph
from onnxshrink.graph.values import constant_value
from onnxshrink.pipeline.sensitivity import SensitivityData, apply_pass

PRUNE_PROBE = {"latency": False}  # the pass defaults otherwise (an onnxshrink-pruned candidate used them)


@dataclass
class StructuralUnit:
    """A pruned channel group or a factorized layer."""

    kind: str  # "pruned" | "factorized"
    key: str  # group producer / layer name
    nodes: list
    ratio: float = 0.0  # pruned fraction
    channels: int = 0
    rank: int = 0
    full: int = 0
    form: str = ""
    alone_nsr: float | None = None
    reason: str = ""  # why alone was not measured

    def pass_options(self, ratio: float | None = None, rank: int | None = None) -> tuple[str, dict]:
        if self.kind == "pruned":
            return "prune", {"mode": "importance", "group_ratios": {self.key: self.ratio if ratio is None else ratio},
                             **PRUNE_PROBE}
        return "svd", {"ranks": {self.key: [self.form, self.rank if rank is None else rank]}, "min_params": 0}


def _form(op: str, w1, w2) -> str:
    if op != "Conv" or w1 is None or w2 is None:
        return ""
    if tuple(w2.shape[2:]) == (1, 1):
        return "channel_out"
    if tuple(w1.shape[2:]) == (1, 1):
        return "channel_in"
    return "spatial"


def structural_units(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[StructuralUnit]:
    """The pruned groups and factorized layers of ``candidate`` (module docstring)."""
    go = model_to_graph(original)
    gc = gs.import_onnx(candidate)
    cnodes = {n.name: n for n in gc.nodes if n.name}
    out: list[StructuralUnit] = []
    for n in go.nodes:
        s1, s2 = cnodes.get(f"{n.name}_svd_1"), cnodes.get(f"{n.name}_svd_2")
        if n.name in cnodes or s1 is None or s2 is None or len(n.inputs) < 2:
            continue
        w, w1, w2 = constant_value(n.inputs[1]), constant_value(s1.inputs[1]), constant_value(s2.inputs[1])
        if w is None or w1 is None:
            continue
        rank = int(w1.shape[0] if s1.op == "Conv" else w1.shape[-1])
        full = int(min(w.shape[0], w.size // w.shape[0])) if n.op == "Conv" else int(min(w.shape[-2:]))
        out.append(StructuralUnit("factorized", n.name, [n.name], rank=rank, full=full, form=_form(n.op, w1, w2)))

    onodes = {n.name: n for n in go.nodes}

    def out_channels(nodes, name):
        """Output channels of a Conv / Gemm / MatMul from its weight (int8 weights behind a DQ too)."""
        cn = nodes.get(name)
        if cn is None or cn.op not in ("Conv", "Gemm", "MatMul") or len(cn.inputs) < 2:
            return None
        v = constant_value(cn.inputs[1])
        if v is None and cn.inputs[1].inputs and cn.inputs[1].inputs[0].op == "DequantizeLinear":
            v = constant_value(cn.inputs[1].inputs[0].inputs[0])
        if v is None or v.ndim < 2:
            return None
        transposed = cn.op == "Conv" or (cn.op == "Gemm" and int(cn.attrs.get("transB", 0)))
        return int(v.shape[0] if transposed else v.shape[-1])

    try:
        groups = analyze(go).groups()
    except Exception:  # a graph the channel analysis cannot read: no pruned groups named
        groups = []
    for g in groups:
        if not g.producers or not g.channels:
            continue
        counts = [(out_channels(onodes, p), out_channels(cnodes, p)) for p in g.producers]
        counts = [(a, b) for a, b in counts if a is not None and b is not None]
        if counts and any(b < a for a, b in counts):
            ratio = round(1 - sum(b for _, b in counts) / sum(a for a, _ in counts), 4)
            out.append(StructuralUnit("pruned", g.producers[0], list(g.producers), ratio=ratio, channels=g.channels))
    return out


def measure_alone(original: onnx.ModelProto, units: list[StructuralUnit], feeds: list, reference: list,
                  progress=None) -> None:
    """Each unit's output NSR with only its change applied to the original (module docstring)."""
    data = SensitivityData(feeds, feeds, reference, None, None, None, None, 0)
    ctx = data.context(original)
    it = progress.track(units, "explain: structural units alone") if progress is not None else units
    for u in it:
        name, opts = u.pass_options()
        try:
            model, why = apply_pass(original, name, opts, ctx)
        except Exception as e:  # the pass refuses this unit (e.g. a rank it cannot emit): say so, go on
            u.reason = f"{name} failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
            continue
        if why:
            u.reason = why
            continue
        u.alone_nsr = output_nsr(reference, run_outputs(model, feeds))
