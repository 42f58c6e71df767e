"""Channel rule of a MatMul of two activations: the attention products of a transformer.

Multi-head attention as PyTorch, Hugging Face and timm export it: Q, K, V projections (MatMul by
a constant, + bias), each Reshape [B, N, H*D] -> [B, N, H, D] and Transpose to [B, H, N, D]
(K to [B, H, D, N]), then
    S = Q K^T / sqrt(D)  [B, H, N, N],   P = softmax(S + mask),   O = P V  [B, H, N, D],
O transposed back and merged to [B, N, H*D], the output projection (a MatMul sink). A fused QKV
projection is reshaped to [B, N, 3, H, D], transposed to [3, B, H, N, D] and unbound along the
q/k/v axis (Split + Squeeze, Gather, or Slice + Squeeze: ``rules_layout``, which keeps that axis's
length). A Reshape feeding an attention product ties each head's channels (``feeds_activation_matmul``).
Channel ids
reach the products with a layout over a batch axis (the heads, H) and a matrix axis (D):

- ``Q K^T``: D is contracted. Head h of Q and head h of K are one unit (with the D ids of each,
  which the Reshape ties per head), and S carries the head ids on its head axis.
- ``P V``: P carries head ids, V the (H, D) ids; head h of P and of V are one unit, and O carries
  V's (H, D) ids (D is V's free axis).

So a unit is one head: its Q, K and V projection columns, the Reshape constants (H counted from
the kept heads), and the output projection's input rows. Removing a head is exact when its
context O_h is constant zero (a zeroed V projection: O_h = P_h 0 = 0, whatever Q_h and K_h are);
the scale 1/sqrt(D) does not change (D is kept). The output constant of ``P V`` is 0 where V's
channel is constant 0, else varying (P's rows are not known); of ``Q K^T`` 0 where a head of Q or
of K is all constant 0. Any other layout (a channel axis on M, or heads on different batch axes)
blocks its ids.
"""

from __future__ import annotations

__all__ = ["activation_matmul_rule", "feeds_activation_matmul"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.channels.types import Layout
from onnxshrink.graph.values import is_constant

# ops an attention path may pass between the head split and the product (scaling, a mask, casts, a
# fused QKV's unbind)
_PASS_OPS = {"Transpose", "Mul", "Div", "Add", "Sub", "Cast", "Identity", "Split", "Squeeze", "Gather", "Slice"}


def feeds_activation_matmul(t, depth: int = 5) -> bool:
    """Whether tensor ``t`` reaches, within ``depth`` pass-through ops (Transpose, scaling, a mask),
    a MatMul whose two operands are both activations (an attention product)."""
    if depth < 0 or t is None:
        return False
    for n in t.outputs:
        if n.op == "MatMul" and len(n.inputs) == 2 and not any(is_constant(x) for x in n.inputs):
            return True
        if n.op in _PASS_OPS and any(feeds_activation_matmul(o, depth - 1) for o in n.outputs):
            return True
    return False


def _heads(a, lay: Layout, r: int, matrix_axes: tuple) -> tuple[int, int | None] | None:
    """(head axis, matrix axis or None) of an operand's layout: one batch axis (< r - 2) and at
    most one of ``matrix_axes``; None when the layout is anything else."""
    batch = [ax for ax in lay.axes if ax < r - 2]
    rest = [ax for ax in lay.axes if ax >= r - 2]
    if len(batch) != 1 or len(rest) > 1 or (rest and rest[0] not in matrix_axes):
        return None
    return batch[0], (rest[0] if rest else None)


def activation_matmul_rule(a, n: gs.Node, lays: list) -> None:
    """MatMul of two activations (module doc)."""
    A, B = lays[0], lays[1]
    r = a.rank(n.outputs[0])
    ra, rb = a.rank(n.inputs[0]), a.rank(n.inputs[1])

    def block(why):
        for l in (A, B):
            a.block_layout(l, f"MatMul '{n.name}' {why}")

    if r is None or ra != r or rb != r or r < 3:
        block("of two activations with unknown or unequal ranks")
        return
    ha = _heads(a, A, r, (r - 1,)) if A is not None else None     # A's free axis M (r-2) never
    hb = _heads(a, B, r, (r - 2, r - 1)) if B is not None else None
    if (A is not None and ha is None) or (B is not None and hb is None) or A is None or B is None:
        block("of two activations: the channels are not attention heads on both operands")
        return
    (axa, ma), (axb, mb) = ha, hb
    H = A.ids.shape[0]
    if axa != axb or B.ids.shape[0] != H:
        block("of two activations: the operands' heads do not match")
        return
    # one unit per head on each operand (its D ids together), head h of A with head h of B
    for lay in (A, B):
        if lay.ids.ndim == 2:
            a.unite_across(lay.ids, 0)
    a.unite(A.ids.reshape(H, -1)[:, 0], B.ids.reshape(H, -1)[:, 0])
    contracted_a = ma == r - 1
    contracted_b = mb == r - 2
    if contracted_a != contracted_b or (contracted_a and A.ids.shape[1] != B.ids.shape[1]):
        block("of two activations: the contracted axis carries channels on one operand only")
        return
    with np.errstate(invalid="ignore"):
        if mb == r - 1:  # B's free axis carries the channels (P V): O keeps B's ids
            const = np.where(B.const == 0, 0.0, np.nan)
            a.set_layout(n.outputs[0], Layout((axa, r - 1), B.ids, const))
            return
        if contracted_a:
            a.heads.append((n.name, A.ids.reshape(H, -1)[:, 0].copy()))
        za = np.all(A.const.reshape(H, -1) == 0, axis=1)
        zb = np.all(B.const.reshape(H, -1) == 0, axis=1)
        a.set_layout(n.outputs[0], Layout((axa,), A.ids.reshape(H, -1)[:, 0].copy(), np.where(za | zb, 0.0, np.nan)))
