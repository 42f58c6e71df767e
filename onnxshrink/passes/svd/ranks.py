"""svd's rank choice across layers: which form of a layer pays, and the global allocations.

Rank choice (``rule``):
  * ``energy``: per layer, the smallest k keeping ``energy`` of the (whitened) spectrum.
  * ``params``: globally, keep ``ratio`` of the candidate layers' params (or MACs with
    ``budget_on=macs``), spending it on the singular values with the largest relative output
    energy per unit of cost, ``(s_i^2 / sum_j s_j^2) / cost_per_rank``.
  * ``error``: globally, drop the singular values of least relative output error per unit of
    cost saved until the predicted relative errors, summed over layers, reach ``max_error``.
  * ``fit``: bisect ``max_error`` of the ``error`` rule with ``ctx.evaluate`` so the model keeps
    the manager's budget (needs validation data and a budget; otherwise acts as ``error``).
Ranks can be rounded up to a multiple (``rank_multiple=8``). ``weaker()`` keeps more energy,
a larger ratio or a smaller error. With ``fold=true`` (default) the ``fold`` pass runs first, so
factor pairs left by an earlier run whose rank no longer pays are merged and re-factored.
"""

from __future__ import annotations

__all__ = ["cost_columns", "form_cost", "original_cost", "pays", "pick_form_energy", "pick_form_global",
           "allocate_error", "allocate_budget"]

import heapq

import numpy as np

from onnxshrink.passes.svd.factorization import energy_rank, round_rank


def cost_columns(o):
    return "macs" if o.budget_on == "macs" else "params"


def form_cost(layer, form, k, what):
    return k * (form.params_per_rank if what == "params" else form.macs_per_rank)


def original_cost(layer, what):
    if what == "params":
        return float(layer.params)
    return float(layer.rows * layer.params) if layer.rows is not None else float(layer.params)


def pays(layer, form, k) -> bool:
    return (k * form.params_per_rank < layer.params
            and form_cost(layer, form, k, "macs") < original_cost(layer, "macs"))


def pick_form_energy(layer, energy, multiple):
    """Per layer: the paying form with the fewest MACs at the rank keeping ``energy``."""
    best = None
    for f in layer.forms:
        s = f.svd[2]
        k = round_rank(energy_rank(s, energy), multiple, len(s))
        if not pays(layer, f, k):
            continue
        key = (form_cost(layer, f, k, "macs"), k * f.params_per_rank)
        if best is None or key < best[0]:
            best = (key, f, k)
    return (best[1], best[2]) if best else (None, 0)


def pick_form_global(layer):
    """For global allocation one form per layer: the lowest predicted error at half the cost."""
    best = None
    for f in layer.forms:
        s = f.svd[2]
        e = s.astype(np.float64) ** 2
        tot = max(float(e.sum()), 1e-300)
        k = max(1, int(0.5 * layer.params / f.params_per_rank))
        k = min(k, len(s))
        err = float(e[k:].sum()) / tot
        if best is None or err < best[0]:
            best = (err, f)
    return best[1]


def allocate_error(layers, max_error, what, multiple, weights=None):
    """Drop the cheapest singular values (relative error per cost saved) until the summed
    predicted relative error reaches max_error; layers whose rank does not pay drop out and the
    allocation is redone without them. ``weights`` ({id(layer): w}) scale each layer's relative
    error into its measured effect on the model's output (sensitivity)."""
    weights = weights or {}
    active = list(layers)
    ranks = {}
    for _ in range(4):
        items = []
        for L in active:
            s = L.form.svd[2]
            e = s.astype(np.float64) ** 2
            tot = max(float(e.sum()), 1e-300) / weights.get(id(L), 1.0)
            cpr = form_cost(L, L.form, 1, what)
            for i in range(len(s) - 1, 0, -1):  # never below rank 1
                items.append((e[i] / tot / cpr, e[i] / tot, id(L), i))
        items.sort()
        spent = 0.0
        k = {id(L): len(L.form.svd[2]) for L in active}
        for ratio, err, lid, i in items:
            if spent + err > max_error:
                break
            spent += err
            k[lid] = min(k[lid], i)
        new_active = []
        for L in active:
            kk = round_rank(k[id(L)], multiple, len(L.form.svd[2]))
            ranks[id(L)] = kk
            if pays(L, L.form, kk):
                new_active.append(L)
        if len(new_active) == len(active):
            break
        active = new_active
    return {id(L): ranks[id(L)] for L in active}


def allocate_budget(layers, ratio, what, multiple):
    """Spend ``ratio`` of the layers' original cost on singular values in order of relative
    output energy per unit cost (a layer whose factors would not pay keeps its original cost)."""
    total = sum(original_cost(L, what) for L in layers)
    budget = ratio * total
    heap = []
    k = {}
    for L in layers:
        s = L.form.svd[2]
        e = s.astype(np.float64) ** 2
        tot = max(float(e.sum()), 1e-300)
        k[id(L)] = 0
        cpr = form_cost(L, L.form, 1, what)
        heapq.heappush(heap, (-(e[0] / tot) / cpr, id(L), 0, L))
    spent = 0.0
    chosen = {}
    while heap:
        neg, lid, i, L = heapq.heappop(heap)
        cpr = form_cost(L, L.form, 1, what)
        if spent + cpr > budget:
            break
        spent += cpr
        k[lid] = i + 1
        s = L.form.svd[2]
        if i + 1 < len(s):
            e = s.astype(np.float64) ** 2
            heapq.heappush(heap, (-(e[i + 1] / max(float(e.sum()), 1e-300)) / cpr, lid, i + 1, L))
    for L in layers:
        kk = round_rank(max(k[id(L)], 1), multiple, len(L.form.svd[2]))
        if pays(L, L.form, kk):
            chosen[id(L)] = kk
    return chosen


# ------------------------------------------------------------------------------- emission
