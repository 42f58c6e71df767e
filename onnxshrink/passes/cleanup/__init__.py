"""cleanup: lossless graph simplification."""

from onnxshrink.passes.cleanup.steps import CleanupPass

__all__ = ["CleanupPass"]
