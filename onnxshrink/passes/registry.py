"""The pass registry: passes register themselves with ``@register`` under their ``name``; the
CLI, recipes and the manager look them up by name. The modules of ``onnxshrink.passes`` are
imported (discovered) on first use, so a pass is known as soon as its module exists."""

from __future__ import annotations

__all__ = ["register", "registry", "get_pass", "create_pass", "PIPELINE_ORDER"]

import importlib
import pkgutil
from pathlib import Path

from onnxshrink.errors import UsageError
from onnxshrink.passes.base import Pass

# the order ``registry()`` lists passes in (the order a full pipeline runs them); others follow by name
PIPELINE_ORDER = ("cleanup", "prune", "sparsify", "svd", "share", "quantize")
PACKAGE = "onnxshrink.passes"
# package modules that hold no pass
NOT_PASS_MODULES = ("base", "registry", "options", "knob")

_REGISTRY: dict[str, type[Pass]] = {}
_DISCOVERED = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import every pass module of ``onnxshrink.passes`` once (their ``@register`` fills the registry)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for m in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if m.name not in NOT_PASS_MODULES and not m.name.startswith("_"):
            importlib.import_module(f"{PACKAGE}.{m.name}")


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name, in a stable order (the pipeline order of the mission first)."""
    discover()
    order = list(PIPELINE_ORDER)
    names = sorted(_REGISTRY, key=lambda n: (order.index(n) if n in order else len(order), n))
    return {n: _REGISTRY[n] for n in names}


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; UsageError naming the known passes otherwise."""
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
