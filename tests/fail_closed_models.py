"""Small models for tests/test_fail_closed.py (issue 15, "fail closed everywhere"), built with
onnx.helper and deterministic numpy weights. Each reproduces one hole: a mis-fold the guard
cannot see, an If with outer-scope reads, a one-value-per-sample output."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)], producer_name="fail-closed-tests")
    m.ir_version = ir_version
    return m


def conv1d_add_last_axis(c: int = 8, seed: int = 0, per_channel: bool = False) -> onnx.ModelProto:
    """x [1, C, L=C] -> Conv1d (k=3, pad 1) -> Add of a constant of shape [C] -> Relu -> Conv1d (1x1)
    -> y [1, C, C].

    The [C] constant broadcasts on the LAST axis (L), not on the channels: it is not a per-channel
    bias, and folding it into the Conv's bias changes the outputs (C == L so the shapes agree).
    ``per_channel=True`` gives the constant the shape [C, 1] instead: a true per-channel bias (the
    same network without the trap, for tests that need a plain 1-D CNN)."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((c, c, 3)) / np.sqrt(3 * c)).astype(np.float32)
    b1 = (0.1 * r.standard_normal(c)).astype(np.float32)
    # a position-dependent offset, large against the conv output so a mis-fold shows
    add = np.linspace(-2.0, 2.0, c).astype(np.float32)
    if per_channel:
        add = add.reshape(c, 1)
    w2 = (r.standard_normal((c, c, 1)) / np.sqrt(c)).astype(np.float32)
    b2 = (0.1 * r.standard_normal(c)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1], kernel_shape=[3]),
             helper.make_node("Add", ["h", "pos"], ["h2"], name="add_pos"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("Conv", ["h3", "w2", "b2"], ["y"], name="conv2", kernel_shape=[1])]
    return _model(nodes, [_vi("x", [1, c, c])], [_vi("y", [1, c, c])],
                  [_init("w1", w1), _init("b1", b1), _init("pos", add), _init("w2", w2), _init("b2", b2)])


def if_outer_scope(d: int = 16, seed: int = 0, opset: int = 15) -> onnx.ModelProto:
    """A voice-activity-detection-like export (opset 15): inputs x [1, D] and a state h [1, D];
    an outer feature extractor f2 = Relu(x @ Win + bin), f = f2 @ Win2; an If whose condition is
    computed from the input (ReduceSum(x) > 0) and whose branches read outer-scope values that no
    node of the outer graph reads explicitly (f, f2, the state h, outer initializers):

        then: t = Relu(Relu(f) @ W1 + h @ U); prob = Sigmoid(t @ Wo), new_h = t
        else: t = Tanh(f2 @ W2);              prob = Sigmoid(t @ Wo), new_h = t

    The outer MatMul producing f has one consumer, the Relu inside the then-branch (what the
    quantizer's activation folding looks at when it follows a MatMul's sole consumer)."""
    r = np.random.default_rng(seed)

    def w(*shape):
        return (r.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    Win, Win2, W1, U, W2, Wo = w(d, d), w(d, d), w(d, d), w(d, d), w(d, d), w(d, 1)
    bin_ = (0.1 * r.standard_normal(d)).astype(np.float32)
    then_nodes = [helper.make_node("Relu", ["f"], ["t_f"], name="then_relu_in"),
                  helper.make_node("MatMul", ["t_f", "W1"], ["t_a"], name="then_mm_x"),
                  helper.make_node("MatMul", ["h", "U"], ["t_b"], name="then_mm_h"),
                  helper.make_node("Add", ["t_a", "t_b"], ["t_c"], name="then_add"),
                  helper.make_node("Relu", ["t_c"], ["t_h"], name="then_relu"),
                  helper.make_node("MatMul", ["t_h", "Wo"], ["t_l"], name="then_mm_o"),
                  helper.make_node("Sigmoid", ["t_l"], ["t_p"], name="then_sig")]
    then_g = helper.make_graph(then_nodes, "then", [], [_vi("t_p", [1, 1]), _vi("t_h", [1, d])])
    else_nodes = [helper.make_node("MatMul", ["f2", "W2"], ["e_a"], name="else_mm_x"),
                  helper.make_node("Tanh", ["e_a"], ["e_h"], name="else_tanh"),
                  helper.make_node("MatMul", ["e_h", "Wo"], ["e_l"], name="else_mm_o"),
                  helper.make_node("Sigmoid", ["e_l"], ["e_p"], name="else_sig")]
    else_g = helper.make_graph(else_nodes, "else", [], [_vi("e_p", [1, 1]), _vi("e_h", [1, d])])
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["f0"], name="feat_mm"),
             helper.make_node("Add", ["f0", "bin"], ["f1"], name="feat_add"),
             helper.make_node("Relu", ["f1"], ["f2"], name="feat_relu"),
             helper.make_node("MatMul", ["f2", "Win2"], ["f"], name="feat_mm2"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="rsum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["prob", "new_h"], name="branch", then_branch=then_g,
                              else_branch=else_g)]
    return _model(nodes, [_vi("x", [1, d]), _vi("h", [1, d])], [_vi("prob", [1, 1]), _vi("new_h", [1, d])],
                  [_init("Win", Win), _init("bin", bin_), _init("Win2", Win2), _init("W1", W1), _init("U", U),
                   _init("W2", W2), _init("Wo", Wo), _init("zero", np.array(0.0, np.float32))], opset=opset)


def scalar_head(d: int = 64, hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x [1, D] -> Gemm -> Relu -> Gemm -> Sigmoid -> y [1, 1]: one value per sample (a detector's
    score), so the per-sample cosine of the output is always 1 whatever the value."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((hidden, d)) * np.sqrt(2.0 / d)).astype(np.float32)
    b1 = (0.1 * r.standard_normal(hidden)).astype(np.float32)
    w2 = (r.standard_normal((1, hidden)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    b2 = np.zeros(1, np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["h2"], name="relu"),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["l"], name="fc2", transB=1),
             helper.make_node("Sigmoid", ["l"], ["y"], name="sigmoid")]
    return _model(nodes, [_vi("x", [1, d])], [_vi("y", [1, 1])],
                  [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)])


def loop_outer_scope(d: int = 16, seed: int = 0, opset: int = 15) -> onnx.ModelProto:
    """x [1, d] -> MatMul W0 -> Loop (3 trips; the body reads the outer initializer W and the outer
    tensor x0: h = Relu(h W) + x0) -> MatMul W -> y [1, d]: a recurrent export the way PyTorch writes a
    scripted loop, with outer-scope reads inside the body."""
    r = np.random.default_rng(seed)
    w = (r.standard_normal((d, d)) / 4).astype(np.float32)
    w0 = (r.standard_normal((d, d)) / 4).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hm"]), helper.make_node("Relu", ["hm"], ["hr"]),
         helper.make_node("Add", ["hr", "x0"], ["h_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h_in", [1, d])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", [1, d])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["x0"]),
             helper.make_node("Loop", ["trip", "cond", "x0"], ["h"], body=body),
             helper.make_node("MatMul", ["h", "W"], ["y"])]
    return _model(nodes, [_vi("x", [1, d])], [_vi("y", [1, d])],
                  [_init("W", w), _init("W0", w0), _init("trip", np.array(3, np.int64)), _init("cond", np.array(True))],
                  opset=opset)


def scan_outer_scope(d: int = 16, steps: int = 6, seed: int = 0, opset: int = 16) -> onnx.ModelProto:
    """x [1, steps, d] -> MatMul Win -> Scan over axis 1 (an Elman RNN cell: h = Tanh(x_t Wx + h Wh + b),
    the body reading the outer initializers Wx, Wh and b) -> the last state -> MatMul Wo -> Tanh -> y
    [1, d], and the states of every step as a second output [1, steps, d]: a recurrent layer as
    tf2onnx writes tf.scan / a Keras SimpleRNN."""
    r = np.random.default_rng(seed)
    win, wx, wh, wo = ((r.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for _ in range(4))
    b = (0.1 * r.standard_normal(d)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["a"]), helper.make_node("MatMul", ["h_in", "Wh"], ["c"]),
         helper.make_node("Add", ["a", "c"], ["s"]), helper.make_node("Add", ["s", "b"], ["sb"]),
         helper.make_node("Tanh", ["sb"], ["h_out"]), helper.make_node("Identity", ["h_out"], ["h_step"])],
        "cell", [_vi("h_in", [1, d]), _vi("x_t", [1, d])], [_vi("h_out", [1, d]), _vi("h_step", [1, d])])
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["xin"]),
             helper.make_node("Scan", ["h0", "xin"], ["h_last", "states"], body=body, num_scan_inputs=1,
                              scan_input_axes=[1], scan_output_axes=[1]),
             helper.make_node("MatMul", ["h_last", "Wo"], ["o"]), helper.make_node("Tanh", ["o"], ["y"])]
    return _model(nodes, [_vi("x", [1, steps, d])], [_vi("y", [1, d]), _vi("states", [1, steps, d])],
                  [_init("Win", win), _init("Wx", wx), _init("Wh", wh), _init("Wo", wo), _init("b", b),
                   _init("h0", np.zeros((1, d), np.float32))], opset=opset)
