"""GPTQ-lite: per-row (or per-group) clip ratio chosen from a grid by the weight MSE of the dequantized values.

For every candidate ratio r the scale is r * absmax / qmax, rounded to fp16 exactly as it will be stored; each
row (or each row's group, when group_size is set: groups have their own scale, so choosing per group minimises
the row's MSE too) keeps the ratio with the smallest squared error. Ties keep the earlier, wider ratio.
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


def search_clip_scales(w: torch.Tensor, bits: int, group_size: int | None, ratios: Sequence[float]) -> torch.Tensor:
    """fp16 scales (rows, n_groups) on w's device minimising the squared error of each row or group over the
    clip ratios."""
    m = qmax(bits)
    absmax = group_absmax(w, group_size)
    best_err = torch.full_like(absmax, float("inf"))
    best = torch.zeros(absmax.shape, dtype=torch.float16, device=w.device)
    for r in ratios:
        s16 = scales_fp16(absmax * r / m)
        s = _expand(s16.to(torch.float32), group_size, w.shape[1])
        q = torch.round(w / s).clamp_(-m, m)
        err = _group_sum((q * s - w).square_(), group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s16, best)
    return best


@register_quantizer("gptq_lite")
class GPTQLite(Quantizer):
    """Symmetric intN with the clip ratio per row (or group) that minimises the weight MSE."""

    defaults: dict[str, Any] = {"grid": DEFAULT_GRID, "min_ratio": DEFAULT_MIN_RATIO}

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        ratios = clip_ratios(self.params["grid"], self.params["min_ratio"])
        m = as_matrix(w)
        scales = search_clip_scales(m, self.bits, self.group_size, ratios)
        q = quantize_with_scales(m, scales, self.bits, self.group_size)
        params = {"grid": len(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, self.group_size, params)
