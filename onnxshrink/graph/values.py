"""Reading constant values and attributes off onnx-graphsurgeon nodes and tensors."""

from __future__ import annotations

__all__ = ["constant_value", "node_attr"]

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(t, numeric_attrs: bool = False) -> np.ndarray | None:
    """The value of an initializer, or of a tensor produced by a Constant node; None otherwise.

    A Constant node's ``value`` tensor is always read; with ``numeric_attrs`` also its
    ``value_float``, ``value_int``, ``value_floats`` and ``value_ints`` forms (as numpy's default
    dtypes of the Python values), which the channel analysis and the prune and sparsify passes
    read as constants (shape specs, slice bounds)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        v = attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if numeric_attrs:
            for k in ("value_float", "value_int", "value_floats", "value_ints"):
                if k in attrs:
                    return np.asarray(attrs[k])
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
