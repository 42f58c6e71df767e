"""prune: structured channel pruning."""

from onnxshrink.passes.prune.pruner import PrunePass

__all__ = ["PrunePass"]
