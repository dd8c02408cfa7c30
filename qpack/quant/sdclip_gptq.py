"""GPTQ on an SDClip grid: the parameter-golf records' quantizer (2026-04-05 onward), as a scheme.

The per-row scale is fixed before the sweep at k * std(row) / qmax (std with Bessel's correction, of the
weight as given, fp16), and GPTQ (act-order, lazy blocks of 128, 1% damping) chooses the codes on that grid.
With `lam` > 0 the clip follows the Hessian-aware variant (2026-04-06): c_i = k * sigma_i * (1 + lam*(r_i - 1)),
where r_i = mean_j |W_ij| * d_j / mean(d) over the damped Hessian diagonal d, normalised to mean 1 over rows:
rows that feed the loss more get a slightly wider clip.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16
from .gptq import GPTQ

RECORD_K = 12.85  # the records' k for int6 matrices
RECORD_LAMBDA = 0.175  # the Hessian-aware SDClip strength of the 2026-04-06 record


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0), else QpackInputError naming the parameter."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)
    if not ok or (value < 0 if allow_zero else value <= 0):
        want = "a number >= 0" if allow_zero else "a positive number"
        raise QpackInputError(f"sdclip_gptq: {name} must be {want}, got {value!r}")
    return float(value)


def row_importance(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """r_i of Hessian-aware SDClip: Hessian-diagonal-weighted mean |W_ij| per row, mean 1 over rows."""
    H = H.to(torch.float32).clone()
    d = torch.diagonal(H).clone()
    d[d == 0] = 1.0  # dead inputs get unit curvature, as GPTQ gives them
    d = d + percdamp * d.mean()
    d = d.clamp_min(1e-8)
    r = (W.abs() * (d / d.mean()).unsqueeze(0)).mean(dim=1)
    return r / r.mean()


def sdclip_scales(W: torch.Tensor, k: float, bits: int, H: torch.Tensor | None = None, lam: float = 0.0,
                  percdamp: float = 0.01) -> torch.Tensor:
    """fp16 per-row scales (rows, 1): k * std(row) * (1 + lam * (r_i - 1)) / qmax(bits)."""
    c = float(k) * W.std(dim=1, correction=1)
    if lam > 0:
        if H is None:
            raise QpackInputError("sdclip_gptq: lam > 0 needs the Hessian")
        c = c * (1.0 + lam * (row_importance(W, H, percdamp) - 1.0))
    return scales_fp16((c / qmax(bits)).unsqueeze(1))


@register_quantizer("sdclip_gptq")
class SDClipGPTQ(Quantizer):
    """GPTQ whose grid is SDClip's: scale = k * std(row) / qmax; optional Hessian-aware clip (lam)."""

    needs_hessian = True
    defaults: dict[str, Any] = {
        "k": RECORD_K,  # clip in row standard deviations
        "lam": 0.0,  # Hessian-aware SDClip strength (the 2026-04-06 record: 0.175)
        "percdamp": 0.01,
        "blocksize": 128,
    }

    def __init__(self, bits: int, group_size: int | None = None, **params: Any):
        super().__init__(bits, group_size, **params)
        if group_size is not None:
            raise QpackInputError("sdclip_gptq: scales are per row (the records' layout); group_size must be None")
        self.params["k"] = _positive("k", self.params["k"])
        self.params["lam"] = _positive("lam", self.params["lam"], allow_zero=True)
        self.params["percdamp"] = _positive("percdamp", self.params["percdamp"])
        if not isinstance(self.params["blocksize"], int) or self.params["blocksize"] < 1:
            raise QpackInputError(f"sdclip_gptq: blocksize must be a positive integer, got {self.params['blocksize']!r}")

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        if hessian is None:
            raise QpackInputError("sdclip_gptq needs the Hessian of the layer's input (compress with --calib)")
        p = self.params
        W = as_matrix(w)
        scales = sdclip_scales(W, p["k"], self.bits, hessian, p["lam"], p["percdamp"])
        q, info = GPTQ(W, hessian, percdamp=p["percdamp"]).solve(scales, self.bits, None, p["blocksize"])
        params = {"k": p["k"], "lam": p["lam"], **info}
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, None, params)
