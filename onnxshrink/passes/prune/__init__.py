"""prune: structured channel pruning (``prune_pass``), with the exact removal of channel units
(``remove``), their selection by importance (``select``) and the least-squares refit of their
consumers (``refit``, ``stage_stream``)."""

from onnxshrink.passes.prune.prune_pass import PruneOptions, PrunePass
from onnxshrink.passes.prune.remove import feasible, lossless_units, remove_units
from onnxshrink.passes.prune.select import sink_statistics, unit_scores

__all__ = ["PrunePass", "PruneOptions", "lossless_units", "remove_units", "feasible", "sink_statistics", "unit_scores"]
