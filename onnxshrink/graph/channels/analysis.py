"""The coupled-channel analysis of one graph: ``ChannelAnalysis`` holds the channel ids, their
unions into units (networkx UnionFind), the blocked ids with reasons, the layouts of the tensors,
the members, sinks, fix-ups and balance constraints; ``analyze`` walks the graph in topological
order applying the per-op rules (``rules``), and ``groups`` gathers the units into ChannelGroups:
units whose ids share producing layers (one conv output, several tied by a residual Add, or
several under one balance constraint), prunable when none of their ids is blocked.
"""

from __future__ import annotations

__all__ = ["ChannelAnalysis", "analyze", "coupled_channel_groups"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels.rules import SPLIT_AXIS_OPS, reads_channels_at_slot0_only, rule_for
from onnxshrink.graph.channels.types import Balance, ChannelGroup, Fixup, Layout, Member, Sink
from onnxshrink.graph.shapes import normalize_axis, tensor_shapes
from onnxshrink.graph.values import constant_value, node_attr


class ChannelAnalysis:
    """The analysis of one graph. Build with ``analyze(graph)``.

    layouts: tensor name -> Layout. members / sinks / fixups / balances: see their classes.
    heads: per attention product Q K^T (rules_attention), its node name and one channel id per head.
    blocked: channel id -> reason. unit_of(ids) maps ids to unit labels (component roots).
    opset: the graph's default-domain opset (13 when unknown), which some rules depend on.
    """

    def __init__(self, graph: gs.Graph, shapes: dict):
        self.graph = graph
        self.shapes = shapes
        from networkx.utils import UnionFind  # here, not at the top: networkx takes 0.2 s to import
        self.uf = UnionFind()
        self.n = 0
        self.space_start: list[int] = []
        self.space_owner: list[str] = []
        self.blocked: dict[int, str] = {}
        self.layouts: dict[str, Layout] = {}
        self.members: list[Member] = []
        self.sinks: list[Sink] = []
        self.fixups: list[Fixup] = []
        self.balances: list[Balance] = []
        self.heads: list[tuple[str, np.ndarray]] = []  # (attention product Q K^T, one id per head)
        try:
            self.opset = int(graph.opset)
        except Exception:
            self.opset = 13
        self._labels: np.ndarray | None = None      # unit label of every id, once finalized
        self._balance_rows: list | None = None      # cache of balance_rows()

    # ---------------------------------------------------------------- primitives
    def new_space(self, size: int, owner: str) -> np.ndarray:
        """``size`` fresh channel ids created by the node ``owner``."""
        ids = np.arange(self.n, self.n + size, dtype=np.int64)
        self.space_start.append(self.n)
        self.space_owner.append(owner)
        self.n += size
        return ids

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie the ids of ``a`` to those of ``b`` position by position (same unit)."""
        for x, y in zip(np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()):
            if x != y:
                self.uf.union(x, y)

    def unite_across(self, ids: np.ndarray, free_axis: int) -> None:
        """Unite every id with the others of its slice along ``free_axis`` (so removals keep the
        array rectangular: only whole slices go)."""
        a = np.moveaxis(ids, free_axis, 0).reshape(ids.shape[free_axis], -1)
        for row in a:
            first = int(row[0])
            for x in row[1:].tolist():
                if x != first:
                    self.uf.union(first, x)

    def balance(self, rows: np.ndarray, node: gs.Node, kind: str) -> None:
        """Rows of ``rows`` (one per group) must lose equally many positions."""
        self.balances.append(Balance(node.name, kind, [np.asarray(r).ravel() for r in rows]))

    def block(self, ids, reason: str) -> None:
        """Mark ``ids`` unremovable (the first reason is kept)."""
        for x in np.asarray(ids).ravel().tolist():
            self.blocked.setdefault(int(x), reason)

    def block_layout(self, lay: Layout | None, reason: str) -> None:
        """Block every id of ``lay`` (nothing for None)."""
        if lay is not None:
            self.block(lay.ids, reason)

    def data_layout(self, lays: list, reason: str) -> Layout | None:
        """The layout of a node's data input (``lays[0]``); its other inputs are parameters (bounds,
        scales, sizes, indices), whose channels are blocked with ``reason``."""
        for lay in lays[1:]:
            self.block_layout(lay, reason)
        return lays[0]

    def set_layout(self, t, lay: Layout | None) -> None:
        """Record the layout of tensor ``t`` (nothing for a missing tensor or layout)."""
        if lay is not None and t is not None and t.name:
            self.layouts[t.name] = lay

    def shape(self, t) -> list | None:
        """Dims of tensor ``t`` (shape inference first, then the graph's own), None when unknown."""
        if t is None or t.name == "":
            return None
        if isinstance(t, gs.Constant):
            return list(t.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = [d if isinstance(d, (int, str)) else None for d in t.shape]
        return s

    def rank(self, t) -> int | None:
        """Rank of tensor ``t``, None when unknown."""
        s = self.shape(t)
        return None if s is None else len(s)

    def value(self, t) -> np.ndarray | None:
        """Constant value of a tensor, looking through DequantizeLinear of constants."""
        v = constant_value(t, numeric_attrs=True)
        if v is not None:
            return v
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            x = constant_value(dq.inputs[0], numeric_attrs=True)
            s = constant_value(dq.inputs[1], numeric_attrs=True)
            if x is None or s is None:
                return None
            zp = constant_value(dq.inputs[2], numeric_attrs=True) if len(dq.inputs) > 2 and dq.inputs[2].name else None
            zp = np.zeros_like(s, dtype=np.float64) if zp is None else zp.astype(np.float64)
            if s.ndim == 1 and s.size > 1:
                ax = normalize_axis(node_attr(dq, "axis", 1), x.ndim)
                shp = [1] * x.ndim
                shp[ax] = -1
                s, zp = s.reshape(shp), zp.reshape(shp)
            elif s.ndim > 1:
                return None  # blocked quantization: no rule
            return ((x.astype(np.float64) - zp) * s).astype(np.float32)
        return None

    def add_param(self, node: gs.Node, slot: int, axis: int, ids: np.ndarray, role: str, tag: str) -> Member | None:
        """Register input ``slot`` of ``node`` (a constant, or a DequantizeLinear of one) as sliced
        along ``axis`` with ids. Returns the member, or None (caller blocks) when it cannot."""
        t = node.inputs[slot]
        if isinstance(t, gs.Constant) or constant_value(t, numeric_attrs=True) is not None:
            m = Member(node, slot, axis, np.asarray(ids), role, tag)
            self.members.append(m)
            return m
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            x = dq.inputs[0]
            if constant_value(x, numeric_attrs=True) is None or len(t.outputs) != 1:
                return None
            s = constant_value(dq.inputs[1], numeric_attrs=True)
            if s is None or s.ndim > 1:
                return None
            m = Member(dq, 0, axis, np.asarray(ids), role, tag)
            self.members.append(m)
            if s.size > 1:
                if normalize_axis(node_attr(dq, "axis", 1), constant_value(x, numeric_attrs=True).ndim) != axis:
                    return m  # per-axis on another axis: the scale does not follow this axis
                self.members.append(Member(dq, 1, 0, np.asarray(ids), "param", "scale"))
                if len(dq.inputs) > 2 and dq.inputs[2].name:
                    self.members.append(Member(dq, 2, 0, np.asarray(ids), "param", "zero_point"))
            return m
        return None

    # ---------------------------------------------------------------- the walk
    def run(self) -> ChannelAnalysis:
        """Apply the rule of every node in topological order, block what reaches a graph output or
        a subgraph, and finalize."""
        g = self.graph
        subgraph_refs = set()
        for n in g.nodes:
            for a in n.attrs.values():
                if isinstance(a, gs.Graph):
                    for sn in a.nodes:
                        subgraph_refs.update(t.name for t in sn.inputs)
        for n in g.nodes:
            lays = [self.layouts.get(t.name) if t.name else None for t in n.inputs]
            if any(l is not None for l in lays) and any(l is not None and not l.single for l in lays) \
                    and n.op not in SPLIT_AXIS_OPS:
                for l in lays:
                    self.block_layout(l, f"{n.op} '{n.name}' on a split channel axis (no rule)")
                continue
            if reads_channels_at_slot0_only(n.op):
                for l in lays[1:]:
                    self.block_layout(l, f"{n.op} '{n.name}' reads channels as a parameter")
            handler = rule_for(n.op)
            if handler is None:
                for l in lays:
                    self.block_layout(l, f"no channel rule for {n.op} ('{n.name}')")
                continue
            try:
                handler(self, n, lays)
            except Exception as e:  # a rule that cannot read this node: block, never guess
                for l in lays:
                    self.block_layout(l, f"{n.op} '{n.name}' could not be analysed ({type(e).__name__}: {e})"[:200])
                for o in n.outputs:
                    self.block_layout(self.layouts.pop(o.name, None), f"{n.op} '{n.name}' could not be analysed")
        for o in g.outputs:
            self.block_layout(self.layouts.get(o.name), f"reaches graph output '{o.name}'")
        for name in subgraph_refs:
            self.block_layout(self.layouts.get(name), "read inside a subgraph")
        return self.finalize()

    # ---------------------------------------------------------------- results
    def finalize(self) -> ChannelAnalysis:
        """Freeze the unions: unit labels of all ids as one array (fast ``unit_of``)."""
        self._labels = np.array([self.uf[i] for i in range(self.n)], dtype=np.int64)
        return self

    def unit_of(self, ids: np.ndarray) -> np.ndarray:
        """Unit label of each id (same shape)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._labels is not None:
            return self._labels[ids]
        return np.array([self.uf[int(x)] for x in ids.ravel().tolist()], dtype=np.int64).reshape(ids.shape)

    def blocked_units(self) -> dict[int, str]:
        """Unit label -> the reason it cannot be removed."""
        out = {}
        for i, r in self.blocked.items():
            out.setdefault(self.uf[i], r)
        return out

    def space_of(self, ids: np.ndarray) -> np.ndarray:
        """Index of the id space (producing node) of each id."""
        return np.searchsorted(np.asarray(self.space_start), np.asarray(ids), side="right") - 1

    def balance_rows(self) -> list:
        """Per balance constraint, per slice: {unit: positions in the slice} (computed once)."""
        if self._balance_rows is None:
            rows = []
            for b in self.balances:
                per = []
                for sl in b.slices:
                    u, c = np.unique(self.unit_of(sl), return_counts=True)
                    per.append(dict(zip(u.tolist(), c.tolist())))
                rows.append(per)
            self._balance_rows = rows
        return self._balance_rows

    def groups(self) -> list[ChannelGroup]:
        """The channel groups (see ChannelGroup), ordered by their lowest unit label."""
        if self.n == 0:
            return []
        all_ids = np.arange(self.n)
        units = self.unit_of(all_ids)
        spaces = self.space_of(all_ids)
        from networkx.utils import UnionFind
        suf = UnionFind()
        first_space = {}
        for u, s in zip(units.tolist(), spaces.tolist()):
            if u in first_space:
                suf.union(first_space[u], s)
            else:
                first_space[u] = s
                suf[s]
        for b in self.balances:  # a balance constraint is decided within one group
            sp = np.unique(spaces[np.concatenate(b.slices)]).tolist()
            for s in sp[1:]:
                suf.union(sp[0], s)
        group_of_unit = {u: suf[s] for u, s in first_space.items()}
        bal_group = [suf[int(spaces[b.slices[0][0]])] for b in self.balances if b.slices and b.slices[0].size]
        bunits = self.blocked_units()
        by_group: dict[int, list[int]] = {}
        for u in sorted(first_space):
            by_group.setdefault(group_of_unit[u], []).append(u)
        chan_count: dict[int, int] = {}
        for u in units.tolist():
            g = group_of_unit[u]
            chan_count[g] = chan_count.get(g, 0) + 1
        member_units = [(m, self.unit_of(m.ids)) for m in self.members]
        out = []
        lookup = np.full(self.n, -1, dtype=np.int64)
        for gi, (gkey, ulist) in enumerate(sorted(by_group.items(), key=lambda kv: min(kv[1]))):
            lookup[:] = -1
            lookup[np.asarray(ulist, dtype=np.int64)] = np.arange(len(ulist))
            reasons = []
            for u in ulist:
                if u in bunits and bunits[u] not in reasons:
                    reasons.append(bunits[u])
            members = []
            for m, mu in member_units:
                imap = lookup[mu]
                if (imap >= 0).any():
                    tname = m.node.inputs[m.slot].name
                    members.append((m.node.name, tname, m.axis, m.role, m.tag, imap))
            gspaces = sorted({int(s) for s in np.unique(spaces[np.isin(units, ulist)])})
            producers = sorted({self.space_owner[s] for s in gspaces})
            more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
            out.append(ChannelGroup(id=gi, units=len(ulist), channels=chan_count[gkey], producers=producers,
                                    members=members, prunable=not reasons, reason="; ".join(reasons[:3]) + more,
                                    unit_labels=list(ulist), balances=bal_group.count(gkey)))
        return out


def analyze(graph: gs.Graph, input_shapes: dict | None = None, shapes: dict | None = None) -> ChannelAnalysis:
    """Run the coupled-channel analysis on ``graph`` (topologically sorted in place)."""
    graph.toposort()
    if shapes is None:
        shapes = tensor_shapes(graph, input_shapes)
    return ChannelAnalysis(graph, shapes).run()


def coupled_channel_groups(graph: gs.Graph, input_shapes: dict | None = None) -> list[ChannelGroup]:
    """Groups of channels that must be removed together, with their index maps, prunable flag
    and the reason when not prunable."""
    return analyze(graph, input_shapes).groups()
