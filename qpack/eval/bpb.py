"""Bits per byte as parameter-golf scores it: sum of token NLL in nats / ln 2, over the bytes of the scored text.

Bytes come from three per-piece tables (the tokenizer's byte LUTs): a target token counts its base bytes, plus
one byte for its leading "▁" unless the token before it is a boundary token (control / unknown / unused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ByteLUTs:
    """Per-piece byte tables: base UTF-8 bytes, whether the piece opens with "▁", whether it is a boundary."""

    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray

    def __post_init__(self):
        n = len(self.base_bytes)
        if len(self.has_leading_space) != n or len(self.is_boundary) != n:
            raise ValueError("byte LUTs must have equal lengths")

    @property
    def size(self) -> int:
        return len(self.base_bytes)

    @classmethod
    def from_tuple(cls, luts) -> "ByteLUTs":
        """Accept a ByteLUTs or the (base_bytes, has_leading_space, is_boundary) tuple tokenizer.byte_luts returns."""
        if isinstance(luts, ByteLUTs):
            return luts
        base, lead, boundary = luts
        return cls(np.asarray(base, dtype=np.int64), np.asarray(lead, dtype=bool), np.asarray(boundary, dtype=bool))


def target_bytes(tokens: np.ndarray, luts, space_after_boundary_counts: bool = False) -> np.ndarray:
    """Bytes of each target token tokens[1:], given the token before it (int64 array of len(tokens) - 1).

    space_after_boundary_counts: a leading "▁" right after a boundary token is a real space (tokenizers without
    a dummy prefix, like qpack's own) and counts one byte; parameter-golf's tokenizer adds that "▁" itself.
    """
    from ..data.tokenizer import token_bytes

    luts = ByteLUTs.from_tuple(luts)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= luts.size):
        raise ValueError(f"token id out of range for byte LUTs of size {luts.size}")
    return token_bytes(tokens[1:], tokens[:-1], (luts.base_bytes, luts.has_leading_space, luts.is_boundary),
                       space_after_boundary_counts)


def bits_per_byte(nll_sum_nats: float, n_bytes: int) -> float:
    """(sum NLL in nats / ln 2) / bytes; bytes must be positive."""
    if n_bytes <= 0:
        raise ValueError("cannot score bits per byte over zero bytes")
    return float(nll_sum_nats) / LN2 / float(n_bytes)


@dataclass(frozen=True)
class Score:
    """One mode's totals: mean NLL per token in nats, bits per byte, counts."""

    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int


def score(nll: np.ndarray, nbytes: np.ndarray) -> Score:
    """Totals over per-token NLL (nats) and per-token bytes of the same targets; sums run in float64."""
    nll = np.asarray(nll, dtype=np.float64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    if nll.shape != nbytes.shape:
        raise ValueError(f"{nll.shape[0]} NLL values but {nbytes.shape[0]} byte counts")
    if nll.size == 0:
        raise ValueError("nothing to score")
    total = float(nll.sum())
    n_bytes = int(nbytes.sum())
    return Score(total / nll.size, bits_per_byte(total, n_bytes), int(nll.size), n_bytes)
