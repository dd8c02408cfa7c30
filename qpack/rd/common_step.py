"""One step for every block: SDClip's single k, on qpack's grid of uniform steps, without calibration data.

Without data a loss proxy's trades between blocks are guesses, and on a pretrained LM they measured worse than
no trade at all (benchmarks/datafree: SmolLM2 at SDClip's bytes, one common step in units of each row's std
beat the solver's allocation under every data-free loss). So data-free loss "common" gives every block the same
position on the step grid (`offsets` move a tensor finer, e.g. the embedding), the finest that fits by the
estimated bytes, and lets the solver choose per block only between that step and the next two finer ones, which
is what fills the budget's last bytes.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from ..budget import Candidate, Choices, realize_lazily


def grid_offset(step_divisor: float, steps: Sequence[float]) -> int:
    """How many positions finer a tensor sits on an ascending geometric step grid to divide its step by
    `step_divisor` (>= 1), rounded to the grid."""
    if step_divisor <= 1.0 or len(steps) < 2:
        return 0
    per_octave = 1.0 / math.log2(steps[1] / steps[0])
    return int(round(per_octave * math.log2(step_divisor)))


def common_position(bytes_at: Mapping[str, Sequence[int]], offsets: Mapping[str, int], capacity: int) -> int:
    """The finest grid position p such that the blocks, each at step p - offsets[block] (clamped to its grid),
    fit in `capacity` by their estimated bytes; the coarsest position when none fits. bytes_at[block][j] is the
    estimate at step j of an ascending grid (finer first, so bytes fall as j grows)."""
    n = min(len(b) for b in bytes_at.values())

    def total(p: int) -> int:
        return sum(b[min(max(p - offsets.get(k, 0), 0), n - 1)] for k, b in bytes_at.items())

    for p in range(n):
        if total(p) <= capacity:
            return p
    return n - 1


def allowed_positions(p: int, offset: int, n: int, finer: int = 2) -> list[int]:
    """The grid positions one block may take around common position p: its own step and the `finer` next finer
    ones (two: the manifest's size is guessed high before the first build, so one finer step can leave a small
    model's budget a few percent short)."""
    mine = min(max(p - offset, 0), n - 1)
    return sorted({max(mine - k, 0) for k in range(finer + 1)})


def realize_common(proxies: Sequence[Choices], step_index: Mapping[str, Sequence[int]], offsets: Mapping[str, int],
                   realized: dict[str, dict[int, Candidate]], realize: Callable[[str, int], None],
                   capacity: int) -> list[Choices]:
    """Real candidates per block, restricted to the common step and the next finer ones (see module doc).

    `step_index[block]` lists the menu indices of the block's uniform steps, finest first; `realize(block, i)`
    and `realized[block][i]` use menu indices, as qpack.budget.realize_lazily does."""
    est = {ch.name: [ch.candidates[i].nbytes for i in step_index[ch.name]] for ch in proxies}
    n = min(len(v) for v in step_index.values())
    p = common_position(est, offsets, capacity)
    allowed = {ch.name: [step_index[ch.name][j] for j in allowed_positions(p, offsets.get(ch.name, 0), n)]
               for ch in proxies}
    local: dict[str, dict[int, Candidate]] = {}

    def sync() -> None:  # realizing one block realizes its siblings: copy every real one into the local view
        for name, idx in allowed.items():
            for k, i in enumerate(idx):
                if i in realized.get(name, {}):
                    local.setdefault(name, {})[k] = realized[name][i]

    def realize_local(name: str, k: int) -> None:
        realize(name, allowed[name][k])
        sync()

    sync()
    restricted = [Choices(ch.name, [ch.candidates[i] for i in allowed[ch.name]]) for ch in proxies]
    return realize_lazily(restricted, local, realize_local, capacity)
