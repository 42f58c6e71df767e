"""onnxshrink: shrink trained ONNX models (prune, svd, quantize) under a measured fidelity budget.

    import onnxshrink
    model, report = onnxshrink.optimize("in.onnx", "out.onnx", passes=["cleanup", "quantize"],
                                        data="calib/", budget="cosine>=0.99")
"""

from .errors import BudgetError, InputError, OnnxShrinkError, UsageError
from .manager import PassManager, optimize
from .metrics import Budget
from .model import load, model_stats, save
from .passes.base import Context, Pass, PassResult, create_pass, get_pass, register, registry
from .report import Report

__version__ = "0.1.0"

__all__ = ["load", "save", "optimize", "PassManager", "Pass", "PassResult", "Context", "register", "registry",
           "get_pass", "create_pass", "Budget", "Report", "model_stats", "OnnxShrinkError", "UsageError",
           "InputError", "BudgetError", "__version__"]
