"""Truncated SVD of a layer's weight, whitened by its input covariance.

Whitening. Let X (rows = every position of every calibration sample) be the layer's input and
``C = X^T X / N + ridge * mean(diag) * I = L L^T`` (Cholesky; the ridge makes a singular C usable).
The layer-output error of any replacement W' is ``|X (W - W')|_F^2 = |L^T (W - W')|_F^2`` (up to
the ridge). With the SVD ``L^T W = U S V^T`` the best rank-k replacement keeps ``A = L^-T U_k S_k^1/2``,
``B = S_k^1/2 V_k^T``: the output error is then exactly ``sum_{i>k} s_i^2`` (Eckart-Young in the
whitened space), and ``1 - sum_{i>k} s_i^2 / sum s_i^2`` is the fraction of output energy kept.
Since ``U_k = L^T W V_k S_k^-1``, ``A = W V_k S_k^-1/2`` and ``A B = W V_k V_k^T``: only ``S`` and ``V``
are needed, and they are the eigen-decomposition of ``(L^T W)^T (L^T W) = W^T C W`` (m x m). For
W of n x m with many rows (n >= ``GRAM_MIN_ROWS``, n > m: a 3x3 convolution's 9 C_in patch rows
against C_out) that replaces the Cholesky of C (n^3 / 3), the SVD of ``L^T W`` and ``L^-T`` (n^3) by
``C W`` (n^2 m) and an m x m eigen-decomposition: a 256-channel 3x3 convolution (n = 2304) in 0.5 s
instead of 15, a 512-channel one (n = 4608) instead of about 50 s (2 loaded cores), the same factors to
rounding and the sign of each singular pair (the squared spectrum resolves singular values down to
1e-8 of the largest in float64). Without data (or ``whiten=false``) the plain SVD of W is used
and the same ratio measures weight energy instead.
"""

from __future__ import annotations

__all__ = ["whitened_svd", "factorize", "ridged_covariance", "energy_rank", "round_rank"]

import math

import numpy as np


def ridged_covariance(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``cov + ridge * mean(diag) * I`` as a new float64 array (the identity never built: 170 MB for a
    512-channel 3x3 convolution's patch covariance)."""
    d = float(np.mean(np.diag(cov))) if cov.size else 0.0
    if not np.isfinite(d) or d <= 0:
        return np.eye(cov.shape[0])
    c = np.array(cov, dtype=np.float64)
    c[np.diag_indices_from(c)] += ridge * d
    return c


GRAM_MIN_ROWS = 1024  # from this many rows (and more rows than columns) the whitened spectrum comes from W^T C W


def whitened_svd(W: np.ndarray, cov: np.ndarray | None, ridge: float = 1e-4):
    """The spectrum of W whitened by ``cov`` (module docstring), or of W itself when cov is None:
    ``(how, U, s, Vt, Linv_T)`` with the singular values ``s`` (descending) and right vectors ``Vt``
    of ``L^T W``, for ``factorize``. ``how``: "plain" (``U`` W's left singular vectors), "cholesky"
    (the SVD of ``L^T W``: ``U`` its left vectors, ``Linv_T = L^-T``), or "gram" for ``GRAM_MIN_ROWS``
    rows or more and more rows than columns (the eigen-decomposition of ``W^T C W``: ``U = W V``,
    no Cholesky and no inverse; the SVD resolves small singular values without squaring them, so it
    is kept where its n^3 is cheap)."""
    W = W.astype(np.float64)
    if cov is None:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return "plain", U, s, Vt, None
    c = ridged_covariance(cov, ridge)
    n, m = W.shape
    if n >= GRAM_MIN_ROWS and n > m:
        lam, V = np.linalg.eigh(W.T @ (c @ W))
        order = np.argsort(lam)[::-1]
        s = np.sqrt(np.clip(lam[order], 0.0, None))
        Vt = V[:, order].T
        return "gram", W @ Vt.T, s, Vt, None
    for attempt in range(4):
        try:
            L = np.linalg.cholesky(c)
            break
        except np.linalg.LinAlgError:  # numerically not PD yet: raise the ridge tenfold
            c = ridged_covariance(cov, ridge * 10 ** (attempt + 1))
    else:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        return "plain", U, s, Vt, None
    U, s, Vt = np.linalg.svd(L.T @ W, full_matrices=False)
    return "cholesky", U, s, Vt, np.linalg.solve(L.T, np.eye(L.shape[0]))


def factorize(W: np.ndarray, k: int, cov: np.ndarray | None = None, ridge: float = 1e-4, svd=None):
    """Rank-k factors (A, B) of W (n x m) minimising ``|L^T (W - A B)|_F`` (plain Frobenius without cov),
    ``B = S_k^1/2 V_k^T``: ``A = U_k S_k^1/2`` plain, ``L^-T U_k S_k^1/2`` from the Cholesky, and
    ``W V_k S_k^-1/2`` from the Gram matrix (a zero singular value's column is 0)."""
    how, U, s, Vt, Linv_T = svd if svd is not None else whitened_svd(W, cov, ridge)
    r = np.sqrt(s[:k])
    if how == "gram":
        A = U[:, :k] * np.divide(1.0, r, out=np.zeros_like(r), where=r > 0)
    else:
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
