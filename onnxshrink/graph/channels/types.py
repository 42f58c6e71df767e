"""The records of the channel analysis: a tensor's channel layout, the members that follow a
removal (weight axes, per-channel parameters), the contracting consumers ("sinks"), the shape
fix-ups, the balance constraints of grouped convs, and the groups of channels removed together."""

from __future__ import annotations

__all__ = ["Layout", "Member", "Sink", "Fixup", "Balance", "ChannelGroup"]

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Layout:
    """Channel ids of a tensor: ``ids`` has the tensor's dims at ``axes`` (consecutive, sorted);
    ``const`` the same shape, the channel's constant value or NaN when it varies."""

    axes: tuple
    ids: np.ndarray
    const: np.ndarray

    @property
    def single(self) -> bool:
        """True when the channels lie along one axis."""
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
    w_member: Member | None = None   # the weight's input-axis member


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

