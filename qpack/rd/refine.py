"""Real candidates next to the solver's picks, so that the final fit can fill the budget to within a few bytes.

Lazy realization (qpack.budget.realize_lazily) leaves each block with only the few candidates the solver reached
for; when those are far apart in bytes the measured fit cannot spend the last percent of the budget. A grid of
steps is ordered by rate, so the steps next to each pick are the finest moves there are: realize those once.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..budget import Candidate, Choices, min_bytes, solve


def realize_neighbours(choices: Sequence[Choices], realized: dict[str, dict[int, Candidate]],
                       realize: Callable[[str, int], None], capacity: int,
                       movable: Callable[[str, int], bool]) -> list[Choices]:
    """Solve on the real candidates, realize menu items i-1 and i+1 of each block's pick i where `movable(name, j)`
    says they are neighbours on a grid, and return every block's real candidates (menu order)."""
    pick = solve(choices, max(capacity, min_bytes(choices)))
    for ch, p in zip(choices, pick):
        i = sorted(realized[ch.name])[p]
        for j in (i - 1, i + 1):
            if movable(ch.name, j) and j not in realized[ch.name]:  # realizing one block realizes its siblings
                realize(ch.name, j)
    return [Choices(ch.name, [realized[ch.name][i] for i in sorted(realized[ch.name])]) for ch in choices]
