"""Fidelity metrics of a model's outputs against the original model's, and budgets.

Per sample and output: cosine similarity of the flattened tensors, SQNR in dB
(10 log10(|ref|^2 / |ref - out|^2)), max-abs error relative to the output's scale (max |ref|),
and top-1 agreement (argmax over the last axis). A silent sample (reference and error both below
1e-3 of the output's scale over the validation set, e.g. a text-detection map of a photo with no
text) has cosine 1: the cosine of two round-off noise vectors means nothing. A sample's score is its worst output; the
model's ``cosine``/``sqnr`` are means over samples, ``cosine_min`` the worst sample,
``max_abs`` the worst relative error anywhere, ``top1`` the fraction of agreeing argmaxes.
"""

from __future__ import annotations

__all__ = ["METRICS", "Budget", "fidelity", "aggregate", "compare_outputs", "DEFAULT_BUDGET", "DEFAULT_SCALAR_BUDGET",
           "UNCHECKED_BUDGET", "blind_metric_outputs", "output_scales", "out_of_reach", "mean_lower_bound",
           "PREDICTION_Z", "constant_outputs"]

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from onnxshrink.errors import UsageError

# name -> (higher is better, description)
METRICS = {
    "cosine": (True, "mean over samples of the worst output's cosine similarity"),
    "cosine_min": (True, "worst sample's cosine similarity"),
    "sqnr": (True, "mean signal-to-quantization-noise ratio in dB"),
    "max_abs": (False, "largest absolute error relative to the output's scale (max |ref|)"),
    "mse": (False, "mean squared error relative to the output's mean square"),
    "top1": (True, "fraction of samples whose top-1 class (argmax, last axis, first output) agrees"),
    "accuracy": (True, "top-1 accuracy of the first output against labels (labels.npy/labels.txt beside the data)"),
    "top5": (True, "top-5 accuracy of the first output against labels"),
}

# a sample whose reference and error both stay below this fraction of the output's scale (max |ref|
# over the validation set) is silent: its cosine counts as 1
SILENT = 1e-3

# metrics whose values are fractions: a relative budget "-1%" means one percentage point
_FRACTION_METRICS = {"cosine", "cosine_min", "top1", "accuracy", "top5"}


def _cosine(ab: float, aa: float, bb: float) -> float:
    """The cosine of two vectors from their dot products ``a.b``, ``a.a`` and ``b.b``."""
    if aa == 0 and bb == 0:
        return 1.0
    if aa == 0 or bb == 0:
        return 0.0
    return float(ab / (math.sqrt(aa) * math.sqrt(bb)))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` of two flat arrays summed in float64 (einsum casts in small buffers: no float64 copy)."""
    return float(np.einsum("i,i->", a, b, dtype=np.float64, casting="safe"))


def _absmax(x: np.ndarray) -> float:
    """max |x| without an ``abs`` temporary (0 for an empty array)."""
    return float(max(x.max(), -x.min())) if x.size else 0.0


def as_flat_array(x) -> np.ndarray:
    """An output as one array: a tensor as it is; a sequence output (a list of tensors, e.g.
    SplitToSequence) as its elements raveled and concatenated (element shapes may differ)."""
    if isinstance(x, (list, tuple)):
        parts = [np.ravel(np.asarray(e)) for e in x]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.asarray(x)


def compare_outputs(ref: Sequence[np.ndarray], out: Sequence[np.ndarray],
                    scales: Sequence[float] | None = None) -> dict:
    """Scores of one sample: worst output's cosine, sqnr, relative max-abs error, relative mse, top1.
    ``scales``: each output's scale (max |ref| over all samples) for the relative max-abs error;
    default: this sample's own max |ref|."""
    cos, sq, mx, mse = [], [], [], []
    top1 = 1.0
    for k, (r, o) in enumerate(zip(ref, out)):
        r = ref_k = as_flat_array(r)
        o = out_k = as_flat_array(o)
        if r.shape != o.shape:
            return {"cosine": 0.0, "sqnr": -math.inf, "max_abs": math.inf, "mse": math.inf, "top1": 0.0}
        if r.dtype.kind not in "fc":
            eq = float(np.array_equal(r, o))
            cos.append(eq)
            sq.append(math.inf if eq else 0.0)
            mx.append(0.0 if eq else math.inf)
            mse.append(0.0 if eq else math.inf)
            continue
        # float64 sums without float64 copies (``_dot``): two fresh 800 kB arrays per call cost 1.6 ms
        # of page faults here, PP-OCRv4 det's 100k-value map, per sample of every screen
        dt = np.float64 if np.float64 in (r.dtype, o.dtype) else np.float32  # float16 widened exactly
        r, o = r.astype(dt, copy=False).ravel(), o.astype(dt, copy=False).ravel()
        oo = _dot(o, o)
        if not math.isfinite(oo):  # a NaN or an infinity in the output (float32 squares cannot overflow)
            return {"cosine": 0.0, "sqnr": -math.inf, "max_abs": math.inf, "mse": math.inf, "top1": 0.0}
        d = r - o  # rounded relative to the difference itself (6e-8 in float32): err, max_abs hold
        err, sig = _dot(d, d), _dot(r, r)
        rmax, m = _absmax(r), _absmax(d)
        gscale = scales[k] if scales is not None and k < len(scales) else 0.0
        if gscale > 0 and r.size and rmax < SILENT * gscale and m <= SILENT * gscale:
            # a silent sample (a detection map with nothing in it): both tensors are round-off
            # noise far below the output's scale, and the cosine of two noise vectors means nothing
            cos.append(1.0)
        else:
            cos.append(_cosine(_dot(r, o), sig, oo))
        sq.append(math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf))
        scale = rmax
        if scales is not None and k < len(scales):
            scale = max(scale, scales[k])
        mx.append(m / scale if scale > 0 else m)
        ms = sig / max(r.size, 1)
        mse.append((err / max(r.size, 1)) / ms if ms > 0 else err)
        if k == 0 and ref_k.ndim >= 1 and ref_k.size:
            top1 = float(np.mean(np.argmax(ref_k, axis=-1) == np.argmax(out_k, axis=-1)))
    return {"cosine": min(cos) if cos else 1.0, "sqnr": min(sq) if sq else math.inf,
            "max_abs": max(mx) if mx else 0.0, "mse": max(mse) if mse else 0.0, "top1": top1}


def label_accuracy(outputs: Sequence[Sequence[np.ndarray]], labels: Sequence[int], k: int = 1) -> float:
    """Top-k accuracy of the first output (scores on the last axis; each sample's leading
    dims flattened, one label per sample or per row) against integer labels."""
    hits, total = 0, 0
    for out, lab in zip(outputs, labels):
        scores = np.asarray(out[0]).reshape(-1, np.asarray(out[0]).shape[-1])
        lab = np.asarray(lab).reshape(-1)
        if lab.size == 1 and scores.shape[0] > 1:
            lab = np.repeat(lab, scores.shape[0])
        topk = np.argsort(-scores, axis=-1)[:, :k]
        hits += int(np.sum(np.any(topk == lab[:, None], axis=1)))
        total += scores.shape[0]
    return hits / total if total else float("nan")


def fidelity(reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]],
             user_metric: Callable | None = None, samples=None, labels: Sequence[int] | None = None) -> dict:
    """Aggregate fidelity of ``outputs`` against ``reference`` (lists over samples of lists over
    outputs); with ``labels``, also top-1 and top-5 accuracy against them."""
    # an output's scale is its largest magnitude over the whole set: a sample whose output is all
    # near zero (a sigmoid far from any detection) must not turn float round-off into a big ratio
    scales = output_scales(reference)
    res = aggregate([compare_outputs(r, o, scales) for r, o in zip(reference, outputs)])
    if not res:
        return {}
    if labels is not None:
        res["accuracy"] = label_accuracy(outputs, labels, 1)
        res["top5"] = label_accuracy(outputs, labels, 5)
    if user_metric is not None:
        res["user"] = float(user_metric(outputs, samples))
    return res


def aggregate(per: Sequence[dict]) -> dict:
    """``fidelity``'s figures over samples from their ``compare_outputs`` scores (taken with the whole
    set's ``output_scales``): means of cosine, mse and top1, the worst cosine and max_abs, the mean
    finite sqnr, and the cosines' sample standard deviation ``cosine_sd`` (``mean_lower_bound``);
    {} without samples."""
    if not per:
        return {}
    fin = [p["sqnr"] for p in per if math.isfinite(p["sqnr"])]
    cos = [p["cosine"] for p in per]
    return {
        "cosine": float(np.mean(cos)),
        "cosine_sd": float(np.std(cos, ddof=1)) if len(cos) > 1 else 0.0,
        "cosine_min": float(min(p["cosine"] for p in per)),
        "sqnr": float(np.mean(fin)) if len(fin) == len(per) else (
            math.inf if not fin and all(p["sqnr"] == math.inf for p in per)
            else float(np.mean(fin)) if fin else -math.inf),
        "max_abs": float(max(p["max_abs"] for p in per)),
        "mse": float(np.mean([p["mse"] for p in per])),
        "top1": float(np.mean([p["top1"] for p in per])),
    }


def constant_outputs(*sets: Sequence[Sequence[np.ndarray]]) -> bool:
    """Whether every floating output is the same on every sample of ``sets`` (lists over samples of
    lists over outputs; at least two samples in all): a model whose outputs do not depend on its
    input here, whose fidelity figures then compare constants."""
    samples = [s for outs in sets for s in outs]
    if len(samples) < 2:
        return False
    first = samples[0]
    floats = [k for k, x in enumerate(first) if isinstance(x, np.ndarray) and x.dtype.kind in "fc"]
    return bool(floats) and all(np.array_equal(s[k], first[k]) for s in samples[1:] for k in floats)


PREDICTION_Z = 1.645  # one-sided 95 %


def mean_lower_bound(mean: float, sd: float, seen: int, future: int, z: float = PREDICTION_Z) -> float:
    """The one-sided lower prediction bound of the mean of ``future`` new samples, from ``seen``
    samples with mean ``mean`` and standard deviation ``sd`` (normal approximation; both means
    estimate the same one, so their difference has variance ``sd^2 (1/seen + 1/future)``):
    ``mean - z sd sqrt(1/seen + 1/future)``. A choice made on ``seen`` samples whose bound reaches a
    floor keeps the mean of ``future`` test samples above it 95 % of the time."""
    return float(mean - z * sd * math.sqrt(1.0 / seen + 1.0 / future))


def output_scales(reference: Sequence[Sequence[np.ndarray]]) -> list[float]:
    """Each output's largest magnitude over the whole reference set (``fidelity``'s scale)."""
    scales: list[float] = []
    for r in reference:
        for k, x in enumerate(r):
            x = as_flat_array(x)
            if not x.size or x.dtype.kind not in "fc":
                v = 0.0
            else:  # max |x| of a real output is exact without a float64 copy
                v = _absmax(x) if x.dtype.kind == "f" else float(np.max(np.abs(x.astype(np.float64))))
            if k == len(scales):
                scales.append(v)
            else:
                scales[k] = max(scales[k], v)
    return scales


def out_of_reach(budget: "Budget", baseline: dict | None, per_sample: Sequence[dict], n_total: int) -> bool:
    """Whether ``budget`` cannot hold on ``n_total`` samples whatever the samples not yet measured
    give, from the per-sample scores of the first ones (``compare_outputs`` with the whole set's
    scales). Exact bounds, no statistics: a mean of per-sample values at most 1 (cosine, top1)
    needs ``sum + (n - k) >= n t``; a mean of non-negative values (mse) ``sum <= n t``; a minimum
    (cosine_min) or maximum (max_abs) is broken by one sample. Other metrics (sqnr, accuracy and
    top5 against labels, user) are never out of reach before the end."""
    k, n = len(per_sample), n_total
    if not k:
        return False
    t = budget.threshold(baseline)
    if budget.metric in ("cosine", "top1") and budget.op == ">=":
        return sum(p[budget.metric] for p in per_sample) + (n - k) < n * t
    if budget.metric == "cosine_min" and budget.op == ">=":
        return min(p["cosine"] for p in per_sample) < t
    if budget.metric == "max_abs" and budget.op == "<=":
        return max(p["max_abs"] for p in per_sample) > t
    if budget.metric == "mse" and budget.op == "<=":
        return sum(p["mse"] for p in per_sample) > n * t
    return False


DEFAULT_BUDGET = "cosine>=0.99"  # applies when no budget is given (docs/errors.md)
DEFAULT_SCALAR_BUDGET = "max_abs<=0.01"  # the default for outputs of one value per sample
UNCHECKED_BUDGET = "none"  # --budget none: no fidelity check, the report says "unchecked"
# metrics measured against the original's outputs: the original's own score is exact
_AGAINST_REFERENCE = {"sqnr", "max_abs", "mse"}
_ABSOLUTE_EXAMPLE = {"sqnr": "sqnr>=30", "max_abs": "max_abs<=0.01", "mse": "mse<=1e-4"}
_BLIND_TO_ONE_VALUE = {"cosine", "cosine_min", "top1"}  # per-sample metrics a one-value output cannot move


def blind_metric_outputs(budget: "Budget | None", reference) -> list[int]:
    """Indices of outputs the budget's metric cannot judge: per-sample cosine (and argmax agreement)
    of an output holding one value per sample is 1 whatever the value (cosine of a one-element
    vector only checks its sign)."""
    if budget is None or budget.metric not in _BLIND_TO_ONE_VALUE or not reference:
        return []
    return [i for i, o in enumerate(reference[0]) if getattr(o, "size", 2) <= 1]


_BUDGET_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*"
                        r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Budget:
    """``METRIC>=VALUE`` or ``METRIC<=VALUE`` over the metrics in METRICS (or ``user``).

    A value with ``%`` is relative to the original model's own score: ``accuracy>=-1%`` allows
    a drop of one percentage point for fraction metrics (cosine, top1, accuracy, top5), and of
    1 % of the original's value for the others (``sqnr>=-10%``, ``user>=-2%``).
    """

    metric: str
    op: str
    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: "str | Budget | None") -> "Budget | None":
        """A Budget from its text; None for None or ``"none"`` (no check: the caller says which)."""
        if text is None or isinstance(text, Budget):
            return text
        if str(text).strip().lower() == UNCHECKED_BUDGET:
            return None
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise UsageError(f"cannot parse budget '{text}': expected METRIC>=VALUE or METRIC<=VALUE, "
                             f"e.g. \"cosine>=0.99\" (metrics: {', '.join(METRICS)})")
        metric, op, value, rel = m.group(1), m.group(2), float(m.group(3)), bool(m.group(4))
        if metric not in METRICS and metric != "user":
            raise UsageError(f"unknown metric '{metric}' in budget; known: {', '.join(METRICS)}")
        if rel and metric in _AGAINST_REFERENCE:
            # the original scored against its own outputs is exact (sqnr inf, max_abs 0, mse 0): a
            # fraction of that is no threshold any candidate can meet, or one every candidate meets
            raise UsageError(f"a relative budget on '{metric}' has no meaning (the original model's own "
                             f"{metric} is exact); give an absolute value, e.g. \"{_ABSOLUTE_EXAMPLE[metric]}\"")
        return cls(metric, op, value, rel)

    def threshold(self, baseline: dict | None = None) -> float:
        """The absolute threshold; a relative budget needs the original model's scores."""
        if not self.relative:
            return self.value
        if not baseline or baseline.get(self.metric) is None:
            raise UsageError(f"relative budget {self} needs the original model's {self.metric} score")
        base = float(baseline[self.metric])
        if self.metric in _FRACTION_METRICS:
            return base + self.value / 100.0
        return base + abs(base) * self.value / 100.0

    def holds(self, scores: dict, baseline: dict | None = None, margin: float = 0.0) -> bool:
        """Whether ``scores`` keep the budget. ``margin`` in [0, 1) keeps that fraction of the slack
        in reserve (headroom for samples the decision did not see): a fraction metric ``>= t`` needs
        ``1 - (1 - t)(1 - margin)``, ``sqnr >= t`` needs ``t + 10 log10(1 / (1 - margin))`` dB, a
        ``<= t`` budget ``t (1 - margin)``; ``user`` budgets take no margin."""
        v = scores.get(self.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        t = self.threshold(baseline)
        if not (v >= t if self.op == ">=" else v <= t):
            return False
        if margin <= 0 or self.metric == "user":
            return True
        if self.op == ">=" and self.metric in _FRACTION_METRICS:
            return v >= 1 - (1 - t) * (1 - margin) if t < 1 else True
        if self.op == ">=" and self.metric == "sqnr":
            return v >= t + 10 * math.log10(1 / (1 - min(margin, 0.99)))
        if self.op == "<=":
            return v <= t * (1 - margin)
        return True

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}{'%' if self.relative else ''}"
