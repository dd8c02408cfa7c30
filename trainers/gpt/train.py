"""Train the reference GPT on golf shards: `python -m trainers.gpt.train --preset=cpu-smoke --data=DIR --key=value`.

One TrainConfig (below) holds every knob; the model's own fields (GPTConfig) are overridden by name too.
Multi-GPU: `torchrun --nproc_per_node=N -m trainers.gpt.train ...` (gloo on CPU, nccl on CUDA).
The run folder gets train.log, metrics.jsonl (one loss per step), ckpt.pt (resumable) and final.pt
({"model", "config", "tokenizer", "data_manifest_hash"}: what `qpack compress` and `qpack eval` take).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from qpack.errors import QpackError, QpackFormatError, QpackInputError, Reason

from qpack.models.gpt import GPT, GPTConfig
from .muon import Muon, split_params


@dataclass
class TrainConfig:
    data: str = "data"  # folder with NAME_train_*.bin / NAME_val_*.bin shards (+ tokenizer.model for bpb)
    out: str = "runs/gpt"  # run folder: train.log, metrics.jsonl, ckpt.pt, final.pt
    model: GPTConfig = field(default_factory=GPTConfig)  # model shape; its fields are overridden by name
    seq_len: int = 1024  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step (ignored when global_batch_tokens is set)
    global_batch_tokens: int = 0  # tokens per optimizer step over all ranks; 0 = batch*seq*accum*world
    max_steps: int = 1000  # optimizer steps (the run also stops at max_seconds)
    max_seconds: float = 0.0  # wall-clock cap on training time (eval excluded); 0 = none. The LR schedule follows it
    warmup_steps: int = 10  # linear LR warmup from 0
    warmdown_frac: float = 0.3  # LR decays linearly to 0 over this last fraction of the run (steps or time)
    warmdown_iters: int = 0  # > 0: the seeds' warmdown instead, over the last N steps (with max_seconds: the last
    #                          N mean step times before the cap); warmdown_frac is then unused
    matrix_lr: float = 0.04  # Muon LR for the blocks' matrices
    embed_lr: float = 0.05  # Adam LR for embeddings (the tied head included)
    head_lr: float = 0.008  # Adam LR for an untied output head
    scalar_lr: float = 0.04  # Adam LR for gains, scalars, skip weights, the bigram projection
    muon_momentum: float = 0.95  # Muon momentum after its warmup
    muon_momentum_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup: int = 300  # steps over which Muon momentum rises to muon_momentum
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    weight_decay: float = 0.0  # decoupled weight decay on the Muon matrices (multiplied by the LR)
    adam_weight_decay: float = 0.0  # > 0: AdamW with this decay on the embeddings and scalars (the head stays Adam)
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 = off
    ema_decay: float = 0.0  # EMA of weights (e.g. 0.997); the EMA is what final.pt holds. 0 = off
    swa_every: int = 0  # SWA: average the weights every N steps once lr_scale < swa_threshold; final.pt holds
    #                     the average (it wins over the EMA). 0 = off
    swa_threshold: float = 0.2  # SWA collects only while the LR scale is below this (the tail of the warmdown)
    seed: int = 1337  # seeds model init and every RNG
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the model (worth it on CUDA only)
    threads: int = 0  # torch CPU threads (0 = torch's default); 1 avoids thrashing on a busy machine
    log_every: int = 10  # a log line every N steps
    val_every: int = 0  # val loss/bpb every N steps (0 = only at the end)
    val_tokens: int = 262144  # val tokens scored each time (0 = the whole val split)
    val_batch_size: int = 16  # sequences per val forward pass
    ckpt_every: int = 100  # write ckpt.pt every N steps (0 = only at the end)
    resume: bool = True  # continue from out/ckpt.pt when it exists
    stop_after: int = 0  # stop (as if killed) after this step, with the schedule of the full run; 0 = off
    qat_bits: int = 0  # late QAT width (e.g. 6); 0 = off
    qat_scheme: str = "rtn"  # qpack quantizer the fake quant uses (rtn runs on the device, others on CPU)
    qat_group_size: int = 0  # QAT scale group size; 0 = one scale per row
    qat_threshold: float = 0.15  # QAT switches on once the LR scale falls below this
    qat_mlp_bits: int = 0  # width for the MLP matrices under QAT (e.g. 4, #951); 0 = qat_bits
    crownq_lambda: float = 0.0  # weight of the CROWN-Q penalty; 0 = off
    crownq_bits: int = 6  # target width the CROWN-Q penalty assumes (qpack mode)
    crownq_mode: str = "qpack"  # qpack: h*delta^2/12, delta = rowmax/qmax(bits), all of warmdown;
    #                             record: #693's mean(w^2)*(rowmax/15)^2/12, only while late QAT is on

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the model as GPTConfig.to_dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        return d


# ---------------------------------------------------------------------------------------------- overrides
def _fields(cls) -> dict[str, type]:
    import typing

    return typing.get_type_hints(cls)


def _convert(key: str, text: str, kind: Any) -> Any:
    """Parse `text` as the field's type; errors name the key and the expected type."""
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if getattr(kind, "__origin__", None) is tuple:
            return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        pass
    name = getattr(kind, "__name__", None) or "comma-separated integers"
    raise QpackInputError(f"--{key}={text}: expected {name if kind is not tuple else 'integers'}")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """['--n_layer=4', 'seq_len=256'] -> {'n_layer': 4, 'seq_len': 256}, typed; unknown keys are errors."""
    train_fields = {k: v for k, v in _fields(TrainConfig).items() if k != "model"}
    model_fields = _fields(GPTConfig)
    out: dict[str, Any] = {}
    for item in items:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body:
            raise QpackInputError(f"override {item!r} is not of the form --key=value")
        key, value = body.split("=", 1)
        key = key.replace("-", "_")
        kind = train_fields.get(key) or model_fields.get(key)
        if kind is None:
            import difflib

            close = difflib.get_close_matches(key, [*train_fields, *model_fields], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise QpackInputError(f"unknown option {key!r}{hint}")
        out[key] = _convert(key, value, kind)
    return out


def with_values(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of cfg with train and model fields set by name (model fields validated together)."""
    train_fields = {k: v for k, v in _fields(TrainConfig).items() if k != "model"}
    model_fields = _fields(GPTConfig)
    train_kw: dict[str, Any] = {}
    model_kw: dict[str, Any] = {}
    for key, value in values.items():
        if key in train_fields:
            kind = train_fields[key]
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise QpackInputError(f"option {key!r} must be {kind.__name__}, got {value!r}")
            train_kw[key] = value
        elif key in model_fields:
            model_kw[key] = value
        else:
            raise QpackInputError(f"unknown option {key!r}")
    model = dataclasses.replace(cfg.model, **model_kw) if model_kw else cfg.model
    return dataclasses.replace(cfg, model=model, **train_kw)


def check_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, naming the field."""
    positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "val_batch_size")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise QpackInputError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("max_seconds", "warmup_steps", "threads", "global_batch_tokens", "val_every", "val_tokens", "ckpt_every",
                "stop_after", "weight_decay", "grad_clip", "qat_group_size", "crownq_lambda", "warmdown_iters",
                "adam_weight_decay", "swa_every", "swa_threshold", "qat_mlp_bits"):
        if getattr(cfg, key) < 0:
            raise QpackInputError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.warmdown_frac <= 1.0:
        raise QpackInputError(f"warmdown_frac must be in [0, 1], got {cfg.warmdown_frac}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise QpackInputError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise QpackInputError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise QpackInputError(f"dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.qat_bits and not 2 <= cfg.qat_bits <= 8:
        raise QpackInputError(f"qat_bits must be 0 (off) or 2..8, got {cfg.qat_bits}")
    if cfg.crownq_lambda and not 2 <= cfg.crownq_bits <= 8:
        raise QpackInputError(f"crownq_bits must be in 2..8, got {cfg.crownq_bits}")
    if cfg.qat_mlp_bits and not 2 <= cfg.qat_mlp_bits <= 8:
        raise QpackInputError(f"qat_mlp_bits must be 0 (= qat_bits) or 2..8, got {cfg.qat_mlp_bits}")
    if cfg.qat_mlp_bits and not cfg.qat_bits:
        raise QpackInputError("qat_mlp_bits needs qat_bits > 0 (it only changes the MLP matrices' width)")
    if cfg.crownq_mode not in ("qpack", "record"):
        raise QpackInputError(f"crownq_mode must be qpack or record, got {cfg.crownq_mode!r}")


# ---------------------------------------------------------------------------------------------- data
class TokenStream:
    """The train shards read in order, wrapping around; its position (shard, offset) goes into checkpoints.

    Every rank holds the same stream and advances it identically; each takes its own slice of each window,
    so the ranks see disjoint tokens and together exactly what one process with world x the batch would.
    """

    def __init__(self, paths: list[Path], vocab_size: int):
        self.paths, self.vocab_size = paths, vocab_size
        self.shard, self.offset = 0, 0
        self._cache: dict[int, np.ndarray] = {}  # the current shard and the one a window peeked into
        self.tokens = self._load(0)

    def _load(self, i: int) -> np.ndarray:
        from qpack.data.shards import read_shard

        if i not in self._cache:
            tokens = read_shard(self.paths[i], self.vocab_size)
            if tokens.size == 0:
                raise QpackFormatError(self.paths[i], Reason.TRUNCATED, "train shard holds no tokens")
            self._cache = {k: v for k, v in self._cache.items() if k == self.shard}
            self._cache[i] = tokens
        return self._cache[i]

    def window(self, n: int) -> np.ndarray:
        """The next n + 1 tokens; the stream advances by n (the last token is the next window's first)."""
        parts, need = [], n + 1
        shard, offset = self.shard, self.offset
        while need:
            tokens = self._load(shard)
            take = tokens[offset: offset + need]
            parts.append(take)
            need -= take.size
            shard, offset = (shard + 1) % len(self.paths), 0
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._advance(n)
        return out

    def _advance(self, n: int) -> None:
        while n:
            step = min(n, self.tokens.size - self.offset)
            self.offset += step
            n -= step
            if self.offset == self.tokens.size:
                self.shard, self.offset = (self.shard + 1) % len(self.paths), 0
                self.tokens = self._load(self.shard)

    def state(self) -> dict[str, int]:
        return {"shard": self.shard, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.shard, self.offset = int(state["shard"]), int(state["offset"])
        self.tokens = self._load(self.shard)


def next_batch(stream: TokenStream, batch: int, seq_len: int, rank: int, world: int, device) -> tuple:
    """This rank's (x, y) of shape (batch, seq_len) from the next window of world * batch * seq_len tokens."""
    local = batch * seq_len
    chunk = stream.window(world * local)[rank * local: rank * local + local + 1]
    t = torch.from_numpy(chunk.astype(np.int64))
    return t[:-1].view(batch, seq_len).to(device), t[1:].view(batch, seq_len).to(device)


def manifest_hash(data_dir: Path) -> str | None:
    """The data folder's manifest hash as qpack.data names it (None when there is none, e.g. hand-made shards)."""
    from qpack.data.manifest import data_manifest_hash

    return data_manifest_hash(data_dir)


# ---------------------------------------------------------------------------------------------- schedule
def lr_scale(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """LR multiplier: linear warmup, flat, then linear warmdown to 0 over the last warmdown_frac of the run."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.warmdown_iters:
        return _seed_warmdown(step, elapsed, cfg)
    progress = step / cfg.max_steps
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    if cfg.warmdown_frac and progress >= 1.0 - cfg.warmdown_frac:
        return max(0.0, (1.0 - progress) / cfg.warmdown_frac)
    return 1.0


def _seed_warmdown(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """The seed records' rule: the last warmdown_iters steps, or with a time cap the last warmdown_iters mean
    step times before it, decay linearly to 0."""
    n = cfg.warmdown_iters
    by_steps = min(1.0, max(cfg.max_steps - step, 0) / n)
    if not cfg.max_seconds:
        return by_steps
    window = n * elapsed / max(step, 1)
    remaining = max(cfg.max_seconds - elapsed, 0.0)
    by_time = remaining / max(window, 1e-9) if remaining <= window else 1.0
    return min(by_steps, by_time)


def in_warmdown(step: int, elapsed: float, cfg: TrainConfig) -> bool:
    if cfg.warmdown_iters:
        return step >= cfg.warmup_steps and _seed_warmdown(step, elapsed, cfg) < 1.0
    progress = step / cfg.max_steps
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    return cfg.warmdown_frac > 0 and progress >= 1.0 - cfg.warmdown_frac


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: GPT, val: np.ndarray, cfg: TrainConfig, device, autocast, luts, rank: int, world: int
             ) -> tuple[float, float | None]:
    """Mean val loss (nats/token) over non-overlapping seq_len windows, and bits per byte when luts are given."""
    n_tok = len(val) - 1 if not cfg.val_tokens else min(len(val) - 1, cfg.val_tokens)
    n_seq = n_tok // cfg.seq_len
    if n_seq == 0:
        raise QpackInputError(f"the val split has {len(val)} tokens, fewer than seq_len+1={cfg.seq_len + 1}")
    mine = list(range(rank, n_seq, world))
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(mine), cfg.val_batch_size):
        rows = mine[i: i + cfg.val_batch_size]
        seqs = np.stack([val[r * cfg.seq_len: (r + 1) * cfg.seq_len + 1] for r in rows]).astype(np.int64)
        x = torch.from_numpy(seqs[:, :-1]).to(device)
        y = torch.from_numpy(seqs[:, 1:]).to(device)
        with autocast():
            logits = model(x)
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").double()
        count += y.numel()
        if luts is not None:
            from qpack.data.tokenizer import count_bytes

            nbytes += count_bytes(seqs[:, 1:], seqs[:, :-1], luts[0], luts[1])
    if world > 1:
        for t in (nll, count, nbytes):
            dist.all_reduce(t)
    model.train(was_training)
    loss = float(nll / count)
    from qpack.eval.bpb import bits_per_byte

    bpb = bits_per_byte(float(nll), int(nbytes)) if luts is not None and nbytes > 0 else None
    return loss, bpb


def load_luts(data_dir: Path, vocab_size: int):
    """(byte LUTs, space rule) from data_dir/tokenizer.model, or None when the folder has no tokenizer."""
    path = data_dir / "tokenizer.model"
    if not path.is_file():
        return None
    from qpack.data.tokenizer import byte_counting, load_tokenizer

    return byte_counting(load_tokenizer(path), vocab_size)


# ---------------------------------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, rename over it: a reader never sees half a file."""
    from qpack.fsio import atomic_write_with

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write_with(path, write)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, lists and numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _listify(random.getstate()),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tupleify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleify(x):
    return tuple(_tupleify(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------- the run
def system_report(device: torch.device) -> dict[str, Any]:
    """Library versions and hardware, for the head of the run log."""
    import qpack

    libs = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "qpack": qpack.__version__}
    try:
        import flash_attn

        libs["flash_attn"] = flash_attn.__version__
    except Exception:  # noqa: BLE001
        libs["flash_attn"] = None
    hw = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["gpus"] = torch.cuda.device_count()
    return {"libraries": libs, "hardware": hw}


class Trainer:
    """One training run; `run()` returns the summary. Kept as an object so tests can reach the model."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None):
        check_config(cfg)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.echo = log or (lambda s: print(s, flush=True))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise QpackInputError("device=cuda but torch sees no CUDA device")
        self.device = torch.device("cuda", self.local_rank) if want_cuda else torch.device("cpu")
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and want_cuda)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else _nullcontext
        self.out = Path(cfg.out)
        self.data = Path(cfg.data)
        self.per_step_tokens = cfg.batch_size * cfg.seq_len * self.world
        if cfg.global_batch_tokens:
            if cfg.global_batch_tokens % self.per_step_tokens:
                raise QpackInputError(f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple of "
                                      f"batch_size*seq_len*world = {self.per_step_tokens}")
            self.accum = cfg.global_batch_tokens // self.per_step_tokens
        else:
            self.accum = cfg.grad_accum
        self.crownq = None
        if cfg.crownq_lambda:
            from qpack.crownq import crownq_penalty, crownq_record_penalty

            self.crownq = crownq_record_penalty if cfg.crownq_mode == "record" else crownq_penalty

    # -- logging (rank 0 only)
    def log(self, line: str) -> None:
        if self.rank == 0:
            self.echo(line)
            with open(self.out / "train.log", "a") as f:
                f.write(line + "\n")

    def run(self) -> dict[str, Any]:
        try:
            if self.world > 1 and not dist.is_initialized():
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            return self._run()
        finally:
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> dict[str, Any]:
        cfg, mcfg = self.cfg, self.cfg.model
        from qpack.data.shards import find_shards, load_split

        train_paths = find_shards(self.data, "train")
        val = load_split(self.data, "val", mcfg.vocab_size)
        luts = load_luts(self.data, mcfg.vocab_size)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in [*self.out.glob(".ckpt.pt.*.tmp"), *self.out.glob(".final.pt.*.tmp")]:
                stale.unlink()  # left by a run killed while writing; the renamed files are complete
        if self.world > 1:
            dist.barrier()

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.raw = GPT(mcfg).to(self.device)
        model = torch.compile(self.raw) if cfg.compile else self.raw
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.model = model
        opts = self._optimizers()
        ema = {k: v.detach().clone().float() for k, v in self.raw.state_dict().items()} if cfg.ema_decay else None
        stream = TokenStream(train_paths, mcfg.vocab_size)

        step, elapsed, tokens_seen = 0, 0.0, 0
        self.swa, self.swa_count = None, 0  # running sum of SWA snapshots (float32) and how many
        ckpt_path = self.out / "ckpt.pt"
        resumed = cfg.resume and ckpt_path.is_file()
        if resumed:
            step, elapsed, tokens_seen = self._load_checkpoint(ckpt_path, opts, ema, stream)
        elif self.rank == 0:
            (self.out / "metrics.jsonl").write_text("")
            (self.out / "train.log").write_text("")
        if resumed:
            self.log(f"resumed from {ckpt_path} at step {step} ({elapsed:.1f}s of training)")
        else:
            report = system_report(self.device)
            self.log("config " + json.dumps(cfg.to_dict(), sort_keys=True))
            self.log("libraries " + json.dumps(report["libraries"], sort_keys=True))
            self.log("hardware " + json.dumps(report["hardware"], sort_keys=True))
            self.log(f"data {self.data}: {len(train_paths)} train shard(s), {len(val):,} val tokens, "
                     f"bpb {'from tokenizer.model' if luts else 'off (no tokenizer.model)'}; "
                     f"world size {self.world}, grad_accum {self.accum}")
        self.log(f"model: {self.raw.num_params():,} parameters; {self.per_step_tokens * self.accum:,} tokens per step")

        qat_on = False
        pending: list[tuple[int, torch.Tensor]] = []
        val_loss = val_bpb = None
        last_log_t, last_log_tokens = time.perf_counter(), tokens_seen
        t0 = time.perf_counter() - elapsed
        stop_at = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps

        def time_up(now_elapsed: float) -> bool:
            flag = torch.tensor([float(cfg.max_seconds and now_elapsed >= cfg.max_seconds)], device=self.device)
            if self.world > 1 and cfg.max_seconds:
                dist.broadcast(flag, 0)  # every rank must stop at the same step
            return bool(flag.item())

        while step < stop_at and not (cfg.max_seconds and time_up(time.perf_counter() - t0)):
            elapsed = time.perf_counter() - t0
            scale = lr_scale(step, elapsed, cfg)
            if cfg.qat_bits and not qat_on and step >= cfg.warmup_steps and scale < cfg.qat_threshold:
                qat_on = self._enable_qat(step)
            self._set_schedule(opts, step, scale)
            penalize = self.crownq is not None and in_warmdown(step, elapsed, cfg) and (
                qat_on or self.cfg.crownq_mode == "qpack")  # the record form applies only under late QAT
            step_loss = self._train_step(model, stream, opts, penalize)
            swa_now = cfg.swa_every and scale < cfg.swa_threshold and in_warmdown(step, elapsed, cfg)
            if ema is not None:
                with torch.no_grad():
                    for k, v in self.raw.state_dict().items():
                        ema[k].lerp_(v.float(), 1.0 - cfg.ema_decay)
            step += 1
            if swa_now and step % cfg.swa_every == 0:  # only the tail of the warmdown (not the warmup)
                self._swa_add()
            tokens_seen += self.per_step_tokens * self.accum
            pending.append((step, step_loss))

            if step % cfg.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                elapsed = now - t0
                self._flush_metrics(pending)
                rate = (tokens_seen - last_log_tokens) / max(now - last_log_t, 1e-9)
                self.log(f"step {step}/{cfg.max_steps} loss {pending[-1][1]:.4f} lr_scale {scale:.3f} "
                         f"tok/s {rate:,.0f} elapsed {elapsed:.1f}s eta {_fmt_time(self._eta(step, elapsed))}"
                         + (" qat" if qat_on else "") + (" crownq" if penalize else ""))
                pending.clear()
                last_log_t, last_log_tokens = now, tokens_seen
            pause = time.perf_counter()
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.max_steps:
                val_loss, val_bpb = evaluate(self.raw, val, cfg, self.device, self.autocast, luts, self.rank, self.world)
                self.log(f"step {step} val_loss {val_loss:.4f}" + (f" val_bpb {val_bpb:.4f}" if val_bpb else ""))
                self._flush_metrics(pending, {"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
                pending.clear()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                self._flush_metrics(pending)
                pending.clear()
                self._save_checkpoint(ckpt_path, step, elapsed, tokens_seen, opts, ema, stream)
            t0 += time.perf_counter() - pause  # eval and checkpoint time do not count against max_seconds

        elapsed = time.perf_counter() - t0
        self._flush_metrics(pending)
        self._save_checkpoint(ckpt_path, step, elapsed, tokens_seen, opts, ema, stream)
        if step < cfg.max_steps and cfg.stop_after and step >= cfg.stop_after:
            self.log(f"stopped after step {step} (stop_after); resume with the same config")
            return {"steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 3),
                    "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1), "val_loss": None, "val_bpb": None,
                    "params": self.raw.num_params(), "checkpoint": str(ckpt_path), "stopped": True}
        if self.swa_count:
            self.log(f"SWA: final weights are the mean of {self.swa_count} snapshots")
            self.raw.load_state_dict({k: (v / self.swa_count).to(self.raw.state_dict()[k].dtype)
                                      for k, v in self.swa.items()})
        elif ema is not None:
            self.raw.load_state_dict({k: v.to(self.raw.state_dict()[k].dtype) for k, v in ema.items()})
        val_loss, val_bpb = evaluate(self.raw, val, cfg, self.device, self.autocast, luts, self.rank, self.world)
        self._flush_metrics([], {"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "final": True})
        final = self.out / "final.pt"
        tok_path = self.data / "tokenizer.model"
        if self.rank == 0:
            atomic_save({"model": _cpu_state(self.raw), "config": mcfg.to_dict(),
                         "tokenizer": str(tok_path.resolve()) if tok_path.is_file() else None,
                         "data_manifest_hash": manifest_hash(self.data),
                         "seq_len": self.cfg.seq_len}, final)  # eval's default window
        summary = {"steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 3),
                   "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1), "val_loss": val_loss,
                   "val_bpb": val_bpb, "params": self.raw.num_params(), "checkpoint": str(final),
                   "ema": bool(ema is not None), "qat": qat_on, "stopped": False}
        self.log(f"final val_loss {val_loss:.4f}" + (f" val_bpb {val_bpb:.4f}" if val_bpb else "")
                 + f" after {step} steps, {tokens_seen:,} tokens, {elapsed:.1f}s")
        self.log("summary " + json.dumps(summary, sort_keys=True))
        return summary

    # -- pieces of the run
    def _set_schedule(self, opts: list[torch.optim.Optimizer], step: int, scale: float) -> None:
        """Scale every group's LR; ramp Muon's momentum from muon_momentum_start over its warmup."""
        cfg = self.cfg
        frac = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup else 1.0
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
                if isinstance(opt, Muon):
                    g["momentum"] = (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum

    def _train_step(self, model: torch.nn.Module, stream: TokenStream, opts: list[torch.optim.Optimizer],
                    penalize: bool) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss over every rank (on device)."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = next_batch(stream, cfg.batch_size, cfg.seq_len, self.rank, self.world, self.device)
            if self.world > 1:  # all-reduce the gradients only on the last micro-batch
                model.require_backward_grad_sync = micro == self.accum - 1
            with self.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            total = loss / self.accum
            if penalize and micro == self.accum - 1:
                total = total + self._crownq_penalty()
            total.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        mean = loss_sum / self.accum
        if self.world > 1:
            dist.all_reduce(mean)
            mean /= self.world
        return mean

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.cfg
        parts = split_params(self.raw)
        opts: list[torch.optim.Optimizer] = [
            Muon(parts["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)]
        roles = [(k, lr) for k, lr in (("embed", cfg.embed_lr), ("head", cfg.head_lr), ("scalar", cfg.scalar_lr))
                 if parts[k]]
        adam_groups = [{"params": parts[k], "lr": lr} for k, lr in roles]
        if cfg.adam_weight_decay:  # the seeds' AdamW on embeddings and scalars; an untied head keeps plain Adam
            decayed = [{"params": parts[k], "lr": lr} for k, lr in roles if k != "head"]
            heads = [{"params": parts[k], "lr": lr} for k, lr in roles if k == "head"]
            opts.append(torch.optim.AdamW(decayed, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                          weight_decay=cfg.adam_weight_decay))
            if heads:
                opts.append(torch.optim.Adam(heads, betas=(cfg.beta1, cfg.beta2), eps=1e-8))
        else:
            opts.append(torch.optim.Adam(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8))
        for opt in opts:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        return opts

    def _enable_qat(self, step: int) -> bool:
        from .qat import make_fake_quant, set_fake_quant

        cfg = self.cfg
        try:
            fn = make_fake_quant(cfg.qat_scheme, cfg.qat_bits, cfg.qat_group_size or None)
            mlp_fn = make_fake_quant(cfg.qat_scheme, cfg.qat_mlp_bits, cfg.qat_group_size or None) \
                if cfg.qat_mlp_bits else fn
        except ValueError as exc:
            raise QpackInputError(str(exc)) from None
        n = set_fake_quant(self.raw, fn)
        widths = f"int{cfg.qat_bits}"
        if cfg.qat_mlp_bits:
            set_fake_quant(self.raw, mlp_fn, only_mlp=True)
            widths += f", MLP int{cfg.qat_mlp_bits}"
        self.log(f"step {step}: late QAT on ({cfg.qat_scheme} {widths}, {n} matrices)")
        return True

    def _crownq_penalty(self) -> torch.Tensor:
        # the Muon matrices are the tensors compress quantizes to low widths; no Hessian here, so h = 1
        weights = {n: p for n, p in self.raw.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
        if self.cfg.crownq_mode == "record":
            return self.crownq(weights, lam=self.cfg.crownq_lambda)
        return self.crownq(weights, self.cfg.crownq_bits, hdiag=None, lam=self.cfg.crownq_lambda)

    def _swa_add(self) -> None:
        """Add the current weights to the SWA sum."""
        with torch.no_grad():
            state = self.raw.state_dict()
            if self.swa is None:
                self.swa = {k: v.detach().float().clone() for k, v in state.items()}
            else:
                for k, v in state.items():
                    self.swa[k] += v.float()
        self.swa_count += 1

    def _eta(self, step: int, elapsed: float) -> float:
        by_steps = elapsed / max(step, 1) * (self.cfg.max_steps - step)
        if self.cfg.max_seconds:
            return max(0.0, min(by_steps, self.cfg.max_seconds - elapsed))
        return by_steps

    def _flush_metrics(self, pending: list[tuple[int, torch.Tensor]], extra: dict[str, Any] | None = None) -> None:
        """Append the pending per-step train losses (and an eval record) to metrics.jsonl."""
        if self.rank == 0 and (pending or extra):
            with open(self.out / "metrics.jsonl", "a") as f:
                for s, loss in pending:
                    f.write(json.dumps({"step": s, "loss": float(loss)}) + "\n")
                if extra:
                    f.write(json.dumps(extra) + "\n")

    def _save_checkpoint(self, path: Path, step: int, elapsed: float, tokens: int, opts, ema, stream) -> None:
        if self.rank != 0:
            return
        state = {"model": _cpu_state(self.raw), "config": self.cfg.model.to_dict(),
                 "train_config": self.cfg.to_dict(), "step": step, "elapsed": elapsed, "tokens": tokens,
                 "optimizers": [o.state_dict() for o in opts], "rng": rng_state(), "data_position": stream.state(),
                 "ema": ema, "swa": self.swa, "swa_count": self.swa_count,
                 "tokenizer": str((self.data / "tokenizer.model").resolve())
                 if (self.data / "tokenizer.model").is_file() else None,
                 "data_manifest_hash": manifest_hash(self.data)}
        atomic_save(state, path)

    def _load_checkpoint(self, path: Path, opts, ema, stream) -> tuple[int, float, int]:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        except Exception as exc:  # noqa: BLE001  (any unpickling failure means the file is not ours)
            raise QpackFormatError(path, Reason.BAD_HEADER, f"cannot resume from this checkpoint ({exc}); "
                                   "delete it or choose another --out") from None
        if ck.get("config") != self.cfg.model.to_dict():
            raise QpackInputError(f"{path} was written for a different model config; use another --out "
                                  "or resume=false")
        saved = ck.get("train_config", {})
        for key in ("seq_len", "batch_size", "max_steps", "seed"):
            if saved.get(key) != getattr(self.cfg, key):
                raise QpackInputError(f"{path} was written with {key}={saved.get(key)}, this run has "
                                      f"{key}={getattr(self.cfg, key)}; use another --out or resume=false")
        self.raw.load_state_dict(ck["model"])
        for opt, st in zip(opts, ck["optimizers"]):
            opt.load_state_dict(st)
        if ema is not None and ck.get("ema") is not None:
            for k in ema:
                ema[k].copy_(ck["ema"][k])
        if ck.get("swa") is not None:
            self.swa, self.swa_count = ck["swa"], int(ck["swa_count"])
        stream.load_state(ck["data_position"])
        set_rng_state(ck["rng"])
        step = int(ck["step"])
        if self.rank == 0:  # drop metrics a killed run logged after its last checkpoint
            mpath = self.out / "metrics.jsonl"
            lines = mpath.read_text().splitlines() if mpath.is_file() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
            mpath.write_text("".join(ln + "\n" for ln in kept))
        return step, float(ck["elapsed"]), int(ck["tokens"])


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns {steps, tokens, seconds, tokens_per_s, val_loss, val_bpb, ...}."""
    return Trainer(config, log).run()


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """What a run wrote to OUT/metrics.jsonl: {"step", "loss"} per step, {"step", "val_loss", "val_bpb"} per eval."""
    text = (Path(out) / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def config_from_args(preset: str | None, data: str | None, out: str | None, overrides: Iterable[str],
                     scale: str = "full") -> TrainConfig:
    """TrainConfig from a preset name (at a scale), --data/--out and --key=value overrides (later wins)."""
    from .presets import preset_config

    cfg = preset_config(preset, scale) if preset else TrainConfig()
    values = parse_overrides(overrides)
    if data is not None:
        values["data"] = data
    if out is not None:
        values["out"] = out
    return with_values(cfg, values)


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config and the model's parameter count, without data or training."""
    from qpack.models.gpt import count_params

    check_config(cfg)
    return {"config": cfg.to_dict(), "params": count_params(cfg.model)}


def main(argv: list[str] | None = None) -> int:
    """`python -m trainers.gpt.train [--preset=NAME] [--scale=tiny] [--key=value ...]`; torchrun-friendly."""
    args = list(sys.argv[1:] if argv is None else argv)
    preset, scale = None, "full"
    rest = []
    for a in args:
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a.startswith("--scale="):
            scale = a.split("=", 1)[1]
        else:
            rest.append(a)
    try:
        train(config_from_args(preset, None, None, rest, scale))  # the log's last line is the summary as JSON
    except QpackError as exc:
        print(f"qpack: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
