"""Int8 storage of the float weights that quantization keeps in float (not a pass: used by quantize).

A weight ``W`` of a Conv / ConvTranspose / Gemm / MatMul that stays float (its activations are not
quantized: too sensitive, or the integer kernel is slower) is stored per channel ``c`` along its
output axis as

    s_c = max|W_c| / 127   (s_c = 1 for an all-zero channel),   Q = clip(round(W / s_c), -127, 127)  int8,

and the graph computes ``W' = Cast<float>(Q) * s`` (``s`` shaped to broadcast along the axis):
``|W - W'| <= s_c / 2`` per element, ``n + 4 C`` bytes stored instead of ``4 n``. onnxruntime's
constant folding (a level-1 optimization, applied before partitioning, so for every EP that runs
float compute) evaluates Cast and Mul of initializers at session creation: the kernels see a
constant float weight (NCHWc convolutions included), so the model runs at float speed with float
activations from a file about a quarter the size. (A weight behind DequantizeLinear is not folded:
Conv then loses the NCHWc kernels, measured 27 % slower on PP-OCR det.)

Selection (``select_within_budget``): every candidate is stored; when the fidelity check fails, the
loss of each layer stored is measured end to end on a few samples (rounding error is amplified
very differently downstream: on PP-OCRv4 det one early conv causes most of the loss), layers are
ranked by loss per byte saved, and the longest prefix of that ranking that holds the check is
kept: searched from the top (all but 1, 2, 4, ... of the ranking's last layers, until one holds),
then bisected between the last prefix that broke the check and the first that held. Storage is
nearly free for most layers (PP-OCRv4 det: 53 of 54 hold), so the search from the top takes one or
two checks where a bisection from the middle takes log2(n).

The losses are found by splitting groups (``group_losses``), not by scoring each layer alone: the
loss ``L(G)`` of a group ``G`` of weights stored together is measured, starting from all of them;
a group is split in two halves (neighbours in graph order) while ``L(G) >= SPLIT_SHARE x L(all)``,
and a group below that share is not split further, its loss spread over its members by bytes
(equal loss per byte). Rounding errors of different layers are independent, so to first order
``1 - cos`` adds over a group (``1 - cos ~ |d|^2 / 2|y|^2`` with ``d`` the sum of the layers'
output deviations, whose cross terms average out): the few layers that matter are isolated in
about ``2 log2(n)`` measurements each, and the ranking is exact where the search cuts it (PP-OCRv4
det: 13 measurements instead of 54). The losses come from one session in which the weights are
overridable initializers (``overridable_weights``): each group's stored weights are fed in place of
the float ones, so every measurement shares one session.

Narrow storage (``pack_narrow`` / ``store_narrow``): a signed ``b``-bit integer tensor ``Q`` (``|Q| <=
2^(b-1) - 1``, 2 <= b <= 7) is stored as ``u = Q + 2^(b-1)`` split into bit planes of widths 4, 2 and
1 (the binary digits of b: 6 = 4 + 2), each plane's fields packed ``8 / k`` to a byte: ``n b / 8``
bytes for n values. The graph decodes it with float arithmetic that is exact below 2^24 (``Cast``,
``Mul`` by ``2^-(k i)``, ``Floor``, ``Mod 2^k``, the planes summed with their shifts, ``- 2^(b-1)``)
into an int8 tensor: a constant subgraph onnxruntime folds at load, so a kernel reading it (the
dynamic int8 MatMul, ``dynamic.narrow_weights``) sees a constant int8 weight and runs at its int8
speed. Its first node is a narrow-int Cast, which the project's constant folding leaves alone
(``graph.values.is_weight_decode``).
"""

from __future__ import annotations

__all__ = ["WEIGHT_OPS", "storage_axis", "candidates", "int8_channels", "store_int8", "int8_saving",
           "select_within_budget", "overridable_weights", "NARROW_BITS", "pack_narrow", "unpack_narrow",
           "narrow_bytes", "store_narrow"]

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (np.float32, np.float16)
MIN_ELEMENTS = 256  # below this the scale vector and two nodes cost about what the int8 saves


def storage_axis(op: str, attrs: dict, ndim: int) -> int:
    """The weight's output-channel axis (any axis is exact for Cast x Mul; this one keeps the error
    per output channel, like per-channel quantization)."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if ndim > 1 else 0
    if op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else ndim - 1
    return ndim - 1  # MatMul: [.., K, N]


def candidates(graph: gs.Graph, skip: set | frozenset = frozenset(), min_elements: int = MIN_ELEMENTS) -> dict:
    """{weight tensor name: [consumer nodes]} of float constant weights (input 1) every consumer of
    which is a float Conv/ConvTranspose/Gemm/MatMul not in ``skip`` (node names)."""
    out: dict = {}
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or w.name in out:
            continue
        vals = w.values
        if np.dtype(vals.dtype).type not in FLOAT_TYPES or vals.size < min_elements or vals.ndim < 2:
            continue
        if isinstance(node.inputs[0], gs.Constant) or not np.isfinite(vals).all():
            continue  # a non-finite weight has no int8 grid
        users = list(w.outputs)
        if all(u.op in WEIGHT_OPS and len(u.inputs) > 1 and u.inputs[1] is w and u.inputs[0] is not w
               and u.name not in skip for u in users) and users:
            out[w.name] = users
    return out


def int8_channels(W: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(Q int8, s) with ``W ~ Q * s``, symmetric: ``s = max|W| / qmax`` per channel along ``axis``
    (None: one scale for the tensor; an all-zero channel gets 1); ``s`` float32, broadcastable to W.
    The quantize pass's weight grid too (``_Quantizer.weight_quant``)."""
    W = np.asarray(W, np.float32)
    if axis is None:
        m = np.max(np.abs(W)).reshape([1] * W.ndim)
    else:
        m = np.max(np.abs(W), axis=tuple(i for i in range(W.ndim) if i != axis), keepdims=True)
    s = (m / qmax).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    Q = np.clip(np.round(W / s), -qmax, qmax).astype(np.int8)
    return Q, s


def int8_saving(w: gs.Constant) -> int:
    """Bytes storing the weight ``w`` int8 saves, to within its per-channel scales (one byte per
    element instead of the float's itemsize)."""
    return int(w.values.nbytes - w.values.size)


def store_int8(graph: gs.Graph, weights: dict) -> dict:
    """Replace each weight of ``weights`` ({name: consumers}, from ``candidates``) by
    ``Mul(Cast(Q), s)``; returns {name: bytes saved}."""
    saved = {}
    for name, users in weights.items():
        w = users[0].inputs[1]
        W = np.asarray(w.values)
        axis = storage_axis(users[0].op, users[0].attrs, W.ndim)
        Q, s = int8_channels(W, axis)
        dt = W.dtype
        q = gs.Constant(f"{name}.int8", Q)
        sc = gs.Constant(f"{name}.int8_scale", s.astype(dt))
        c = gs.Variable(f"{name}.int8_cast", dtype=dt, shape=list(W.shape))
        y = gs.Variable(f"{name}.int8_weight", dtype=dt, shape=list(W.shape))
        graph.nodes.append(gs.Node("Cast", name=f"{name}.int8_cast", inputs=[q], outputs=[c],
                                   attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dt)}))
        graph.nodes.append(gs.Node("Mul", name=f"{name}.int8_dequant", inputs=[c, sc], outputs=[y]))
        for u in users:
            u.inputs[1] = y
        saved[name] = int(W.nbytes - Q.nbytes - sc.values.nbytes)
    graph.toposort()
    return saved


SPLIT_SHARE = 1 / 16  # a group of stored weights is split while its loss is this share of all's or more


def group_losses(names: list, group_loss: Callable[[list], float], nbytes: dict,
                 total: float | None = None) -> tuple[dict, int]:
    """Each weight's loss from losses of groups (module docstring): ``group_loss(G)`` is the loss with
    the weights ``G`` stored together (``total`` that of all of ``names``, when known); a group is
    split in halves while its loss is at least ``SPLIT_SHARE`` of the total, and a group below it
    spreads its loss over its members by bytes. Returns ({name: loss}, measurements taken)."""
    measured = 0
    if total is None:
        total, measured = max(float(group_loss(list(names))), 0.0), 1
    floor = SPLIT_SHARE * total
    losses: dict = {}
    stack = [(list(names), total)]
    while stack:
        grp, loss = stack.pop()
        if len(grp) == 1:
            losses[grp[0]] = loss
        elif loss < floor or loss <= 0.0:
            size = sum(max(nbytes[n], 1) for n in grp)
            losses.update({n: loss * max(nbytes[n], 1) / size for n in grp})
        else:
            half = len(grp) // 2
            for part in (grp[half:], grp[:half]):
                stack.append((part, max(float(group_loss(part)), 0.0)))
                measured += 1
    return losses, measured


def select_within_budget(model: onnx.ModelProto, weights: dict, holds: Callable[[onnx.ModelProto], bool],
                         scorer: Callable[[dict], Callable[[list], float]],
                         build: Callable[[list], onnx.ModelProto] | None = None,
                         none_holds: Callable[[], bool] | None = None) -> tuple[list, dict]:
    """The weights (names) to store so that ``holds`` is true of the model with them stored
    (module docstring: all, else the longest loss-per-byte prefix that holds). ``scorer``, given
    {name: the weight as stored (``Q x s``, float)}, returns the group loss: a function of a list of
    names giving the loss of the model with those weights so (``group_losses``). ``build(names)``
    makes the model ``holds`` judges, with those weights stored as the caller will emit them
    (``store_int8``: the model checked last is then the result itself, whose outputs the caller's
    validation can reuse); by default ``model`` with those initializers replaced by ``Q x s``, which
    computes the same (onnxruntime folds ``Cast x Mul`` into that float tensor at load).
    ``none_holds``: whether ``holds`` is true with nothing stored, when that is not known (asked only
    once storing every weight fails): when not, no subset is searched for (``holds`` fails on the model
    itself) and none is stored. Returns (names, log)."""
    names = list(weights)
    if not names:
        return [], {"checked": "nothing to store"}
    init_axis = {n: storage_axis(weights[n][0].op, weights[n][0].attrs, np.asarray(weights[n][0].inputs[1].values).ndim)
                 for n in names}
    idx = {t.name: i for i, t in enumerate(model.graph.initializer)}
    stored: dict = {}  # name -> its weight as stored (Q * s), each computed once across the trials
    for n in names:
        W = onnx.numpy_helper.to_array(model.graph.initializer[idx[n]])
        Q, s = int8_channels(W, init_axis[n])
        stored[n] = (Q.astype(np.float32) * s).astype(W.dtype)

    def with_stored(subset) -> onnx.ModelProto:
        if build is not None:
            return build(list(subset))
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for n in subset:
            m.graph.initializer[idx[n]].CopyFrom(onnx.numpy_helper.from_array(stored[n], n))
        return m

    if holds(with_stored(names)):
        return names, {"checked": f"all {len(names)} stored: holds"}
    if none_holds is not None and not none_holds():
        return [], {"checked": f"all {len(names)} stored broke the check, and so does the model with none "
                               f"stored: none stored"}
    nbytes = {n: int(np.asarray(weights[n][0].inputs[1].values).nbytes) for n in names}
    losses, measured = group_losses(names, scorer(stored), nbytes)
    order = sorted(names, key=lambda n: (losses[n] / max(nbytes[n], 1), n))
    lo, hi = 0, len(order)  # holds(lo) (nothing stored is the float model), not holds(hi)
    trials = [{"stored": len(order), "holds": False}]
    step = 1
    while hi - step > lo:  # from the top: all but 1, 2, 4, ... of the ranking's last layers
        mid = hi - step
        ok = holds(with_stored(order[:mid]))
        trials.append({"stored": mid, "holds": bool(ok)})
        if ok:
            lo = mid
            break
        hi, step = mid, 2 * step
    while hi - lo > 1:  # then bisection between the last prefix that broke and the first that held
        mid = (lo + hi) // 2
        ok = holds(with_stored(order[:mid]))
        trials.append({"stored": mid, "holds": bool(ok)})
        lo, hi = (mid, hi) if ok else (lo, mid)
    worst = sorted(names, key=lambda n: -losses[n])[:5]
    return order[:lo], {"checked": f"all {len(names)} stored broke the check; {lo} kept by loss per byte",
                        "scored": f"{measured} group measurements for {len(names)} weights",
                        "bisection": trials, "most_sensitive": {n: float(f"{losses[n]:.3e}") for n in worst}}


def overridable_weights(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are also graph inputs (overridable
    initializers, IR version 4 and later): a run that feeds one of them uses the value fed, the
    others keep their initializer. onnxruntime does not constant-fold or pre-pack an overridable
    weight, so one session scores many weight variants at somewhat lower speed per run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = max(m.ir_version, 4)
    have = {i.name for i in m.graph.input}
    inits = {t.name: t for t in m.graph.initializer}
    for n in names:
        if n not in have:
            t = inits[n]
            m.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
    return m


NARROW_BITS = (2, 3, 4, 5, 6, 7)


def _planes(bits: int) -> list[tuple[int, int]]:
    """The bit planes of a ``bits``-bit field: [(width k, shift)], widest first (6 -> (4, 0), (2, 4))."""
    if bits not in NARROW_BITS:
        raise ValueError(f"narrow storage takes {NARROW_BITS[0]} to {NARROW_BITS[-1]} bits, not {bits}")
    out, shift = [], 0
    for k in (4, 2, 1):
        if bits - shift >= k:
            out.append((k, shift))
            shift += k
    return out


def narrow_bytes(n: int, bits: int, ndim: int = 0) -> int:
    """Bytes ``pack_narrow`` stores for n values of ``bits`` bits; with ``ndim`` (the tensor's rank),
    plus the constants of ``store_narrow``'s decoder (about 100 bytes)."""
    total = 0
    for k, shift in _planes(bits):
        per = 8 // k
        m = -(-n // per)
        total += m
        if ndim:  # the column shape, the field weights, the modulus, the flat shape, [slice], [shift]
            total += 16 + 4 * per + 4 + 8 + (16 if m * per != n else 0) + (4 if shift else 0)
    return total + (4 + 8 * ndim if ndim else 0)  # the offset and the output shape


def pack_narrow(Q: np.ndarray, bits: int) -> list[np.ndarray]:
    """The uint8 planes storing the signed ``bits``-bit integers ``Q`` (flattened, C order); see the
    module docstring. Raises ValueError when a value does not fit."""
    q = np.asarray(Q).reshape(-1).astype(np.int64)
    half = 1 << (bits - 1)
    if q.size and (q.max() >= half or q.min() <= -half):
        raise ValueError(f"values beyond {bits} bits (|q| <= {half - 1})")
    u = q + half
    planes = []
    for k, shift in _planes(bits):
        per = 8 // k
        f = (u >> shift) & ((1 << k) - 1)
        f = np.concatenate([f, np.zeros((-f.size) % per, np.int64)]).reshape(-1, per)
        planes.append((f << (k * np.arange(per))).sum(axis=1).astype(np.uint8))
    return planes


def unpack_narrow(planes: list[np.ndarray], bits: int, n: int) -> np.ndarray:
    """The int8 values ``pack_narrow`` stored (numpy; the graph's decoder computes the same)."""
    u = np.zeros(n, np.int64)
    for P, (k, shift) in zip(planes, _planes(bits)):
        per = 8 // k
        f = (P.astype(np.int64)[:, None] >> (k * np.arange(per))) & ((1 << k) - 1)
        u += f.reshape(-1)[:n] << shift
    return (u - (1 << (bits - 1))).astype(np.int8)


def store_narrow(graph: gs.Graph, Q: np.ndarray, bits: int, name: str) -> gs.Variable:
    """Add the packed planes of the int8 tensor ``Q`` (values within ``bits`` bits) to ``graph`` with
    their decoder (module docstring); returns the decoder's int8 output, shaped like Q."""
    n = int(Q.size)
    total = None

    def node(op, inputs, tag, attrs=None):
        y = gs.Variable(f"{tag}.{op.lower()}{len(graph.nodes)}", dtype=np.float32)
        graph.nodes.append(gs.Node(op, name=y.name, inputs=inputs, outputs=[y], attrs=attrs or {}))
        return y
    for i, (P, (k, shift)) in enumerate(zip(pack_narrow(Q, bits), _planes(bits))):
        per = 8 // k
        t = f"{name}.b{bits}p{i}"
        c = node("Cast", [gs.Constant(t, P)], t, {"to": onnx.TensorProto.FLOAT})
        c = node("Reshape", [c, gs.Constant(f"{t}.col", np.array([-1, 1], np.int64))], t)
        f = node("Mul", [c, gs.Constant(f"{t}.w", (2.0 ** (-k * np.arange(per))).astype(np.float32))], t)
        f = node("Floor", [f], t)
        f = node("Mod", [f, gs.Constant(f"{t}.m", np.array(float(1 << k), np.float32))], t, {"fmod": 1})
        f = node("Reshape", [f, gs.Constant(f"{t}.flat", np.array([-1], np.int64))], t)
        if P.size * per != n:
            f = node("Slice", [f, gs.Constant(f"{t}.s0", np.array([0], np.int64)),
                               gs.Constant(f"{t}.s1", np.array([n], np.int64))], t)
        if shift:
            f = node("Mul", [f, gs.Constant(f"{t}.shift", np.array(float(1 << shift), np.float32))], t)
        total = f if total is None else node("Add", [total, f], t)
    tag = f"{name}.b{bits}"
    y = gs.Variable(f"{tag}.signed", dtype=np.float32)
    graph.nodes.append(gs.Node("Sub", name=y.name, inputs=[total, gs.Constant(
        f"{tag}.offset", np.array(float(1 << (bits - 1)), np.float32))], outputs=[y]))
    q = gs.Variable(f"{tag}.int8", dtype=np.int8)
    graph.nodes.append(gs.Node("Cast", name=q.name, inputs=[y], outputs=[q], attrs={"to": onnx.TensorProto.INT8}))
    out = gs.Variable(f"{tag}.weight", dtype=np.int8, shape=list(Q.shape))
    graph.nodes.append(gs.Node("Reshape", name=out.name, inputs=[q, gs.Constant(
        f"{tag}.shape", np.array(Q.shape, np.int64))], outputs=[out]))
    return out
