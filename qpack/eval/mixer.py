"""An online Hedge mixture of the model with n-gram experts built only from tokens already scored.

Expert k of order n predicts with Witten-Bell interpolation down to uniform:
    p_n(x | ctx) = (c(ctx, x) + d(ctx) * p_{n-1}(x | shorter ctx)) / (c(ctx) + d(ctx)),  d = max(#distinct x after ctx, 1)
    p_0(x) = 1 / V
so every expert is a normalized distribution over the whole vocabulary, and so is any convex mixture of them.
Weights follow Hedge, w_k proportional to exp(-eta * L_k), where L_k is expert k's (optionally discounted) log loss
on the tokens scored so far; counts and losses are updated only after a token is scored.

`mix_nll` is the fast path (vectorized over the stream with grouped running counts); `OnlineMixer` is the
step-by-step reference that also exposes every full distribution, for tests and legality checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class MixerConfig:
    """Hedge mixer settings."""

    # Defaults from a 140-point grid on a held-out slice of the TRAIN split (the last 65,536 train tokens, which
    # cpu-smoke never trained on; benchmarks/eval/tune_mixer.py, tune_mixer.txt), never on val tokens. Short
    # memories let the n-grams take over in repetitive spans; plain cumulative Hedge (decay 1) only ever follows
    # the single best expert, and the unigram expert only costs weight.
    orders: tuple[int, ...] = (2, 3, 4, 5, 6)  # n-gram orders of the experts (1 = unigram)
    eta: float = 0.5  # Hedge learning rate on log loss in nats
    decay: float = 0.6  # per-token discount of past losses (1.0 = plain cumulative Hedge)

    def __post_init__(self):
        if not self.orders or any(int(n) != n or n < 1 or n > 16 for n in self.orders):
            raise ValueError(f"mixer orders must be integers in 1..16, got {self.orders}")
        if len(set(self.orders)) != len(self.orders):
            raise ValueError(f"mixer orders repeat: {self.orders}")
        if not self.eta > 0:
            raise ValueError(f"mixer eta must be positive, got {self.eta}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"mixer decay must be in (0, 1], got {self.decay}")


@dataclass
class MixResult:
    """Mixed per-token NLL plus diagnostics: each expert's total NLL and the final Hedge weights."""

    nll: np.ndarray
    expert_names: list[str]
    expert_nll: np.ndarray  # [K] total NLL in nats of each expert alone
    final_weights: np.ndarray  # [K]


# ---- fast path --------------------------------------------------------------------------------------------------

def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    n = sorted_keys.size
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.maximum.accumulate(np.where(is_start, np.arange(n), 0))


def running_count(keys: np.ndarray) -> np.ndarray:
    """For each i, how many j < i have keys[j] == keys[i]."""
    order = np.argsort(keys, kind="stable")
    rank = np.arange(keys.size) - _group_starts(keys[order])
    out = np.empty(keys.size, dtype=np.int64)
    out[order] = rank
    return out


def running_group_sum(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each i, the sum of values[j] over j < i with groups[j] == groups[i]."""
    order = np.argsort(groups, kind="stable")
    v = values[order].astype(np.int64)
    excl = np.cumsum(v) - v
    starts = _group_starts(groups[order])
    out = np.empty(groups.size, dtype=np.int64)
    out[order] = excl - excl[starts]
    return out


def ngram_probs(tokens: np.ndarray, vocab_size: int, orders: Sequence[int]) -> np.ndarray:
    """[N, len(orders)]: each n-gram expert's probability of target tokens[i+1], from targets before it only."""
    tokens = np.asarray(tokens, dtype=np.int64)
    x = tokens[1:]
    n = x.size
    top = max(orders)
    out = np.empty((n, len(orders)), dtype=np.float64)
    if n == 0:
        return out
    p = np.full(n, 1.0 / vocab_size)
    ctx = np.zeros(n, dtype=np.int64)  # dense id of the context of the current order; order 1 has one context
    pad = vocab_size  # stands for "before the stream"
    for order in range(1, top + 1):
        if order > 1:
            # extend each target's context by the token order-1 places before it (tokens[i + 1 - (order - 1)])
            pos = np.arange(n) + 2 - order
            prev = np.where(pos >= 0, tokens[np.clip(pos, 0, None)], pad)
            ctx = np.unique(ctx * (vocab_size + 1) + prev, return_inverse=True)[1].reshape(-1)
        key = ctx * (vocab_size + 1) + x
        c_key = running_count(key)
        c_ctx = running_count(ctx)
        distinct = running_group_sum(ctx, (c_key == 0).astype(np.int64))
        d = np.maximum(distinct, 1).astype(np.float64)
        p = (c_key + d * p) / (c_ctx + d)
        if order in orders:
            out[:, list(orders).index(order)] = p
    return out


def discounted_past_sum(losses: np.ndarray, decay: float) -> np.ndarray:
    """L[i] = sum_{j<i} decay^(i-1-j) * losses[j], row-wise over [N, K]; decay = 1 is the exclusive cumsum."""
    n = losses.shape[0]
    out = np.zeros_like(losses, dtype=np.float64)
    if n == 0:
        return out
    if decay == 1.0:
        out[1:] = np.cumsum(losses, axis=0)[:-1]
        return out
    # Blocks keep decay**-block finite; inside a block the recurrence becomes a scaled cumsum.
    block = max(1, min(4096, int(200.0 / -np.log10(decay))))
    carry = np.zeros(losses.shape[1])  # L at the block's first index
    for s in range(0, n, block):
        seg = losses[s:s + block]
        r = np.arange(seg.shape[0])
        inv = decay ** (-r.astype(np.float64))[:, None]
        inner = np.cumsum(seg * inv, axis=0) - seg * inv  # sum_{j<s+r} decay^-(j-s) l_j within the block
        out[s:s + block] = decay ** r[:, None] * carry + decay ** (r[:, None] - 1.0) * inner
        carry = decay ** seg.shape[0] * carry + decay ** (seg.shape[0] - 1.0) * (inner[-1] + seg[-1] * inv[-1])
    return out


def hedge_weights(losses: np.ndarray, eta: float, decay: float = 1.0) -> np.ndarray:
    """[N, K] Hedge weights before each token, from the experts' losses on the tokens before it."""
    z = -eta * discounted_past_sum(losses, decay)
    z -= z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def mix_nll(model_nll: np.ndarray, tokens: np.ndarray, vocab_size: int, config: MixerConfig = MixerConfig()) -> MixResult:
    """Mixed NLL per target of the stream `tokens` (targets tokens[1:]), given the model's NLL of each target."""
    model_nll = np.asarray(model_nll, dtype=np.float64)
    if model_nll.size != len(tokens) - 1:
        raise ValueError(f"{model_nll.size} model NLL values for {len(tokens) - 1} targets")
    probs = np.concatenate([np.exp(-model_nll)[:, None], ngram_probs(tokens, vocab_size, config.orders)], axis=1)
    losses = -np.log(probs)
    w = hedge_weights(losses, config.eta, config.decay)
    mixed = -np.log((w * probs).sum(axis=1))
    final = hedge_weights(np.vstack([losses, np.zeros((1, losses.shape[1]))]), config.eta, config.decay)[-1]
    return MixResult(mixed, expert_names(config), losses.sum(axis=0), final)


def expert_names(config: MixerConfig) -> list[str]:
    """Names of the mixture's experts, model first."""
    names = {1: "unigram", 2: "bigram", 3: "trigram"}
    return ["model"] + [names.get(n, f"{n}-gram") for n in config.orders]


# ---- step-by-step reference ---------------------------------------------------------------------------------------

@dataclass
class NgramExpert:
    """Witten-Bell n-gram over the whole vocabulary; `observe` only after the token was scored."""

    order: int
    vocab_size: int
    history: list[int] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)  # per order m: {ctx tuple: {token: count}}

    def __post_init__(self):
        self.counts = [dict() for _ in range(self.order)]

    def start(self, context: Sequence[int]) -> None:
        """Tokens before the first target: context only, never counted."""
        self.history = [int(t) for t in context]

    def _ctx(self, m: int) -> tuple:
        # context of length m-1, padded with vocab_size before the stream
        h = [self.vocab_size] * (m - 1) + self.history
        return tuple(h[len(h) - (m - 1):]) if m > 1 else ()

    def distribution(self) -> np.ndarray:
        """Next-token distribution [V] given the tokens observed so far."""
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for m in range(1, self.order + 1):
            table = self.counts[m - 1].get(self._ctx(m), {})
            c = np.zeros(self.vocab_size)
            for tok, k in table.items():
                c[tok] = k
            d = max(len(table), 1)
            p = (c + d * p) / (c.sum() + d)
        return p

    def observe(self, token: int) -> None:
        """Count `token` as the continuation of the current context (after it has been scored)."""
        for m in range(1, self.order + 1):
            table = self.counts[m - 1].setdefault(self._ctx(m), {})
            table[int(token)] = table.get(int(token), 0) + 1
        self.history.append(int(token))


class OnlineMixer:
    """Reference Hedge mixer, one token at a time: `step(model_probs)` -> distributions, then `update(token)`."""

    def __init__(self, experts: list, eta: float = 1.0, decay: float = 1.0):
        self.experts = experts
        self.eta = eta
        self.decay = decay
        self.loss = np.zeros(len(experts) + 1)
        self._last: np.ndarray | None = None

    def weights(self) -> np.ndarray:
        """Current Hedge weights, model first."""
        z = -self.eta * self.loss
        w = np.exp(z - z.max())
        return w / w.sum()

    def step(self, model_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mixture [V], expert distributions [K, V]) for the next token, model first."""
        dists = np.vstack([np.asarray(model_probs, dtype=np.float64)] + [e.distribution() for e in self.experts])
        self._last = dists
        return self.weights() @ dists, dists

    def update(self, token: int) -> None:
        """After `token` was scored: charge each expert its log loss, then let the experts count it."""
        if self._last is None:
            raise RuntimeError("update() before step(): a token must be scored before anything learns from it")
        self.loss = self.decay * self.loss - np.log(self._last[:, int(token)])
        self._last = None
        for e in self.experts:
            e.observe(token)
