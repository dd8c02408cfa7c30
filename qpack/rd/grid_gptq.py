"""GPTQ on a fixed per-row grid with rate-distortion-optimised rounding.

Each column's codes are chosen, as in GPTQ, with the error pushed onto later columns through the upper Cholesky
factor of H^-1 (Hinv). Plain GPTQ rounds to the nearest level. With `mu` > 0 the choice between the two levels
around w / s minimises g_i * (x - q)^2 + mu * L(q): x = w / s, L(q) the code length in bits from a table (the
coder's histogram), g_i = mean_j(Hinv_jj^2) / Hinv_ii^2 the column's curvature relative to the layer's, so one
mu trades the same loss for a bit in every column (OBQ's incremental loss is (w - q s)^2 / Hinv_ii^2).
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant.gptq import GPTQ, _one_thread


def code_lengths(q: np.ndarray | torch.Tensor, m: int) -> torch.Tensor:
    """Bits per code value -m..m from the codes' histogram (add-half smoothing, so unseen levels cost finite bits)."""
    q = torch.as_tensor(np.asarray(q)).to(torch.int64).reshape(-1)
    counts = torch.bincount(q + m, minlength=2 * m + 1).to(torch.float64) + 0.5
    return (-torch.log2(counts / counts.sum())).to(torch.float32)


def round_rdo(x: torch.Tensor, m: int, mu: torch.Tensor | float, lengths: torch.Tensor | None,
              g: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Codes for x (already divided by the step): the nearest level, or with mu > 0 the cheaper of the two levels
    around x by g * (x - q)^2 + mu * L(q). Codes stay in [-m, m]."""
    if lengths is None or (isinstance(mu, float) and mu == 0.0):
        return torch.round(x).clamp_(-m, m)
    lo = torch.floor(x).clamp_(-m, m)
    hi = (lo + 1).clamp_(-m, m)
    cost_lo = g * (x - lo) ** 2 + mu * lengths[(lo + m).long()]
    cost_hi = g * (x - hi) ** 2 + mu * lengths[(hi + m).long()]
    return torch.where(cost_hi < cost_lo, hi, lo)


def gptq_grid(W: torch.Tensor, H: torch.Tensor | None, scales: torch.Tensor, m: int, mu: float = 0.0,
              lengths: torch.Tensor | None = None, percdamp: float = 0.01, blocksize: int = 128) -> np.ndarray:
    """int8 codes (rows, cols) of W on the grid q * scales[row] (|q| <= m): GPTQ with act-order when H is
    given (else independent rounding), nearest or RDO rounding (mu, lengths)."""
    W = W.to(torch.float32)
    rows, cols = W.shape
    S = scales.to(torch.float32).reshape(rows, 1)
    if H is None:
        return round_rdo(W / S, m, float(mu), lengths).to(torch.int8).numpy()
    with _one_thread():
        return _sweep(W, H, S, m, float(mu), lengths, percdamp, blocksize)


def _sweep(W, H, S, m, mu, lengths, percdamp, blocksize) -> np.ndarray:
    g = GPTQ(W, H)
    W, H = g.W.clone(), g.H
    rows, cols = W.shape
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, _, _ = g.inverse_cholesky(H, percdamp)
    d2 = torch.diagonal(Hinv) ** 2
    rel = d2.mean() / d2  # column curvature relative to the layer's
    s = S[:, 0]
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = round_rdo(w / s, m, mu, lengths, rel[i1 + i])
            Q[:, i1 + i] = q
            err = (w - q * s) / Hinv1[i, i]
            W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8).numpy()
