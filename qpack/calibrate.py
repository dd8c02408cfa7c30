"""Calibration for GPTQ: read calibration tokens, rebuild the model, and collect per-weight Hessians."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import QpackFormatError, QpackInputError, Reason


def load_calibration_tokens(path: str | os.PathLike, n_tokens: int, tokenizer: str | os.PathLike | None = None,
                            vocab_size: int | None = None) -> np.ndarray:
    """The first `n_tokens` calibration tokens from a shard directory (train split), one .bin shard, or a text file."""
    from .data.shards import find_shards, read_shard

    p = Path(path)
    if not p.exists():
        raise QpackInputError(f"{p}: calibration data not found")
    if p.is_dir():
        shards = find_shards(p, "train") or find_shards(p, "val")
        if not shards:
            raise QpackFormatError(p, Reason.IO, "no token shards (*_train_*.bin) in this directory")
        parts, have = [], 0
        for s in shards:
            toks = read_shard(s, vocab_size)
            parts.append(toks[: n_tokens - have])
            have += len(parts[-1])
            if have >= n_tokens:
                break
        tokens = np.concatenate(parts)
    elif p.suffix == ".bin":
        tokens = read_shard(p, vocab_size)[:n_tokens]
    else:
        if tokenizer is None:
            raise QpackInputError(f"{p}: a text calibration file needs --tokenizer")
        from .data.tokenizer import load_tokenizer

        sp = load_tokenizer(tokenizer)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QpackFormatError(p, Reason.IO, f"cannot read calibration text: {exc}") from None
        ids: list[int] = []
        for line in text.splitlines(keepends=True):
            ids.extend(sp.encode(line))
            if len(ids) >= n_tokens:
                break
        tokens = np.asarray(ids[:n_tokens], dtype=np.int64)
    if len(tokens) < 2:
        raise QpackFormatError(p, Reason.TRUNCATED, "calibration data holds fewer than 2 tokens")
    return tokens.astype(np.int64)


def build_model(sd: dict[str, torch.Tensor], config: dict[str, Any] | None, arch: str | None) -> torch.nn.Module:
    """Rebuild the model that `sd` belongs to, from `--arch module:factory` or the checkpoint's config."""
    from . import models

    if arch:
        factory = models.load_model_factory(arch)
        model = factory(config) if config is not None else factory()
    elif config is not None:
        model = models.build_model(config)
    else:
        raise QpackInputError(
            "GPTQ needs the model: this checkpoint has no config, so pass --arch module:factory"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise QpackInputError(f"the model does not match the state dict: {detail[:400]}") from None
    return model.eval()


SEQ_LEN_KEYS = ("seq_len", "train_seq_len", "max_seq_len", "block_size")  # in this order of preference
DEFAULT_SEQ_LEN = 1024


def configured_seq_len(*sources: dict | None) -> int | None:
    """The sequence length a model was configured or trained with: the first of SEQ_LEN_KEYS found in any
    source (model config, checkpoint extras, their "train_config"), trying every source for a key before the next."""
    dicts: list[dict] = []
    for src in sources:
        if isinstance(src, dict):
            dicts.append(src)
            if isinstance(src.get("train_config"), dict):
                dicts.append(src["train_config"])
    for key in SEQ_LEN_KEYS:
        for d in dicts:
            v = d.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def resolve_seq_len(seq_len: int | None, *sources: dict | None, available: int | None = None) -> int:
    """The one sequence-length rule: an explicit `seq_len`, else the configured one (see configured_seq_len),
    else 1024; a length that was not given explicitly is capped by the `available` calibration tokens."""
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise QpackInputError(f"--seq-len must be a positive integer, got {seq_len!r}")
        return seq_len
    length = configured_seq_len(*sources) or DEFAULT_SEQ_LEN
    if available is not None:
        length = max(1, min(length, available))
    return length


def _as_batches(tokens_or_batches: Any, row_len: int, n_tokens: int | None, batch_size: int,
                rank: int, world: int) -> list[torch.Tensor]:
    """Calibration batches for this process: a 1-D token stream is cut by calibration_batches and its batches
    dealt out over the ranks; 2-D batches (a tensor or an iterable of them) are this rank's own, used as given."""
    from .hessian import calibration_batches

    if isinstance(tokens_or_batches, (np.ndarray, torch.Tensor)) and tokens_or_batches.ndim == 2:
        return [torch.as_tensor(tokens_or_batches, dtype=torch.long)]
    if isinstance(tokens_or_batches, (np.ndarray, torch.Tensor)) or (
            isinstance(tokens_or_batches, (list, tuple)) and tokens_or_batches
            and all(isinstance(x, (int, np.integer)) for x in tokens_or_batches)):
        stream = np.asarray(tokens_or_batches.cpu() if isinstance(tokens_or_batches, torch.Tensor)
                            else tokens_or_batches)
        if stream.ndim != 1:
            raise QpackInputError(f"calibration tokens must be 1-D (a stream) or 2-D (rows), got shape {stream.shape}")
        stream = stream.astype(np.int64)
        budget = len(stream) if n_tokens is None else n_tokens
        batches = calibration_batches(stream, budget, row_len, batch_size)
        return batches[rank::world]
    batches = []
    for b in tokens_or_batches:
        t = torch.as_tensor(b)
        if t.ndim != 2 or t.dtype.is_floating_point:
            raise QpackInputError(f"a calibration batch must be a 2-D tensor of token ids, got shape "
                                  f"{tuple(t.shape)} {t.dtype}")
        batches.append(t.long())
    return batches


def calibrate(model: torch.nn.Module, tokens_or_batches: Any, forward: Any = None, seq_len: int | None = None,
              n_tokens: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, torch.Tensor]:
    """Hessians {weight name: X^T X / n} of `model`, on the model's device, from a 1-D token stream or 2-D batches.

    `forward` is a callable (model, input_ids) -> logits or a `module:function` string (see qpack.forward).
    A model called with targets gets rows of seq_len + 1 tokens, split into inputs and targets. `seq_len` follows
    resolve_seq_len (the model's `config` attribute, if any, is a source). Under torch.distributed each rank runs
    its own batches (a stream's batches are dealt out by rank) and the sums and row counts are all-reduced, so every
    rank, rank 0 included, holds the Hessians of all ranks' tokens together.
    """
    from .hessian import hessian_sums

    adapter, batches, world = _prepare(model, tokens_or_batches, forward, seq_len, n_tokens, batch_size)
    groups = hessian_sums(model, batches, progress=progress, run=adapter.run)
    if world > 1:
        groups = _all_reduce(groups)
    out: dict[str, torch.Tensor] = {}
    for names, H, n in groups:
        if n:
            H = H.div_(n)
            for key in names:
                out[key] = H
    return out


def _prepare(model: torch.nn.Module, tokens_or_batches: Any, forward: Any, seq_len: int | None,
             n_tokens: int | None, batch_size: int, every_rank: bool = False) -> tuple[Any, list[torch.Tensor], int]:
    """The forward adapter, this rank's calibration batches and the world size: what calibrate and fisher share
    (`every_rank`: all batches, as one process would see them, and a world of 1)."""
    from .distributed import current
    from .forward import adapter_for

    adapter = adapter_for(model, forward)
    config = getattr(model, "config", None)
    config = config if isinstance(config, dict) else getattr(config, "__dict__", None)
    available = None
    if isinstance(tokens_or_batches, (np.ndarray, torch.Tensor)) and tokens_or_batches.ndim == 1:
        available = len(tokens_or_batches) - adapter.extra_tokens
    length = resolve_seq_len(seq_len, config, available=available)
    group = None if every_rank else current()
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    batches = _as_batches(tokens_or_batches, length + adapter.extra_tokens, n_tokens, batch_size, rank, world)
    if not batches and world == 1:
        raise QpackInputError("calibration got no batches of token ids")
    return adapter, batches, world


def fisher(model: torch.nn.Module, tokens_or_batches: Any, forward: Any = None, seq_len: int | None = None,
           n_tokens: int | None = None, batch_size: int = 1, progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher {weight name: mean (d loss / d w)^2} of `model`'s own loss on the calibration tokens.

    The rows are calibrate's (same tokens, seq_len and calling convention); one backward per batch, and by
    default a batch is one row, so the mean is over per-row gradients (a far better Fisher estimate than a few
    squared batch gradients, at the same compute). Under torch.distributed the sums are all-reduced like
    calibrate's. See qpack.sensitivity.
    """
    from .sensitivity import fisher_sums, from_sums, model_loss

    adapter, batches, world = _prepare(model, tokens_or_batches, forward, seq_len, n_tokens, batch_size)
    groups = fisher_sums(model, batches, model_loss(adapter), progress=progress)
    if world > 1:
        groups = _all_reduce(groups)
    return from_sums(groups)


def probe(model: torch.nn.Module, tokens_or_batches: Any, forward: Any = None, seq_len: int | None = None,
          n_tokens: int | None = None, bits: int = 3, max_batches: int = 4, batch_size: int = 8,
          progress: bool = False) -> dict[str, torch.Tensor]:
    """Measured loss increase per weight tensor when it alone is rounded to `bits` (RTN, one scale per row), on
    the first `max_batches` calibration batches, in the form compress(fisher=...) takes: see
    qpack.sensitivity.probe_sensitivity. Single-process."""
    from .quant.base import make_quantizer
    from .sensitivity import model_loss, probe_sensitivity

    adapter, batches, _ = _prepare(model, tokens_or_batches, forward, seq_len, n_tokens, batch_size)
    quantizer = make_quantizer("rtn", bits, None)
    return probe_sensitivity(model, batches[:max_batches], model_loss(adapter),
                             lambda w: quantizer.quantize(w).dequantize(), progress=progress)


def _all_reduce(groups: list[tuple[list[str], torch.Tensor, int]]) -> list[tuple[list[str], torch.Tensor, int]]:
    """Sum every rank's X^T X and row counts (the lists are in state-dict order on every rank)."""
    import torch.distributed as dist

    if not groups:
        return groups
    device = groups[0][1].device
    counts = torch.tensor([n for _, _, n in groups], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    for _, H, _ in groups:
        dist.all_reduce(H)
    return [(names, H, int(c)) for (names, H, _), c in zip(groups, counts.tolist())]


def collect(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
            progress: bool = False, forward: Any = None) -> dict[str, torch.Tensor]:
    """Hessians X^T X of every linear weight's input, keyed by state-dict name, from the first tokens of a stream."""
    return calibrate(model, np.asarray(tokens), forward=forward, seq_len=seq_len, batch_size=batch_size,
                     progress=progress)


def tuner(model: torch.nn.Module, tokens_or_batches: Any, forward: Any = None, seq_len: int | None = None,
          n_tokens: int | None = None, epochs: int | None = None, lr: float | None = None, batch_size: int = 4,
          progress: bool = False):
    """A passthrough tuner for compress(tune=...) (qpack.tune): `model` is the float model, the rows are
    calibrate's (same tokens, seq_len and calling convention), all of them, in this process. Needs logits: a model
    whose forward returns only a loss needs `forward_logits` or `forward=`."""
    from .tune import DEFAULT_EPOCHS, DEFAULT_LR, PassthroughTuner

    adapter, batches, _ = _prepare(model, tokens_or_batches, forward, seq_len, n_tokens, batch_size, every_rank=True)
    return PassthroughTuner(model, batches, adapter, DEFAULT_EPOCHS if epochs is None else epochs,
                            DEFAULT_LR if lr is None else lr, progress)
