"""The compress pipeline: state dict -> candidates per tensor -> budget solver -> .qpk artifact.

Used by `qpack compress` and `qpack.compress()`. Every size that drives a decision is measured by encoding the
tensor for real (qpack.artifact.encode_entry); the final artifact is built in memory, measured, and only then
written (atomically), so it can never exceed the budget.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import __version__
from .budget import Candidate, Choices, min_bytes, solve
from .codecs import Codec, make_codec, parse_codec
from .errors import BudgetError, QpackInputError
from .quant.base import MAX_BITS, MIN_BITS, QUANTIZERS, Quantized, as_matrix, make_quantizer

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class CompressConfig:
    """Everything `qpack compress` can be told; validated on construction."""

    budget: int | None = None  # bytes for artifact + code; None: fixed `bits` for every matrix
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)  # candidate widths when a budget is set
    fixed_bits: int = 6  # width for every matrix when no budget is set
    scheme: str = "auto"  # auto: gptq where a Hessian exists, else gptq_lite; "search": several schemes
    group_size: int | None = None  # scale group size in columns; None: one scale per row
    codecs: tuple[str, ...] = ("ans", "zstd")  # codec specs tried per tensor (first one measures candidates)
    passthrough_dtype: str = "fp16"  # how small tensors (norms, gains, scalars) are stored: fp16 or fp32
    min_numel: int = 4096  # tensors with fewer elements, or fewer than 2 dims, pass through
    fp16_candidate: bool = True  # let the solver keep a whole matrix in fp16 when the budget allows
    lqer_rank: int = 0  # rank of the low-rank error correction (0: off)
    lqer_top: int = 0  # number of tensors (largest error) that get it
    code_bytes: int = 0  # bytes of code shipped beside the artifact (counted against the budget)
    sdclip_k: tuple[float, ...] = ()  # SDClip k values: candidates in "search" mode, or the k of scheme "sdclip"
    loss_proxy: str = "mse"  # how the solver weighs a block's error across tensors: mse, hessian or relative
    chunk_numel: int = 65536  # with a budget, rows are split into blocks of about this many weights (max 8)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise QpackInputError(f"budget must be a positive number of bytes, got {self.budget!r}")
        if not self.bits or any(not MIN_BITS <= b <= MAX_BITS for b in self.bits):
            raise QpackInputError(f"bits must be widths in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if not MIN_BITS <= self.fixed_bits <= MAX_BITS:
            raise QpackInputError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.fixed_bits}")
        if self.scheme not in ("auto", "search"):
            known = _schemes()
            if self.scheme not in known:
                raise QpackInputError(f"unknown scheme {self.scheme!r}; known: auto, search, {', '.join(known)}")
        if self.loss_proxy not in ("mse", "hessian", "relative"):
            raise QpackInputError(f"loss proxy must be mse, hessian or relative, got {self.loss_proxy!r}")
        if self.passthrough_dtype not in ("fp16", "fp32"):
            raise QpackInputError(f"passthrough dtype must be fp16 or fp32, got {self.passthrough_dtype!r}")
        if self.group_size is not None and self.group_size <= 0:
            raise QpackInputError(f"group size must be positive, got {self.group_size}")
        if self.lqer_rank < 0 or self.lqer_top < 0:
            raise QpackInputError("--lqer-rank and --lqer-top must not be negative")
        if not self.codecs:
            raise QpackInputError("at least one codec is needed")
        for spec in self.codecs:
            parse_codec(spec)  # raises a clear error for unknown codecs or parameters


def _schemes() -> list[str]:
    from .quant import _builtin  # noqa: F401

    return QUANTIZERS.names()


@dataclass
class TensorReport:
    """One line of the per-tensor table."""

    name: str
    shape: tuple[int, ...]
    scheme: str
    bits: int | None
    codec: str
    bytes: int
    rel_error: float
    est_loss: float

    def as_dict(self) -> dict[str, Any]:
        numel = math.prod(self.shape) if self.shape else 1
        return {
            "name": self.name, "shape": list(self.shape), "scheme": self.scheme, "bits": self.bits,
            "codec": self.codec, "bytes": self.bytes, "bits_per_param": 8 * self.bytes / max(numel, 1),
            "rel_error": self.rel_error, "est_loss": self.est_loss,
        }


@dataclass
class CompressResult:
    """What compress did: totals, the per-tensor table, and the artifact's bytes (not kept for writing twice)."""

    bytes_total: int
    bytes_model: int
    bytes_code: int
    budget: int | None
    params: int
    tensors: list[TensorReport]
    seconds: float
    output: str | None
    dry_run: bool
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_model / max(self.params, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_total": self.bytes_total, "bytes_model": self.bytes_model, "bytes_code": self.bytes_code,
            "budget": self.budget, "headroom": None if self.budget is None else self.budget - self.bytes_total,
            "params": self.params, "bits_per_param": self.bits_per_param, "seconds": self.seconds,
            "output": self.output, "dry_run": self.dry_run, "stages": self.stages,
            "tensors": [t.as_dict() for t in self.tensors],
        }


# ----------------------------------------------------------------------------------------------- helpers

def _jsonable(value: Any) -> bool:
    """Plain JSON data (what a checkpoint's extra keys may carry into the artifact's meta)."""
    import json

    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def find_aliases(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same storage as (or bit-identical to) an earlier name: {alias: original}."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    by_shape: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        if t.ndim >= 2 and t.numel() >= 1024:
            for other in by_shape.get((tuple(t.shape), t.dtype), []):
                if torch.equal(sd[other], t):
                    aliases[name] = other
                    break
            else:
                by_shape.setdefault((tuple(t.shape), t.dtype), []).append(name)
    return aliases


def is_quantizable(t: torch.Tensor, min_numel: int) -> bool:
    """Matrices (2+ dims) of floats with at least `min_numel` elements are quantized; the rest pass through."""
    return t.dtype in FLOAT_DTYPES and t.ndim >= 2 and t.numel() >= min_numel


def _passthrough_tensor(t: torch.Tensor, dtype: str) -> torch.Tensor:
    if t.dtype in FLOAT_DTYPES:
        return t.detach().to(torch.float16 if dtype == "fp16" else torch.float32).contiguous()
    return t.detach().contiguous()


def _rel_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    num = float(torch.linalg.vector_norm((w - wq).to(torch.float64)))
    den = float(torch.linalg.vector_norm(w.to(torch.float64)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def estimate_loss(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Estimated loss increase of replacing w by wq: Hessian-weighted when H is known, else 0.5*||w-wq||^2."""
    from .crownq import expected_loss_increase

    return float(expected_loss_increase(as_matrix(w), as_matrix(wq), hessian))


def code_size(files: Iterable[str | os.PathLike], codec: str | None) -> int:
    """Bytes the code files take as they would ship: raw, or compressed together with `codec`."""
    blobs = []
    for f in files:
        p = Path(f)
        try:
            blobs.append(p.read_bytes())
        except OSError as exc:
            raise QpackInputError(f"{p}: cannot read code file: {exc.strerror or exc}") from None
    if codec is None:
        return sum(len(b) for b in blobs)
    return len(parse_codec(codec).encode(b"".join(blobs)))


# ------------------------------------------------------------------------------------------- the pipeline

Progress = Callable[[Iterable, str, int], Iterable]


def _no_progress(it: Iterable, desc: str, total: int) -> Iterable:
    return it


class _Encoder:
    """Encodes candidate entries and caches codec objects; the one place sizes are measured."""

    def __init__(self, cfg: CompressConfig):
        self.codecs: list[Codec] = [parse_codec(s) for s in cfg.codecs]
        self.primary = self.codecs[0]
        self.raw = make_codec("raw")

    def entry(self, name: str, payload, codec: Codec, scale_codec: Codec | None = None, lowrank=None):
        from .artifact import TensorEntry, encode_entry

        layout = "byte"
        e = TensorEntry(name, payload, layout=layout, codec=codec, scale_codec=scale_codec or codec, lowrank=lowrank)
        manifest_entry, sections = encode_entry(e)
        nbytes = sum(len(s.data) for s in sections)
        return e, manifest_entry, sections, nbytes

    def best_entry(self, name: str, payload, lowrank=None):
        """Encode with every configured codec (codes and scales chosen independently) and keep the smallest."""
        best = None
        for codec in self.codecs + ([self.raw] if isinstance(payload, torch.Tensor) else []):
            for scale_codec in ([self.raw, codec] if not isinstance(payload, torch.Tensor) else [codec]):
                got = self.entry(name, payload, codec, scale_codec, lowrank)
                if best is None or got[3] < best[3]:
                    best = got
        return best


def compress(
    source: str | os.PathLike | dict[str, torch.Tensor],
    output: str | os.PathLike | None,
    config: CompressConfig | None = None,
    *,
    model_config: dict | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    extra_meta: dict | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> CompressResult:
    """Compress a checkpoint path or state dict to `output` (.qpk); options are CompressConfig fields.

    `hessians` maps state-dict names to X^T X of that weight's input (see qpack.hessian); with them the
    default scheme is GPTQ and the solver weighs errors by curvature.
    """
    t0 = time.perf_counter()
    cfg = replace(config, **options) if config is not None else CompressConfig(**options)
    progress = progress or _no_progress
    stages: dict[str, float] = {}

    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import load_state_dict

        sd, ckpt_config, extra = load_state_dict(source)
        model_config = model_config if model_config is not None else ckpt_config
        extra_meta = {**(extra_meta or {}), **{k: v for k, v in extra.items() if _jsonable(v)}}
    else:
        sd = dict(source)
    if not sd:
        raise QpackInputError("the state dict holds no tensors")
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise QpackInputError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    hessians = hessians or {}
    enc = _Encoder(cfg)
    stages["load"] = time.perf_counter() - t0

    aliases = find_aliases(sd)
    names = [n for n in sd if n not in aliases]
    params = sum(sd[n].numel() for n in names)
    quant_names = [n for n in names if is_quantizable(sd[n], cfg.min_numel)]
    pass_names = [n for n in names if n not in set(quant_names)]

    # Fixed part: passthrough tensors.
    t1 = time.perf_counter()
    fixed = {}
    for n in pass_names:
        fixed[n] = enc.best_entry(n, _passthrough_tensor(sd[n], cfg.passthrough_dtype))
    stages["passthrough"] = time.perf_counter() - t1

    # Candidates per quantizable tensor, measured per block of rows: rows quantize independently (GPTQ too),
    # so each block can take its own width, which gives the solver fine steps to fill the budget with.
    t1 = time.perf_counter()
    choices: list[Choices] = []
    row_splits: dict[str, dict] = {}
    part_rows: dict[str, tuple[str, int, int]] = {}
    widths = cfg.bits if cfg.budget is not None else (cfg.fixed_bits,)
    for n in progress(quant_names, "quantize", len(quant_names)):
        w = sd[n].detach().to(torch.float32)
        h = hessians.get(n)
        blocks = row_blocks(w.shape[0], w.numel(), cfg.chunk_numel if cfg.budget is not None else 0)
        parts = [n if len(blocks) == 1 else f"{n}#rows{r0}-{r1}" for r0, r1 in blocks]
        part_rows.update({part: (n, r0, r1) for part, (r0, r1) in zip(parts, blocks)})
        if len(blocks) > 1:
            row_splits[n] = {"parts": parts, "shape": list(w.shape)}
        cands: list[list[Candidate]] = [[] for _ in blocks]
        for scheme, params_ in _schemes_for(cfg, h is not None):
            for bits in widths:
                q = make_quantizer(scheme, bits, cfg.group_size, **params_).quantize(w, h)
                for k, ((r0, r1), part) in enumerate(zip(blocks, parts)):
                    qk = q if len(blocks) == 1 else slice_rows(q, r0, r1)
                    cands[k].append(_candidate(enc, part, w[r0:r1], qk, h, f"{scheme}/int{bits}", scheme, bits,
                                               cfg.loss_proxy))
        if cfg.budget is not None and cfg.fp16_candidate:
            for k, ((r0, r1), part) in enumerate(zip(blocks, parts)):
                t16 = w[r0:r1].to(torch.float16).contiguous()
                cands[k].append(_candidate(enc, part, w[r0:r1], t16, h, "fp16", "fp16", None, cfg.loss_proxy))
        choices.extend(Choices(part, c) for part, c in zip(parts, cands))
    stages["quantize"] = time.perf_counter() - t1
    part_names = [ch.name for ch in choices]

    meta = {
        "qpack_version": __version__,
        "model_config": model_config,
        "aliases": dict(sorted(aliases.items())),
        "row_splits": row_splits,
        "order": list(sd),
        "source": extra_meta or {},
    }

    code = cfg.code_bytes
    # Start from the cheapest candidate everywhere: its build gives the exact smallest reachable size.
    pick = [min(range(len(ch.candidates)), key=lambda i: (ch.candidates[i].nbytes, i)) for ch in choices]

    # Final encoding: each chosen tensor with its best codec, LQER on the largest errors, then the whole
    # artifact measured. The first pass learns the real manifest overhead; later passes re-solve with it and
    # tighten by any overshoot, so the written file is never over the budget and rarely far under it.
    t1 = time.perf_counter()
    cache: dict[tuple[str, int], tuple] = {}
    blob, total, best = b"", 0, None
    for attempt in range(8):
        chosen = {ch.name: ch.candidates[i] for ch, i in zip(choices, pick)}
        lowranks = _lqer(cfg, lambda part: sd[part_rows[part][0]].float()[part_rows[part][1]:part_rows[part][2]], chosen)
        entries = {}
        for t_idx, n in enumerate(part_names):
            key = (n, pick[t_idx])
            if key not in cache or n in lowranks:
                c = chosen[n]
                got = enc.best_entry(n, c.data["q"], lowranks.get(n))
                if n in lowranks:
                    entries[n] = got
                    continue
                cache[key] = got
            entries[n] = cache[key]
        ordered = [fixed[n] for n in pass_names] + [entries[n] for n in part_names]
        blob = _build(ordered, meta)
        total = len(blob) + code
        if cfg.budget is None:
            best = (blob, total, chosen, entries, lowranks)
            break
        if attempt == 0 and total > cfg.budget:
            raise BudgetError(
                f"budget {cfg.budget:,} bytes is below the smallest reachable size, {total:,} bytes "
                f"({code:,} of them code, every tensor at its fewest bits); raise --budget",
                min_bytes=total,
            )
        if total <= cfg.budget and (best is None or total > best[1]):
            best = (blob, total, chosen, entries, lowranks)
        if total <= cfg.budget and total >= cfg.budget - max(64, cfg.budget // 500):
            break
        # Bytes outside the solver's view: manifest, header, trailer, code, codec swaps, LQER factors.
        solved = sum(ch.candidates[i].nbytes for ch, i in zip(choices, pick))
        capacity = cfg.budget - (total - solved) - 32 * attempt
        new_pick = solve(choices, max(capacity, min_bytes(choices)))
        if new_pick == pick:
            break
        pick = new_pick
    if best is None:
        raise BudgetError(f"could not fit the budget of {cfg.budget:,} bytes (last try {total:,})", min_bytes=total)
    blob, total, chosen, entries, lowranks = best
    stages["encode"] = time.perf_counter() - t1

    if cfg.budget is not None and total > cfg.budget:  # never write an artifact over the budget
        raise BudgetError(f"internal: artifact of {total:,} bytes exceeds the budget {cfg.budget:,}", min_bytes=total)

    reports = []
    for n in pass_names:
        e = fixed[n]
        t = e[0].payload
        err = _rel_error(sd[n].double(), t.double()) if t.is_floating_point() else 0.0
        reports.append(TensorReport(n, tuple(sd[n].shape), "passthrough", None, e[0].codec.label(), e[3], err, 0.0))
    for n in part_names:
        c, e = chosen[n], entries[n]
        shape = tuple(c.data["q"].shape)
        reports.append(TensorReport(n, shape, c.data["scheme"] + ("+lqer" if n in lowranks else ""),
                                    c.data["bits"], e[0].codec.label(), e[3], c.data["rel"], c.loss))

    out = None
    if output is not None and not dry_run:
        from .container import atomic_write_bytes

        atomic_write_bytes(output, blob)
        out = os.fspath(output)
    return CompressResult(total, len(blob), code, cfg.budget, params, reports, time.perf_counter() - t0, out,
                          dry_run, stages)


def row_blocks(rows: int, numel: int, chunk_numel: int, max_blocks: int = 8) -> list[tuple[int, int]]:
    """Split `rows` into up to `max_blocks` near-equal blocks of about `chunk_numel` elements (0: one block)."""
    if chunk_numel <= 0 or rows < 2:
        return [(0, rows)]
    k = max(1, min(max_blocks, rows, numel // chunk_numel))
    edges = [rows * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def slice_rows(q: Quantized, r0: int, r1: int) -> Quantized:
    """Rows r0:r1 of a quantized tensor, as a quantized tensor of its own."""
    shape = (r1 - r0,) + tuple(q.shape[1:]) if len(q.shape) > 1 else (r1 - r0, q.q.shape[1])
    return Quantized(q.q[r0:r1].contiguous(), q.scales[r0:r1].contiguous(), shape, q.bits,
                     q.scheme, q.group_size, dict(q.params))


def _candidate(enc: "_Encoder", part: str, w: torch.Tensor, payload, h, label: str, scheme: str, bits,
               proxy: str = "hessian") -> Candidate:
    """Measure one encoding of one block: exact bytes with the primary codec, estimated loss."""
    wq = payload.dequantize() if isinstance(payload, Quantized) else payload.float()
    wq = wq.reshape(w.shape)
    nbytes = enc.entry(part, payload, enc.primary)[3]
    if proxy == "mse" or h is None:
        loss = estimate_loss(w, wq, None)
    elif proxy == "relative":
        loss = estimate_loss(w, wq, h) / max(estimate_loss(w, torch.zeros_like(w), h), 1e-30) * w.numel()
    else:
        loss = estimate_loss(w, wq, h)
    return Candidate(label, nbytes, loss,
                     data={"q": payload, "rel": _rel_error(w, wq), "scheme": scheme, "bits": bits})


def _schemes_for(cfg: CompressConfig, has_hessian: bool) -> list[tuple[str, dict]]:
    """The (scheme, params) pairs tried for one tensor."""
    if cfg.scheme == "auto":
        return [("gptq", {}) if has_hessian else ("gptq_lite", {})]
    if cfg.scheme == "search":
        out = [("gptq", {})] if has_hessian else []
        out += [("gptq_lite", {})] + [("sdclip", {"k": k}) for k in cfg.sdclip_k]
        return out
    if cfg.scheme == "gptq" and not has_hessian:
        return [("gptq_lite", {})]
    if cfg.scheme == "sdclip" and cfg.sdclip_k:
        return [("sdclip", {"k": k}) for k in cfg.sdclip_k]
    return [(cfg.scheme, {})]


def _lqer(cfg: CompressConfig, weight_of: Callable[[str], torch.Tensor], chosen: dict[str, Candidate]) -> dict[str, tuple]:
    """Low-rank error factors for the `lqer_top` quantized blocks with the largest estimated loss."""
    if cfg.lqer_rank <= 0 or cfg.lqer_top <= 0:
        return {}
    from .quant.lqer import fit_lqer

    quant = [(n, c) for n, c in chosen.items() if isinstance(c.data["q"], Quantized)]
    quant.sort(key=lambda nc: (-nc[1].loss, nc[0]))
    out = {}
    for n, c in quant[: cfg.lqer_top]:
        w = as_matrix(weight_of(n))
        rank = min(cfg.lqer_rank, *w.shape)
        out[n] = fit_lqer(w, as_matrix(c.data["q"].dequantize()), rank)
    return out


def _build(entries: list[tuple], meta: dict) -> bytes:
    """The whole artifact in memory, from already-encoded entries."""
    from .artifact import build_artifact_encoded

    return build_artifact_encoded([(e[1], e[2]) for e in entries], meta)
