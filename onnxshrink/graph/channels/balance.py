"""Balanced selection: the largest valid removal among the wanted units when grouped convs require
equal removals per group.

Integer program over x_u in {0, 1} (u in wanted, ranked by importance, rank 1 the least):
    max  sum_u x_u (1 + eps * rank_u)      eps < 1 / n
    s.t. sum_u (n_s(u) - n_0(u)) x_u = 0   every balance constraint, every slice s > 0
         sum_{u in T} x_u <= |T| - 1       every tensor T whose units are all wanted
         sum_u x_u <= limit
solved with scipy's HiGHS MILP; without scipy (or when it fails) a monotone repair gives back
the most important unit of the fullest slice until every constraint holds.
"""

from __future__ import annotations

__all__ = ["balanced_selection", "balanced_milp", "balanced_repair", "is_balanced"]

import numpy as np

from onnxshrink.graph.channels.analysis import ChannelAnalysis


def balanced_selection(a: ChannelAnalysis, wanted, scores: dict | None = None, limit: int | None = None) -> set:
    """The largest subset of the units ``wanted`` (at most ``limit``; lowest ``scores`` first
    among equally large ones) that satisfies every balance constraint and leaves every tensor
    at least one channel. Units outside ``wanted`` stay.

    Integer program over x_u in {0, 1} (u in wanted):
        max  sum_u x_u (1 + eps * rank_u)      rank: 1 for the least important, eps < 1 / n
        s.t. sum_u (n_s(u) - n_0(u)) x_u = 0   every balance constraint, every slice s > 0
             sum_{u in T} x_u <= |T| - 1       every tensor T whose units are all wanted
             sum_u x_u <= limit
    solved with scipy's HiGHS MILP; without scipy (or when it fails) a monotone repair gives
    back the most important unit of the fullest slice until every constraint holds."""
    wanted = {int(u) for u in wanted}
    scores = scores or {}
    rows = [r for r in a.balance_rows() if any(u in wanted for sl in r for u in sl)]
    order = sorted(wanted, key=lambda u: (scores.get(u, 0.0), u))
    if not rows:
        return set(order[:limit] if limit is not None else order)
    if limit is not None and limit <= 0:
        return set()
    rest = set()
    if limit is None:  # units under no constraint stay wanted (their tensors are checked by the caller too)
        bound = {u for r in rows for sl in r for u in sl}
        rest = {u for u in order if u not in bound}
        order = [u for u in order if u in bound]
    try:
        return rest | balanced_milp(a, order, rows, limit)
    except Exception:
        return rest | balanced_repair(order, rows, limit)


def balanced_milp(a: ChannelAnalysis, order: list, rows: list, limit: int | None) -> set:
    """The integer program of ``balanced_selection`` over the units ``order`` (least important
    first) and the balance rows ``rows`` (``ChannelAnalysis.balance_rows``), solved by scipy's
    HiGHS MILP (30 s limit); raises when scipy is missing or the result is not balanced."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix
    n = len(order)
    col = {u: i for i, u in enumerate(order)}
    ri, ci, vi, lo, hi = [], [], [], [], []
    seen = set()

    def add(coefs: dict, l: float, h: float):
        coefs = {k: v for k, v in coefs.items() if v}
        if not coefs:
            return
        key = (tuple(sorted(coefs.items())), l, h)
        if key in seen:
            return
        seen.add(key)
        r = len(lo)
        for k, v in coefs.items():
            ri.append(r)
            ci.append(k)
            vi.append(v)
        lo.append(l)
        hi.append(h)

    for per in rows:
        base = {col[u]: -c for u, c in per[0].items() if u in col}
        for sl in per[1:]:
            coefs = dict(base)
            for u, c in sl.items():
                if u in col:
                    coefs[col[u]] = coefs.get(col[u], 0) + c
            add(coefs, 0, 0)
    for lay in a.layouts.values():
        us = np.unique(a.unit_of(lay.ids)).tolist()
        if all(u in col for u in us):
            add({col[u]: 1 for u in us}, -np.inf, len(us) - 1)
    if limit is not None and limit < n:
        add({i: 1 for i in range(n)}, -np.inf, limit)
    eps = 0.5 / (n + 1)
    c = -(1.0 + eps * (n - np.arange(n)) / n)
    cons = []
    if lo:
        A = coo_matrix((vi, (ri, ci)), shape=(len(lo), n)).tocsr()
        cons = [LinearConstraint(A, np.array(lo, float), np.array(hi, float))]
    res = milp(c, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": 30.0, "mip_rel_gap": 0.0})
    if res.x is None:
        raise RuntimeError(res.message)
    sel = {order[i] for i in np.nonzero(res.x > 0.5)[0]}
    if not is_balanced(rows, sel):
        raise RuntimeError("MILP result violates a balance constraint")
    return sel


def is_balanced(rows: list, sel: set) -> bool:
    """True when the units ``sel`` remove equally many positions from every slice of every row."""
    for per in rows:
        counts = {sum(c for u, c in sl.items() if u in sel) for sl in per}
        if len(counts) > 1:
            return False
    return True


def balanced_repair(order: list, rows: list, limit: int | None) -> set:
    """The fallback of ``balanced_selection``: start from the first ``limit`` units of ``order``
    (least important first) and give back the most important unit of the fullest slice until
    every row is balanced (monotone: only removes, so it terminates)."""
    sel = set(order[:limit] if limit is not None else order)
    rank = {u: i for i, u in enumerate(order)}
    changed = True
    while changed:
        changed = False
        for per in rows:
            counts = [sum(c for u, c in sl.items() if u in sel) for sl in per]
            m = min(counts)
            for sl, k in zip(per, counts):
                while k > m:
                    u = max((u for u in sl if u in sel), key=lambda u: rank[u])
                    sel.discard(u)
                    k -= sl[u]
                    changed = True
    return sel
