"""graph/cost.py: recurrent MACs and the share of MACs onnxruntime runs in integer kernels."""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort

import onnxshrink
from models.build import crnn_small, resnet_small
from models.real import preprocess, text_lines
from onnxshrink.graph.cost import INTEGER_OPS, model_cost, model_stats


def test_lstm_macs_count_both_products_per_step_and_direction():
    m = crnn_small(hw=(32, 64), hidden=16, widths=(8, 8, 8, 8, 8))
    per = model_cost(m)["per_node"]
    # T = 64 / 4 steps, batch 1, 2 directions, 4 gates x 16, input 8 + hidden 16
    assert per["/rnn/LSTM"] == 16 * 1 * 2 * 64 * (8 + 16)


def _optimized_ops(model: onnx.ModelProto) -> collections.Counter:
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_integer_share_matches_what_onnxruntime_fuses():
    m = crnn_small(hw=(32, 64), hidden=16, widths=(8, 8, 8, 8, 8))
    xs = [{"x": x} for x in preprocess(text_lines(8, (32, 64)), "crnn")]
    out, rep = onnxshrink.optimize(m, None, passes=["cleanup", {"quantize": {"guard": False, "dynamic": "off"}}],
                                   data=xs, budget="none", speed="off")
    ops = _optimized_ops(out)
    n_int = sum(v for k, v in ops.items() if k in INTEGER_OPS)
    assert n_int == 6 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 0, ops  # 5 convs and the head
    st = model_stats(out)
    lstm = model_cost(m)["per_node"]["/rnn/LSTM"]
    assert st["integer_macs"] == st["macs"] - lstm  # everything but the float LSTM
    assert rep.after["integer_macs"] == st["integer_macs"] and rep.before["integer_macs"] == 0
    # a float model: none
    assert model_stats(resnet_small())["integer_macs"] == 0
