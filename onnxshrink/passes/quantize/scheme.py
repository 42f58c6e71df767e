"""The numeric scheme of static QDQ quantization: integer types and grids, and the opset they need.

- Activations: affine, ``q = clip(round(x / s) + z, qmin, qmax)`` (uint8 by default: u8 activations x
  s8 weights is the fast path of MLAS on x86 and ARM). 16-bit activations (uint16/int16, A16W8) use
  the same grid with 65536 levels, for NPUs that take them (QNN HTP); their Q/DQ ops are in the
  com.microsoft domain below opset 21, as onnxruntime's own quantizer emits them.
- Weights: symmetric int8 on ``[-wmax, wmax]``, per output channel (per-tensor option);
  ``wmax = 63`` (7 bits) on x86 without VNNI, where u8 x s8 pairs can saturate, for the targets
  that run such kernels (no target, ``cpu``, ``openvino``: the profile's ``x86_int8``), else 127.
- Opset: per-channel DequantizeLinear needs opset 13, QuantizeLinear opset 10. A model below 13 is
  upgraded by onnx's version converter and kept only when its outputs match the original's on one
  sample (``max|a - b| <= 1e-4 max|a|``); otherwise the weights are per tensor.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_DTYPES", "QuantScheme", "choose_scheme", "has_vnni", "upgrade_opset", "use_qdq_domain"]

import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import InputError
from onnxshrink.graph.convert import model_to_graph
from onnxshrink.runtime import make_session

ACTIVATION_DTYPES = ("uint8", "int8", "uint16", "int16")


@dataclass
class QuantScheme:
    """The integer types and grids of one quantization run."""

    activation_dtype: type  # numpy scalar type of quantized activations
    qmin: int               # the activation grid [qmin, qmax]
    qmax: int
    wmax: int               # weights on [-wmax, wmax]
    per_channel: bool       # per-output-channel weight scales
    qdq_domain: str = ""    # com.microsoft for 16-bit activations below opset 21


def has_vnni() -> bool:
    """True when u8 x s8 products cannot saturate: x86 with (AVX512-)VNNI, or any non-x86 CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # ARM sdot / neon paths do not saturate
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        return "avx512_vnni" in info or "avx_vnni" in info
    except OSError:
        return True


def choose_scheme(options, target) -> tuple[QuantScheme, dict]:
    """The scheme from the quantize options and the target profile (None: this CPU), and its
    description for the stats."""
    act = options.activation_dtype
    if act == "auto":
        act = getattr(target, "activation_dtype", "uint8") if target is not None else "uint8"
        if act not in ACTIVATION_DTYPES:
            act = "uint8"
    per_channel = options.per_channel and bool(getattr(target, "per_channel", True) if target is not None else True)
    # an NPU does not saturate; the cpu and openvino targets run x86 u8 x s8 kernels (profile x86_int8)
    reduce = options.reduce_range == "true" or (options.reduce_range == "auto" and not has_vnni() and
                                                (target is None or getattr(target, "x86_int8", False)))
    scheme = QuantScheme(activation_dtype=np.dtype(act).type, qmin=int(np.iinfo(act).min),
                         qmax=int(np.iinfo(act).max), wmax=63 if reduce else 127, per_channel=per_channel)
    return scheme, {"activations": act, "weights": "int8" + (" (7-bit)" if reduce else ""), "per_channel": per_channel}


def upgrade_opset(graph: gs.Graph, scheme: QuantScheme, upgrade: bool, to_model: Callable,
                  first_sample: Callable, stats: dict) -> gs.Graph:
    """``graph`` at an opset the scheme can use: unchanged from 13 on (or 10 with per-tensor weights),
    else upgraded to 13 when ``upgrade`` and the outputs on ``first_sample()`` match, else kept with per-tensor
    weights (``scheme.per_channel`` cleared). Records what happened in ``stats``."""
    opset = int(graph.opset or 0)
    stats["opset_in"] = opset
    if opset >= 13 or (not scheme.per_channel and opset >= 10):
        return graph
    if upgrade:
        try:
            from onnx import version_converter
            before = to_model(graph)
            after = version_converter.convert_version(before, 13)
            onnx.checker.check_model(after)
            sample = first_sample()
            if sample is not None:
                ra = make_session(before, optimize=False).run(None, sample)
                rb = make_session(after, optimize=False).run(None, sample)
                for a, b in zip(ra, rb):
                    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-6)
                    if a.shape != b.shape or float(np.max(np.abs(a - b))) > 1e-4 * scale:
                        raise ValueError("outputs changed")
            g2 = model_to_graph(after)
            stats["opset"] = f"upgraded {opset} -> 13"
            return g2
        except Exception as e:  # noqa: BLE001 - converter gaps: fall back to per-tensor weights
            stats["opset_upgrade_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if opset < 10:
        raise InputError(f"opset {opset} has no QuantizeLinear (needs >= 10) and the upgrade failed")
    scheme.per_channel = False
    stats["scheme"]["per_channel"] = False
    stats["opset"] = f"kept {opset}: per-tensor weights (per-channel DequantizeLinear needs opset 13)"
    return graph


def use_qdq_domain(scheme: QuantScheme, opset: int, stats: dict) -> None:
    """ONNX Q/DQ take 16-bit types from opset 21; onnxruntime (and its QNN EP) read the com.microsoft
    Q/DQ ops the same way below that (as its own quantizer emits them)."""
    if np.dtype(scheme.activation_dtype).itemsize == 2 and opset < 21:
        scheme.qdq_domain = "com.microsoft"
        stats["scheme"]["qdq_domain"] = scheme.qdq_domain
