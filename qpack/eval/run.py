"""`qpack eval` orchestration: load a model (artifact or checkpoint), the val split and its tokenizer, run modes.

Modes, in order: plain (stride = window), sliding, mixer (Hedge over the sliding NLLs), ttt (score-first TTT on
the sliding schedule) and ttt+mixer when both are asked for. The headline numbers are the last mode run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import QpackFormatError, QpackInputError, Reason
from ..filekind import is_artifact
from . import bpb
from .mixer import MixerConfig, mix_nll
from .sliding import plan_windows, shard_targets, sliding_nll
from .ttt import TTTConfig, plan_chunks, ttt_nll

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
    arch: str | None = None  # module:factory for a model qpack does not know (see load_model)
    forward: Any = None  # module:function or callable (model, input_ids) -> logits (see qpack.forward)
    distributed: bool = False  # join torchrun's process group and split the windows over the ranks


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


def load_model(path: str | os.PathLike, device: str = "cpu", arch: str | None = None,
               forward: Any = None) -> LoadedModel:
    """Rebuild the model an artifact (.qpk) or checkpoint holds, from its stored config or `arch` (module:factory).

    The returned model maps input ids to logits whatever the user's calling convention (see qpack.forward).
    """
    path = Path(path)
    hint = "pass --arch module:factory to say which model it is"
    if _is_artifact(path):
        from ..artifact import read_artifact

        art = read_artifact(path)
        source = art.meta.get("source")
        config, kind, extra = art.meta.get("model_config"), "artifact", source if isinstance(source, dict) else {}
        if config is None and arch is None:
            raise QpackInputError(f"{path}: the artifact carries no model config, so eval cannot rebuild the model; "
                                  + hint)
        from ..statedict import assemble

        tensors = assemble(art)  # row blocks re-joined, tied names restored
    else:
        from ..checkpoint import load_state_dict

        tensors, config, extra = load_state_dict(path)
        kind = "checkpoint"
        if config is None and arch is None:
            raise QpackInputError(f"{path}: the checkpoint carries no model config ({{'model': ..., 'config': ...}}), "
                                  "so eval cannot rebuild the model; " + hint)
    model = _build(config, arch)
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = [f"missing {', '.join(result.missing_keys[:3])}"] if result.missing_keys else []
        what += [f"unexpected {', '.join(result.unexpected_keys[:3])}"] if result.unexpected_keys else []
        described = f"--arch {arch}" if arch else "its config"
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               f"tensors do not fit the model {described} describes: {'; '.join(what)}")
    from ..calibrate import configured_seq_len
    from ..forward import logits_module

    model = logits_module(model.float().to(device).eval(), forward)
    hard = _seq_len(_MAX_KEYS, config)
    trained = configured_seq_len(extra, config) or hard
    return LoadedModel(model, config or {}, kind, hard, trained, extra)


def _build(config: dict | None, arch: str | None) -> torch.nn.Module:
    from ..models import build_model, load_model_factory

    if arch is None:
        return build_model(config)
    factory = load_model_factory(arch)
    if config is not None:
        return build_model(config, factory)
    from ..forward import call_user

    model = call_user(f"--arch {arch}()", factory)
    if not isinstance(model, torch.nn.Module):
        raise QpackInputError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


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
        pass  # an unreadable manifest is not the one the model was trained with: warn below, as for a mismatch
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


def _mode_entry(nll: np.ndarray, seconds: float, nbytes: np.ndarray) -> dict[str, Any]:
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

    from ..distributed import current

    group = current()
    world = group.world if group is not None else 1
    shard = (group.rank, world) if group is not None else (0, 1)

    def run_sliding(s: int, name: str) -> tuple[np.ndarray, float]:
        tick = bar(name, n)
        t0 = time.perf_counter()
        out = sliding_nll(model, tokens, window, s, batch=options.batch, device=options.device,
                          on_window=lambda w: tick(w.b - w.a), shard=shard)
        if world > 1:
            windows = plan_windows(n, window, s)
            out = _gather_nll(out, n, lambda r: shard_targets(windows, options.batch, r, world), group)
        return out, time.perf_counter() - t0

    def run_ttt() -> tuple[np.ndarray, float]:
        # Every rank scores its share of each chunk and then trains on the whole chunk, so the replicas stay equal.
        tick = bar("ttt", n)
        t0 = time.perf_counter()
        out = ttt_nll(model, tokens, window, stride, options.ttt, batch=options.batch, device=options.device,
                      on_chunk=tick, shard=shard)
        if world > 1:
            chunks = plan_chunks(plan_windows(n, window, stride), options.ttt.chunk)
            out = _gather_nll(out, n, lambda r: np.concatenate(
                [shard_targets(c, options.batch, r, world) for c in chunks]), group)
        return out, time.perf_counter() - t0

    plain = run_sliding(window, "plain") if options.plain and stride != window else None
    nll_s, sec_s = run_sliding(stride, "sliding" if stride != window else "plain")
    ttt = run_ttt() if options.ttt is not None else None
    if world > 1 and not group.is_main:
        return {"rank": group.rank, "world": world}  # rank 0 holds every NLL and reports; the mixer runs there
    if plain is not None:
        modes["plain"] = _mode_entry(*plain, nbytes)
    modes["sliding"] = _mode_entry(nll_s, sec_s, nbytes)
    if stride == window and options.plain:
        modes["plain"] = dict(modes["sliding"])
    if options.mixer is not None:
        t0 = time.perf_counter()
        mixed = mix_nll(nll_s, tokens, data.vocab_size, options.mixer)
        # the mixer's cost includes the sliding pass it rides on
        modes["mixer"] = _mode_entry(mixed.nll, sec_s + time.perf_counter() - t0, nbytes)
        extras["mixer"] = {"experts": mixed.expert_names, "final_weights": mixed.final_weights.tolist(),
                           "expert_bpb": (mixed.expert_nll / bpb.LN2 / nbytes.sum()).tolist()}
    if ttt is not None:
        nll_t = ttt[0]
        modes["ttt"] = _mode_entry(*ttt, nbytes)
        if options.mixer is not None:
            t1 = time.perf_counter()
            mixed_t = mix_nll(nll_t, tokens, data.vocab_size, options.mixer)
            modes["ttt+mixer"] = _mode_entry(mixed_t.nll, modes["ttt"]["seconds"] + time.perf_counter() - t1, nbytes)
    base = modes["sliding"]["val_bpb"]
    for entry in modes.values():
        entry["delta_bpb_vs_sliding"] = entry["val_bpb"] - base
    ordered = {k: modes[k] for k in MODE_ORDER if k in modes}
    head_name = list(ordered)[-1]
    head = ordered[head_name]
    return {
        "val_loss": head["val_loss"], "val_bpb": head["val_bpb"], "tokens": head["tokens"], "bytes": head["bytes"],
        "seconds": time.perf_counter() - t_start,
        "mode": head_name, "window": window, "stride": stride, "device": options.device, "world": world,
        "modes": ordered,
        **({"mixer": extras["mixer"]} if "mixer" in extras else {}),
    }


def _gather_nll(local: np.ndarray, n: int, targets_of: Callable[[int], np.ndarray], group) -> np.ndarray | None:
    """Every rank's scored NLLs put back in target order on rank 0 (None elsewhere); `targets_of(rank)` lists the
    targets a rank scored, from the schedule alone. The values are the ones each rank computed, so sums over
    them equal a one-process run bit for bit."""
    from ..distributed import gather_to_main

    parts = gather_to_main(local[targets_of(group.rank)], group)
    if parts is None:
        return None
    full = np.full(n, np.nan, dtype=np.float64)
    for rank, values in enumerate(parts):
        full[targets_of(rank)] = values
    return full


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
             options: EvalOptions = EvalOptions(),
             progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Score a .qpk artifact or checkpoint on DIR's val split; returns {"val_loss", "val_bpb", "tokens", "bytes",
    "seconds", "mode", "modes": {name: {...}}, ...}."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise QpackInputError("--device cuda: no CUDA device is available")
    if options.batch <= 0:
        raise QpackInputError(f"--batch must be positive, got {options.batch}")
    from ..distributed import join, launched_by_torchrun

    group = None
    if options.distributed or launched_by_torchrun():
        group = join(options.device)
        options = replace(options, device=group.device)
    loaded = load_model(model_path, options.device, options.arch, options.forward)
    window, stride = resolve_window(options, loaded.max_seq_len, loaded.train_seq_len)
    data = load_val(data_dir, tokenizer, options.max_tokens)
    model_vocab = (loaded.config or {}).get("vocab_size")
    if model_vocab is not None and int(model_vocab) != data.vocab_size:
        raise QpackInputError(f"{model_path}: the model's vocabulary ({model_vocab} tokens) does not match the "
                              f"tokenizer {data.tokenizer} ({data.vocab_size} pieces)")
    try:
        result = evaluate_model(loaded.model, data, window, stride, options, progress)
    except ValueError as exc:  # e.g. token ids past the model's logits: a model/data mismatch, not a bug here
        raise QpackInputError(f"{model_path}: {exc}") from None
    except torch.cuda.OutOfMemoryError:
        raise QpackInputError(f"out of GPU memory at --batch {options.batch} --window {window}; lower them") from None
    if "modes" not in result:
        return result  # a rank other than 0 of a distributed eval: rank 0 reports
    result.update({"model": str(model_path), "model_kind": loaded.kind, "data": str(data_dir),
                   "tokenizer": data.tokenizer, "warnings": data_warnings(loaded.extra, data_dir)})
    return result
