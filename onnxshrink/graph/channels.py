"""Coupled-channel analysis: which channels of an ONNX graph must be removed together.

Every channel a Conv, ConvTranspose, Gemm or MatMul creates gets a global id. The analysis walks
the graph in topological order and gives each tensor on a channel path a *layout*: the ids of the
channels along its channel axis (or axes, between a Reshape that splits the channel axis and the
one that merges it back), plus the per-channel value when it is provably constant (a zero filter
followed by BN and an activation emits a constant). Ops couple ids:

- Conv (group 1), Gemm, MatMul, ConvTranspose *contract* their input channels (they are "sinks":
  removing input channel c deletes column c of the weight) and create new ids for their outputs.
  A grouped conv (G groups) needs every group to keep the same number of input and of output
  channels, but not the same positions: group g's output rows keep their own columns,
  W'[o] = W[o, K_g] for o in group g. That is a *balance* constraint (``Balance``: the removed
  positions of its G slices must be equal in number), not a tie; units stay single channels.
  A depthwise conv maps input channel c to outputs [c*m, (c+1)*m) (same unit).
- Elementwise ops (Add, Sub, Mul, Div, Sum, Max, Min, PRelu, ...) with broadcasting unite the ids
  of inputs that carry the full channel axis (residual blocks, SE blocks' Mul); per-channel
  constants become parameters to slice.
- Channel-wise ops (activations, BatchNormalization, InstanceNormalization, pooling, Resize,
  Pad, LayerNormalization over non-channel axes, Q/DQ) keep the layout.
- Concat on the channel axis concatenates ids (index offsets), Split and Slice cut them,
  Transpose moves the channel axes, Reshape/Flatten map them when the mapping is provable from
  static dims: Flatten to features gives channel c the features [c*s, (c+1)*s).
- Anything else (an op with no rule, a graph output, Shape, LRN, Softmax over channels, a
  Reshape computed at run time) *blocks* the ids that reach it, with the reason.

A unit is a connected component of ids (networkx UnionFind): removing one id means removing
every id of its unit, everywhere it occurs. A ChannelGroup is a set of units whose ids share
producing layers (one conv output, several tied by a residual Add, or several under one balance
constraint); it is prunable when none of its ids is blocked. A removal set is valid when it also
satisfies every balance constraint: ``balanced_selection`` finds the largest such subset of the
wanted units (lowest importance first) as a small integer program (scipy's HiGHS MILP when
scipy is installed, else a monotone repair that gives units back until every constraint holds).

Channel shuffle (ShuffleNet): Reshape(N, C, H, W -> N, g, C/g, H, W), Transpose(0, 2, 1, 3, 4),
Reshape(-> N, C, H, W) sends channel (i, j) (group i, index j) to position j*g + i. The
intermediate layout is 2-D (g x C/g); a removal must keep it rectangular with the same order
after the merge, so the ids of one column j (channel j of every group) are tied, and the merged
layout is the transposed id matrix flattened: the index map of the permutation. ``analyze`` returns the full analysis (members: every weight axis, shape
constant and attribute that must follow a removal, with its index map), which the prune pass
uses; ``coupled_channel_groups`` returns the groups.
"""

from __future__ import annotations

__all__ = ["Layout", "Member", "Sink", "Fixup", "Balance", "ChannelGroup", "ChannelAnalysis", "analyze",
           "coupled_channel_groups", "balanced_selection", "const_value", "tensor_shapes"]

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

NAN = float("nan")


@dataclass
class Layout:
    """Channel ids of a tensor: ``ids`` has the tensor's dims at ``axes`` (consecutive, sorted);
    ``const`` the same shape, the channel's constant value or NaN when it varies."""

    axes: tuple
    ids: np.ndarray
    const: np.ndarray

    @property
    def single(self) -> bool:
        return len(self.axes) == 1


@dataclass
class Member:
    """A tensor (input ``slot`` of ``node``) or attribute whose ``axis`` follows removal:
    position i along the axis holds channel id ``ids[i]``.

    role: "out" (a producer's filter/bias: the channel's values), "in" (a consumer's weight
    columns), "param" (a per-channel parameter of a channel-wise op).
    tag: what it is (conv_w, conv_b, bn_scale, bn_bias, bn_mean, bn_var, add_const, mul_const,
    gemm_w, gemm_b, scale, zero_point, ...)."""

    node: gs.Node
    slot: int
    axis: int
    ids: np.ndarray
    role: str
    tag: str = ""


@dataclass
class Sink:
    """A contracting consumer (Conv/Gemm/MatMul/ConvTranspose) of a layout tensor: input slot 0
    has channel ids ``ids`` with constant values ``const`` (NaN: varying)."""

    node: gs.Node
    kind: str            # conv, gemm, matmul, convtranspose
    ids: np.ndarray
    const: np.ndarray
    group: int = 1
    w_member: "Member | None" = None   # the weight's input-axis member


@dataclass
class Fixup:
    """A shape constant or attribute computed from kept channel counts after removal."""

    kind: str            # reshape, split, slice, group, resize_sizes
    node: gs.Node
    layouts: list        # layouts the new values are counted on
    info: dict = field(default_factory=dict)


@dataclass
class Balance:
    """The removed positions of every slice (an array of channel ids) must be equal in number:
    a grouped conv's input or output channels, one slice per group."""

    node: str
    kind: str            # "input" or "output"
    slices: list


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    units: number of removable units (a unit is a set of channel ids that go together).
    members: (node name, tensor name, axis, role, tag, index_map) with index_map[i] the unit
      (0..units-1) of position i along the axis, -1 for positions of other groups.
    producers: names of the nodes creating the channels. prunable/reason: blocked groups say why.
    """

    id: int
    units: int
    channels: int
    producers: list
    members: list
    prunable: bool
    reason: str = ""
    unit_labels: list = field(default_factory=list)   # the analysis' unit label of each unit
    balances: int = 0    # balance constraints on its units (grouped convs)


# --------------------------------------------------------------------------- helpers


def const_value(t) -> np.ndarray | None:
    """Value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        n = t.inputs[0]
        v = n.attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        for k in ("value_float", "value_int"):
            if k in n.attrs:
                return np.asarray(n.attrs[k])
        for k in ("value_floats", "value_ints"):
            if k in n.attrs:
                return np.asarray(n.attrs[k])
    return None


def tensor_shapes(graph: gs.Graph, input_shapes: dict | None = None) -> dict:
    """name -> list of dims (int, or str for symbolic, None unknown) from ONNX shape inference on
    a weight-free export of ``graph`` (input dims fixed by ``input_shapes`` when given)."""
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    # IR < 4 lists initializers as inputs; the export does not, and shape inference then ignores them
    model.ir_version = max(model.ir_version, 4)
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.INT64 and int(np.prod(t.dims)) > 64:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
    if input_shapes:
        for i in model.graph.input:
            if i.name in input_shapes:
                dims = i.type.tensor_type.shape.dim
                del dims[:]
                for v in input_shapes[i.name]:
                    dims.add().dim_value = int(v)
        del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        pass
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    for n in graph.nodes:
        for o in n.outputs:
            if o.name not in out and o.shape is not None:
                out[o.name] = [d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in o.shape]
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            out[t.name] = list(t.shape)
    return out


def _attr(node, name, default=None):
    return node.attrs.get(name, default)


def _norm_axis(a, rank):
    return a + rank if a < 0 else a


_FLOAT_UNARY = {
    "Relu": lambda x, n: np.maximum(x, 0),
    "Sigmoid": lambda x, n: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "HardSigmoid": lambda x, n: np.clip(_attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, _attr(n, "alpha", 0.01) * x),
    "Elu": lambda x, n: np.where(x >= 0, x, _attr(n, "alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1)),
    "Selu": lambda x, n: _attr(n, "gamma", 1.0507) * np.where(x > 0, x, _attr(n, "alpha", 1.67326) * (np.exp(np.minimum(x, 0)) - 1)),
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Exp": lambda x, n: np.exp(x),
    "Abs": lambda x, n: np.abs(x),
    "Neg": lambda x, n: -x,
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x),
    "Sqrt": lambda x, n: np.sqrt(np.where(x >= 0, x, NAN)),
    "Reciprocal": lambda x, n: np.where(x != 0, 1 / np.where(x != 0, x, 1), NAN),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "Sign": lambda x, n: np.sign(x),
    "Cast": lambda x, n: x,
    "Erf": None,  # no exact numpy erf: constant channels through Erf are treated as varying
    "Gelu": lambda x, n: np.where(x == 0, 0.0, NAN),
    "Celu": lambda x, n: np.where(x == 0, 0.0, NAN),
    "ThresholdedRelu": lambda x, n: np.where(x > _attr(n, "alpha", 1.0), x, 0),
    "Clip": None,  # handled with its min/max inputs
}

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_MULTI_AXIS_OK = set(_FLOAT_UNARY) | _ELEMENTWISE | {"Transpose", "Reshape", "Clip"}


def _onnx_dtype_is_float(t) -> bool:
    try:
        return np.issubdtype(np.dtype(t.dtype), np.floating)
    except Exception:
        return True


# --------------------------------------------------------------------------- analysis


class ChannelAnalysis:
    """The analysis of one graph. Build with ``analyze(graph)``.

    layouts: tensor name -> Layout. members / sinks / fixups: see their classes.
    blocked: channel id -> reason. unit_of(ids) maps ids to unit labels (component roots).
    """

    def __init__(self, graph: gs.Graph, shapes: dict):
        self.graph = graph
        self.shapes = shapes
        self.uf = nx.utils.UnionFind()
        self.n = 0
        self.space_start: list[int] = []
        self.space_owner: list[str] = []
        self.blocked: dict[int, str] = {}
        self.layouts: dict[str, Layout] = {}
        self.members: list[Member] = []
        self.sinks: list[Sink] = []
        self.fixups: list[Fixup] = []
        self.balances: list[Balance] = []
        try:
            self._opset = int(graph.opset)
        except Exception:
            self._opset = 13

    # ---------------------------------------------------------------- primitives
    def new_space(self, size: int, owner: str) -> np.ndarray:
        ids = np.arange(self.n, self.n + size, dtype=np.int64)
        self.space_start.append(self.n)
        self.space_owner.append(owner)
        self.n += size
        return ids

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
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
        for x in np.asarray(ids).ravel().tolist():
            self.blocked.setdefault(int(x), reason)

    def block_layout(self, lay: Layout | None, reason: str) -> None:
        if lay is not None:
            self.block(lay.ids, reason)

    def shape(self, t) -> list | None:
        if t is None or t.name == "":
            return None
        if isinstance(t, gs.Constant):
            return list(t.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = [d if isinstance(d, (int, str)) else None for d in t.shape]
        return s

    def rank(self, t) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def value(self, t) -> np.ndarray | None:
        """Constant value of a tensor, looking through DequantizeLinear of constants."""
        v = const_value(t)
        if v is not None:
            return v
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            x = const_value(dq.inputs[0])
            s = const_value(dq.inputs[1])
            if x is None or s is None:
                return None
            zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
            zp = np.zeros_like(s, dtype=np.float64) if zp is None else zp.astype(np.float64)
            if s.ndim == 1 and s.size > 1:
                ax = _norm_axis(_attr(dq, "axis", 1), x.ndim)
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
        if isinstance(t, gs.Constant) or const_value(t) is not None:
            m = Member(node, slot, axis, np.asarray(ids), role, tag)
            self.members.append(m)
            return m
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            x = dq.inputs[0]
            if const_value(x) is None or len(t.outputs) != 1:
                return None
            s = const_value(dq.inputs[1])
            if s is None or s.ndim > 1:
                return None
            m = Member(dq, 0, axis, np.asarray(ids), role, tag)
            self.members.append(m)
            if s.size > 1:
                if _norm_axis(_attr(dq, "axis", 1), const_value(x).ndim) != axis:
                    return m  # per-axis on another axis: the scale does not follow this axis
                self.members.append(Member(dq, 1, 0, np.asarray(ids), "param", "scale"))
                if len(dq.inputs) > 2 and dq.inputs[2].name:
                    self.members.append(Member(dq, 2, 0, np.asarray(ids), "param", "zero_point"))
            return m
        return None

    # ---------------------------------------------------------------- the walk
    def run(self) -> "ChannelAnalysis":
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
                    and n.op not in _MULTI_AXIS_OK:
                for l in lays:
                    self.block_layout(l, f"{n.op} '{n.name}' on a split channel axis (no rule)")
                continue
            handler = _RULES.get(n.op)
            if n.op in _SLOT0_ONLY or (handler is None and n.op in _FLOAT_UNARY) or n.op in _POOL:
                for l in lays[1:]:
                    self.block_layout(l, f"{n.op} '{n.name}' reads channels as a parameter")
            if handler is None:
                if n.op in _FLOAT_UNARY:
                    handler = _unary
                elif n.op in _ELEMENTWISE:
                    handler = _elementwise
                elif n.op in _POOL:
                    handler = _pool
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
    def finalize(self) -> "ChannelAnalysis":
        """Freeze the unions: unit labels of all ids as one array (fast ``unit_of``)."""
        self._labels = np.array([self.uf[i] for i in range(self.n)], dtype=np.int64)
        return self

    def unit_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if getattr(self, "_labels", None) is not None:
            return self._labels[ids]
        return np.array([self.uf[int(x)] for x in ids.ravel().tolist()], dtype=np.int64).reshape(ids.shape)

    def blocked_units(self) -> dict[int, str]:
        out = {}
        for i, r in self.blocked.items():
            out.setdefault(self.uf[i], r)
        return out

    def space_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.space_start), np.asarray(ids), side="right") - 1

    def groups(self) -> list[ChannelGroup]:
        if self.n == 0:
            return []
        all_ids = np.arange(self.n)
        units = self.unit_of(all_ids)
        spaces = self.space_of(all_ids)
        suf = nx.utils.UnionFind()
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
            index = {u: k for k, u in enumerate(ulist)}
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
            out.append(ChannelGroup(id=gi, units=len(ulist), channels=chan_count[gkey], producers=producers,
                                    members=members, prunable=not reasons,
                                    reason="; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""),
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


def _balance_rows(a: ChannelAnalysis) -> list:
    """Per balance constraint, per slice: {unit: positions in the slice} (cached)."""
    rows = getattr(a, "_balance_rows", None)
    if rows is None:
        rows = []
        for b in a.balances:
            per = []
            for sl in b.slices:
                u, c = np.unique(a.unit_of(sl), return_counts=True)
                per.append(dict(zip(u.tolist(), c.tolist())))
            rows.append(per)
        a._balance_rows = rows
    return rows


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
    wanted = set(int(u) for u in wanted)
    scores = scores or {}
    rows = [r for r in _balance_rows(a) if any(u in wanted for sl in r for u in sl)]
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
        return rest | _balanced_milp(a, order, rows, limit)
    except Exception:
        return rest | _balanced_repair(a, order, rows, limit)


def _balanced_milp(a: ChannelAnalysis, order: list, rows: list, limit: int | None) -> set:
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
    if not _balanced(rows, sel):
        raise RuntimeError("MILP result violates a balance constraint")
    return sel


def _balanced(rows: list, sel: set) -> bool:
    for per in rows:
        counts = {sum(c for u, c in sl.items() if u in sel) for sl in per}
        if len(counts) > 1:
            return False
    return True


def _balanced_repair(a: ChannelAnalysis, order: list, rows: list, limit: int | None) -> set:
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


# --------------------------------------------------------------------------- rules


def _set(a: ChannelAnalysis, t, lay: Layout | None):
    if lay is not None and t is not None and t.name:
        a.layouts[t.name] = lay


def _out_const_from_filter(w: np.ndarray, b: np.ndarray | None, axis: int) -> np.ndarray:
    """Constant of each output channel whose filter is all zero (its bias), NaN otherwise."""
    wz = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    zero = ~np.any(wz != 0, axis=1)
    bias = np.zeros(w.shape[axis]) if b is None else np.broadcast_to(np.asarray(b, np.float64).ravel(), (w.shape[axis],))
    return np.where(zero, bias, NAN)


def _conv_pads_zero(node, kshape) -> bool:
    ap = _attr(node, "auto_pad", "NOTSET")
    if isinstance(ap, bytes):
        ap = ap.decode()
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in kshape)
    return not any(_attr(node, "pads", []) or [])


def _conv(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    w = a.value(n.inputs[1])
    if w is None:
        a.block_layout(x, f"Conv '{n.name}' has run-time weights")
        return
    b = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    G = int(_attr(n, "group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    cin = cin_g * G
    if x is not None and (x.axes != (1,) or x.ids.size != cin):
        a.block_layout(x, f"Conv '{n.name}' input channel axis mismatch")
        x = None
    nopad = _conv_pads_zero(n, w.shape[2:])
    if G > 1 and cin_g == 1 and G == cin:  # depthwise: output channel o comes from input o // m
        if x is None:
            return
        m = cout // G
        ids = np.repeat(x.ids, m)
        mw = a.add_param(n, 1, 0, ids, "param", "dw_w")
        if mw is None:
            a.block_layout(x, f"depthwise Conv '{n.name}' weights cannot be sliced")
            return
        if b is not None:
            a.add_param(n, 2, 0, ids, "param", "dw_b")
        cin_c = np.repeat(x.const, m)
        wsum = w.reshape(cout, -1).sum(axis=1).astype(np.float64)
        bb = np.zeros(cout) if b is None else b.astype(np.float64)
        wzero = ~np.any(w.reshape(cout, -1) != 0, axis=1)
        const = np.where(wzero | (cin_c == 0), bb, np.where(nopad, cin_c * wsum + bb, NAN))
        const = np.where(np.isnan(cin_c) & ~wzero, NAN, const)
        a.fixups.append(Fixup("group", n, [x]))
        _set(a, n.outputs[0], Layout((1,), ids, const))
        return
    if x is not None:
        if G == 1:
            mw = a.add_param(n, 1, 1, x.ids, "in", "conv_w")
        else:
            # group g's output rows read row g of the (G, cin_g) id matrix: a 2-D index map
            r = x.ids.reshape(G, cin_g)
            a.balance(r, n, "input")
            mw = a.add_param(n, 1, 1, r, "in", "conv_w")
        if mw is None:
            a.block_layout(x, f"Conv '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "conv", x.ids, x.const, G, mw))
    ids = a.new_space(cout, n.name)
    if G > 1:
        a.balance(ids.reshape(G, cout // G), n, "output")
    mo = a.add_param(n, 1, 0, ids, "out", "conv_w")
    if mo is None:
        a.block(ids, f"Conv '{n.name}' weights cannot be sliced")
    if b is not None and a.add_param(n, 2, 0, ids, "out", "conv_b") is None:
        a.block(ids, f"Conv '{n.name}' bias cannot be sliced")
    _set(a, n.outputs[0], Layout((1,), ids, _out_const_from_filter(w, b, 0)))


def _conv_transpose(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    w = a.value(n.inputs[1])
    G = int(_attr(n, "group", 1))
    if w is None or G != 1:
        a.block_layout(x, f"ConvTranspose '{n.name}' " + ("has run-time weights" if w is None else "is grouped (no rule)"))
        return
    if any(_attr(n, "output_shape", []) or []):
        a.block_layout(x, f"ConvTranspose '{n.name}' has output_shape")
    b = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    cin, cout = w.shape[0], w.shape[1]
    if x is not None and (x.axes != (1,) or x.ids.size != cin):
        a.block_layout(x, f"ConvTranspose '{n.name}' input channel axis mismatch")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, 0, x.ids, "in", "convt_w")
        if mw is None:
            a.block_layout(x, f"ConvTranspose '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "convtranspose", x.ids, x.const, 1, mw))
    ids = a.new_space(cout, n.name)
    if a.add_param(n, 1, 1, ids, "out", "convt_w") is None:
        a.block(ids, f"ConvTranspose '{n.name}' weights cannot be sliced")
    if b is not None and a.add_param(n, 2, 0, ids, "out", "convt_b") is None:
        a.block(ids, f"ConvTranspose '{n.name}' bias cannot be sliced")
    _set(a, n.outputs[0], Layout((1,), ids, _out_const_from_filter(w, b, 1)))


def _gemm(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    w = a.value(n.inputs[1])
    if w is None or w.ndim != 2:
        a.block_layout(x, f"Gemm '{n.name}' has run-time weights")
        return
    if lays[1] is not None or (len(lays) > 2 and lays[2] is not None):
        for l in lays[1:]:
            a.block_layout(l, f"Gemm '{n.name}' weight input carries channels")
    tA, tB = int(_attr(n, "transA", 0)), int(_attr(n, "transB", 0))
    kax, nax = (1, 0) if tB else (0, 1)
    N = w.shape[nax]
    if x is not None and (tA or x.axes != (1,) or x.ids.size != w.shape[kax]):
        a.block_layout(x, f"Gemm '{n.name}' input feature axis mismatch")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, kax, x.ids, "in", "gemm_w")
        if mw is None:
            a.block_layout(x, f"Gemm '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "gemm", x.ids, x.const, 1, mw))
    ids = a.new_space(N, n.name)
    if a.add_param(n, 1, nax, ids, "out", "gemm_w") is None:
        a.block(ids, f"Gemm '{n.name}' weights cannot be sliced")
    c = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    if len(n.inputs) > 2 and n.inputs[2].name:
        if c is None:
            a.block(ids, f"Gemm '{n.name}' has a run-time C")
        elif c.ndim >= 1 and c.shape[-1] == N and N > 1:
            if c.ndim == 2 and c.shape[0] != 1:
                a.block(ids, f"Gemm '{n.name}' C is not a bias row")
            elif a.add_param(n, 2, c.ndim - 1, ids, "out", "gemm_b") is None:
                a.block(ids, f"Gemm '{n.name}' C cannot be sliced")
    alpha, beta = float(_attr(n, "alpha", 1.0)), float(_attr(n, "beta", 1.0))
    bias = None if c is None else (np.broadcast_to(c.reshape(-1) if c.size == N else c.ravel()[:1], (N,)) * beta)
    const = _out_const_from_filter(w * alpha, bias, nax)
    _set(a, n.outputs[0], Layout((1,), ids, const))


def _matmul(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    w = a.value(n.inputs[1])
    if lays[1] is not None or w is None or w.ndim != 2:
        a.block_layout(x, f"MatMul '{n.name}' has run-time weights")
        a.block_layout(lays[1], f"MatMul '{n.name}' right operand carries channels")
        return
    r = a.rank(n.inputs[0])
    if x is not None and (r is None or x.axes != (r - 1,) or x.ids.size != w.shape[0]):
        a.block_layout(x, f"MatMul '{n.name}' input feature axis is not the last axis")
        x = None
    if x is not None:
        mw = a.add_param(n, 1, 0, x.ids, "in", "matmul_w")
        if mw is None:
            a.block_layout(x, f"MatMul '{n.name}' weights cannot be sliced")
        else:
            a.sinks.append(Sink(n, "matmul", x.ids, x.const, 1, mw))
    ro = a.rank(n.outputs[0]) or r
    if ro is None:
        return
    ids = a.new_space(w.shape[1], n.name)
    if a.add_param(n, 1, 1, ids, "out", "matmul_w") is None:
        a.block(ids, f"MatMul '{n.name}' weights cannot be sliced")
    _set(a, n.outputs[0], Layout((ro - 1,), ids, _out_const_from_filter(w, None, 1)))


def _batchnorm(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"BatchNormalization '{n.name}' parameter carries channels")
    if x is None:
        return
    if len(n.outputs) > 1 and any(o.name for o in n.outputs[1:]) or x.axes != (1,):
        a.block_layout(x, f"BatchNormalization '{n.name}' in training mode or not on axis 1")
        return
    vals = [a.value(t) for t in n.inputs[1:5]]
    if any(v is None for v in vals):
        a.block_layout(x, f"BatchNormalization '{n.name}' has run-time parameters")
        return
    for slot, tag in zip(range(1, 5), ("bn_scale", "bn_bias", "bn_mean", "bn_var")):
        if a.add_param(n, slot, 0, x.ids, "param", tag) is None:
            a.block_layout(x, f"BatchNormalization '{n.name}' parameters cannot be sliced")
            return
    s, bb, mu, var = (v.astype(np.float64) for v in vals)
    eps = float(_attr(n, "epsilon", 1e-5))
    const = s * (x.const - mu) / np.sqrt(var + eps) + bb
    _set(a, n.outputs[0], Layout(x.axes, x.ids, const))


def _instancenorm(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    if x.axes != (1,):
        a.block_layout(x, f"InstanceNormalization '{n.name}' not on axis 1")
        return
    bb = a.value(n.inputs[2])
    ok = a.add_param(n, 1, 0, x.ids, "param", "in_scale") and a.add_param(n, 2, 0, x.ids, "param", "in_bias")
    if not ok:
        a.block_layout(x, f"InstanceNormalization '{n.name}' parameters cannot be sliced")
        return
    const = np.where(np.isnan(x.const), NAN, bb.astype(np.float64))  # (c - c) * s + b
    _set(a, n.outputs[0], Layout(x.axes, x.ids, const))


def _layernorm(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    ax = _attr(n, "axis", -1)
    if r is None or any(l >= _norm_axis(ax, r) for l in x.axes):
        a.block_layout(x, f"LayerNormalization '{n.name}' normalizes over the channel axis")
        return
    if len(n.outputs) > 1 and any(o.name for o in n.outputs[1:]):
        a.block_layout(x, f"LayerNormalization '{n.name}' outputs statistics")
        return
    _set(a, n.outputs[0], Layout(x.axes, x.ids, np.full(x.ids.shape, NAN)))


def _unary(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    if n.op == "Cast" and not _onnx_dtype_is_float(n.outputs[0]):
        a.block_layout(x, f"Cast '{n.name}' to a non-float type")
        return
    f = _FLOAT_UNARY.get(n.op)
    with np.errstate(all="ignore"):
        const = f(x.const, n) if f is not None else np.full(x.ids.shape, NAN)
    for o in n.outputs[:1]:
        _set(a, o, Layout(x.axes, x.ids, np.asarray(const, np.float64)))


def _clip(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"Clip '{n.name}' bound carries channels")
    if x is None:
        return
    lo = _attr(n, "min", -np.inf)
    hi = _attr(n, "max", np.inf)
    known = True
    if len(n.inputs) > 1 and n.inputs[1].name:
        v = a.value(n.inputs[1])
        known &= v is not None
        lo = float(v) if v is not None else lo
    if len(n.inputs) > 2 and n.inputs[2].name:
        v = a.value(n.inputs[2])
        known &= v is not None
        hi = float(v) if v is not None else hi
    const = np.clip(x.const, lo, hi) if known else np.full(x.ids.shape, NAN)
    _set(a, n.outputs[0], Layout(x.axes, x.ids, const))


def _per_channel_const(v: np.ndarray, axes_in: list, count: tuple) -> np.ndarray:
    """Per-channel value of a constant operand (channels along ``axes_in`` of ``v``, or broadcast):
    the value when uniform over the other axes, else NaN."""
    v = np.asarray(v, np.float64)
    if not axes_in:
        return np.full(count, float(v.ravel()[0]) if v.size and np.all(v == v.ravel()[0]) else NAN)
    moved = np.moveaxis(v, axes_in, list(range(len(axes_in))))
    flat = moved.reshape(moved.shape[:len(axes_in)] + (-1,))
    lo, hi = flat.min(axis=-1), flat.max(axis=-1)
    out = np.where(lo == hi, lo, NAN)
    return np.broadcast_to(out, count).astype(np.float64)


def _elementwise(a: ChannelAnalysis, n: gs.Node, lays):
    if all(l is None for l in lays):
        return
    ro = a.rank(n.outputs[0])
    if ro is None:
        rs = [a.rank(t) for t in n.inputs]
        ro = max(r for r in rs if r is not None) if any(r is not None for r in rs) else None
    if ro is None:
        for l in lays:
            a.block_layout(l, f"{n.op} '{n.name}': unknown ranks")
        return
    full = []
    biggest = max(l.ids.size for l in lays if l is not None)
    lays = list(lays)
    bcast = {}
    for i, (t, l) in enumerate(zip(n.inputs, lays)):
        if l is None:
            continue
        if l.ids.size == 1 and biggest > 1:
            # a one-channel tensor (spatial attention map) broadcast over the channels
            a.block_layout(l, f"{n.op} '{n.name}' broadcasts a one-channel tensor over channels")
            bcast[i] = float(l.const.ravel()[0])
            lays[i] = None
            continue
        off = ro - (a.rank(t) or ro)
        full.append((i, tuple(x + off for x in l.axes), l))
    axes = full[0][1]
    cshape = full[0][2].ids.shape
    if any(f[1] != axes or f[2].ids.shape != cshape for f in full):
        for _, _, l in full:
            a.block_layout(l, f"{n.op} '{n.name}' joins tensors with different channel axes")
        return
    if int(np.prod(cshape)) == 1 and ro is not None:
        oshape = a.shape(n.outputs[0])
        if oshape is None or any(oshape[x] != 1 for x in axes):
            for _, _, l in full:
                a.block_layout(l, f"{n.op} '{n.name}' broadcasts a one-channel tensor over channels")
            return
    ids = full[0][2].ids
    for _, _, l in full[1:]:
        a.unite(ids, l.ids)
    per_input = []
    reason = None
    for i, (t, l) in enumerate(zip(n.inputs, lays)):
        if l is not None:
            per_input.append(l.const)
            continue
        if i in bcast:
            per_input.append(np.full(cshape, bcast[i]))
            continue
        if not t.name:
            continue
        r = a.rank(t)
        v = a.value(t)
        s = a.shape(t)
        off = ro - (r if r is not None else ro)
        ain = [x - off for x in axes]
        dims = None if s is None or any(x >= len(s) for x in ain) else [s[x] if x >= 0 else 1 for x in ain]
        if v is not None:
            if all(x < 0 or v.shape[x] == 1 for x in ain):
                per_input.append(_per_channel_const(v, [], cshape))
            elif list(v.shape[x] for x in ain if x >= 0) == list(cshape) and all(x >= 0 for x in ain) and len(ain) == 1:
                tag = {"Add": "add_const", "Sub": "sub_const", "Mul": "mul_const", "Div": "div_const",
                       "PRelu": "prelu_slope"}.get(n.op, n.op.lower() + "_const")
                if a.add_param(n, i, ain[0], ids, "param", tag) is None:
                    reason = f"{n.op} '{n.name}' constant operand cannot be sliced"
                per_input.append(_per_channel_const(v, ain, cshape))
            else:
                reason = f"{n.op} '{n.name}' constant operand does not match the channel axis"
        elif dims is not None and all(d == 1 for d in dims):
            per_input.append(np.full(cshape, NAN))
        else:
            reason = f"{n.op} '{n.name}' input '{t.name}' carries untracked channels"
    if reason:
        for _, _, l in full:
            a.block_layout(l, reason)
        return
    const = _combine_const(n.op, per_input, cshape)
    _set(a, n.outputs[0], Layout(axes, ids, const))


def _combine_const(op, cs, shape):
    cs = [np.broadcast_to(np.asarray(c, np.float64), shape) for c in cs]
    with np.errstate(all="ignore"):
        if op == "Mul":
            out = cs[0].copy()
            zero = cs[0] == 0
            for c in cs[1:]:
                out = out * c
                zero |= c == 0
            return np.where(zero, 0.0, out)
        if op in ("Add", "Sum"):
            return np.sum(cs, axis=0)
        if op == "Mean":
            return np.mean(cs, axis=0)
        if op == "Sub":
            return cs[0] - cs[1]
        if op == "Div":
            return np.where(cs[1] != 0, cs[0] / cs[1], NAN)
        if op == "Pow":
            return np.power(cs[0], cs[1])
        if op == "Max":
            return np.max(cs, axis=0)
        if op == "Min":
            return np.min(cs, axis=0)
        if op == "PRelu":
            return np.where(cs[0] >= 0, cs[0], cs[0] * cs[1])
    return np.full(shape, NAN)


def _pool(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    if x.axes != (1,) or (len(n.outputs) > 1 and any(o.name for o in n.outputs[1:])):
        a.block_layout(x, f"{n.op} '{n.name}' not on axis 1 or outputs indices")
        return
    const = x.const
    if n.op == "AveragePool":
        pads = any(_attr(n, "pads", []) or []) or str(_attr(n, "auto_pad", "NOTSET")).startswith(("SAME", "b'SAME"))
        if pads and not int(_attr(n, "count_include_pad", 0)) == 0:
            const = np.where(const == 0, 0.0, NAN)
    elif n.op in ("LpPool", "GlobalLpPool"):
        const = np.where(const == 0, 0.0, NAN)
    _set(a, n.outputs[0], Layout(x.axes, x.ids, const))


def _resize(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"{n.op} '{n.name}' scale input carries channels")
    if x is None:
        return
    if n.op == "Upsample" or a._opset < 11:
        sc = a.value(n.inputs[1]) if len(n.inputs) > 1 else np.asarray(_attr(n, "scales", []))
        sizes = None
    else:
        sc = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        sizes = a.value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
        if len(n.inputs) > 2 and n.inputs[2].name and sc is None or len(n.inputs) > 3 and n.inputs[3].name and sizes is None:
            a.block_layout(x, f"Resize '{n.name}' scales/sizes computed at run time")
            return
    if _attr(n, "axes") is not None:
        a.block_layout(x, f"Resize '{n.name}' with axes (no rule)")
        return
    if sc is not None and sc.size:
        if any(float(sc[ax]) != 1.0 for ax in x.axes):
            a.block_layout(x, f"Resize '{n.name}' scales the channel axis")
            return
    if sizes is not None and sizes.size:
        a.fixups.append(Fixup("resize_sizes", n, [x]))
    _set(a, n.outputs[0], Layout(x.axes, x.ids, x.const))


def _pad(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"Pad '{n.name}' parameter carries channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    pads = a.value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else np.asarray(_attr(n, "pads", []))
    axes = a.value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
    if pads is None or r is None:
        a.block_layout(x, f"Pad '{n.name}' pads computed at run time")
        return
    pads = pads.astype(np.int64).ravel()
    axes = list(range(r)) if axes is None else [_norm_axis(int(v), r) for v in axes.ravel()]
    k = len(axes)
    for j, ax in enumerate(axes):
        if ax in x.axes and (pads[j] != 0 or pads[j + k] != 0):
            a.block_layout(x, f"Pad '{n.name}' pads the channel axis")
            return
    mode = _attr(n, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    const = x.const
    if mode == "constant" and pads.any():
        cv = 0.0
        if len(n.inputs) > 2 and n.inputs[2].name:
            v = a.value(n.inputs[2])
            cv = float(v) if v is not None and v.size else NAN
        elif a._opset < 11:
            cv = float(_attr(n, "value", 0.0))
        const = np.where(const == cv, const, NAN)
    _set(a, n.outputs[0], Layout(x.axes, x.ids, const))


def _concat(a: ChannelAnalysis, n: gs.Node, lays):
    if all(l is None for l in lays):
        return
    r = a.rank(n.outputs[0]) or next((a.rank(t) for t in n.inputs if a.rank(t)), None)
    ax = _norm_axis(int(_attr(n, "axis")), r)
    lay0 = next(l for l in lays if l is not None)
    if ax in lay0.axes:
        if any(l is not None and l.axes != (ax,) for l in lays):
            for l in lays:
                a.block_layout(l, f"Concat '{n.name}' joins different channel axes")
            return
        ids, consts = [], []
        for t, l in zip(n.inputs, lays):
            if l is not None:
                ids.append(l.ids)
                consts.append(l.const)
                continue
            s = a.shape(t)
            c = s[ax] if s is not None and len(s) > ax else None
            if not isinstance(c, int):
                for l2 in lays:
                    a.block_layout(l2, f"Concat '{n.name}' input '{t.name}' has an unknown channel count")
                return
            extra = a.new_space(c, f"{t.name} (untracked)")
            a.block(extra, f"Concat '{n.name}' input '{t.name}' is not produced by a prunable layer")
            ids.append(extra)
            v = a.value(t)
            consts.append(_per_channel_const(v, [ax], (c,)) if v is not None else np.full(c, NAN))
        _set(a, n.outputs[0], Layout((ax,), np.concatenate(ids), np.concatenate(consts)))
        return
    # concat along another axis: channel i of every input is channel i of the output
    if any(l is None for l in lays) or any(l.axes != lay0.axes or l.ids.shape != lay0.ids.shape for l in lays):
        for l in lays:
            a.block_layout(l, f"Concat '{n.name}' along a non-channel axis of unmatched inputs")
        return
    for l in lays[1:]:
        a.unite(lay0.ids, l.ids)
    const = lay0.const
    for l in lays[1:]:
        const = np.where(const == l.const, const, NAN)
    _set(a, n.outputs[0], Layout(lay0.axes, lay0.ids, const))


def _split(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"Split '{n.name}' sizes carry channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    ax = _norm_axis(int(_attr(n, "axis", 0)), r)
    if ax not in x.axes:
        for o in n.outputs:
            _set(a, o, Layout(x.axes, x.ids, x.const))
        return
    if not x.single:
        a.block_layout(x, f"Split '{n.name}' on a split channel axis")
        return
    if len(n.inputs) > 1 and n.inputs[1].name:
        sizes = a.value(n.inputs[1])
        if sizes is None:
            a.block_layout(x, f"Split '{n.name}' sizes computed at run time")
            return
        sizes = [int(v) for v in sizes.ravel()]
    elif _attr(n, "split") is not None:
        sizes = [int(v) for v in _attr(n, "split")]
    else:
        k = len(n.outputs)
        c = x.ids.size
        q = -(-c // k)
        sizes = [q] * (k - 1) + [c - q * (k - 1)]
    if sum(sizes) != x.ids.size or len(sizes) != len(n.outputs):
        a.block_layout(x, f"Split '{n.name}' sizes do not match the channels")
        return
    parts = []
    off = 0
    for o, s in zip(n.outputs, sizes):
        lay = Layout(x.axes, x.ids[off:off + s], x.const[off:off + s])
        parts.append(lay)
        _set(a, o, lay)
        off += s
    a.fixups.append(Fixup("split", n, parts, {"axis": ax}))


def _slice(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"Slice '{n.name}' bounds carry channels")
    if x is None:
        return
    r = a.rank(n.inputs[0])
    if len(n.inputs) > 1:
        vals = [a.value(t) if i < len(n.inputs) and n.inputs[i].name else None
                for i, t in zip(range(1, 5), list(n.inputs[1:]) + [None] * 4)]
        starts, ends, axes, steps = (vals + [None] * 4)[:4]
        if starts is None or ends is None or (len(n.inputs) > 3 and n.inputs[3].name and axes is None) \
                or (len(n.inputs) > 4 and n.inputs[4].name and steps is None):
            a.block_layout(x, f"Slice '{n.name}' bounds computed at run time")
            return
    else:
        starts, ends, axes, steps = (np.asarray(_attr(n, "starts")), np.asarray(_attr(n, "ends")),
                                     _attr(n, "axes"), None)
        axes = None if axes is None else np.asarray(axes)
    starts, ends = starts.ravel().astype(np.int64), ends.ravel().astype(np.int64)
    axes = np.arange(len(starts)) if axes is None else axes.ravel().astype(np.int64)
    steps = np.ones(len(starts), np.int64) if steps is None else steps.ravel().astype(np.int64)
    lay = x
    for j, ax in enumerate(axes):
        ax = _norm_axis(int(ax), r)
        if ax not in x.axes:
            continue
        if not x.single or steps[j] != 1:
            a.block_layout(x, f"Slice '{n.name}' with a step on the channel axis")
            return
        c = x.ids.size
        s, e = int(starts[j]), int(ends[j])
        s = max(0, min(c, s + c if s < 0 else s))
        e = max(0, min(c, e + c if e < 0 else e))
        lay = Layout(x.axes, x.ids[s:e], x.const[s:e])
        a.fixups.append(Fixup("slice", n, [x], {"index": j, "start": s, "end": e}))
    _set(a, n.outputs[0], lay)


def _transpose(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    perm = _attr(n, "perm")
    perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
    new_axes = sorted(j for j, p in enumerate(perm) if p in x.axes)
    order = [x.axes.index(perm[j]) for j in new_axes]
    _set(a, n.outputs[0], Layout(tuple(new_axes), np.transpose(x.ids, order), np.transpose(x.const, order)))


def _blocks(ind: list, outd: list):
    """Aligned blocks of a reshape: list of ((i0, i1), (o0, o1)) whose dim products agree, a third
    element "unknown" when dims there are not static. Leading and trailing equal dims (symbolic
    ones too) pair one to one."""
    blocks = []
    i0, o0 = 0, 0
    while i0 < len(ind) and o0 < len(outd) and ind[i0] == outd[o0] and ind[i0] is not None:
        blocks.append(((i0, i0 + 1), (o0, o0 + 1)))
        i0, o0 = i0 + 1, o0 + 1
    tail = []
    i1, o1 = len(ind), len(outd)
    while i1 > i0 and o1 > o0 and ind[i1 - 1] == outd[o1 - 1] and ind[i1 - 1] is not None:
        tail.append(((i1 - 1, i1), (o1 - 1, o1)))
        i1, o1 = i1 - 1, o1 - 1
    mid_in, mid_out = ind[i0:i1], outd[o0:o1]
    if mid_in or mid_out:
        if any(not isinstance(d, int) for d in mid_in + mid_out):
            blocks.append(((i0, i1), (o0, o1), "unknown"))
        else:
            pi, po = i0, o0
            while pi < i1 or po < o1:
                bi, bo = pi, po
                si = so = 1
                if pi < i1:
                    si *= ind[pi]
                    pi += 1
                if po < o1:
                    so *= outd[po]
                    po += 1
                while si != so:
                    if si < so and pi < i1:
                        si *= ind[pi]
                        pi += 1
                    elif so < si and po < o1:
                        so *= outd[po]
                        po += 1
                    else:
                        blocks.append(((bi, i1), (bo, o1), "unknown"))
                        return blocks + tail[::-1]
                blocks.append(((bi, pi), (bo, po)))
    return blocks + tail[::-1]


def _reshape_like(a: ChannelAnalysis, n: gs.Node, x: Layout, ind, outd, fix: bool):
    if ind is None or outd is None:
        a.block_layout(x, f"{n.op} '{n.name}': unknown shapes")
        return
    blocks = _blocks(list(ind), list(outd))
    hit = [b for b in blocks if any(b[0][0] <= ax < b[0][1] for ax in x.axes)]
    if len(hit) != 1 or len(hit[0]) == 3 or not all(hit[0][0][0] <= ax < hit[0][0][1] for ax in x.axes):
        a.block_layout(x, f"{n.op} '{n.name}' channel mapping not provable from static dims")
        return
    (i0, i1), (o0, o1) = hit[0][:2]
    block_in = [int(d) for d in ind[i0:i1]]
    block_out = [int(d) for d in outd[o0:o1]]
    # ids over the whole input block (broadcast over the non-channel axes of the block)
    shp = [1] * (i1 - i0)
    for k, ax in enumerate(x.axes):
        shp[ax - i0] = x.ids.shape[k]
    ids = np.broadcast_to(x.ids.reshape(shp), block_in).reshape(block_out)
    const = np.broadcast_to(x.const.reshape(shp), block_in).reshape(block_out)
    # drop output axes of the block where ids do not vary (size-1 dims, pure spatial splits)
    keep = [k for k in range(len(block_out)) if block_out[k] > 1 and
            not np.all(ids == np.take(ids, [0], axis=k))]
    if not keep:
        keep = [int(np.argmax(block_out))]
    if keep != list(range(keep[0], keep[-1] + 1)):
        a.block_layout(x, f"{n.op} '{n.name}' scatters channels over non-adjacent axes")
        return
    sl = tuple(slice(None) if k in keep else slice(0, 1) for k in range(len(block_out)))
    ids2 = ids[sl].reshape([block_out[k] for k in keep])
    const2 = const[sl].reshape([block_out[k] for k in keep])
    if len(keep) > 1:
        # keep the result rectangular: removal goes along one axis, whole slices at a time
        best, cost = 0, None
        for f in range(len(keep)):
            arr = np.moveaxis(a.unit_of(ids2), f, 0).reshape(ids2.shape[f], -1)
            c = sum(len(set(row.tolist())) - 1 for row in arr)
            if cost is None or c < cost:
                best, cost = f, c
        a.unite_across(ids2, best)
    lay = Layout(tuple(o0 + k for k in keep), ids2, const2)
    if fix:
        a.fixups.append(Fixup("reshape", n, [lay]))
    _set(a, n.outputs[0], lay)


def _reshape(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    a.block_layout(lays[1] if len(lays) > 1 else None, f"Reshape '{n.name}' shape carries channels")
    if x is None:
        return
    spec = a.value(n.inputs[1]) if len(n.inputs) > 1 else None
    if spec is None:
        a.block_layout(x, f"Reshape '{n.name}' shape is computed at run time")
        return
    if int(_attr(n, "allowzero", 0)) and np.any(spec == 0):
        a.block_layout(x, f"Reshape '{n.name}' with allowzero")
        return
    ind = a.shape(n.inputs[0])
    outd = a.shape(n.outputs[0])
    if outd is None and ind is not None and all(isinstance(d, int) for d in ind):
        sp = [int(v) for v in spec.ravel()]
        outd = [ind[k] if v == 0 else v for k, v in enumerate(sp)]
        if -1 in outd:
            known = int(np.prod([d for d in outd if d != -1]))
            outd[outd.index(-1)] = int(np.prod(ind)) // max(known, 1)
    if outd is not None and ind is not None:
        outd = list(outd)
        for k, v in enumerate(spec.ravel().tolist()):
            if v == 0 and k < len(ind):
                outd[k] = ind[k]
            elif v > 0 and outd[k] is None:
                outd[k] = int(v)
    _reshape_like(a, n, x, ind, outd, fix=True)


def _flatten(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    ind = a.shape(n.inputs[0])
    if ind is None:
        a.block_layout(x, f"Flatten '{n.name}': unknown shape")
        return
    ax = _norm_axis(int(_attr(n, "axis", 1)), len(ind))

    def prod(ds):
        p = 1
        for d in ds:
            if not isinstance(d, int):
                return None
            p *= d
        return p

    head, tail = prod(ind[:ax]), prod(ind[ax:])
    if tail is None or (head is None and any(l < ax for l in x.axes)):
        a.block_layout(x, f"Flatten '{n.name}': dims after the axis are not static")
        return
    if head is None:
        # leading dims unknown (batch): they stay out of the channel block
        ind2 = ["?"] + list(ind[ax:])
        x2 = Layout(tuple(l - ax + 1 for l in x.axes), x.ids, x.const)
        _reshape_like(a, n, x2, ind2, ["?", tail], fix=False)
        return
    _reshape_like(a, n, x, list(ind), [head, tail], fix=False)


def _squeeze_unsqueeze(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    if len(n.inputs) > 1 and n.inputs[1].name:
        axes = a.value(n.inputs[1])
        if axes is None:
            a.block_layout(x, f"{n.op} '{n.name}' axes computed at run time")
            return
        axes = [int(v) for v in axes.ravel()]
    else:
        axes = _attr(n, "axes")
    rin = a.rank(n.inputs[0])
    if rin is None:
        a.block_layout(x, f"{n.op} '{n.name}': unknown rank")
        return
    if n.op == "Squeeze":
        if axes is None:
            s = a.shape(n.inputs[0])
            axes = [k for k, d in enumerate(s) if d == 1]
        axes = sorted(_norm_axis(v, rin) for v in axes)
        if any(v in x.axes for v in axes):
            a.block_layout(x, f"Squeeze '{n.name}' removes the channel axis")
            return
        new = tuple(ax - sum(1 for v in axes if v < ax) for ax in x.axes)
    else:
        rout = rin + len(axes)
        axes = sorted(_norm_axis(v, rout) for v in axes)
        pos = [k for k in range(rout) if k not in axes]  # output positions of input axes
        new = tuple(pos[ax] for ax in x.axes)
        if new != tuple(range(new[0], new[0] + len(new))):
            a.block_layout(x, f"Unsqueeze '{n.name}' splits the channel axes")
            return
    _set(a, n.outputs[0], Layout(new, x.ids, x.const))


def _softmax(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    default = -1 if a._opset >= 13 else 1
    ax = _norm_axis(int(_attr(n, "axis", default)), r)
    if (a._opset < 13 and any(l >= ax for l in x.axes)) or ax in x.axes:
        a.block_layout(x, f"{n.op} '{n.name}' normalizes over the channel axis")
        return
    _set(a, n.outputs[0], Layout(x.axes, x.ids, np.full(x.ids.shape, NAN)))


def _reduce(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    if x is None:
        return
    r = a.rank(n.inputs[0])
    if len(n.inputs) > 1 and n.inputs[1].name:
        axes = a.value(n.inputs[1])
        if axes is None:
            a.block_layout(x, f"{n.op} '{n.name}' axes computed at run time")
            return
        axes = [int(v) for v in axes.ravel()]
    else:
        axes = _attr(n, "axes")
    if axes is None or len(axes) == 0:
        if int(_attr(n, "noop_with_empty_axes", 0)):
            _set(a, n.outputs[0], x)
            return
        axes = list(range(r))
    axes = sorted(_norm_axis(v, r) for v in axes)
    if any(v in x.axes for v in axes):
        a.block_layout(x, f"{n.op} '{n.name}' reduces over the channel axis")
        return
    keep = int(_attr(n, "keepdims", 1))
    new = x.axes if keep else tuple(ax - sum(1 for v in axes if v < ax) for ax in x.axes)
    const = x.const if n.op in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(x.const == 0, 0.0, NAN)
    _set(a, n.outputs[0], Layout(new, x.ids, const))


def _qdq(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"{n.op} '{n.name}' scale carries channels")
    if x is None:
        return
    s = a.value(n.inputs[1])
    zp = a.value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    if s is None or s.ndim > 1:
        a.block_layout(x, f"{n.op} '{n.name}' scale computed at run time or blocked")
        return
    r = a.rank(n.inputs[0])
    s64 = s.astype(np.float64)
    z64 = np.zeros_like(s64) if zp is None else zp.astype(np.float64)
    if s.size > 1:
        ax = _norm_axis(int(_attr(n, "axis", 1)), r)
        if x.axes != (ax,) or s.size != x.ids.size:
            a.block_layout(x, f"{n.op} '{n.name}' per-axis scale not on the channel axis")
            return
        a.add_param(n, 1, 0, x.ids, "param", "scale")
        if zp is not None:
            a.add_param(n, 2, 0, x.ids, "param", "zero_point")
    with np.errstate(all="ignore"):
        if n.op == "QuantizeLinear":
            const = np.round(x.const / s64) + z64
        else:
            const = (x.const - z64) * s64
    _set(a, n.outputs[0], Layout(x.axes, x.ids, np.broadcast_to(const, x.ids.shape).astype(np.float64)))


def _passthrough(a: ChannelAnalysis, n: gs.Node, lays):
    x = lays[0]
    for l in lays[1:]:
        a.block_layout(l, f"{n.op} '{n.name}' (no rule for this input)")
    if x is not None:
        _set(a, n.outputs[0], x)


def _block_reads_shape(a: ChannelAnalysis, n: gs.Node, lays):
    for l in lays:
        a.block_layout(l, f"{n.op} '{n.name}' reads the channel count")


_SLOT0_ONLY = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
               "Resize", "Upsample", "Pad", "Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
               "Softmax", "LogSoftmax", "Hardmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
               "Clip", "Transpose", "QuantizeLinear", "DequantizeLinear", "Dropout"}

_RULES = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm,
    "Clip": _clip,
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze_unsqueeze,
    "Unsqueeze": _squeeze_unsqueeze,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    "ReduceMean": _reduce,
    "ReduceSum": _reduce,
    "ReduceMax": _reduce,
    "ReduceMin": _reduce,
    "QuantizeLinear": _qdq,
    "DequantizeLinear": _qdq,
    "Dropout": _unary,
    "Shape": _block_reads_shape,
    "Size": _block_reads_shape,
}
