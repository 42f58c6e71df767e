"""The pass contract: Pass, PassResult, Context, and the registry the CLI and docs read.

A pass is a class with a ``name`` (its CLI/recipe name), an ``Options`` dataclass (typed,
documented options with defaults), flags (``lossless``, ``needs_data``, ``min_opset``) and
``run(graph, ctx) -> PassResult``. Passes never read files or parse CLI options; all they
need comes through the Context. Modules in ``onnxshrink.passes`` register their passes with
``@register`` and are discovered on first use of the registry.
"""

from __future__ import annotations

__all__ = ["Pass", "PassResult", "Context", "register", "registry", "get_pass", "create_pass", "option_docs"]

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import UsageError


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed anything, and statistics
    for the report (counts, per-layer decisions with their reasons)."""

    graph: gs.Graph
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class _NoOptions:
    pass


class Pass:
    """Base of all passes. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    min_opset: ClassVar[int] = 1
    Options: ClassVar[type] = _NoOptions

    def __init__(self, options: Any = None, **kwargs):
        if options is None:
            options = _build_options(self.Options, kwargs, self.name)
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


def _build_options(cls: type, values: dict, pass_name: str):
    if not dataclasses.is_dataclass(cls):
        if values:
            raise UsageError(f"pass '{pass_name}' takes no options (got {', '.join(values)})")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in values.items():
        key = k.replace("-", "_")
        if key not in fields:
            raise UsageError(f"unknown option '{k}' for pass '{pass_name}'; options: {', '.join(fields) or 'none'}")
        kw[key] = _coerce(v, hints.get(key), pass_name, key)
    return cls(**kw)


def _coerce(v, hint, pass_name, key):
    """Check/convert an option value against its annotation (bool, int, float, str, Optional, Literal, list)."""
    if hint is None:
        return v
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, pass_name, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"bad value {v!r} for {pass_name}.{key}")
    if origin is typing.Literal:
        if v not in args:
            raise UsageError(f"option {pass_name}.{key} must be one of {', '.join(map(str, args))} (got {v!r})")
        return v
    if origin in (list, tuple):
        if isinstance(v, str):
            v = [x for x in v.split(",") if x]
        if not isinstance(v, (list, tuple)):
            raise UsageError(f"option {pass_name}.{key} takes a list (got {v!r})")
        inner = args[0] if args else None
        return [(_coerce(x, inner, pass_name, key)) for x in v]
    if hint is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return v.lower() in ("true", "1", "yes", "on")
        raise UsageError(f"option {pass_name}.{key} takes true/false (got {v!r})")
    if hint in (int, float):
        if isinstance(v, bool):
            raise UsageError(f"option {pass_name}.{key} takes a number (got {v!r})")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise UsageError(f"option {pass_name}.{key} takes a number (got {v!r})") from None
        if hint is int:
            if f != int(f):
                raise UsageError(f"option {pass_name}.{key} takes a whole number (got {v!r})")
            return int(f)
        return f
    if hint is str:
        return str(v)
    return v


_REGISTRY: dict[str, type[Pass]] = {}
_DISCOVERED = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from onnxshrink import passes as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name, in a stable order (the pipeline order of the mission first)."""
    _discover()
    order = ["cleanup", "prune", "sparsify", "svd", "share", "quantize"]
    names = sorted(_REGISTRY, key=lambda n: (order.index(n) if n in order else len(order), n))
    return {n: _REGISTRY[n] for n in names}


def get_pass(name: str) -> type[Pass]:
    reg = registry()
    if name not in reg:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(reg)}")
    return reg[name]


def create_pass(spec) -> Pass:
    """A pass instance from a name, a (name, options dict) pair, a {name: options} dict, or a Pass."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return get_pass(spec.strip())()
    if isinstance(spec, dict) and len(spec) == 1:
        (name, opts), = spec.items()
        return get_pass(name)(**(opts or {}))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return get_pass(spec[0])(**(spec[1] or {}))
    raise UsageError(f"cannot read pass specification {spec!r}")


def option_docs(cls: type[Pass]) -> list[dict]:
    """Options of a pass: name, type, default and help (from ``field(metadata={'help': ...})``)."""
    if not dataclasses.is_dataclass(cls.Options):
        return []
    hints = typing.get_type_hints(cls.Options)
    out = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        t = hints.get(f.name)
        tname = getattr(t, "__name__", None) or str(t).replace("typing.", "")
        out.append({"name": f.name, "type": tname, "default": default, "help": f.metadata.get("help", "")})
    return out


@dataclass
class Context:
    """What a pass may use besides the graph.

    calib: calibration samples (streamed), or None.
    val: validation samples the manager measures fidelity on (held out when there are enough).
    reference: the original model's outputs on ``val`` (list over samples of lists over outputs).
    evaluate(graph_or_model) -> fidelity dict of a candidate against ``reference``; passes that
        search a strength themselves (mixed precision, rank allocation) call it.
    budget: the fidelity Budget, or None; ``budget_holds(scores)`` checks it (relative budgets
        compare against ``baseline``, the original model's own scores). target: the TargetProfile.
    rng: a seeded numpy Generator. progress: a Progress reporter (``progress.track(iterable, desc)``).
    cache: a dict passes may use for analyses keyed by their own keys; cleared when the graph changes.
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
    cache: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)

    def budget_holds(self, scores: dict) -> bool:
        """Whether fidelity ``scores`` keep the budget (True without a budget); handles relative
        budgets against the original's own scores."""
        return True if self.budget is None else self.budget.holds(scores, self.baseline)

    def __post_init__(self):
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        if self.progress is None:
            from onnxshrink.pipeline.report import Progress
            self.progress = Progress(enabled=False)

    def to_model(self, graph: gs.Graph) -> onnx.ModelProto:
        """Export a graph to a ModelProto, keeping the original model's metadata, producer, opsets."""
        from onnxshrink.graph.convert import graph_to_model
        return graph_to_model(graph, self.template)

    def evaluate(self, graph_or_model) -> dict:
        """Fidelity of a candidate graph/model against the original's outputs on the validation set."""
        if self.evaluator is None:
            raise RuntimeError("no validation data: evaluate() needs calibration or validation samples")
        model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else self.to_model(graph_or_model)
        return self.evaluator(model)

    def capture(self, model, names, samples=None):
        """Stream {name: activation} per sample over ``samples`` (default: the calibration set)."""
        from onnxshrink.runtime import capture_activations
        if not isinstance(model, onnx.ModelProto):
            model = self.to_model(model)
        src = samples if samples is not None else self.calib
        if src is None:
            raise RuntimeError("no calibration data")
        return capture_activations(model, names, src)
