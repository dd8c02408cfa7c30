"""Round-to-nearest: scale = max|w| / qmax per row (or group), q = round(w / scale)."""
from __future__ import annotations

import torch

from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16
from .grid import group_absmax, quantize_with_scales


@register_quantizer("rtn")
class RoundToNearest(Quantizer):
    """Symmetric absmax scaling and rounding; no data, no search."""

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        m = as_matrix(w)
        scales = scales_fp16(group_absmax(m, self.group_size) / qmax(self.bits))
        q = quantize_with_scales(m, scales, self.bits, self.group_size)
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, self.group_size, {})
