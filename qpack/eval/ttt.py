"""Score-first test-time training: score a chunk of the val stream, then train on it, then score the next.

The stream is scored with exactly the sliding-window schedule (so lr = 0 reproduces sliding eval bit for bit);
consecutive windows are grouped into chunks of about `chunk` targets. Each chunk is scored under no_grad first,
and only then does the model take optimizer steps on that chunk's targets. Everything happens on a deep copy:
the caller's model (and so the artifact) never sees the adapted weights.

RECIPES holds the seed records' legal recipes as TTTConfigs: #691's chunked SGD (cosine over chunks, full
sequences in batches of 32, the last chunk not trained), #790's grouped AdamW on the last two blocks plus the
control tensors, and #745's SGD run that the Hedge mixer sits on. #951's recipe (30 epochs of AdamW on the
whole validation set before scoring it) learns from tokens before they are scored, so it has no entry here.
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

    # lr, chunk and optimizer from a grid on a held-out train slice (benchmarks/eval/tune_ttt.py), never val tokens
    chunk: int = 1024  # targets per chunk (rounded up to whole scoring windows)
    lr: float = 1e-3
    epochs: int = 1  # passes over each chunk after it is scored
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    params: str = "all"  # "all", "last:K" (last K blocks) or "lora:R" (rank-R adapters on every nn.Linear)
    reset_on_bos: bool = False  # restore the original weights when a document (BOS) starts
    bos_id: int = 1
    block_pattern: str = r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\."  # finds a parameter's block index
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 0  # LoRA initialisation
    schedule: str = "constant"  # "constant", or "cosine": lr * (1 + cos(pi * c / (chunks - 1))) / 2 for chunk c
    train_last_chunk: bool = True  # the seeds skip it: nothing is scored after it
    train_batch: int = 0  # 0: one step per scoring window; N: steps on N whole window-long sequences of the chunk
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    control_pattern: str = r"(?:scale|gain|resid_mix|skip_weight|smear|lambda|v_mix|norm)"  # control tensors
    control_lr_mult: float = 1.0  # lr multiple of the control group (AdamW groups: matrices, controls, head)

    def __post_init__(self):
        if self.chunk <= 0 or self.epochs < 0 or not self.lr >= 0:
            raise ValueError("TTT needs chunk > 0, epochs >= 0 and lr >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"TTT optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TTT schedule must be constant or cosine, got {self.schedule!r}")
        if self.train_batch < 0 or self.control_lr_mult < 0:
            raise ValueError("TTT needs train_batch >= 0 and control_lr_mult >= 0")
        parse_params(self.params)


def parse_params(spec: str) -> tuple[str, int]:
    """'all' -> ('all', 0); 'last:K' -> ('last', K); 'last:K+control' -> ('last+control', K); 'lora:R'."""
    kind, _, num = spec.partition(":")
    if kind == "all" and not num:
        return "all", 0
    if kind == "last" and num.endswith("+control"):
        kind, num = "last+control", num[: -len("+control")]
    if kind in ("last", "last+control", "lora") and num.isdigit() and int(num) > 0:
        return kind, int(num)
    raise ValueError(f"TTT params must be all, last:K, last:K+control or lora:R with K, R > 0; got {spec!r}")


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
        if kind == "last+control":  # #790: the control tensors (and an untied head) everywhere stay trainable
            ctl = re.compile(config.control_pattern)
            chosen |= {n for n, _ in named if ctl.search(n) or n.startswith("lm_head.")}
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


def _train_sequences(model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                     tokens: torch.Tensor, a: int, b: int, window: int, config: TTTConfig, device: torch.device,
                     log: EventLog | None) -> None:
    """The seeds' form: whole `window`-long sequences inside targets a..b-1, train_batch of them per step."""
    starts = list(range(a, b - window + 1, window))  # sequence s predicts targets s..s+window-1
    for _ in range(config.epochs):
        for i in range(0, len(starts), config.train_batch):
            batch = starts[i: i + config.train_batch]
            idx = torch.stack([tokens[s:s + window] for s in batch]).to(device)
            tgt = torch.stack([tokens[s + 1:s + window + 1] for s in batch]).to(device)
            if log is not None:
                log.trained(max(batch[0] - 1, 0), batch[-1] + window)
            with _autocast(device):
                logits = model(idx)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()


def train_chunk(
    model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], tokens: torch.Tensor,
    a: int, b: int, window: int, config: TTTConfig, device: torch.device, log: EventLog | None = None,
) -> None:
    """Optimizer steps on targets a..b-1 (already scored), each step on one window of at most `window` targets."""
    model.train()
    if config.train_batch:
        _train_sequences(model, opt, params, tokens, a, b, window, config, device, log)
        model.eval()
        return
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


def param_groups(model: nn.Module, params: list[nn.Parameter], config: TTTConfig) -> list[dict]:
    """#790's grouping of the trainable parameters: matrices, control tensors (at control_lr_mult), an untied head."""
    ctl = re.compile(config.control_pattern)
    chosen = {id(p) for p in params}
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "control": [], "head": []}
    for n, p in model.named_parameters():
        if id(p) in chosen:
            role = "head" if n.startswith("lm_head.") else "control" if p.ndim < 2 or ctl.search(n) else "matrix"
            groups[role].append(p)
    seen = {id(p) for g in groups.values() for p in g}
    groups["matrix"] += [p for p in params if id(p) not in seen]  # e.g. LoRA factors outside named_parameters
    mult = {"matrix": 1.0, "control": config.control_lr_mult, "head": 1.0}
    return [{"params": g, "lr": config.lr * mult[k], "base_lr": config.lr * mult[k], "role": k}
            for k, g in groups.items() if g]


def _make_opt(params: list[nn.Parameter], config: TTTConfig, model: nn.Module | None = None) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        groups = param_groups(model, params, config) if model is not None else params
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def chunk_lr_scale(c: int, n_chunks: int, config: TTTConfig) -> float:
    """The LR multiple for chunk c of n_chunks: 1, or the seeds' cosine from 1 down to 0 over the chunks."""
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * c / max(n_chunks - 1, 1)))


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
    opt = _make_opt(params, config, work)
    out = np.full(n, np.nan)
    chunks = plan_chunks(plan_windows(n, window, stride), config.chunk)
    for c, group in enumerate(chunks):
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
                opt = _make_opt(params, config, work)
                a = a + int(bos[-1]) + 1
        last = c == len(chunks) - 1
        if config.lr > 0 and config.epochs > 0 and a < b and (config.train_last_chunk or not last):
            scale = chunk_lr_scale(c, len(chunks), config)
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", config.lr) * scale
            train_chunk(work, opt, params, toks, a, b, window, config, device, log)
        if on_chunk is not None:
            on_chunk(group[-1].b - group[0].a)
    return out


# The seed records' score-first recipes (window and stride come from the eval: 2048 / 64 in the records)
RECIPES: dict[str, TTTConfig] = {
    # #691: 32,768-token chunks, 3 epochs of SGD (momentum 0.9) at 0.002 with a cosine over chunks, clip 1.0,
    # every parameter, 32 sequences per step, the last chunk not trained
    "pr691": TTTConfig(chunk=32_768, lr=0.002, epochs=3, optimizer="sgd", momentum=0.9, params="all",
                       schedule="cosine", train_last_chunk=False, train_batch=32, grad_clip=1.0),
    # #790: 131,072-token chunks, 4 epochs of AdamW (0.9, 0.95; eps 1e-6) at 1e-4 on the last 2 blocks plus the
    # control tensors, matrices and controls in their own groups (at the same lr there), cosine, clip 1.0
    "pr790": TTTConfig(chunk=131_072, lr=1e-4, epochs=4, optimizer="adamw", betas=(0.9, 0.95), eps=1e-6,
                       params="last:2+control", schedule="cosine", train_last_chunk=False, train_batch=32,
                       grad_clip=1.0),
    # #745: #691's form with one epoch; the Hedge mixer (qpack's normalized one) scores on top of it
    "pr745": TTTConfig(chunk=32_768, lr=0.002, epochs=1, optimizer="sgd", momentum=0.9, params="all",
                       schedule="cosine", train_last_chunk=False, train_batch=32, grad_clip=1.0),
}
