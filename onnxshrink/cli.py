"""Command line: ``onnxshrink optimize | explain | inspect | passes`` (thin over the Python API).

Errors print one line on stderr (``onnxshrink: error: ...``) and exit with the codes in
``onnxshrink.errors``: 2 usage, 3 invalid input, 4 budget not met, 1 internal error.
``--debug`` shows the traceback.
"""

from __future__ import annotations

__all__ = ["main", "cli"]

import json
import shutil
import sys
from pathlib import Path

import click

from onnxshrink.errors import EXIT_INTERNAL, EXIT_USAGE, BudgetError, InputError, OnnxShrinkError, UsageError
from onnxshrink.graph.cost import model_stats
from onnxshrink.graph.shapes import parse_input_shape
from onnxshrink.model import check_model, check_output_path, load
from onnxshrink.passes.options import option_docs
from onnxshrink.passes.registry import get_pass, registry
from onnxshrink.pipeline.manager import optimize as run_optimize
from onnxshrink.pipeline.report import format_bytes, format_count
from onnxshrink.pipeline.settings import Settings, cli_settings, recipe_keys
from onnxshrink.progress import Progress
from onnxshrink.targets.openvino import setup_openvino
from onnxshrink.targets.profiles import get_target, with_options

_DEBUG = False


def _parse_options(items) -> dict:
    """``-o prune.ratio=0.3`` -> {"prune": {"ratio": 0.3}} (values read as YAML scalars)."""
    import yaml

    out: dict = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            raise UsageError(f"--option '{it}': expected PASS.OPTION=VALUE, e.g. prune.ratio=0.3")
        key, value = it.split("=", 1)
        pname, opt = key.split(".", 1)
        try:
            v = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            v = value
        out.setdefault(pname, {})[opt] = v
    return out


def _load_recipe(path) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise UsageError(f"recipe not found: {p}")
    try:
        text = p.read_text()
        recipe = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except Exception as e:
        raise UsageError(f"cannot read recipe {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {p}: expected a mapping with 'passes' (and optionally calib, budget, target)")
    known = recipe_keys()
    unknown = set(recipe) - known
    if unknown:
        raise UsageError(f"recipe {p}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return recipe


def _recipe_passes(spec) -> list:
    """Recipe passes: a list of names or {name: {options}}; or a 'a,b' string."""
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if not isinstance(spec, list):
        raise UsageError("recipe 'passes' must be a list")
    return spec


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxshrink")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug):
    """Shrink trained ONNX models: prune, low-rank (svd) and quantize, validated against your data."""
    global _DEBUG
    _DEBUG = debug


_CLICK_TYPES = {"text": None, "path": click.Path(), "file": click.Path(dir_okay=False), "int": int, "float": float}


def settings_options(*names):
    """Decorator: the click options of these Settings fields (flags, help, type from their metadata),
    in this order; each option's value arrives under the field's name."""
    fields = cli_settings()

    def decorate(f):
        for name in reversed(names):  # decorators apply bottom-up: reversed keeps the help in order
            m = fields[name].metadata
            kw = {"help": m["help"]}
            if m["kind"] == "flag":
                kw["is_flag"] = True
            elif m["kind"] == "shapes":
                kw.update(multiple=True, metavar=m["metavar"])
            elif m["kind"] == "choice":
                kw.update(type=click.Choice(list(m["choices"])), default=None)
            elif _CLICK_TYPES[m["kind"]] is not None:
                kw.update(type=_CLICK_TYPES[m["kind"]], default=None)
            f = click.option(*m["flags"], name, **kw)(f)
        return f
    return decorate


@cli.command()
@click.argument("input_model", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_model", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--passes", "-p", help="Comma-separated passes, run in order (default: cleanup).")
@settings_options("data", "val_data", "budget")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write the report as one self-contained HTML page here.")
@settings_options("target", "input_shapes")
@click.option("--recipe", type=click.Path(), help="YAML/JSON pipeline: passes with options, calib, budget, target.")
@click.option("--option", "-o", "options", multiple=True, metavar="PASS.KEY=VALUE",
              help="Set a pass option, e.g. -o prune.ratio=0.3, or a target option, e.g. "
                   "-o target.channels_last=true (repeatable).")
@settings_options("seed", "synthetic", "measure_speed", "speed", "enforce_speed", "target_size", "target_macs",
                  "target_latency", "executor", "workers", "cache", "sensitivity_samples", "max_units", "sensitivity",
                  "plot")
@click.option("--quiet", "-q", is_flag=True, help="No table or progress.")
def optimize(input_model, output_model, passes, report_path, recipe, options, quiet, html_path=None, **given):
    """Optimize IN and write OUT (never touching IN)."""
    if not Path(input_model).exists():  # the paths first: the most basic mistakes get named first
        raise InputError(f"model file not found: {input_model}")
    check_output_path(output_model, input_model)
    r = _load_recipe(recipe) if recipe else {}
    pass_specs = _recipe_passes(passes if passes is not None else r.get("passes", ["cleanup"]))
    if not pass_specs:
        raise UsageError("--passes is empty")
    overrides = _parse_options(options)
    target_options = overrides.pop("target", None)  # -o target.channels_last=true: an emission option
    specs = []
    for spec in pass_specs:
        if isinstance(spec, str):
            name, opts = spec, {}
        elif isinstance(spec, dict) and len(spec) == 1:
            (name, opts), = spec.items()
            opts = dict(opts or {})
        else:
            raise UsageError(f"cannot read pass {spec!r}")
        get_pass(name)
        opts.update(overrides.pop(name, {}))
        specs.append({name: opts})
    if overrides:
        raise UsageError(f"--option names pass(es) not in the pipeline: {', '.join(overrides)}")
    settings = Settings.resolve(given, r, progress=Progress(enabled=not quiet), debug=_DEBUG)
    if target_options:
        settings.target = with_options(get_target(settings.target), target_options)
    rpath = report_path or r.get("report")
    if rpath:  # fail before any work, and never let the report overwrite the input or the output
        check_output_path(rpath, input_model)
        if Path(rpath).resolve() == Path(output_model).resolve():
            raise UsageError(f"--report and OUT are the same file ({rpath})")
    if html_path:
        check_output_path(html_path, input_model)
    try:
        _, report = run_optimize(input_model, output_model, passes=specs, settings=settings)
    except BudgetError as e:
        if e.report is not None and (rpath or html_path):
            e.report.input = input_model
            _write_report(e.report, rpath, html_path)
        if e.report is not None and not quiet:
            e.report.render(_console())
        raise
    report.input = input_model
    _write_report(report, rpath, html_path)
    if not quiet:
        report.render(_console())
        click.echo(f"wrote {output_model}", err=True)


def _write_report(report, path, html_path=None) -> None:
    """Write the JSON report and the HTML page (each when its path is given) atomically."""
    if path:
        _write_text(path, report.to_json() + "\n")
    if html_path:
        from onnxshrink.explain.html_report import report_html
        _write_text(html_path, report_html(report.to_dict()))


def _console():
    """The terminal's console; piped (a CI log, a pipeline), its one-line statements (fidelity,
    budget, speed, placement, warnings) stay one line each, so a script can grep them whole."""
    from rich.console import Console
    return Console(stderr=False, width=max(100, min(160, shutil.get_terminal_size((120, 40)).columns)),
                   soft_wrap=not sys.stdout.isatty())


@cli.command(name="explain")
@click.argument("original", metavar="ORIGINAL", type=click.Path(dir_okay=False))
@click.argument("candidate", metavar="CANDIDATE", type=click.Path(dir_okay=False))
@click.option("--calib", "calib", required=True, type=click.Path(), help="Samples: folder of .npy / .npz files.")
@click.option("--samples", type=int, default=16, show_default=True, help="Samples used (0: all).")
@click.option("--top", type=int, default=8, show_default=True,
              help="Units measured alone (quantization of that unit only), the largest local jumps first.")
@click.option("--budget", default=None, help="Budget written into the recipe (default: optimize's default).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write a self-contained HTML report here.")
@click.option("--write-recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="Write the fixes as a recipe for `onnxshrink optimize ORIGINAL OUT --recipe FILE`.")
@click.option("--apply", "apply_path", type=click.Path(dir_okay=False),
              help="Run the recipe on ORIGINAL, write OUT, and print the fidelity before / after.")
@click.option("--quiet", "-q", is_flag=True, help="No table.")
def explain_cmd(original, candidate, calib, samples, top, budget, json_path, html_path, recipe_path, apply_path,
                quiet):
    """Where CANDIDATE (a shrunk ORIGINAL) loses fidelity, why, and the recipe that fixes it."""
    from onnxshrink.explain import check_interface, explain, json_ready, recipe_yaml, samples_fidelity

    for p in (original, candidate):
        if not Path(p).exists():
            raise InputError(f"model file not found: {p}")
    for p in (json_path, html_path, recipe_path, apply_path):
        if p:
            check_output_path(p, original)
            check_output_path(p, candidate)
    if samples < 0 or top < 0:
        raise UsageError("--samples and --top must be >= 0")
    m_o, m_c = load(original), load(candidate)
    check_interface(m_o, m_c)
    res = explain(m_o, m_c, calib, samples=samples, top=top, calib_path=calib, budget=budget)
    res["original"], res["candidate"] = original, candidate
    text = recipe_yaml(res["recipe"])
    if recipe_path:
        # a .json recipe is read as JSON (``_load_recipe``): written as JSON too (JSON has no comments)
        _write_text(recipe_path, json.dumps(res["recipe"]["recipe"], indent=2) + "\n"
                    if Path(recipe_path).suffix == ".json" else text)
    if apply_path and not res["recipe"]["recipe"]["passes"]:
        raise UsageError("--apply: the recipe has no pass (explain found no change of CANDIDATE it can redo)")
    if apply_path:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            rp = recipe_path or str(Path(d) / "recipe.yaml")
            if not recipe_path:
                Path(rp).write_text(text)
            report = str(Path(d) / "report.json")
            click.get_current_context().invoke(optimize, input_model=original, output_model=apply_path, recipe=rp,
                                               report_path=report, quiet=quiet)
            passes = json.loads(Path(report).read_text()).get("passes", [])
        res["after"] = samples_fidelity(m_o, load(apply_path), calib, samples)
        res["applied"] = apply_path
        if not any(r.get("status") == "applied" for r in passes):
            # the replay wrote the original: its fidelity is exact, and says nothing of the recipe's fixes
            res["apply_note"] = "the recipe changed nothing: " + "; ".join(
                f"{r.get('name')} {r.get('status')}" + (f" ({r['reason']})" if r.get("reason") else "") for r in passes)
    if json_path:
        _write_text(json_path, json.dumps(json_ready(res), indent=2) + "\n")
    if html_path:
        from onnxshrink.explain.html_report import explain_html
        _write_text(html_path, explain_html(json_ready(res)))
    if not quiet:
        from onnxshrink.explain.text import render_explain
        render_explain(res, text, _console())


def _write_text(path, text: str) -> None:
    """Write ``text`` atomically (temporary file beside it, then rename)."""
    import os
    import tempfile

    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=str(p.parent) if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as e:
        raise UsageError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,..",
              help="Input shapes for the MAC count of dynamic models (repeatable).")
def inspect(model_path, as_json, input_shapes):
    """Opset, inputs and outputs, op histogram, parameters, weight bytes, MACs."""


    m = load(model_path)
    shapes = dict(parse_input_shape(s) for s in input_shapes)
    st = model_stats(m, shapes or None)
    st["file_bytes"] = Path(model_path).stat().st_size
    try:  # inspect describes broken models too; it says whether the checker accepts them
        check_model(m, full_check=False)
        st["checker"] = "ok"
    except Exception as e:
        st["checker"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    st["transformer"] = _transformer_blocks(m, shapes)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    from rich.table import Table
    c = _console()
    c.print(f"[bold]{model_path}[/bold]  opset {st['opset']}  ir {st['ir_version']}  producer '{st['producer']}'")
    for kind in ("inputs", "outputs"):
        for v in st[kind]:
            c.print(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} {v['shape']}")
    c.print(f"  checker: {st['checker']}")
    c.print(f"  nodes {st['nodes']}, parameters {format_count(st['params'])}, weights "
            f"{format_bytes(st['weight_bytes'])}, MACs {format_count(st['macs'])}, "
            f"file {format_bytes(st['file_bytes'])}")
    for rec in st["transformer"]:
        if "attention" in rec:
            c.print(f"  attention {rec['attention']}: {rec['heads']} heads x {rec['head_dim']}"
                    + ("" if rec["prunable"] else " (not prunable)"))
        else:
            c.print(f"  MLP {rec['mlp']}: {rec['neurons']} neurons")
    t = Table(title="ops", title_justify="left")
    t.add_column("op")
    t.add_column("count", justify="right")
    for op, n in st["ops"].items():
        t.add_row(op, str(n))
    c.print(t)


def _transformer_blocks(m, shapes: dict) -> list:
    """Attention heads and MLP widths (graph.channels.transformer_summary) of a model with attention
    products; [] for other models, or when the analysis cannot read the model."""
    import onnx_graphsurgeon as gs

    from onnxshrink.graph.channels import transformer_summary

    if not any(n.op_type == "Softmax" for n in m.graph.node):
        return []
    try:
        return transformer_summary(gs.import_onnx(m), shapes or None)
    except Exception:  # inspect describes any model; the summary is a bonus
        return []


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_passes(as_json):
    """Every pass with its options and defaults."""

    reg = registry()
    if as_json:
        click.echo(json.dumps({n: {"summary": c.summary or (c.__doc__ or "").strip().splitlines()[0],
                                   "lossless": c.lossless, "needs_data": c.needs_data,
                                   "options": option_docs(c)} for n, c in reg.items()}, indent=2, default=str))
        return
    for n, c in reg.items():
        flags = ", ".join(f for f, on in (("lossless", c.lossless), ("needs --calib", c.needs_data)) if on)
        click.echo(f"{n}{f'  ({flags})' if flags else ''}: {c.summary or (c.__doc__ or '').strip().splitlines()[0]}")
        for o in option_docs(c):
            click.echo(f"    {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}")


@cli.command(name="setup")
@click.argument("what", type=click.Choice(["openvino"]))
@click.option("--venv", type=click.Path(file_okay=False), help="Where (default: ~/.cache/onnxshrink/venvs/openvino).")
def setup(what, venv):
    """Install a device verifier that needs its own Python: ``openvino`` creates a venv with
    onnxruntime-openvino, which --target openvino then runs the result on."""
    py = setup_openvino(venv, log=lambda m: click.echo(m, err=True))
    click.echo(py)
    if venv:
        click.echo(f"export ONNXSHRINK_OPENVINO_PYTHON={py}", err=True)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a pipeline's timeout, ``kill``) raises SystemExit(143) instead of killing the
    process outright, so the atomic write's ``finally`` removes its temporary files."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def on_term(signum, frame):
        click.echo("onnxshrink: terminated", err=True)
        sys.exit(143)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # not allowed here (embedded interpreter): keep the default
        pass


def main(argv=None) -> None:
    """Entry point: maps errors to one line and an exit code."""
    global _DEBUG
    argv = list(argv) if argv is not None else sys.argv[1:]
    _DEBUG = "--debug" in argv
    if not argv:  # bare ``onnxshrink``: the help, exit 0 (not a usage error)
        argv = ["--help"]
    _exit_cleanly_on_sigterm()
    try:
        cli.main(args=argv, prog_name="onnxshrink", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        click.echo("onnxshrink: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if _DEBUG:
            raise
        click.echo(f"onnxshrink: error: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except OnnxShrinkError as e:
        if _DEBUG:
            raise
        click.echo(f"onnxshrink: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("onnxshrink: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("onnxshrink: error: out of memory", err=True)
        sys.exit(EXIT_INTERNAL)
    except Exception as e:  # a bug: say so in one line, keep the traceback behind --debug
        if _DEBUG:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"onnxshrink: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(EXIT_INTERNAL)
