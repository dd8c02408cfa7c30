"""Sliding-window scoring: every target token scored exactly once, with as much context as the window allows.

Targets are tokens[1:]; target i is predicted from tokens[:i+1]. The first window scores all its targets; each
later window ends `stride` targets further on and scores only its last `stride`, so every scored token sees at
least window - stride earlier tokens. stride == window is plain chunked evaluation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """Inputs tokens[start:b] score targets a..b-1 (the window's last b - a outputs)."""

    start: int
    a: int
    b: int

    @property
    def length(self) -> int:
        return self.b - self.start


def check_window(window: int, stride: int) -> None:
    """Raise ValueError unless 0 < stride <= window."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than window {window}: tokens between windows would go unscored")


def plan_windows(n_targets: int, window: int, stride: int, begin: int = 0, end: int | None = None) -> list[Window]:
    """Windows scoring targets begin..end-1 exactly once; the schedule depends only on the counts, never on tokens."""
    check_window(window, stride)
    end = n_targets if end is None else end
    if not 0 <= begin <= end <= n_targets:
        raise ValueError(f"bad target range [{begin}, {end}) of {n_targets}")
    out: list[Window] = []
    a = begin
    # The first window may score more than `stride` targets when they all still see their whole history.
    b = min(end, max(begin + stride, window))
    while a < end:
        out.append(Window(max(0, b - window), a, b))
        a, b = b, min(end, b + stride)
    return out


def _autocast(device: torch.device):
    # bf16 on CUDA as the challenge runs it; fp32 on CPU, where bf16 autocast is many times slower.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(windows: list[Window], batch: int) -> Iterator[list[Window]]:
    group: list[Window] = []
    for w in windows:
        if group and (len(group) == batch or group[0].length != w.length):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def shard_groups(windows: list[Window], batch: int, rank: int = 0, world: int = 1) -> list[list[Window]]:
    """The forward batches of `windows` that process `rank` of `world` scores: whole batches dealt out in turn.

    Every batch holds exactly the windows it holds in one process, so each rank computes bit-identical logits.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard: rank {rank} of {world}")
    return [g for i, g in enumerate(_batches(windows, batch)) if i % world == rank]


def shard_targets(windows: list[Window], batch: int, rank: int, world: int) -> np.ndarray:
    """Target indices scored by `rank` (in the order it scores them), from the schedule alone."""
    groups = shard_groups(windows, batch, rank, world)
    parts = [np.arange(w.a, w.b) for g in groups for w in g]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def window_logprobs(
    model: torch.nn.Module, tokens: np.ndarray, windows: Iterable[Window], batch: int = 8,
    device: str | torch.device = "cpu", inference: bool = True, shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Window, torch.Tensor]]:
    """Yield (window, log-probabilities [b - a, V] in fp32 on CPU) for the scored targets of each window, in order.

    inference=False scores under no_grad instead of inference_mode, for callers that train the model afterwards
    (a module that caches a tensor made in inference mode could not use it in a later backward pass).
    shard=(rank, world) scores only that rank's batches (see shard_groups).
    """
    device = torch.device(device)
    toks = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    for group in shard_groups(list(windows), batch, *shard):
        idx = torch.stack([toks[w.start:w.b] for w in group]).to(device)
        with (torch.inference_mode() if inference else torch.no_grad()), _autocast(device):
            logits = model(idx)
        if logits.dim() != 3 or logits.shape[:2] != idx.shape:
            raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(idx.shape)}")
        for row, w in enumerate(group):
            n = w.b - w.a
            yield w, F.log_softmax(logits[row, -n:].float(), dim=-1).cpu()


def sliding_nll(
    model: torch.nn.Module, tokens: np.ndarray, window: int, stride: int, *, batch: int = 8,
    device: str | torch.device = "cpu", begin: int = 0, end: int | None = None,
    on_window: Callable[[Window], None] | None = None, shard: tuple[int, int] = (0, 1),
) -> np.ndarray:
    """Per-target NLL in nats (float64) for targets begin..end-1 of the stream `tokens`.

    With shard=(rank, world) only that rank's targets are scored; the others stay NaN (see shard_targets).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n_targets = max(len(tokens) - 1, 0)
    end = n_targets if end is None else end
    windows = plan_windows(n_targets, window, stride, begin, end)
    out = np.full(end - begin, np.nan, dtype=np.float64)
    tgt_all = torch.as_tensor(tokens[1:])
    for w, logp in window_logprobs(model, tokens, windows, batch, device, shard=shard):
        if int(tgt_all[w.a:w.b].max()) >= logp.shape[-1]:
            raise ValueError(f"token id {int(tgt_all[w.a:w.b].max())} is outside the model's vocabulary of {logp.shape[-1]}")
        nll = -logp.gather(1, tgt_all[w.a:w.b].unsqueeze(1)).squeeze(1)
        out[w.a - begin:w.b - begin] = nll.double().numpy()
        if on_window is not None:
            on_window(w)
    return out
