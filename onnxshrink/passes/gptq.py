"""GPTQ error feedback: quantize a layer's weights one input feature at a time, the rest absorbing the error.

A layer ``y = W x`` (per group: ``R`` outputs, ``D`` input features) quantized to ``Q`` has the output error
``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` over the calibration inputs. GPTQ (Frantar et al. 2022, after Optimal
Brain Quantization) quantizes the feature columns in a fixed order and, after each column ``j``, moves the columns
not yet quantized so that they cancel its error where the inputs are correlated:

    q_j = quantize(w_j),   e = (w_j - q_j) / U_jj,   w_k <- w_k - e U_jk  for k > j,

with ``U`` the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``, rows and columns in the elimination order),
which greedily minimises the output error. Updates are lazy in blocks of ``block`` columns: inside a block column
by column, the rest of the matrix once per block (``W[:, later] -= E U[block, later]``). The per-column quantizer is
the caller's: round to an integer grid (quantize's GPTQ rounding) or the nearest codebook centroid (share). The
damping of ``H``, the elimination order ("act order": decreasing ``H_jj``) and the fallback when ``H`` is singular
are the caller's too.
"""

from __future__ import annotations

__all__ = ["gptq_feedback"]

from typing import Callable

import numpy as np


def gptq_feedback(W: np.ndarray, U: np.ndarray, quantize_column: Callable[[int, np.ndarray], tuple],
                  features_axis: int = 2, block: int = 128, code_dtype=np.int64) -> np.ndarray:
    """Codes of the weights ``W`` by error feedback (see the module doc).

    ``W`` holds ``g`` independent groups, its input features (``D`` of them, already in elimination order) on
    ``features_axis``: ``[g, R, D]`` (2) or ``[g, D, R]`` (1); ``U`` is ``[g, D, D]``, the upper Cholesky factor
    of each group's ``H^-1`` in that order. ``quantize_column(j, w)`` gets the position ``j`` and the current
    column ``w [g, R]`` and returns ``(codes, dequantized values)``, both ``[g, R]``. Returns the codes in the
    layout of ``W`` (``code_dtype``). The once-per-block product is taken in the layout of ``W``."""
    W = np.array(W, np.float64)
    codes = np.zeros(W.shape, code_dtype)
    Wv = W if features_axis == 2 else W.swapaxes(1, 2)          # [g, R, D] views
    cv = codes if features_axis == 2 else codes.swapaxes(1, 2)
    D = Wv.shape[2]
    for i1 in range(0, D, block):
        i2 = min(i1 + block, D)
        W1 = Wv[:, :, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            code, value = quantize_column(i1 + i, w)
            cv[:, :, i1 + i] = code
            e = (w - value) / U1[:, i, i][:, None]
            if i + 1 < i2 - i1:
                W1[:, :, i + 1:] -= e[:, :, None] * U1[:, None, i, i + 1:]
            E1[:, :, i] = e
        if i2 < D:
            if features_axis == 2:
                Wv[:, :, i2:] -= np.matmul(E1, U[:, i1:i2, i2:])
            else:
                W[:, i2:, :] -= np.matmul(U[:, i1:i2, i2:].transpose(0, 2, 1), E1.transpose(0, 2, 1))
    return codes
