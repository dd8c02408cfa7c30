"""LQER: a low-rank correction of the quantization error, W ~ deq(Wq) + deq(A) @ deq(B).

Two ways to make the factors from E = W - Wq:

- `fit_lqer` (the fixed --lqer-rank mode): truncated SVD with the singular values split evenly (sqrt into each
  side, so both factors have similar ranges), each factor quantized per row with RTN.
- `fit_factors` (the solver's mode, factors as the parameter-golf records store them): A = U_r at 2 or 4 bits
  with one scale for the whole factor (its columns are unit vectors, so one range fits all of them), then B
  refitted by least squares against the quantized A (B = pinv(deq A) E, which absorbs A's rounding) and
  quantized at 2 or 4 bits with one scale per group of `group_size` columns. Scales in both are searched
  (a shrunk range often beats absmax at 2-4 bits). A shared scale is stored as an equal fp16 per row, which
  the scale codec squeezes to a few bytes, so the artifact's lowrank slot holds these factors unchanged.
"""
from __future__ import annotations

import torch

from ..errors import QpackInputError
from .base import Quantized, as_matrix, make_quantizer, qmax, scales_fp16

FACTOR_BITS = (2, 4)  # the widths the solver's factors take (2: codes -1, 0, 1)
_SHRINK = torch.linspace(0.3, 1.0, 15, dtype=torch.float64)  # scale = shrink * absmax / qmax, searched


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


def quantize_factor(x: torch.Tensor, bits: int, group_size: int | None, shared: bool = False) -> Quantized:
    """RTN codes of a factor with the MSE-best scale per group of `group_size` columns (None: per row), or one
    scale for the whole matrix (`shared`, stored once per row); scales searched over shrunk absmax ranges."""
    x = x.to(torch.float64)
    rows, cols = x.shape
    m = qmax(bits)
    if shared:
        groups, g = x.reshape(1, -1), rows * cols
    else:
        g = group_size or cols
        pad = (-cols) % g
        groups = torch.nn.functional.pad(x, (0, pad)).reshape(-1, g)  # zero padding changes no max and no error
    amax = groups.abs().amax(dim=1)
    best_s = torch.ones_like(amax)
    best_err = torch.full_like(amax, float("inf"))
    for shrink in _SHRINK:
        s = scales_fp16(amax * shrink / m).to(torch.float64)  # the fp16 scale that will be stored
        err = (groups - (groups / s[:, None]).round().clamp(-m, m) * s[:, None]).square().sum(dim=1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    s16 = best_s.to(torch.float16)
    if shared:
        scales, gs = s16.expand(rows, 1).contiguous(), None
    else:
        scales, gs = s16.reshape(rows, -1), group_size
    per_col = scales.to(torch.float64).repeat_interleave(gs or cols, dim=1)[:, :cols]
    q = (x / per_col).round().clamp(-m, m).to(torch.int8)
    return Quantized(q, scales, (rows, cols), bits, "rtn", gs, {})


def check_factor_bits(bits: int) -> None:
    """Refuse a factor width the solver's factors do not take."""
    if bits not in FACTOR_BITS:
        raise QpackInputError(f"lqer: factor width must be one of {', '.join(map(str, FACTOR_BITS))}, got {bits!r}")


def hessian_root(h: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    """Lower-triangular L with H + damping = L L^T (1% of the mean diagonal), or None without a usable H."""
    if h is None or tuple(h.shape) != (cols, cols):
        return None
    h = h.to(torch.float64)
    damp = 0.01 * float(torch.diagonal(h).mean().abs()) + 1e-12
    L, info = torch.linalg.cholesky_ex(h + damp * torch.eye(cols, dtype=h.dtype))
    return L if int(info) == 0 and bool(torch.isfinite(L).all()) else None


def error_svd(err: torch.Tensor, root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh with U diag(S) Vh = err (float64); with `root` L of a Hessian, the SVD of err L mapped back, so
    that the leading r terms are the rank-r correction removing the most error weighted by H = L L^T."""
    E = as_matrix(err).to(torch.float64)
    if root is None:
        return torch.linalg.svd(E, full_matrices=False)
    U, S, Vh = torch.linalg.svd(E @ root, full_matrices=False)
    return U, S, torch.linalg.solve_triangular(root, Vh, upper=False, left=False)


def fit_factors(err: torch.Tensor, rank: int, a_bits: int, b_bits: int, group_size: int | None,
                svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[Quantized, Quantized]:
    """Quantized A (rows x rank, one scale) and B (rank x cols, grouped) with deq(A) @ deq(B) ~ err; `svd` is
    error_svd(err, ...) when the caller shares one across ranks and widths."""
    E = as_matrix(err).to(torch.float64)
    if not isinstance(rank, int) or not 1 <= rank <= min(E.shape):
        raise QpackInputError(f"lqer: rank must be in 1..{min(E.shape)} for a {tuple(E.shape)} matrix, got {rank!r}")
    check_factor_bits(a_bits)
    check_factor_bits(b_bits)
    U, S, Vh = svd if svd is not None else error_svd(E)
    qa = quantize_factor(U[:, :rank], a_bits, None, shared=True)
    Aq = qa.dequantize().to(torch.float64)
    # B for the A that will be stored; pinv drops a column that rounded to all zeros instead of blowing up.
    B = torch.linalg.pinv(Aq) @ E
    qb = quantize_factor(B, b_bits, group_size)
    qa.params, qb.params = {"lqer": "A", "rank": rank}, {"lqer": "B", "rank": rank}
    return qa, qb
