"""The quantize pass's guard: a fidelity floor held by keeping sensitive units in float, then speed.

- Fidelity: against the float model, the manager's evaluator under a budget (``ctx.budget``), else
  the mean cosine on up to 8 calibration samples, whose floor is ``min_cosine`` x the float model's
  own cosine after onnxruntime's optimizations (below 1 on ill-conditioned outputs).
- Mixed precision (a target that also takes 16-bit activations, QNN HTP, when the builder has a
  ``wide`` scheme): when the 8-bit plan misses the floor, the 1, 2, 4, ... most sensitive weighted
  units (``unit_analysis.py``) run at 16 bits with the units producing their inputs (``regions.py``),
  until the plan holds with half the error a cosine floor allows (``_margin``: the floor itself is met
  on 8 selection samples only); the best holding plan is kept (also measured with bias correction),
  before any unit is kept float.
- Keep-float search: when the plan misses the floor, integer elementwise ops go first (each one
  requantizes; without them each conv input is rounded once), then the most sensitive units
  (``unit_analysis.py``) are kept in float, 1, 2, 4, ... of them, up to ``max_float_fraction`` of the
  units without a budget; the first plan that holds is kept, else the best cosine. Not with the
  every-op placement (a device without a float unit): nothing can be kept float there. When the
  kept plan has every weighted unit float, there is nothing integer left to time: the pass keeps
  the float model (PP-OCRv4 det at cosine >= 0.99: 62 of 62 convolutions); a search that reaches
  that plan keeps it without measuring it (the float model's fidelity is exact), and a plan
  without integer elementwise ops that is the plan already measured is not measured again.
- Speed: with ``guard`` and no target other than ``cpu`` (this machine's speed says nothing about an
  NPU or an ARM core), the quantized and float models are compared by ``Context.compare_speeds``
  (one thread, interleaved rounds, the median ratio with a ~95 % interval); for ``openvino``, which
  runs on this CPU, by the same timing on the OpenVINO EP when a Python with onnxruntime-openvino
  is there (``targets.openvino.openvino_compare_speed``; each model with the target's emission
  rewrites applied first, so the timing is of what will be written; and a plan's fidelity is measured
  there too once it holds on the CPU EP, ``FidelityCheck.on_openvino``), else not at all. When the quantized one is
  not clearly ``min_speedup`` faster (the interval above it), small convolutions (few weights:
  onnxruntime's float NCHWc kernels beat the integer ones there) go back to float; when nothing is
  clearly faster, the pass changes nothing and says why. A tie always resolves to float, so the
  same command gives the same model on every run; the timings are in ``stats["speed_search"]``.
"""

from __future__ import annotations

__all__ = ["FidelityCheck", "Placement", "QuantizeGuard"]

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.metrics import Budget, fidelity, mean_lower_bound
from onnxshrink.passes.base import Context
from onnxshrink.passes.quantize.calibrate import CalibrationSamples
from onnxshrink.passes.quantize.plan import PlacementRules, plan_units
from onnxshrink.passes.quantize.qdq import QdqBuilder
from onnxshrink.passes.quantize.regions import wide_region
from onnxshrink.passes.quantize.unit_analysis import UnitAnalysis, analyse_units
from onnxshrink.runtime import make_session
from onnxshrink.targets.openvino import openvino_available, openvino_check, openvino_compare_speed
from onnxshrink.targets.rewrites import apply_rewrites

SMALL_CONV_LIMITS = (2048, 8192, 32768)  # weight counts under which convolutions go back to float, in turn


@dataclass
class Placement:
    """A quantization plan and its QDQ graph (None: no integer placement kept)."""

    graph: gs.Graph | None
    units: dict
    reasons: dict
    excluded: set
    wide: frozenset = frozenset()  # units at the wide (16-bit) precision of a mixed plan


def _logged(fid: dict, **fields) -> dict:
    """A fidelity search's log entry: ``fields``, the cosine measured and, when the screen stopped
    early (the budget out of reach), after how many samples (the cosine is theirs)."""
    return {**fields, "cosine": round(fid.get("cosine", 0.0), 6),
            **({"out_of_reach_after": fid["out_of_reach"]} if "out_of_reach" in fid else {}),
            **({"on": fid["on"]} if "on" in fid else {})}


AIM_MARGIN = 0.5  # the region search keeps half a cosine floor's allowance in reserve


EP_SAMPLES = 8  # selection samples a plan runs on the OpenVINO EP (as many as the emission's check)
VERDICT_SAMPLES = 8  # the verdict's test samples when the manager does not say (``Context.verdict_samples``)


def emitted_for(profile, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the target's emission rewrites applied as the emission applies them
    (``targets.prepare``: the profile's rewrites and the decompositions of ops it lacks; hard-swish as
    HardSwish for openvino), or as it is when they do not apply (HardSwish needs opset 14: a model the
    preparation could not upgrade stays as it is)."""
    r, done = apply_rewrites(model, profile.rewrites, profile)
    if not done:
        return model
    try:
        onnx.checker.check_model(r)
        return r
    except Exception:
        return model


class FidelityCheck:
    """Fidelity against the float model ``model_f``, and whether it holds the floor (the budget when
    one is given, else ``cosine >= floor``)."""

    def __init__(self, ctx: Context, model_f: onnx.ModelProto, samples: CalibrationSamples, min_cosine: float):
        self.ctx = ctx
        self.model_f = model_f
        self.samples = samples
        self.floor = min_cosine
        self.reference: tuple | None = None  # (samples, float outputs), made on the first own check
        self.ep_checks: list = []  # the plans also run on the OpenVINO EP: their cosines there and on the CPU EP

    def measure(self, g) -> dict:
        """The manager's evaluator under a budget (its screen where it offers one: a placement that
        cannot hold stops at the first sample that proves it), else the own check on up to 8
        calibration samples; for the openvino target, a plan that holds there is run on the OpenVINO
        EP too (``on_openvino``)."""
        if self.ctx.budget is not None and self.ctx.evaluator is not None:
            model = g if isinstance(g, onnx.ModelProto) else self.ctx.to_model(g)
            fid = self.ctx.screen(model) if self.ctx.screen is not None else self.ctx.evaluate(model)
            return self.on_openvino(model, fid)
        if self.reference is None:
            feeds = list(self.samples.take(8))
            sess = make_session(self.model_f, optimize=False, low_memory=True)
            self.reference = (feeds, [sess.run(None, s) for s in feeds])
        feeds, outputs = self.reference
        model = g if isinstance(g, onnx.ModelProto) else self.ctx.to_model(g)
        sess = make_session(model, optimize=True, low_memory=True)
        return fidelity(outputs, [sess.run(None, s) for s in feeds])

    def on_openvino(self, model: onnx.ModelProto, fid: dict) -> dict:
        """``fid`` (the plan on onnxruntime's CPU kernels), or the plan's fidelity on the OpenVINO EP when
        that misses the budget: for the openvino target with a verifier, a plan that holds on the CPU
        EP is run there too, as the emission will write it, on the selection samples the emission's
        check runs (up to ``EP_SAMPLES``), against the original's outputs. OpenVINO's int8 kernels do
        not round as onnxruntime's do (PP-OCRv4 det: a plan at cosine 0.993 on the CPU EP reads 0.988
        there), so a plan that only holds on the CPU EP is one the target's check would refuse."""
        target, val, ref = getattr(self.ctx, "target", None), self.ctx.val, self.ctx.reference
        if getattr(target, "name", None) != "openvino" or val is None or ref is None or not self.holds(fid) \
                or not any(n.op_type == "QuantizeLinear" for n in model.graph.node) or not openvino_available():
            return fid
        samples = [val.get(i) for i in range(min(EP_SAMPLES, len(val)))]
        res = openvino_check(emitted_for(target, model), samples, reference=ref[:len(samples)])
        ep = res.get("fidelity") or {}
        self.ep_checks.append({"cpu": round(fid.get("cosine", 0.0), 6), "openvino": round(ep.get("cosine", 0.0), 6)
                               if ep else res.get("error", "not run")})
        return fid if not ep or self.holds(ep) else {**ep, "on": "the OpenVINO EP"}

    def holds(self, fid: dict, samples: int | None = None) -> bool:
        """Whether ``fid`` (measured on ``samples`` samples; default the selection samples) keeps the
        budget, and for a cosine budget with its spread (``bound``); without a budget, the floor."""
        if self.ctx.budget is not None:
            if not self.ctx.budget_holds(fid):
                return False
            b = self.bound(fid, samples)
            return b is None or b >= self.ctx.budget.value
        return fid.get("cosine", 0.0) >= self.floor

    def bound(self, fid: dict, samples: int | None = None) -> float | None:
        """For an absolute ``cosine>=`` budget: the lower bound the mean cosine of the verdict's test
        samples (``Context.verdict_samples``, else ``VERDICT_SAMPLES``) keeps 95 % of the time, from
        ``fid`` measured on ``samples`` samples (``metrics.mean_lower_bound``); None for another
        budget, without the spread or with fewer than two samples.

        The verdict judges a few samples no decision saw: a plan just at the floor on the selection
        samples misses it on the test samples about half the time (torchvision's ShuffleNetV2,
        RegNetY, GoogLeNet and ResNeXt at cosine >= 0.99: 0.9892-0.9898 on test, exit 4), and a set
        of stored weights that holds the calibration mean only through one good photo among bad ones
        misses it too (PP-OCRv4 det: calibration 0.9926 with sd 0.0132, test 0.9847)."""
        budget = self.ctx.budget
        if budget is None or budget.metric != "cosine" or budget.op != ">=" or budget.relative \
                or "cosine_sd" not in fid:
            return None
        n = samples if samples is not None else len(self.ctx.val) if self.ctx.val is not None else 0
        if n < 2:
            return None
        return mean_lower_bound(fid["cosine"], fid["cosine_sd"], n, self.verdict_samples)

    @property
    def verdict_samples(self) -> int:
        """The test samples the manager's verdict judges (``Context.verdict_samples``, else ``VERDICT_SAMPLES``)."""
        return self.ctx.verdict_samples or VERDICT_SAMPLES

    def set_floor(self, min_cosine: float) -> None:
        """Without a budget: ``min_cosine`` x the optimized float model's own cosine."""
        self.floor = min_cosine
        if self.ctx.budget is None:
            base = self.measure(self.model_f).get("cosine", 1.0)
            self.floor = min_cosine * min(base, 1.0)


class QuantizeGuard:
    """The fidelity and speed guard of one run (module docstring)."""

    def __init__(self, options, ctx: Context, check: FidelityCheck, builder: QdqBuilder, rules: PlacementRules,
                 analysis: UnitAnalysis, samples: CalibrationSamples, stats: dict, final: bool = True):
        self.o = options
        self.final = final  # the placement kept may be the pass's result (no later step of the pass changes it)
        self.ctx = ctx
        self.check = check
        self.builder = builder
        self.rules = rules
        self.analysis = analysis
        self.samples = samples
        self.stats = stats

    def run(self, start: Placement, order: list | None) -> tuple[Placement, dict]:
        """The placement kept (its graph None when no placement is fast enough) and the fidelity
        search's outcome ``{"holds", "cosine", "kept_float"}``."""
        check = self.check
        check.set_floor(self.o.min_cosine)
        base_ex = set(start.excluded)
        rules = self.rules
        fid = check.measure(start.graph)
        tried = [(fid, start)]
        log = [_logged(fid, keep_float=0)]
        if not check.holds(fid) and self.builder.wide is not None:
            fid = self._mixed(start, fid, tried, log)
        if not check.holds(fid) and rules.elementwise and not rules.every_op:
            # every integer elementwise op requantizes; without them each conv input is rounded once
            no_elementwise = dataclasses.replace(rules, elementwise=False)
            units_e, reasons_e = plan_units(self.builder.graph_f, base_ex, no_elementwise)
            if units_e == start.units:  # no integer elementwise op in the plan: nothing to measure
                log.append({"keep_float": 0, "elementwise": False, "skipped": "the same plan (no integer "
                                                                              "elementwise op)"})
            else:
                p_e = Placement(self.builder.build(units_e), units_e, reasons_e, base_ex)
                fid_e = check.measure(p_e.graph)
                log.append(_logged(fid_e, keep_float=0, elementwise=False))
                if fid_e.get("cosine", 0.0) > fid.get("cosine", 0.0):
                    fid, rules = fid_e, no_elementwise
                    tried.append((fid, dataclasses.replace(p_e, excluded=start.excluded)))
        if not check.holds(fid) and order is None and not rules.every_op:
            order = self.analysis.order()
        order = order or []
        cap = len(order) if self.ctx.budget is not None else \
            max(1, math.ceil(self.o.max_float_fraction * len(order)))
        if rules.every_op:
            cap = 0  # a device without a float unit: no unit is kept float
        weighted_start = any(u.kind == "weighted" for u in start.units.values())
        all_float = None  # the plan with every weighted unit float, when the search reaches it
        k = 1
        while not check.holds(fid) and order and k <= min(cap, len(order)):
            excluded_k = base_ex | set(order[:k])
            units_k, reasons_k = plan_units(self.builder.graph_f, excluded_k, rules)
            if self.o.guard and weighted_start and not any(u.kind == "weighted" for u in units_k.values()):
                # every weighted unit float: the guard keeps the float model whatever this plan measures
                log.append({"keep_float": k, "skipped": "no weighted unit left integer: the float model"})
                all_float = Placement(None, units_k, reasons_k, excluded_k)
                break
            p_k = Placement(self.builder.build(units_k), units_k, reasons_k, excluded_k)
            fid = check.measure(p_k.graph)
            tried.append((fid, p_k))
            log.append(_logged(fid, keep_float=k))
            if k >= min(cap, len(order)):
                break
            k = min(2 * k, cap, len(order))
        self.stats["fidelity_search"] = log
        self.stats["fidelity_floor"] = str(self.ctx.budget) if self.ctx.budget is not None else \
            f"cosine>={check.floor:.4f}"
        if check.ep_checks:
            self.stats["openvino_fidelity"] = list(check.ep_checks)
        ok = [t for t in tried if check.holds(t[0])]
        if all_float is not None:  # the float model itself: its fidelity is exact
            ok = [({"cosine": 1.0}, all_float)]
        fid, chosen = ok[0] if ok else max(tried, key=lambda t: t[0].get("cosine", 0.0))
        # the share of units at 16 bits: all with a 16-bit scheme, the wide units of a mixed plan
        wide = 1.0 if self.builder.scheme.qmax > 255 else round(len(chosen.wide) / max(len(chosen.units), 1), 4)
        outcome = {"holds": bool(ok), "cosine": fid.get("cosine", 0.0), "kept_float": len(chosen.excluded - base_ex),
                   "wide": wide}
        if not self.o.guard:
            return chosen, outcome
        if weighted_start and not any(u.kind == "weighted" for u in chosen.units.values()):
            # every weighted unit had to stay float: what is left integer cannot be faster than float
            self.stats["speed_search"] = [{"config": "skipped: no weighted unit left integer"}]
            self.stats["guard_reason"] = (f"every weighted unit stays float to hold {self.stats['fidelity_floor']} "
                                          f"on the selection samples: nothing integer left to time")
            return dataclasses.replace(chosen, graph=None), outcome
        target = getattr(getattr(self.ctx, "target", None), "name", None)
        if target == "openvino" and openvino_available():
            # OpenVINO runs on this CPU: timed on its own EP (in the interpreter that has it), each model
            # with the fusions the emission will apply (hard-swish as HardSwish: OpenVINO runs cleanup's
            # x * HardSigmoid(x) form far slower), so the guard times what will be written
            profile = self.ctx.target

            def on_openvino(base, models, sample):
                b = emitted_for(profile, base)
                decides = (("faster", self.o.min_speedup),)
                return [openvino_compare_speed(b, emitted_for(profile, m), sample, decides=decides) for m in models]
            return self._speed(chosen, fid, rules, on_openvino, "the OpenVINO EP"), outcome
        if target not in (None, "cpu"):
            # an NPU or an ARM CPU runs the integer kernels natively: timing them on this machine
            # says nothing about the target, so only the fidelity floor applies
            self.stats["speed_search"] = [{"config": f"skipped: the {target} target is not this CPU"}]
            return chosen, outcome
        # one session of the float model for every comparison (it is the same model each time)
        float_session = make_session(self.builder.model_f, optimize=True, threads=1)
        return self._speed(chosen, fid, rules, where="this CPU", float_model=float_session), outcome

    def _mixed(self, start: Placement, fid: dict, tried: list, log: list) -> dict:
        """The 8-bit plan ``start`` with the 1, 2, 4, ... most sensitive weighted units and their input
        producers at the builder's wide precision, until one holds the floor (appended to ``tried``);
        returns the last fidelity measured. The builder is left at 8 bits for the plans after it."""
        order = self.analysis.order()
        b = self.builder
        aim = self._aim()
        k, held = 1, None
        while order:
            wide = wide_region(order[:k], start.units)
            b.wide_units = wide
            try:
                p = Placement(b.build(start.units), start.units, start.reasons, start.excluded, frozenset(wide))
            finally:
                b.wide_units = set()
            fid = self.check.measure(p.graph)
            log.append(_logged(fid, keep_float=0, wide_seeds=k, wide_units=len(wide)))
            if self.check.holds(fid):
                if held is None or fid.get("cosine", 0.0) > held[0].get("cosine", 0.0):
                    held = (fid, p, k)
                if aim is None or aim.holds(fid, margin=AIM_MARGIN):
                    break
            if k >= len(order):
                break
            k = min(2 * k, len(order))
        if held is None:
            return fid
        fid, p, k = held
        tried.append((fid, p))
        self.stats["wide_seeds"] = order[:k]
        if aim is not None:
            self.stats["wide_aim"] = (f"cosine>={1 - (1 - aim.value) * (1 - AIM_MARGIN):.4f} on the selection "
                                      f"samples (half the error the floor allows)")
        return self._mixed_bias_corrected(p, fid, tried, log)

    def _aim(self) -> Budget | None:
        """The cosine floor the region search aims beyond, with ``AIM_MARGIN`` of its allowance in
        reserve (``Budget.holds``' margin: half the error the floor allows; the floor is met on 8
        selection samples, and a plan just at it missed the same budget on held-out photos,
        PP-OCRv4 det: 0.990 on selection, 0.980 on test). None for a budget on another metric."""
        budget = self.ctx.budget
        if budget is None:
            return Budget("cosine", ">=", self.check.floor)
        if budget.metric == "cosine" and budget.op == ">=" and not budget.relative:
            return budget
        return None

    def _mixed_bias_corrected(self, p: Placement, fid: dict, tried: list, log: list) -> dict:
        """The holding mixed plan ``p`` (last in ``tried``) with bias correction too (the mean shifts of a
        per-unit analysis at each unit's own precision), kept in its place when it measures better: the
        int8 weights' rounding shift is what remains at 16 bits, and a plan near the floor on the
        selection samples has little margin for held-out ones. Not when bias correction is on already."""
        b = self.builder
        if b.bias_shift is not None or not self.analysis.results:
            return fid
        b.wide_units = set(p.wide)
        try:  # the shifts of each unit at its own precision (a 16-bit unit's input is not rounded to 8 bits)
            b.bias_shift = {k: a["shift"] for k, a in analyse_units(b, p.units, self.samples).items()}
            p_bc = dataclasses.replace(p, graph=b.build(p.units))
        finally:
            b.wide_units, b.bias_shift = set(), None
        fid_bc = self.check.measure(p_bc.graph)
        log.append(_logged(fid_bc, keep_float=0, wide_units=len(p.wide), bias_correction=True))
        if self.check.holds(fid_bc) and fid_bc.get("cosine", 0.0) > fid.get("cosine", 0.0):
            tried[-1] = (fid_bc, p_bc)
            self.stats["bias_correction"] = "on the mixed plan (measured better)"
            return fid_bc
        return fid

    def _speed(self, chosen: Placement, fid: dict, rules: PlacementRules, compare=None,
               where: str = "this CPU", float_model=None) -> Placement:
        """``chosen``, or a faster variant with small convolutions in float, or a placement without a
        graph when none is ``min_speedup`` faster than the float model. ``compare(base, models,
        sample)`` times candidates against the float model and returns their ``SpeedComparison``s
        (``_cpu_compare``: one interleaved measurement, the float model run once per round for all of
        them; or the same on the target's EP) on ``where``. The variants (convolutions under each of
        ``SMALL_CONV_LIMITS`` weights back in float) are timed together, only when ``chosen`` is not
        clearly fast enough, and taken in turn: the first clearly fast enough one is kept when it
        holds the floor (or measures at least ``chosen``'s fidelity); a variant that is not clearly
        fast enough could never be kept, so its fidelity is not measured."""
        compare = compare or self._cpu_compare
        model_f = float_model if float_model is not None else self.builder.model_f  # a session, or the model
        sample = self.samples.first()
        cmp = compare(model_f, [self.ctx.to_model(chosen.graph)], sample)[0]
        speed = [{"config": f"{len(chosen.excluded)} sensitive units in float", **cmp.as_dict()}]
        best_cmp, best = cmp, chosen
        if not cmp.faster_than(self.o.min_speedup):
            variants = []  # (limit, small convs, units, reasons, graph)
            for limit in SMALL_CONV_LIMITS:
                small = {u.node for u in chosen.units.values() if u.kind == "weighted" and self._weights(u) < limit}
                if not small:
                    continue
                units_k, reasons_k = plan_units(self.builder.graph_f, chosen.excluded | small, rules)
                if not any(u.kind == "weighted" for u in units_k.values()):
                    break
                variants.append((limit, small, units_k, reasons_k, self.builder.build(units_k)))
            cmps = compare(model_f, [self.ctx.to_model(v[-1]) for v in variants], sample) if variants else []
            for (limit, small, units_k, reasons_k, qg_k), cmp_k in zip(variants, cmps):
                speed.append({"config": f"only convs with >= {limit} weights", **cmp_k.as_dict()})
                if not cmp_k.faster_than(self.o.min_speedup):
                    continue  # only a clearly faster variant can be kept: its fidelity alone is measured
                fid_k = self.check.measure(qg_k)
                if self.check.holds(fid_k) or fid_k.get("cosine", 0) >= fid.get("cosine", 0):
                    best_cmp, best = cmp_k, Placement(qg_k, units_k, {**reasons_k, **{
                        n: "kept float: small convolution (the float kernel is faster)" for n in small}},
                        chosen.excluded | small)
                    break
        self.stats["speed_search"] = speed
        if not best_cmp.faster_than(self.o.min_speedup):
            self.stats["guard_reason"] = (
                f"no quantized placement is clearly faster than fp32 on {where} (best {best_cmp.speedup:.2f}x, "
                f"95 % interval {best_cmp.low:.2f}-{best_cmp.high:.2f}x, which must lie above {best_cmp.margin:g} x "
                f"min_speedup; a tie keeps float)")
            return dataclasses.replace(chosen, graph=None)
        return best

    def _cpu_compare(self, base, models: list, sample: dict) -> list:
        """The candidates ``models`` timed against ``base`` on this CPU in one interleaved measurement
        (``Context.compare_speeds``), each deciding "clearly ``min_speedup`` faster"."""
        return self.ctx.compare_speeds(base, models, sample, (("faster", self.o.min_speedup),), final=self.final)

    def _weights(self, u) -> int:
        node = self.builder.nodes_f[u.node]
        return int(np.prod(node.inputs[1].shape)) if u.kind == "weighted" else 0
