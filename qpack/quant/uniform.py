"""Uniform: a step from a continuum instead of a width, for entropy-coded codes.

With an entropy coder the rate knob is the step, not the number of levels: `bits` (8 by default, so +-127; up to
MAX_CODE_BITS = 12) caps the codes' width, the codes are stored at the narrowest width of at least 8 (at most
`bits`) that holds them, and a step of `step` standard deviations (of the whole tensor with rows="flat", of each row
with rows="std") sets the rate. rows="weighted" gives row r the flat step times (g_r / G)^-1/2, g_r a per-row
sensitivity (e.g. the row's mean Fisher) and G their geometric mean: with a loss sum_r g_r * err_r^2, that is the
step profile of equal marginal loss per bit inside the tensor (high-rate theory), at the flat step's mean rate. Nothing clips: a row whose largest weight needs more than qmax levels gets the
step absmax/qmax instead. With a Hessian the codes come from GPTQ on that grid; `rdo` > 0 turns on
rate-distortion-optimised rounding (qpack.rd.grid_gptq), with code lengths from the codes' own histogram,
re-estimated `iters` times.

A per-column sensitivity g_j (`col_weight`, data-free only) makes the grid column-scaled: column j is quantized on a
step (g_j / G)^-1/2 times its row's, stored as one fp16 multiplier per column (Quantized.col_scale). compress gives
it to a tied embedding / output head from the gain of the norm before the head (qpack.quant.datafree.head_columns).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import QpackInputError
from .base import (MAX_CODE_BITS, Quantized, Quantizer, as_matrix, code_dtype, code_width, qmax, register_quantizer,
                   scales_fp16)

ROW_MODES = ("flat", "std", "weighted")
FACTOR_STEPS_PER_OCTAVE = 4
MAX_ROW_FACTOR = 8.0  # a weighted row's step stays within 1/8..8 of the flat step: a noisy g_r cannot starve a row


def _number(name: str, value: Any, allow_zero: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)
    if not ok or (value < 0 if allow_zero else value <= 0):
        raise QpackInputError(f"uniform: {name} must be {'a number >= 0' if allow_zero else 'a positive number'}, "
                              f"got {value!r}")
    return float(value)


def _balance(weight: torch.Tensor) -> torch.Tensor:
    """Step multipliers (g / geomean g)^-1/2 (float64, flat) for sensitivities g, within 1/8..8."""
    g = weight.detach().to(torch.float64).reshape(-1)
    floor = float(g.max()) * 1e-12 if float(g.max()) > 0 else 1.0
    g = g.clamp_min(floor)
    return (g.log().mean() - g.log()).mul(0.5).exp().clamp(1 / MAX_ROW_FACTOR, MAX_ROW_FACTOR)


def row_factors(row_weight: torch.Tensor) -> torch.Tensor:
    """(rows, 1) step multipliers (g_r / geomean g)^-1/2 for per-row sensitivities g_r, within 1/8..8, rounded to
    quarter octaves."""
    f = _balance(row_weight).reshape(-1, 1)
    # on a grid of quarter octaves: a tensor's scales then take a few dozen values that its codec stores in a few
    # bits each, instead of one fp16 per row (a 2^(1/8) mismatch costs a second-order sliver of the gain)
    return torch.exp2(torch.round(torch.log2(f) * FACTOR_STEPS_PER_OCTAVE) / FACTOR_STEPS_PER_OCTAVE).to(torch.float32)


def col_factors(col_weight: torch.Tensor) -> torch.Tensor:
    """(cols,) fp16-exact float32 column multipliers (g_j / geomean g)^-1/2 within 1/8..8 for per-column
    sensitivities g_j: the step profile of equal marginal loss per bit under a loss sum_j g_j * err_j^2."""
    return _balance(col_weight).to(torch.float16).to(torch.float32)


def uniform_scales(W: torch.Tensor, step: float, bits: int, rows: str = "flat",
                   row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row steps (rows, 1) as fp16-exact float32: step * std (times row_factors(row_weight) with
    rows="weighted"), widened where a row would clip."""
    std = W.std(dim=1, correction=0, keepdim=True) if rows == "std" else W.std(correction=0).expand(W.shape[0], 1)
    s = step * std
    if rows == "weighted":
        if row_weight is None or row_weight.numel() != W.shape[0]:
            raise QpackInputError(f"uniform: rows='weighted' needs one weight per row ({W.shape[0]}), got "
                                  f"{None if row_weight is None else row_weight.numel()}")
        s = s * row_factors(row_weight).to(s.device)
    top = W.abs().amax(dim=1, keepdim=True)
    s16 = scales_fp16(torch.maximum(s, top / qmax(bits))).to(torch.float32)
    if bits > 8:
        # fp16 rounding can leave a widened step up to 2^-11 short: at int8 that clips 0.06 of a level at most,
        # at 12 bits a whole one. Such a row takes the next fp16 step up instead.
        short = s16 * qmax(bits) < top
        h = s16.to(torch.float16)
        s16 = torch.where(short, torch.nextafter(h, torch.full_like(h, float("inf"))).to(torch.float32), s16)
    return s16


@register_quantizer("uniform")
class Uniform(Quantizer):
    """Codes q * step with a continuous step (in standard deviations); GPTQ and RDO rounding on that grid."""

    max_bits = MAX_CODE_BITS

    defaults: dict[str, Any] = {
        "step": 0.25,  # grid step in standard deviations (the rate knob)
        "rows": "flat",  # "flat": one step per tensor (rows widen only to avoid clipping); "std": per-row std;
        # "weighted": the flat step scaled per row by a sensitivity given to quantize (see row_factors)
        "rdo": 0.0,  # Lagrange multiplier of RDO rounding, in squared steps per bit (0: nearest level)
        "iters": 2,  # RDO passes, each with code lengths from the previous pass's histogram
        "cd": 0,  # coordinate-descent sweeps after GPTQ (qpack.quant.coord_descent; needs a Hessian)
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
        if isinstance(p["cd"], bool) or not isinstance(p["cd"], int) or p["cd"] < 0:
            raise QpackInputError(f"uniform: cd (coordinate-descent sweeps) must be an integer >= 0, got {p['cd']!r}")

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None,
                 row_weight: torch.Tensor | None = None, col_weight: torch.Tensor | None = None) -> Quantized:
        from .gptq import GPTQ

        prepared = None if hessian is None else GPTQ(as_matrix(w), hessian, percdamp=self.params["percdamp"])
        return self.quantize_prepared(w, prepared, row_weight, col_weight)

    def quantize_prepared(self, w: torch.Tensor, prepared=None, row_weight: torch.Tensor | None = None,
                          col_weight: torch.Tensor | None = None) -> Quantized:
        """quantize() with the GPTQ preparation of w (qpack.quant.gptq.GPTQ) done once by the caller, or None
        for independent rounding: a grid of steps then costs one Cholesky per matrix. `row_weight`: the per-row
        sensitivities of rows="weighted"; `col_weight`: per-column sensitivities for a column-scaled grid (no
        GPTQ: a Hessian already says which columns matter)."""
        from ..rd.grid_gptq import code_lengths, gptq_grid

        p = self.params
        W = as_matrix(w)
        col = None
        if col_weight is not None:
            if prepared is not None:
                raise QpackInputError("uniform: column weights are for rounding without a Hessian")
            if col_weight.numel() != W.shape[1]:
                raise QpackInputError(f"uniform: column weights need one per column ({W.shape[1]}), got "
                                      f"{col_weight.numel()}")
            col = col_factors(col_weight).to(W.device)
            W = W / col  # column j on a grid col[j] times finer or coarser; dequantization multiplies it back
        m = qmax(self.bits)
        S = uniform_scales(W, p["step"], self.bits, p["rows"], row_weight)
        q = gptq_grid(W, None, S, self.bits, 0.0, None, p["percdamp"], p["blocksize"], prepared)
        if p["rdo"] > 0:
            for _ in range(p["iters"]):
                q = gptq_grid(W, None, S, self.bits, p["rdo"], code_lengths(q, m), p["percdamp"], p["blocksize"],
                              prepared)
        params = {"step": p["step"], "rows": p["rows"], "rdo": p["rdo"], "gptq": prepared is not None}
        if p["cd"] and prepared is not None:
            from .coord_descent import CoordinateDescent

            lengths = code_lengths(q, m) if p["rdo"] > 0 else None
            q, info = CoordinateDescent(prepared).refine(q, S, m, p["cd"], p["rdo"], lengths)
            params.update(info)
        # past 8 bits only as wide as the codes need: a step every row holds in int8 gives the int8 artifact
        bits = self.bits if self.bits <= 8 else code_width(q, least=8)
        return Quantized(q.to(code_dtype(bits)), S.to(torch.float16), tuple(w.shape), bits, self.name, None, params,
                         None if col is None else col.to(torch.float16))
