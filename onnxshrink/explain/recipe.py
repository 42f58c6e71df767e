"""The recipe explain writes: the CANDIDATE's kind of shrinking redone by onnxshrink on ORIGINAL,
with the fixes of the top culprits (``onnxshrink optimize ORIGINAL OUT --recipe FILE`` replays it).

- Quantized candidate: ``quantize`` with the activations' integer type read off the candidate's Q/DQ,
  per-channel weights (onnxshrink's default: they cost nothing at run time on onnxruntime's CPU EP, so
  a per-tensor candidate is not copied there; its per-tensor weights are named as a cause where they
  matter) and ``guard: false``, so the integer placement is kept rather than returned to float where
  int8 is not clearly faster on this CPU (the fidelity search under the budget still runs); then the
  fixes: ``exclude`` lists are merged, other options set. The placement is onnxshrink's (only where
  onnxruntime fuses Q/DQ into integer kernels), not the candidate's.
- Pruned candidate: ``prune`` in importance mode with each pruned channel group (keyed by its first
  producer) at the fraction the candidate removed (``group_ratios``), the culprits' groups at half of it.
- Factorized candidate: ``svd`` with each factorized layer's form and rank (``ranks``; ``min_params: 0``
  so small layers the candidate factorized are not skipped), the culprits' ranks doubled.
A mixed candidate gets the passes in the order prune, svd, quantize.
"""

from __future__ import annotations

__all__ = ["build_recipe", "recipe_yaml"]

import collections

import onnx_graphsurgeon as gs


def _scheme(units: dict) -> dict:
    dtypes = collections.Counter(u.act.dtype for u in units.values() if u.act is not None)
    opts = {"per_channel": True}
    if dtypes:
        opts["activation_dtype"] = dtypes.most_common(1)[0][0]
    opts["guard"] = False
    return opts


def build_recipe(kind: str, units: dict, structural: list, gc: gs.Graph, culprits: list, calib: str | None,
                 budget: str | None) -> dict:
    """The recipe mapping (module docstring); ``culprits`` are ranking rows whose first cause's fix is
    applied; ``structural`` the pruned groups and factorized layers (``structural.py``)."""
    passes: dict = {}
    pruned = [s for s in structural if s.kind == "pruned"]
    factorized = [s for s in structural if s.kind == "factorized"]
    if pruned:
        passes["prune"] = {"mode": "importance", "group_ratios": {s.key: s.ratio for s in pruned}}
    if factorized:
        passes["svd"] = {"ranks": {s.key: [s.form, s.rank] for s in factorized}, "min_params": 0}
    if any(u.quantized for u in units.values()):
        passes["quantize"] = _scheme(units)
    fixes = []
    for r in culprits:
        fix = r["causes"][0]["fix"]
        for p, opts in fix.items():
            cur = passes.setdefault(p, {})
            for k, v in opts.items():
                if isinstance(v, list) and k == "exclude":
                    cur[k] = list(dict.fromkeys(list(cur.get(k, [])) + v))
                elif isinstance(v, dict):
                    cur[k] = {**cur.get(k, {}), **v}
                else:
                    cur[k] = v
        fixes.append({"node": r["node"], "cause": r["causes"][0]["cause"], "fix": fix})
    order = [p for p in ("prune", "svd", "quantize") if p in passes]
    recipe: dict = {"passes": [{p: passes[p]} for p in order]}
    if calib:
        recipe["calib"] = str(calib)
    if budget:
        recipe["budget"] = budget
    return {"recipe": recipe, "fixes": fixes, "kind": kind}


def recipe_yaml(r: dict) -> str:
    """The recipe as YAML with a header saying where it came from and what it fixes."""
    import yaml

    lines = ["# written by onnxshrink explain: the candidate's shrinking redone on the original, with these fixes"]
    for f in r["fixes"]:
        lines.append(f"#   {f['node']}: {f['cause']} -> {f['fix']}")
    if not r["fixes"]:
        lines.append("#   (no fix: no culprit with a fix onnxshrink can apply)")
    lines.append("# replay: onnxshrink optimize ORIGINAL OUT --recipe THIS_FILE")
    return "\n".join(lines) + "\n" + yaml.safe_dump(r["recipe"], sort_keys=False, default_flow_style=None)
