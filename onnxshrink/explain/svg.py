"""Inline SVG charts for the HTML reports (no scripts, no network): horizontal bars, a line over an
ordered sequence, and a scatter plot. Values are mapped linearly (or by log10 with ``log=True``) to
the plotting box; every label is escaped."""

from __future__ import annotations

__all__ = ["bars", "line", "scatter"]

import math
from html import escape

FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def bars(rows: list, fmt=lambda v: f"{v:.3g}", width: int = 720, log: bool = False, title: str = "",
         color: str = "#3b6ea8", label_width: int = 260) -> str:
    """Horizontal bars of ``rows`` = [(label, value)], largest scale at the right edge."""
    rows = [(str(k), _num(v)) for k, v in rows if _num(v) is not None and (not log or _num(v) > 0)]
    if not rows:
        return ""
    bar_h, gap = 16, 4
    h = len(rows) * (bar_h + gap) + 24
    plot_w = width - label_width - 70
    max_chars = max(12, int(label_width / 6.2))  # what fits at 11 px (names keep their distinctive end)
    vals = [math.log10(v) for _, v in rows] if log else [v for _, v in rows]
    lo = min(min(vals), 0.0) if not log else min(vals) - 0.5
    hi = max(max(vals), lo + 1e-12)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {h}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>']
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    for i, ((label, v), x) in enumerate(zip(rows, vals)):
        y = 4 + i * (bar_h + gap)
        w = max(1.0, plot_w * (x - lo) / (hi - lo)) if hi > lo else 1.0
        short = label if len(label) <= max_chars else "…" + label[-(max_chars - 1):]
        parts.append(f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">{escape(short)}</text>')
        parts.append(f'<rect x="{label_width}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{label_width + w + 4:.1f}" y="{y + 12}">{escape(fmt(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line(points: list, ylabel: str = "", width: int = 720, height: int = 170, fmt=lambda v: f"{v:.1f}") -> str:
    """A polyline over ``points`` = [(label, value)] in order (labels on hover), with min/max ticks."""
    pts = [(str(k), _num(v)) for k, v in points]
    vals = [v for _, v in pts if v is not None]
    if len(vals) < 2:
        return ""
    left, right, top, bottom = 56, 12, 12, 28
    pw, ph = width - left - right, height - top - bottom
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    n = len(pts)

    def xy(i, v):
        return left + pw * i / max(n - 1, 1), top + ph * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{escape(fmt(hi))}</text>',
             f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{escape(fmt(lo))}</text>',
             f'<text x="{left}" y="{height - 8}">{escape(ylabel)} (graph order, left to right)</text>']
    coords = [xy(i, v) for i, (_, v) in enumerate(pts) if v is not None]
    parts.append('<polyline fill="none" stroke="#3b6ea8" stroke-width="1.5" points="'
                 + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
    for i, (label, v) in enumerate(pts):
        if v is None:
            continue
        x, y = xy(i, v)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#3b6ea8"><title>{escape(label)}: '
                     f'{escape(fmt(v))}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def scatter(points: list, xlabel: str, ylabel: str, width: int = 720, height: int = 300, hline=None) -> str:
    """Points ``{"x", "y", "label", "ok", "chosen"}``: blue when ok, red crosses when not, the chosen
    one ringed; ``hline`` a dashed threshold."""
    pts = [p for p in points if _num(p.get("x")) is not None and _num(p.get("y")) is not None]
    if not pts:
        return ""
    left, right, top, bottom = 64, 16, 12, 36
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts] + ([hline] if _num(hline) is not None else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1e-3, y1 + 1e-3

    def xy(x, y):
        return left + pw * (x - x0) / (x1 - x0), top + ph * (1 - (y - y0) / (y1 - y0))

    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
             f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>',
             f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
             f'text-anchor="middle">{escape(ylabel)}</text>',
             f'<text x="{left}" y="{height - 20}">{x0:.3g}</text>',
             f'<text x="{left + pw}" y="{height - 20}" text-anchor="end">{x1:.3g}</text>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.4g}</text>',
             f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{y0:.4g}</text>']
    if _num(hline) is not None:
        _, hy = xy(x0, hline)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{hy:.1f}" y2="{hy:.1f}" stroke="#888" '
                     f'stroke-dasharray="4 3"/>')
    for p in pts:
        x, y = xy(p["x"], p["y"])
        tip = f"<title>{escape(str(p.get('label', '')))}</title>"
        if p.get("ok", True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#3b6ea8">{tip}</circle>')
        else:
            parts.append(f'<path d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}'
                         f'L{x + 4:.1f},{y - 4:.1f}" stroke="#c0392b" stroke-width="2">{tip}</path>')
        if p.get("chosen"):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#27ae60" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)
