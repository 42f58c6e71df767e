"""quantize: static QDQ quantization with calibration, and the helpers that serve it."""

from onnxshrink.passes.quantize.plan import refuse_quantized
from onnxshrink.passes.quantize.quantize_pass import QuantizeOptions, QuantizePass

__all__ = ["QuantizeOptions", "QuantizePass", "refuse_quantized"]
