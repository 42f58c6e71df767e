"""Pass options: building a pass's ``Options`` dataclass from loose values (CLI ``-o`` strings,
recipe YAML, keyword arguments), each coerced to its field's annotation, and the option table
``onnxshrink passes`` prints.

Coercion follows the annotation: bool (true/false, 1/0, yes/no, on/off), int (a whole number),
float, str, Optional (None allowed), Literal (one of the listed values) and list (a list or a
comma-separated string, each item coerced to the item type); anything else is passed through.
"""

from __future__ import annotations

__all__ = ["NoOptions", "build_options", "coerce_option", "option_docs", "keyed_items"]

import dataclasses
import typing
from dataclasses import dataclass

from onnxshrink.errors import UsageError


@dataclass
class NoOptions:
    """The options of a pass that takes none."""


def build_options(cls: type, values: dict, pass_name: str):
    """An instance of the options dataclass ``cls`` from ``values`` (dashes in keys read as
    underscores); UsageError for an unknown key or a value its annotation does not accept."""
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
        kw[key] = coerce_option(v, hints.get(key), pass_name, key)
    return cls(**kw)


def coerce_option(v, hint, pass_name, key):
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
                return coerce_option(v, a, pass_name, key)
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
        return [(coerce_option(x, inner, pass_name, key)) for x in v]
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


def option_docs(pass_cls: type) -> list[dict]:
    """Options of a pass class: name, type, default and help of each field of its ``Options``
    dataclass (help from ``field(metadata={'help': ...})``); [] when it takes none."""
    options_cls = pass_cls.Options
    if not dataclasses.is_dataclass(options_cls):
        return []
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        t = hints.get(f.name)
        tname = getattr(t, "__name__", None) or str(t).replace("typing.", "")
        out.append({"name": f.name, "type": tname, "default": default, "help": f.metadata.get("help", "")})
    return out


def keyed_items(value, option: str, form: str) -> list[tuple]:
    """Per-unit option items as (key, value) pairs, from a mapping, a list of ``KEY=VALUE`` strings or
    one comma-separated string of them (the CLI's ``-o``, recipes); a string splits at its last
    ``=``. UsageError naming ``option`` and the expected ``form`` for an item without ``=``."""
    if isinstance(value, dict):
        return list(value.items())
    parts = [x for x in value.split(",") if x] if isinstance(value, str) else list(value or [])
    items = []
    for it in parts:
        key, sep, val = str(it).rpartition("=")
        if not sep:
            raise UsageError(f"option {option}: expected {form} items (got {it!r})")
        items.append((key, val))
    return items
