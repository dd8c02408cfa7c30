"""The budget solver against brute force on small random problems."""
import itertools
import random

import pytest

from qpack.budget import Candidate, Choices, min_bytes, solve
from qpack.errors import BudgetError


def _problem(rng, n_tensors, n_cands):
    out = []
    for t in range(n_tensors):
        cands = []
        for i in range(n_cands):
            nbytes = rng.randint(10, 400)
            loss = rng.uniform(0, 100) / (1 + nbytes / 50)
            cands.append(Candidate(f"c{i}", nbytes, loss))
        out.append(Choices(f"t{t}", cands))
    return out


def _brute(choices, capacity):
    best = None
    for combo in itertools.product(*[range(len(c.candidates)) for c in choices]):
        b = sum(ch.candidates[i].nbytes for ch, i in zip(choices, combo))
        if b > capacity:
            continue
        loss = sum(ch.candidates[i].loss for ch, i in zip(choices, combo))
        if best is None or loss < best:
            best = loss
    return best


def test_solution_fits_and_is_near_optimal():
    rng = random.Random(0)
    for trial in range(60):
        choices = _problem(rng, 4, 4)
        lo = min_bytes(choices)
        hi = sum(max(c.nbytes for c in ch.candidates) for ch in choices)
        capacity = rng.randint(lo, hi)
        pick = solve(choices, capacity)
        used = sum(ch.candidates[i].nbytes for ch, i in zip(choices, pick))
        assert used <= capacity
        loss = sum(ch.candidates[i].loss for ch, i in zip(choices, pick))
        opt = _brute(choices, capacity)
        # Below 20,000 bytes the buckets are single bytes, so the programme is exact.
        assert loss == pytest.approx(opt, rel=1e-12, abs=1e-12)


def test_unlimited_budget_picks_lowest_loss():
    rng = random.Random(1)
    choices = _problem(rng, 5, 5)
    pick = solve(choices, 10**9)
    for ch, i in zip(choices, pick):
        assert ch.candidates[i].loss == min(c.loss for c in ch.candidates)


def test_impossible_budget_states_minimum():
    choices = [Choices("a", [Candidate("x", 100, 1.0), Candidate("y", 50, 2.0)]),
               Choices("b", [Candidate("x", 70, 1.0)])]
    with pytest.raises(BudgetError) as e:
        solve(choices, 119)
    assert e.value.min_bytes == 120
    assert "120" in str(e.value)
    assert solve(choices, 120) == [1, 0]


def test_large_capacity_buckets_never_overflow():
    rng = random.Random(2)
    choices = []
    for t in range(40):
        base = rng.randint(50_000, 400_000)
        choices.append(Choices(f"t{t}", [Candidate(f"b{b}", base * b // 8 + rng.randint(0, 999), 4.0 ** (-b) * base)
                                          for b in range(2, 9)]))
    lo, hi = min_bytes(choices), sum(max(c.nbytes for c in ch.candidates) for ch in choices)
    for capacity in (lo, (lo + hi) // 2, hi - 1):
        pick = solve(choices, capacity)
        used = sum(ch.candidates[i].nbytes for ch, i in zip(choices, pick))
        assert used <= capacity
        # Bucket rounding leaves little slack: within 1% of the capacity (when above the floor).
        if capacity > lo:
            assert used >= 0.99 * capacity
