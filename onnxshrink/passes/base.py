"""The pass contract: Pass, PassResult and Context (the registry is ``passes.registry``, option
parsing ``passes.options``).

A pass is a class with a ``name`` (its CLI/recipe name), an ``Options`` dataclass (typed,
documented options with defaults), flags (``lossless``, ``needs_data``, ``min_opset``) and
``run(graph, ctx) -> PassResult``; a lossy pass the cost-target allocation can drive unit by unit
also sets ``knob`` (``passes.knob.Knob``). Passes never read files or parse CLI options; all they
need comes through the Context. Modules in ``onnxshrink.passes`` register their passes with
``passes.registry.register`` and are discovered on first use of the registry.
"""

from __future__ import annotations

__all__ = ["Pass", "PassResult", "Context"]

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph.convert import graph_to_model
from onnxshrink.passes.knob import Knob
from onnxshrink.passes.options import NoOptions, build_options
from onnxshrink.progress import Progress
from onnxshrink.runtime import capture_activations, compare_candidates


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed anything, statistics for
    the report (counts, per-layer decisions with their reasons), and two texts the report shows in
    full: ``reason``, why the pass changed nothing, and ``note``, what a user should know about an
    applied result (e.g. "activations stay float: ...").

    ``model``: ``Context.to_model(graph)`` when the pass has that export already (the model it timed
    or measured): the manager validates it instead of exporting the graph again (a 2 GiB model: one
    copy and a few seconds less)."""

    graph: gs.Graph
    modified: bool
    stats: dict = field(default_factory=dict)
    reason: str = ""
    note: str = ""
    model: onnx.ModelProto | None = None


class Pass:
    """Base of all passes. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    min_opset: ClassVar[int] = 1
    Options: ClassVar[type] = NoOptions
    knob: ClassVar[Knob | None] = None  # per-unit strengths for the allocation (passes.knob)

    def __init__(self, options: Any = None, **kwargs):
        if options is None:
            options = build_options(self.Options, kwargs, self.name)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    def run(self, graph: gs.Graph, ctx: "Context") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def weaker(self) -> "Pass | None":
        """A weaker variant of this pass (lower ratio, higher rank, fewer quantized layers) for the
        manager to try when this one breaks the budget; None when there is none."""
        return None

    def describe_strength(self) -> str:
        """A short text of the strength options, for the report."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


@dataclass
class Context:
    """What a pass may use besides the graph.

    calib: calibration samples (streamed), or None.
    val: validation samples the manager measures fidelity on (held out when there are enough).
    reference: the original model's outputs on ``val`` (list over samples of lists over outputs).
    evaluate(graph_or_model) -> fidelity dict of a candidate against ``reference``; passes that
        search a strength themselves (mixed precision, rank allocation) call it.
    screen(model) -> the same, but it stops at the first sample after which the budget cannot hold
        whatever the rest give (``metrics.out_of_reach``; the dict then has ``out_of_reach``: the
        samples measured, and scores of those only); None where the manager offers no screening.
    budget: the fidelity Budget, or None; ``budget_holds(scores)`` checks it (relative budgets
        compare against ``baseline``, the original model's own scores). target: the TargetProfile.
    timing(base, candidates, decides, final) -> [SpeedComparison of each candidate against ``base``]:
        this CPU's interleaved timing on one selection sample (``runtime.compare_speeds``) offered by
        the manager, which also times its input in the same rounds when a single candidate that may
        be the pass's result (``final``) is timed and keeps that comparison for the speed contract
        (the result the pass keeps is then not timed again); None where passes time with
        ``runtime.compare_speeds`` themselves.
    rng: a seeded numpy Generator. progress: a Progress reporter (``progress.track(iterable, desc)``).
    cache: a dict passes may use for analyses keyed by their own keys; cleared when the graph changes.
    source: (model, graph) while a pass runs: the model the manager gave it and the graph it was imported
        as (``input_model``).
    verdict_samples: how many test samples the manager's verdict judges the result on (0: unknown).
    """

    calib: Any = None
    val: Any = None
    reference: Any = None
    budget: Any = None
    target: Any = None
    seed: int = 0
    rng: np.random.Generator = None
    progress: Any = None
    template: onnx.ModelProto | None = None
    evaluator: Any = None
    screen: Any = None
    timing: Any = None
    cache: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    source: tuple | None = None
    verdict_samples: int = 0

    def budget_holds(self, scores: dict, margin: float = 0.0) -> bool:
        """Whether fidelity ``scores`` keep the budget (True without a budget); handles relative
        budgets against the original's own scores; ``margin`` keeps that fraction of the slack in
        reserve (``Budget.holds``): a search tuned on the selection samples leaves headroom for the
        test samples that judge its result."""
        return True if self.budget is None else self.budget.holds(scores, self.baseline, margin)

    def __post_init__(self):
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        if self.progress is None:
            self.progress = Progress(enabled=False)

    def compare_speeds(self, base, models: list, sample: dict, decides, final: bool = True) -> list:
        """``models`` timed against ``base`` on this CPU in one interleaved measurement, each with the
        decisions ``decides``: the manager's ``timing`` where it offers one, else
        ``runtime.compare_candidates`` on ``sample``. ``final=False``: no candidate is the pass's
        result as it stands (a later step of the pass changes it), so the manager does not time its
        input beside it for the speed contract."""
        if self.timing is not None:
            return self.timing(base, models, decides, final)
        return compare_candidates(base, models, sample, decides)

    def to_model(self, graph: gs.Graph) -> onnx.ModelProto:
        """Export a graph to a ModelProto, keeping the original model's metadata, producer, opsets."""
        return graph_to_model(graph, self.template)

    def input_model(self, graph: gs.Graph) -> onnx.ModelProto:
        """The pass's input as a model: the model the manager gave the pass when ``graph`` is the graph
        it was imported as (call it before changing the graph), else ``to_model(graph)``. No export:
        a 2 GiB model is not copied again to be measured as the float base."""
        if self.source is not None and self.source[1] is graph:
            return self.source[0]
        return self.to_model(graph)

    def evaluate(self, graph_or_model) -> dict:
        """Fidelity of a candidate graph/model against the original's outputs on the validation set."""
        if self.evaluator is None:
            raise RuntimeError("no validation data: evaluate() needs calibration or validation samples")
        model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else self.to_model(graph_or_model)
        return self.evaluator(model)

    def capture(self, model, names, samples=None):
        """Stream {name: activation} per sample over ``samples`` (default: the calibration set)."""
        if not isinstance(model, onnx.ModelProto):
            model = self.to_model(model)
        src = samples if samples is not None else self.calib
        if src is None:
            raise RuntimeError("no calibration data")
        return capture_activations(model, names, src)
