"""Bit-plane storage of share's codebook indices (the graph that unpacks them at session start is
written by ``SharePass._emit`` in ``share_pass.py``).

ONNX representation (runs in onnxruntime, any opset >= 11)
----------------------------------------------------------
Indices are stored in uint8 bit planes: b is split into widths of 8, 4, 2, 1 (6 = 4 + 2,
3 = 2 + 1, 7 = 4 + 2 + 1) and a plane of width w holds 8/w indices per byte, so b bits per weight exactly.
The graph unpacks and rebuilds the weight with integer ops only:

    plane_w = Mod(Div(Cast<int32>(packed[m,1]), [1, 2^w, 2^2w, ...]), 2^w) -> Reshape[-1]
    a       = sum over planes of plane_w * 2^offset            (Mul, Add; Slice if padded)
    W       = Mul(Transpose(Reshape(Gather(codebook, a), shape)), s)   (GatherElements for groups;
              the Transpose only when the output axis is not first, e.g. MatMul weights)

All inputs are initializers, so onnxruntime's constant folding (any optimization level above
disabled) evaluates the chain once at session start and the Conv/MatMul sees a plain float
initializer: run-time memory and speed equal the float model's, the file holds b bits per
weight plus a K-entry codebook. (ONNX INT4/UINT4 tensors need opset 21 and give the same
4 bits; the planes work at any opset and also give 2, 3, 5, 6 and 7 bits.) Near-zero centroids
are set to exactly 0.0: denormal products slowed one PP-OCR Conv 20x.
"""

from __future__ import annotations

__all__ = ["bit_planes", "pack_indices", "unpack_indices"]

import numpy as np


def bit_planes(bits: int) -> list[tuple[int, int]]:
    """(width, offset) planes a ``bits``-bit index is split into, widths in {8, 4, 2, 1}."""
    planes, off = [], 0
    for w in (8, 4, 2, 1):
        while bits - off >= w:
            planes.append((w, off))
            off += w
    return planes


def pack_indices(idx: np.ndarray, bits: int) -> list[tuple[int, int, np.ndarray]]:
    """Pack indices (0 <= idx < 2^bits) into uint8 planes: [(width, offset, bytes [m, 1])]."""
    a = np.asarray(idx, np.int64).ravel()
    if a.size and (a.min() < 0 or a.max() >= 2 ** bits):
        raise ValueError(f"indices out of range for {bits} bits")
    out = []
    for w, off in bit_planes(bits):
        d = (a >> off) & ((1 << w) - 1)
        per = 8 // w
        pad = (-d.size) % per
        d = np.concatenate([d, np.zeros(pad, np.int64)]).reshape(-1, per)
        packed = np.zeros(d.shape[0], np.int64)
        for j in range(per):
            packed |= d[:, j] << (w * j)
        out.append((w, off, packed.astype(np.uint8).reshape(-1, 1)))
    return out


def unpack_indices(planes: list[tuple[int, int, np.ndarray]], n: int) -> np.ndarray:
    """Inverse of ``pack_indices`` in numpy, the same arithmetic as the ONNX unpack graph."""
    a = np.zeros(n, np.int64)
    for w, off, packed in planes:
        per = 8 // w
        p = packed.astype(np.int32).reshape(-1, 1)
        div = (np.int32(1) << (w * np.arange(per, dtype=np.int32))).reshape(1, -1)
        d = np.mod(p // div, 1 << w).reshape(-1)[:n]
        a += d.astype(np.int64) << off
    return a


# --------------------------------------------------------------------------- data awareness
