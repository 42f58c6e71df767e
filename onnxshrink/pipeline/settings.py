"""Settings: the pass manager's options, written once.

Each field of ``Settings`` is one keyword argument of ``PassManager`` / ``optimize`` (same name,
same default); its metadata says how the command line and a recipe set it:

  help     the text of ``onnxshrink optimize --help``;
  flags    the command-line flag(s), e.g. ("--calib",); absent: Python API only;
  kind     how the CLI reads the flag: text, path, file (a path that is not a folder), int, float,
           choice (of ``choices``), flag (on/off; ``flag_value`` is the setting's value when on),
           shapes (repeatable NAME:D0,D1,.. read into {name: dims});
  recipe   the recipe key (YAML/JSON); absent: not settable from a recipe;
  parse    applied to the value read from either source (e.g. int).

``Settings.resolve(given, recipe)`` combines them: a flag that was given wins over the recipe's
key, which wins over the default; ``input_shapes`` merges the recipe's with the flags' (a flag
names one input). Two recipe keys are not manager options: ``passes`` (the manager's positional
argument) and ``report`` (the CLI writes the report), listed in ``RECIPE_ONLY_KEYS``.
"""

from __future__ import annotations

__all__ = ["Settings", "RECIPE_ONLY_KEYS", "SPEED_POLICIES", "speed_policy", "recipe_keys", "cli_settings", "setting"]

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxshrink.errors import UsageError
from onnxshrink.graph.shapes import parse_input_shape
from onnxshrink.progress import Progress

# recipe keys the CLI reads itself (they are not options of the manager)
RECIPE_ONLY_KEYS = ("passes", "report")
# the speed contract's policies (docs/errors.md "Exit 0 means checked"); the first is the default
SPEED_POLICIES = ("never-slower", "report", "off")


def speed_policy(value: str | None) -> str:
    """The speed policy in force: ``value``, else ``$ONNXSHRINK_SPEED`` (a pipeline's or a test
    session's default), else never-slower."""
    policy = value or os.environ.get("ONNXSHRINK_SPEED") or SPEED_POLICIES[0]
    if policy not in SPEED_POLICIES:
        raise UsageError(f"speed policy {policy!r}: use one of {', '.join(SPEED_POLICIES)}")
    return policy


def setting(default: Any = None, help: str = "", flags: tuple = (), kind: str = "text", recipe: str | None = None,
            parse: Callable | None = None, default_factory: Callable | None = None, **cli) -> Any:
    """A Settings field with its metadata (see the module docstring); ``cli`` holds extra flag
    details (``choices``, ``metavar``, ``flag_value``)."""
    metadata = {"help": help, "flags": tuple(flags), "kind": kind, "recipe": recipe, "parse": parse, **cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def optional_int(value) -> int:
    """A count where None means 0 (all)."""
    return 0 if value is None else int(value)


def flag_given(value) -> bool:
    """Whether a command-line value was given: click passes None (option), False (flag), () (a
    repeatable option) when it was not; an empty text counts as not given (0 does count)."""
    return not (value is None or value is False or (isinstance(value, (str, tuple)) and not value))


def shapes_from_flags(values) -> dict:
    """``("x:1,3,224,224", ...)`` -> {"x": [1, 3, 224, 224], ...}."""
    return dict(parse_input_shape(s) for s in values)


@dataclass
class Settings:
    """The options of a PassManager run (see PassManager for their meaning)."""

    data: Any = setting(None, "Calibration data: folder of .npy (single input) or .npz files.",
                        flags=("--calib",), kind="path", recipe="calib")
    val_data: Any = setting(None, "Held-out samples; they alternate between selection and test (default: of every four "
                            "--calib samples the 2nd selects and the 4th tests).",
                            flags=("--val",), kind="path", recipe="val")
    budget: Any = setting(None, 'Fidelity budget, e.g. "cosine>=0.99", "sqnr>=30", "top1>=0.98", "max_abs<=0.01" '
                          '(default "cosine>=0.99"; "none": no check, the report says unchecked).',
                          flags=("--budget",), recipe="budget")
    target: Any = setting(None, "Execution-provider target: cpu, xnnpack, nnapi, coreml, qnn, openvino.",
                          flags=("--target",), recipe="target")
    input_shapes: dict | None = setting(None, "Fix an input's dynamic dimensions (repeatable).",
                                        flags=("--input-shape",), kind="shapes", recipe="input_shapes",
                                        metavar="NAME:D0,D1,..")
    seed: int = setting(0, "Random seed (default 0).", flags=("--seed",), kind="int", recipe="seed", parse=int)
    synthetic: bool = setting(False, "Use random inputs when no data is given (fidelity meaningless).",
                              flags=("--synthetic",), kind="flag", flag_value=True)
    measure_speed: bool = setting(False, "Measure single-thread latency before and after.",
                                  flags=("--latency",), kind="flag", flag_value=True)
    target_size: float | None = setting(
        None, "Allocate prune/svd/quantize strengths per unit so the weights take at most this fraction of the "
        "input's bytes (e.g. 0.2), within the budget; else exit 4.",
        flags=("--target-size",), kind="float", recipe="target_size")
    target_macs: float | None = setting(None, "As --target-size, for MACs (with other targets: all must be met).",
                                        flags=("--target-macs",), kind="float", recipe="target_macs")
    target_latency: float | None = setting(
        None, "As --target-size, for measured single-thread latency (with other targets: all must be met).",
        flags=("--target-latency",), kind="float", recipe="target_latency")
    executor: str = setting("auto", "Where sensitivity measurements run (default auto: a process pool on 2+ cores).",
                            flags=("--executor",), kind="choice", recipe="executor",
                            choices=("auto", "serial", "process", "ray"))
    workers: int | None = setting(None, "Workers of the process pool or Ray.", flags=("--workers",), kind="int",
                                  recipe="workers")
    cache: Any = setting(True, "Do not read or write the on-disk sensitivity cache.", flags=("--no-cache",),
                         kind="flag", flag_value=False, recipe="cache")
    sensitivity_samples: int = setting(0, "Validation samples each sensitivity measurement uses (default: all).",
                                       flags=("--sensitivity-samples",), kind="int", recipe="sensitivity_samples",
                                       parse=optional_int)
    max_units: int = setting(0, "Measure only the N largest prune and svd units (large models; quantize units are "
                             "all measured; default: all).", flags=("--max-units",), kind="int",
                             recipe="max_units", parse=optional_int)
    sensitivity: str = setting("auto", "How the allocation's sensitivity table is made: measured (every unit at "
                               "every strength by its pass, end to end), proxy (weight changes from one capture "
                               "through one shared session, the approximate rows near the decision measured), "
                               "auto (proxy from 8 MiB of weights, unless a latency target).",
                               flags=("--sensitivity",), kind="choice", recipe="sensitivity",
                               choices=("auto", "measured", "proxy"))
    speed: str | None = setting(
        None, "The speed contract of the cpu target: never-slower (default) times the result against the input "
        "and rolls back, pass by pass from the last lossy one, what makes it clearly slower (exit 4 if that is not "
        "enough); report only times and warns; off does not time. Default: $ONNXSHRINK_SPEED, else never-slower.",
        flags=("--speed",), kind="choice", recipe="speed", choices=SPEED_POLICIES)
    enforce_speed: bool = setting(False, "Hold the speed contract even with a size-only --target-size (which "
                                  "otherwise waives it: the user asked for bytes).", flags=("--enforce-speed",),
                                  kind="flag", flag_value=True, recipe="enforce_speed")
    plot: str | os.PathLike | None = setting(
        None, "PNG of metric vs size and vs latency of the configurations tried (needs matplotlib).",
        flags=("--plot",), kind="file", recipe="plot")
    # Python API only
    progress: bool | Progress = setting(False, "progress bars and allocation log lines on stderr")
    metric: Callable | None = setting(None, "user callable (outputs, samples) -> float, exposed as metric 'user'")
    labels: Any = setting(None, "labels of the validation samples (accuracy budgets)")
    lossless_tol: float = setting(1e-4, "relative max-abs error a lossless pass may cause")
    debug: bool = setting(False, "raise a pass's exceptions instead of rolling it back")

    @classmethod
    def resolve(cls, given: dict, recipe: dict, **overrides) -> "Settings":
        """Settings from command-line values ``given`` ({field name: value}; None, '', False or ()
        when the flag was not given), the recipe mapping, and ``overrides`` (set as they are)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                continue
            m = f.metadata
            flag_value = given.get(f.name)
            key = m["recipe"]
            if m["kind"] == "shapes":
                shapes = dict((recipe.get(key) if key else None) or {})
                shapes.update(shapes_from_flags(flag_value or ()))
                values[f.name] = shapes
                continue
            if flag_given(flag_value):
                value = m["flag_value"] if m["kind"] == "flag" else flag_value
            elif key is not None and key in recipe:
                value = recipe[key]
            else:
                value = f.default
            values[f.name] = m["parse"](value) if m["parse"] is not None else value
        return cls(**values, **overrides)

    def manager_kwargs(self) -> dict:
        """The settings as PassManager keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def recipe_keys() -> set[str]:
    """Every key a recipe may have."""
    return set(RECIPE_ONLY_KEYS) | {f.metadata["recipe"] for f in dataclasses.fields(Settings) if f.metadata["recipe"]}


def cli_settings() -> dict[str, dataclasses.Field]:
    """The Settings fields the command line sets, by field name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(Settings) if f.metadata["flags"]}
