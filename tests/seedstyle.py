"""A GPT written the way parameter-golf's seed records write theirs, plus synthetic Markov data, for tests.

What matters for qpack: forward(input_ids, target_ids) returns the loss, forward_logits(input_ids) the logits;
the token embedding is held in bf16 while linear weights and control tensors (scales, gains, mixes) stay fp32;
the head is tied as F.linear(x, tok_emb.weight); output projections start at zero. `build` is the factory
that `--arch seedstyle:build` names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 300
WIDTH = 64
LAYERS = 2
HEADS = 2


class CastedLinear(nn.Linear):
    """fp32 weights, computed in the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = CastedLinear(dim, dim, bias=False)
        self.k = CastedLinear(dim, dim, bias=False)
        self.v = CastedLinear(dim, dim, bias=False)
        self.attn_out = CastedLinear(dim, dim, bias=False)
        self.fc = CastedLinear(dim, 2 * dim, bias=False)
        self.mlp_out = CastedLinear(2 * dim, dim, bias=False)
        nn.init.zeros_(self.attn_out.weight)
        nn.init.zeros_(self.mlp_out.weight)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))
        self.q_gain = nn.Parameter(torch.full((heads,), 1.5))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        B, T, C = x.shape
        h = F.rms_norm(x, (C,))
        q, k, v = (m(h).view(B, T, self.heads, C // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        q = F.rms_norm(q, (q.size(-1),)) * self.q_gain.to(x.dtype)[None, :, None, None]
        k = F.rms_norm(k, (k.size(-1),))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_scale.to(x.dtype) * self.attn_out(y)
        h = F.rms_norm(x, (C,))
        return x + self.mlp_scale.to(x.dtype) * self.mlp_out(F.relu(self.fc(h)).square())


class SeedGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = WIDTH, layers: int = LAYERS, heads: int = HEADS):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        nn.init.normal_(self.tok_emb.weight, std=0.05)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.softcap = 30.0

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        x0 = x
        for block in self.blocks:
            x = block(x, x0)
        return F.rms_norm(x, (x.size(-1),))

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self._hidden(input_ids), self.tok_emb.weight).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def build() -> SeedGPT:
    """The model in the dtypes the seeds save it in: bf16 embedding, fp32 linear weights and control tensors."""
    return to_seed_dtypes(SeedGPT())


def to_seed_dtypes(model: SeedGPT) -> SeedGPT:
    """Cast in place as the seeds do before saving: everything to bf16, then linears and control tensors back."""
    model.bfloat16()
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.float()
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(k in name for k in ("scale", "gain", "mix")):
            p.data = p.data.float()
    return model


def logits_of(model: SeedGPT, input_ids: torch.Tensor) -> torch.Tensor:
    """A `--forward` function: what forward_logits does, reached from outside the class."""
    return model.forward_logits(input_ids)


def markov_tokens(n: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """An order-1 Markov stream over ids 3..vocab-1: each token has three likely successors (0.6/0.3/0.1)."""
    rng = np.random.default_rng(1234)  # the chain itself is fixed; `seed` only picks the walk
    succ = rng.integers(3, vocab, size=(vocab, 3))
    walk = np.random.default_rng(seed)
    choice = walk.choice(3, size=n, p=[0.6, 0.3, 0.1])
    out = np.empty(n, dtype=np.int64)
    t = 3
    for i in range(n):
        t = int(succ[t, choice[i]])
        out[i] = t
    return out


def train(model: SeedGPT, tokens: np.ndarray, steps: int = 30, seq_len: int = 64, batch: int = 8,
          lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A few Adam steps through forward(input_ids, target_ids), as a seed's training loop calls it (in fp32 here,
    which CPUs run many times faster than bf16; to_seed_dtypes afterwards gives the saved dtypes)."""
    gen = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        starts = gen.integers(0, len(tokens) - seq_len - 1, size=batch)
        rows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]))
        loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def make_data(folder: Path, n_val: int = 3000, n_train: int = 20000) -> Path:
    """A data folder as qpack eval reads it: a 300-piece tokenizer (for byte counts) and Markov shards."""
    from qpack.data.shards import write_shard
    from qpack.data.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "naïve", "café"]
    docs = [" ".join(rng.choice(words, 50)) + ".\n" for _ in range(80)]
    train_tokenizer(docs, folder / "tokenizer.model", vocab_size=VOCAB, num_threads=1)
    write_shard(folder / "mk_val_000000.bin", markov_tokens(n_val, seed=1).astype(np.uint16))
    write_shard(folder / "mk_train_000000.bin", markov_tokens(n_train, seed=2).astype(np.uint16))
    return folder
