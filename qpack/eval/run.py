"""`qpack eval` orchestration: load a model (artifact or checkpoint), the val split and its tokenizer, run modes.

Modes, in order: plain (stride = window), sliding, mixer (Hedge over the sliding NLLs), ttt (score-first TTT on
the sliding schedule) and ttt+mixer when both are asked for. The headline numbers are the last mode run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import QpackFormatError, QpackInputError, Reason
from ..filekind import is_artifact
from . import bpb
from .mixer import MixerConfig, mix_nll
from .sliding import plan_windows, sliding_nll
from .ttt import TTTConfig, ttt_nll

# model config keys that fix the longest context a model accepts (learned positions); RoPE models have none
_MAX_KEYS = ("max_seq_len", "block_size", "context_length", "n_positions")
MODE_ORDER = ("plain", "sliding", "mixer", "ttt", "ttt+mixer")


@dataclass(frozen=True)
class EvalOptions:
    """What to score and how; window/stride None mean the model's sequence length (or 1024) and window // 2."""

    window: int | None = None
    stride: int | None = None
    batch: int = 8
    device: str = "cpu"
    max_tokens: int | None = None  # score only the first N val targets
    plain: bool = True
    mixer: MixerConfig | None = None
    ttt: TTTConfig | None = None


@dataclass
class LoadedModel:
    """A rebuilt model plus where it came from."""

    model: torch.nn.Module
    config: dict
    kind: str  # "artifact" or "checkpoint"
    max_seq_len: int | None = None  # a hard limit from the model config
    train_seq_len: int | None = None  # what it was trained on (the default window)
    extra: dict = field(default_factory=dict)


def _is_artifact(path: Path) -> bool:
    return is_artifact(path, "a model")


def _seq_len(keys: tuple[str, ...], *sources) -> int | None:
    for src in sources:
        if not isinstance(src, dict):
            continue
        for key in keys:
            v = (src or {}).get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Rebuild the model an artifact (.qpk) or checkpoint holds, from the config stored with it."""
    path = Path(path)
    if _is_artifact(path):
        from ..artifact import read_artifact

        art = read_artifact(path)
        source = art.meta.get("source")
        config, kind, extra = art.meta.get("model_config"), "artifact", source if isinstance(source, dict) else {}
        if config is None:
            raise QpackInputError(f"{path}: the artifact carries no model config, so eval cannot rebuild the model; "
                                  "compress a checkpoint that has one (as `qpack train` writes)")
        from ..statedict import assemble

        tensors = assemble(art)  # row blocks re-joined, tied names restored
    else:
        from ..checkpoint import load_state_dict

        tensors, config, extra = load_state_dict(path)
        kind = "checkpoint"
        if config is None:
            raise QpackInputError(f"{path}: the checkpoint carries no model config ({{'model': ..., 'config': ...}}), "
                                  "so eval cannot rebuild the model")
    from ..models import build_model

    model = build_model(config)
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = [f"missing {', '.join(result.missing_keys[:3])}"] if result.missing_keys else []
        what += [f"unexpected {', '.join(result.unexpected_keys[:3])}"] if result.unexpected_keys else []
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               f"tensors do not fit the model its config describes: {'; '.join(what)}")
    model = model.float().to(device).eval()
    hard = _seq_len(_MAX_KEYS, config)
    trained = _seq_len(("seq_len", "train_seq_len"), extra, extra.get("train_config")) or hard
    return LoadedModel(model, config, kind, hard, trained, extra)


@dataclass
class ValData:
    """The val token stream (targets are tokens[1:]) and the byte count of every target."""

    tokens: np.ndarray
    target_bytes: np.ndarray
    tokenizer: str
    vocab_size: int


def load_val(data_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
             max_tokens: int | None = None) -> ValData:
    """Load the val split of a data directory and count bytes with its tokenizer (default DIR/tokenizer.model)."""
    from ..data.shards import load_split
    from ..data.tokenizer import byte_counting, load_tokenizer

    tok_path = Path(tokenizer) if tokenizer is not None else Path(data_dir) / "tokenizer.model"
    sp = load_tokenizer(tok_path)
    vocab = int(sp.get_piece_size())
    tokens = np.asarray(load_split(data_dir, "val", vocab_size=vocab), dtype=np.int64)
    if max_tokens is not None:
        if max_tokens <= 0:
            raise QpackInputError(f"--max-tokens must be positive, got {max_tokens}")
        tokens = tokens[: max_tokens + 1]
    if tokens.size < 2:
        raise QpackFormatError(data_dir, Reason.TRUNCATED, f"the val split holds {tokens.size} tokens; need at least 2")
    luts, space_counts = byte_counting(sp, vocab)
    nbytes = bpb.target_bytes(tokens, luts, space_counts)
    return ValData(tokens, nbytes, str(tok_path), vocab)


def data_warnings(extra: dict, data_dir: str | os.PathLike) -> list[str]:
    """A warning when the checkpoint records the data manifest it was trained on and DIR holds another one."""
    want = extra.get("data_manifest_hash")
    manifest = Path(data_dir) / "manifest.json"
    if not isinstance(want, str) or not manifest.is_file():
        return []
    from ..data.manifest import data_manifest_hash

    try:
        if want == data_manifest_hash(data_dir):
            return []
    except QpackFormatError:
        pass
    return [f"{manifest}: not the data manifest the model was trained with (its tokenizer or split may differ)"]


def resolve_window(options: EvalOptions, max_seq_len: int | None, default: int | None = None) -> tuple[int, int]:
    """(window, stride) after defaults; QpackInputError when they make no sense for this model."""
    window = options.window if options.window is not None else (default or max_seq_len or 1024)
    stride = options.stride if options.stride is not None else max(1, window // 2)
    if window <= 0:
        raise QpackInputError(f"--window must be positive, got {window}")
    if stride <= 0:
        raise QpackInputError(f"--stride must be positive, got {stride}")
    if stride > window:
        raise QpackInputError(f"--stride {stride} is larger than --window {window}: tokens between windows "
                              "would never be scored")
    if max_seq_len is not None and window > max_seq_len:
        raise QpackInputError(f"--window {window} is longer than the model's maximum sequence length {max_seq_len}")
    return window, stride


def _mode_entry(nll: np.ndarray, nbytes: np.ndarray, seconds: float) -> dict[str, Any]:
    s = bpb.score(nll, nbytes)
    return {"val_loss": s.val_loss, "val_bpb": s.val_bpb, "tokens": s.tokens, "bytes": s.bytes,
            "seconds": seconds, "tokens_per_s": s.tokens / seconds if seconds > 0 else None}


def evaluate_model(model: torch.nn.Module, data: ValData, window: int, stride: int, options: EvalOptions,
                   progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Run every mode asked for on an already-loaded model; returns the result dict (see `evaluate`)."""
    t_start = time.perf_counter()
    tokens, nbytes = data.tokens, data.target_bytes
    n = tokens.size - 1
    modes: dict[str, dict] = {}
    extras: dict[str, Any] = {}

    def bar(name: str, total: int) -> Callable[[int], None]:
        return progress(name, total) if progress else (lambda k: None)

    def run_sliding(s: int, name: str) -> tuple[np.ndarray, float]:
        tick = bar(name, n)
        t0 = time.perf_counter()
        out = sliding_nll(model, tokens, window, s, batch=options.batch, device=options.device,
                          on_window=lambda w: tick(w.b - w.a))
        return out, time.perf_counter() - t0

    if options.plain and stride != window:
        nll, sec = run_sliding(window, "plain")
        modes["plain"] = _mode_entry(nll, nbytes, sec)
    nll_s, sec_s = run_sliding(stride, "sliding" if stride != window else "plain")
    modes["sliding"] = _mode_entry(nll_s, nbytes, sec_s)
    if stride == window and options.plain:
        modes["plain"] = dict(modes["sliding"])
    if options.mixer is not None:
        t0 = time.perf_counter()
        mixed = mix_nll(nll_s, tokens, data.vocab_size, options.mixer)
        # the mixer's cost includes the sliding pass it rides on
        modes["mixer"] = _mode_entry(mixed.nll, nbytes, sec_s + time.perf_counter() - t0)
        extras["mixer"] = {"experts": mixed.expert_names, "final_weights": mixed.final_weights.tolist(),
                           "expert_bpb": (mixed.expert_nll / bpb.LN2 / nbytes.sum()).tolist()}
    if options.ttt is not None:
        tick = bar("ttt", n)
        t0 = time.perf_counter()
        nll_t = ttt_nll(model, tokens, window, stride, options.ttt, batch=options.batch, device=options.device,
                        on_chunk=tick)
        modes["ttt"] = _mode_entry(nll_t, nbytes, time.perf_counter() - t0)
        if options.mixer is not None:
            t1 = time.perf_counter()
            mixed_t = mix_nll(nll_t, tokens, data.vocab_size, options.mixer)
            modes["ttt+mixer"] = _mode_entry(mixed_t.nll, nbytes, modes["ttt"]["seconds"] + time.perf_counter() - t1)
    base = modes["sliding"]["val_bpb"]
    for entry in modes.values():
        entry["delta_bpb_vs_sliding"] = entry["val_bpb"] - base
    ordered = {k: modes[k] for k in MODE_ORDER if k in modes}
    head_name = list(ordered)[-1]
    head = ordered[head_name]
    return {
        "val_loss": head["val_loss"], "val_bpb": head["val_bpb"], "tokens": head["tokens"], "bytes": head["bytes"],
        "seconds": time.perf_counter() - t_start,
        "mode": head_name, "window": window, "stride": stride, "device": options.device, "modes": ordered,
        **({"mixer": extras["mixer"]} if "mixer" in extras else {}),
    }


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
             options: EvalOptions = EvalOptions(),
             progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Score a .qpk artifact or checkpoint on DIR's val split; returns {"val_loss", "val_bpb", "tokens", "bytes",
    "seconds", "mode", "modes": {name: {...}}, ...}."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise QpackInputError("--device cuda: no CUDA device is available")
    if options.batch <= 0:
        raise QpackInputError(f"--batch must be positive, got {options.batch}")
    loaded = load_model(model_path, options.device)
    window, stride = resolve_window(options, loaded.max_seq_len, loaded.train_seq_len)
    data = load_val(data_dir, tokenizer, options.max_tokens)
    model_vocab = loaded.config.get("vocab_size")
    if model_vocab is not None and int(model_vocab) != data.vocab_size:
        raise QpackInputError(f"{model_path}: the model's vocabulary ({model_vocab} tokens) does not match the "
                              f"tokenizer {data.tokenizer} ({data.vocab_size} pieces)")
    try:
        result = evaluate_model(loaded.model, data, window, stride, options, progress)
    except ValueError as exc:  # e.g. token ids past the model's logits: a model/data mismatch, not a bug here
        raise QpackInputError(f"{model_path}: {exc}") from None
    except torch.cuda.OutOfMemoryError:
        raise QpackInputError(f"out of GPU memory at --batch {options.batch} --window {window}; lower them") from None
    result.update({"model": str(model_path), "model_kind": loaded.kind, "data": str(data_dir),
                   "tokenizer": data.tokenizer, "warnings": data_warnings(loaded.extra, data_dir)})
    return result
