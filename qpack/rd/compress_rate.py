"""Build a real .qpk from rate-aware candidates: every matrix offers the uniform quantizer at a grid of steps,
each priced by its encoded bytes (ANS codes, best scale codec), and qpack.budget.solve picks one step per tensor
so that the whole artifact fits the budget with the least estimated loss (marginal loss per byte equalised).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..artifact import EncodedEntry, TensorEntry, build_artifact, encode_entry
from ..budget import Candidate, Choices, min_bytes, solve
from ..codecs import make_codec
from ..compress import estimate_loss, is_quantizable, slice_rows
from ..statedict import find_aliases, row_blocks
from ..errors import BudgetError, QpackInputError
from .candidates import rate_candidates, step_grid

LOSS_PROXIES = ("mse", "hessian")


@dataclass
class RateResult:
    """What the rate path wrote: total bytes, the step chosen per tensor, and the artifact bytes."""

    bytes_total: int
    params: int
    steps: dict[str, str] = field(default_factory=dict)
    blob: bytes = field(default=b"", repr=False)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_total / max(self.params, 1)


def _encode(name: str, payload) -> tuple[dict, list, int]:
    """Smallest encoding of one payload: codes under ANS (quantized) and scales raw or ANS; zstd/raw for floats."""
    best = None
    if isinstance(payload, torch.Tensor):
        options = [(make_codec("raw", {}), None), (make_codec("zstd", {"level": 19}), None)]
    else:
        options = [(make_codec("ans", {}), make_codec("raw", {})), (make_codec("ans", {}), make_codec("ans", {}))]
    for codec, scale_codec in options:
        entry = TensorEntry(name, payload, codec=codec, scale_codec=scale_codec or codec)
        encoded = encode_entry(entry)
        man, secs = encoded.manifest, list(encoded.sections)
        n = encoded.nbytes
        if best is None or n < best[2]:
            best = (man, secs, n)
    return best


@dataclass
class RateChoices:
    """Everything the solver needs for one state dict, reusable across budgets: fixed entries, candidates, meta."""

    fixed: list[tuple[dict, list]]
    choices: list[Choices]
    meta: dict
    params: int


def prepare_rate(sd: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor] | None = None,
                 model_config: dict | None = None, steps: list[float] | None = None, rdo: float = 0.0,
                 rows: str = "flat", gptq: bool = True, loss_proxy: str = "mse", min_numel: int = 4096,
                 chunk_numel: int = 8192) -> RateChoices:
    """Quantize every matrix at every step of the grid and price each candidate (bytes, estimated loss).

    Rows quantize independently (GPTQ too), so each block of about `chunk_numel` weights (at most 8 per
    tensor; 0: whole tensors) is a separate choice for the solver: finer steps to fill the budget with."""
    if loss_proxy not in LOSS_PROXIES:
        raise QpackInputError(f"loss proxy must be one of {', '.join(LOSS_PROXIES)}, got {loss_proxy!r}")
    if isinstance(rdo, bool) or not isinstance(rdo, (int, float)) or not rdo >= 0:
        raise QpackInputError(f"rdo (the RDO Lagrange multiplier) must be a number >= 0, got {rdo!r}")
    hessians = hessians or {}
    steps = steps or step_grid()
    aliases = find_aliases(sd)
    names = [n for n in sd if n not in aliases]
    quant = [n for n in names if is_quantizable(sd[n], min_numel)]
    fixed = []
    for n in names:
        if n not in set(quant):
            t = sd[n].detach()
            man, secs, _ = _encode(n, t.to(torch.float16).contiguous() if t.is_floating_point() else t.contiguous())
            fixed.append((man, secs))
    choices = []
    row_splits = {}
    for n in quant:
        w = sd[n].detach().to(torch.float32)
        h = hessians.get(n)
        blocks = row_blocks(w.shape[0], w.numel(), chunk_numel)
        parts = [n if len(blocks) == 1 else f"{n}#rows{r0}-{r1}" for r0, r1 in blocks]
        if len(blocks) > 1:
            row_splits[n] = {"parts": parts, "shape": list(w.shape)}
        cands = [[] for _ in blocks]
        for label, q in rate_candidates(w, h, steps, rdo=float(rdo), rows=rows, gptq=gptq):
            wq = q.dequantize().reshape(w.shape[0], -1)
            wm = w.reshape(w.shape[0], -1)
            for k, ((r0, r1), part) in enumerate(zip(blocks, parts)):
                qk = q if len(blocks) == 1 else slice_rows(q, r0, r1)
                man, secs, nbytes = _encode(part, qk)
                loss = estimate_loss(wm[r0:r1], wq[r0:r1], h if loss_proxy == "hessian" else None)
                cands[k].append(Candidate(label, nbytes, loss, data=(man, secs)))
        choices.extend(Choices(part, c) for part, c in zip(parts, cands))
    meta = {"qpack_version": __version__, "model_config": model_config, "aliases": dict(sorted(aliases.items())),
            "row_splits": row_splits, "order": list(sd),
            "source": {"scheme": "rate", "rdo": float(rdo), "rows": rows, "gptq": gptq, "loss_proxy": loss_proxy}}
    return RateChoices(fixed, choices, meta, sum(sd[n].numel() for n in names))


def build_rate(prepared: RateChoices, budget: int, output: str | os.PathLike | None = None) -> RateResult:
    """Pick one candidate per tensor with qpack.budget.solve and assemble the artifact: never over `budget`,
    re-solved with the measured container overhead until it lands within 0.1% under it (or stops moving)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise QpackInputError(f"budget must be a positive number of bytes, got {budget!r}")
    choices = prepared.choices
    pick = [min(range(len(c.candidates)), key=lambda i: c.candidates[i].nbytes) for c in choices]
    best = None
    for attempt in range(8):
        parts = prepared.fixed + [c.candidates[i].data for c, i in zip(choices, pick)]
        blob = build_artifact([EncodedEntry(m, tuple(secs)) for m, secs in parts], prepared.meta, verify=False)
        total = len(blob)
        if attempt == 0 and total > budget:
            raise BudgetError(f"budget {budget:,} bytes is below the smallest reachable size, {total:,} bytes",
                              min_bytes=total)
        if total <= budget and (best is None or total > best[0]):
            best = (total, blob, list(pick))
        if total <= budget and total >= budget - max(64, budget // 1000):
            break
        solved = sum(c.candidates[i].nbytes for c, i in zip(choices, pick))
        new = solve(choices, max(budget - (total - solved) - 16 * attempt, min_bytes(choices)))
        if new == pick:
            break
        pick = new
    total, blob, pick = best
    if output is not None:
        from ..container import atomic_write_bytes

        atomic_write_bytes(output, blob)
    return RateResult(total, prepared.params, {c.name: c.candidates[i].label for c, i in zip(choices, pick)}, blob)


def compress_rate(sd: dict[str, torch.Tensor], budget: int, hessians: dict[str, torch.Tensor] | None = None,
                  output: str | os.PathLike | None = None, model_config: dict | None = None,
                  **options) -> RateResult:
    """prepare_rate + build_rate in one call (options: steps, rdo, rows, gptq, loss_proxy, min_numel, chunk_numel)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise QpackInputError(f"budget must be a positive number of bytes, got {budget!r}")
    return build_rate(prepare_rate(sd, hessians, model_config, **options), budget, output)
