"""Rate-aware candidates for one tensor: the uniform quantizer at a geometric grid of steps."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QpackInputError
from ..quant.base import Quantized, make_quantizer


def step_grid(lo: float = 0.03, hi: float = 4.0, per_octave: int = 4) -> list[float]:
    """Steps (in standard deviations) from lo to hi, `per_octave` per doubling."""
    if not 0 < lo < hi or per_octave < 1:
        raise QpackInputError(f"step grid needs 0 < lo < hi and per_octave >= 1, got {lo}, {hi}, {per_octave}")
    n = int(np.floor(np.log2(hi / lo) * per_octave)) + 1
    return [float(lo * 2 ** (i / per_octave)) for i in range(n)]


def rate_candidates(w: torch.Tensor, h: torch.Tensor | None, steps: list[float], rdo: float = 0.0,
                    rows: str = "flat", bits: int = 8, gptq: bool = True) -> list[tuple[str, Quantized]]:
    """(label, Quantized) per step: uniform codes at `bits`, GPTQ on the grid when `h` is given and `gptq`,
    RDO rounding when `rdo` > 0."""
    from ..quant.base import as_matrix
    from ..quant.gptq import GPTQ

    prepared = GPTQ(as_matrix(w), h) if (gptq and h is not None) else None  # one Cholesky for every step
    out = []
    for step in steps:
        q = make_quantizer("uniform", bits, step=step, rdo=rdo, rows=rows).quantize_prepared(w, prepared)
        out.append((f"uniform/step{step:.4g}" + (f"/rdo{rdo:g}" if rdo else ""), q))
    return out
