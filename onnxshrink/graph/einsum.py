"""Two-operand Einsum as MatMul: the exact rewrite of the batched matrix products einsum spells.

An equation ``A,B->Y`` without ellipsis and without a letter repeated within a term sorts its
letters into four groups:

    batch  b: in A, B and Y          (one product per batch index)
    m:        in A and Y only        (rows)
    k:        in A and B, not in Y   (the contraction, summed)
    n:        in B and Y only        (columns)

and computes, for every batch index, ``Y[b, m, n] = sum_k A[b, m, k] B[b, k, n]``: a MatMul of
``A'`` (A transposed to (b, m, k), reshaped to ``[b..., M, K]``) and ``B'`` (B transposed to
(b, k, n), reshaped to ``[b..., K, N]``), ``M``, ``K``, ``N`` the products of the groups' sizes,
whose ``[b..., M, N]`` output is reshaped to (b, m, n) and transposed to Y's order. Without batch
letters ``A'`` keeps its row letters as MatMul's broadcast dimensions and ``B'`` is 2-D. Only the
MatMul does arithmetic, and it sums the same products as the Einsum: onnxruntime's CPU Einsum
itself runs a MatMul after the same transposes (outputs bit-identical on the cases tested). A
constant operand's transpose and reshape are done once, into a new initializer, so an Einsum with
a weight (tf2onnx's ``EinsumDense``, ``abc,cd->abd``) becomes a MatMul with a constant 2-D weight,
which the quantizer, svd and every EP take.

Left as Einsum: ellipsis, a repeated letter (a diagonal), a letter of one operand the output
drops (a sum over one operand), no contracted letter (an outer product), other than two operands,
an empty or implicit mixed-case output, a type other than float16/32/64, and a reshape whose sizes
are unknown (a group of several letters needs its sizes, except where a Reshape can copy a
dimension (0) or infer one (-1)).

Why: QNN HTP's Einsum builder takes four lowercase patterns only (torchvision's maxvit spells
``BGHID,BGHJD->BGHIJ`` and is rejected there); XNNPACK, NNAPI and CoreML have no Einsum; the
quantizer has no integer Einsum (a float island between integer kernels); and onnxruntime's CPU
Einsum is slower than the MatMul (maxvit's attention product, one thread: 0.34 vs 0.22 ms).
"""

from __future__ import annotations

__all__ = ["einsum_groups", "einsum_to_matmul", "parse_einsum"]

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import is_default_domain

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class EinsumGroups(NamedTuple):
    """An equation's terms and its letters by role (module docstring), each in its operand's order."""

    a: str
    b: str
    out: str
    batch: list
    m: list
    k: list
    n: list


def parse_einsum(equation: str) -> tuple[str, str, str] | None:
    """``(a, b, out)`` of a two-operand equation without ellipsis or repeated letters (an implicit
    output: the letters that occur once, sorted, when all of one case); None otherwise."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if not arrow:
        once = [c for c in a + b if (a + b).count(c) == 1]
        if not (all(c.islower() for c in once) or all(c.isupper() for c in once)):
            return None
        out = "".join(sorted(once))
    for t in (a, b, out):
        if not (t.isascii() and t.isalpha()) or len(set(t)) != len(t):
            return None
    if not set(out) <= set(a) | set(b):
        return None
    return a, b, out


def einsum_groups(equation: str) -> EinsumGroups | None:
    """The equation's letters by role, when the equation is a batched matrix product (module
    docstring); None when it is not."""
    parsed = parse_einsum(equation)
    if parsed is None:
        return None
    a, b, out = parsed
    batch = [c for c in a if c in b and c in out]
    m = [c for c in a if c not in b]
    k = [c for c in a if c in b and c not in out]
    n = [c for c in b if c not in a]
    if not k or any(c not in out for c in m + n):
        return None
    return EinsumGroups(a, b, out, batch, m, k, n)


def einsum_to_matmul(graph: gs.Graph, fresh: Callable[[str], str],
                     skip: Callable[[gs.Node], bool] | None = None) -> int:
    """Every two-operand Einsum of ``graph`` (not its subgraphs) that is a batched matrix product
    becomes Transpose/Reshape -> MatMul -> Reshape/Transpose (module docstring); ``fresh(base)``
    names the new tensors and nodes, ``skip(node)`` keeps a node as it is. Returns how many."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "Einsum" or not is_default_domain(node) or len(node.inputs) != 2 or \
                len(node.outputs) != 1 or (skip is not None and skip(node)):
            continue
        g = einsum_groups(str(node.attrs.get("equation", "")))
        if g is None:
            continue
        plan = _plan(node, g)
        if plan is None:
            continue
        _emit(graph, node, g, plan, fresh)
        done += 1
    if done:
        graph.nodes = [nd for nd in graph.nodes if nd.outputs]
    return done


def _plan(node: gs.Node, g: EinsumGroups) -> tuple | None:
    """The three reshape targets (``None`` where no reshape is needed) of ``node``'s rewrite, or
    None when a size it needs is unknown, the operands' ranks do not match the equation, or the
    type is not a float."""
    x, w = node.inputs
    dtype = x.dtype if x.dtype is not None else w.dtype  # a constant's too (gs.Constant.dtype)
    try:
        if dtype is None or np.dtype(dtype) not in [np.dtype(f) for f in FLOAT_DTYPES]:
            return None
    except TypeError:  # not a numpy type (bfloat16, float8): left as it is
        return None
    sizes: dict = {}
    for t, term in ((x, g.a), (w, g.b)):
        shape = t.shape
        if shape is None:
            continue
        if len(shape) != len(term):
            return None
        for c, d in zip(term, shape):
            if isinstance(d, (int, np.integer)) and d >= 0:
                sizes.setdefault(c, int(d))

    def prod(letters) -> int | None:
        return math.prod(sizes[c] for c in letters) if all(c in sizes for c in letters) else None

    nb, m, k, n = len(g.batch), g.m, g.k, g.n
    # each target: [0 (copy the dimension at this index) | size | None (unknown: -1, at most one)]
    if nb == 0:  # A' keeps its rows as MatMul's broadcast dimensions; B' is [K, N]
        shape_a = None if len(k) == 1 else [0] * len(m) + [prod(k)]
        shape_b = None if len(k) == 1 and len(n) == 1 else \
            [0 if len(k) == 1 else prod(k), 1 if not n else 0 if len(k) == 1 and len(n) == 1 else prod(n)]
        shape_y = None if len(n) == 1 else [0] * len(m) + [sizes.get(c) for c in n]
    else:
        shape_a = None if len(m) == 1 and len(k) == 1 else \
            [0] * nb + [1 if not m else 0 if len(m) == 1 else prod(m), 0 if len(m) == 1 and len(k) == 1 else prod(k)]
        shape_b = None if len(k) == 1 and len(n) == 1 else \
            [0] * nb + [0 if len(k) == 1 else prod(k), 1 if not n else prod(n)]
        shape_y = None if len(m) == 1 and len(n) == 1 else \
            [0] * nb + ([0] if len(m) == 1 else [sizes.get(c) for c in m]) + \
            ([0] if len(m) == 1 and len(n) == 1 else [sizes.get(c) for c in n])
    targets = []
    for target in (shape_a, shape_b, shape_y):
        if target is not None:
            if sum(d is None for d in target) > 1:
                return None
            target = [-1 if d is None else d for d in target]
        targets.append(target)
    return tuple(targets)


def _emit(graph: gs.Graph, node: gs.Node, g: EinsumGroups, plan: tuple, fresh) -> None:
    """Replace ``node`` by the rewrite ``plan`` (``_plan``) describes."""
    shape_a, shape_b, shape_y = plan
    x, w = node.inputs
    y = node.outputs[0]
    dtype = x.dtype if x.dtype is not None else w.dtype
    base = node.name or "einsum"
    new: list = []

    def step(op: str, t: gs.Tensor, attrs: dict | None = None, extra: list | None = None,
             out: gs.Tensor | None = None) -> gs.Tensor:
        out = out if out is not None else gs.Variable(fresh(f"{base}_{op.lower()}_out"), dtype=dtype)
        new.append(gs.Node(op, fresh(f"{base}_{op.lower()}"), attrs or {}, inputs=[t, *(extra or [])], outputs=[out]))
        return out

    def operand(t: gs.Tensor, term: str, order: list, target) -> gs.Tensor:
        perm = [term.index(c) for c in order]
        if isinstance(t, gs.Constant):
            v = np.transpose(t.values, perm)
            if target is not None:
                v = v.reshape([v.shape[i] if d == 0 else d for i, d in enumerate(target)])
            if perm == list(range(len(perm))) and target is None:
                return t
            return gs.Constant(fresh(f"{t.name}_matmul"), np.ascontiguousarray(v))
        if perm != list(range(len(perm))):
            t = step("Transpose", t, {"perm": perm})
        if target is not None:
            t = step("Reshape", t, extra=[gs.Constant(fresh(f"{base}_shape"), np.array(target, np.int64))])
        return t

    a2 = operand(x, g.a, g.batch + g.m + g.k, shape_a)
    b2 = operand(w, g.b, g.batch + g.k + g.n, shape_b)
    order = g.batch + g.m + g.n
    perm_y = [order.index(c) for c in g.out]
    last = shape_y is None and perm_y == list(range(len(perm_y)))
    t = step("MatMul", a2, extra=[b2], out=y if last else None)
    if shape_y is not None:
        last = perm_y == list(range(len(perm_y)))
        t = step("Reshape", t, extra=[gs.Constant(fresh(f"{base}_shape"), np.array(shape_y, np.int64))],
                 out=y if last else None)
    if not last:
        step("Transpose", t, {"perm": perm_y}, out=y)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(new)
