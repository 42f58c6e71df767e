"""Truncated SVD of a layer's weight, whitened by its input covariance.

Whitening. Let X (rows = every position of every calibration sample) be the layer's input and
``C = X^T X / N + ridge * mean(diag) * I = L L^T`` (Cholesky; the ridge makes a singular C usable).
The layer-output error of any replacement W' is ``|X (W - W')|_F^2 = |L^T (W - W')|_F^2`` (up to
the ridge). So we take the SVD ``L^T W = U S V^T`` and keep ``A = L^-T U_k S_k^1/2``,
``B = S_k^1/2 V_k^T``: the output error is then exactly ``sum_{i>k} s_i^2`` (Eckart-Young in the
whitened space), and ``1 - sum_{i>k} s_i^2 / sum s_i^2`` is the fraction of output energy kept.
Without data (or ``whiten=false``) the plain SVD of W is used and the same ratio measures weight
energy instead.
"""

from __future__ import annotations

__all__ = ["whitened_svd", "factorize", "ridged_covariance", "energy_rank", "round_rank"]

import math

import numpy as np


def ridged_covariance(cov: np.ndarray, ridge: float) -> np.ndarray:
    d = float(np.mean(np.diag(cov))) if cov.size else 0.0
    if not np.isfinite(d) or d <= 0:
        return np.eye(cov.shape[0])
    return cov + (ridge * d) * np.eye(cov.shape[0])


def whitened_svd(W: np.ndarray, cov: np.ndarray | None, ridge: float = 1e-4):
    """SVD of ``L^T W`` (``L L^T = cov + ridge``), or of W when cov is None.

    Returns (Linv_T, U, s, Vt) with ``W = Linv_T @ U @ diag(s) @ Vt``; Linv_T is None when plain."""
    W = W.astype(np.float64)
    if cov is None:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return None, U, s, Vt
    c = ridged_covariance(cov.astype(np.float64), ridge)
    for attempt in range(4):
        try:
            L = np.linalg.cholesky(c)
            break
        except np.linalg.LinAlgError:  # numerically not PD yet: raise the ridge tenfold
            c = ridged_covariance(cov.astype(np.float64), ridge * 10 ** (attempt + 1))
    else:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return None, U, s, Vt
    U, s, Vt = np.linalg.svd(L.T @ W, full_matrices=False)
    Linv_T = np.linalg.solve(L.T, np.eye(L.shape[0]))
    return Linv_T, U, s, Vt


def factorize(W: np.ndarray, k: int, cov: np.ndarray | None = None, ridge: float = 1e-4, svd=None):
    """Rank-k factors (A, B) of W (n x m) minimising ``|L^T (W - A B)|_F`` (plain Frobenius without cov)."""
    Linv_T, U, s, Vt = svd if svd is not None else whitened_svd(W, cov, ridge)
    r = np.sqrt(s[:k])
    A = U[:, :k] * r
    if Linv_T is not None:
        A = Linv_T @ A
    B = r[:, None] * Vt[:k]
    return A, B


def energy_rank(s: np.ndarray, energy: float) -> int:
    e = s.astype(np.float64) ** 2
    tot = float(e.sum())
    if tot <= 0:
        return 1
    kept = np.cumsum(e) / tot
    return int(min(len(s), np.searchsorted(kept, energy - 1e-12) + 1))


def round_rank(k: int, multiple: int, full: int) -> int:
    if multiple > 1:
        k = int(math.ceil(k / multiple) * multiple)
    return max(1, min(k, full))
