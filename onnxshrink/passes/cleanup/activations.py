"""Hard activations written out as elementwise chains, fused back into ONNX's HardSigmoid (a step
of the cleanup pass).

PaddlePaddle (below opset 14) and some TensorFlow exports write hard-sigmoid and hard-swish as

    hard_sigmoid(x) = Clip(x + 3, 0, 6) / 6            (Div by 6, or Mul by 1/6)
    hard_swish(x)   = x * Clip(x + 3, 0, 6) / 6        (the Mul's operands in either order)

and both are ``HardSigmoid(x; alpha=1/6, beta=1/2) = max(0, min(1, x/6 + 1/2))``, the second
``x * HardSigmoid(x; 1/6, 1/2)``. Equal in real arithmetic; in float the fused form rounds
``x/6 + 1/2`` once where the chain rounds ``x + 3`` and the division, so outputs agree to float
round-off. Four elementwise passes over the tensor become two. HardSigmoid exists from opset 6, so
the model's opset is kept; a target with HardSwish fuses the pair further at emission
(``targets.rewrites``). On PP-OCR mobile cls (18 hard-swishes) the float model runs 1.44x faster on
one onnxruntime thread, PP-OCRv4 rec 1.08x, det 1.07x.

This step runs before the scale folds: those would move the ``/ 6`` into the following Conv and
leave a three-op chain behind.
"""

from __future__ import annotations

__all__ = ["fuse_hard_activations", "target_takes_hard_sigmoid"]

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.graph.values import clip_range
from onnxshrink.passes.cleanup.constants import constant_operand
from onnxshrink.passes.cleanup.rewrite import (
    FreshNames,
    detach,
    drop_detached,
    graph_input_ids,
    graph_output_ids,
    is_default_domain,
    producer,
    single_use,
)
from onnxshrink.targets.rewrites import decomposed_for

HARD_SIGMOID = {"alpha": 1.0 / 6.0, "beta": 0.5}


def target_takes_hard_sigmoid(target) -> bool:
    """Whether to fuse the chains for ``target`` (None: this CPU): not where the target's preparation
    decomposes HardSigmoid (NNAPI, which lacks it; XNNPACK lacks it too, but leaves it to the CPU EP
    beside it). Fusing the chains back gave PP-OCRv4 det's quantized model 10 HardSigmoids inside QDQ
    groups, which the emission cannot split, and NNAPI refused it."""
    return not decomposed_for(target, "HardSigmoid")


def fuse_hard_activations(sub: gs.Graph, root: gs.Graph, names: FreshNames) -> int:
    """Every ``Clip(x + 3, 0, 6) / 6`` of ``sub`` becomes ``HardSigmoid(x; 1/6, 1/2)`` and every
    ``x * Clip(x + 3, 0, 6) / 6`` becomes ``x * HardSigmoid(x; 1/6, 1/2)``, when the chain's
    intermediate tensors are read by the chain only. Returns how many chains were fused."""
    n = 0
    outs, ins = graph_output_ids(root), graph_input_ids(root)
    for clip in [c for c in sub.nodes if c.op == "Clip" and is_default_domain(c)]:
        if not clip.outputs or clip_range(clip) != (0.0, 6.0):
            continue
        add = producer(clip.inputs[0], sub, ("Add", "Sub"))
        if add is None or not single_use(clip.inputs[0], clip, outs, ins):
            continue
        shifted = constant_operand(add)
        if shifted is None or shifted[3] != "Add" or not _is_scalar(shifted[1], 3.0, shifted[0]):
            continue
        x, t = shifted[0], clip.outputs[0]
        if not (isinstance(t, gs.Variable) and id(t) not in outs and len(t.outputs) == 1):
            continue
        user = t.outputs[0]
        if user not in sub.nodes:
            continue
        if _divides_by_six(user, t, x):  # hard-sigmoid: Clip(x + 3, 0, 6) / 6
            chain, times_x = [user], False
        elif user.op == "Mul" and is_default_domain(user) and len(user.inputs) == 2 and \
                {id(i) for i in user.inputs} == {id(x), id(t)} and user.outputs:
            m = user.outputs[0]  # hard-swish: x * Clip(x + 3, 0, 6), then / 6
            if not (isinstance(m, gs.Variable) and id(m) not in outs and len(m.outputs) == 1):
                continue
            scale = m.outputs[0]
            if scale not in sub.nodes or not single_use(m, scale, outs, ins) or not _divides_by_six(scale, m, x):
                continue
            chain, times_x = [user, scale], True
        else:
            continue
        y = chain[-1].outputs[0]
        for node in [add, clip, *chain]:
            detach(node)
        base = clip.name or "hard"
        if times_x:
            h = gs.Variable(names.fresh(f"{base}_hardsigmoid_out"), dtype=x.dtype, shape=x.shape)
            sub.nodes.append(gs.Node("HardSigmoid", names.fresh(f"{base}_hardsigmoid"), dict(HARD_SIGMOID),
                                     inputs=[x], outputs=[h]))
            sub.nodes.append(gs.Node("Mul", names.fresh(f"{base}_hardswish"), inputs=[x, h], outputs=[y]))
        else:
            sub.nodes.append(gs.Node("HardSigmoid", names.fresh(f"{base}_hardsigmoid"), dict(HARD_SIGMOID),
                                     inputs=[x], outputs=[y]))
        n += 1
    drop_detached(sub)
    return n


def _divides_by_six(node: gs.Node, t: gs.Tensor, x: gs.Tensor) -> bool:
    """Whether ``node`` is ``t / 6`` or ``t * (1/6)`` by a one-element constant that does not
    broadcast ``x``'s shape."""
    scaled = constant_operand(node)
    return scaled is not None and scaled[0] is t and scaled[3] == "Mul" and _is_scalar(scaled[1], 1.0 / 6.0, x)


def _is_scalar(c: np.ndarray, value: float, x: gs.Tensor) -> bool:
    """Whether ``c`` holds one element equal to ``value`` (to float32 precision) and its rank cannot
    widen ``x``'s (a rank-0 constant, or ``x`` of known rank at least as high)."""
    if c.size != 1 or not np.isclose(float(c.reshape(-1)[0]), value, rtol=1e-6, atol=0.0):
        return False
    return c.ndim == 0 or (x.shape is not None and len(x.shape) >= c.ndim)
