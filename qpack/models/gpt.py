"""A small GPT in one file: the parameter-golf baseline shape plus the seed records' options, each a switch.

GPTConfig is the one place a model is described; it serializes to {"arch": "gpt", "version": 1, ...} and
`build_from_config` (the `qpack.models` entry point) rebuilds the model from that dict.
Shapes: x is (B, T, C); q is (B, T, H, D); k and v are (B, T, KV, D) with KV dividing H (GQA).
"""
from __future__ import annotations

import dataclasses
import math
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
RESID_MIXES = ("none", "channel", "mix4")


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
    value_residual_weights: int = 1  # 1: v = l*v + (1-l)*v_first; 2 (#745): v = a*v_first + b*v on every layer
    resid_mix: str = "none"  # block input: none; channel (x/x0 per-channel gains); mix4 (#790: x, 2 last outputs, x0)
    ln_scale: bool = False  # scale each block's normed inputs by 1/sqrt(position + 1) (#691, #745, #790)
    ve_layers: tuple[int, ...] = ()  # value embedding: these executed positions add a shared token table to v
    ve_dim: int = 128  # width of the value-embedding table before its projection to the K/V width
    hash_scale: float = 0.0  # > 0: the bigram/trigram outputs get a learned scalar scale starting here (seeds: 0.05)
    trigram_buckets: int = 0  # TrigramHash embedding: hash (t-2, t-1, t) into this many buckets (#951)
    trigram_dim: int = 64  # width of the TrigramHash table before its projection to n_embd
    kv_share_last: int = 0  # the last N layers reuse the K/V projections of layer max(i - N, 0) (#951 "XSA")
    attn_gate: bool = False  # per-head sigmoid gate on the attention output, from the block input (#745)
    recur_own_controls: bool = False  # repeated layers keep their matrices but get their own gains (#745)
    bos_id: int = 1  # document-start token: SmearGate never blends a BOS with the token before it

    def __post_init__(self) -> None:
        hints = {"vocab_size": int, "n_layer": int, "n_embd": int, "n_head": int, "n_kv_head": int,
                 "xsa_last": int, "bigram_buckets": int, "bigram_dim": int, "value_residual_weights": int,
                 "resid_mix": str, "ln_scale": bool, "ve_dim": int, "hash_scale": float, "trigram_buckets": int,
                 "trigram_dim": int, "kv_share_last": int, "attn_gate": bool, "recur_own_controls": bool,
                 "bos_id": int,
                 "mlp_mult": float, "rope_base": float, "rope_frac": float, "logit_softcap": float,
                 "norm_eps": float, "qk_norm": bool, "tie_embeddings": bool, "unet_skips": bool,
                 "smear_gate": bool, "value_residual": bool, "activation": str}
        for name, kind in hints.items():
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
            elif kind is int and isinstance(value, bool) or not isinstance(value, kind):
                _bad(name, f"must be {kind.__name__}, got {value!r}")
        for name in ("recur_layers", "ve_layers"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
                _bad(name, f"must be a tuple of layer indices, got {value!r}")
        recur = self.recur_layers

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
        if self.trigram_buckets < 0 or self.trigram_buckets == 1:
            _bad("trigram_buckets", f"must be 0 (off) or >= 2, got {self.trigram_buckets}")
        for name in ("ve_dim", "trigram_dim"):
            if getattr(self, name) <= 0:
                _bad(name, f"must be positive, got {getattr(self, name)}")
        if self.value_residual_weights not in (1, 2):
            _bad("value_residual_weights", f"must be 1 or 2, got {self.value_residual_weights}")
        if self.resid_mix not in RESID_MIXES:
            _bad("resid_mix", f"must be one of {RESID_MIXES}, got {self.resid_mix!r}")
        if self.hash_scale < 0:
            _bad("hash_scale", f"must be >= 0 (0 = no scale), got {self.hash_scale}")
        if not 0 <= self.kv_share_last <= self.n_layer:
            _bad("kv_share_last", f"must be in 0..{self.n_layer}, got {self.kv_share_last}")
        executed = len(self.schedule)
        if len(set(self.ve_layers)) != len(self.ve_layers) or any(not 0 <= i < executed for i in self.ve_layers):
            _bad("ve_layers", f"{list(self.ve_layers)} must be distinct positions in 0..{executed - 1}")
        if self.recur_own_controls and not recur:
            _bad("recur_own_controls", "needs recur_layers")

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
        d["ve_layers"] = list(self.ve_layers)
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
        if self.fake_quant is not None and self.training:
            # forward sees the quantized weight, backward passes the gradient straight through; eval sees the
            # float weights, which are what final.pt holds
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


class Borrowed:
    """Calls a module that another block owns, without registering it: its weights are stored and counted once.

    Used for cross-layer K/V sharing and for the matrices of repeated layers that have their own gains.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def _borrow(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Replace owner's submodule `name` by a Borrowed reference to `module`."""
    delattr(owner, name)
    object.__setattr__(owner, name, Borrowed(module))


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
        if cfg.value_residual and cfg.value_residual_weights == 2:
            # #745: (weight of the first layer's values, weight of this layer's own); the first layer's pair is unused
            self.v_mix = nn.Parameter(torch.full((2,), 0.5))
        elif mixes_values:  # weight of this layer's own values against the first layer's
            self.v_lambda = nn.Parameter(torch.full((1,), 0.5))
        if cfg.attn_gate:  # starts almost open: sigmoid(4) = 0.98 on every head
            self.gate = nn.Linear(cfg.n_embd, h, bias=True)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 4.0)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, ve: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x).view(b, t, cfg.n_head, cfg.head_dim)
        k = self.k(x).view(b, t, cfg.n_kv_head, cfg.head_dim)
        v = self.v(x)
        if ve is not None:  # value embedding: token identity re-injected into the values
            v = v + ve.to(v.dtype)
        v = v.view(b, t, cfg.n_kv_head, cfg.head_dim)
        if v_first is None:
            v_first = v
        elif hasattr(self, "v_mix"):
            mix = self.v_mix.to(v.dtype)
            v = mix[0] * v_first.to(v.dtype) + mix[1] * v
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
        if cfg.attn_gate:
            y = y * torch.sigmoid(self.gate(x)).to(y.dtype).unsqueeze(-1)
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
        self.mix_mode = cfg.resid_mix
        self.attn = Attention(cfg, xsa, mixes_values)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.n_embd))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.n_embd))
        if cfg.resid_mix == "channel":  # rows: gain on the stream, gain on x0 (the embedding)
            self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.n_embd), torch.zeros(cfg.n_embd))))
        elif cfg.resid_mix == "mix4":  # gains on the stream, the last two block outputs and x0
            self.resid_mix = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def mix_input(self, x: torch.Tensor, x0: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        """The block's input: the stream itself, or a learned mix of it with x0 (and earlier block outputs)."""
        if self.mix_mode == "none":
            return x
        m = self.resid_mix.to(x.dtype)
        if self.mix_mode == "channel":
            return m[0] * x + m[1] * x0
        y = m[0] * x + m[3] * x0
        for j, out in enumerate(outs[-1:-3:-1]):  # the last and the one before it, where they exist
            y = y + m[1 + j] * out
        return y

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, x0: torch.Tensor | None = None,
                outs: list[torch.Tensor] | None = None, ve: torch.Tensor | None = None, ln: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix_mode != "none":
            x = self.mix_input(x, x0, outs or [])
        h = rms_norm(x, self.eps)
        a, v_first = self.attn(h * ln if ln != 1.0 else h, v_first, ve)
        x = x + self.attn_scale.to(a.dtype) * a
        h = rms_norm(x, self.eps)
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(h * ln if ln != 1.0 else h)
        return x, v_first


class GPT(nn.Module):
    """forward(idx: LongTensor[B, T]) -> float32 logits[B, T, vocab_size]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        nn.init.normal_(self.tok_emb.weight, std=0.005 if cfg.tie_embeddings else 0.02)
        for kind, buckets, dim in (("bigram", cfg.bigram_buckets, cfg.bigram_dim),
                                   ("trigram", cfg.trigram_buckets, cfg.trigram_dim)):
            if buckets:
                emb = nn.Embedding(buckets, dim)
                nn.init.normal_(emb.weight, std=0.02)
                setattr(self, f"{kind}_emb", emb)
                setattr(self, f"{kind}_proj", Linear(dim, cfg.n_embd, zero_init=True))  # starts as a no-op
                if cfg.hash_scale:
                    setattr(self, f"{kind}_scale", nn.Parameter(torch.tensor(cfg.hash_scale)))
        if cfg.smear_gate:
            self.smear = nn.Parameter(torch.full((cfg.n_embd,), -3.0))  # sigmoid(-3) ~ 5% of the previous token
        schedule = cfg.schedule
        # a layer mixes values when some earlier executed layer has already produced the first values
        self.blocks = nn.ModuleList(
            Block(cfg, xsa=i >= cfg.n_layer - cfg.xsa_last,
                  mixes_values=cfg.value_residual and (i != schedule[0] or schedule.count(i) > 1))
            for i in range(cfg.n_layer))
        n = cfg.kv_share_last
        for i in range(cfg.n_layer - n, cfg.n_layer):
            src = max(i - n, 0)
            if n and src != i:  # cross-layer K/V sharing: this layer computes K and V with layer src's matrices
                _borrow(self.blocks[i].attn, "k", self.blocks[src].attn.k)
                _borrow(self.blocks[i].attn, "v", self.blocks[src].attn.v)
        self.recur_blocks = nn.ModuleList()  # repeated executions with their own gains (recur_own_controls)
        self._at: list[nn.Module] = []  # the block object each executed position runs
        seen: set[int] = set()
        for i in schedule:
            if i in seen and cfg.recur_own_controls:
                twin = Block(cfg, xsa=i >= cfg.n_layer - cfg.xsa_last, mixes_values=cfg.value_residual)
                owner = self.blocks[i]
                for part, names in ((twin.attn, ("q", "k", "v", "proj")), (twin.mlp, ("fc", "proj"))):
                    src = owner.attn if part is twin.attn else owner.mlp
                    for name in names:
                        target = getattr(src, name)
                        _borrow(part, name, target.module if isinstance(target, Borrowed) else target)
                self.recur_blocks.append(twin)
                self._at.append(twin)
            else:
                self._at.append(self.blocks[i])
            seen.add(i)
        if cfg.ve_layers:
            kv_dim = cfg.n_kv_head * cfg.head_dim
            self.ve_emb = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
            nn.init.normal_(self.ve_emb.weight, std=0.01)
            if cfg.ve_dim != kv_dim:
                self.ve_proj = Linear(cfg.ve_dim, kv_dim, zero_init=True)
            self.ve_scale = nn.Parameter(torch.tensor(0.1))
            self.ve_gains = nn.Parameter(torch.ones(len(cfg.ve_layers)))  # one gain per position that uses it
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

    def trigram_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Bucket of each (t-2, t-1, t) triple; positions 0 and 1 have no full context and get the last bucket."""
        n = self.cfg.trigram_buckets
        h = idx[:, 2:] * 1_000_003 ^ idx[:, 1:-1] * 92_821 ^ idx[:, :-2] * 68_917
        first = torch.full_like(idx[:, :2], n - 1)[:, : idx.size(1)]
        return torch.cat((first, h % (n - 1)), dim=1)

    def _hash_embedding(self, kind: str, ids: torch.Tensor) -> torch.Tensor:
        out = getattr(self, f"{kind}_proj")(getattr(self, f"{kind}_emb")(ids))
        scale = getattr(self, f"{kind}_scale", None)
        return out * scale.to(out.dtype) if scale is not None else out

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The stream entering the first block (x0): token (+ hash) embeddings, RMS-normed, then SmearGate."""
        cfg = self.cfg
        x = self.tok_emb(idx)
        if cfg.bigram_buckets:
            x = x + self._hash_embedding("bigram", self.bigram_ids(idx))
        if cfg.trigram_buckets:
            x = x + self._hash_embedding("trigram", self.trigram_ids(idx))
        x = rms_norm(x, cfg.norm_eps)
        if cfg.smear_gate:
            g = torch.sigmoid(self.smear).to(x.dtype)
            # a document's first token must not see the previous document's last one
            keep = (idx[:, 1:] != cfg.bos_id).unsqueeze(-1).to(x.dtype)
            x = torch.cat((x[:, :1], x[:, 1:] + keep * g * (x[:, :-1] - x[:, 1:])), dim=1)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.embed(idx)
        x0 = x
        ve_base = None
        if cfg.ve_layers:
            ve_base = self.ve_emb(idx)
            if hasattr(self, "ve_proj"):
                ve_base = self.ve_proj(ve_base)
            ve_base = ve_base * self.ve_scale.to(ve_base.dtype)
        v_first, skips, outs = None, [], []
        for pos, block in enumerate(self._at):
            if cfg.unet_skips and pos >= self.n_enc and skips:
                x = x + self.skip_weights[pos - self.n_enc].to(x.dtype) * skips.pop()
            ve = None
            if ve_base is not None and pos in cfg.ve_layers:
                ve = ve_base * self.ve_gains[cfg.ve_layers.index(pos)].to(ve_base.dtype)
            ln = 1.0 / math.sqrt(pos + 1) if cfg.ln_scale else 1.0
            x, v_first = block(x, v_first, x0, outs, ve, ln)
            if cfg.resid_mix == "mix4":
                outs.append(x)
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
