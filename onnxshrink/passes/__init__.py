"""Passes: one module per pass; each registers itself with ``passes.registry.register``."""

from onnxshrink.passes.base import Context, Pass, PassResult
from onnxshrink.passes.registry import create_pass, get_pass, register, registry

__all__ = ["Context", "Pass", "PassResult", "create_pass", "get_pass", "register", "registry"]
