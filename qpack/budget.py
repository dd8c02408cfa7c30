"""The budget, all of it: the never-over guarantee and the choice of one candidate per tensor.

`solve` is a multiple-choice knapsack. Each tensor offers candidates (scheme, bits, codec...) with a measured
byte cost and an estimated loss increase. A dynamic programme over byte buckets (costs rounded up, so the
exact total never exceeds the capacity) finds the optimum up to bucket rounding; a greedy pass then spends the
rounding slack on whichever upgrades save the most loss per byte.

`check_floor` refuses a budget below a quick estimate of the smallest reachable size, before any expensive
quantization. `realize_lazily` turns cheap estimates of every candidate into real (measured) candidates only
where the solver reaches for them. `fit` builds the artifact for a choice, measures it, and re-solves with the
measured overhead (manifest, framing, code, LQER factors) until the file fits: it never returns bytes over the
budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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


# ------------------------------------------------------------------------------------------ the guarantee

#: A budget below this share of the estimated floor is refused before quantizing (the estimate prices every
#: block with round-to-nearest at the fewest bits, which real schemes rarely undercut by more than a few %).
FLOOR_MARGIN = 0.9
MAX_FITS = 8


@dataclass
class Fit:
    """The chosen candidates, the artifact built from them, and its total size (artifact + code)."""

    pick: list[int]
    blob: bytes
    total: int
    extra: Any = None  # whatever the build returned beside the bytes (compress: the LQER entries)


def check_floor(budget: int, estimate: int) -> None:
    """Refuse `budget` early when it is clearly below `estimate`, the quick floor estimate in bytes."""
    if budget < FLOOR_MARGIN * estimate:
        raise BudgetError(
            f"budget {budget:,} bytes is below the smallest reachable size, about {estimate:,} bytes "
            f"(every tensor at its fewest bits, estimated before quantizing); raise --budget",
            min_bytes=estimate,
        )


def cheapest(choices: Sequence[Choices]) -> list[int]:
    """Index of the smallest candidate per tensor (ties: the first)."""
    return [min(range(len(ch.candidates)), key=lambda i: (ch.candidates[i].nbytes, i)) for ch in choices]


def fit(choices: Sequence[Choices], budget: int | None, code_bytes: int,
        build: Callable[[list[int]], tuple[bytes, Any]]) -> Fit:
    """Choose, build and measure until the artifact plus `code_bytes` fits `budget` (None: no budget, every
    tensor at its cheapest candidate). Raises BudgetError, stating the smallest size, when nothing fits."""
    pick = cheapest(choices)
    blob, extra = build(pick)
    total = len(blob) + code_bytes
    if budget is None:
        return Fit(pick, blob, total, extra)
    if total > budget:  # the cheapest build is the exact smallest reachable size
        raise BudgetError(
            f"budget {budget:,} bytes is below the smallest reachable size, {total:,} bytes "
            f"({code_bytes:,} of them code, every tensor at its fewest bits); raise --budget",
            min_bytes=total,
        )
    best = Fit(pick, blob, total, extra)
    slack = max(64, budget // 500)
    for attempt in range(MAX_FITS):
        # Bytes outside the solver's view: manifest, header, trailer, code, LQER factors; measured, not guessed.
        solved = sum(ch.candidates[i].nbytes for ch, i in zip(choices, pick))
        capacity = budget - (total - solved) - 32 * attempt
        new_pick = solve(choices, max(capacity, min_bytes(choices)))
        if new_pick == pick:
            break
        pick = new_pick
        blob, extra = build(pick)
        total = len(blob) + code_bytes
        if best.total < total <= budget:
            best = Fit(pick, blob, total, extra)
        if budget - slack <= total <= budget:
            break
    if best.total > budget:  # unreachable by construction; the last line of the guarantee
        raise BudgetError(f"internal: artifact of {best.total:,} bytes exceeds the budget {budget:,}",
                          min_bytes=best.total)
    return best


def realize_lazily(proxies: Sequence[Choices], realized: dict[str, dict[int, Candidate]],
                   realize: Callable[[str, int], None], capacity: int, rounds: int = 6) -> list[Choices]:
    """Real candidates, made only where the solver reaches for them.

    `proxies[t].candidates[i]` estimates candidate i of tensor t; `realized[name][i]` holds the real ones
    (`realize(name, i)` adds one, and may add others). Each round solves on real candidates where they exist
    and estimates elsewhere (scaled by the real/estimate ratio seen on that tensor), then realizes what was
    picked, until every pick is real. Returns, per tensor, only the real candidates."""
    for _ in range(rounds):
        mixed = [Choices(p.name, _mixed(p.candidates, realized.get(p.name, {}))) for p in proxies]
        pick = solve(mixed, max(capacity, min_bytes(mixed)))
        missing = [(p.name, i) for p, i in zip(proxies, pick) if i not in realized.get(p.name, {})]
        if not missing:
            break
        for name, i in missing:
            if i not in realized.get(name, {}):  # realizing one block may realize its siblings too
                realize(name, i)
    out = []
    for p in proxies:
        got = realized.get(p.name, {})
        if not got:
            realize(p.name, cheapest([p])[0])
            got = realized[p.name]
        out.append(Choices(p.name, [got[i] for i in sorted(got)]))
    return out


def _mixed(estimates: Sequence[Candidate], real: Mapping[int, Candidate]) -> list[Candidate]:
    """Real candidates where known; elsewhere the estimate scaled by the real/estimate ratios (bytes, loss) of
    the nearest real candidate of this tensor (neighbouring widths err alike)."""
    out = []
    for i, e in enumerate(estimates):
        if i in real:
            out.append(real[i])
            continue
        near = min(real, key=lambda j: (abs(j - i), j), default=None)
        if near is None or estimates[near].nbytes <= 0:
            out.append(e)
            continue
        size = real[near].nbytes / estimates[near].nbytes
        loss = real[near].loss / estimates[near].loss if estimates[near].loss > 0 and real[near].loss > 0 else 1.0
        out.append(Candidate(e.label, max(1, math.ceil(e.nbytes * size)), e.loss * loss, e.data))
    return out
