"""Convolution inputs as patch rows (im2col) and their covariance, for every pass that fits a Conv's weights.

A 2-D Conv with kernel ``kh x kw``, strides ``(sh, sw)``, dilations ``(dh, dw)``, pads
``(top, left, bottom, right)`` and ``groups`` computes, at output position ``(n, oy, ox)``,

    y[n, o, oy, ox] = sum_{c, i, j} W[o, c, i, j] * xp[n, g(o) * C_in/groups + c, oy * sh + i * dh, ox * sw + j * dw]

with ``xp`` the zero-padded input and ``g(o)`` the group of output channel ``o``. The patch row of that position
and group, ``p[(c, i, j)] = xp[n, g * C_in/groups + c, oy * sh + i * dh, ox * sw + j * dw]`` (``D = C_in/groups *
kh * kw`` entries, c-major then i then j: the order of ``W[o].reshape(-1)``), turns the Conv into a matrix
product per group: ``y[n, o, oy, ox] = W_flat[o] . p_g(o)``. ``conv_patches`` returns these rows ``[P, groups,
D]`` for the output positions ``P`` (all ``N * OH * OW`` of them, flat index ``(n * OH + oy) * OW + ox``, or a
sampled subset); ``patch_covariance`` returns ``sum_p p p^T`` per group (``[groups, D, D]``), the ``X^T X`` that
whitening (svd), GPTQ rounding (quantize) and error feedback (share) need, without building the whole patch
matrix. ``OH = (H + top + bottom - dh (kh - 1) - 1) // sh + 1`` (likewise ``OW``); ``auto_pad=SAME_UPPER /
SAME_LOWER`` pads ``total = max(0, (ceil(H / sh) - 1) sh + dh (kh - 1) + 1 - H)`` split with the odd pixel at the
end (UPPER) or start (LOWER); ``VALID`` pads nothing. 1-D convolutions are 2-D ones of height 1.
"""

from __future__ import annotations

__all__ = ["ConvGeometry", "sample_positions", "conv_patches", "patch_covariance"]

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, strides, dilations, pads and groups of a 2-D Conv (a 1-D one as height 1).

    ``pads`` are the attribute's ``(top, left, bottom, right)``; ``resolve_pads`` applies ``auto_pad``
    for a given input size."""

    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    dh: int = 1
    dw: int = 1
    pads: tuple = (0, 0, 0, 0)
    auto_pad: str = "NOTSET"
    groups: int = 1

    @classmethod
    def from_attrs(cls, attrs: dict, kernel_shape) -> "ConvGeometry":
        """The geometry of a Conv with these ONNX attributes and kernel ``(kh, kw)`` (or ``(k,)`` for 1-D)."""
        kernel = [int(k) for k in kernel_shape]
        nd = len(kernel)
        if nd not in (1, 2):
            raise ValueError("only 1-D and 2-D convolutions")
        strides = [int(s) for s in (attrs.get("strides") or [1] * nd)]
        dil = [int(d) for d in (attrs.get("dilations") or [1] * nd)]
        pads = [int(p) for p in (attrs.get("pads") or [0] * (2 * nd))]
        auto = attrs.get("auto_pad") or "NOTSET"
        if isinstance(auto, bytes):
            auto = auto.decode()
        if nd == 1:  # height 1: no stride, dilation or padding along it
            kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
        return cls(kernel[0], kernel[1], strides[0], strides[1], dil[0], dil[1], tuple(pads), str(auto),
                   int(attrs.get("group", 1)))

    def resolve_pads(self, H: int, W: int) -> list:
        """``[top, left, bottom, right]`` for an ``H x W`` input, ``auto_pad`` applied."""
        if self.auto_pad == "VALID":
            return [0, 0, 0, 0]
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return list(self.pads)
        out = []
        for size, k, s, d in ((H, self.kh, self.sh, self.dh), (W, self.kw, self.sw, self.dw)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small))
        return [out[0][0], out[1][0], out[0][1], out[1][1]]

    def out_hw(self, H: int, W: int) -> tuple[int, int]:
        """Output height and width for an ``H x W`` input."""
        t, l, b, r = self.resolve_pads(H, W)
        return ((H + t + b - self.dh * (self.kh - 1) - 1) // self.sh + 1,
                (W + l + r - self.dw * (self.kw - 1) - 1) // self.sw + 1)

    def n_positions(self, x_shape) -> int:
        """Output positions ``N * OH * OW`` of an input of shape ``x_shape`` (``[N, C, H, W]`` or ``[N, C, W]``)."""
        H, W = (1, x_shape[2]) if len(x_shape) == 3 else (x_shape[2], x_shape[3])
        OH, OW = self.out_hw(H, W)
        return int(x_shape[0]) * OH * OW


def sample_positions(total: int, max_rows: int | None, rng: np.random.Generator, sort: bool = True) -> np.ndarray:
    """Indices of at most ``max_rows`` of ``total`` positions: all of them in order when there are no more
    (or ``max_rows`` is 0/None), else ``rng.choice`` without replacement (sorted unless ``sort=False``)."""
    if not max_rows or total <= max_rows:
        return np.arange(total)
    pick = rng.choice(total, size=max_rows, replace=False)
    return np.sort(pick) if sort else pick


def _as_2d(x: np.ndarray, dtype) -> np.ndarray:
    x = np.asarray(x, dtype)
    if x.ndim == 3:
        return x[:, :, None, :]
    if x.ndim != 4:
        raise ValueError("only 1-D and 2-D convolutions")
    return x


def _padded(x: np.ndarray, g: ConvGeometry, dtype) -> tuple[np.ndarray, tuple[int, int]]:
    x = _as_2d(x, dtype)
    t, l, b, r = g.resolve_pads(x.shape[2], x.shape[3])
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r))), g.out_hw(x.shape[2], x.shape[3])


def _gather(xp: np.ndarray, g: ConvGeometry, out_hw: tuple[int, int], positions: np.ndarray) -> np.ndarray:
    OH, OW = out_hw
    n, rem = np.divmod(positions, OH * OW)
    oy, ox = np.divmod(rem, OW)
    c = xp.shape[1]
    rows = np.empty((len(positions), c, g.kh, g.kw), xp.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            rows[:, :, i, j] = xp[n, :, oy * g.sh + i * g.dh, ox * g.sw + j * g.dw]
    return rows.reshape(len(positions), g.groups, (c // g.groups) * g.kh * g.kw)


def conv_patches(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray | None = None,
                 dtype=np.float32) -> np.ndarray:
    """Patch rows ``[P, groups, D]`` (see the module doc) of the Conv input ``x`` (``[N, C, H, W]`` or
    ``[N, C, W]``) at the flat output ``positions`` (``sample_positions``; None: all, in order), in ``dtype``.

    The same positions in every sample: ``(np.arange(N)[:, None] * OH * OW + per_sample[None]).ravel()``."""
    xp, out_hw = _padded(x, geometry, dtype)
    if positions is None:
        positions = np.arange(xp.shape[0] * out_hw[0] * out_hw[1])
    return _gather(xp, geometry, out_hw, np.asarray(positions))


def patch_covariance(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray | None = None,
                     chunk: int | None = None, dtype=np.float64) -> np.ndarray:
    """``sum_p p p^T`` per group, ``[groups, D, D]`` float64, over the patch rows of ``conv_patches`` at
    ``positions`` (None: all). The rows are gathered ``chunk`` positions at a time (None: at once) and
    multiplied in ``dtype``."""
    xp, out_hw = _padded(x, geometry, dtype)
    if positions is None:
        positions = np.arange(xp.shape[0] * out_hw[0] * out_hw[1])
    positions = np.asarray(positions)
    D = (xp.shape[1] // geometry.groups) * geometry.kh * geometry.kw
    acc = np.zeros((geometry.groups, D, D))
    step = chunk or max(len(positions), 1)
    for s in range(0, len(positions), step):
        X = np.ascontiguousarray(_gather(xp, geometry, out_hw, positions[s:s + step]).transpose(1, 0, 2))
        acc += np.matmul(X.transpose(0, 2, 1), X)
    return acc
