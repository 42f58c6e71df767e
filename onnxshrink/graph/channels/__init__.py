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
layout is the transposed id matrix flattened: the index map of the permutation.

``analyze`` returns the full analysis (members: every weight axis, shape constant and attribute
that must follow a removal, with its index map), which the prune pass uses;
``coupled_channel_groups`` returns the groups. Modules: ``types`` (the records), ``analysis``
(the walk and the groups), ``rules`` (the per-op table) with ``rules_weighted``,
``rules_channelwise``, ``rules_layout`` and ``rules_attention`` (attention heads), ``balance``
(balanced_selection), ``summary`` (what the units are: heads, neurons, channels).
"""

from onnxshrink.graph.channels.analysis import ChannelAnalysis, analyze, coupled_channel_groups
from onnxshrink.graph.channels.balance import balanced_repair, balanced_selection, is_balanced
from onnxshrink.graph.channels.rules_weighted import conv_pads_are_zero
from onnxshrink.graph.channels.summary import group_kind, transformer_summary
from onnxshrink.graph.channels.types import Balance, ChannelGroup, Fixup, Layout, Member, Sink

__all__ = ["Layout", "Member", "Sink", "Fixup", "Balance", "ChannelGroup", "ChannelAnalysis", "analyze",
           "coupled_channel_groups", "balanced_selection", "balanced_repair", "is_balanced", "conv_pads_are_zero",
           "group_kind", "transformer_summary"]
