"""quantize: static QDQ quantization with calibration, and the helpers that serve it."""

from onnxshrink.passes.quantize.quantizer import QuantizePass

__all__ = ["QuantizePass"]
