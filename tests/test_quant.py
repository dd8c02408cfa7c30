"""Data-free quantizers (rtn, gptq_lite, sdclip) against numpy references, and LQER."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qpack.errors import QpackInputError
from qpack.quant import QUANTIZERS, Quantized, make_quantizer, qmax
from qpack.quant.gptq_lite import clip_ratios
from qpack.quant.lqer import fit_lqer
from qpack.quant.sdclip import DEFAULT_K, RECORD_K

TINY16 = np.finfo(np.float16).tiny


def heavy_tailed(rows=48, cols=80, seed=0):
    """Rows of Student-t values with uneven scales: clipping matters for them."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(rows, cols)) * rng.uniform(0.01, 2.0, size=(rows, 1))
    return torch.from_numpy(w.astype(np.float32))


def groups(cols, group_size):
    gs = group_size or cols
    return [(g, min(g + gs, cols)) for g in range(0, cols, gs)]


def ref_codes(w, s, m):
    """Codes for fp16 scale(s) s, computed in float32 like the quantizers."""
    return np.clip(np.round(w / s.astype(np.float32)), -m, m)


def ref_gptq_lite(w, bits, group_size, ratios):
    """Brute force: per row and group, every ratio, keep the first with the smallest squared error."""
    w = w.numpy()
    m = qmax(bits)
    spans = groups(w.shape[1], group_size)
    scales = np.zeros((w.shape[0], len(spans)), dtype=np.float16)
    for r in range(w.shape[0]):
        for gi, (a, b) in enumerate(spans):
            x = w[r, a:b]
            best, best_err = None, np.inf
            for ratio in ratios:
                s = max(np.float16(np.float32(np.abs(x).max()) * np.float32(ratio) / np.float32(m)), TINY16)
                s = np.float16(s)
                err = float(np.sum((ref_codes(x, s, m) * np.float32(s) - x).astype(np.float64) ** 2))
                if err < best_err:
                    best, best_err = s, err
            scales[r, gi] = best
    return scales


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group_size", [None, 16, 24])
def test_gptq_lite_matches_brute_force(bits, group_size):
    w = heavy_tailed(rows=12, cols=40, seed=bits)
    ratios = clip_ratios(9, 0.6)
    out = make_quantizer("gptq_lite", bits, group_size, grid=9, min_ratio=0.6, protect_sigma=None,
                         tail_weight=0.0, clip_max_bits=8).quantize(w)  # the plain MSE search (tests/test_datafree.py: the guards)
    want = ref_gptq_lite(w, bits, group_size, ratios)
    np.testing.assert_array_equal(out.scales, want)
    deq = out.dequantize().numpy()
    rtn = make_quantizer("rtn", bits, group_size).quantize(w).dequantize().numpy()
    # Ratio 1.0 is in the grid, so every row (and group) is at least as good as RTN.
    err_lite = ((deq - w.numpy()) ** 2).sum(axis=1)
    err_rtn = ((rtn - w.numpy()) ** 2).sum(axis=1)
    assert (err_lite <= err_rtn * (1 + 1e-6)).all()


def test_gptq_lite_beats_rtn_on_heavy_tails():
    w = heavy_tailed()
    # Clipping pays most where the grid is coarse.
    for bits, margin in ((3, 0.8), (4, 0.92), (6, 0.99)):
        lite = make_quantizer("gptq_lite", bits, protect_sigma=None, tail_weight=0.0,
                              clip_max_bits=8).quantize(w).dequantize()
        rtn = make_quantizer("rtn", bits).quantize(w).dequantize()
        assert float((lite - w).square().sum()) < margin * float((rtn - w).square().sum())


def test_gptq_lite_codes_are_round_of_scales():
    w = heavy_tailed(seed=3)
    out = make_quantizer("gptq_lite", 5, 16).quantize(w)
    s = np.repeat(out.scales.numpy().astype(np.float32), 16, axis=1)[:, :80]
    np.testing.assert_array_equal(out.q, ref_codes(w.numpy(), s, qmax(5)).astype(np.int8))
    assert out.params["grid"] == 41 and out.params["min_ratio"] == pytest.approx(0.8)


def test_clip_ratios():
    assert clip_ratios(41)[:3] == pytest.approx([1.0, 0.995, 0.99])
    assert clip_ratios(41)[-1] == pytest.approx(0.8)
    assert clip_ratios([1.0, 0.9]) == [1.0, 0.9]
    assert clip_ratios(1) == [1.0]
    for bad in (0, [], [0.0], [2.0], "x"):
        with pytest.raises(QpackInputError):
            clip_ratios(bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_sdclip_matches_reference(bits, group_size):
    w = heavy_tailed(seed=10 + bits)
    out = make_quantizer("sdclip", bits, group_size).quantize(w)
    k = DEFAULT_K[bits]
    x = w.numpy().astype(np.float64)
    spans = groups(x.shape[1], group_size)
    std = np.stack([x[:, a:b].std(axis=1) for a, b in spans], axis=1)
    want = np.maximum((std * k / qmax(bits)).astype(np.float32).astype(np.float16), TINY16)
    # The std is summed in float32 by torch, here in float64: allow one fp16 ulp.
    np.testing.assert_allclose(out.scales.numpy().astype(np.float64), want.astype(np.float64), rtol=1e-3)
    s = np.concatenate([np.repeat(out.scales.numpy()[:, i : i + 1].astype(np.float32), b - a, axis=1)
                        for i, (a, b) in enumerate(spans)], axis=1)
    np.testing.assert_array_equal(out.q, ref_codes(w.numpy(), s, qmax(bits)).astype(np.int8))
    assert out.params == {"k": pytest.approx(k)}


def test_sdclip_k_and_defaults():
    assert DEFAULT_K[6] == RECORD_K == 12.85
    # The step (k / qmax, in standard deviations) never grows as bits grow.
    steps = [DEFAULT_K[b] / qmax(b) for b in range(2, 9)]
    assert all(a >= b - 1e-12 for a, b in zip(steps, steps[1:]))
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    out = make_quantizer("sdclip", 6, k=4.0).quantize(w)
    np.testing.assert_allclose(out.scales.numpy().astype(np.float32)[:, 0],
                               (w.std(dim=1, correction=0) * 4.0 / 31).numpy(), rtol=1e-3)
    # A larger k is a coarser step: fewer distinct codes.
    few = make_quantizer("sdclip", 6, k=30.0).quantize(w)
    assert len(np.unique(few.q)) < len(np.unique(out.q))
    for bad in (0, -1.0, float("nan"), "12"):
        with pytest.raises(QpackInputError):
            make_quantizer("sdclip", 6, k=bad).quantize(w)


@pytest.mark.parametrize("name", ["rtn", "gptq_lite", "sdclip"])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 6), (1, 1)])
def test_data_free_quantizers_shapes_and_ranges(name, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for bits in (2, 4, 8):
        out = make_quantizer(name, bits).quantize(w)
        assert out.shape == shape and out.scheme == name and out.bits == bits
        assert int(out.q.abs().max()) <= qmax(bits)
        assert out.dequantize().shape == shape


@pytest.mark.parametrize("name", ["rtn", "gptq_lite", "sdclip"])
def test_zero_rows_stay_zero(name):
    w = torch.zeros(3, 10)
    w[1] = torch.linspace(-1, 1, 10)
    out = make_quantizer(name, 4).quantize(w)
    assert (out.q[0] == 0).all() and (out.q[2] == 0).all()
    assert torch.equal(out.dequantize()[0], torch.zeros(10))


def test_rtn_error_at_most_half_a_step():
    w = heavy_tailed(seed=5)
    out = make_quantizer("rtn", 6, 16).quantize(w)
    s = np.repeat(out.scales.numpy().astype(np.float32), 16, axis=1)[:, :80]
    err = np.abs(out.dequantize().numpy() - w.numpy())
    # fp16 rounding of the scale can leave the absmax element a hair outside the grid.
    assert (err <= 0.5 * s + np.abs(w.numpy()) * 1e-3).all()


def test_registry_lists_all_schemes():
    make_quantizer("rtn", 4)  # imports the built-ins
    assert {"rtn", "gptq_lite", "sdclip", "gptq"} <= set(QUANTIZERS.names())
    with pytest.raises(QpackInputError, match="known"):
        make_quantizer("nope", 4)
    with pytest.raises(QpackInputError, match="no parameter"):
        make_quantizer("gptq_lite", 4, k=3)


# ---- LQER -----------------------------------------------------------------------------------------------

def test_lqer_reduces_error_and_vanishes_at_full_rank():
    w = heavy_tailed(rows=24, cols=40, seed=7)
    q = make_quantizer("rtn", 3).quantize(w)
    wq = q.dequantize()
    before = float((w - wq).square().sum())
    prev = before
    for rank in (1, 4, 12):
        a, b = fit_lqer(w, q, rank)
        assert a.q.shape == (24, rank) and b.q.shape == (rank, 40) and a.bits == 8
        after = float((w - wq - (a.dequantize() @ b.dequantize())).square().sum())
        assert after < prev
        prev = after
    a, b = fit_lqer(w, wq, 24, bits=8)
    full = float((w - wq - (a.dequantize() @ b.dequantize())).square().sum())
    assert full < 1e-3 * before
    # Rank r at full precision is the best rank-r fit: the quantized factors are close to it.
    E = (w - wq).double()
    S = torch.linalg.svdvals(E)
    a, b = fit_lqer(w, wq, 4)
    left = float((E - (a.dequantize() @ b.dequantize()).double()).square().sum())
    optimal = float(S[4:].square().sum())
    assert optimal <= left < 1.05 * optimal


def test_lqer_with_groups_and_bits():
    w = heavy_tailed(rows=16, cols=64, seed=8)
    wq = make_quantizer("rtn", 4).quantize(w).dequantize()
    a, b = fit_lqer(w, wq, 3, bits=6, group_size=16)
    assert a.bits == b.bits == 6 and b.group_size == 16
    assert a.params == {"lqer": "A", "rank": 3}
    assert float((w - wq - (a.dequantize() @ b.dequantize())).square().sum()) < float((w - wq).square().sum())


def test_lqer_errors():
    w = torch.randn(6, 8)
    with pytest.raises(QpackInputError, match="rank"):
        fit_lqer(w, w, 0)
    with pytest.raises(QpackInputError, match="rank"):
        fit_lqer(w, w, 7)
    with pytest.raises(QpackInputError, match="differ"):
        fit_lqer(w, torch.zeros(8, 6), 2)


# sha256[:16] of codes + scales bytes, produced by the numpy-holding implementation (main at d82d3d4) on the
# inputs of golden_cases(); the torch-holding one must reproduce them bit for bit on the CPU.
GOLDEN = {
    "rtn-4-None-[]": "22f920b68c3dc4e1",
    "rtn-6-16-[]": "106a658e1dae347c",
    "gptq_lite-5-None-[]": "099936f6be65079f",  # datafree: params gain protect_sigma, tail_weight
    "gptq_lite-3-32-[('grid', 9)]": "f5842c11ba41dee9",
    "sdclip-6-None-[]": "c9da82be060d3a74",
    "sdclip-4-16-[('k', 3.0)]": "2bc068b02eb70a23",
    "gptq-2-None-[]": "d757b28d56b644ab",
    "gptq-6-None-[]": "81e006204edc2966",
    "gptq-4-32-[('actorder', False)]": "72994b435b7bd022",
    "gptq-5-None-[('clip_search', True), ('grid', 11)]": "9ebf110b49de6c98",
    "gptq-8-16-[('blocksize', 7)]": "aa63ccbdf5c07e3e",
    "lqer": "cb50cc56e9daeb999c69a2d1c7928097",
}


def _digest(q) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(q.q.cpu())).tobytes())
    h.update(np.ascontiguousarray(np.asarray(q.scales.cpu())).tobytes())
    return h.hexdigest()[:16]


def golden_cases() -> dict[str, str]:
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(40, 72, generator=g) * torch.rand(40, 1, generator=g)
    x = torch.randn(300, 72, generator=g) @ (torch.eye(72) + 0.2 * torch.randn(72, 72, generator=g))
    x[:, 5] = 0  # one dead input column
    h = x.T @ x / 300
    out = {}
    for name, bits, gs, params in [("rtn", 4, None, {}), ("rtn", 6, 16, {}), ("gptq_lite", 5, None, {}),
                                   ("gptq_lite", 3, 32, {"grid": 9}), ("sdclip", 6, None, {}),
                                   ("sdclip", 4, 16, {"k": 3.0}), ("gptq", 2, None, {}), ("gptq", 6, None, {}),
                                   ("gptq", 4, 32, {"actorder": False}),
                                   ("gptq", 5, None, {"clip_search": True, "grid": 11}),
                                   ("gptq", 8, 16, {"blocksize": 7})]:
        q = make_quantizer(name, bits, gs, **params).quantize(w, h)
        out[f"{name}-{bits}-{gs}-{sorted(params.items())}"] = _digest(q)
    a, b = fit_lqer(w, make_quantizer("rtn", 3).quantize(w), 4)
    out["lqer"] = _digest(a) + _digest(b)
    return out


def test_codes_bit_identical_to_the_numpy_implementation():
    assert golden_cases() == GOLDEN


def test_quantized_holds_torch_tensors_and_accepts_numpy():
    w = heavy_tailed(6, 20, seed=9)
    for name in ("rtn", "gptq_lite", "sdclip"):
        out = make_quantizer(name, 4).quantize(w)
        assert isinstance(out.q, torch.Tensor) and out.q.dtype == torch.int8
        assert isinstance(out.scales, torch.Tensor) and out.scales.dtype == torch.float16
        assert out.device == torch.device("cpu") and out.cpu() is out
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, size=(3, 5)).astype(np.int8)
    scales = rng.uniform(0.1, 1.0, size=(3, 1)).astype(np.float16)
    q = Quantized(codes, scales, (3, 5), 4, "rtn")
    assert isinstance(q.q, torch.Tensor) and isinstance(q.scales, torch.Tensor)
    want = codes.astype(np.float32) * scales.astype(np.float32)
    np.testing.assert_array_equal(q.dequantize().numpy(), want)
    ro = np.frombuffer(codes.tobytes(), dtype=np.int8).reshape(3, 5)  # read-only, as artifact decoding gives
    assert torch.equal(Quantized(ro, scales, (3, 5), 4, "rtn").q, q.q)
    big_endian = Quantized(codes, scales.astype(">f2"), (3, 5), 4, "rtn")
    assert torch.equal(big_endian.scales, q.scales)
    with pytest.raises(QpackInputError, match="int8"):
        Quantized(codes.astype(np.int16), scales, (3, 5), 4, "rtn")
    with pytest.raises(QpackInputError, match="float16"):
        Quantized(codes, scales.astype(np.float32), (3, 5), 4, "rtn")
    with pytest.raises(QpackInputError, match="torch tensor or a numpy array"):
        Quantized(codes.tolist(), scales, (3, 5), 4, "rtn")
    with pytest.raises(QpackInputError, match="meta"):
        Quantized(torch.from_numpy(codes), torch.from_numpy(scales).to("meta"), (3, 5), 4, "rtn")


@pytest.mark.parametrize("name,group_size", [("rtn", None), ("rtn", 16), ("gptq_lite", 16), ("sdclip", None),
                                             ("sdclip", 16)])
def test_data_free_quantizers_stay_on_the_input_device(name, group_size):
    # The meta device has no data: any .numpy(), any tensor made without device= (which lands on the CPU and
    # meets a meta tensor) raises, so this finds host round trips without needing a GPU.
    w = torch.empty(12, 40, device="meta")
    out = make_quantizer(name, 4, group_size).quantize(w)
    assert out.q.device.type == out.scales.device.type == "meta" and out.q.shape == (12, 40)
    assert out.dequantize().device.type == "meta"
