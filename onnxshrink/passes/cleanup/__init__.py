"""cleanup: lossless graph simplification. The pass orchestrates (``cleanup_pass``); the steps
live in one module per family: ``constants`` (Constant nodes, ConstantOfShape, constant chains),
``folding`` (evaluating constant subgraphs), ``shapes`` (shape inference and shape folding),
``affine`` (BatchNorm and scale/bias folds into Conv/ConvTranspose/Gemm), ``dedup`` (duplicate
nodes and initializers), ``dead`` (Identity/Dropout, dead code), ``interface`` (graph inputs and
outputs kept as declared) and ``rewrite`` (subgraph walking, fresh names, rewiring)."""

__all__ = ["CleanupOptions", "CleanupPass", "constants_to_initializers", "fold_into_preceding_linear"]

from onnxshrink.passes.cleanup.affine import fold_into_preceding_linear
from onnxshrink.passes.cleanup.cleanup_pass import CleanupOptions, CleanupPass
from onnxshrink.passes.cleanup.constants import constants_to_initializers
