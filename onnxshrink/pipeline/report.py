"""Report records (per pass and overall), JSON and terminal-table rendering, and the allocation plot
(progress bars live in ``onnxshrink.progress``)."""

from __future__ import annotations

__all__ = ["PHASES", "PhaseClock", "phase_times", "PassRecord", "Report", "format_bytes", "format_count",
           "plot_allocation"]

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

APPLIED, BACKED_OFF, ROLLED_BACK, NOT_APPLICABLE = "applied", "backed off", "rolled back", "not applicable"


def format_count(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def format_bytes(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class PassRecord:
    """What one pass did: status, why, time, costs after it, fidelity after it, pass statistics."""

    name: str
    status: str
    reason: str = ""
    options: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    nodes: int | None = None
    params: int | None = None
    weight_bytes: int | None = None
    macs: int | None = None
    fidelity: dict = field(default_factory=dict)
    attempts: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


# the phases of a run whose wall time the report keeps (``Report.timings_s``): the input (loading, the
# checker, sample roles, cost counts, a target's preparation), the input's outputs on the selection and
# test samples (every later check's reference), the passes (each also in its record), with --target the
# emission of the passes' result (on openvino its check and timing on the EP), the speed contract's
# timing and roll-backs (with the emissions a roll-back makes), the verdict (the result's outputs on the
# test samples and its counts) and, with --latency, the latency figures
PHASES = ("input", "reference_outputs", "passes", "emission", "speed_contract", "verdict", "latency")


def phase_times(timings: dict) -> list[tuple[str, str, float]]:
    """(phase, its label, seconds) of each phase ``timings`` (``Report.timings_s``) holds, in ``PHASES``
    order (``total`` is not a phase): what the terminal table and the HTML page show."""
    return [(k, k.replace("_", " "), timings[k]) for k in PHASES if k in timings]


def trial_label(trial: dict, noun: str = "") -> str:
    """An allocation trial as the report shows it: its configuration (the greedy prefix's length n, or
    an extra configuration's label) followed by ``noun``, and the greedy order it belongs to when the
    search took a second one (``allocate.Trials.switch_order``)."""
    return f"{trial.get('n')}{noun}" + (f" ({trial['order']} order)" if trial.get("order") else "")


def is_chosen(trial: dict, allocation: dict) -> bool:
    """Whether ``trial`` (an entry of ``allocation["trials"]``) is the configuration the allocation
    chose (a prefix length names one configuration per greedy order)."""
    return (allocation.get("chosen_n") is not None and trial.get("n") == allocation.get("chosen_n")
            and trial.get("order") == allocation.get("chosen_order"))


@dataclass
class Report:
    input: str = ""
    output: str = ""
    budget: str | None = None
    target: str | None = None
    data: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    passes: list = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)  # on the test samples (the budget verdict)
    selection_fidelity: dict = field(default_factory=dict)  # on the selection samples the decisions used
    samples: dict = field(default_factory=dict)  # how many samples each role had
    speed: dict = field(default_factory=dict)  # the speed contract: the result timed against the input
    budget_met: bool | None = None
    budget_source: str = "given"  # given, default (no --budget), none (--budget none)
    fidelity_status: str = "checked"  # checked, or unchecked (--budget none / no data for lossy passes)
    file_bytes: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    target_report: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    # where the run's wall time went, in seconds (``PHASES``, in order, and ``total``)
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def write_json(self, path) -> None:
        from pathlib import Path
        Path(path).write_text(self.to_json() + "\n")

    def render(self, console=None) -> None:
        """Before/after table and a per-pass table on the terminal."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console(stderr=False)
        t = Table(title="onnxshrink: before / after", title_justify="left")
        t.add_column("")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_column("ratio", justify="right")
        b, a = self.before, self.after

        def row(label, key, fmt):
            bv, av = b.get(key), a.get(key)
            ratio = f"{av / bv:.3f}x" if isinstance(bv, (int, float)) and isinstance(av, (int, float)) and bv else ""
            t.add_row(label, fmt(bv), fmt(av), ratio)

        row("nodes", "nodes", lambda v: "?" if v is None else str(v))
        row("parameters", "params", format_count)
        row("weight bytes", "weight_bytes", format_bytes)
        row("MACs", "macs", format_count)
        if a.get("integer_macs") and a.get("macs"):  # the share onnxruntime runs in integer kernels
            share = [f"{v['integer_macs'] / v['macs']:.0%}" if v.get("macs") and v.get("integer_macs") is not None
                     else "" for v in (b, a)]
            t.add_row("  in integer kernels", *share, "")
        if self.file_bytes:
            bv, av = self.file_bytes.get("before"), self.file_bytes.get("after")
            t.add_row("file size", format_bytes(bv), format_bytes(av), f"{av / bv:.3f}x" if bv and av else "")
        if self.latency_ms:
            bv, av = self.latency_ms.get("before"), self.latency_ms.get("after")
            t.add_row("latency (1 thread)", f"{bv:.2f} ms" if bv else "?", f"{av:.2f} ms" if av else "?",
                      f"{bv / av:.2f}x speed" if bv and av else "")
        ops_b, ops_a = b.get("ops", {}), a.get("ops", {})
        # only ops whose count changed, largest first (ties by name, so the table is stable)
        changed = sorted((k for k in set(ops_b) | set(ops_a) if ops_b.get(k, 0) != ops_a.get(k, 0)),
                         key=lambda k: (-(ops_b.get(k, 0) + ops_a.get(k, 0)), k))
        for op in changed[:12]:
            t.add_row(f"  {op}", str(ops_b.get(op, 0)), str(ops_a.get(op, 0)), "")
        console.print(t)

        p = Table(title="passes", title_justify="left")
        for c in ("pass", "status", "time", "nodes", "params", "MACs", "cosine", "sqnr dB", "note"):
            p.add_column(c, justify="left" if c in ("pass", "status", "note") else "right")
        for r in self.passes:
            r = r if isinstance(r, dict) else asdict(r)
            f = r.get("fidelity") or {}
            p.add_row(r["name"], r["status"], f"{r['wall_time_s']:.1f}s", str(r.get("nodes") or ""),
                      format_count(r.get("params")), format_count(r.get("macs")),
                      _fmt(f.get("cosine"), "{:.5f}"), _fmt(f.get("sqnr"), "{:.1f}"), r.get("reason", ""))
        console.print(p)
        if self.allocation:
            self._render_allocation(console)
        if self.fidelity:
            f = self.fidelity
            verdict = ("PASSED" if self.budget_met else "FAILED") if self.budget else "measured"
            if self.budget_source == "default":
                verdict += " (the default budget: --budget to change it, --budget none to skip the check)"
            elif self.fidelity_status == "unchecked":
                verdict = "unchecked (--budget none)"
            where = self.data.get("test", "")
            console.print(f"fidelity ({where}): cosine mean {_fmt(f.get('cosine'), '{:.5f}')} "
                          f"min {_fmt(f.get('cosine_min'), '{:.5f}')}, sqnr {_fmt(f.get('sqnr'), '{:.1f}')} dB, "
                          f"max rel err {_fmt(f.get('max_abs'), '{:.2e}')}, top1 {_fmt(f.get('top1'), '{:.3f}')}"
                          + (f"; budget {self.budget}: {verdict}" if self.budget else f"; {verdict}"))
        self._render_target(console, Table)
        vs_input = (self.speed or {}).get("vs_input")
        if vs_input:
            undone = ", ".join(n for step in self.speed.get("rolled_back", []) for n in step["passes"])
            on = f"on the {self.speed['on']}" if self.speed.get("on") else "on this CPU"
            console.print(f"speed vs the input {on}: {vs_input['speedup']:.2f}x (95 % interval "
                          f"{vs_input['interval'][0]:.2f}-{vs_input['interval'][1]:.2f}x), {self.speed['verdict']}; "
                          f"contract {self.speed['contract']}" + (f"; rolled back: {undone}" if undone else ""))
        if self.timings_s:
            phases = ", ".join(f"{label} {_seconds(v)}" for _, label, v in phase_times(self.timings_s))
            console.print(f"time: {phases} (total {_seconds(self.timings_s.get('total', 0.0))})")
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")


    def _render_target(self, console, table_type) -> None:
        """Where the target's EP runs the output (static analysis), the activation precision per region
        (QNN) and its device check."""
        tr = self.target_report or {}
        cov = tr.get("coverage") or {}
        if cov.get("nodes"):
            heavy = cov.get("heavy_ops") or {}
            cpu = (f" (+{heavy['cpu_integer']} integer on the CPU EP by design)" if heavy.get("cpu_integer") else "")
            if cov.get("accepted"):
                verdict = "accepted"
            elif (tr.get("qnn_htp") or {}).get("accepted"):
                verdict = (f"{cov.get('not_taken')} node(s) flagged ({', '.join(cov.get('reasons') or {})}), "
                           f"which the QNN HTP run below takes: its verdict stands")
            else:
                verdict = "rejected: " + ((cov.get("rejected_because") or [""])[0] or cov.get("accepted_means", ""))
            console.print(f"placement on {tr.get('provider', tr.get('target', ''))} (static analysis): "
                          f"{cov.get('taken')}/{cov['nodes']} nodes, "
                          f"{heavy.get('taken', '?')}/{heavy.get('total', '?')} Conv/ConvTranspose/MatMul/Gemm{cpu}, "
                          f"{cov.get('partitions', '?')} partitions; {verdict}")
        regions = tr.get("precision_regions")
        if regions:
            t = table_type(title=f"activation precision per region ({tr.get('target', '')})", title_justify="left")
            for c in ("precision", "units", "weighted", "why"):
                t.add_column(c, justify="right" if c in ("units", "weighted") else "left")
            for r in regions:
                t.add_row(r["precision"], str(r["units"]), str(r["weighted"]), r["why"])
            console.print(t)
        htp = tr.get("qnn_htp") or {}
        if htp.get("available"):
            po, f = htp.get("provider_options") or {}, htp.get("fidelity") or {}
            arch = f"HTP v{po['htp_arch']}" if po.get("htp_arch") else "HTP"
            where = "every node on HTP (CPU fallback disabled)" if htp.get("accepted") else \
                f"rejected: {htp.get('error', '?')}"
            console.print(f"QNN {arch} simulator (soc_model {po.get('soc_model', '?')}, fp16 "
                          f"{'on' if po.get('enable_htp_fp16_precision') == '1' else 'off'}): {where}"
                          + (f"; cosine vs fp32 mean {_fmt(f.get('cosine'), '{:.5f}')} min "
                             f"{_fmt(f.get('cosine_min'), '{:.5f}')} ({htp.get('samples', '?')} samples)" if f else ""))

    def _render_allocation(self, console) -> None:
        """The allocation's verified configurations (cost, metric, verdicts) and its result."""
        from rich.table import Table
        a = self.allocation
        sens = a.get("sensitivity", {})
        kind = a.get("target", {}).get("cost", "")
        toward = (a.get("target", {}).get("describe")
                  or f"{kind} <= {a.get('target', {}).get('fraction', 0):g} of the input's")
        console.print(f"allocation toward {toward}: "
                      f"{sens.get('candidates', 0)} (unit, strength) candidates, {sens.get('measured', 0)} measured, "
                      f"{sens.get('cached', 0)} from the cache ({sens.get('seconds', 0):.1f} s, executor "
                      f"{sens.get('executor', '?')})")
        metric = self.budget.split(">")[0].split("<")[0] if self.budget else "cosine"
        t = Table(title="verified configurations", title_justify="left")
        for c in ("choices", "weight bytes", "MACs", "latency", metric, "budget", "target"):
            t.add_column(c, justify="right")
        for tr in a.get("trials", []):
            c = tr.get("cost", {})
            t.add_row(trial_label(tr), format_bytes(c.get("weight_bytes")), format_count(c.get("macs")),
                      _fmt(c.get("latency_ms"), "{:.2f} ms"), _fmt(tr.get(metric), "{:.5f}"),
                      "ok" if tr.get("budget_ok") else "-" if tr.get("budget_ok") is None else "broken",
                      "met" if tr.get("target_met") else "missed")
        console.print(t)
        console.print(f"allocation: {a.get('result', '')}")


def plot_allocation(allocation: dict, path, budget=None):
    """PNG of the budget metric vs weight bytes and vs latency for every verified configuration,
    the chosen one marked (needs matplotlib: the ``plot`` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    metric = budget.metric if budget is not None else "cosine"
    trials = allocation.get("trials", [])
    base = allocation.get("target", {})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "weight_bytes", "weight bytes (MB)"),
                           (axes[1], "latency_ms", "latency (ms, 1 thread)")):
        xs = [t["cost"].get(key) for t in trials]
        ys = [t.get(metric) for t in trials]
        pts = [(x / (2 ** 20) if key == "weight_bytes" else x, y, t) for x, y, t in zip(xs, ys, trials)
               if x is not None and y is not None]
        base_c = (allocation.get("base_cost") or {}).get(key)
        singles = [((base_c - r["saving"][key]) / (2 ** 20) if key == "weight_bytes" else base_c - r["saving"][key],
                    r.get("metric")) for r in allocation.get("table", [])
                   if base_c is not None and (r.get("saving") or {}).get(key) is not None
                   and isinstance(r.get("metric"), (int, float))]
        if singles:
            ax.scatter(*zip(*singles), c="lightgray", s=10, label="one unit alone (sensitivity)")
        ok = [(x, y) for x, y, t in pts if t["budget_ok"]]
        bad = [(x, y) for x, y, t in pts if not t["budget_ok"]]
        if ok:
            ax.scatter(*zip(*ok), c="tab:blue", label="budget kept")
        if bad:
            ax.scatter(*zip(*bad), c="tab:red", marker="x", label="budget broken")
        for x, y, t in pts:
            ax.annotate(trial_label(t), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if is_chosen(t, allocation):
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:green", linewidths=2, label="chosen")
        if budget is not None:
            try:
                thr = budget.threshold(allocation.get("baseline_scores"))
                ax.axhline(thr, color="gray", ls="--", lw=1, label=f"budget {budget}")
            except Exception:
                pass
        size_t = [t for t in base.get("targets", [base]) if t.get("cost") == "weight_bytes" and t.get("absolute")]
        if key == "weight_bytes" and size_t:
            ax.axvline(size_t[0]["absolute"] / 2 ** 20, color="tab:green", ls=":", lw=1, label="size target")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    toward = base.get("describe") or f"{base.get('cost')} <= {base.get('fraction', 0):g} of the input's"
    fig.suptitle(f"configurations verified (numbers: greedy choices taken); target {toward}", fontsize=9)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


class PhaseClock:
    """Adds the wall time since the last lap to ``report.timings_s[phase]`` (a phase may come back: the
    input's checks before and after its reference outputs) and keeps ``total`` current, so a report
    written after a refusal (exit 4) has its times too."""

    def __init__(self, report: Report):
        self.report = report
        self.start = self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        t = self.report.timings_s
        t[phase] = round(t.get(phase, 0.0) + now - self.last, 3)
        t.pop("total", None)  # last in the JSON, after the phases
        t["total"] = round(now - self.start, 3)
        self.last = now


def _seconds(v: float) -> str:
    return f"{v:.2f} s" if v < 1 else f"{v:.1f} s"


def _fmt(v, spec):
    if v is None:
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return spec.format(v)


def _clean(o: Any):
    """JSON-safe: inf/nan as strings, numpy scalars as Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        try:
            o = o.item()
        except Exception:
            pass
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    return o
