"""Self-contained HTML reports: ``optimize --html`` (from the JSON report) and ``explain --html``.

One file: inline CSS and SVG charts (``svg.py``), no scripts, fonts or images fetched from anywhere;
a print stylesheet keeps sections whole on a page. Every key figure sits in an element with a
``data-key`` attribute naming its place in the JSON (``fidelity.cosine``, ``ranking.0.node``), so a
test can check the page against the report.
"""

from __future__ import annotations

__all__ = ["report_html", "explain_html"]

import math
from html import escape

from onnxshrink.explain.recipe import recipe_yaml
from onnxshrink.explain.svg import bars, line, scatter
from onnxshrink.pipeline.report import is_chosen, phase_times, trial_label

CSS = """
:root { --fg: #1d2330; --muted: #5b6578; --line: #d9dee8; --ok: #1e8449; --bad: #c0392b; --warn: #b9770e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0 auto;
       max-width: 1100px; padding: 20px 28px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; } h3 { font-size: 14px; margin: 16px 0 6px; }
.sub { color: var(--muted); margin: 0 0 12px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f9; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px; color: #fff; }
.ok { background: var(--ok); } .bad { background: var(--bad); } .warn { background: var(--warn); }
.muted { color: var(--muted); } .small { font-size: 12px; }
.verdict { font-size: 16px; margin: 8px 0; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
section { break-inside: avoid; }
svg.chart { max-width: 100%; height: auto; display: block; margin: 4px 0 12px; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  h2 { break-after: avoid; } tr, svg.chart, pre { break-inside: avoid; }
  .badge { border: 1px solid #000; color: #000; background: none !important; }
}
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def _f(v, spec="{:.4f}") -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return escape(v)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return escape(spec.format(v))


def _cell(v, key: str | None = None, spec="{:.4f}") -> str:
    attr = f' data-key="{escape(key)}"' if key else ""
    return f'<td class="num"{attr}>{_f(v, spec)}</td>'


def _bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _count(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------------- optimize


def report_html(r: dict) -> str:
    """The HTML page of an optimize report (``Report.to_dict()``)."""
    title = f"onnxshrink: {r.get('input', '')} → {r.get('output', '')}"
    if r.get("fidelity_status") == "unchecked":
        verdict = '<span class="badge warn">unchecked</span> (--budget none)'
    elif r.get("budget"):
        ok = r.get("budget_met")
        verdict = (f'<span class="badge {"ok" if ok else "bad"}" data-key="budget_met">'
                   f'{"PASSED" if ok else "FAILED"}</span> budget <code>{escape(str(r["budget"]))}</code>'
                   + (" (default)" if r.get("budget_source") == "default" else ""))
    else:
        verdict = "measured"
    samples = r.get("samples") or {}
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="sub">target {escape(str(r.get("target") or "cpu"))}; samples: '
            f'{samples.get("calibration", "?")} calibration, {samples.get("selection", "?")} selection, '
            f'{samples.get("test", "?")} test</p>',
            f'<p class="verdict">{verdict}</p>',
            _before_after(r), _fidelity_table(r), _timeline(r), _layer_charts(r), _allocation(r), _target(r)]
    if r.get("warnings"):
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{escape(str(w))}</li>" for w in r["warnings"]) + "</ul>")
    return _page(title, "".join(body))


def _before_after(r: dict) -> str:
    b, a = r.get("before") or {}, r.get("after") or {}
    rows = []
    for label, key, fmt in (("nodes", "nodes", str), ("parameters", "params", _count),
                            ("weight bytes", "weight_bytes", _bytes), ("MACs", "macs", _count)):
        bv, av = _num(b.get(key)), _num(a.get(key))
        ratio = f"{av / bv:.3f}x" if bv and av is not None else ""
        rows.append(f"<tr><td>{label}</td><td class='num' data-key='before.{key}'>{fmt(bv) if bv is not None else ''}"
                    f"</td><td class='num' data-key='after.{key}'>{fmt(av) if av is not None else ''}</td>"
                    f"<td class='num' data-key='ratio.{key}'>{ratio}</td></tr>")
    fb = r.get("file_bytes") or {}
    if fb:
        bv, av = _num(fb.get("before")), _num(fb.get("after"))
        rows.append(f"<tr><td>file size</td><td class='num'>{_bytes(bv)}</td><td class='num' "
                    f"data-key='file_bytes.after'>{_bytes(av)}</td><td class='num'>"
                    f"{f'{av / bv:.3f}x' if bv and av else ''}</td></tr>")
    lat = r.get("latency_ms") or {}
    if lat.get("before") and lat.get("after"):
        rows.append(f"<tr><td>latency (1 thread)</td><td class='num'>{lat['before']:.3f} ms</td><td class='num'>"
                    f"{lat['after']:.3f} ms</td><td class='num'>{lat['before'] / lat['after']:.2f}x speed</td></tr>")
    sp = (r.get("speed") or {}).get("vs_input") or {}
    if sp:
        iv = sp.get("interval") or ["", ""]
        ms = sp.get("ms") or [None, None]
        on = (r.get("speed") or {}).get("on") or "this CPU"
        rows.append(f"<tr><td>speed vs input on {escape(on)} (interleaved, 1 thread)</td><td class='num'>"
                    f"{_f(ms[0], '{:.3f}')} ms"
                    f"</td><td class='num'>{_f(ms[1], '{:.3f}')} ms</td><td class='num' "
                    f"data-key='speed.vs_input.speedup'>{_f(sp.get('speedup'), '{:.3f}')}x "
                    f"<span class='small muted'>({_f(iv[0], '{:.2f}')}–{_f(iv[1], '{:.2f}')})</span></td></tr>")
    ops_b, ops_a = b.get("ops") or {}, a.get("ops") or {}
    changed = sorted((k for k in set(ops_b) | set(ops_a) if ops_b.get(k, 0) != ops_a.get(k, 0)),
                     key=lambda k: (-(ops_b.get(k, 0) + ops_a.get(k, 0)), k))
    for op in changed[:12]:
        rows.append(f"<tr class='small'><td>&nbsp;&nbsp;{escape(op)}</td><td class='num'>{ops_b.get(op, 0)}</td>"
                    f"<td class='num'>{ops_a.get(op, 0)}</td><td></td></tr>")
    return ("<section><h2>Before / after</h2><table><tr><th></th><th class='num'>before</th><th class='num'>after"
            "</th><th class='num'>ratio</th></tr>" + "".join(rows) + "</table></section>")


def _fidelity_table(r: dict) -> str:
    rows = []
    for label, key in (("test samples (the verdict)", "fidelity"), ("selection samples (the decisions)",
                                                                     "selection_fidelity")):
        f = r.get(key) or {}
        if not f:
            continue
        rows.append(f"<tr><td>{label}</td>" + _cell(f.get("cosine"), f"{key}.cosine", "{:.5f}")
                    + _cell(f.get("cosine_min"), f"{key}.cosine_min", "{:.5f}")
                    + _cell(f.get("sqnr"), f"{key}.sqnr", "{:.2f}")
                    + _cell(f.get("max_abs"), f"{key}.max_abs", "{:.2e}")
                    + _cell(f.get("top1"), f"{key}.top1", "{:.3f}") + "</tr>")
    if not rows:
        return ""
    return ("<section><h2>Fidelity against the input model</h2><table><tr><th></th><th class='num'>cosine mean</th>"
            "<th class='num'>cosine min</th><th class='num'>SQNR dB</th><th class='num'>max rel. error</th>"
            "<th class='num'>top-1 agreement</th></tr>" + "".join(rows) + "</table></section>")


_STATUS = {"applied": "ok", "backed off": "warn", "rolled back": "bad", "not applicable": "warn"}


def _timeline(r: dict) -> str:
    passes = r.get("passes") or []
    if not passes:
        return ""
    rows = []
    for i, p in enumerate(passes):
        f = p.get("fidelity") or {}
        attempts = p.get("attempts") or []
        tried = ""
        if len(attempts) > 1 or any(not a.get("ok", True) for a in attempts):
            items = []
            for a in attempts:
                fa = a.get("fidelity") or {}
                items.append(f"<li>{'kept' if a.get('ok') else 'refused'}: cosine {_f(fa.get('cosine'), '{:.5f}')}"
                             f"{' — ' + escape(str(a.get('reason'))) if a.get('reason') else ''}</li>")
            tried = f"<ul class='small'>{''.join(items)}</ul>"
        notes = []
        st = p.get("stats") or {}
        for k in ("guard_reason", "note"):
            if st.get(k) and str(st[k]) not in (p.get("reason") or ""):
                notes.append(escape(str(st[k])))
        cls = _STATUS.get(p.get("status"), "warn")
        rows.append(f"<tr><td class='num'>{i + 1}</td><td><b data-key='passes.{i}.name'>{escape(p.get('name', ''))}</b>"
                    f"</td><td><span class='badge {cls}' data-key='passes.{i}.status'>{escape(p.get('status', ''))}"
                    f"</span></td><td class='num'>{_f(p.get('wall_time_s'), '{:.1f}')} s</td>"
                    f"<td class='num'>{_f(p.get('nodes'), '{}')}</td><td class='num'>{_count(p.get('params'))}</td>"
                    + _cell(f.get("cosine"), f"passes.{i}.fidelity.cosine", "{:.5f}")
                    + f"<td>{escape(p.get('reason') or '')}{'<br>' if notes and p.get('reason') else ''}"
                    f"{'<br>'.join(notes)}{tried}</td></tr>")
    chart = bars([(p.get("name", ""), p.get("wall_time_s")) for p in passes], fmt=lambda v: f"{v:.1f} s",
                 title="wall time per pass", label_width=160)
    return ("<section><h2>Passes, in order: decisions and reasons</h2><table><tr><th class='num'>#</th><th>pass</th>"
            "<th>status</th><th class='num'>time</th><th class='num'>nodes</th><th class='num'>params</th>"
            "<th class='num'>cosine (selection)</th><th>reason</th></tr>" + "".join(rows) + "</table>"
            "<h3>Time per pass</h3>" + chart + _phases(r) + "</section>")


def _phases(r: dict) -> str:
    """The run's wall time by phase (the report's ``timings_s``): a line of figures and their bars."""
    t = r.get("timings_s") or {}
    phases = phase_times(t)
    if not phases:
        return ""
    figures = " · ".join(f"{label} <span data-key='timings_s.{k}'>{_f(v, '{:.2f}')}</span> s"
                         for k, label, v in phases + ([("total", "total", t["total"])] if "total" in t else []))
    chart = bars([(label, v) for _, label, v in phases], fmt=lambda v: f"{v:.2f} s", title="wall time per phase",
                 label_width=160)
    return f"<h3>Time per phase</h3><p class='small'>{figures}</p>" + chart


def _layer_charts(r: dict) -> str:
    out = []
    for p in r.get("passes") or []:
        st = p.get("stats") or {}
        sens = st.get("sensitivity")
        if isinstance(sens, dict) and sens:
            out.append(f"<h3>{escape(p['name'])}: noise-to-signal ratio of each unit quantized alone "
                       f"(largest first, log scale)</h3>"
                       + bars(sorted(sens.items(), key=lambda kv: -(kv[1] or 0))[:30], fmt=lambda v: f"{v:.2e}",
                              log=True))
        nodes = st.get("nodes")
        if isinstance(nodes, dict) and nodes:
            counts: dict = {}
            for why in nodes.values():
                k = "folded into a unit's output range" if str(why).startswith("folded into") else \
                    str(why).split(" (")[0]
                counts[k] = counts.get(k, 0) + 1
            out.append(f"<h3>{escape(p['name'])}: decisions per node</h3>"
                       + bars(sorted(counts.items(), key=lambda kv: -kv[1]), fmt=lambda v: f"{v:.0f}",
                              color="#7d8fb3", label_width=420))
        groups = st.get("per_group")
        if isinstance(groups, list) and groups:
            rows = [(", ".join(g.get("producers", [])[:1]), g.get("removed_units", 0) / max(g.get("units", 1), 1))
                    for g in groups if isinstance(g, dict)]
            out.append(f"<h3>{escape(p['name'])}: fraction of each channel group removed</h3>"
                       + bars(rows, fmt=lambda v: f"{v:.0%}", color="#8e6fb3"))
        search = st.get("fidelity_search")
        if isinstance(search, list) and len(search) > 1:
            pts = [(f"keep_float={s.get('keep_float')}", s.get("cosine")) for s in search]
            out.append(f"<h3>{escape(p['name'])}: fidelity search (cosine per step)</h3>"
                       + line(pts, "cosine", fmt=lambda v: f"{v:.4f}"))
    if not out:
        return ""
    return "<section><h2>Per-layer decisions</h2>" + "".join(out) + "</section>"


def _allocation(r: dict) -> str:
    a = r.get("allocation") or {}
    trials = a.get("trials") or []
    if not trials:
        return ""
    metric = str(r.get("budget") or "cosine").split(">")[0].split("<")[0]
    pts = [{"x": (t.get("cost") or {}).get("weight_bytes", 0) / 2**20 if _num((t.get("cost") or {}).get(
        "weight_bytes")) is not None else None, "y": t.get(metric), "ok": t.get("budget_ok"),
        "chosen": is_chosen(t, a), "label": trial_label(t, " choices")} for t in trials]
    return ("<section><h2>Allocation: verified configurations</h2><p class='small muted'>"
            f"{escape(str(a.get('result', '')))}</p>"
            + scatter(pts, "weight bytes (MB)", metric) + "</section>")


def _target(r: dict) -> str:
    t = r.get("target_report") or {}
    cov = t.get("coverage") if isinstance(t.get("coverage"), dict) else t if "taken" in t else None
    if not t:
        return ""
    rows = [f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))[:300]}</td></tr>" for k, v in t.items()
            if not isinstance(v, (dict, list))]
    chart = ""
    if cov and _num(cov.get("taken")) is not None and _num(cov.get("nodes")):
        cpu_int = _num(cov.get("cpu_integer")) or 0
        rows_ = [(f"taken by {r.get('target')}", cov["taken"])]
        if cpu_int:
            rows_.append(("integer on the CPU EP (by design)", cpu_int))
        rows_.append(("left to the CPU", cov["nodes"] - cov["taken"] - cpu_int))
        chart = bars(rows_, fmt=lambda v: f"{v:.0f} nodes", label_width=260)
        reasons = cov.get("reasons") or {}
        if reasons:
            chart += bars(sorted(reasons.items(), key=lambda kv: -kv[1]), fmt=lambda v: f"{v:.0f}",
                          color="#b35f5f", label_width=420)
    return "<section><h2>Target placement</h2>" + chart + "<table>" + "".join(rows) + "</table></section>"


# ----------------------------------------------------------------------------------- explain


def explain_html(res: dict) -> str:
    """The HTML page of an explain result."""
    title = f"onnxshrink explain: {res.get('candidate', '')} against {res.get('original', '')}"
    b, a = res.get("before") or {}, res.get("after") or {}
    fid = ["<section><h2>Fidelity against the original</h2><table><tr><th></th><th class='num'>cosine mean</th>"
           "<th class='num'>cosine min</th><th class='num'>SQNR dB</th><th class='num'>channel-balanced SQNR dB</th>"
           "<th class='num'>top-1 agreement</th></tr>"]
    for label, key, f in (("candidate", "before", b), (f"with the recipe ({res.get('applied', '')})", "after", a)):
        if f:
            fid.append(f"<tr><td>{escape(label)}</td>" + _cell(f.get("cosine"), f"{key}.cosine", "{:.5f}")
                       + _cell(f.get("cosine_min"), f"{key}.cosine_min", "{:.5f}")
                       + _cell(f.get("sqnr"), f"{key}.sqnr", "{:.2f}")
                       + _cell(f.get("balanced_sqnr"), f"{key}.balanced_sqnr", "{:.2f}")
                       + _cell(f.get("top1"), f"{key}.top1", "{:.3f}")
                       + "</tr>")
    note = f"<p class='warn' data-key='apply_note'>{escape(res['apply_note'])}</p>" if res.get("apply_note") else ""
    fid.append(f"</table>{note}<p class='small muted'>on {res.get('samples')} samples, onnxruntime's optimizations "
               f"on (as deployed)</p></section>")
    rows = []
    for i, r in enumerate(res.get("ranking") or []):
        causes = r.get("causes") or []
        ctext = "".join(f"<div><b>{escape(c['cause'])}</b>: {escape(c['text'])}<br><span class='muted'>fix: "
                        f"{escape(c.get('fix_text', ''))}</span></div>" for c in causes)
        rows.append(f"<tr><td class='num'>{r.get('rank')}</td><td data-key='ranking.{i}.node'>{escape(r['node'])}</td>"
                    f"<td>{escape(r.get('op', ''))}</td>" + _cell(r.get("share"), f"ranking.{i}.share", "{:.1%}")
                    + _cell(r.get("jump"), f"ranking.{i}.jump", "{:.2e}")
                    + _cell(r.get("sqnr_db"), f"ranking.{i}.sqnr_db", "{:.1f}")
                    + _cell(r.get("cosine"), f"ranking.{i}.cosine", "{:.4f}") + f"<td class='small'>{ctext}</td></tr>")
    ranking = ("<section><h2>Culprits, ranked</h2><p class='small muted'>share: the output error (noise-to-signal "
               "ratio) with only this unit's change from the candidate, over the candidate's own (shares need not add "
               "to 100 %: errors of different layers interact); local jump: the error this tensor adds over its "
               "inputs'</p><table><tr><th class='num'>#</th><th>node</th><th>op</th><th class='num'>share</th>"
               "<th class='num'>local jump</th><th class='num'>SQNR dB</th><th class='num'>cosine</th>"
               "<th>causes and fixes</th></tr>" + "".join(rows[:40]) + "</table>")
    shares = [(r["node"], r["share"]) for r in res.get("ranking") or [] if r.get("share") is not None]
    if shares:
        ranking += "<h3>Share of the output error, each unit alone</h3>" + bars(shares, fmt=lambda v: f"{v:.0%}",
                                                                               color="#c0392b")
    ranking += "</section>"
    tensors = res.get("tensors") or []
    errors = ("<section><h2>Error of each matched tensor, in graph order</h2>"
              + line([(t["tensor"], t.get("sqnr_db") if _num(t.get("sqnr_db")) is not None
                       and math.isfinite(t["sqnr_db"]) else None) for t in tensors], "SQNR dB")
              + "</section>") if tensors else ""
    recipe = (f"<section><h2>Recipe</h2><pre>{escape(recipe_yaml(res['recipe']))}</pre><p class='small'>Replay: "
              f"<code>onnxshrink optimize {escape(str(res.get('original', 'ORIGINAL')))} OUT --recipe FILE</code>"
              f"</p></section>") if res.get("recipe") else ""
    head = (f"<h1>{escape(title)}</h1><p class='sub'>{escape(str(res.get('kind')))} candidate; "
            f"<span data-key='matched_tensors'>{res.get('matched_tensors')}</span> tensors matched; "
            f"{res.get('samples')} samples; output SQNR (channel-balanced) "
            f"{_f(res.get('output_sqnr_db'), '{:.1f}')} dB; "
            f"{_f(res.get('seconds'), '{:.1f}')} s</p>")
    return _page(title, head + "".join(fid) + ranking + errors + recipe)
