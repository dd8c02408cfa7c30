"""CROWN-Q: the curvature-weighted quantization penalty, lambda * sum_ij h_j * delta_i^2 / 12.

Rounding to a grid of step delta adds noise of variance delta^2 / 12 to each weight; weighted by the curvature
h_j of the loss along input j (the Hessian diagonal of the layer's input, broadcast over rows) it estimates
how much quantization at the target width will cost. delta_i = absmax(row i) / qmax(bits), or per row and
column group with group_size. Without a Hessian the proxy is h = 1 (plain noise power).

Used (a) by the trainer as a differentiable warmdown loss term, (b) by the budget solver to weigh tensors.

`crownq_record_penalty` is the other form, the one parameter-golf PR #693 (and #745 after it) trains with:
lambda * sum_i mean_j(w_ij^2) * (rowmax_i / levels)^2 / 12, where the weight's own mean square stands in for
the curvature and levels = 15 is a fixed grid; the records add it only while late QAT is on. The two differ
in the curvature proxy (h_j from a Hessian, or 1, against mean_j w_ij^2), in the grid step (qmax(bits) against
a fixed 15) and in when they apply (all of warmdown against QAT only); crownq_penalty is unchanged by it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .errors import QpackInputError
from .quant.base import MAX_BITS, MIN_BITS, Quantized, qmax


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) view that keeps the autograd graph (unlike quant.base.as_matrix)."""
    if w.ndim == 0:
        return w.reshape(1, 1)
    return w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)


def _check_bits(bits: int, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QpackInputError(f"crownq: bits for {name!r} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def _step_sq(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """delta^2 per element, (rows, cols): the squared grid step of the element's row (or group)."""
    absmax = W.abs()
    if group_size:
        rows, cols = W.shape
        pad = (-cols) % group_size
        g = torch.nn.functional.pad(absmax, (0, pad)).reshape(rows, -1, group_size).amax(dim=2)
        step = g.repeat_interleave(group_size, dim=1)[:, :cols] / qmax(bits)
    else:
        step = absmax.amax(dim=1, keepdim=True) / qmax(bits)
    return step.square()


def _penalty(name: str, w: torch.Tensor, bits: int, h: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    W = _matrix(w)
    d2 = _step_sq(W, _check_bits(bits, name), group_size)
    if h is None:
        return d2.expand_as(W).sum() / 12.0
    h = h.to(device=W.device, dtype=W.dtype).reshape(-1)
    if h.numel() != W.shape[1]:
        raise QpackInputError(f"crownq: Hessian diagonal for {name!r} has {h.numel()} entries, the weight {W.shape[1]} columns")
    return (d2 * h).sum() / 12.0 if group_size else (d2.reshape(-1) * h.sum()).sum() / 12.0


def crownq_penalty(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                   bits: int | Mapping[str, int], hdiag: Mapping[str, torch.Tensor] | None = None,
                   lam: float = 1.0, group_size: int | None = None) -> torch.Tensor:
    """lam * sum over tensors of sum_ij h_j delta_ij^2 / 12, differentiable w.r.t. the weights.

    `bits` is one width or {name: width} (every name must be present); `hdiag` maps names to the Hessian
    diagonal of that weight's input (cols,), tensors without one use h = 1.
    """
    items = weights.items() if isinstance(weights, Mapping) else weights
    total: torch.Tensor | None = None
    for name, w in items:
        if isinstance(bits, Mapping):
            if name not in bits:
                raise QpackInputError(f"crownq: no bit width given for {name!r}")
            b = bits[name]
        else:
            b = bits
        term = _penalty(name, w, b, (hdiag or {}).get(name), group_size)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def crownq_record_penalty(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                          lam: float = 0.01, levels: int = 15) -> torch.Tensor:
    """#693's penalty: lam * sum over tensors and rows of mean_j(w_ij^2) * (max_j |w_ij| / levels)^2 / 12."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise QpackInputError(f"crownq: levels must be a positive integer, got {levels!r}")
    items = weights.items() if isinstance(weights, Mapping) else weights
    total: torch.Tensor | None = None
    for _, w in items:
        W = _matrix(w).float()
        step_sq = (W.abs().amax(dim=1) / levels).square()
        term = (W.square().mean(dim=1) * step_sq).sum() / 12.0
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def expected_loss_increase(W: torch.Tensor, Wq: torch.Tensor | Quantized,
                           curvature: torch.Tensor | None = None) -> float:
    """Second-order loss increase of replacing W by Wq: trace(E H E^T) / 2 with E = W - Wq.

    `curvature` is the full Hessian H (cols, cols), its diagonal (cols,) giving sum_ij h_j E_ij^2 / 2, or None
    for h = 1.
    """
    wq = Wq.dequantize() if isinstance(Wq, Quantized) else Wq
    with torch.no_grad():
        E = _matrix(W.detach()).to(torch.float64) - _matrix(wq.detach()).to(torch.float64)
        if curvature is None:
            return float(E.square().sum() / 2)
        H = curvature.detach().to(torch.float64)
        if H.ndim == 2:
            if tuple(H.shape) != (E.shape[1], E.shape[1]):
                raise QpackInputError(f"expected_loss_increase: Hessian {tuple(H.shape)} does not match {E.shape[1]} columns")
            return float(((E @ H) * E).sum() / 2)
        H = H.reshape(-1)
        if H.numel() != E.shape[1]:
            raise QpackInputError(f"expected_loss_increase: Hessian diagonal has {H.numel()} entries, not {E.shape[1]}")
        return float((E.square() * H).sum() / 2)
