"""Error types with the exit codes the CLI maps them to.

Exit codes (stable, scripted against by pipelines):
  0  success
  1  internal error (a bug in onnxshrink: please report it)
  2  usage error (bad option, unknown pass, missing argument)
  3  invalid input (unreadable/invalid model, bad calibration data, unsupported model)
  4  budget not met (no pipeline kept the fidelity budget; nothing written)
"""

from __future__ import annotations

__all__ = ["OnnxShrinkError", "UsageError", "InputError", "BudgetError", "EXIT_OK", "EXIT_INTERNAL",
           "EXIT_USAGE", "EXIT_INPUT", "EXIT_BUDGET"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_BUDGET = 4


class OnnxShrinkError(Exception):
    """Base of all errors a user can cause; carries the process exit code."""

    exit_code = EXIT_INTERNAL


class UsageError(OnnxShrinkError):
    """The call itself is wrong: unknown pass or option, missing data for a pass that needs it."""

    exit_code = EXIT_USAGE


class InputError(OnnxShrinkError):
    """The model or the data cannot be used: unreadable, invalid, already quantized, wrong shapes."""

    exit_code = EXIT_INPUT


class BudgetError(OnnxShrinkError):
    """The fidelity budget cannot be met; carries the report of how close it came."""

    exit_code = EXIT_BUDGET

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
