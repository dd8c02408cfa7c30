"""LQER: a low-rank correction of the quantization error, W ~ deq(Wq) + deq(A) @ deq(B).

A and B come from a truncated SVD of E = W - Wq with the singular values split evenly (sqrt into each side,
so both factors have similar ranges and quantize alike), each factor then quantized per row with RTN.
"""
from __future__ import annotations

import torch

from ..errors import QpackInputError
from .base import Quantized, as_matrix, make_quantizer


def _dense(x: torch.Tensor | Quantized) -> torch.Tensor:
    return as_matrix(x.dequantize() if isinstance(x, Quantized) else x)


def fit_lqer(w: torch.Tensor, wq: torch.Tensor | Quantized, rank: int, bits: int = 8,
             group_size: int | None = None) -> tuple[Quantized, Quantized]:
    """Quantized factors A (rows x rank) and B (rank x cols) with A @ B ~ W - Wq (matrix views)."""
    W, Wq = as_matrix(w), _dense(wq)
    if W.shape != Wq.shape:
        raise QpackInputError(f"lqer: weight {tuple(W.shape)} and quantized weight {tuple(Wq.shape)} differ")
    if not isinstance(rank, int) or not 1 <= rank <= min(W.shape):
        raise QpackInputError(f"lqer: rank must be in 1..{min(W.shape)} for a {tuple(W.shape)} matrix, got {rank!r}")
    # float64 SVD: the error is small next to W, and its spectrum is flat, so float32 loses digits.
    U, S, Vh = torch.linalg.svd((W - Wq).to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    A = (U[:, :rank] * root).to(torch.float32)
    B = (root[:, None] * Vh[:rank]).to(torch.float32)
    rtn = make_quantizer("rtn", bits, group_size)
    qa, qb = rtn.quantize(A), rtn.quantize(B)
    qa.params, qb.params = {"lqer": "A", "rank": rank}, {"lqer": "B", "rank": rank}
    return qa, qb
