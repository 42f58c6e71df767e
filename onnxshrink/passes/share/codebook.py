"""Weighted 1-D k-means for share's codebooks.

1-D weighted k-means is solved exactly per Lloyd step on the sorted values: with prefix sums
P_w, P_wx of (h, h*W) over the sorted weights, the nearest-centroid cells are contiguous runs
found by ``searchsorted`` of the centroid midpoints, and each new centroid is
(P_wx[r] - P_wx[l]) / (P_w[r] - P_w[l]), so one iteration costs O(K log n) after an
O(n log n) sort. The initialisation keeps outliers: centroids sit at the quantiles of the
density p(x)^(1/3) (the Panter-Dite optimal point density of a high-resolution quantizer),
which spreads points into the tails much more than plain quantiles do. When at least 1 % of
a tensor is exactly zero (after ``prune``/``sparsify``), one centroid is pinned at 0.0, so the
zeros stay exact. Lloyd's local minima (isolated outliers sharing one centroid) are escaped by
split/merge moves: split the cell whose best 2-split gains most (exact, by prefix sums over its
cut points), merge the adjacent pair that costs least, re-run Lloyd, keep when E fell.
"""

from __future__ import annotations

__all__ = ["SortedValues", "kmeans_1d", "nearest_centroid"]

import numpy as np


class SortedValues:
    """Sorted values and weight prefix sums of one tensor (or group), shared by every bit width."""

    def __init__(self, values: np.ndarray, weights: np.ndarray | None):
        x = np.asarray(values, np.float64).ravel()
        w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64).ravel()
        w = w + 1e-12 * (float(w.mean()) if w.size else 1.0)  # no zero-weight run can leave a cell empty
        order = np.argsort(x, kind="stable")
        self.x = x
        self.w = w
        self.xs = x[order]
        ws = w[order]
        self.pw = np.concatenate([[0.0], np.cumsum(ws)])
        self.pwx = np.concatenate([[0.0], np.cumsum(ws * self.xs)])
        self.pwx2 = np.concatenate([[0.0], np.cumsum(ws * self.xs * self.xs)])

    def cost(self, lo, hi) -> np.ndarray:
        """Weighted SSE of the sorted run [lo, hi) around its weighted mean (prefix sums)."""
        sw = self.pw[hi] - self.pw[lo]
        sx = self.pwx[hi] - self.pwx[lo]
        sxx = self.pwx2[hi] - self.pwx2[lo]
        return np.maximum(sxx - np.where(sw > 0, sx * sx / np.where(sw > 0, sw, 1.0), 0.0), 0.0)

    def cuts(self, c: np.ndarray) -> np.ndarray:
        """Boundaries of the nearest-centroid cells of ascending centroids ``c``."""
        return np.concatenate([[0], np.searchsorted(self.xs, (c[:-1] + c[1:]) / 2, side="left"), [self.xs.size]])

    def mean(self, lo, hi, fallback):
        sw = self.pw[hi] - self.pw[lo]
        return np.where(sw > 0, (self.pwx[hi] - self.pwx[lo]) / np.where(sw > 0, sw, 1.0), fallback)


def density_init(s: SortedValues, k: int, bins: int = 2048) -> np.ndarray:
    """Centroids at the quantiles of p(x)^(1/3) (Panter-Dite), reaching into the tails."""
    lo, hi = s.xs[0], s.xs[-1]
    if hi <= lo:
        return np.full(k, lo)
    hist, edges = np.histogram(s.x, bins=bins, range=(lo, hi), weights=s.w)
    q = np.cbrt(np.maximum(hist, 0))
    cdf = np.concatenate([[0.0], np.cumsum(q)])
    cdf /= cdf[-1]
    targets = (np.arange(k) + 0.5) / k
    return np.interp(targets, cdf, edges)


def lloyd(s: SortedValues, c: np.ndarray, pinned: bool, iters: int) -> np.ndarray:
    for _ in range(iters):
        c = np.sort(c)
        cuts = s.cuts(c)
        new = s.mean(cuts[:-1], cuts[1:], c)
        if pinned:
            new[np.argmin(np.abs(c))] = 0.0
        done = np.allclose(new, c, rtol=0, atol=1e-12 * max(1.0, float(np.abs(c).max())))
        c = new
        if done:
            break
    return np.sort(c)


def split_merge(s: SortedValues, c: np.ndarray, pinned: bool, rounds: int) -> np.ndarray:
    """Escape Lloyd's local minima: while splitting the best cell gains more than merging the
    cheapest adjacent pair costs, move that centroid, then re-run Lloyd. Isolated outliers
    (which Lloyd leaves sharing a centroid far from both) get their own centroid this way."""
    total = float(s.cost(*cell_bounds(s.cuts(c))).sum())
    for _ in range(rounds):
        cuts = s.cuts(c)
        lo, hi = cuts[:-1], cuts[1:]
        sse = s.cost(lo, hi)
        merge = s.cost(lo[:-1], hi[1:]) - sse[:-1] - sse[1:]
        z = int(np.argmin(np.abs(c))) if pinned else -1
        if pinned:
            merge[max(z - 1, 0):z + 1] = np.inf
        best = (0.0, -1, -1)
        for t in np.argsort(sse)[-4:]:
            a, b = int(lo[t]), int(hi[t])
            if b - a < 2 or t == z:
                continue
            cut = np.arange(a + 1, b)
            gain = sse[t] - s.cost(a, cut) - s.cost(cut, b)
            i = int(np.argmax(gain))
            if gain[i] > best[0]:
                best = (float(gain[i]), int(t), int(cut[i]))
        gain, t, cut = best
        if t < 0:
            break
        m = merge.copy()
        m[max(t - 1, 0):t + 1] = np.inf  # the merged pair must not contain the cell being split
        j = int(np.argmin(m))
        if not np.isfinite(m[j]) or gain <= m[j] + 1e-12 * total:
            break
        merged = float(s.mean(lo[j], hi[j + 1], c[j]))
        left = float(s.mean(lo[t], cut, c[t]))
        right = float(s.mean(cut, hi[t], c[t]))
        keep = np.ones(c.size, bool)
        keep[[j, j + 1, t]] = False
        trial = lloyd(s, np.concatenate([c[keep], [merged, left, right]]), pinned, 20)
        new_total = float(s.cost(*cell_bounds(s.cuts(trial))).sum())
        if new_total >= total:
            break
        c, total = trial, new_total
    return c


def cell_bounds(cuts):
    return cuts[:-1], cuts[1:]


def kmeans_1d(values: np.ndarray, k: int, weights: np.ndarray | None = None, pin_zero: bool = False,
              iters: int = 60, refine: int | None = None,
              _sorted: SortedValues | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means: (centroids [k] ascending, labels with the shape of ``values``).

    Minimises sum_i weights_i (values_i - centroids[labels_i])^2 by Lloyd iterations on the
    sorted values (exact cells by searchsorted, means by prefix sums), from a p^(1/3)-density
    initialisation. ``pin_zero`` keeps one centroid at exactly 0.0. When the tensor has at most
    k distinct values the codebook is those values (exact)."""
    s = _sorted or SortedValues(values, weights)
    uniq = np.unique(s.xs)
    if uniq.size <= k:
        c = np.concatenate([uniq, np.full(k - uniq.size, uniq[-1] if uniq.size else 0.0)])
    else:
        c = density_init(s, k)
        if pin_zero:
            c[np.argmin(np.abs(c))] = 0.0
        c = lloyd(s, c, pin_zero, iters)
        c = split_merge(s, c, pin_zero, rounds=refine if refine is not None else k)
    labels = nearest_centroid(s.x, c)
    return c, labels.reshape(np.shape(values))


def nearest_centroid(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (c ascending)."""
    mids = (c[:-1] + c[1:]) / 2
    return np.searchsorted(mids, x, side="left").astype(np.int64)


# --------------------------------------------------------------------------- packing
