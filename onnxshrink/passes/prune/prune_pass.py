"""prune: structured channel pruning that physically removes channels from the graph.

Channels are removed by *unit* (see ``onnxshrink.graph.channels``): every weight axis, per-channel
parameter, shape constant (Reshape shape, Split sizes, Slice bounds, Resize sizes), depthwise
``group`` attribute and per-channel Q/DQ scale that holds a unit's channel loses that position
(``remove``).

Lossless (``mode=zeros``): a unit is removed when, at every contracting consumer (Conv, Gemm,
MatMul, ConvTranspose) reading it, its value is a known constant c: exact when c = 0; for c != 0
the consumer's bias absorbs it (exact for Gemm/MatMul and for convs without padding).

Lossy (``mode=importance``): units of each prunable group are ranked by an importance score and
the lowest ``ratio`` of them removed, or per-group ratios are picked by measured sensitivity to
reach ``target_macs`` / ``target_latency`` (``select``). Removed channels' calibration mean is
folded into the consumer bias, then each consumer whose input lost channels is refit by ridge
least squares on calibration data (``refit``).

Grouped convs (ShuffleNet, ResNeXt) need equal removals per group: a removal set is made valid by
``graph.channels.balanced_selection`` (the largest balanced subset of the wanted units, lowest
importance first).
"""

from __future__ import annotations

__all__ = ["PruneOptions", "PrunePass", "parse_group_ratios"]

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import UsageError
from onnxshrink.graph.channels import ChannelAnalysis, analyze, group_kind
from onnxshrink.graph.cost import model_cost
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.options import keyed_items
from onnxshrink.passes.prune.knob import PruneKnob
from onnxshrink.passes.prune.refit import compensate_with_means, refit_consumers
from onnxshrink.passes.prune.remove import feasible, lossless_units, remove_units
from onnxshrink.passes.prune.select import choose_for_target, choose_units, latency_probe, sink_statistics, unit_scores
from onnxshrink.passes.registry import register


@dataclass
class PruneOptions:
    mode: Literal["zeros", "importance"] = field(default="zeros", metadata={
        "help": "zeros: remove only channels that are provably zero/constant (lossless); "
                "importance: also remove the least important channels (lossy)"})
    ratio: float = field(default=0.3, metadata={
        "help": "fraction of each prunable group's channels to remove (importance mode)"})
    importance: Literal["l1", "l2", "bn", "activation"] = field(default="activation", metadata={
        "help": "channel importance: filter L1/L2 norm, BN scale, or activation energy x weight norm on "
                "calibration data"})
    scope: Literal["layer", "global"] = field(default="layer", metadata={
        "help": "layer: remove `ratio` of every group; global: lowest `ratio` of all channels by normalised score"})
    target_macs: float = field(default=0.0, metadata={
        "help": "importance mode: instead of pruning every group, prune (at `ratio`, then 2x `ratio`) the groups "
                "with the lowest measured output error per MAC saved until MACs <= this fraction of the input's "
                "(0: off)"})
    target_latency: float = field(default=0.0, metadata={
        "help": "importance mode: like target_macs, but prune along the same sensitivity order until the measured "
                "onnxruntime CPU latency (1 thread) is <= this fraction of the input's (0: off)"})
    multiple_of: int = field(default=8, metadata={
        "help": "round kept channel counts up to a multiple of this (SIMD-friendly)"})
    min_keep: float = field(default=0.1, metadata={"help": "global scope: keep at least this fraction of each group"})
    compensate: bool = field(default=True, metadata={
        "help": "fold removed channels' calibration mean into the consumer bias"})
    refit: bool = field(default=True, metadata={
        "help": "refit consumers of pruned channels by least squares on calibration data"})
    refit_stages: int = field(default=0, metadata={
        "help": "0: refit level by level (each layer sees its refit predecessors); "
                "N: merge levels into at most N stages (faster, less exact)"})
    samples: int = field(default=16, metadata={"help": "calibration samples used for statistics and refit"})
    positions: int = field(default=256, metadata={"help": "output positions sampled per sample for conv refit"})
    ridge: float = field(default=0.1, metadata={
        "help": "smallest ridge strength tried (x1, x10, x100; picked on held-out samples), relative to the mean "
                "diagonal of X^T X; the ridge pulls towards the unrefit weights"})
    refit_max_dim: int = field(default=2304, metadata={"help": "skip the refit of consumers with more input features"})
    fold_constants: bool = field(default=True, metadata={
        "help": "fold constant channels into the consumer bias when exact"})
    latency: bool = field(default=True, metadata={
        "help": "measure onnxruntime CPU latency (1 thread) before and after"})
    group_ratios: dict[str, float] = field(default_factory=dict, metadata={
        "help": "importance mode: prune only these groups, each at its own ratio: a mapping {PRODUCER: RATIO} "
                "or PRODUCER=RATIO items (PRODUCER: the group's first producing node; the cost-target allocation "
                "sets them through prune's knob)"})

    def __post_init__(self):
        self.group_ratios = parse_group_ratios(self.group_ratios)


@register
class PrunePass(Pass):
    name = "prune"
    summary = ("structured channel pruning: removes zero/constant channels exactly, or low-importance ones with a "
               "least-squares refit")
    lossless = True
    needs_data = False
    min_opset = 1
    Options = PruneOptions
    knob = PruneKnob()

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self.lossless = self.options.mode == "zeros"
        self.needs_data = self.options.mode == "importance"

    def weaker(self):
        if self.options.mode != "importance" or self.options.ratio * 0.6 < 0.04:
            return None
        return PrunePass(dataclasses.replace(self.options, ratio=round(self.options.ratio * 0.6, 4)))

    def describe_strength(self) -> str:
        return f"ratio={self.options.ratio:g}" if self.options.mode == "importance" else ""

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        o = self.options
        t0 = time.perf_counter()
        samples = _calibration_samples(ctx, o.samples)
        input_shapes = _dynamic_input_shapes(graph, samples)
        before = ctx.to_model(graph) if (o.mode == "importance" or o.latency) else None
        a = analyze(graph, input_shapes)
        groups = a.groups()
        free, fill = lossless_units(a, fold=o.fold_constants)
        stats: dict = {"groups": len(groups), "prunable_groups": sum(g.prunable for g in groups),
                       "units": sum(g.units for g in groups),
                       "unprunable": [{"producers": g.producers[:4], "channels": g.channels, "reason": g.reason}
                                      for g in groups if not g.prunable],
                       "zero_units": len(free)}
        removed, priority = set(free), None
        if o.mode == "importance":
            chosen, scores = self._importance_units(a, groups, free, fill, ctx, before, samples, input_shapes, stats)
            removed |= chosen
            priority = {**scores, **{u: -np.inf for u in free}}   # lossless units go last when shrinking
        removed = feasible(a, removed, priority)
        if not removed:
            return PassResult(graph, False, stats,
                              reason="no removable channels" if o.mode == "zeros" else "nothing to prune")
        info = remove_units(a, graph, removed, fill)
        stats["removed_units"] = len(removed)
        stats["removed_channels"] = int(info["removed_channels"])
        stats["per_group"] = _per_group(a, groups, removed)
        if o.mode == "importance" and o.refit and samples:
            stats["refit"] = refit_consumers(graph, ctx, before, samples, info, max_dim=o.refit_max_dim,
                                             stages=o.refit_stages, positions=o.positions, ridge=o.ridge)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        _cost_stats(stats, before or None, ctx.to_model(graph), input_shapes, samples, o.latency)
        return PassResult(graph, True, stats, note=transformer_note(stats["per_group"]))

    def _importance_units(self, a: ChannelAnalysis, groups: list, free: set, fill: dict, ctx: Context, model,
                          samples: list, input_shapes, stats: dict) -> tuple[set, dict]:
        """The units to remove by importance and the unit scores; records a target search in
        ``stats`` and, with ``compensate``, sets ``fill`` to the channels' calibration means."""
        o = self.options
        blocked = a.blocked_units()
        chan_stats = sink_statistics(a, ctx, model, samples) if samples else {}
        scores = unit_scores(a, o.importance, chan_stats)
        if samples and (o.target_latency > 0 or o.target_macs > 0):
            measure = latency_probe(ctx, model, a.n, input_shapes, samples[0], free) if o.target_latency > 0 else None
            chosen, info = choose_for_target(a, groups, scores, free, blocked, model, samples, input_shapes,
                                             ratio=o.ratio, multiple_of=o.multiple_of, target_macs=o.target_macs,
                                             target_latency=o.target_latency, measure=measure)
            stats["target_latency" if measure is not None else "target_macs"] = info
        else:
            chosen = choose_units(a, groups, scores, free, blocked, ratio=o.ratio, scope=o.scope,
                                  multiple_of=o.multiple_of, min_keep=o.min_keep, group_ratios=o.group_ratios)
        if o.compensate and chan_stats:
            compensate_with_means(a, chan_stats, fill)
        return chosen, scores


def parse_group_ratios(value) -> dict[str, float]:
    """``group_ratios`` as {producer: ratio}, from a mapping, a list of PRODUCER=RATIO items or one
    comma-separated string of them (CLI, recipes); the split is at the last ``=``, a later item of
    the same producer wins. UsageError for an item without ``=`` or a ratio that is no number."""
    out = {}
    for producer, ratio in keyed_items(value, "prune.group_ratios", "PRODUCER=RATIO"):
        try:
            out[str(producer)] = float(ratio)
        except (TypeError, ValueError):
            raise UsageError(f"option prune.group_ratios: ratio of {producer!r} is no number (got {ratio!r})") from None
    return out


def _calibration_samples(ctx: Context, n: int) -> list:
    """The first ``n`` calibration samples of the context (none without calibration data)."""
    src = getattr(ctx, "calib", None)
    if src is None:
        return []
    out = []
    try:
        for i in range(min(n, len(src))):
            out.append(src.get(i))
    except TypeError:
        for i, s in enumerate(src):
            if i >= n:
                break
            out.append(s)
    return out


def _dynamic_input_shapes(graph: gs.Graph, samples: list) -> dict | None:
    """The first sample's shapes of the graph inputs whose dims are not all static (None: none)."""
    if not samples:
        return None
    dyn = {}
    for t in graph.inputs:
        if t.name in samples[0] and (t.shape is None or any(not isinstance(d, int) for d in t.shape)):
            dyn[t.name] = list(samples[0][t.name].shape)
    return dyn or None


def _per_group(a: ChannelAnalysis, groups: list, removed: set) -> list:
    """Per group that lost units: its producers, size and removed units (for the report), and what
    the units are (``graph.channels.group_kind``): ``heads`` (with the removed head indices per
    attention product), ``neurons`` (features of MatMul/Gemm layers, e.g. an MLP's hidden width)
    or ``channels``."""
    out = []
    for g in groups:
        r = sum(1 for u in g.unit_labels if u in removed)
        if not r:
            continue
        rec = {"producers": g.producers[:3], "units": g.units, "channels": g.channels, "removed_units": r}
        rec["kind"], heads = group_kind(a, g)
        if heads:
            rec["removed_heads"] = {name: [h for h, u in enumerate(us) if u in removed] for name, us in heads.items()}
        out.append(rec)
    return out


def transformer_note(per_group: list) -> str:
    """The removed attention heads (per attention product, by head index) and MLP neurons (per layer,
    how many of how many) of ``_per_group``'s records, as one line; "" when none."""
    parts = []
    for g in per_group:
        if g.get("kind") == "heads":
            for name, hs in g["removed_heads"].items():
                parts.append(f"{name}: heads {hs} of {g['units']} removed")
        elif g.get("kind") == "neurons":
            parts.append(f"{g['producers'][0]}: {g['removed_units']} of {g['units']} neurons removed")
    return "; ".join(parts)


def _cost_stats(stats: dict, before, after, input_shapes, samples, latency: bool) -> None:
    """Parameters and MACs after (and before) pruning, and with ``latency`` the onnxruntime CPU
    latency of both (median of 10 runs), into ``stats``."""
    shapes = input_shapes or ({k: list(v.shape) for k, v in samples[0].items()} if samples else None)
    try:
        ca = model_cost(after, shapes)
        stats["params_after"], stats["macs_after"] = ca["params"], ca["macs"]
        if before is not None:
            cb = model_cost(before, shapes)
            stats["params_before"], stats["macs_before"] = cb["params"], cb["macs"]
    except Exception as e:  # costs are informative; never fail the pass on them
        stats["cost_error"] = str(e)[:200]
    if latency and before is not None and samples:
        from onnxshrink.runtime import measure_latency
        try:
            stats["latency_ms_before"] = round(measure_latency(before, samples[0], runs=10, warmup=2), 3)
            stats["latency_ms_after"] = round(measure_latency(after, samples[0], runs=10, warmup=2), 3)
        except Exception as e:
            stats["latency_error"] = str(e)[:200]
