"""The terminal rendering of an explain result: the ranked culprits, the recipe, before / after."""

from __future__ import annotations

__all__ = ["render_explain"]


def render_explain(res: dict, recipe_text: str, c) -> None:
    from rich.markup import escape
    from rich.table import Table

    def f(v, spec):
        return "" if v is None else escape(spec.format(v))

    c.print(f"[bold]explain[/bold] {res['candidate']} against {res['original']}: {res['kind']}, "
            f"{res['matched_tensors']} tensors matched, {res['samples']} samples, "
            f"output SQNR (channel-balanced) {f(res['output_sqnr_db'], '{:.1f}')} dB ({res['seconds']:.1f} s)")
    t = Table(title="culprits (share: output error with this unit's change alone / the candidate's)",
              title_justify="left")
    for col in ("#", "node", "op", "share", "local jump", "SQNR dB", "cosine", "cause", "fix"):
        t.add_column(col, justify="right" if col in ("#", "share", "local jump", "SQNR dB", "cosine") else "left",
                     overflow="fold")
    for r in res["ranking"][:12]:
        cause = r["causes"][0] if r["causes"] else {}
        t.add_row(str(r["rank"]), escape(r["node"]), r["op"], f(r["share"], "{:.0%}"), f(r["jump"], "{:.2e}"),
                  f(r["sqnr_db"], "{:.1f}"), f(r["cosine"], "{:.4f}"), escape(cause.get("text", "")),
                  escape(cause.get("fix_text", "")))
    c.print(t)
    c.print("recipe:\n" + recipe_text, markup=False, highlight=False)
    b = res.get("before") or {}
    line = (f"candidate: cosine {f(b.get('cosine'), '{:.5f}')} (min {f(b.get('cosine_min'), '{:.5f}')}), "
            f"channel-balanced SQNR {f(b.get('balanced_sqnr'), '{:.1f}')} dB")
    if res.get("after"):
        a = res["after"]
        line += (f" -> with the recipe ({res['applied']}): cosine {f(a.get('cosine'), '{:.5f}')} "
                 f"(min {f(a.get('cosine_min'), '{:.5f}')}), channel-balanced SQNR "
                 f"{f(a.get('balanced_sqnr'), '{:.1f}')} dB")
    c.print(line + f", on {res['samples']} samples")
    if res.get("apply_note"):
        c.print(res["apply_note"], markup=False, highlight=False)
