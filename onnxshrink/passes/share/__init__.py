"""share: weight sharing (k-means codebooks with bit-packed indices): the pass (``share_pass``), the
weighted 1-D k-means (``codebook``) and the index storage (``packing``)."""

from onnxshrink.passes.share.codebook import kmeans_1d
from onnxshrink.passes.share.packing import bit_planes, pack_indices, unpack_indices
from onnxshrink.passes.share.share_pass import ShareOptions, SharePass, input_energy

__all__ = ["ShareOptions", "SharePass", "kmeans_1d", "pack_indices", "unpack_indices", "bit_planes", "input_energy"]
