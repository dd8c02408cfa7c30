"""SDClip: clip = k * std(row) (or per group), scale = clip / qmax, q = round(w / scale) clamped.

k sets the step size in units of the row's standard deviation, so it is a rate knob: the parameter-golf
records used k = 12.85 at int6 (step 0.41 std, codes far inside the range, cheap to entropy-code).
Default k when none is given (see DEFAULT_K):
  * bits >= 6: k = 12.85, so a wider code only makes the step finer (int8: 0.10 std);
  * bits 4, 5: k = 12.85 * qmax / 31, the records' int6 step (0.41 std) with a smaller range;
  * bits 2, 3: the clip that minimises the MSE of a unit Gaussian (1.22, 1.95), since the int6 step would
    clip most of the row there.
The step therefore never grows as bits grow.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16
from .grid import quantize_with_scales

RECORD_K = 12.85  # the records' k at int6
DEFAULT_K = {2: 1.22, 3: 1.95, 4: RECORD_K * 7 / 31, 5: RECORD_K * 15 / 31, 6: RECORD_K, 7: RECORD_K, 8: RECORD_K}


def group_std(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Population standard deviation per row (rows, 1) or per row and group (rows, n_groups); a short last
    group uses only its own columns."""
    if not group_size:
        return w.std(dim=1, correction=0, keepdim=True)
    rows, cols = w.shape
    out = []
    for g0 in range(0, cols, group_size):
        out.append(w[:, g0 : g0 + group_size].std(dim=1, correction=0, keepdim=True))
    return torch.cat(out, dim=1)


@register_quantizer("sdclip")
class SDClip(Quantizer):
    """Symmetric intN with a clip of k standard deviations per row (or group)."""

    defaults: dict[str, Any] = {"k": None}

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        k = self.params["k"]
        k = DEFAULT_K[self.bits] if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not np.isfinite(k) or k <= 0:
            raise QpackInputError(f"sdclip: k must be a positive number, got {k!r}")
        m = as_matrix(w)
        scales = scales_fp16(group_std(m, self.group_size) * float(k) / qmax(self.bits))
        q = quantize_with_scales(m, scales, self.bits, self.group_size)
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, self.group_size, {"k": float(k)})
