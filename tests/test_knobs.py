"""Knobs: each lossy pass declares its own (``Pass.knob``) and the allocation finds them through
the registry; the per-unit options a knob produces are typed (prune ``group_ratios`` {producer:
ratio}, svd ``ranks`` {layer: [form, rank]}) and the passes read the equivalent strings of the CLI
and recipes to exactly the same result."""

from __future__ import annotations

import numpy as np
import pytest

from models.build import mlp, resnet_small
from onnxshrink.data import ListSource, input_specs
from onnxshrink.errors import UsageError
from onnxshrink.graph.convert import model_to_graph
from onnxshrink.passes.base import Context
from onnxshrink.passes.prune import PruneOptions
from onnxshrink.passes.registry import create_pass, get_pass
from onnxshrink.passes.svd import SvdOptions
from onnxshrink.pipeline.sensitivity import knobs


def _samples(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{s.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape])
             .astype(s.dtype) for s in input_specs(model)} for _ in range(n)]


def _run(model, name, options, samples):
    ctx = Context(calib=ListSource(samples), val=ListSource(samples), template=model)
    res = create_pass({name: options}).run(model_to_graph(model), ctx)
    assert res.modified
    return ctx.to_model(res.graph).SerializeToString()


def test_knobs_are_the_passes_own_found_through_the_registry():
    found = knobs()
    assert list(found) == ["prune", "svd", "quantize"]
    for name, knob in found.items():
        assert knob is get_pass(name).knob and knob.pass_name == name
    assert [n for n, k in found.items() if k.closure] == ["quantize"]


def test_prune_group_ratios_typed_or_strings_give_the_same_model():
    model = resnet_small()
    knob = knobs()["prune"]
    units = [u for u, _ in knob.units(model, None)][:2]
    assert len(units) == 2
    typed = knob.options(model, {units[0]: 0.5, units[1]: 0.25})
    assert typed["group_ratios"] == {units[0]: 0.5, units[1]: 0.25}
    strings = [f"{units[0]}=0.5", f"{units[1]}=0.25"]
    assert PruneOptions(group_ratios=strings).group_ratios == typed["group_ratios"]
    samples = _samples(model, 4)
    common = {"samples": 4}
    out_typed = _run(model, "prune", {**common, **typed}, samples)
    assert out_typed == _run(model, "prune", {**common, **typed, "group_ratios": strings}, samples)
    # the CLI's -o prune.group_ratios=a=0.5,b=0.25 arrives as one string
    assert out_typed == _run(model, "prune", {**common, **typed, "group_ratios": ",".join(strings)}, samples)
    with pytest.raises(UsageError):
        PruneOptions(group_ratios=["no-ratio"])


def test_svd_ranks_typed_or_strings_give_the_same_model():
    model = mlp()
    knob = knobs()["svd"]
    units = [u for u, _ in knob.units(model, None)]
    assert units
    typed = knob.options(model, {u: f for u, f in zip(units, (0.5, 0.25))})
    ranks = typed["ranks"]
    assert set(ranks) == set(units[:2]) and all(isinstance(k, int) and form for form, k in ranks.values())
    strings = [f"{u}={form}:{k}" for u, (form, k) in ranks.items()]
    assert SvdOptions(ranks=strings).ranks == ranks
    samples = _samples(model, 8)
    out_typed = _run(model, "svd", typed, samples)
    assert out_typed == _run(model, "svd", {**typed, "ranks": strings}, samples)
    assert out_typed == _run(model, "svd", {**typed, "ranks": ",".join(strings)}, samples)
    with pytest.raises(UsageError):
        SvdOptions(ranks=["layer=linear:many"])
