"""GPTQ on a fixed per-row grid with rate-distortion-optimised rounding.

Each column's codes are chosen, as in GPTQ, with the error pushed onto later columns through the upper Cholesky
factor of H^-1 (Hinv); the sweep is qpack.quant.gptq's, prepared once per matrix. Plain GPTQ rounds to the
nearest level. With `mu` > 0 the choice between the two levels around w / s minimises g_i * (x - q)^2 + mu * L(q):
x = w / s, L(q) the code length in bits from a table (the coder's histogram), g_i = mean_j(Hinv_jj^2) / Hinv_ii^2
the column's curvature relative to the layer's, so one dimensionless mu trades the same loss for a bit in every
column (OBQ's incremental loss is (w - q s)^2 / Hinv_ii^2) and the same mu means the same thing at any step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant.base import code_dtype, qmax
from ..quant.gptq import GPTQ, Column


def code_lengths(q: np.ndarray | torch.Tensor, m: int) -> torch.Tensor:
    """Bits per code value -m..m from the codes' histogram (add-half smoothing, so unseen levels cost finite bits)."""
    q = torch.as_tensor(np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q)).to(torch.int64).reshape(-1)
    counts = torch.bincount(q + m, minlength=2 * m + 1).to(torch.float64) + 0.5
    return (-torch.log2(counts / counts.sum())).to(torch.float32)


def round_rdo(x: torch.Tensor, m: int, mu: torch.Tensor | float, lengths: torch.Tensor | None,
              g: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Codes for x (already divided by the step): the nearest level, or with mu > 0 the cheaper of the two levels
    around x by g * (x - q)^2 + mu * L(q) (ties keep the lower level). Codes stay in [-m, m]."""
    if lengths is None or (isinstance(mu, float) and mu == 0.0):
        return torch.round(x).clamp_(-m, m)
    lengths = lengths.to(x.device)
    lo = torch.floor(x).clamp_(-m, m)
    hi = (lo + 1).clamp_(-m, m)
    cost_lo = g * (x - lo) ** 2 + mu * lengths[(lo + m).long()]
    cost_hi = g * (x - hi) ** 2 + mu * lengths[(hi + m).long()]
    return torch.where(cost_hi < cost_lo, hi, lo)


class RelativeRDO:
    """A GPTQ rounding rule (qpack.quant.gptq.Column -> codes): round_rdo with g = mean(Hinv_jj^2) / Hinv_ii^2."""

    def __init__(self, prepared: GPTQ, mu: float, lengths: torch.Tensor):
        self.mu = float(mu)
        self.lengths = lengths
        self.mean_d2 = torch.diagonal(prepared.Hinv).square().mean()
        self.params = {"rounding": "rdo", "rdo": self.mu}

    def __call__(self, col: Column) -> torch.Tensor:
        g = self.mean_d2 / col.hinv.square()
        return round_rdo(col.w / col.s, col.qmax, self.mu, self.lengths, g)


def gptq_grid(W: torch.Tensor, H: torch.Tensor | None, scales: torch.Tensor, bits: int, mu: float = 0.0,
              lengths: torch.Tensor | None = None, percdamp: float = 0.01, blocksize: int = 128,
              prepared: GPTQ | None = None) -> torch.Tensor:
    """Codes (rows, cols; code_dtype(bits)) of W on the grid q * scales[row] (|q| <= qmax(bits)): GPTQ with
    act-order when H (or an already `prepared` GPTQ of W) is given, else independent rounding; nearest or RDO
    rounding."""
    m = qmax(bits)
    S = scales.to(torch.float32).reshape(W.shape[0], 1)
    if H is None and prepared is None:
        return round_rdo(W.to(torch.float32) / S, m, float(mu), lengths).to(code_dtype(bits))
    g = prepared if prepared is not None else GPTQ(W.to(torch.float32), H, percdamp=percdamp)
    rounding = RelativeRDO(g, mu, lengths) if (mu > 0 and lengths is not None) else None
    q, _ = g.solve(S.to(torch.float16), bits, None, blocksize, rounding)
    return q
