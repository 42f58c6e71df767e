"""explain: where a shrunk model lost its fidelity against the model it came from, why, and the
recipe that fixes it (``onnxshrink explain``); and the self-contained HTML reports."""

from onnxshrink.explain.core import check_interface, explain, json_ready, samples_fidelity
from onnxshrink.explain.recipe import recipe_yaml

__all__ = ["explain", "check_interface", "json_ready", "samples_fidelity", "recipe_yaml"]
