"""Mixed 8/16-bit activation regions for a target that takes both (QNN HTP): which units run at 16 bits.

A unit's error at 8 bits comes from the rounding of its input activation and of its weights; its
noise-to-signal ratio alone (``unit_analysis.py``, NSR) ranks the units. Running a unit at 16 bits helps
only when its input tensor is quantized at 16 bits, i.e. when the unit producing that tensor runs at 16
bits too: ``wide_region`` takes the sensitive units (seeds) and the units producing their inputs
(through passthrough units, whose outputs keep their input's grid), then every other unit (an Add, a
Concat, a Sigmoid) whose inputs all come from 16-bit units: a region does not drop to 8 bits and back
between two of its convolutions (measured on PP-OCRv4 det: with every weighted unit at 16 bits and its
elementwise units at 8, the plan missed the floor that whole-model 16 bits held). The guard promotes the 1, 2, 4, ...
most sensitive seeds until the plan holds the fidelity floor (``guard.py``); the emission converts at
each border (``qdq.py``: the DQ -> Q pair the QNN EP maps to its Convert op).

``describe_regions`` reports the connected groups of units of one precision (two units are connected
when one reads the other's output, directly or through nodes that are no unit, such as float fp16 nodes
on HTP v73) with why each has its precision: a 16-bit region holds seeds whose
NSR at 8 bits is given, or units that produce a seed's input; the 8-bit regions hold at 8 bits.
"""

from __future__ import annotations

__all__ = ["wide_region", "describe_regions"]



def wide_region(seeds: list, units: dict) -> set:
    """The units to run wide so that every seed reads 16-bit inputs: the seeds and the units producing
    their inputs (through passthrough units)."""
    producer = {}
    for u in units.values():
        producer[u.output] = u
    wide = set()
    for s in seeds:
        if s not in units:
            continue
        wide.add(s)
        for t in units[s].inputs:
            p = producer.get(t)
            while p is not None and p.kind == "passthrough":
                wide.add(p.node)
                p = producer.get(p.inputs[0])
            if p is not None:
                wide.add(p.node)
    grown = True
    while grown:  # units whose inputs all come from wide units join the region
        grown = False
        for u in units.values():
            if u.node in wide or u.kind == "passthrough" or not u.inputs:
                continue
            src = [producer.get(t) for t in u.inputs]
            if all(p is not None and (p.node in wide or p.kind == "passthrough" and _wide_source(p, producer, wide))
                   for p in src):
                wide.add(u.node)
                grown = True
    return wide


def _wide_source(p, producer: dict, wide: set) -> bool:
    """A passthrough unit's grid is its input's: wide when the unit feeding it (through passthroughs) is."""
    seen = set()
    while p is not None and p.kind == "passthrough" and p.node not in seen:
        seen.add(p.node)
        p = producer.get(p.inputs[0])
    return p is not None and p.node in wide


def describe_regions(units: dict, wide: set, seeds: list, nsr: dict, narrow: str, wide_name: str,
                     graph=None, limit: int = 30) -> list[dict]:
    """The connected regions of one precision, largest first: ``{"precision", "units", "weighted",
    "nodes" (up to 8 names), "why"}``; ``graph`` (the float graph) connects units through other nodes."""
    producer = {u.output: u.node for u in units.values()}
    node_of = {t.name: n for n in (graph.nodes if graph is not None else []) for t in n.outputs}

    def unit_sources(tensor, seen):
        """The units whose output reaches ``tensor`` through nodes that are no unit."""
        if tensor in producer:
            return {producer[tensor]}
        n = node_of.get(tensor)
        if n is None or n.name in units or id(n) in seen:
            return set() if n is None or id(n) in seen else {n.name}
        seen.add(id(n))
        return set().union(*[unit_sources(t.name, seen) for t in n.inputs if t.name], set())

    def prec(name):
        u = units[name]
        if u.kind == "passthrough":  # a passthrough unit keeps its input's grid
            p = producer.get(u.inputs[0])
            return prec(p) if p is not None and p != name else (wide_name if name in wide else narrow)
        return wide_name if name in wide else narrow

    precision = {n: prec(n) for n in units}
    from networkx.utils import UnionFind  # here, not at the top: networkx takes 0.2 s to import
    regions = UnionFind(units)
    for u in units.values():
        for t in u.inputs:
            for p in unit_sources(t, set()):
                if p in precision and precision[p] == precision[u.node]:
                    regions.union(p, u.node)
    groups: dict = {}
    for n in units:
        groups.setdefault(regions[n], []).append(n)
    seed_set = set(seeds)
    out = []
    for members in sorted(groups.values(), key=len, reverse=True):
        p = precision[members[0]]
        rec = {"precision": p, "units": len(members),
               "weighted": sum(1 for n in members if units[n].kind == "weighted"), "nodes": members[:8]}
        if p == wide_name:
            sens = sorted((n for n in members if n in seed_set), key=lambda n: -nsr.get(n, 0.0))
            rec["why"] = (f"{len(sens)} unit(s) too sensitive at {narrow} (noise-to-signal alone: " +
                          ", ".join(f"{n} {nsr.get(n, 0.0):.1e}" for n in sens[:4]) +
                          (", ..." if len(sens) > 4 else "") +
                          f") with the units producing their inputs and the units fed only by {wide_name} units, "
                          f"at {wide_name} until the fidelity floor held"
                          if sens else f"produces the input of a {wide_name} unit (its input is quantized at "
                                       f"{wide_name} only when its producer runs at {wide_name})")
        else:
            rec["why"] = f"holds at {narrow} (not among the units the fidelity floor needed at {wide_name})"
        out.append(rec)
    return out[:limit]
