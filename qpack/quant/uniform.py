"""Uniform: a step from a continuum instead of a width, for entropy-coded codes.

With an entropy coder the rate knob is the step, not the number of levels: codes are stored at `bits` (8 by
default, so +-127) and a step of `step` standard deviations (of the whole tensor with rows="flat", of each row
with rows="std") sets the rate. Nothing clips: a row whose largest weight needs more than qmax levels gets the
step absmax/qmax instead. With a Hessian the codes come from GPTQ on that grid; `rdo` > 0 turns on
rate-distortion-optimised rounding (qpack.rd.grid_gptq), with code lengths from the codes' own histogram,
re-estimated `iters` times.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16

ROW_MODES = ("flat", "std")


def _number(name: str, value: Any, allow_zero: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)
    if not ok or (value < 0 if allow_zero else value <= 0):
        raise QpackInputError(f"uniform: {name} must be {'a number >= 0' if allow_zero else 'a positive number'}, "
                              f"got {value!r}")
    return float(value)


def uniform_scales(W: torch.Tensor, step: float, bits: int, rows: str = "flat") -> torch.Tensor:
    """Per-row steps (rows, 1) as fp16-exact float32: step * std, widened where a row would clip."""
    std = W.std(dim=1, correction=0, keepdim=True) if rows == "std" else W.std(correction=0).expand(W.shape[0], 1)
    s = step * std
    s = torch.maximum(s, W.abs().amax(dim=1, keepdim=True) / qmax(bits))
    return scales_fp16(s).to(torch.float32)


@register_quantizer("uniform")
class Uniform(Quantizer):
    """Codes q * step with a continuous step (in standard deviations); GPTQ and RDO rounding on that grid."""

    defaults: dict[str, Any] = {
        "step": 0.25,  # grid step in standard deviations (the rate knob)
        "rows": "flat",  # "flat": one step per tensor (rows widen only to avoid clipping); "std": per-row std
        "rdo": 0.0,  # Lagrange multiplier of RDO rounding, in squared steps per bit (0: nearest level)
        "iters": 2,  # RDO passes, each with code lengths from the previous pass's histogram
        "percdamp": 0.01,
        "blocksize": 128,
    }

    def __init__(self, bits: int, group_size: int | None = None, **params: Any):
        super().__init__(bits, group_size, **params)
        p = self.params
        if group_size is not None:
            raise QpackInputError("uniform: steps are per row; group_size must be None")
        p["step"] = _number("step", p["step"], False)
        p["rdo"] = _number("rdo", p["rdo"], True)
        p["percdamp"] = _number("percdamp", p["percdamp"], False)
        if p["rows"] not in ROW_MODES:
            raise QpackInputError(f"uniform: rows must be one of {', '.join(ROW_MODES)}, got {p['rows']!r}")
        for key in ("iters", "blocksize"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise QpackInputError(f"uniform: {key} must be a positive integer, got {p[key]!r}")

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        from .gptq import GPTQ

        prepared = None if hessian is None else GPTQ(as_matrix(w), hessian, percdamp=self.params["percdamp"])
        return self.quantize_prepared(w, prepared)

    def quantize_prepared(self, w: torch.Tensor, prepared=None) -> Quantized:
        """quantize() with the GPTQ preparation of w (qpack.quant.gptq.GPTQ) done once by the caller, or None
        for independent rounding: a grid of steps then costs one Cholesky per matrix."""
        from ..rd.grid_gptq import code_lengths, gptq_grid

        p = self.params
        W = as_matrix(w)
        m = qmax(self.bits)
        S = uniform_scales(W, p["step"], self.bits, p["rows"])
        q = gptq_grid(W, None, S, self.bits, 0.0, None, p["percdamp"], p["blocksize"], prepared)
        if p["rdo"] > 0:
            for _ in range(p["iters"]):
                q = gptq_grid(W, None, S, self.bits, p["rdo"], code_lengths(q, m), p["percdamp"], p["blocksize"],
                              prepared)
        params = {"step": p["step"], "rows": p["rows"], "rdo": p["rdo"], "gptq": prepared is not None}
        return Quantized(q, S.to(torch.float16), tuple(w.shape), self.bits, self.name, None, params)
