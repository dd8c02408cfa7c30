"""One step for every block: SDClip's single k, on qpack's continuum of uniform steps, without calibration data.

Without data a loss proxy's trades between blocks are guesses, and on a pretrained LM they measured worse than
no trade at all (benchmarks/datafree: SmolLM2 at SDClip's bytes, one common step in units of each row's std beat
the solver's allocation under every data-free loss, and the solver's fill between grid steps, which kept
ffn_down a step coarser, lost to it too). So data-free loss "common" bisects one step s, in units of each row's
std (a tensor's divided by its divisor, e.g. the embedding's), to the largest estimated size that fits; each
block's menu is then s and FILL_STEPS finer steps 1/FILL_PER_OCTAVE octave apart, and the solver fills the
budget's last bytes from those, so no block strays more than FILL_STEPS / FILL_PER_OCTAVE octave from s.
"""
from __future__ import annotations

import math
from typing import Callable

FILL_PER_OCTAVE = 32
FILL_STEPS = 2


def bisect_step(size_at: Callable[[float], int], capacity: int, lo: float, hi: float, iters: int = 14) -> float:
    """The smallest step in [lo, hi] (to 1/2^iters of the log range) whose size_at(step) <= capacity; size_at
    must fall as the step grows. hi when even hi does not fit, lo when lo already does."""
    if size_at(lo) <= capacity:
        return lo
    if size_at(hi) > capacity:
        return hi
    a, b = math.log(lo), math.log(hi)  # size_at(e^a) > capacity >= size_at(e^b)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if size_at(math.exp(mid)) <= capacity:
            b = mid
        else:
            a = mid
    return math.exp(b)


def fill_steps(step: float) -> list[float]:
    """A block's menu around the common step: step, then FILL_STEPS finer ones (finest first)."""
    return [step * 2 ** (-k / FILL_PER_OCTAVE) for k in range(FILL_STEPS, -1, -1)]
