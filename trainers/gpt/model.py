"""A small GPT in one file: the parameter-golf baseline shape plus the seed records' options, each a switch.

GPTConfig is the one place a model is described; it serializes to {"arch": "gpt", "version": 1, ...} and
`build_from_config` (the `qpack.models` entry point) rebuilds the model from that dict.
Shapes: x is (B, T, C); q is (B, T, H, D); k and v are (B, T, KV, D) with KV dividing H (GQA).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qpack.errors import QpackInputError

try:  # flash-attn ships CUDA kernels only; CPU runs always take the SDPA path
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001  (a broken flash-attn install must not stop CPU training)
    flash_attn_func = None

ARCH = "gpt"
VERSION = 1
ACTIVATIONS = ("relu2", "leaky_relu2")


@dataclass(frozen=True)
class GPTConfig:
    """Everything that fixes a GPT's parameters and forward pass; validated on construction."""

    vocab_size: int = 1024  # token ids are in [0, vocab_size)
    n_layer: int = 9  # transformer blocks (distinct weights)
    n_embd: int = 512  # model width
    n_head: int = 8  # query heads
    n_kv_head: int = 4  # key/value heads (GQA); must divide n_head
    mlp_mult: float = 2.0  # MLP hidden width = mlp_mult * n_embd
    activation: str = "relu2"  # "relu2" = relu(x)^2, "leaky_relu2" = leaky_relu(x, 0.5)^2
    rope_base: float = 10000.0  # RoPE frequency base
    rope_frac: float = 1.0  # fraction of each head's dims that RoPE rotates (partial RoPE < 1; 0 = no RoPE)
    qk_norm: bool = True  # RMS-normalize q and k, then a learned per-head gain on q
    tie_embeddings: bool = True  # the output head reuses the token embedding
    logit_softcap: float = 30.0  # logits = cap * tanh(logits / cap); 0 turns it off
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    # seed-record options, all off by default
    unet_skips: bool = False  # U-Net: the first half's outputs feed the second half through learned gains
    recur_layers: tuple[int, ...] = ()  # depth recurrence: this contiguous run of layers executes twice
    xsa_last: int = 0  # exclusive self attention on the last k layers (remove the own-value component)
    bigram_buckets: int = 0  # BigramHash embedding: hash (previous, current) token into this many buckets
    bigram_dim: int = 128  # width of the BigramHash table before its projection to n_embd
    smear_gate: bool = False  # SmearGate: blend each position's embedding with the previous one's
    value_residual: bool = False  # every layer mixes its values with the first layer's (learned weight)

    def __post_init__(self) -> None:
        hints = {"vocab_size": int, "n_layer": int, "n_embd": int, "n_head": int, "n_kv_head": int,
                 "xsa_last": int, "bigram_buckets": int, "bigram_dim": int,
                 "mlp_mult": float, "rope_base": float, "rope_frac": float, "logit_softcap": float,
                 "norm_eps": float, "qk_norm": bool, "tie_embeddings": bool, "unet_skips": bool,
                 "smear_gate": bool, "value_residual": bool, "activation": str}
        for name, kind in hints.items():
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
            elif kind is int and isinstance(value, bool) or not isinstance(value, kind):
                _bad(name, f"must be {kind.__name__}, got {value!r}")
        recur = self.recur_layers
        if isinstance(recur, list):
            recur = tuple(recur)
            object.__setattr__(self, "recur_layers", recur)
        if not isinstance(recur, tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in recur):
            _bad("recur_layers", f"must be a tuple of layer indices, got {recur!r}")

        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "bigram_dim"):
            if getattr(self, name) <= 0:
                _bad(name, f"must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            _bad("n_head", f"{self.n_head} does not divide n_embd={self.n_embd}")
        if self.n_head % self.n_kv_head:
            _bad("n_kv_head", f"{self.n_kv_head} does not divide n_head={self.n_head}")
        if self.mlp_mult <= 0 or int(self.mlp_mult * self.n_embd) < 1:
            _bad("mlp_mult", f"must give a hidden width >= 1, got {self.mlp_mult}")
        if self.activation not in ACTIVATIONS:
            _bad("activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.rope_frac <= 1.0:
            _bad("rope_frac", f"must be in [0, 1], got {self.rope_frac}")
        if self.rope_frac > 0 and self.rotary_dims < 2:
            _bad("rope_frac", f"{self.rope_frac} rotates fewer than 2 of {self.head_dim} head dims")
        if self.rope_base <= 0:
            _bad("rope_base", f"must be positive, got {self.rope_base}")
        if self.logit_softcap < 0:
            _bad("logit_softcap", f"must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.norm_eps <= 0:
            _bad("norm_eps", f"must be positive, got {self.norm_eps}")
        if recur:
            if any(not 0 <= i < self.n_layer for i in recur):
                _bad("recur_layers", f"{list(recur)} has an index outside 0..{self.n_layer - 1}")
            if list(recur) != list(range(recur[0], recur[0] + len(recur))):
                _bad("recur_layers", f"{list(recur)} must be increasing and contiguous, like (3, 4)")
        if not 0 <= self.xsa_last <= self.n_layer:
            _bad("xsa_last", f"must be in 0..{self.n_layer}, got {self.xsa_last}")
        if self.bigram_buckets < 0 or self.bigram_buckets == 1:
            _bad("bigram_buckets", f"must be 0 (off) or >= 2, got {self.bigram_buckets}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: an even number, rope_frac of the head rounded down."""
        return int(self.head_dim * self.rope_frac) // 2 * 2

    @property
    def schedule(self) -> list[int]:
        """The order in which layers execute (the recurrent run appears twice)."""
        order = list(range(self.n_layer))
        if self.recur_layers:
            end = self.recur_layers[-1] + 1
            order = order[:end] + list(self.recur_layers) + order[end:]
        return order

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the arch name and format version."""
        d = dataclasses.asdict(self)
        d["recur_layers"] = list(self.recur_layers)
        return {"arch": ARCH, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Inverse of to_dict; rejects another arch, a newer version and unknown fields."""
        if not isinstance(d, dict):
            raise QpackInputError(f"GPT config must be a dict, got {type(d).__name__}")
        d = dict(d)
        arch = d.pop("arch", ARCH)
        version = d.pop("version", VERSION)
        if arch != ARCH:
            raise QpackInputError(f"GPT config: arch is {arch!r}, expected {ARCH!r}")
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise QpackInputError(f"GPT config: version {version!r} is not supported (this code reads 1..{VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QpackInputError(f"GPT config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _bad(field: str, problem: str) -> None:
    raise QpackInputError(f"GPTConfig.{field} {problem}")


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class Linear(nn.Linear):
    """Bias-free linear layer with an optional straight-through fake quantizer on its weight (late QAT)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fake_quant: Callable[[torch.Tensor], torch.Tensor] | None = None
        if zero_init:  # output projections start at zero so each block starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.fake_quant is not None:
            # forward sees the quantized weight, backward passes the gradient straight through
            w = w + (self.fake_quant(w) - w).detach()
        return F.linear(x, w)


class Rotary(nn.Module):
    """RoPE on the first `dims` channels of each head (half-split layout); the rest pass unchanged."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / max(dims, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 0:
            return x
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
        rot, rest = x[..., : self.dims].float(), x[..., self.dims:]
        x1, x2 = rot.chunk(2, dim=-1)
        y = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((y, rest), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on (B, T, H|KV, D) tensors: flash-attn on CUDA when installed, else torch SDPA."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, xsa: bool, mixes_values: bool):
        super().__init__()
        self.cfg, self.xsa = cfg, xsa
        h, kv, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = Linear(cfg.n_embd, h * d)
        self.k = Linear(cfg.n_embd, kv * d)
        self.v = Linear(cfg.n_embd, kv * d)
        self.proj = Linear(h * d, cfg.n_embd, zero_init=True)
        self.rotary = Rotary(cfg.rotary_dims, cfg.rope_base)
        if cfg.qk_norm:
            self.q_gain = nn.Parameter(torch.full((h,), 1.5))
        if mixes_values:  # weight of this layer's own values against the first layer's
            self.v_lambda = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x).view(b, t, cfg.n_head, cfg.head_dim)
        k = self.k(x).view(b, t, cfg.n_kv_head, cfg.head_dim)
        v = self.v(x).view(b, t, cfg.n_kv_head, cfg.head_dim)
        if v_first is None:
            v_first = v
        elif hasattr(self, "v_lambda"):
            lam = self.v_lambda.to(v.dtype)  # keep bf16 values bf16 under autocast (flash-attn needs it)
            v = lam * v + (1 - lam) * v_first.to(v.dtype)
        if cfg.qk_norm:
            q, k = rms_norm(q, cfg.norm_eps), rms_norm(k, cfg.norm_eps)
        q, k = self.rotary(q), self.rotary(k)
        if cfg.qk_norm:
            q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        q, k = q.to(v.dtype), k.to(v.dtype)  # autocast may leave the norms in fp32
        y = attend(q, k, v)
        if self.xsa:
            # exclusive self attention: drop the part of each output that points along the token's own value
            vh = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=2).to(y.dtype)
            coef = (y * vh).sum(-1, keepdim=True) / (vh.pow(2).sum(-1, keepdim=True) + cfg.norm_eps)
            y = y - coef * vh
        return self.proj(y.reshape(b, t, cfg.n_embd)), v_first


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.n_embd)
        self.fc = Linear(cfg.n_embd, hidden)
        self.proj = Linear(hidden, cfg.n_embd, zero_init=True)
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, xsa: bool, mixes_values: bool):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg, xsa, mixes_values)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.n_embd))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.n_embd))

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, v_first = self.attn(rms_norm(x, self.eps), v_first)
        x = x + self.attn_scale.to(a.dtype) * a
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x, self.eps))
        return x, v_first


class GPT(nn.Module):
    """forward(idx: LongTensor[B, T]) -> float32 logits[B, T, vocab_size]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        nn.init.normal_(self.tok_emb.weight, std=0.005 if cfg.tie_embeddings else 0.02)
        if cfg.bigram_buckets:
            self.bigram_emb = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
            nn.init.normal_(self.bigram_emb.weight, std=0.02)
            self.bigram_proj = Linear(cfg.bigram_dim, cfg.n_embd, zero_init=True)  # starts as a no-op
        if cfg.smear_gate:
            self.smear = nn.Parameter(torch.full((cfg.n_embd,), -3.0))  # sigmoid(-3) ~ 5% of the previous token
        schedule = cfg.schedule
        # a layer mixes values when some earlier executed layer has already produced the first values
        self.blocks = nn.ModuleList(
            Block(cfg, xsa=i >= cfg.n_layer - cfg.xsa_last,
                  mixes_values=cfg.value_residual and (i != schedule[0] or schedule.count(i) > 1))
            for i in range(cfg.n_layer))
        self.n_enc = len(schedule) // 2
        if cfg.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, len(schedule) - self.n_enc), cfg.n_embd))
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, zero_init=True)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def bigram_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Bucket of each (previous, current) pair; position 0 has no previous token and gets the last bucket."""
        n = self.cfg.bigram_buckets
        pair = torch.bitwise_xor(idx[:, 1:] * 1_000_003, idx[:, :-1] * 92_821) % (n - 1)
        first = torch.full_like(idx[:, :1], n - 1)
        return torch.cat((first, pair), dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.tok_emb(idx)
        if cfg.bigram_buckets:
            x = x + self.bigram_proj(self.bigram_emb(self.bigram_ids(idx)))
        x = rms_norm(x, cfg.norm_eps)
        if cfg.smear_gate:
            g = torch.sigmoid(self.smear).to(x.dtype)
            x = torch.cat((x[:, :1], x[:, 1:] + g * (x[:, :-1] - x[:, 1:])), dim=1)
        v_first, skips = None, []
        for pos, i in enumerate(self.cfg.schedule):
            if cfg.unet_skips and pos >= self.n_enc and skips:
                x = x + self.skip_weights[pos - self.n_enc].to(x.dtype) * skips.pop()
            x, v_first = self.blocks[i](x, v_first)
            if cfg.unet_skips and pos < self.n_enc:
                skips.append(x)
        x = rms_norm(x, cfg.norm_eps)
        head = self.tok_emb.weight if cfg.tie_embeddings else self.lm_head.weight
        logits = F.linear(x, head).float()
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits


def build_from_config(config: dict[str, Any]) -> GPT:
    """The `qpack.models` entry point: a GPT from a config dict (as written by GPTConfig.to_dict)."""
    return GPT(GPTConfig.from_dict(config))


def count_params(cfg: GPTConfig) -> int:
    """Parameter count of a config without keeping the model."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


__all__ = ["GPT", "GPTConfig", "Linear", "attend", "build_from_config", "count_params"]
