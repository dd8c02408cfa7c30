"""sdclip_gptq: GPTQ on SDClip's k*std grid, checked against a plain reference written here from the records'
description (scale = k * std(row) / qmax in fp16, act-order, 1% damping, blocks of 128)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from qpack.errors import QpackInputError
from qpack.quant import make_quantizer


def _reference(W: torch.Tensor, H: torch.Tensor, k: float, bits: int, lam: float = 0.0, block: int = 128):
    """Independent GPTQ: explicit inverse, column loop; codes (rows, cols) int8 and fp16 scales (rows,)."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    m = 2 ** (bits - 1) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += 0.01 * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    std = torch.tensor([float(np.std(W[i].numpy(), ddof=1)) for i in range(rows)], dtype=torch.float64)
    clip = k * std
    if lam > 0:
        d = torch.diag(H).clamp_min(1e-8)
        r = torch.stack([(W[i].abs() * d / d.mean()).mean() for i in range(rows)])
        r = r / r.mean()
        clip = clip * (1 + lam * (r - 1))
    s = (clip / m).float().half().double()
    order = sorted(range(cols), key=lambda j: -float(H[j, j]))
    Wp = W[:, order].clone()
    Wp[:, dead[order]] = 0.0
    Hp = H[order][:, order]
    # U upper triangular with U^T U = H^-1 (the Cholesky factor GPTQ reads its updates from)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    for j in range(cols):
        q = torch.clamp(torch.round(Wp[:, j] / s), -m, m)
        Q[:, j] = q
        err = (Wp[:, j] - q * s) / U[j, j]
        Wp[:, j + 1:] -= err.unsqueeze(1) * U[j, j + 1:].unsqueeze(0)
    out = torch.zeros_like(Q)
    out[:, order] = Q
    return out.to(torch.int8).numpy(), s.half().numpy()


def _layer(rows=48, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(4 * cols, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("bits,k,lam", [(6, 12.85, 0.0), (8, 20.0, 0.0), (6, 12.85, 0.175), (4, 5.0, 0.0)])
def test_matches_reference_exactly(bits, k, lam):
    W, H = _layer(seed=bits)
    q = make_quantizer("sdclip_gptq", bits, k=k, lam=lam)
    got = q.quantize(W, H)
    ref_q, ref_s = _reference(W, H, k, bits, lam)
    np.testing.assert_array_equal(got.scales[:, 0].numpy(), ref_s)
    diff = np.flatnonzero(got.q.numpy() != ref_q)
    # float32 sweep vs float64 reference: identical codes (a tie at x.5 in one coordinate would be the only excuse)
    assert diff.size == 0, f"{diff.size} codes differ"
    assert got.bits == bits and got.scheme == "sdclip_gptq" and got.params["k"] == k


def test_scales_are_k_std_and_codes_in_range():
    W, H = _layer(seed=3)
    got = make_quantizer("sdclip_gptq", 6, k=12.85).quantize(W, H)
    want = (12.85 * W.std(dim=1) / 31).half().numpy()
    np.testing.assert_array_equal(got.scales[:, 0].numpy(), want)
    assert int(got.q.abs().max()) <= 31


def test_hessian_aware_widens_important_rows():
    W, H = _layer(seed=4)
    W[0] *= 3.0  # a row with large weights on every input is the most important
    plain = make_quantizer("sdclip_gptq", 6, k=12.85).quantize(W, H).scales[:, 0].double().numpy()
    aware = make_quantizer("sdclip_gptq", 6, k=12.85, lam=0.175).quantize(W, H).scales[:, 0].double().numpy()
    ratio = aware / plain
    assert ratio[0] > 1.05 and ratio[0] == ratio.max()


@pytest.mark.parametrize("params", [{"k": 0}, {"k": -1.0}, {"lam": -0.1}, {"k": float("nan")}, {"kk": 1}])
def test_bad_parameters_raise(params):
    with pytest.raises(QpackInputError):
        make_quantizer("sdclip_gptq", 6, **params)


def test_needs_hessian():
    with pytest.raises(QpackInputError, match="Hessian"):
        make_quantizer("sdclip_gptq", 6).quantize(torch.randn(4, 8))


def test_cli_rejects_unknown_scheme(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "qpack.cli", "compress", str(tmp_path / "m.pt"), "--scheme",
                        "sdclip_gpt", "-o", str(tmp_path / "o.qpk")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "sdclip_gptq" in r.stderr
    assert not (tmp_path / "o.qpk").exists()


@pytest.mark.parametrize("k", ["-1", "0"])
def test_cli_rejects_a_k_that_is_not_positive_before_any_work(tmp_path, k):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "qpack.cli", "compress", str(tmp_path / "m.pt"), "--scheme", "sdclip",
                        "--sdclip-k", k, "--budget", "3KB", "-o", str(tmp_path / "o.qpk")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"qpack: error: --sdclip-k values must be positive numbers, got {float(k)!r}"], r.stderr
    assert not (tmp_path / "o.qpk").exists()
