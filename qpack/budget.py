"""The budget solver: pick one candidate per tensor so that total bytes fit and estimated loss is smallest.

This is a multiple-choice knapsack. Each tensor offers candidates (scheme, bits, codec...) with a measured
byte cost and an estimated loss increase. A dynamic programme over byte buckets (costs rounded up, so the
exact total never exceeds the capacity) finds the optimum up to bucket rounding; a greedy pass then spends the
rounding slack on whichever upgrades save the most loss per byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import BudgetError


@dataclass
class Candidate:
    """One way to store one tensor: its exact encoded bytes and the loss it is expected to add."""

    label: str
    nbytes: int
    loss: float
    data: Any = field(default=None, repr=False)  # opaque to the solver (e.g. the encoded entry)


@dataclass
class Choices:
    """All candidates for one tensor."""

    name: str
    candidates: list[Candidate]


def min_bytes(choices: Sequence[Choices]) -> int:
    """Smallest total reachable: every tensor at its cheapest candidate."""
    return sum(min(c.nbytes for c in ch.candidates) for ch in choices)


def solve(choices: Sequence[Choices], capacity: int) -> list[int]:
    """Index of the chosen candidate per tensor with sum(bytes) <= capacity and small total loss.

    Raises BudgetError (with the smallest reachable size) when even the cheapest choices do not fit.
    """
    for ch in choices:
        if not ch.candidates:
            raise BudgetError(f"tensor {ch.name!r} has no candidate encodings")
    floor = min_bytes(choices)
    if floor > capacity:
        raise BudgetError(
            f"budget too small: the smallest reachable size is {floor:,} bytes for the tensors, "
            f"but only {capacity:,} bytes are available for them",
            min_bytes=floor,
        )
    pick = _dp(choices, capacity)
    used = sum(ch.candidates[p].nbytes for ch, p in zip(choices, pick))
    return _fill(choices, pick, capacity - used)


def _dp(choices: Sequence[Choices], capacity: int, buckets: int = 20000) -> list[int]:
    """Dynamic programme over byte buckets; costs round up so the exact total never exceeds capacity."""
    scale = max(1.0, capacity / buckets)
    nb = int(capacity / scale)
    inf = np.inf
    dp = np.full(nb + 1, inf)
    dp[0] = 0.0
    back = np.zeros((len(choices), nb + 1), dtype=np.int32)
    for t, ch in enumerate(choices):
        new = np.full(nb + 1, inf)
        arg = np.zeros(nb + 1, dtype=np.int32)
        for i, c in enumerate(ch.candidates):
            w = math.ceil(c.nbytes / scale)
            if w > nb:
                continue
            cand = np.full(nb + 1, inf)
            cand[w:] = dp[: nb + 1 - w] + c.loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        dp = new
        back[t] = arg
    if not np.isfinite(dp).any():
        # Rounding made the cheapest combination look too big; fall back to the cheapest choices.
        return [min(range(len(ch.candidates)), key=lambda i: ch.candidates[i].nbytes) for ch in choices]
    b = int(np.argmin(dp))
    pick = [0] * len(choices)
    for t in range(len(choices) - 1, -1, -1):
        i = int(back[t, b])
        pick[t] = i
        b -= math.ceil(choices[t].candidates[i].nbytes / scale)
    return pick


def _fill(choices: Sequence[Choices], pick: list[int], headroom: int) -> list[int]:
    """Spend leftover bytes on the upgrades (any candidate, hull or not) with the best loss saved per byte."""
    pick = list(pick)
    while True:
        best = None
        for t, ch in enumerate(choices):
            cur = ch.candidates[pick[t]]
            for i, c in enumerate(ch.candidates):
                extra = c.nbytes - cur.nbytes
                saved = cur.loss - c.loss
                if saved <= 0 or extra > headroom:
                    continue
                score = saved / max(extra, 1)
                if best is None or score > best[0]:
                    best = (score, t, i, extra)
        if best is None:
            return pick
        _, t, i, extra = best
        pick[t] = i
        headroom -= extra
