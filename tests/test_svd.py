"""svd and fold passes: exactness, whitening, rank rules, conv forms, folding, the low-rank models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import svd_models as sm
from helpers import assert_outputs_close, check, run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.data import ListSource
from onnxshrink.graph.cost import model_cost
from onnxshrink.graph.patches import ConvGeometry, patch_covariance
from onnxshrink.passes.base import Context
from onnxshrink.passes.fold import FoldPass
from onnxshrink.passes.svd import SvdPass, factorize, whitened_svd


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(np.asarray(v), k)
                                                        for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    check(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run_pass(p, model, samples=None, val=None):
    ctx = Context(calib=ListSource(samples) if samples else None,
                  val=ListSource(val) if val else (ListSource(samples) if samples else None), template=model)
    res = p.run(gs.import_onnx(model), ctx)
    out = ctx.to_model(res.graph)
    check(out)
    return res, out


def _exact_rank(n, m, r, rng):
    return (rng.standard_normal((n, r)) @ rng.standard_normal((r, m)) / np.sqrt(n)).astype(np.float32)


# ------------------------------------------------------------------------ math


def test_factorization_exact_at_full_rank():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 40))
    X = rng.standard_normal((200, 24)) @ rng.standard_normal((24, 24))
    for cov in (None, X.T @ X / len(X)):
        A, B = factorize(W, 24, cov)
        np.testing.assert_allclose(A @ B, W, atol=1e-9)


def test_whitened_prediction_is_the_output_error():
    """Dropping s_i costs exactly s_i^2 of |X W|^2 (on the data the covariance came from)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 32)) @ np.diag(np.logspace(0, -2, 32)) @ rng.standard_normal((32, 32))
    W = rng.standard_normal((32, 48))
    cov = X.T @ X / len(X)
    svd = whitened_svd(W, cov, ridge=1e-10)
    s = svd[2]
    for k in (4, 12, 20):
        A, B = factorize(W, k, svd=svd)
        measured = np.sum((X @ (W - A @ B)) ** 2) / np.sum((X @ W) ** 2)
        predicted = np.sum(s[k:] ** 2) / np.sum(s ** 2)
        assert measured == pytest.approx(predicted, rel=1e-6)


def test_patch_covariance_matches_im2col():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8))
    g = ConvGeometry(3, 2, 2, 1, 1, 2, (1, 0, 2, 1), "NOTSET")
    acc, cnt = patch_covariance(x, g, chunk=7)[0], g.n_positions(x.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    OH, OW = g.out_hw(9, 8)
    rows = []
    for n in range(2):
        for oy in range(OH):
            for ox in range(OW):
                rows.append(xp[n, :, oy * 2: oy * 2 + 3, ox: ox + 3: 2].reshape(-1))
    P = np.array(rows)
    assert cnt == len(P)
    np.testing.assert_allclose(acc, P.T @ P, rtol=1e-10)


# ------------------------------------------------------------------------ linear layers


def _matmul3d_model(W, b):
    n, m = W.shape
    return _model([helper.make_node("MatMul", ["x", "W"], ["t"], name="proj"),
                   helper.make_node("Add", ["t", "b"], ["y"], name="bias")],
                  [_vi("x", [2, 10, n])], [_vi("y", [2, 10, m])], {"W": W, "b": b})


def test_matmul_3d_exact_rank_is_reproduced():
    rng = np.random.default_rng(3)
    W = _exact_rank(64, 96, 8, rng)
    m = _matmul3d_model(W, rng.standard_normal(96).astype(np.float32))
    xs = [{"x": rng.standard_normal((2, 10, 64)).astype(np.float32)} for _ in range(4)]
    for whiten in (True, False):
        res, out = _run_pass(SvdPass(energy=0.999999, whiten=whiten, min_params=0), m, xs)
        assert res.modified
        layer = res.stats["layers"][0]
        assert layer["rank"] == 8 and layer["whitened"] == whiten
        assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul", "Add"]
        for s in xs:
            assert_outputs_close(run_ort(m, s), run_ort(out, s), 1e-4)


def test_gemm_transb_alpha_beta_exact():
    rng = np.random.default_rng(4)
    W = _exact_rank(48, 80, 6, rng)  # (in x out); stored transposed with transB=1
    C = rng.standard_normal((1, 80)).astype(np.float32)
    m = _model([helper.make_node("Gemm", ["x", "Wt", "C"], ["y"], name="fc", transB=1, alpha=0.7, beta=1.5)],
               [_vi("x", [5, 48])], [_vi("y", [5, 80])], {"Wt": W.T.copy(), "C": C})
    xs = [{"x": rng.standard_normal((5, 48)).astype(np.float32)} for _ in range(3)]
    res, out = _run_pass(SvdPass(energy=0.999999, min_params=0), m, xs)
    assert res.stats["layers"][0]["rank"] == 6
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul", "Gemm"]
    for s in xs:
        assert_outputs_close(run_ort(m, s), run_ort(out, s), 1e-4)


def test_whitening_beats_plain_at_equal_rank():
    """Inputs with a skewed covariance: at the same rank the whitened factors have less output
    error (measured on held-out samples) than plain SVD."""
    rng = np.random.default_rng(5)
    n, m = 64, 64
    mix = rng.standard_normal((n, n)) * np.logspace(0, -1.5, n)[None, :]
    W = rng.standard_normal((n, m)).astype(np.float32) / 8
    model = _matmul3d_model(W, np.zeros(m, np.float32))

    def draw(k):
        return [{"x": (rng.standard_normal((2, 10, n)) @ mix.T).astype(np.float32)} for _ in range(k)]

    cal, val = draw(16), draw(8)
    errs = {}
    for whiten in (True, False):
        res, out = _run_pass(SvdPass(rule="params", ratio=0.4, whiten=whiten, min_params=0), model, cal, val)
        L = res.stats["layers"][0]
        ref = np.concatenate([run_ort(model, s)[0].ravel() for s in val])
        got = np.concatenate([run_ort(out, s)[0].ravel() for s in val])
        errs[whiten] = (L["rank"], float(np.sum((ref - got) ** 2) / np.sum(ref ** 2)), L["measured_error"])
    assert errs[True][0] == errs[False][0]
    assert errs[True][1] < 0.5 * errs[False][1]
    # the reported measured error is the layer's output error on the validation samples
    assert errs[True][2] == pytest.approx(errs[True][1], rel=1e-3)


# ------------------------------------------------------------------------ rank rules


def test_rank_rules():
    rng = np.random.default_rng(6)
    full = rng.standard_normal((64, 64)).astype(np.float32)
    m = _matmul3d_model(full, np.zeros(64, np.float32))
    xs = [{"x": rng.standard_normal((2, 10, 64)).astype(np.float32)} for _ in range(4)]
    # a full-rank weight at 99% energy needs k >= nm/(n+m) = 32: not factorized, with a reason
    res, _ = _run_pass(SvdPass(energy=0.99, min_params=0), m, xs)
    assert not res.modified and res.stats["layers"][0]["rank"] is None
    assert "pays" in res.stats["layers"][0]["reason"]
    # rank_multiple rounds up
    lr = _matmul3d_model(_exact_rank(64, 64, 5, rng), np.zeros(64, np.float32))
    res, _ = _run_pass(SvdPass(energy=0.999999, rank_multiple=8, min_params=0), lr, xs)
    assert res.stats["layers"][0]["rank"] == 8
    # params rule keeps at most the ratio
    res, _ = _run_pass(SvdPass(rule="params", ratio=0.25, min_params=0), m, xs)
    L = res.stats["layers"][0]
    assert L["params_after"] <= 0.25 * L["params_before"] and L["rank"] == 8
    # error rule: predicted error within max_error
    res, _ = _run_pass(SvdPass(rule="error", max_error=0.3, min_params=0), m, xs)
    assert res.stats["layers"][0]["predicted_error"] <= 0.3
    # weaker keeps more
    p = SvdPass(energy=0.9)
    assert p.weaker().options.energy > 0.9
    assert SvdPass(rule="params", ratio=0.3).weaker().options.ratio > 0.3
    assert SvdPass(rule="error", max_error=0.01).weaker().options.max_error < 0.01


# ------------------------------------------------------------------------ convolutions


def _conv_model(w, b, strides, pads, dil, H=14, W=13):
    Cout, Cin = w.shape[:2]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=strides, pads=pads, dilations=dil,
                            kernel_shape=list(w.shape[2:]))
    m = _model([node], [_vi("x", [1, Cin, H, W])], [_vi("y", ["n", "c", "h", "w"])], {"w": w, "b": b})
    return m


@pytest.mark.parametrize("mode,form", [("channel", "channel_out"), ("channel", "channel_in"), ("spatial", "spatial")])
@pytest.mark.parametrize("geom", [([1, 1], [1, 1, 1, 1], [1, 1]), ([2, 1], [1, 0, 2, 1], [1, 1]),
                                  ([1, 2], [2, 1, 2, 1], [2, 1])])
def test_conv_forms_exact_rank(mode, form, geom):
    rng = np.random.default_rng(7)
    Cout, Cin, k, r = 32, 24, 3, 4
    if form == "channel_out":  # rank r as (Cout) x (Cin kh kw)
        w = _exact_rank(Cout, Cin * k * k, r, rng).reshape(Cout, Cin, k, k)
    elif form == "channel_in":  # rank r as (Cin) x (Cout kh kw)
        w = _exact_rank(Cin, Cout * k * k, r, rng).reshape(Cin, Cout, k, k).transpose(1, 0, 2, 3)
    else:  # rank r as (Cin kh) x (Cout kw)
        w = _exact_rank(Cin * k, Cout * k, r, rng).reshape(Cin, k, Cout, k).transpose(2, 0, 1, 3)
    w = np.ascontiguousarray(w, dtype=np.float32)
    m = _conv_model(w, rng.standard_normal(Cout).astype(np.float32), *geom)
    xs = [{"x": rng.standard_normal((1, Cin, 14, 13)).astype(np.float32)} for _ in range(3)]
    res, out = _run_pass(SvdPass(energy=0.999999, conv_mode=mode, min_params=0, whiten=False), m, xs)
    L = res.stats["layers"][0]
    assert res.modified and L["form"] == form and L["rank"] == r, L
    assert L["macs_after"] < L["macs_before"] and L["params_after"] < L["params_before"]
    assert model_cost(out)["macs"] < model_cost(m)["macs"]
    for s in xs:
        assert_outputs_close(run_ort(m, s), run_ort(out, s), 1e-4)


def test_conv_whitened_channel_prediction_matches_measured():
    rng = np.random.default_rng(8)
    Cout, Cin = 48, 16
    w = rng.standard_normal((Cout, Cin, 3, 3)).astype(np.float32) / 12
    m = _conv_model(w, np.zeros(Cout, np.float32), [1, 1], [1, 1, 1, 1], [1, 1], H=12, W=12)
    mix = rng.standard_normal((Cin, Cin)) * np.logspace(0, -1, Cin)[None, :]
    xs = [{"x": np.einsum("dc,nchw->ndhw", mix, rng.standard_normal((1, Cin, 12, 12))).astype(np.float32)}
          for _ in range(6)]
    res, out = _run_pass(SvdPass(rule="params", ratio=0.5, conv_mode="channel_out", min_params=0, max_positions=0,
                                 ridge=1e-8), m, xs, xs)
    L = res.stats["layers"][0]
    assert L["form"] == "channel_out" and L["exact_prediction"]
    assert L["measured_error"] == pytest.approx(L["predicted_error"], rel=1e-3)
    ref = np.concatenate([run_ort(m, s)[0].ravel() for s in xs])
    got = np.concatenate([run_ort(out, s)[0].ravel() for s in xs])
    assert np.sum((ref - got) ** 2) / np.sum(ref ** 2) == pytest.approx(L["measured_error"], rel=1e-2)


def test_grouped_conv_skipped_with_reason():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = _model([node], [_vi("x", [1, 64, 8, 8])], [_vi("y", ["n", "c", "h", "w"])], {"w": w})
    res, _ = _run_pass(SvdPass(min_params=0), m, None)
    assert not res.modified and "group" in res.stats["skipped"][0]["reason"]


# ------------------------------------------------------------------------ folding


def _fold_check(m, xs, expect_folds=1):
    p = FoldPass()
    res, out = _run_pass(p, m)
    assert len(res.stats["folded"]) == expect_folds, res.stats
    assert model_cost(out)["macs"] <= model_cost(m)["macs"]
    for s in xs:
        assert_outputs_close(run_ort(m, s), run_ort(out, s), 1e-4)
    return res, out


def test_fold_matmul_add_matmul():
    rng = np.random.default_rng(10)
    W1 = rng.standard_normal((32, 30)).astype(np.float32)
    W2 = rng.standard_normal((30, 24)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "W1"], ["a"], name="m1"),
                helper.make_node("Add", ["a", "b1"], ["ab"], name="add1"),
                helper.make_node("MatMul", ["ab", "W2"], ["y"], name="m2")],
               [_vi("x", [3, 7, 32])], [_vi("y", [3, 7, 24])],
               {"W1": W1, "W2": W2, "b1": rng.standard_normal((1, 1, 30)).astype(np.float32)})
    xs = [{"x": rng.standard_normal((3, 7, 32)).astype(np.float32)}]
    res, out = _fold_check(m, xs)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add"]


def test_fold_gemm_gemm_and_keeps_paying_pairs():
    rng = np.random.default_rng(11)
    W1 = rng.standard_normal((20, 40)).astype(np.float32)
    W2 = rng.standard_normal((16, 40)).astype(np.float32)  # transB
    m = _model([helper.make_node("Gemm", ["x", "W1", "C1"], ["a"], name="g1", alpha=0.5, beta=2.0),
                helper.make_node("Gemm", ["a", "W2", "C2"], ["y"], name="g2", transB=1, alpha=1.5, beta=0.3)],
               [_vi("x", [6, 20])], [_vi("y", [6, 16])],
               {"W1": W1, "W2": W2, "C1": rng.standard_normal(40).astype(np.float32),
                "C2": rng.standard_normal((6, 16)).astype(np.float32)})
    xs = [{"x": rng.standard_normal((6, 20)).astype(np.float32)}]
    _, out = _fold_check(m, xs)
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    # a narrow pair (k=4 < 20*16/36) pays: left alone, and a Relu between blocks folding
    W1n = rng.standard_normal((20, 4)).astype(np.float32)
    W2n = rng.standard_normal((4, 16)).astype(np.float32)
    m2 = _model([helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])],
                [_vi("x", [6, 20])], [_vi("y", [6, 16])], {"W1": W1n, "W2": W2n})
    _fold_check(m2, xs, expect_folds=0)
    m3 = _model([helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("MatMul", ["r", "W2"], ["y"])],
                [_vi("x", [6, 20])], [_vi("y", [6, 16])], {"W1": W1, "W2": W2.T.copy()})
    _fold_check(m3, xs, expect_folds=0)


@pytest.mark.parametrize("kind", ["1x1->conv", "conv->1x1", "kx1->1xk"])
def test_fold_conv_pairs(kind):
    rng = np.random.default_rng(12)
    Cin, k, Cout = 8, 24, 12
    x = [{"x": rng.standard_normal((1, Cin, 11, 10)).astype(np.float32)}]
    if kind == "1x1->conv":
        n1 = helper.make_node("Conv", ["x", "w1", "b1"], ["t"], kernel_shape=[1, 1])
        n2 = helper.make_node("Conv", ["t", "w2", "b2"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
        inits = {"w1": rng.standard_normal((k, Cin, 1, 1)), "w2": rng.standard_normal((Cout, k, 3, 3))}
    elif kind == "conv->1x1":
        n1 = helper.make_node("Conv", ["x", "w1", "b1"], ["t"], kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[1, 2])
        n2 = helper.make_node("Conv", ["t", "w2", "b2"], ["y"], kernel_shape=[1, 1])
        inits = {"w1": rng.standard_normal((k, Cin, 3, 3)), "w2": rng.standard_normal((Cout, k, 1, 1))}
    else:
        n1 = helper.make_node("Conv", ["x", "w1", "b1"], ["t"], kernel_shape=[3, 1], pads=[1, 0, 1, 0], strides=[2, 1])
        n2 = helper.make_node("Conv", ["t", "w2", "b2"], ["y"], kernel_shape=[1, 3], dilations=[1, 2])
        inits = {"w1": rng.standard_normal((k, Cin, 3, 1)), "w2": rng.standard_normal((Cout, k, 1, 3))}
    inits = {a: v.astype(np.float32) for a, v in inits.items()}
    inits["b1"] = rng.standard_normal(k).astype(np.float32)
    inits["b2"] = rng.standard_normal(Cout).astype(np.float32)
    m = _model([n1, n2], [_vi("x", [1, Cin, 11, 10])], [_vi("y", ["n", "c", "h", "w"])], inits)
    res, out = _fold_check(m, x)
    assert res.stats["folded"][0]["kind"] == kind
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_fold_refuses_bias_under_padding():
    rng = np.random.default_rng(13)
    n1 = helper.make_node("Conv", ["x", "w1", "b1"], ["t"], kernel_shape=[1, 1])
    n2 = helper.make_node("Conv", ["t", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = _model([n1, n2], [_vi("x", [1, 8, 9, 9])], [_vi("y", ["n", "c", "h", "w"])],
               {"w1": rng.standard_normal((24, 8, 1, 1)).astype(np.float32),
                "w2": rng.standard_normal((12, 24, 3, 3)).astype(np.float32),
                "b1": rng.standard_normal(24).astype(np.float32)})
    _fold_check(m, [{"x": rng.standard_normal((1, 8, 9, 9)).astype(np.float32)}], expect_folds=0)


def test_svd_then_fold_round_trip_is_exact():
    """A factor pair whose rank no longer pays is merged back by fold (the svd pass's first step)."""
    rng = np.random.default_rng(14)
    A = rng.standard_normal((40, 30)).astype(np.float32)
    B = rng.standard_normal((30, 40)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "A"], ["t"], name="fa"),
                helper.make_node("MatMul", ["t", "B"], ["y"], name="fb")],
               [_vi("x", [4, 40])], [_vi("y", [4, 40])], {"A": A, "B": B})
    xs = [{"x": rng.standard_normal((4, 40)).astype(np.float32)}]
    res, out = _run_pass(SvdPass(energy=0.999999, min_params=0), m, xs)
    assert len(res.stats["folded"]) == 1
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    for s in xs:
        assert_outputs_close(run_ort(m, s), run_ort(out, s), 1e-4)


# ------------------------------------------------------------------------ low-rank models, end to end


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_low_rank_models_done_when(name):
    from onnxshrink.pipeline.manager import PassManager

    model = getattr(sm, name)()
    pm = PassManager(["svd"], data=sm.samples(model, 24), budget="cosine>=0.999")
    out, rep = pm.run(model)
    check(out)
    rec = rep.passes[0]
    assert rec.status in ("applied", "backed off")
    assert rep.fidelity["cosine"] >= 0.999
    assert rep.after["params"] <= 0.6 * rep.before["params"]
    ranks = {L["layer"]: L["rank"] for L in rec.stats["layers"]}
    # layers fed by full-rank inputs recover the true rank exactly; deeper ones (inputs of
    # rank ~16 after a rank-16 layer) may need fewer in output-error terms
    first = ["fc1"] if name == "mlp" else ["proj_q", "proj_k", "proj_v", "ffn1"]
    for n in first:
        assert ranks[n] == sm.TRUE_RANKS[name][n], ranks
    assert all(r is not None and r <= 16 for r in ranks.values()), ranks
    # plain SVD (no whitening) finds the true rank everywhere
    pm = PassManager([{"svd": {"whiten": False}}], data=sm.samples(model, 24), budget="cosine>=0.999")
    out, rep = pm.run(model)
    assert {L["layer"]: L["rank"] for L in rep.passes[0].stats["layers"]} == sm.TRUE_RANKS[name]


def test_cli_passes_svd_on_encoder(tmp_path):
    """``onnxshrink optimize IN OUT --passes svd --calib DIR --budget cosine>=0.999`` on the encoder."""
    import json

    from click.testing import CliRunner

    from models.real import write_samples
    from onnxshrink.cli import cli

    model = sm.encoder()
    onnx.save(model, tmp_path / "enc.onnx")
    write_samples(sm.samples(model, 16), tmp_path / "calib")
    r = CliRunner().invoke(cli, ["optimize", str(tmp_path / "enc.onnx"), str(tmp_path / "out.onnx"), "--passes", "svd",
                                 "--calib", str(tmp_path / "calib"), "--budget", "cosine>=0.999", "-q",
                                 "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    out = onnx.load(tmp_path / "out.onnx")
    check(out)
    before, after = model_cost(model)["params"], model_cost(out)["params"]
    assert after <= 0.6 * before
    assert rep["fidelity"]["cosine"] >= 0.999


def test_latency_option_measures_each_layer():
    rng = np.random.default_rng(15)
    m = _matmul3d_model(_exact_rank(256, 256, 8, rng), np.zeros(256, np.float32))
    xs = [{"x": rng.standard_normal((2, 10, 256)).astype(np.float32)} for _ in range(2)]
    res, out = _run_pass(SvdPass(energy=0.999999, latency=True, min_params=0), m, xs)
    L = res.stats["layers"][0]
    before, after = L["latency_ms"]
    assert before > 0 and after > 0
    # applied exactly when measured faster
    assert (L["rank"] is not None) == (after < before) == res.modified


# ------------------------------------------------------------------------ back-off


def _sharp_tail_case(seed=3, d=64, rank=4, tail=5e-5):
    """A MatMul whose weight is rank ``rank`` plus a tail holding ``tail`` of its energy, seen on
    white inputs (512 rows for 64 inputs): every energy up to 0.9999 keeps rank 4 (the tail's share
    is under the energy left out), and rank 4 misses ``cosine >= 0.99999``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.full(d, np.sqrt(tail * rank / (d - rank)))
    s[:rank] = 1.0
    W = ((U * s) @ V.T).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_vi("x", [64, d])], [_vi("y", [64, d])],
               {"W": W})
    samples = [{"x": rng.standard_normal((64, d)).astype(np.float32)} for _ in range(24)]
    return m, samples


def test_weaker_skips_the_strengths_that_pick_the_same_ranks():
    """After a run, ``weaker()`` is the first weaker energy whose rank differs: the ones between
    build the same model (the manager's back-off would refuse each again) and are listed."""
    m, samples = _sharp_tail_case()
    p = SvdPass(energy=0.99, min_params=0)
    res, _ = _run_pass(p, m, samples[:8])
    rank = res.stats["layers"][0]["rank"]
    assert rank == 4, res.stats["layers"]
    skipped = res.stats["same_ranks"]
    assert skipped[0] == "energy=0.996667" and len(skipped) >= 2, skipped
    nxt = p.weaker()
    assert nxt.options.energy > 1 - (1 - 0.99) / 3 ** (len(skipped) + 0.5)
    res2, _ = _run_pass(nxt, m, samples[:8])
    assert res2.stats["layers"][0]["rank"] != rank
    # before a run, weaker() is the plain next strength
    assert SvdPass(energy=0.99).weaker().options.energy == pytest.approx(1 - 0.01 / 3)


def test_the_backoff_does_not_retry_a_strength_that_builds_the_same_model():
    """The manager's back-off tries a strength only when its ranks differ from the refused one's."""
    from onnxshrink.pipeline.manager import PassManager

    m, samples = _sharp_tail_case()
    _, rep = PassManager([{"svd": {"min_params": 0}}], data=samples, budget="cosine>=0.99999").run(m)
    rec = rep.passes[0]
    energies = [a["options"]["energy"] for a in rec.attempts]
    assert energies[0] == 0.99 and not rec.attempts[0]["ok"], rec.attempts
    assert energies[1] > 0.9996, energies  # 0.99667, 0.99889 and 0.99963 keep rank 4: not tried
    cosines = [a["fidelity"]["cosine"] for a in rec.attempts if a.get("fidelity")]
    assert len(set(np.round(cosines, 7))) == len(cosines), rec.attempts  # every attempt a new model


def test_a_rank_set_by_too_few_calibration_rows_is_not_taken():
    """Whitened by N calibration rows for d > N inputs, the energy rule's rank k >= N is the rows'
    rank (the factorization is exact on them whatever the weight does elsewhere): the layer is left
    with the reason, and the pass changes nothing. A rank under N is the weight's and is kept."""
    from onnxshrink.pipeline.manager import PassManager

    rng = np.random.default_rng(5)
    d = 64
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_vi("x", [1, d])], [_vi("y", [1, d])],
               {"W": W})
    few = [{"x": rng.standard_normal((1, d)).astype(np.float32)} for _ in range(6)]  # 6 rows, 64 inputs
    res, _ = _run_pass(SvdPass(min_params=0), m, few)
    L = res.stats["layers"][0]
    assert L["rank"] is None and L["reason"].startswith("whitened by calibration data spanning 6 of its 64"), L
    assert not res.modified and "whitened by calibration data of no higher rank" in res.reason
    # the manager makes no attempt to validate (nothing changed), so nothing is refused or backed off
    _, rep = PassManager([{"svd": {"min_params": 0}}], data=few + few, budget="cosine>=0.99").run(m)
    assert rep.passes[0].status == "not applicable" and not rep.passes[0].attempts
    # a weight of true rank 3 seen on 6 rows: rank 3 < 6 is the weight's own, factorized
    low = _exact_rank(d, d, 3, rng)
    m3 = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_vi("x", [1, d])], [_vi("y", [1, d])],
                {"W": low})
    res3, _ = _run_pass(SvdPass(min_params=0), m3, few)
    assert res3.stats["layers"][0]["rank"] == 3 and res3.modified


def test_the_gram_spectrum_of_a_tall_whitened_weight_gives_the_choleskys_factors(monkeypatch):
    """Past ``GRAM_MIN_ROWS`` rows (a 3x3 convolution's patches) the whitened spectrum comes from the
    eigen-decomposition of ``W^T C W`` instead of the SVD of ``L^T W`` (no Cholesky, no inverse): the
    same singular values and the same rank-k product ``A B`` (the factors' signs may differ)."""
    from onnxshrink.passes.svd import factorization as fz

    rng = np.random.default_rng(3)
    n, m = 1152, 96
    X = rng.standard_normal((1400, n)) * (0.1 + rng.random(n))
    C = X.T @ X / len(X)
    W = rng.standard_normal((n, m)).astype(np.float32)
    gram = fz.whitened_svd(W, C)
    monkeypatch.setattr(fz, "GRAM_MIN_ROWS", 10 ** 9)
    chol = fz.whitened_svd(W, C)
    assert (gram[0], chol[0]) == ("gram", "cholesky")
    np.testing.assert_allclose(gram[2], chol[2], rtol=1e-9, atol=1e-9 * chol[2][0])
    for k in (4, 40, 96):
        Ag, Bg = fz.factorize(W, k, svd=gram)
        Ac, Bc = fz.factorize(W, k, svd=chol)
        np.testing.assert_allclose(Ag @ Bg, Ac @ Bc, rtol=0, atol=1e-9 * np.abs(Ac @ Bc).max())


def test_the_rank_of_a_covariance_of_few_rows_is_numpys_without_its_eigenvalues():
    """``covariance_rank``: a d x d covariance summed over fewer rows than d has the rank numpy gives
    it, repeated rows adding none, from ``C G`` with rows + 10 Gaussian columns."""
    from onnxshrink.passes.svd.svd_pass import covariance_rank

    rng = np.random.default_rng(5)
    for d, rows, repeated in ((600, 40, 0), (600, 40, 15), (900, 8, 3), (300, 200, 50)):
        X = rng.standard_normal((rows - repeated, d)) * (0.01 + rng.random(d))
        X = np.concatenate([X, X[:repeated]])
        C = X.T @ X
        assert covariance_rank(C, rows) == np.linalg.matrix_rank(C, hermitian=True) == rows - repeated


def test_a_covariance_is_computed_once_and_does_not_depend_on_the_layers_asked_with_it(monkeypatch):
    """The manager's back-off asks for the validation covariances of a different set of layers at
    each strength: each covariance is captured once per cache and kept once (a cache of whole sets held
    a copy per set: 4.6 GB on ResNet-18), and the conv patches sampled for it (more positions than
    ``max_positions``) do not depend on which other layers were asked with it."""
    from onnxshrink.passes.svd.layers import covariance_key, covariances, find_layers
    from onnxshrink.passes.svd.svd_pass import SvdOptions
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    model = _model(nodes, [_vi("x", [1, 4, 12, 12])], [_vi("y", [1, 8, 12, 12])], {"w1": w1, "w2": w2})
    samples = [{"x": rng.standard_normal((1, 4, 12, 12)).astype(np.float32)} for _ in range(3)]
    graph = gs.import_onnx(model)
    layers, _ = find_layers(graph, SvdOptions(min_params=1))
    assert [L.node.name for L in layers] == ["c1", "c2"]
    key2 = covariance_key(layers[1])

    def ctx_counting():
        ctx = Context(calib=ListSource(samples), template=model)
        captures = []
        real = ctx.capture
        monkeypatch.setattr(ctx, "capture", lambda *a, **k: captures.append(a[1]) or real(*a, **k))
        return ctx, captures

    ctx, captures = ctx_counting()
    both, _, rows = covariances(layers, ctx, graph, ctx.calib, 3, 50, "validation", keep=np.float32)
    again, _, _ = covariances(layers[1:], ctx, graph, ctx.calib, 3, 50, "validation", keep=np.float32)
    assert captures == [["h", "x"]] and again[key2] is both[key2] and rows[key2] == 150
    assert both[key2].dtype == np.float32
    alone_ctx, _ = ctx_counting()
    alone, _, _ = covariances(layers[1:], alone_ctx, graph, alone_ctx.calib, 3, 50, "validation", keep=np.float32)
    np.testing.assert_array_equal(alone[key2], both[key2])
