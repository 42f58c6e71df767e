"""Streaming calibration: per-tensor histograms in one pass, and range estimators.

Each tensor gets a ``TensorHistogram``: its running min/max and ``bins`` counts over an interval
``[lo, lo + bins * width)`` whose edges are multiples of ``width``. When a sample falls outside,
the grid shifts by whole bins when the data still spans fewer than ``bins`` bins, else the width
grows by a power of two ``2^k`` and the interval is re-anchored at a multiple of the new
width, so old bin ``i`` maps *exactly* to new bin ``(offset + i) // 2^k`` (no interpolation).
Memory is ``bins`` integers per tensor, whatever the number of samples. Min and max are exact;
the counts of a tensor larger than ``max_elements`` (64k) come from an evenly strided subset of it.

Range estimators turn a histogram into a clipping range ``[a, b]`` (always containing 0, as an
affine integer grid must) for an ``L``-level quantizer (``L = 256`` for 8 bits):

- MinMax: ``[min, max]``.
- Percentile(p): the (100-p)% and p% quantiles of the counts (a side with no negative values stays 0).
- Entropy (KL, as TensorRT): on the histogram of ``|x|`` (exact fold: 0 is a bin edge), choose the
  threshold ``t`` minimising ``KL(P || Q)`` where ``P`` is the histogram cut at ``t`` with the tail
  added to the last bin and ``Q`` is ``P`` merged into ``L/2`` (signed) or ``L`` (non-negative)
  levels and spread back over the non-empty bins; range ``[max(min, -t), min(max, t)]``.
- MSE: the ``[a, b]`` minimising the expected squared error of the quantizer,
  ``sum_inside n_j * s^2 / 12 + sum_outside n_j * dist(c_j, [a, b])^2`` with ``s = (b - a)/(L-1)``
  and ``c_j`` the bin centres, searched over shrink factors of each side (coordinate descent).

``CalibrationSamples`` is the sample source of a quantization run and ``calibrate_ranges`` its
calibration step (MinMax reduced inside the graph, the others through histograms).
"""

from __future__ import annotations

__all__ = ["TensorHistogram", "collect_histograms", "collect_minmax", "estimate_range", "minmax_range",
           "percentile_range", "entropy_range", "mse_range", "CALIBRATORS", "CalibrationSamples", "calibrate_ranges"]

import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from onnxshrink.errors import InputError
from onnxshrink.model import is_large

DEFAULT_BINS = 2048


class TensorHistogram:
    """Running min/max and a fixed-size histogram of one tensor, re-binned exactly as its range grows."""

    __slots__ = ("bins", "counts", "lo", "width", "min", "max", "count", "max_elements")

    def __init__(self, bins: int = DEFAULT_BINS, max_elements: int = 1 << 16):
        self.bins = int(bins)
        self.max_elements = int(max_elements)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.lo = 0.0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    # ------------------------------------------------------------------ update
    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        x = x.ravel()
        if x.size == 0:
            return
        mn, mx = float(x.min()), float(x.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            mn, mx = float(x.min()), float(x.max())
        if self.width == 0.0:
            span = mx - mn
            w = span / (self.bins - 1) if span > 0 else max(abs(mn), 1.0) * 2.0 ** -20
            self.width = w
            self.lo = math.floor(mn / w) * w
        self._grow(mn, mx)
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        if self.max_elements and x.size > self.max_elements:
            # min/max stay exact; the counts come from an evenly strided subset of a large tensor
            x = x[:: -(-x.size // self.max_elements)]
        idx = ((x - self.lo) * (1.0 / self.width)).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)
        self.count += x.size

    def _grow(self, mn: float, mx: float) -> None:
        lo, w = self.lo, self.width
        if mn >= lo and mx < lo + self.bins * w:
            return
        # old bins outside [self.min, self.max] are empty, so only the data bounds must fit
        new_min = min(mn, self.min)
        new_max = max(mx, self.max)
        k = -1
        while True:  # k = 0 shifts the grid by whole bins; k > 0 also merges 2^k bins into one
            k += 1
            nw = w * 2 ** k
            nlo = math.floor(new_min / nw) * nw
            if nlo + self.bins * nw > new_max:
                break
        offset = int(round((lo - nlo) / w))
        new_idx = (offset + np.arange(self.bins)) // (2 ** k)
        counts = np.bincount(np.clip(new_idx, 0, self.bins - 1), weights=self.counts, minlength=self.bins)
        self.counts = counts.astype(np.int64)
        self.lo, self.width = nlo, nw

    # ------------------------------------------------------------------ views
    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        return self.lo + self.width * (np.arange(self.bins) + 0.5)

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """(counts, width) of |x| over [0, bins_abs * width): exact, since 0 is a bin edge."""
        zero = int(round(-self.lo / self.width))
        if zero <= 0:  # all values >= 0: shift right by lo / width empty bins
            return np.concatenate([np.zeros(-zero, np.int64), self.counts]), self.width
        neg = self.counts[:min(zero, self.bins)][::-1]
        pos = self.counts[zero:] if zero < self.bins else np.zeros(0, np.int64)
        n = max(len(neg), len(pos))
        out = np.zeros(n, dtype=np.int64)
        out[:len(neg)] += neg
        out[:len(pos)] += pos
        return out, self.width

    def state_nbytes(self) -> int:
        return self.counts.nbytes + 5 * 8


def collect_histograms(captures: Iterable[dict], names: Sequence[str] | None = None,
                       bins: int = DEFAULT_BINS, max_elements: int = 1 << 16) -> dict[str, TensorHistogram]:
    """One pass over ``captures`` (an iterator of {tensor name: array}, one sample at a time, such
    as ``onnxshrink.runtime.capture_activations``) updating one histogram per float tensor."""
    hists: dict[str, TensorHistogram] = {}
    for sample in captures:
        for name, value in sample.items():
            if names is not None and name not in names:
                continue
            v = np.asarray(value)
            if v.dtype.kind != "f":
                continue
            h = hists.get(name)
            if h is None:
                h = hists[name] = TensorHistogram(bins, max_elements)
            h.update(v)
    return hists


KEPT_OUTPUTS_BYTES = 64 * 2**20  # the model outputs a calibration run keeps for later checks, at most


def collect_minmax(model, names: Sequence[str], samples: Iterable[dict],
                   outputs: list | None = None) -> tuple[dict[str, TensorHistogram], list]:
    """MinMax calibration without copying the tensors out: a ``ReduceMin``/``ReduceMax`` pair is
    appended to each tensor (as onnxruntime's MinMax calibrator does) and only the scalars are read,
    so a run returns a few bytes per tensor instead of the tensors. Returns histograms that hold only
    ``min``/``max`` (enough for ``minmax_range``) and the names whose values were not all finite
    (those need ``collect_histograms``, which skips non-finite values). ``outputs``, when given, gets
    the model's own outputs of the first samples, in order, up to ``KEPT_OUTPUTS_BYTES`` (the float
    fallback's calibration check reads them instead of running the float model again)."""
    import onnx

    from onnxshrink.runtime import session_with_outputs
    graph_outputs = [o.name for o in model.graph.output]
    outs, reductions = [], []
    for i, n in enumerate(names):
        for op in ("ReduceMin", "ReduceMax"):
            outs.append(f"{n}__calib_{op}")
            reductions.append(onnx.helper.make_node(op, [n], [outs[-1]], keepdims=0, name=f"calib_{op}_{i}"))
    # only scalars come out (a low-memory session: no memory pattern or arena for tensors that are
    # reduced and dropped); the reductions join the model for the session only: no copy of it
    sess = session_with_outputs(model, outs, reductions)
    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    isfloat = np.ones(len(names), bool)
    bad = np.zeros(len(names), bool)
    kept = 0  # bytes of the outputs kept
    for sample in samples:
        keep = outputs is not None and kept <= KEPT_OUTPUTS_BYTES
        vals = sess.run(outs + graph_outputs if keep else outs, sample)
        if keep:
            own = vals[len(outs):]
            kept += sum(np.asarray(v).nbytes for v in own if isinstance(v, np.ndarray))
            if kept <= KEPT_OUTPUTS_BYTES:
                outputs.append(own)
        for i in range(len(names)):
            a, b = np.asarray(vals[2 * i]), np.asarray(vals[2 * i + 1])
            if a.dtype.kind != "f":
                isfloat[i] = False
                continue
            a, b = float(a), float(b)
            if not (math.isfinite(a) and math.isfinite(b)):
                bad[i] = True
                continue
            lo[i], hi[i] = min(lo[i], a), max(hi[i], b)
    hists = {}
    for i, n in enumerate(names):
        if isfloat[i] and not bad[i] and math.isfinite(lo[i]):
            h = hists[n] = TensorHistogram(1, 0)
            h.min, h.max = float(lo[i]), float(hi[i])
    return hists, [n for i, n in enumerate(names) if bad[i] and isfloat[i]]


# ---------------------------------------------------------------------- estimators
def _with_zero(a: float, b: float) -> tuple[float, float]:
    return min(a, 0.0), max(b, 0.0)


def minmax_range(h: TensorHistogram, levels: int = 256) -> tuple[float, float]:
    return _with_zero(h.min, h.max)


def percentile_range(h: TensorHistogram, levels: int = 256, percentile: float = 99.999) -> tuple[float, float]:
    if h.count == 0:
        return 0.0, 0.0
    cdf = np.cumsum(h.counts) / h.count
    q = percentile / 100.0
    hi_bin = int(np.searchsorted(cdf, q, side="left"))
    hi = min(h.max, h.lo + (hi_bin + 1) * h.width)
    lo_bin = int(np.searchsorted(cdf, 1.0 - q, side="right"))
    lo = max(h.min, h.lo + lo_bin * h.width)
    return _with_zero(lo, hi)


def entropy_range(h: TensorHistogram, levels: int = 256, max_candidates: int = 96) -> tuple[float, float]:
    if h.count == 0:
        return 0.0, 0.0
    signed = h.min < 0
    if h.lo > 64 * h.bins * h.width or h.lo + h.bins * h.width < -64 * h.bins * h.width:
        return _with_zero(h.min, h.max)  # far from 0: no tail worth clipping at this resolution
    counts, w = h.abs_histogram()
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return _with_zero(h.min, h.max)
    counts = counts[: nz[-1] + 1].astype(np.float64)
    n = len(counts)
    qbins = levels // 2 if signed else levels - 1
    if n <= qbins:
        return _with_zero(h.min, h.max)
    # thresholds below the 90th percentile of |x| are degenerate optima of KL (all mass in one bin)
    start = max(qbins, int(np.searchsorted(np.cumsum(counts), 0.9 * counts.sum())) + 1)
    step = max(1, (n - start) // max_candidates)
    best_kl, best_i = math.inf, n
    for i in list(range(start, n, step)) + [n]:
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        # merge p into qbins levels, then spread each level's mass over its non-empty bins
        idx = (np.arange(i) * qbins) // i
        nonzero = counts[:i] > 0
        mass = np.bincount(idx, weights=counts[:i], minlength=qbins)
        support = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=qbins)
        qv = np.where(nonzero, mass[idx] / np.maximum(support[idx], 1), 0.0)
        ps, qs = p.sum(), qv.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, qv / qs
        m = pn > 0
        qn_m = np.maximum(qn[m], 1e-12)
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn_m)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = best_i * w
    return _with_zero(max(h.min, -t), min(h.max, t))


def _mse_cost(centers: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray, levels: int) -> np.ndarray:
    """Expected squared error for candidate ranges ``[a_k, b_k]`` (vectors) over the histogram."""
    s = (b - a) / (levels - 1)
    c = centers[None, :]
    below = np.clip(a[:, None] - c, 0, None)
    above = np.clip(c - b[:, None], 0, None)
    inside = (below == 0) & (above == 0)
    clip_err = (below ** 2 + above ** 2) @ counts
    round_err = (inside * counts[None, :]).sum(1) * (s ** 2) / 12.0
    return clip_err + round_err


def mse_range(h: TensorHistogram, levels: int = 256, steps: int = 64) -> tuple[float, float]:
    if h.count == 0:
        return 0.0, 0.0
    a0, b0 = _with_zero(h.min, h.max)
    if b0 - a0 <= 0:
        return a0, b0
    keep = h.counts > 0
    centers = np.clip(h.centers[keep], h.min, h.max)
    counts = h.counts[keep].astype(np.float64)
    f = np.linspace(1.0 / steps, 1.0, steps)
    # coordinate descent: shrink both sides together, then each side alone
    k = int(np.argmin(_mse_cost(centers, counts, a0 * f, b0 * f, levels)))
    a, b = float(a0 * f[k]), float(b0 * f[k])
    if a0 < 0:
        a = float(a0 * f[int(np.argmin(_mse_cost(centers, counts, a0 * f, np.full_like(f, b), levels)))])
    if b0 > 0:
        b = float(b0 * f[int(np.argmin(_mse_cost(centers, counts, np.full_like(f, a), b0 * f, levels)))])
    return a, b


CALIBRATORS = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def estimate_range(h: TensorHistogram, method: str = "minmax", levels: int = 256, **kw) -> tuple[float, float]:
    """The clipping range of one tensor by ``method`` (minmax, percentile, entropy, mse)."""
    try:
        fn = CALIBRATORS[method]
    except KeyError:
        raise ValueError(f"unknown calibrator '{method}'; known: {', '.join(CALIBRATORS)}") from None
    return fn(h, levels=levels, **kw)


# ---------------------------------------------------------------------- a run's samples and ranges
class CalibrationSamples:
    """The calibration samples of a run: ``calib``, else ``val`` (a re-iterable of feeds), at most
    ``max_samples`` of them (0: all)."""

    def __init__(self, calib, val, max_samples: int = 0):
        self.source = calib if calib is not None else val
        self.max_samples = max_samples

    def all(self) -> Iterator[dict]:
        """The samples (InputError on the first read when there are none)."""
        if self.source is None:
            raise InputError("quantize needs calibration samples")
        n = self.max_samples
        for i, s in enumerate(self.source):
            if n and i >= n:
                break
            yield s

    def take(self, n: int) -> Iterator[dict]:
        """The first ``n`` samples."""
        for i, s in enumerate(self.all()):
            if i >= n:
                break
            yield s

    def first(self) -> dict | None:
        """The first sample, or None when there is none."""
        if self.source is None:
            return None
        for s in self.source:
            return s
        return None


def calibrate_ranges(model, tensors: Sequence[str], samples: CalibrationSamples, calibrator: str = "minmax",
                     levels: int = 256, bins: int = DEFAULT_BINS, percentile: float = 99.999,
                     outputs: list | None = None) -> dict:
    """{tensor: (lo, hi)} of ``tensors`` in ``model`` over the samples by ``calibrator``. MinMax needs
    only min and max: reduced in the graph, the tensors never leave onnxruntime (not for a model past
    2 GB, which would be copied; nor for tensors with non-finite values, which need histograms).
    ``outputs``: filled by MinMax with the model's outputs of the first samples (``collect_minmax``)."""
    from onnxshrink.runtime import capture_activations
    if calibrator == "minmax" and not is_large(model):
        hists, rest = collect_minmax(model, tensors, samples.all(), outputs)
        if rest:
            hists.update(collect_histograms(capture_activations(model, rest, samples.all()), rest, bins=bins))
    else:
        hists = collect_histograms(capture_activations(model, tensors, samples.all()), tensors, bins=bins)
    kw = {"percentile": percentile} if calibrator == "percentile" else {}
    return {t: estimate_range(h, calibrator, levels=levels, **kw) for t, h in hists.items()}
