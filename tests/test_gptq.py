"""GPTQ against an independent float64 reference, and against RTN on the layer-output error."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from qpack.errors import QpackInputError
from qpack.quant import make_quantizer, qmax
from qpack.quant.gptq import GPTQ, Column, RateDistortionRounding, quantize_widths, sdclip_scales
from qpack.quant.gptq_lite import clip_ratios, search_clip_scales


def reference_gptq(W, H, scales, bits, group_size=None, percdamp=0.01, actorder=True, rdo=None):
    """Plain column-by-column GPTQ in float64 (the OBS form: explicit inverse, downdated after each column).

    `scales` are the fp16 scales (rows, n_groups) in the original column order. `rdo` = (code_bits, lam):
    of the two levels around w / s keep the one with the smaller OBS loss 0.5 e^2 / [H^-1]_ii + lam * bits.
    Returns integer codes."""
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    S = np.asarray(scales).astype(np.float64)
    S = np.repeat(S, group_size, axis=1)[:, :cols] if group_size else np.repeat(S, cols, axis=1)
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(cols)
    W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.inv(H)
    m = qmax(bits)
    Q = np.zeros_like(W)
    for i in range(cols):
        q = np.clip(np.round(W[:, i] / S[:, i]), -m, m)
        if rdo is not None:
            code_bits, lam = rdo
            lo = np.clip(np.floor(W[:, i] / S[:, i]), -m, m - 1)
            cost = [0.5 * (W[:, i] - lv * S[:, i]) ** 2 / Hinv[i, i] + lam * code_bits[(lv + m).astype(int)]
                    for lv in (lo, lo + 1)]
            q = np.where(cost[1] < cost[0], lo + 1, lo)
        Q[:, i] = q
        err = (W[:, i] - q * S[:, i]) / Hinv[i, i]
        W[:, i:] -= np.outer(err, Hinv[i, i:])
        # Remove column i from the problem: the inverse of the remaining Hessian block.
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q[:, np.argsort(perm)].astype(np.int8)


def absmax_scales(W, bits, group_size=None, dead=None):
    """fp16 absmax / qmax per row or group, computed with numpy (after zeroing dead columns)."""
    W = np.array(W, dtype=np.float32)
    if dead is not None:
        W[:, dead] = 0
    rows, cols = W.shape
    gs = group_size or cols
    amax = np.stack([np.abs(W[:, g : g + gs]).max(axis=1) for g in range(0, cols, gs)], axis=1)
    s = (amax / np.float32(qmax(bits))).astype(np.float16)
    return np.maximum(s, np.finfo(np.float16).tiny)


def make_layer(rows=64, cols=96, n=512, seed=0):
    """A random layer and inputs with correlated columns and uneven column scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    Z = torch.randn(n, cols, generator=g, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X = (Z @ mix) * torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    return W, X, X.T @ X / n


def recon_error(W, codes, scales, group_size, X):
    codes, scales = np.asarray(codes), np.asarray(scales)
    Wq = torch.from_numpy(codes.astype(np.float64)) * torch.from_numpy(
        np.repeat(scales.astype(np.float64), group_size or W.shape[1], axis=1)[:, : W.shape[1]])
    return float(torch.linalg.norm((W - Wq) @ X.T))


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("group_size", [None, 32, 40])
@pytest.mark.parametrize("actorder", [True, False])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_gptq_float64_matches_reference(bits, group_size, actorder, blocksize):
    W, X, H = make_layer()
    qz = make_quantizer("gptq", bits, group_size, dtype="float64", actorder=actorder, blocksize=blocksize)
    out = qz.quantize(W.float(), H)
    scales = absmax_scales(W.float().numpy(), bits, group_size)
    np.testing.assert_array_equal(out.scales, scales)
    ref = reference_gptq(W.numpy(), H.numpy(), scales, bits, group_size, actorder=actorder)
    np.testing.assert_array_equal(out.q, ref)
    e_ours = recon_error(W, out.q, out.scales, group_size, X)
    e_ref = recon_error(W, ref, scales, group_size, X)
    assert abs(e_ours - e_ref) <= 1e-5 * e_ref


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_float32_close_to_reference(bits):
    W, X, H = make_layer(seed=1)
    out = make_quantizer("gptq", bits).quantize(W.float(), H.float())
    ref = reference_gptq(W.numpy(), H.numpy(), out.scales.numpy(), bits)
    # float32 could flip a code sitting on a rounding boundary (none do here); the error must agree closely.
    assert (out.q.numpy() == ref).mean() >= 0.999
    e_ours = recon_error(W, out.q, out.scales, None, X)
    e_ref = recon_error(W, ref, out.scales, None, X)
    assert abs(e_ours - e_ref) <= 1e-4 * e_ref


def test_gptq_dead_columns():
    W, X, H = make_layer(seed=2)
    dead = np.zeros(W.shape[1], dtype=bool)
    dead[[0, 7, 50, 95]] = True
    X[:, torch.from_numpy(dead)] = 0
    H = X.T @ X / X.shape[0]
    out = make_quantizer("gptq", 4, 32, dtype="float64").quantize(W.float(), H)
    assert out.params["dead_columns"] == 4
    assert (out.q[:, dead] == 0).all()
    scales = absmax_scales(W.float().numpy(), 4, 32, dead=dead)
    np.testing.assert_array_equal(out.scales, scales)
    np.testing.assert_array_equal(out.q, reference_gptq(W.numpy(), H.numpy(), scales, 4, 32))


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_on_layer_output(bits, group_size):
    W, X, H = make_layer(rows=96, cols=128, n=1024, seed=3)
    Wf, Hf = W.float(), H.float()
    err = {}
    for name in ("rtn", "gptq"):
        deq = make_quantizer(name, bits, group_size).quantize(Wf, Hf).dequantize().double()
        err[name] = float(torch.linalg.norm((W - deq) @ X.T))
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_gptq_clip_search_uses_gptq_lite_scales():
    W, X, H = make_layer(seed=4)
    out = make_quantizer("gptq", 4, clip_search=True, grid=11).quantize(W.float(), H.float())
    want = search_clip_scales(W.float(), 4, None, clip_ratios(11))
    np.testing.assert_array_equal(out.scales, want)
    assert out.params["clip_search"] is True
    ref = reference_gptq(W.numpy(), H.numpy(), want, 4)
    assert (out.q.numpy() == ref).mean() >= 0.995


def test_gptq_cholesky_failure_raises_damping():
    W, X, H = make_layer(seed=5)
    # Same diagonal, strongly negative off-diagonal: indefinite, and 1% damping cannot fix that.
    n = H.shape[0]
    H = H - 0.5 * torch.diag(H).mean() * (torch.ones(n, n, dtype=H.dtype) - torch.eye(n, dtype=H.dtype))
    assert torch.diag(H).min() > 0 and torch.linalg.eigvalsh(H).min() < 0
    out = make_quantizer("gptq", 6).quantize(W.float(), H.float())
    assert out.params["damp_retries"] >= 1
    assert out.params["percdamp"] == pytest.approx(0.01 * 10 ** out.params["damp_retries"])
    assert int(out.q.abs().max()) <= qmax(6)


def test_gptq_errors():
    W, X, H = make_layer()
    with pytest.raises(QpackInputError, match="Hessian"):
        make_quantizer("gptq", 4).quantize(W.float())
    with pytest.raises(QpackInputError, match="does not match"):
        make_quantizer("gptq", 4).quantize(W.float(), H[:10, :10])
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QpackInputError, match="NaN"):
        make_quantizer("gptq", 4).quantize(W.float(), bad)
    with pytest.raises(QpackInputError, match="dtype"):
        make_quantizer("gptq", 4, dtype="float16").quantize(W.float(), H)
    assert make_quantizer("gptq", 4).needs_hessian


def test_gptq_deterministic_and_dequantizes_to_its_codes():
    W, X, H = make_layer(seed=6)
    a = make_quantizer("gptq", 5, 32).quantize(W.float(), H.float())
    b = make_quantizer("gptq", 5, 32).quantize(W.float(), H.float())
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert a.scheme == "gptq" and a.bits == 5 and a.shape == (64, 96)
    deq = a.dequantize()
    assert torch.equal(deq, a.q.float() * torch.from_numpy(
        np.repeat(a.scales.numpy().astype(np.float32), 32, axis=1)[:, :96]))


def test_gptq_speed_512x1536():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(512, 1536, generator=g)
    X = torch.randn(2048, 1536, generator=g)
    H = X.T @ X / 2048
    qz = make_quantizer("gptq", 6)
    # CPU time, not wall time: other jobs share this machine's two cores; the sweep runs on one thread.
    t = time.process_time()
    qz.quantize(W, H)
    elapsed = time.process_time() - t
    assert elapsed < 2.0, f"GPTQ on 512x1536 took {elapsed:.2f} s of CPU"


def _same(a, b):
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)
    assert (a.shape, a.bits, a.scheme, a.group_size, a.params) == (b.shape, b.bits, b.scheme, b.group_size, b.params)


@pytest.mark.parametrize("group_size,params", [(None, {}), (32, {"actorder": False}), (None, {"clip_search": True}),
                                               (16, {"sdclip_k": 4.0, "blocksize": 24})])
def test_quantize_widths_equals_one_quantizer_per_width_and_factorizes_once(monkeypatch, group_size, params):
    W, X, H = make_layer(seed=8)
    W3 = W.float().reshape(64, 4, 24)  # a 3-D weight: quantized as its (64, 96) matrix view
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = quantize_widths(W3, H.float(), range(2, 9), group_size, **params)
    assert len(calls) == 2  # one Cholesky of H, one of its inverse, for all seven widths
    assert sorted(got) == list(range(2, 9))
    for bits, q in got.items():
        _same(q, make_quantizer("gptq", bits, group_size, **params).quantize(W3, H.float()))
    assert len(calls) == 2 + 2 * 7


@pytest.mark.parametrize("group_size,params", [(None, {}), (32, {"actorder": False, "blocksize": 16}),
                                               (None, {"clip_search": True, "blocksize": 24, "dtype": "float64"})])
def test_stacked_widths_equal_one_sweep_per_width(group_size, params):
    W, X, H = make_layer(seed=14)
    stacked = quantize_widths(W.float(), H.float(), [2, 3, 5, 8], group_size, stacked=True, **params)
    for bits, q in stacked.items():
        _same(q, make_quantizer("gptq", bits, group_size, **params).quantize(W.float(), H.float()))


@pytest.mark.parametrize("actorder", [True, False])
def test_prepared_state_is_not_changed_by_a_sweep(actorder):
    W, X, H = make_layer(seed=9)
    g = GPTQ(W.float(), H.float(), actorder=actorder)
    first = g.quantize(4, blocksize=16)  # several blocks, so later columns get the lazy batch update
    g.quantize(6, blocksize=16)
    g.quantize(3, 32, blocksize=16)
    _same(g.quantize(4, blocksize=16), first)
    fresh = make_quantizer("gptq", 4, actorder=actorder, blocksize=16).quantize(W.float(), H.float())
    assert torch.equal(first.q, fresh.q) and torch.equal(first.scales, fresh.scales)


@pytest.mark.parametrize("bits", [3, 5])
def test_given_scales_and_sdclip_grid_match_the_reference(bits):
    W, X, H = make_layer(seed=10)
    g = GPTQ(W, H, torch.float64)
    k = 5.0
    want = make_quantizer("sdclip", bits, k=k).quantize(W.float()).scales  # no dead columns: same W
    out = g.quantize(bits, scales=sdclip_scales(k))
    assert torch.equal(out.scales, want)
    np.testing.assert_array_equal(out.q.numpy(), reference_gptq(W.numpy(), H.numpy(), want.numpy(), bits))
    given = (want.float() * 1.25).half()
    out = g.quantize(bits, scales=given)
    assert torch.equal(out.scales, given)
    np.testing.assert_array_equal(out.q.numpy(), reference_gptq(W.numpy(), H.numpy(), given.numpy(), bits))
    q = make_quantizer("gptq", bits, sdclip_k=k, dtype="float64").quantize(W.float(), H)
    assert torch.equal(q.q, g.quantize(bits, scales=sdclip_scales(k)).q) and q.params["sdclip_k"] == k


def laplace_bits(m, decay=0.5):
    """Code lengths (bits) of a two-sided geometric distribution over the levels -m..m."""
    p = decay ** np.abs(np.arange(-m, m + 1))
    return -np.log2(p / p.sum())


@pytest.mark.parametrize("actorder", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.002, 0.02])
def test_rdo_rounding_matches_the_reference(actorder, lam):
    W, X, H = make_layer(seed=11)
    bits = 4
    cb = laplace_bits(qmax(bits))
    g = GPTQ(W, H, torch.float64, actorder=actorder)
    out = g.quantize(bits, rounding=RateDistortionRounding(torch.from_numpy(cb), lam))
    assert out.params["rounding"] == "rdo" and out.params["rdo_lambda"] == lam
    ref = reference_gptq(W.numpy(), H.numpy(), out.scales.numpy(), bits, actorder=actorder, rdo=(cb, lam))
    np.testing.assert_array_equal(out.q.numpy(), ref)
    if lam == 0.0:  # no rate term: the nearest level, as the default rounding picks it
        assert torch.equal(out.q, g.quantize(bits).q)


def test_rdo_rounding_trades_distortion_for_rate():
    W, X, H = make_layer(seed=12)
    bits = 5
    cb = laplace_bits(qmax(bits))
    g = GPTQ(W, H, torch.float64)
    rate, loss = [], []
    for lam in (0.0, 0.01, 0.1):
        q = g.quantize(bits, rounding=RateDistortionRounding(torch.from_numpy(cb), lam))
        rate.append(float(cb[(q.q.numpy().astype(int) + qmax(bits))].sum()))
        E = W - q.dequantize().double()
        loss.append(float(0.5 * torch.trace(E @ H @ E.T)))
    # The rate falls with lambda; the loss only on the whole grows (greedy GPTQ is not optimal, so a small
    # lambda can even lower it: 79.82 -> 79.55 here).
    assert rate[0] > rate[1] > rate[2] and loss[2] > 1.5 * loss[0], (rate, loss)


def test_rounding_hook_sees_every_column_in_act_order():
    W, X, H = make_layer(seed=13)
    seen = []

    def rounding(col: Column) -> torch.Tensor:
        seen.append(col.index)
        assert col.w.shape == col.s.shape == (W.shape[0],) and col.hinv.ndim == 0 and col.qmax == 7
        return torch.round(col.w / col.s).clamp_(-col.qmax, col.qmax)

    g = GPTQ(W.float(), H.float())
    out = g.quantize(4, rounding=rounding)
    assert seen == torch.argsort(torch.diag(H.float()), descending=True, stable=True).tolist()
    assert torch.equal(out.q, g.quantize(4).q) and out.params["rounding"] == "custom"


def test_grid_and_rounding_errors():
    W, X, H = make_layer()
    with pytest.raises(QpackInputError, match="not both"):
        make_quantizer("gptq", 4, clip_search=True, sdclip_k=3.0).quantize(W.float(), H.float())
    with pytest.raises(QpackInputError, match="sdclip_k"):
        make_quantizer("gptq", 4, sdclip_k=-1.0).quantize(W.float(), H.float())
    with pytest.raises(QpackInputError, match="2\\*qmax\\+1"):
        RateDistortionRounding(torch.ones(4), 0.1)
    with pytest.raises(QpackInputError, match="levels"):
        GPTQ(W.float(), H.float()).quantize(3, rounding=RateDistortionRounding(torch.ones(15), 0.1))
    with pytest.raises(QpackInputError, match="lam"):
        RateDistortionRounding(torch.ones(15), -1.0)
    with pytest.raises(QpackInputError, match="one scale tensor per width"):
        GPTQ(W.float(), H.float()).solve_stacked([], [])


def test_thread_tuning_only_on_the_cpu(monkeypatch):
    from qpack.quant.gptq import _one_thread

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    with _one_thread(torch.device("cuda")):
        pass
    with _one_thread(torch.device("meta")):
        pass
    assert calls == []
    with _one_thread(torch.device("cpu")):
        assert calls == [1]
    assert calls == [1, torch.get_num_threads()]
