"""svd: low-rank factorization of Gemm/MatMul/Conv weights (``svd_pass``): the whitened SVD
(``factorization``), the layers and their forms (``layers``), the rank choice (``ranks``) and the
knob of the cost-target allocation (``knob``)."""

from onnxshrink.passes.svd.factorization import factorize, whitened_svd
from onnxshrink.passes.svd.knob import SvdKnob, weight_view
from onnxshrink.passes.svd.svd_pass import SvdOptions, SvdPass, parse_ranks

__all__ = ["SvdOptions", "SvdPass", "SvdKnob", "factorize", "parse_ranks", "weight_view", "whitened_svd"]
