"""onnxruntime sessions, streaming capture of intermediate tensors, latency measurement, and
onnxruntime's error messages made readable (``ort_message``)."""

from __future__ import annotations

__all__ = ["make_session", "run_model", "capture_activations", "measure_latency", "interleaved_latency",
           "compare_speed", "compare_speeds", "compare_candidates", "speed_comparison", "SpeedComparison",
           "CLEAR_MARGIN", "EARLY_ROUNDS", "EARLY_LOOK_MS", "DECISIVE_FACTOR", "decision_boundary",
           "early_boundaries", "close_call", "settled_by_far", "append_outputs", "session_with_outputs",
           "ort_message"]

import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxshrink.graph.shapes import value_types
from onnxshrink.model import VIA_FILE_BYTES, weightless_copy, written

ort.set_default_logger_severity(3)

# onnxruntime's message prefixes: "[ONNXRuntimeError] : 1 : FAIL : ", and the source location with the
# C++ function, "/onnxruntime_src/onnxruntime/core/graph/graph.cc:1617 void onnxruntime::Graph::F() "
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"(?:/\S*)?onnxruntime\S*\.(?:cc|cpp|h):\d+ (?:[\w:<>*&,~ ]*::~?\w+\([^()]*\)(?: const)? )?")


def ort_message(e: BaseException | str, limit: int = 300) -> str:
    """The first line of an (onnxruntime) error without the status prefix and the source location
    and C++ function onnxruntime puts before its message, so that a note cut to a table's width
    still says what went wrong; at most ``limit`` characters."""
    s = str(e).strip()
    s = s.splitlines()[0] if s else (type(e).__name__ if isinstance(e, BaseException) else "")
    s = _ORT_SOURCE.sub("", _ORT_STATUS.sub("", s)).strip()
    return s[:limit]


def make_session(model: onnx.ModelProto | str | os.PathLike, optimize: bool = True, threads: int | None = None,
                 providers: Sequence | None = None, provider_options=None,
                 session_config: dict | None = None, low_memory: bool = False) -> ort.InferenceSession:
    """An InferenceSession on ``model``. ``optimize=False`` disables all graph optimizations so
    numerical checks compare our graph, not onnxruntime's fusions of it. A model with
    ``model.VIA_FILE_BYTES`` of weights or more, or past the protobuf limit, goes through a temporary
    file with external data (``model.written``). ``low_memory`` turns off the
    memory pattern and the CPU arena (for capture sessions with many outputs: measured on YOLOv8n,
    -55 MB peak at the same speed)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if low_memory:
        so.enable_mem_pattern = False
        so.enable_cpu_mem_arena = False
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, str(v))
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    # past protobuf's limit, or big: from a temporary file with external data, by path (``model.written``).
    # onnxruntime memory-maps page-aligned external data, so the session holds no copy of the weights
    # (measured: +9 MB RSS for a 512 MB model, against +512 MB from bytes)
    with written(model, VIA_FILE_BYTES) as m:
        if isinstance(m, onnx.ModelProto):
            return _without_model_bytes(ort.InferenceSession(m.SerializeToString(), so, providers=providers,
                                                             provider_options=provider_options))
        return ort.InferenceSession(str(m), so, providers=providers, provider_options=provider_options)


def _without_model_bytes(sess: ort.InferenceSession) -> ort.InferenceSession:
    """``sess`` without the serialized model its Python wrapper keeps (``_model_bytes``, only for
    re-creating the session on a fallback EP after an EP error; onnxruntime's own comment: "This is bad
    as we're holding the memory indefinitely"). A session on the CPU EP alone has no EP to fall back
    to: its fallback is disabled and the copy dropped. Measured: the three sessions the quantize
    guard times together held three copies of the model (ViT-S width: 3 x 29 MB of peak RSS)."""
    if sess.get_providers() == ["CPUExecutionProvider"] and getattr(sess, "_model_bytes", None) is not None:
        sess.disable_fallback()
        sess._model_bytes = None
    return sess


def run_model(session: ort.InferenceSession, samples: Iterable[dict]) -> Iterator[list[np.ndarray]]:
    """Outputs of the session for each sample, one sample at a time."""
    names = [o.name for o in session.get_outputs()]
    for s in samples:
        yield session.run(names, s)


def append_outputs(m: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Append graph outputs for the tensors ``names`` to ``m`` in place (float32 where the type is
    unknown). The types come from shape inference on a weightless copy (``model.weightless_copy``):
    inference on the model itself would serialize it, parse it and return a copy with its weights (a
    10 MB CRNN: about 30 MB at the calibration's peak), and a type needs no weight's data."""
    have = {o.name for o in m.graph.output}
    want = [n for n in names if n not in have]
    if not want:
        return m
    try:
        types = value_types(onnx.shape_inference.infer_shapes(weightless_copy(m)))
    except Exception:
        types = {}
    for t in m.graph.initializer:
        types.setdefault(t.name, t.data_type)
    for n in want:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, types.get(n) or onnx.TensorProto.FLOAT, None))
    return m


def session_with_outputs(model: onnx.ModelProto, names: Sequence[str], nodes: Sequence[onnx.NodeProto] = (),
                         optimize: bool = False) -> ort.InferenceSession:
    """A low-memory session (``make_session``) of ``model`` with ``nodes`` appended and the tensors
    ``names`` as outputs too: both are added to the model in place for the session and removed again,
    so the model is never copied (calibration's reductions, activation captures)."""
    n_nodes, n_out = len(model.graph.node), len(model.graph.output)
    try:
        model.graph.node.extend(nodes)
        return make_session(append_outputs(model, names), optimize=optimize, low_memory=True)
    finally:
        del model.graph.node[n_nodes:]
        del model.graph.output[n_out:]


def capture_activations(model: onnx.ModelProto, names: Sequence[str], samples: Iterable[dict],
                        optimize: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Stream {tensor name: value} for the tensors ``names``, one sample at a time.

    Memory holds one sample's captured tensors at once, so callers can reduce to statistics
    (histograms, X^T X) and stay flat in the number of samples.
    """
    names = list(dict.fromkeys(names))
    sess = session_with_outputs(model, names, optimize=optimize)
    for s in samples:
        vals = sess.run(names, s)
        yield dict(zip(names, vals))


def measure_latency(model: onnx.ModelProto | ort.InferenceSession, feeds: dict, runs: int = 30, warmup: int = 3,
                    threads: int = 1) -> float:
    """Median wall time of one inference in milliseconds (one intra-op thread by default)."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model, optimize=True, threads=threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_latency(models: list, feeds: dict, rounds: int = 8, runs: int = 5, warmup: int = 3,
                        threads: int = 1) -> list[list[float]]:
    """Wall times in milliseconds of each model (ModelProto or session), measured in turn: each round
    runs every model ``runs`` times, so load on a shared machine hits all of them alike."""
    sessions = [m if isinstance(m, ort.InferenceSession) else make_session(m, optimize=True, threads=threads)
                for m in models]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for sess, acc in zip(sessions, times):
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feeds)
                acc.append((time.perf_counter() - t) * 1e3)
    return times


CLEAR_MARGIN = 1.03  # a speed difference counts when its whole interval is 3 % beyond the threshold
EARLY_ROUNDS = 6  # rounds per block of compare_speed's early look
EARLY_LOOK_MS = 2.0  # the early look is taken where a round of the pair takes this long or more
# a model whose run takes under 0.1 ms: its rounds drift together far more than the interval says
# (caches, the Python call around a few microseconds of work), so a difference must be 10 % to count
TINY_RUN_MS, TINY_MARGIN = 0.1, 1.10
# a decision is taken on the early look's first block alone when every one of its rounds lies this factor
# beyond the boundary (the ratio of two copies of one model: in 1000 six-round blocks on four models, the
# largest block minimum was 1.022 on a quiet machine and 1.097 with two CPU hogs beside it)
DECISIVE_FACTOR = 1.25


def decision_boundary(kind: str, threshold: float, margin: float) -> float:
    """The speed ratio a decision ``kind`` about ``threshold`` turns on: ``threshold x margin`` for
    "faster", ``threshold / margin`` for "slower"."""
    return threshold * margin if kind == "faster" else threshold / margin


@dataclass(frozen=True)
class SpeedComparison:
    """How much faster ``b`` ran than ``a``: per interleaved round the ratio ``t_a / t_b``; ``speedup``
    is their median and ``[low, high]`` the union of the two measuring blocks' distribution-free ~95 %
    confidence intervals of the median (order statistics of the binomial(n, 1/2)); ``t_a``/``t_b``
    are median times in ms."""

    speedup: float
    low: float
    high: float
    t_a: float
    t_b: float
    rounds: int

    @property
    def margin(self) -> float:
        """How far beyond a threshold the interval must lie: ``CLEAR_MARGIN`` (3 %), or ``TINY_MARGIN``
        (10 %) when both models run in under ``TINY_RUN_MS`` (measured: a 1-D CNN of 20 us read
        0.96-1.03x from run to run on a loaded machine, each time with a narrow interval)."""
        return TINY_MARGIN if max(self.t_a, self.t_b) < TINY_RUN_MS else CLEAR_MARGIN

    def boundary(self, kind: str, threshold: float) -> float:
        """The speed ratio a decision ``kind`` ("faster" or "slower") about ``threshold`` turns on:
        ``threshold x margin`` for "faster", ``threshold / margin`` for "slower"."""
        return decision_boundary(kind, threshold, self.margin)

    def faster_than(self, threshold: float = 1.0) -> bool:
        """``b`` is at least ``threshold`` times as fast as ``a``, clearly: the whole interval lies
        above ``threshold x margin``. Rounds of one run of a tiny model drift together (the
        interval is narrower than the run-to-run spread of the median), hence the margin. A tie is
        False, so a decision taken on it is the same on every run."""
        return self.low > self.boundary("faster", threshold)

    def slower_than(self, threshold: float = 1.0) -> bool:
        """``b`` is clearly slower than ``threshold`` times ``a``'s speed: the whole interval lies below
        ``threshold / margin``."""
        return self.high < self.boundary("slower", threshold)

    def as_dict(self) -> dict:
        return {"speedup": round(self.speedup, 3), "interval": [round(self.low, 3), round(self.high, 3)],
                "ms": [round(self.t_a, 4), round(self.t_b, 4)], "rounds": self.rounds}

    @classmethod
    def from_dict(cls, d: dict) -> "SpeedComparison":
        """The comparison ``as_dict`` wrote (to its rounding), e.g. one a report or another process kept."""
        return cls(d["speedup"], d["interval"][0], d["interval"][1], d["ms"][0], d["ms"][1], d["rounds"])


def compare_speed(model_a, model_b, feeds: dict, seconds: float = 1.5, min_rounds: int = 15,
                  max_rounds: int = 61, decides: Sequence[tuple[str, float]] = (("faster", 1.0), ("slower", 1.0)),
                  early_rounds: int = EARLY_ROUNDS) -> SpeedComparison:
    """Time two models (ModelProto or session) on one thread in interleaved rounds and compare them
    (``SpeedComparison``): the one latency measurement every speed decision uses;
    ``compare_speeds`` with the pair (0, 1), which says how the rounds and the early stop work."""
    return compare_speeds([model_a, model_b], feeds, [(0, 1, tuple(decides))], seconds=seconds,
                          min_rounds=min_rounds, max_rounds=max_rounds, early_rounds=early_rounds)[0]


def compare_speeds(models: Sequence, feeds: dict, pairs: Sequence[tuple[int, int, Sequence[tuple[str, float]]]],
                   seconds: float = 1.5, min_rounds: int = 15, max_rounds: int = 61,
                   early_rounds: int = EARLY_ROUNDS) -> list[SpeedComparison]:
    """Time ``models`` (ModelProto or session) on one thread in interleaved rounds (each round runs
    every model once, so load on a shared machine hits all of them alike) and compare the ``pairs``
    ``(a, b, decides)``: the ``SpeedComparison`` of model ``b`` against model ``a`` for each. Timing
    several candidates against one base in the same rounds runs the base once per round instead of
    once per candidate.

    Rounds: as many as fit in about ``seconds`` of the first pair (``min_rounds``..``max_rounds``),
    sized by the median round of the first early block (below; by one run of the first pair when
    the caller decides nothing), in two blocks; a pair's interval is the union of the two blocks'
    intervals, so a drift of the machine's load between blocks widens it instead of faking a clear
    difference. Each session is warmed up by one run before the first block; the second early block
    follows it at once (no warm-up: every session has just run), the blocks of a full measurement
    after a pause are warmed up again.

    Early stop: ``decides`` names the decisions the caller takes on a pair (``("faster", t)``:
    ``faster_than(t)``, whose boundary is the ratio ``t x margin``; ``("slower", t)``:
    ``slower_than(t)``, boundary ``t / margin``; ``SpeedComparison.margin``). Decisive first
    block: when every round of the first block of ``early_rounds`` lies ``DECISIVE_FACTOR`` (1.25)
    beyond every boundary of every pair (all faster than 1.25 x the boundary, or all slower than
    it / 1.25), those comparisons are the answer: the block's interval is its [min, max] ratio
    (coverage 97 %), and a difference that large in every round is not the machine's drift (two
    copies of one model never read past 1.10 in every round of a block, even beside two CPU hogs;
    YOLOv8n's guard and contract at 2.2x, ViT-S at 2.5x, the CRNN's at 2-3x: 6 rounds instead
    of 12). Otherwise two short blocks of ``early_rounds`` rounds are timed first (the first one
    counted); when no pair has a boundary inside its interval, every
    decision is already taken as the full measurement would take it (its interval is narrower
    around the same median) and those comparisons are returned. With 6 rounds a block's interval is
    its [min, max] ratio (coverage of the median 1 - 2/2^6 = 97 %), so a clear early verdict needs
    every one of the 12 rounds on one side of the boundary. A "faster" boundary inside the interval
    with the median at or under it stops too (futility): more rounds narrow the interval around that
    median, and "clearly faster" needs the whole interval above the boundary, so the answer stays
    the cautious one, "not clearly faster" (a tie keeps float). A "slower" boundary inside the
    interval is always a close call: there the cautious answer is the one more rounds may give
    (PP-OCRv4 rec's guard: three ties at 1.00-1.03x, decided on 12 rounds instead of 23-24).
    Otherwise (a close call) the close pairs' blocks grow to their full size: the rounds timed are
    the same number as without the early look; a pair decided on the early look keeps that
    comparison, and a model in no close pair leaves the rounds (PP-OCRv4 rec's three small-conv
    variants: one close call times 2 models instead of 4). The
    early look is taken where a round of the first pair takes ``EARLY_LOOK_MS`` or more:
    consecutive runs of a tiny model drift together, so 12 of them can all lie on one side by
    chance, and its full measurement is cheap (61 rounds of 2 ms: 0.12 s)."""
    sessions = [m if isinstance(m, ort.InferenceSession) else make_session(m, optimize=True, threads=1)
                for m in models]
    a0, b0 = pairs[0][:2]

    def sized(one: float) -> tuple[int, int]:
        """The two blocks' rounds for a pair round of ``one`` seconds."""
        rounds = int(min(max_rounds, max(min_rounds, seconds / max(one, 1e-5))))
        return rounds // 2, rounds - rounds // 2

    def compared(blocks) -> list[SpeedComparison]:
        return [speed_comparison([(blk[a], blk[b]) for blk in blocks]) for a, b, _ in pairs]

    if not any(d for _, _, d in pairs):  # nothing to decide: one run of the first pair sizes the rounds
        one = sum(measure_latency(sessions[i], feeds, runs=1, warmup=1) for i in (a0, b0)) / 1e3
        return compared([interleaved_latency(sessions, feeds, rounds=n, runs=1, warmup=2) for n in sized(one)])
    # the early look's first block (each model warmed up once) also sizes the rounds: its median pair round
    first = interleaved_latency(sessions, feeds, rounds=early_rounds, runs=1, warmup=1)
    one = (statistics.median(first[a0]) + statistics.median(first[b0])) / 1e3
    sizes = sized(one)
    if one * 1e3 >= EARLY_LOOK_MS and sum(sizes) > 2 * early_rounds:
        cmps = compared([first])
        if all(_decisive(cmp, decides) for cmp, (_, _, decides) in zip(cmps, pairs)):
            return cmps
        # the second block follows the first at once: every session is warm
        early = [first, interleaved_latency(sessions, feeds, rounds=early_rounds, runs=1, warmup=0)]
        cmps = compared(early)
        close = [k for k, (cmp, (_, _, decides)) in enumerate(zip(cmps, pairs)) if _close(cmp, decides)]
        if not close:
            return cmps
        # the close calls: their blocks grow to full size (the early rounds count, nothing is re-timed);
        # a pair decided on the early look keeps that comparison, and a model of no close pair leaves the rounds
        timed = sorted({i for k in close for i in pairs[k][:2]})
        more = [interleaved_latency([sessions[i] for i in timed], feeds, rounds=n - early_rounds, runs=1, warmup=1)
                for n in sizes]
        blocks = [{i: e[i] + m[j] for j, i in enumerate(timed)} for e, m in zip(early, more)]
        for k in close:
            a, b, _ = pairs[k]
            cmps[k] = speed_comparison([(blk[a], blk[b]) for blk in blocks])
        return cmps
    # no early look (a tiny model): the first block's rounds count towards the first full block
    rest = interleaved_latency(sessions, feeds, rounds=max(sizes[0] - early_rounds, 0), runs=1, warmup=0)
    block1 = [f + r for f, r in zip(first, rest)]
    return compared([block1, interleaved_latency(sessions, feeds, rounds=sizes[1], runs=1, warmup=2)])


def _close(cmp: SpeedComparison, decides: Sequence[tuple[str, float]]) -> bool:
    """Whether a decision of ``decides`` is a close call on ``cmp`` (``compare_speeds``' early look;
    ``close_call``)."""
    return close_call(cmp.low, cmp.speedup, cmp.high, _boundaries(cmp, decides))


def _decisive(cmp: SpeedComparison, decides: Sequence[tuple[str, float]]) -> bool:
    """Whether every decision of ``decides`` is settled on ``cmp`` by a wide margin (``compare_speeds``'
    decisive first block; ``settled_by_far``)."""
    return settled_by_far(cmp.low, cmp.high, _boundaries(cmp, decides), DECISIVE_FACTOR)


def _boundaries(cmp: SpeedComparison, decides: Sequence[tuple[str, float]]) -> list:
    return [(kind, cmp.boundary(kind, t)) for kind, t in decides]


# The early look's two rules on a comparison's interval [low, high] and median ratio, given the
# boundaries [(kind, ratio)] of the decisions taken on it ("faster": ``t x margin``, "slower":
# ``t / margin``; ``SpeedComparison.boundary``). Plain Python on numbers: an EP's worker in another
# interpreter (``targets.ep_process``) runs these same functions (shipped as their source).
def close_call(low, median, high, boundaries):
    """A "faster" boundary inside the interval with the median above it (at or under it, more rounds
    are futile: the answer stays "not clearly faster"), or a "slower" boundary inside the interval."""
    for kind, bound in boundaries:
        if kind == "faster" and low <= bound < median:
            return True
        if kind != "faster" and low <= bound <= high:
            return True
    return False


def settled_by_far(low, high, boundaries, factor):
    """Every boundary lies ``factor`` (``DECISIVE_FACTOR``) outside the interval: below its low end or
    above its high end."""
    for _, bound in boundaries:
        if not (low >= bound * factor or high * factor <= bound):
            return False
    return True


def early_boundaries(decides: Sequence[tuple[str, float]]) -> list:
    """The boundaries [(kind, ratio)] of ``decides`` for a timing in another interpreter
    (``targets.ep_process``), which looks early only where a round takes ``EARLY_LOOK_MS`` or more:
    there the margin is ``CLEAR_MARGIN``, never ``TINY_MARGIN`` (``SpeedComparison.boundary``)."""
    return [(kind, decision_boundary(kind, t, CLEAR_MARGIN)) for kind, t in decides]


def compare_candidates(base, candidates: Sequence, feeds: dict, decides: Sequence[tuple[str, float]]) -> list:
    """Each of ``candidates`` timed against ``base`` in one interleaved measurement
    (``compare_speeds``: the base runs once per round for all of them), each with the decisions
    ``decides``: their ``SpeedComparison``s, in order."""
    decides = tuple(decides)
    return compare_speeds([base, *candidates], feeds, [(0, k, decides) for k in range(1, len(candidates) + 1)])


def speed_comparison(blocks: Sequence[Sequence[Sequence[float]]]) -> SpeedComparison:
    """The ``SpeedComparison`` of interleaved timings measured in blocks, each ``(times_a, times_b)``
    with one run of each model per round (``compare_speed`` measures them here; a run in another
    interpreter, e.g. ``targets.ep_process``, measures them there). Per round the ratio
    ``t_a / t_b``; per block the distribution-free ~95 % confidence interval of its median: the
    order statistics of rank ``k = floor((n - 1.96 sqrt(n)) / 2)`` from either end (binomial(n, 1/2));
    the interval is the union of the blocks' intervals."""
    ta, tb, lows, highs = [], [], [], []
    for a, b in blocks:
        n = min(len(a), len(b))
        if n == 0:
            raise ValueError("a timing block without rounds")
        ratios = sorted(x / y for x, y in zip(a, b))
        k = max(0, int(math.floor((n - 1.96 * math.sqrt(n)) / 2)))  # rank of the lower bound
        lows.append(ratios[k])
        highs.append(ratios[n - 1 - k])
        ta += list(a[:n])
        tb += list(b[:n])
    return SpeedComparison(speedup=float(statistics.median(x / y for x, y in zip(ta, tb))), low=float(min(lows)),
                           high=float(max(highs)), t_a=float(statistics.median(ta)),
                           t_b=float(statistics.median(tb)), rounds=len(ta))
