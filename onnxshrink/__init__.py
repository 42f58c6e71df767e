"""onnxshrink: shrink trained ONNX models (prune, svd, quantize) under a measured fidelity budget.

    import onnxshrink
    model, report = onnxshrink.optimize("in.onnx", "out.onnx", passes=["cleanup", "quantize"],
                                        data="calib/", budget="cosine>=0.99")
"""

from onnxshrink.errors import BudgetError, InputError, OnnxShrinkError, UsageError
from onnxshrink.graph.cost import model_stats
from onnxshrink.metrics import Budget
from onnxshrink.model import load, save
from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import create_pass, get_pass, register, registry
from onnxshrink.pipeline.manager import PassManager, optimize
from onnxshrink.pipeline.report import Report

__version__ = "0.1.0"

__all__ = ["load", "save", "optimize", "PassManager", "Pass", "PassResult", "Context", "register", "registry",
           "get_pass", "create_pass", "Budget", "Report", "model_stats", "OnnxShrinkError", "UsageError",
           "InputError", "BudgetError", "__version__"]
