"""Calibration for GPTQ: read calibration tokens, rebuild the model, and collect per-weight Hessians."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import QpackError, QpackFormatError, QpackInputError, Reason


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


def collect(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
            progress: bool = False) -> dict[str, torch.Tensor]:
    """Hessians X^T X of every linear weight's input, keyed by state-dict name."""
    from .hessian import calibration_batches, collect_hessians

    batches = calibration_batches(tokens, len(tokens), seq_len, batch_size)
    try:
        return collect_hessians(model, batches, progress=progress)
    except QpackError:
        raise
    except (RuntimeError, IndexError, ValueError) as exc:
        raise QpackInputError(f"running the model on the calibration tokens failed: {exc}") from None
