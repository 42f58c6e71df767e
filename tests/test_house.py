"""The house rules of the package, checked: the import graph (imports inside functions included)
has no cycle and reads top-down through the layers; no module imports another module's underscore
name; ruff passes with the project's configuration."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnxshrink"

# A module may import from its own layer and the layers below it, never from a layer above.
LAYERS = [  # top first
    ("cli", "__main__", "__init__"),
    ("explain",),
    ("pipeline",),
    ("passes", "targets"),
    ("graph", "runtime", "metrics", "data", "cache", "progress"),
    ("model", "sparse_storage", "errors"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(mods: dict[str, Path]):
    """(importer, imported module, imported name or None) for every import of a package module."""
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        yield mod, f"{target}.{a.name}", None
                    elif target in mods:
                        yield mod, target, a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        yield mod, a.name, None


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {mod} belongs to no layer: add it to LAYERS")


def test_no_import_cycles():
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for a, b, _ in _imports(mods):
        if not a.startswith(b + ".") and a != b:  # a package's __init__ re-exporting its own modules is no cycle
            g.add_edge(a, b)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_private_names_across_modules():
    mods = _modules()
    bad = [f"{a} <- {b}.{n}" for a, b, n in _imports(mods)
           if n and n.startswith("_") and not n.startswith("__") and a != b]
    assert not bad, f"private names imported across modules: {bad}"


def test_layers_read_top_down():
    mods = _modules()
    bad = [f"{a} -> {b}" for a, b, _ in _imports(mods)
           if a != "onnxshrink" and _layer(b) < _layer(a)]
    assert not bad, f"imports from a higher layer: {bad}"


def test_ruff_passes():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: pip install -e '.[test]' brings it")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
