"""Reading constant values and attributes off onnx-graphsurgeon nodes and tensors."""

from __future__ import annotations

__all__ = ["constant_value", "node_attr"]

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(t) -> np.ndarray | None:
    """The value of an initializer, or of a tensor produced by a Constant node; None otherwise."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def node_attr(node: gs.Node, name: str, default):
    """An attribute's value, ``default`` when absent or None."""
    v = node.attrs.get(name, default)
    return default if v is None else v


__all__ += ["is_constant"]


def is_constant(t) -> bool:
    """Whether ``constant_value(t)`` reads a value (an initializer, or the tensor a Constant node
    produces), without loading it."""
    if isinstance(t, gs.Constant):
        return True
    return (isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant"
            and isinstance(t.inputs[0].attrs.get("value"), gs.Constant))
