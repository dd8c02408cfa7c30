"""Score-first test-time training: score a chunk of the val stream, then train on it, then score the next.

The stream is scored with exactly the sliding-window schedule (so lr = 0 reproduces sliding eval bit for bit);
consecutive windows are grouped into chunks of about `chunk` targets. Each chunk is scored under no_grad first,
and only then does the model take optimizer steps on that chunk's targets. Everything happens on a deep copy:
the caller's model (and so the artifact) never sees the adapted weights.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .sliding import Window, _autocast, plan_windows, window_logprobs


@dataclass(frozen=True)
class TTTConfig:
    """Score-first TTT settings."""

    # lr and optimizer from a small grid on cpu-smoke (20k val tokens): AdamW 1e-3 on all weights did best
    chunk: int = 2048  # targets per chunk (rounded up to whole scoring windows)
    lr: float = 1e-3
    epochs: int = 1  # passes over each chunk after it is scored
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    params: str = "all"  # "all", "last:K" (last K blocks) or "lora:R" (rank-R adapters on every nn.Linear)
    reset_on_bos: bool = False  # restore the original weights when a document (BOS) starts
    bos_id: int = 1
    block_pattern: str = r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\."  # finds a parameter's block index
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 0  # LoRA initialisation

    def __post_init__(self):
        if self.chunk <= 0 or self.epochs < 0 or not self.lr >= 0:
            raise ValueError("TTT needs chunk > 0, epochs >= 0 and lr >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"TTT optimizer must be sgd or adamw, got {self.optimizer!r}")
        parse_params(self.params)


def parse_params(spec: str) -> tuple[str, int]:
    """'all' -> ('all', 0); 'last:K' -> ('last', K); 'lora:R' -> ('lora', R)."""
    kind, _, num = spec.partition(":")
    if kind == "all" and not num:
        return "all", 0
    if kind in ("last", "lora") and num.isdigit() and int(num) > 0:
        return kind, int(num)
    raise ValueError(f"TTT params must be all, last:K or lora:R with K, R > 0; got {spec!r}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update B @ A (B starts at zero, so it starts as the base)."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        dev = base.weight.device
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_a = nn.Parameter(a.to(dev))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))


def _add_lora(model: nn.Module, rank: int, seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("TTT params lora:R needs at least one nn.Linear in the model")
    params: list[nn.Parameter] = []
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(lin, rank, gen)
        setattr(parent, child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def select_params(model: nn.Module, config: TTTConfig) -> list[nn.Parameter]:
    """Mark the parameters TTT may change as trainable (adding LoRA modules if asked) and return them."""
    kind, k = parse_params(config.params)
    if kind == "lora":
        return _add_lora(model, k, config.seed)
    named = list(model.named_parameters())
    if kind == "all":
        chosen = {n for n, _ in named}
    else:
        pat = re.compile(config.block_pattern)
        index = {n: int(m.group(1)) for n, _ in named if (m := pat.search(n))}
        if not index:
            raise ValueError(f"TTT params last:{k}: no parameter name matches the block pattern {config.block_pattern!r}")
        top = max(index.values())
        chosen = {n for n, i in index.items() if i > top - k}
    out = []
    for n, p in named:
        p.requires_grad_(n in chosen)
        if n in chosen:
            out.append(p)
    return out


@dataclass
class EventLog:
    """What TTT did, in order: ("score", a, b) scored targets a..b-1; ("train", lo, hi) an update read targets lo..hi-1."""

    events: list[tuple[str, int, int]] = field(default_factory=list)

    def scored(self, a: int, b: int) -> None:
        self.events.append(("score", a, b))

    def trained(self, lo: int, hi: int) -> None:
        self.events.append(("train", lo, hi))


def plan_chunks(windows: list[Window], chunk: int) -> list[list[Window]]:
    """Group consecutive scoring windows into chunks of at least `chunk` targets (the last may be smaller)."""
    out: list[list[Window]] = []
    cur: list[Window] = []
    n = 0
    for w in windows:
        cur.append(w)
        n += w.b - w.a
        if n >= chunk:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def train_chunk(
    model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], tokens: torch.Tensor,
    a: int, b: int, window: int, config: TTTConfig, device: torch.device, log: EventLog | None = None,
) -> None:
    """Optimizer steps on targets a..b-1 (already scored), each step on one window of at most `window` targets."""
    model.train()
    for _ in range(config.epochs):
        for c in range(a, b, window):
            e = min(b, c + window)
            s = max(0, e - window)
            idx = tokens[s:e].unsqueeze(0).to(device)
            tgt = tokens[c + 1:e + 1].to(device)
            if log is not None:
                log.trained(max(s - 1, 0), e)  # inputs are targets s-1..e-2, labels targets c..e-1
            with _autocast(device):
                logits = model(idx)
            loss = F.cross_entropy(logits[0, c - s:].float(), tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
    model.eval()


def _make_opt(params: list[nn.Parameter], config: TTTConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def ttt_nll(
    model: nn.Module, tokens: np.ndarray, window: int, stride: int, config: TTTConfig = TTTConfig(), *,
    batch: int = 8, device: str | torch.device = "cpu", log: EventLog | None = None,
    on_chunk: Callable[[int], None] | None = None, shard: tuple[int, int] = (0, 1),
) -> np.ndarray:
    """Per-target NLL (float64) of the stream under score-first TTT; `model` itself is left untouched.
    shard=(rank, world): score only that rank's batches of each chunk (others NaN); training is on the whole chunk."""
    device = torch.device(device)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = max(len(tokens) - 1, 0)
    toks = torch.as_tensor(tokens)
    work = copy.deepcopy(model).to(device).eval()
    params = select_params(work, config)
    if not params:
        raise ValueError(f"TTT params {config.params!r} selects no parameters")
    snapshot = {k: v.detach().clone() for k, v in work.state_dict().items()}
    opt = _make_opt(params, config)
    out = np.full(n, np.nan)
    for group in plan_chunks(plan_windows(n, window, stride), config.chunk):
        for w, logp in window_logprobs(work, tokens, group, batch, device, inference=False, shard=shard):
            out[w.a:w.b] = (-logp.gather(1, toks[w.a + 1:w.b + 1].unsqueeze(1)).squeeze(1)).double().numpy()
            if log is not None:
                log.scored(w.a, w.b)
        a, b = group[0].a, group[-1].b
        if config.reset_on_bos:
            bos = np.flatnonzero(tokens[a + 1:b + 1] == config.bos_id)
            if bos.size:
                # a new document began inside this chunk: forget the old one, learn only from the new one
                work.load_state_dict(snapshot)
                opt = _make_opt(params, config)
                a = a + int(bos[-1]) + 1
        if config.lr > 0 and config.epochs > 0 and a < b:
            train_chunk(work, opt, params, toks, a, b, window, config, device, log)
        if on_chunk is not None:
            on_chunk(group[-1].b - group[0].a)
    return out
