"""Rate-aware quantization: the uniform quantizer and RDO rounding inside GPTQ (compress with it:
tests/test_compress_uniform.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qpack.codecs import make_codec
from qpack.errors import QpackInputError
from qpack.pack import encode_codes
from qpack.quant import make_quantizer
from qpack.rd.candidates import rate_candidates, step_grid
from qpack.rd.grid_gptq import code_lengths, round_rdo


def _layer(rows=64, cols=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed weights (Laplace) and inputs of uneven scale: a layer where rounding choices matter
    W = torch.distributions.Laplace(0.0, 0.02).sample((rows, cols))
    X = torch.randn(3 * cols, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    return W, X.T @ X / X.shape[0]


def _bytes(q) -> int:
    return len(make_codec("ans", {}).encode(encode_codes(q.q, q.bits, "byte")))


def _herr(W, H, q) -> float:
    D = (W - q.dequantize()).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def test_round_rdo_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, generator=g) * 3
    lengths = torch.rand(2 * 7 + 1, generator=g) * 6
    got = round_rdo(x, 7, 0.3, lengths, 1.7)
    for xi, qi in zip(x.tolist(), got.tolist()):
        lo = min(max(np.floor(xi), -7), 7)
        hi = min(lo + 1, 7)
        costs = {c: 1.7 * (xi - c) ** 2 + 0.3 * float(lengths[int(c) + 7]) for c in (lo, hi)}
        assert qi == min(costs, key=lambda c: (costs[c], c != lo))
    assert torch.equal(round_rdo(x, 7, 0.0, lengths), torch.round(x).clamp(-7, 7))


def test_code_lengths_are_smoothed_entropy_bits():
    q = np.array([[0, 0, 0, 1], [-1, 0, 0, 0]], dtype=np.int8)
    L = code_lengths(q, 2)
    counts = np.array([0, 1, 6, 1, 0]) + 0.5
    np.testing.assert_allclose(L.numpy(), -np.log2(counts / counts.sum()), rtol=1e-6)


def test_rdo_lowers_bytes_at_equal_or_lower_hessian_error():
    W, H = _layer()
    rdo = make_quantizer("uniform", 8, step=0.9, rdo=0.15).quantize(W, H)
    e_rdo, b_rdo = _herr(W, H, rdo), _bytes(rdo)
    # plain GPTQ (nearest level) on a fine grid of steps: the coarsest one that is at least as accurate
    plain = [make_quantizer("uniform", 8, step=s).quantize(W, H) for s in step_grid(0.3, 1.2, 32)]
    ok = [q for q in plain if _herr(W, H, q) <= e_rdo]
    assert ok and len(ok) < len(plain)  # the grid brackets RDO's error
    assert b_rdo < min(_bytes(q) for q in ok)


def test_gptq_on_the_grid_beats_rounding_and_nothing_clips():
    W, H = _layer(seed=2)
    W[3, 5] = 2.0  # an outlier far past 127 steps: its row widens instead of clipping
    gq = make_quantizer("uniform", 8, step=0.5).quantize(W, H)
    rq = make_quantizer("uniform", 8, step=0.5).quantize(W, None)
    assert _herr(W, H, gq) < 0.8 * _herr(W, H, rq)
    assert abs(float(rq.dequantize()[3, 5]) - 2.0) <= float(rq.scales[3, 0]) / 2 + 1e-3
    assert int(rq.q.abs().max()) <= 127


@pytest.mark.parametrize("params", [{"step": 0}, {"step": -1.0}, {"rdo": -0.1}, {"rows": "col"}, {"iters": 0}])
def test_bad_parameters_raise(params):
    with pytest.raises(QpackInputError):
        make_quantizer("uniform", 8, **params)


def test_rate_candidates_labels_and_monotone_bytes():
    W, H = _layer(seed=5)
    cands = rate_candidates(W, H, [0.25, 0.5, 1.0], rdo=0.1)
    assert [c[0] for c in cands] == ["uniform/step0.25/rdo0.1", "uniform/step0.5/rdo0.1", "uniform/step1/rdo0.1"]
    sizes = [_bytes(q) for _, q in cands]
    assert sizes[0] > sizes[1] > sizes[2]
