"""PassManager: run passes, validate after each, back off or roll back, report.

For each pass: import the model into an onnx-graphsurgeon Graph, run the pass, export, then
validate the candidate: (a) ONNX checker and shape inference, (b) an onnxruntime CPU session,
(c) fidelity of its outputs on the validation samples against the *original* model's outputs.
A lossless pass must match to float round-off (relative max-abs error <= ``lossless_tol``);
a lossy pass must keep the budget, else its ``weaker()`` variants are tried (backed off), else
it is rolled back with the reason. The result is the last accepted model and a Report.

With a cost target (``target_size``/``target_macs``/``target_latency``), the passes with per-unit
knobs (prune, svd, quantize) run together at the first of them through ``allocate.allocate``:
shared sensitivity table, greedy allocation, end-to-end verification and back-off, fail closed
(docs/pipelines.md).
"""

from __future__ import annotations

__all__ = ["PassManager", "optimize"]

import contextlib
import dataclasses
import gc
import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from onnxshrink import model as model_io
from onnxshrink.cache import model_digest
from onnxshrink.data import ListSource, SyntheticSource, as_source, check_reference_finite, input_specs, split_roles
from onnxshrink.errors import BudgetError, InputError, OnnxShrinkError, UsageError
from onnxshrink.graph.convert import graph_to_model, model_to_graph
from onnxshrink.graph.cost import model_stats
from onnxshrink.graph.shapes import fix_input_shapes
from onnxshrink.metrics import (
    DEFAULT_BUDGET,
    DEFAULT_SCALAR_BUDGET,
    UNCHECKED_BUDGET,
    Budget,
    blind_metric_outputs,
    compare_outputs,
    constant_outputs,
    fidelity,
    out_of_reach,
    output_scales,
)
from onnxshrink.passes.base import Context, Pass
from onnxshrink.passes.registry import create_pass
from onnxshrink.pipeline.allocate import AllocationConfig, Runner, allocate
from onnxshrink.pipeline.report import (
    APPLIED,
    BACKED_OFF,
    NOT_APPLICABLE,
    ROLLED_BACK,
    PassRecord,
    PhaseClock,
    Report,
)
from onnxshrink.pipeline.sensitivity import knobs
from onnxshrink.pipeline.settings import Settings, speed_policy
from onnxshrink.progress import Progress
from onnxshrink.runtime import (
    SpeedComparison,
    compare_candidates,
    compare_speed,
    compare_speeds,
    make_session,
    measure_latency,
    ort_message,
)
from onnxshrink.targets import ChannelsLastIO, emit_for_target, get_target, prepare_for_target, save_ort_format
from onnxshrink.targets.openvino import openvino_available
from onnxshrink.targets.qnn import qnn_available, save_qnn_context

MAX_BACKOFF = 6
# weights from which a pass's graph is collected (gc.collect) before its validation and after the pass: the
# graph's reference cycles hold a copy of the weights; a collection costs 20-90 ms (PP-OCRv4 rec: 2 x 90 ms)
COLLECT_FROM_BYTES = 64 * 2**20


class PassManager:
    """Run ``passes`` on a model under a fidelity ``budget``.

    passes: names ("cleanup"), {name: options} dicts, (name, options) pairs or Pass instances.
    data: calibration samples: a folder of .npy/.npz, a sequence of {input: array} dicts, a
        callable returning an iterable of them, or a SampleSource.
    val_data: validation samples; default: every 4th calibration sample held out (8+ samples).
    budget: "cosine>=0.99" style text or a Budget; checked after every lossy pass.
    target: a target name (cpu, xnnpack, nnapi, coreml, qnn, openvino) or TargetProfile.
    input_shapes: {input name: [dims]} fixing dynamic dimensions.
    synthetic: use random inputs when no data is given (fidelity then means nothing; flagged).
    metric: optional user callable (outputs, samples) -> float, exposed as metric "user".
    target_size / target_macs / target_latency: cost targets, fractions of the input's weight
        bytes, MACs or measured latency (several: all must be met); executor (auto, serial, process,
        ray), workers, cache (True, False, a folder or a MeasurementCache), sensitivity_samples,
        max_units and plot (a PNG path) tune the allocation.
    The options are the fields of ``pipeline.settings.Settings``: keyword arguments, or
    ``settings=`` (keyword arguments then override its fields).
    """

    def __init__(self, passes: Sequence, *, settings: Settings | None = None, **options):
        settings = dataclasses.replace(settings, **options) if settings is not None else Settings(**options)
        self.settings = settings
        self.passes = [create_pass(p) for p in passes]
        self.data = settings.data
        self.val_data = settings.val_data
        if settings.budget is None:
            self.budget_source = "default"  # resolved in run(), once the outputs are known
        elif str(settings.budget).strip().lower() == UNCHECKED_BUDGET:
            self.budget_source = "none"
        else:
            self.budget_source = "given"
        self.budget = Budget.parse(settings.budget)
        self.target = get_target(settings.target)
        self.input_shapes = dict(settings.input_shapes or {})
        self.seed = settings.seed
        progress = settings.progress
        self.progress = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
        self.synthetic = settings.synthetic
        self.metric = settings.metric
        self.lossless_tol = settings.lossless_tol
        self.measure_speed = settings.measure_speed
        self.debug = settings.debug
        self.labels = settings.labels
        targets = [(k, v) for k, v in (("weight_bytes", settings.target_size), ("macs", settings.target_macs),
                                       ("latency_ms", settings.target_latency)) if v is not None]
        for _, v in targets:
            if not 0 < float(v) <= 1:
                raise UsageError(f"a cost target is a fraction of the input's cost in (0, 1], got {v}")
        self.cost_targets = [(k, float(v)) for k, v in targets]  # all must be met (allocate.py)
        if self.cost_targets and not any(p.knob is not None for p in self.passes):
            raise UsageError(f"a cost target (--target-size/--target-macs/--target-latency) needs a pass that can "
                             f"serve it ({', '.join(knobs())}); --passes has {', '.join(p.name for p in self.passes)}")
        self.executor = settings.executor
        self.workers = settings.workers
        self.cache = settings.cache
        self.sensitivity_samples = settings.sensitivity_samples
        self.max_units = settings.max_units
        self.sensitivity = settings.sensitivity
        self.plot = settings.plot
        self.speed = speed_policy(settings.speed)
        self.enforce_speed = settings.enforce_speed
        self._selection_memo = None  # (digest, samples, outputs) of the last _selection_outputs call
        self._stats_memo = None  # (model, shapes, stats) of the last _model_stats call
        self._input_timings: dict = {}  # digest of a candidate -> its SpeedComparison against the input
        if self.budget is not None and self.budget.metric == "user" and self.metric is None:
            raise UsageError("budget on metric 'user' needs a user metric callable")
        # set by run(): the validation labels, the original's own scores (relative budgets), the
        # original model (its interface), whether candidates get the strict checker, and what the
        # target's preparation did
        self.val_labels: list | None = None  # labels of the selection samples
        self.test_labels: list | None = None  # labels of the test samples
        self.baseline: dict = {}
        self.original: onnx.ModelProto | None = None
        self.input_path: str | None = None  # the input's file, when run on one
        self.full_check = True
        self._original_optimizes: bool | None = None  # tried on first need (original_optimizes)
        self._first_selection_sample: dict | None = None
        self.prepare_info: dict = {}

    # ------------------------------------------------------------------ setup
    def _prepare(self, model: onnx.ModelProto, report: Report):
        specs = input_specs(model)
        if not specs:
            raise InputError("the model has no inputs to feed")
        if self.input_shapes:
            fix_input_shapes(model, self.input_shapes)
            specs = input_specs(model)
        source = as_source(self.data, specs)
        val = as_source(self.val_data, specs)
        if self.labels is not None:
            if isinstance(source, ListSource) and val is None:
                source.set_labels(self.labels)
            elif isinstance(val, ListSource):
                val.set_labels(self.labels)
        needs = [p.name for p in self.passes if p.needs_data]
        if source is None and val is None:
            if needs and not self.synthetic:
                raise UsageError(f"pass '{needs[0]}' needs calibration data (--calib DIR, or --synthetic "
                                 f"to use random inputs)")
            if self.budget is not None and not self.synthetic:
                raise UsageError("a budget needs calibration or validation data to be measured (--calib DIR)")
            lossy = [p.name for p in self.passes if not p.lossless]
            if lossy and self.budget_source == "default" and not self.synthetic:
                raise UsageError(f"pass '{lossy[0]}' is lossy and its result cannot be checked without data: give "
                                 f"--calib DIR (or --budget none to skip the check)")
            shapes = {s.name: self.input_shapes.get(s.name) for s in specs}
            source = SyntheticSource(specs, n=4 if not self.synthetic else 16, seed=self.seed, shapes=shapes)
            report.warnings.append("no calibration data: fidelity measured on random inputs (meaningless "
                                   "for accuracy, used only to check lossless passes)")
        elif source is None:
            source = val
        try:
            first = source.get(0)
        except IndexError:
            raise InputError("calibration data has no samples") from None
        if self.target is not None and self.target.static_shapes:
            dynamic = [s.name for s in specs if not s.is_static]
            if dynamic:
                shapes = {n: list(first[n].shape) for n in dynamic}
                fix_input_shapes(model, shapes)
                specs = input_specs(model)
                source.with_specs(specs)
                if val is not None:
                    val.with_specs(specs)
                self.input_shapes.update(shapes)
                report.warnings.append("target '%s' needs static shapes; took them from the calibration data: %s"
                                       % (self.target.name,
                                          ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items())))
        roles = split_roles(source, val)
        self.val_labels = roles.selection.labels()
        self.test_labels = roles.test.labels()
        if self.budget is not None and self.budget.metric in ("accuracy", "top5") and self.test_labels is None:
            raise UsageError(f"budget on '{self.budget.metric}' needs labels: put labels.npy or labels.txt "
                             "(one integer per sample, in file-name order) beside the data")
        report.data = {
            "calibration": roles.calibration.description,
            "selection": roles.selection.description,
            "test": roles.test.description,
            "synthetic": bool(source.synthetic),
        }
        report.samples = roles.counts()
        if roles.shared:
            report.warnings.append(f"only {len(source)} samples: {roles.shared} share them, so the fidelity "
                                   f"is measured on samples the decisions saw (give {8} or more, or --val DIR)")
        return roles, {k: list(v.shape) for k, v in first.items()}

    # ------------------------------------------------------------------ validation
    def original_optimizes(self) -> bool:
        """Whether the input runs with onnxruntime's graph optimizations on (they fail on some inputs,
        e.g. constant folding a Range whose inputs are not scalars): tried on one selection sample
        when first asked, which is only when a candidate fails with them."""
        if self._original_optimizes is None:
            try:
                self._outputs(self._timed_input(), [self._first_selection_sample], optimize=True)
                self._original_optimizes = True
            except Exception:
                self._original_optimizes = False
        return self._original_optimizes

    def _release_original(self, ctx: Context) -> None:
        """Once a pass has replaced the input, an input read from a file is kept as a weightless skeleton
        (``model.weightless_copy``: interface, metadata, dims), also as the template passes export with;
        what needs its weights reads the file (``_timed_input``: the optimizations check, the timing and
        latency figures; ``_input_model``: the speed contract's roll-back to the input, a step whose
        ``before`` is None). The passes after it then run beside one model less (a 2 GiB model: 2 GiB
        less at every later peak; a 29 MB ViT-S: 29 MB less at the quantize guard's timing, its peak).
        Not when an initializer is also a graph input (an overridable default: exports restore its
        values from the template), nor, below 2 GB, with a target (the OpenVINO check times against
        the template's weights)."""
        o = self.original
        if self.input_path is None or self._original_released or not (model_io.is_large(o) or self.target is None):
            return
        inits = {t.name for t in o.graph.initializer}
        if any(i.name in inits for i in o.graph.input):
            return
        skeleton = model_io.weightless_copy(o)
        if ctx.template is o:
            ctx.template = skeleton
        self.original, self._original_released = skeleton, True

    def _model_stats(self, model: onnx.ModelProto, shapes) -> dict:
        """``graph.cost.model_stats``, computed once for the same model object and shapes (the last
        pass's record and the report's ``after`` describe one model)."""
        memo = self._stats_memo
        if memo is not None and memo[0] is model and memo[1] == shapes:
            return dict(memo[2])
        st = model_stats(model, shapes)
        self._stats_memo = (model, shapes, st)
        return dict(st)

    def _outputs(self, model: onnx.ModelProto, samples, optimize: bool):
        return self._outputs_of_sets(model, [samples], optimize)[0]

    def _screen(self, model: onnx.ModelProto, val, reference) -> dict:
        """The fidelity of ``model`` on the selection samples (``ctx.evaluate``), measured sample by sample
        and stopped as soon as the budget is out of reach (``metrics.out_of_reach``: exact bounds, so a
        candidate that could still hold is always measured in full); the result then has
        ``out_of_reach`` (samples measured) and the scores of those samples. Complete runs are kept for
        ``_selection_outputs``, so the candidate a search keeps is not run again."""
        if self.budget is None or self.metric is not None:
            return fidelity(reference, self._selection_outputs(model, val), self.metric, val, self.val_labels)
        key, kept = self._kept_selection_outputs(model, val)
        if kept is not None:
            return fidelity(reference, kept, None, val, self.val_labels)
        sess = make_session(model, optimize=True, low_memory=True)
        names = [o.name for o in sess.get_outputs()]
        scales, labels = output_scales(reference), self.val_labels
        outs, per = [], []
        for i, sample in enumerate(val):
            outs.append(sess.run(names, sample))
            per.append(compare_outputs(reference[i], outs[-1], scales))
            if len(outs) < len(reference) and out_of_reach(self.budget, self.baseline, per, len(reference)):
                fid = fidelity(reference[:len(outs)], outs, None, None,
                               labels[:len(outs)] if labels is not None else None)
                return {**fid, "out_of_reach": len(outs)}
        if key is not None:
            self._selection_memo = (key, val, outs)
        return fidelity(reference, outs, None, val, labels)

    def _selection_outputs(self, model: onnx.ModelProto, val, source=None) -> list:
        """The model's outputs on the selection samples ``val`` with onnxruntime's optimizations on (as
        the user runs it; run from ``source``, its file, when given). The last call's outputs are kept
        under a digest of the model (``_digest``): the quantize guard's evaluation of the placement it keeps,
        the manager's validation of the pass's result and the final selection figure are one model,
        run once."""
        key, kept = self._kept_selection_outputs(model, val)
        if kept is not None:
            return kept
        outs = self._outputs(model if source is None else source, val, optimize=True)
        self._selection_memo = (key, val, outs) if key is not None else None
        return outs

    def _kept_selection_outputs(self, model: onnx.ModelProto, val) -> tuple:
        """(the digest of ``model`` (``_digest``), None past 2 GB; the selection outputs kept for it, or None
        when the last ones measured were another model's or other samples')."""
        key = _digest(model)
        memo = self._selection_memo
        hit = key is not None and memo is not None and memo[0] == key and memo[1] is val
        return key, memo[2] if hit else None

    @staticmethod
    def _outputs_of_sets(model: onnx.ModelProto, sample_sets, optimize: bool) -> list:
        """The model's outputs on each of ``sample_sets`` (a list per set), from one session."""
        sess = make_session(model, optimize=optimize, low_memory=True)  # -24 MB peak on YOLOv8n
        names = [o.name for o in sess.get_outputs()]
        return [[sess.run(names, s) for s in samples] for samples in sample_sets]

    def _validate(self, candidate: onnx.ModelProto, val, reference, lossless: bool, check_budget: bool = True,
                  own_input=None):
        """(ok, reason, fidelity) of a candidate. A lossless candidate is judged against the outputs of
        the model its pass started from (``own_input``; the reference when that is the original), so
        that a lossless pass after a lossy one is not blamed for the lossy one's change; the fidelity
        returned, and the budget, are always against the original model's outputs."""
        changed = _interface_change(self.original, candidate)
        if changed:
            return False, f"the model's interface changed: {changed}", {}
        # a big candidate is written to a file once for the checker and every session below
        with model_io.written(candidate, model_io.VIA_FILE_BYTES) as src:
            try:
                model_io.check_model(src, full_check=self.full_check)
            except Exception as e:
                return False, f"invalid model: {_first_line(e)}", {}
            if not check_budget:  # a step of a chain verified end to end afterwards: runnable is enough here
                try:
                    self._outputs(src, [val.get(0)], optimize=not lossless)
                except Exception as e:
                    return False, f"onnxruntime cannot run it: {_first_line(e)}", {}
                return True, "", {}
            try:
                outs = self._outputs(src, val, optimize=False) if lossless else \
                    self._selection_outputs(candidate, val, src)
            except Exception as e:
                return False, f"onnxruntime cannot run it: {_first_line(e)}", {}
            if lossless:  # judged unoptimized, but the user runs it optimized
                try:
                    self._outputs(src, [val.get(0)], optimize=True)
                except Exception as e:
                    if self.original_optimizes():
                        return False, f"onnxruntime's graph optimizations fail on it: {_first_line(e)}", {}
        fid = fidelity(reference, outs, self.metric, val, self.val_labels)
        if lossless:
            own = fid if own_input is None else fidelity(own_input, outs, None, val, None)
            if not own.get("max_abs", 0.0) <= self.lossless_tol:
                return False, (f"outputs changed (relative max error {own.get('max_abs'):.2e} > "
                               f"{self.lossless_tol:g})"), fid
        if not lossless and check_budget and self.budget is not None and not self.budget.holds(fid, self.baseline):
            return False, f"budget {self.budget} broken ({self.budget.metric}={fid.get(self.budget.metric):.5g})", fid
        return True, "", fid

    # ------------------------------------------------------------------ run
    def run(self, model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, Report]:
        # the current model's file while it is current (``model_io.kept_written``): a big model is written
        # once for its validation, the next pass's timing and screening, and the verdict
        self._current_file = contextlib.ExitStack()
        try:
            return self._run(model)
        finally:
            self._current_file.close()

    def _keep_current_file(self, hold: contextlib.ExitStack) -> None:
        """``hold`` (``_file_of`` the new current model) replaces the last current model's."""
        self._current_file.close()
        self._current_file = hold

    @staticmethod
    def _file_of(model: onnx.ModelProto, path: str | None = None) -> contextlib.ExitStack:
        """A hold of ``model``'s file (``model_io.kept_written``: written at its first use, or ``path``)
        until the stack is closed."""
        hold = contextlib.ExitStack()
        hold.enter_context(model_io.kept_written(model, model_io.VIA_FILE_BYTES, path))
        return hold

    def _run(self, model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, Report]:
        report = Report(budget=str(self.budget) if self.budget else None,
                        target=self.target.name if self.target else None)
        clock = PhaseClock(report)
        self.input_path = None
        if not isinstance(model, onnx.ModelProto):
            report.input = str(model)
            self.input_path = str(model)
            original = model_io.load(model)  # our own copy already: no second one (large models)
        else:
            original = onnx.ModelProto()
            original.CopyFrom(model)
        self.original, self._original_released = original, False
        roles, sample_shapes = self._prepare(original, report)
        calib, val, test = roles.calibration, roles.selection, roles.test
        # a big input read from a file is checked and run from that file (no temporary copy written),
        # unless its input shapes were fixed in memory: the file is then no longer this model
        if self.input_path is not None and not self.input_shapes:
            self._keep_current_file(self._file_of(original, self.input_path))
        try:  # the strict check first: it includes the basic one, which then runs only when it fails
            model_io.check_model(original, full_check=True)
            self.full_check = True
        except Exception:
            self.full_check = False  # the input itself fails strict inference; hold outputs to the basic check
            try:
                model_io.check_model(original, full_check=False)
            except Exception as e:
                raise InputError(f"invalid ONNX model: {_first_line(e)}") from None
        clock.lap("input")
        try:  # the original's outputs on the selection and the test samples, from one session
            sets = [self.progress.track(val, "reference outputs")] + ([] if test is val else [test])
            reference, *rest = self._outputs_of_sets(original, sets, optimize=False)
        except OnnxShrinkError:
            raise
        except Exception as e:
            msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _first_line(e))
            raise InputError(f"the input model does not run in onnxruntime: {msg}") from None
        check_reference_finite(val, reference)
        self._resolve_budget(reference, report)
        self._original_optimizes, self._first_selection_sample = None, val.get(0)
        self.baseline = fidelity(reference, reference, self.metric, val, self.val_labels)
        # the verdict's reference and baseline: the original on the test samples (the same objects when
        # the roles share their samples)
        test_reference = rest[0] if rest else reference
        if test is not val:
            check_reference_finite(test, test_reference)
        test_baseline = self.baseline if test is val else fidelity(test_reference, test_reference, self.metric,
                                                                    test, self.test_labels)
        if constant_outputs(reference, *rest):
            report.warnings.append("the input model's outputs are the same on every selection and test sample: "
                                   "the fidelity figures compare constants and cannot see what a pass does to "
                                   "the input's path (an untrained or zero-initialised head? the wrong input?)")
        if self.test_labels is not None or self.metric is not None:
            report.data["original_scores"] = {k: test_baseline[k] for k in ("accuracy", "top5", "user")
                                              if k in test_baseline}
        clock.lap("reference_outputs")
        cost_shapes = self.input_shapes or sample_shapes
        report.before = model_stats(original, cost_shapes)
        current = original
        if self.target is not None:
            current = self._prepare_target(original, val, reference)
        ctx = Context(calib=calib, val=val, reference=reference, budget=self.budget, target=self.target,
                      seed=self.seed, rng=np.random.default_rng(self.seed), progress=self.progress,
                      template=current, verdict_samples=len(test))
        ctx.evaluator = lambda m: fidelity(reference, self._selection_outputs(m, val), self.metric, val,
                                           self.val_labels)
        ctx.screen = lambda m: self._screen(m, val, reference)
        allocated = bool(self.cost_targets) and any(p.name in knobs() for p in self.passes)
        self._input_timings = {}
        if not allocated:  # an allocation times many candidates, few of which are the result
            ctx.timing = lambda base, models, decides, final=True: self._timing(val.get(0), base, models, decides,
                                                                                final)
        ctx.baseline = self.baseline

        del original  # self.original from here on: a large one is released once a pass has replaced it
        clock.lap("input")
        pass_knobs = knobs()
        steps: list[_Step] = []  # what changed the model, in order (the speed contract undoes them)
        undoable = self._speed_enforced() and not self._too_large_to_undo()  # else no earlier model is kept (memory)

        def _before(m: onnx.ModelProto) -> onnx.ModelProto | None:
            """A step's model before it: None for the input (``_input_model`` gives it back)."""
            return None if m is self.original else m

        for p in self.passes:
            before, first_record = current, len(report.passes)
            if allocated and p.name in pass_knobs:
                if p is next(q for q in self.passes if q.name in pass_knobs):  # the block runs at the first one
                    runner = self.allocation_runner(ctx, val, reference, cost_shapes)
                    current, recs = allocate(runner, self.allocation_config(), current, ctx, val, reference,
                                             cost_shapes, report, self.original)
                    report.passes.extend(recs)
                    if current is not before and undoable:
                        steps.append(_Step(first_record, len(report.passes), _before(before), None))
                continue
            rec, current = self._run_one(p, current, ctx, val, reference, cost_shapes)
            report.passes.append(rec)
            if current is not before and undoable:
                steps.append(_Step(first_record, first_record + 1, _before(before), p))
            before = None  # the input, which _release_original may now let go
            ctx.cache.clear()
            # onnx-graphsurgeon graphs are reference cycles (nodes <-> tensors) holding the pass's
            # numpy weights; collect them now rather than whenever the cyclic GC next runs, where they
            # are big (measured on a 1 GiB model: one model's worth of memory lingered into the next pass)
            if model_io.tensor_bytes(current) >= COLLECT_FROM_BYTES:
                gc.collect()
            if current is not self.original and not allocated:
                self._release_original(ctx)

        def finish(m: onnx.ModelProto) -> onnx.ModelProto:
            return self._emit(m, ctx, report) if self.target is not None else m

        clock.lap("passes")
        emitted = finish(current)
        if self.target is not None:  # the target's emission (on openvino, its check and timing on the EP)
            clock.lap("emission")
        current = self._speed_contract(self.original, emitted, steps, finish, ctx, val, reference, cost_shapes,
                                       report)
        clock.lap("speed_contract")

        # the target may have made the image I/O channel-last
        io = ChannelsLastIO((report.target_report or {}).get("channels_last") if self.target is not None else None)
        # the verdict, on the test samples no decision saw (the selection figure beside it)
        kept = self._kept_selection_outputs(current, val)[1] if test is not val and io.identity else None
        final, *final_val = self._final_outputs(io, current,
                                                [test] + ([] if test is val or kept is not None else [val]), report)
        if kept is not None:
            final_val = [kept]
        self._selection_memo = None
        report.fidelity = fidelity(test_reference, final, self.metric, test, self.test_labels)
        if final_val:
            report.selection_fidelity = fidelity(reference, final_val[0], self.metric, val, self.val_labels)
        report.after = self._model_stats(current, io.shapes(cost_shapes))
        report.budget_met = self.budget.holds(report.fidelity, test_baseline) if self.budget else None
        clock.lap("verdict")
        if self.measure_speed:
            feeds = val.get(0)
            report.latency_ms = {"before": measure_latency(self._timed_input(), feeds),
                                 "after": measure_latency(current, io.feeds([feeds])[0])}
            clock.lap("latency")
        verdict = (report.target_report or {}).get("verdict") or {}
        report.warnings.extend(f"target {self.target.name}: {n}" for n in verdict.get("notes", []))
        missed = None
        if self.budget is not None and not report.budget_met:
            on = f" on the {len(test)} test samples" if test is not val else ""
            missed = (f"budget {self.budget} not met{on}: {self.budget.metric}="
                      f"{report.fidelity.get(self.budget.metric):.5g} after all passes")
            sel = report.selection_fidelity
            if test is not val and sel and self.budget.holds(sel, self.baseline):
                roles = ("selection and test come from --val: check its samples are like --calib's and not "
                         "ordered in pairs" if self.val_data is not None else
                         "roles go by file order (of every four files: calibration, selection, calibration, "
                         "test), so files ordered in cycles of 2, 4 or 8 give each role other inputs; shuffle "
                         "the file names, or hold samples out with --val")
                missed += (f" (the selection samples hold it, {self.budget.metric}={sel.get(self.budget.metric):.5g}: "
                           f"test samples reading lower may be unlike them; {roles})")
        if verdict and not verdict.get("ok", True):
            raise BudgetError(f"target {self.target.name}: {'; '.join(verdict['problems'])}"
                              + (f"; and the {missed}" if missed else "")
                              + " (nothing written; -o target.allow_partial=true accepts a partial placement)", report)
        if missed:
            raise BudgetError(missed, report)
        return current, report

    def _speed_contract(self, original: onnx.ModelProto, result: onnx.ModelProto, steps: list, finish,
                        ctx: Context, val, reference, cost_shapes, report: Report) -> onnx.ModelProto:
        """The speed contract of the cpu target (the default): ``result`` (the passes' model through
        ``finish``, the target's emission) is timed against the input (``runtime.compare_speed``,
        interleaved, on a selection sample).

        Policy ``never-slower`` (the default): while the result is clearly slower (the whole ~95 %
        interval of the speed ratio below 1/1.03), the last lossy step that changed the model
        (a pass, or the allocation block) is rolled back: the model goes back to what it was before
        that step and the lossless passes that ran after it run again on it (lossy passes after it
        were already rolled back, as the undoing goes from the end); when only lossless steps are
        left, they are undone from the end. Every rolled-back pass says why, with its timing. A
        result still clearly slower with every step undone (the target's own preparation) is refused:
        BudgetError, exit 4. A size-only ``--target-size`` waives the contract (the user asked for
        bytes) unless ``enforce_speed``; policy ``report`` times and warns; ``off`` does not time.
        Other targets are not this CPU: not timed here; but a target whose emission times the result
        on its EP (openvino, with a verifier: ``_contract_on_ep``) gets the same roll-back from that
        measurement (against the fp32 model the passes started from, on the EP), each undoing
        emitted and measured there again; and a step whose result misses the budget on the EP's
        outputs (the selection samples the emission runs there: onnxruntime's CPU kernels, on which
        the passes decided, and OpenVINO's int8 kernels do not round alike) is rolled back the same
        way. A result still slower or missing the budget there with every step undone is left to the
        target's verdict (exit 4). Returns the model to write."""
        on_ep = self._contract_on_ep()
        if not (self._contract_times() or on_ep) or result is original:
            return result
        waived = "" if self._speed_enforced() else "--speed report" if self.speed == "report" else \
            "a size-only target; --enforce-speed holds it"
        feeds = val.get(0)
        where = f"on the {self.target.provider}" if on_ep else "on this CPU"

        def timed(res: onnx.ModelProto) -> SpeedComparison | None:
            """``res`` against the input: the EP's figure from ``res``'s emission, or timed on this CPU."""
            if on_ep:
                return self._ep_speed(report)
            return compare_speed(self._timed_input(), res, feeds, decides=(("slower", 1.0),))
        key = None if on_ep else _digest(result)  # timed already beside the quantize guard's candidate
        cmp = self._input_timings.get(key) if key is not None else None
        if cmp is None:
            cmp = timed(result)
        if cmp is None:  # the EP did not time it (not taken whole): the target's verdict says why
            return result
        report.speed = {"vs_input": cmp.as_dict(), "contract": f"waived ({waived})" if waived else "enforced",
                        "verdict": "slower" if cmp.slower_than(1.0) else "not slower", "rolled_back": [],
                        **({"on": self.target.provider} if on_ep else {})}

        def miss(c: SpeedComparison) -> str:
            """Why the result must go back a step ("" when it need not): clearly slower, or on the EP
            the budget missed there."""
            if c.slower_than(1.0):
                return f"the speed contract: with it the result ran at {_speed_text(c)} {where}"
            budget = self._ep_budget_miss(report) if on_ep else ""
            return f"the target's check: with it {budget}" if budget else ""
        why = miss(cmp)
        if not why:
            return result
        if waived or (on_ep and self._too_large_to_undo()):
            if cmp.slower_than(1.0):
                report.warnings.append(f"the result is slower than the input {where} ({_speed_text(cmp)})")
            return result  # the target's verdict judges the rest
        if self._too_large_to_undo():  # no earlier model is kept: every pass is undone at once
            why = (f"rolled back by the speed contract: with the passes the result ran at {_speed_text(cmp)} "
                   f"(past 2 GB no earlier model is kept, so they are undone together)")
            names = _roll_back(report.passes, why)
            report.speed.update(rolled_back=[{"passes": names, **cmp.as_dict()}], vs_input=None, verdict="not slower")
            return self._input_model()
        while why and steps:
            lossy = [k for k, st in enumerate(steps) if st.pass_ is None or not st.pass_.lossless]
            k = lossy[-1] if lossy else len(steps) - 1
            undone, replay = steps[k], steps[k + 1:]  # only lossless steps follow the last lossy one
            del steps[k:]
            names = _roll_back(report.passes[undone.first_record:undone.end_record], f"rolled back by {why}")
            report.speed["rolled_back"].append({"passes": names, **cmp.as_dict(),
                                                **({} if cmp.slower_than(1.0) else {"reason": why})})
            at_input = undone.before is None  # back to the input (read again if it was released)
            unfinished = self._input_model() if at_input else undone.before
            for st in replay:  # the lossless passes after it, on the model without it
                rec, after = self._run_one(st.pass_, unfinished, ctx, val, reference, cost_shapes)
                rec.reason = f"run again after rolling back {', '.join(names)}" + (f"; {rec.reason}" if rec.reason
                                                                                    else "")
                report.passes[st.first_record] = rec
                if after is not unfinished:
                    steps.append(_Step(st.first_record, st.end_record, None if at_input else unfinished, st.pass_))
                    at_input = False
                unfinished = after
            result = finish(unfinished)
            if result is unfinished and at_input:  # the input itself: nothing left to time
                cmp = None
                break
            cmp = timed(result)
            if cmp is None:  # the EP did not time this one (not taken whole): the target's verdict says why
                report.speed.update(vs_input=None, verdict="not measured")
                return result
            why = miss(cmp)
        if cmp is None or not cmp.slower_than(1.0):
            report.speed.update(vs_input=cmp.as_dict() if cmp is not None else None, verdict="not slower")
            return result
        if on_ep:  # slower on the EP with every step undone: the target's verdict refuses it (exit 4)
            report.speed.update(vs_input=cmp.as_dict(), verdict="slower")
            return result
        raise BudgetError(f"the result is slower than the input on this CPU ({_speed_text(cmp)}) with every pass "
                          f"rolled back; nothing written (--speed report accepts it)", report)

    def _timing(self, feeds: dict, base, models: list, decides, final: bool = True) -> list:
        """``ctx.timing``: ``models`` timed against ``base`` on ``feeds`` (a selection sample: the one
        the speed contract times on). A single candidate that may be the pass's result (``final``) is
        timed with the input in the same rounds (where the contract will time the result against it)
        and that comparison is kept under the candidate's digest: when the pass's result is that
        model, the contract reads it instead of timing the pair again. Costs one more model per
        round; saves a whole comparison."""
        # past 2 GB a model has no digest (``_digest``) to keep the input's comparison under
        if len(models) != 1 or not final or not self._contract_times() or self._too_large_to_undo():
            return compare_candidates(base, models, feeds, decides)
        cmps = compare_speeds([base, models[0], self._timed_input()], feeds,
                              [(0, 1, tuple(decides)), (2, 1, (("slower", 1.0),))])
        key = _digest(models[0]) if isinstance(models[0], onnx.ModelProto) else None
        if key is not None:
            self._input_timings[key] = cmps[1]
        return cmps[:1]

    def _timed_input(self):
        """The input model for a session of it after the references (timing, latency, the optimizations
        check): its file when it came from one (onnxruntime reads it there: no serialized copy of the
        weights beside the others in memory at the timing, the run's peak; measured +20 MB on a ViT-S from
        bytes; and a large input's weights are no longer in memory, ``_release_original``), else the
        ModelProto."""
        return self.input_path if self.input_path is not None else self.original

    def _contract_times(self) -> bool:
        """Whether the speed contract times the result against the input: the cpu target (the
        default; other targets are not this CPU) and a policy other than ``off``."""
        return (self.target is None or self.target.name == "cpu") and self.speed != "off"

    def _contract_on_ep(self) -> bool:
        """Whether the speed contract reads the target's own EP: the openvino target with a verifier
        there (its emission times the result against the fp32 model on the EP) and a policy other
        than ``off``."""
        return (self.target is not None and self.target.name == "openvino" and self.speed != "off"
                and openvino_available())

    def _ep_budget_miss(self, report: Report) -> str:
        """How the last emission misses the budget on the OpenVINO EP's outputs ("" when it keeps it, or
        when the EP gave no figure for the budget's metric)."""
        ov = (report.target_report or {}).get("openvino") or {}
        fid, b = ov.get("fidelity") or {}, self.budget
        if b is None or b.metric not in fid or b.holds(fid, self.baseline):
            return ""
        return (f"the budget {b} is not met on the {self.target.provider} ({b.metric} {fid[b.metric]:.5g} on "
                f"{ov.get('samples', '?')} selection samples)")

    @staticmethod
    def _ep_speed(report: Report) -> SpeedComparison | None:
        """The last emission's speed on the OpenVINO EP against the fp32 model, when it was measured."""
        speed = ((report.target_report or {}).get("openvino") or {}).get("speed") or {}
        s = speed.get("vs_fp32") if speed.get("measured") else None
        return SpeedComparison.from_dict(s) if s else None

    def _speed_enforced(self) -> bool:
        """Whether the speed contract may roll passes back: the cpu target (the default) or a target timed
        on its EP (``_contract_on_ep``), policy never-slower, and not waived by a size-only cost target
        (unless ``enforce_speed``)."""
        if not (self._contract_times() or self._contract_on_ep()) or self.speed != "never-slower":
            return False
        size_only = bool(self.cost_targets) and all(k == "weight_bytes" for k, _ in self.cost_targets)
        return not size_only or self.enforce_speed

    def _too_large_to_undo(self) -> bool:
        """A model past 2 GB (``model.is_large``): no earlier model is kept for the speed contract to
        go back to (each is a copy of the weights), so it undoes every pass at once (``_input_model``).
        It is still timed: both sessions read their files (memory-mapped weights)."""
        return self.original is not None and model_io.is_large(self.original)

    def _input_model(self) -> onnx.ModelProto:
        """The input model whole: read again from its file when ``_release_original`` kept a skeleton
        (with the input shapes fixed again as ``_prepare`` fixed them)."""
        if not self._original_released:
            return self.original
        m = model_io.load(self.input_path)
        if self.input_shapes:
            fix_input_shapes(m, self.input_shapes)
        return m

    def _final_outputs(self, io, model: onnx.ModelProto, sample_sets, report: Report) -> list:
        """The result's outputs on each of ``sample_sets``, as the user will run it (onnxruntime's graph
        optimizations on; one session). When
        those optimizations fail on the input model itself (an onnxruntime limitation, e.g. constant
        folding a Range whose inputs are not scalars), the result is measured without them and the
        report warns; when they fail only on the result, nothing is written."""
        try:
            return io.run_sets(model, sample_sets, optimize=True)
        except OnnxShrinkError:
            raise
        except Exception as e:
            if not self.original_optimizes():
                report.warnings.append(f"onnxruntime's graph optimizations fail on the input model too "
                                       f"({_first_line(e)}): fidelity measured without them")
                return io.run_sets(model, sample_sets, optimize=False)
            raise BudgetError(f"the result does not run with onnxruntime's graph optimizations, although the "
                              f"input does: {_first_line(e)}", report) from None

    def _resolve_budget(self, reference, report: Report) -> None:
        """The budget this run checks: the given one, refused when its metric cannot judge an output;
        without one, the default (``metrics.DEFAULT_BUDGET``, or ``DEFAULT_SCALAR_BUDGET`` for outputs
        of one value per sample); with ``--budget none``, nothing (the report says "unchecked")."""
        synthetic = bool(report.data.get("synthetic"))
        if self.budget_source == "default" and (not synthetic or any(not p.lossless for p in self.passes)):
            self.budget = Budget.parse(DEFAULT_BUDGET)
            if blind_metric_outputs(self.budget, reference):
                self.budget = Budget.parse(DEFAULT_SCALAR_BUDGET)
        blind = blind_metric_outputs(self.budget, reference)
        if blind:
            names = [o.name for o in self.original.graph.output]
            raise UsageError(f"budget {self.budget} cannot judge output '{names[blind[0]]}': it holds one value "
                             f"per sample, whose {self.budget.metric} is always 1; use max_abs (e.g. "
                             f"\"{DEFAULT_SCALAR_BUDGET}\"), sqnr or mse")
        report.budget = str(self.budget) if self.budget is not None else None
        report.budget_source = self.budget_source
        report.fidelity_status = "unchecked" if self.budget is None and self.budget_source == "none" else "checked"

    def allocation_config(self) -> AllocationConfig:
        """The settings the allocation reads (see ``allocate.AllocationConfig``)."""
        return AllocationConfig(targets=list(self.cost_targets), passes=self.passes, budget=self.budget,
                                baseline=self.baseline, metric=self.metric, seed=self.seed, executor=self.executor,
                                workers=self.workers, cache=self.cache, sensitivity_samples=self.sensitivity_samples,
                                max_units=self.max_units, sensitivity=self.sensitivity, plot=self.plot,
                                progress=self.progress)

    def allocation_runner(self, ctx: Context, val, reference, cost_shapes) -> Runner:
        """The allocation's view of this run: a pass step validated as runnable, the validation
        labels."""
        def run_pass(model, name, options, step_ctx):
            return self._run_one(create_pass({name: options}), model, step_ctx, val, reference, cost_shapes,
                                 check_budget=False)
        return Runner(run_pass=run_pass, labels=self.val_labels)

    def _emit(self, model, ctx, report):
        model, info = emit_for_target(model, self.target, ctx)
        report.target_report = {"prepare": self.prepare_info, **info}
        quantized = [p.stats for p in report.passes if p.name == "quantize" and p.status == "applied" and p.stats]
        if quantized and quantized[-1].get("precision_regions"):  # mixed 8/16-bit activations (QNN)
            report.target_report["precision_regions"] = quantized[-1]["precision_regions"]
        return model

    def _prepare_target(self, model, val, reference):
        """The target's lossless preparation before the passes (opset, static-shape folding, exact
        rewrites), kept only when it validates like a lossless pass."""
        self.prepare_info = {}
        try:
            candidate, info = prepare_for_target(model, self.target, _ValOnly(val))
        except Exception as e:
            if self.debug:
                raise
            self.prepare_info = {"error": f"{type(e).__name__}: {_first_line(e)}"}
            return model
        ok, reason, _ = self._validate(candidate, val, reference, lossless=True)
        self.prepare_info = info if ok else {**info, "rolled_back": reason}
        return candidate if ok else model

    def _run_one(self, p: Pass, current: onnx.ModelProto, ctx: Context, val, reference, cost_shapes,
                 check_budget: bool = True):
        rec = PassRecord(name=p.name, status=NOT_APPLICABLE, options=_options_dict(p))
        t0 = time.perf_counter()
        opset = next((o.version for o in current.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < p.min_opset:
            rec.reason = f"needs opset >= {p.min_opset}, the model has {opset}"
            return rec, current
        attempt, backed = p, False
        own_input = None  # outputs of ``current``, when it is not the original (lossless checks)
        if p.lossless and check_budget and current is not self.original and current is not ctx.template:
            try:
                own_input = self._outputs(current, val, optimize=False)
            except Exception:
                own_input = None  # judged against the original then, as before
        while attempt is not None:
            try:
                graph = model_to_graph(current)
                ctx.source = (current, graph)
                result = attempt.run(graph, ctx)
            except OnnxShrinkError:
                raise
            except Exception as e:
                if self.debug:
                    raise
                rec.status, rec.reason = ROLLED_BACK, f"pass failed: {type(e).__name__}: {_first_line(e)}"
                break
            finally:
                ctx.source = graph = None
            if not result.modified:
                rec.status = NOT_APPLICABLE if not backed else ROLLED_BACK
                rec.reason = rec.reason or result.reason or "nothing to change"
                rec.stats = result.stats
                break
            candidate = result.model if result.model is not None else graph_to_model(result.graph, ctx.template)
            # the pass's graph holds a copy of the weights (numpy, in reference cycles): free it before
            # the validation's sessions (a 2 GiB model: one model less at the run's peak; a collection
            # costs 20-40 ms, so only where the weights are big)
            result.graph = result.model = None
            if model_io.tensor_bytes(candidate) >= COLLECT_FROM_BYTES:
                gc.collect()
            with self._file_of(candidate) as hold:  # written once for the checks, and kept if it becomes current
                ok, reason, fid = self._validate(candidate, val, reference, attempt.lossless, check_budget, own_input)
                if ok:
                    self._keep_current_file(hold.pop_all())
            rec.attempts.append({"options": _options_dict(attempt), "ok": ok, "reason": reason,
                                 "fidelity": fid})
            if ok:
                rec.status = BACKED_OFF if backed else APPLIED
                rec.reason = (f"backed off to {attempt.describe_strength() or _options_dict(attempt)}: "
                              f"{rec.attempts[0]['reason']}" if backed else result.note)
                rec.options = _options_dict(attempt)
                rec.fidelity = fid
                rec.stats = result.stats
                current = candidate
                break
            rec.status, rec.reason = ROLLED_BACK, reason
            rec.stats = result.stats
            if attempt.lossless or not check_budget or len(rec.attempts) > MAX_BACKOFF:
                break
            attempt, backed = attempt.weaker(), True
            del result, candidate
            gc.collect()  # the rejected candidate and its graph before the next attempt
        rec.wall_time_s = time.perf_counter() - t0
        try:
            st = self._model_stats(current, cost_shapes)
            rec.nodes, rec.params = st["nodes"], st["params"]
            rec.weight_bytes, rec.macs = st["weight_bytes"], st["macs"]
        except Exception:
            pass
        return rec, current


def _roll_back(records: list[PassRecord], why: str) -> list[str]:
    """Mark the applied (or backed-off) ``records`` rolled back for ``why``; their pass names."""
    names = []
    for rec in records:
        if rec.status in (APPLIED, BACKED_OFF):
            rec.status, rec.reason = ROLLED_BACK, why
            names.append(rec.name)
    return names


def _interface_change(original: onnx.ModelProto, candidate: onnx.ModelProto) -> str:
    """'' when the candidate has the original's input and output names (in order), else what
    changed: callers feed and fetch by name, so a pass must never rename or drop either."""
    def names(vs):
        return [v.name for v in vs]
    if names(candidate.graph.output) != names(original.graph.output):
        return f"outputs {names(original.graph.output)} became {names(candidate.graph.output)}"
    def data_inputs(m):  # inputs without an initializer: what callers must feed
        inits = {t.name for t in m.graph.initializer}
        return [v.name for v in m.graph.input if v.name not in inits]
    if data_inputs(candidate) != data_inputs(original):
        return f"inputs {data_inputs(original)} became {data_inputs(candidate)}"
    return ""


@dataclasses.dataclass
class _Step:
    """A step that changed the model: its records ``report.passes[first_record:end_record]``, the
    model before it (None: the input, ``PassManager._input_model``), and its pass (None: the
    allocation block, lossy)."""

    first_record: int
    end_record: int
    before: onnx.ModelProto | None
    pass_: Pass | None


def _digest(model: onnx.ModelProto) -> str | None:
    """What the model computes, digested (``cache.model_digest``, tensor by tensor: no serialized copy of
    the model); None past 2 GB, where hashing every weight costs more than the runs it saves."""
    return None if model_io.is_large(model) else model_digest(model)


def _speed_text(cmp) -> str:
    return f"{cmp.speedup:.2f}x the input's speed, 95 % interval {cmp.low:.2f}-{cmp.high:.2f}x"


class _ValOnly:
    """The part of a Context the target preparation reads (validation samples)."""

    def __init__(self, val):
        self.val = val


def _options_dict(p: Pass) -> dict:
    return dataclasses.asdict(p.options) if dataclasses.is_dataclass(p.options) else {}


def _first_line(e: BaseException) -> str:
    return ort_message(e)


def optimize(model, output: str | os.PathLike | None = None, passes: Sequence = ("cleanup",), **kwargs):
    """One call: run a PassManager on ``model`` (a path or ModelProto) and, with ``output``, save the
    result atomically. Returns (model, report). Raises BudgetError (nothing written) when the
    budget cannot be met."""
    input_path = model if not isinstance(model, onnx.ModelProto) else None
    if input_path is not None and not Path(input_path).exists():
        raise InputError(f"model file not found: {input_path}")
    if output is not None:  # fail before any work: unwritable output, output == input
        model_io.check_output_path(output, input_path)
    pm = PassManager(passes, **kwargs)
    if pm.plot:  # the plot is an output too: never the input model, never OUT
        model_io.check_output_path(pm.plot, input_path)
        if output is not None and Path(pm.plot).resolve() == Path(output).resolve():
            raise UsageError(f"--plot and OUT are the same file ({output})")
    if pm.target is not None and pm.target.context and not qnn_available():
        raise UsageError("--target qnn+context needs onnxruntime-qnn (pip install onnxruntime-qnn)")
    result, report = pm.run(model)
    if output is not None:
        sparse = any(r.name == "sparsify" and r.status in (APPLIED, BACKED_OFF) and r.stats.get("storage") == "sparse"
                     for r in report.passes)
        model_io.save(result, output, input_path=input_path, sparse_initializers=sparse)
        report.output = str(output)
        report.file_bytes = {"before": Path(input_path).stat().st_size if input_path else None,
                             "after": Path(output).stat().st_size}
        if pm.target is not None and pm.target.ort_format:  # --target NAME+ort
            style = "Runtime" if pm.target.name in ("nnapi", "coreml") else "Fixed"
            try:
                ort_path = save_ort_format(output, optimization_style=style)
            except BaseException:  # all or nothing: no OUT without the .ort the user asked for
                for f in [Path(output), *model_io.external_data_files(output)]:
                    f.unlink(missing_ok=True)
                raise
            report.target_report["ort_format"] = {"path": str(ort_path), "optimization_style": style}
        if pm.target is not None and pm.target.context:  # --target qnn+context: the compiled HTP context beside OUT
            try:
                info = report.target_report["context"] = save_qnn_context(output, htp_arch=pm.target.htp_arch)
                if not info["ok"]:
                    raise BudgetError(f"target qnn+context: {info['error']} (nothing written)", report)
            except BaseException:  # all or nothing: no OUT without the context the user asked for
                for f in [Path(output), *model_io.external_data_files(output)]:
                    f.unlink(missing_ok=True)
                raise
    return result, report
