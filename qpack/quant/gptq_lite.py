"""GPTQ-lite: per-row (or per-group) clip ratio chosen from a grid by the weight MSE of the dequantized values,
never clipping an outlier weight.

For every candidate ratio r the scale is r * absmax / qmax, rounded to fp16 exactly as it will be stored; each
row (or each row's group, when group_size is set: groups have their own scale, so choosing per group minimises
the row's MSE too) keeps the ratio with the smallest squared error. Ties keep the earlier, wider ratio.

Without data the weight MSE cannot see what a weight is worth, and in pretrained LMs the few weights far
outside their row's spread (the "super weights" of early MLP projections) sit on input channels with massive
activations: clipping one by 20% looks cheap in weight MSE and costs the model dearly. Two guards:
  * weights beyond `protect_sigma` times the row's RMS are protected: a ratio is admissible only if each of
    them still dequantizes within half a step (the error any weight gets from rounding). A Gaussian row of
    up to ~10^8 weights has no weight beyond 6 sigma (the default), so ordinary rows are not constrained;
    None protects nothing, 0 never clips;
  * each weight's squared error counts 1 + tail_weight * (w / rms(row))^2 times (default tail_weight 1): a
    large weight is presumed to matter more, so clipping the tail pays only where the bulk's rounding error
    is large (2-4 bits) and no longer at 6-8 bits, where the plain MSE still trims a little and the model
    loses by it (benchmarks/datafree).
  * above `clip_max_bits` (default 6) nothing is clipped at all: at 7-8 bits every model measured in
    benchmarks/datafree scored better unclipped (absmax) than with any clip search.
protect_sigma None, tail_weight 0 and clip_max_bits 8 make the plain weight-MSE search.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16
from .grid import group_absmax, quantize_with_scales

DEFAULT_GRID = 41  # ratios 1.0, 0.995, ..., 0.80
DEFAULT_MIN_RATIO = 0.80
DEFAULT_PROTECT_SIGMA = 6.0  # see the module docstring; None: no weight protected
DEFAULT_TAIL_WEIGHT = 1.0  # see the module docstring; 0: every weight's squared error counts alike
DEFAULT_CLIP_MAX_BITS = 6  # widths above this are never clipped


def clip_ratios(grid: int | Sequence[float] | None = None, min_ratio: float = DEFAULT_MIN_RATIO) -> list[float]:
    """The candidate ratios: an explicit list, or `grid` evenly spaced values from 1.0 down to `min_ratio`."""
    if grid is None:
        grid = DEFAULT_GRID
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if grid < 1:
            raise QpackInputError(f"gptq_lite: grid must count at least one ratio, got {grid}")
        if not 0.0 < min_ratio <= 1.0:
            raise QpackInputError(f"gptq_lite: min_ratio must be in (0, 1], got {min_ratio}")
        if grid == 1:
            return [1.0]
        return [float(x) for x in np.linspace(1.0, min_ratio, int(grid))]
    try:
        ratios = [float(r) for r in grid]
    except (TypeError, ValueError):
        raise QpackInputError(f"gptq_lite: grid must be a count or a list of ratios, got {grid!r}") from None
    if not ratios or not all(0.0 < r <= 1.5 for r in ratios):
        raise QpackInputError(f"gptq_lite: clip ratios must be in (0, 1.5], got {ratios}")
    return ratios


def _expand(s: torch.Tensor, group_size: int | None, cols: int) -> torch.Tensor:
    return s.repeat_interleave(group_size, dim=1)[:, :cols] if group_size else s


def _group_sum(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Sum of x per row (rows, 1) or per row and column group (rows, n_groups)."""
    if not group_size:
        return x.sum(dim=1, keepdim=True)
    pad = (-x.shape[1]) % group_size
    return torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, group_size).sum(dim=2)


def protected_mask(w: torch.Tensor, protect_sigma: float | None) -> torch.Tensor | None:
    """True where |w| > protect_sigma * rms(row): the weights a clip may not cut (None: nothing protected)."""
    if protect_sigma is None:
        return None
    return w.abs() > protect_sigma * w.square().mean(dim=1, keepdim=True).sqrt()


def search_clip_scales(w: torch.Tensor, bits: int, group_size: int | None, ratios: Sequence[float],
                       protect_sigma: float | None = None, tail_weight: float = 0.0) -> torch.Tensor:
    """fp16 scales (rows, n_groups) on w's device minimising the (tail-weighted) squared error of each row or
    group over the clip ratios, among those that keep every protected weight (see protected_mask) within half
    a step. The defaults (None, 0) are the plain MSE search (what qpack.quant.gptq uses)."""
    m = qmax(bits)
    absmax = group_absmax(w, group_size)
    guard = protected_mask(w, protect_sigma)
    omega = None
    if tail_weight > 0:
        omega = 1.0 + tail_weight * w.square() / w.square().mean(dim=1, keepdim=True).clamp_min(1e-30)
    best_err = torch.full_like(absmax, float("inf"))
    best = torch.zeros(absmax.shape, dtype=torch.float16, device=w.device)
    for i, r in enumerate(ratios):
        s16 = scales_fp16(absmax * r / m)
        s = _expand(s16.to(torch.float32), group_size, w.shape[1])
        q = torch.round(w / s).clamp_(-m, m)
        e = (q * s - w).abs_()
        err = _group_sum(e.square() if omega is None else e.square() * omega, group_size)
        if guard is not None and i > 0:  # the first (widest) ratio is always admissible
            cut = _group_sum(((e > s * 0.5 * (1 + 1e-4)) & guard).float(), group_size) > 0
            err = torch.where(cut, torch.full_like(err, float("inf")), err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s16, best)
    return best


@register_quantizer("gptq_lite")
class GPTQLite(Quantizer):
    """Symmetric intN with the clip ratio per row (or group) that minimises the weight MSE, outliers unclipped."""

    defaults: dict[str, Any] = {"grid": DEFAULT_GRID, "min_ratio": DEFAULT_MIN_RATIO,
                                "protect_sigma": DEFAULT_PROTECT_SIGMA, "tail_weight": DEFAULT_TAIL_WEIGHT,
                                "clip_max_bits": DEFAULT_CLIP_MAX_BITS}

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        ratios = clip_ratios(self.params["grid"], self.params["min_ratio"])
        ps = self.params["protect_sigma"]
        if ps is not None and (isinstance(ps, bool) or not isinstance(ps, (int, float)) or not np.isfinite(ps)
                               or ps < 0):
            raise QpackInputError(f"gptq_lite: protect_sigma must be a number >= 0 or None, got {ps!r}")
        ps = None if ps is None else float(ps)
        tw = self.params["tail_weight"]
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not np.isfinite(tw) or tw < 0:
            raise QpackInputError(f"gptq_lite: tail_weight must be a number >= 0, got {tw!r}")
        cmb = self.params["clip_max_bits"]
        if isinstance(cmb, bool) or not isinstance(cmb, int):
            raise QpackInputError(f"gptq_lite: clip_max_bits must be an integer, got {cmb!r}")
        if self.bits > cmb:
            ratios = [1.0]
        m = as_matrix(w)
        scales = search_clip_scales(m, self.bits, self.group_size, ratios, ps, float(tw))
        q = quantize_with_scales(m, scales, self.bits, self.group_size)
        params = {"grid": len(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios), "protect_sigma": ps,
                  "tail_weight": float(tw), "clip_max_bits": cmb}
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, self.group_size, params)
