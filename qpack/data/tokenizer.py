"""The sentencepiece tokenizer: training a round-tripping BPE, safe loading, and per-token byte counts.

Bits per byte divide by bytes of text, so the bytes each token stands for must be exact. parameter-golf counts
them from the pieces (`byte_luts` + `count_bytes` reproduce its rule). Our own tokenizer is trained so that
decode(encode(text)) == text, which makes that count equal the UTF-8 length of the text.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import QpackFormatError, QpackInputError, Reason

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPACE = "\u2581"  # sentencepiece's visible space
_MAX_TOKENIZER_BYTES = 64 * 2**20  # a 1024-piece model is ~15 KB; anything huge is not one of ours
_MAX_CHUNK_CHARS = 4000  # sentencepiece skips training sentences over max_sentence_length bytes

# Why each setting: identity normalization and no dummy prefix / whitespace squeezing keep every byte of the
# text, byte fallback covers any character outside the vocabulary, so decode(encode(t)) == t for every t
# without U+2581 (sentencepiece cannot tell that character from a space). No sampling or shuffling of the
# input keeps training deterministic.
TRAINER_SETTINGS: dict = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "max_sentencepiece_length": 16,
    "character_coverage": 0.9995,
    "max_sentence_length": 16384,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": -1,
}
MIN_VOCAB = 256 + 3 + 1  # byte pieces + unk/bos/eos + at least one learned piece


def _spm():
    import sentencepiece as spm

    return spm


def chunk_text(text: str) -> list[str]:
    """Cut text into paragraph-sized pieces whose concatenation is `text` (for fast batched encoding and training)."""
    if not text:
        return []
    parts = re.split(r"(?<=\n\n)", text)
    out: list[str] = []
    for part in parts:
        if len(part) <= _MAX_CHUNK_CHARS:
            if part:
                out.append(part)
            continue
        buf = ""
        for line in part.splitlines(keepends=True):
            if buf and len(buf) + len(line) > _MAX_CHUNK_CHARS:
                out.append(buf)
                buf = ""
            while len(line) > _MAX_CHUNK_CHARS:
                out.append(line[:_MAX_CHUNK_CHARS])
                line = line[_MAX_CHUNK_CHARS:]
            buf += line
        if buf:
            out.append(buf)
    return out


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 1024,
                    num_threads: int = 2):
    """Train the round-tripping BPE on `texts` in-process, write it to `path` atomically, return the processor."""
    if not MIN_VOCAB <= vocab_size <= 65536:
        raise QpackInputError(f"--vocab must lie in {MIN_VOCAB}..65536 (uint16 shards), got {vocab_size}")
    spm = _spm()

    def sentences() -> Iterator[str]:
        for t in texts:
            yield from chunk_text(t)

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size,
                                       num_threads=num_threads, minloglevel=2, **TRAINER_SETTINGS)
    except RuntimeError as exc:
        raise QpackInputError(f"tokenizer training failed: {exc} (a vocabulary of {vocab_size} may need more text)") \
            from None
    from ..fsio import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def load_tokenizer(path: str | os.PathLike):
    """Load a sentencepiece model file; anything else raises QpackFormatError naming the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > _MAX_TOKENIZER_BYTES:
            raise QpackFormatError(p, Reason.LIMIT, f"{size} bytes is too large for a tokenizer model")
        data = p.read_bytes()
    except OSError as exc:
        raise QpackFormatError(p, Reason.IO, f"cannot read tokenizer: {exc.strerror or exc}") from None
    spm = _spm()
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(data)
        ok = sp.get_piece_size() > 0
    except (RuntimeError, OSError, ValueError, TypeError):
        ok = False
    if not ok:
        raise QpackFormatError(p, Reason.BAD_HEADER,
                               "not a sentencepiece tokenizer model (.model); pass the file written by "
                               "`qpack data build` or parameter-golf's fineweb_1024_bpe.model")
    return sp


_PROBE = " a  b\t\n\ufb01 \u00e9 "  # spaces, tab, newline, an NFKC ligature, a composed letter, trailing space


def is_exact(sp) -> bool:
    """Whether the tokenizer keeps text exactly (identity normalizer, no dummy prefix, spaces kept), as ours does.

    Then every "▁" in a piece is one space byte of the text, including one right after BOS. parameter-golf's
    tokenizer (nmt_nfkc, whitespace squeezed) is not exact; its bytes are counted by its own rule.
    """
    try:
        return sp.normalize(_PROBE) == _PROBE.replace(" ", SPACE)
    except AttributeError:  # sentencepiece without normalize(): fall back to a round trip of the probe
        return sp.decode(sp.encode(_PROBE)) == _PROBE and not sp.encode("a", out_type=str)[0].startswith(SPACE)


def byte_luts(sp, vocab_size: int | None = None, exact: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base_bytes int16[V], has_leading_space bool[V], is_boundary bool[V]) as parameter-golf builds them.

    Control, unknown and unused pieces count 0 bytes and are boundaries; byte pieces count 1; other pieces
    their UTF-8 length without a leading "▁". V = max(tokenizer size, vocab_size); ids past the tokenizer
    are boundaries of 0 bytes. With `exact` (for an exact tokenizer, see `is_exact`) a "▁" inside a piece
    counts as the one space byte it decodes to; golf's rule counts its three UTF-8 bytes.
    """
    n = int(sp.get_piece_size())
    size = max(n, vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            lead[i] = True
            piece = piece[1:]
        if exact:
            piece = piece.replace(SPACE, " ")
        base[i] = len(piece.encode("utf-8"))
    return base, lead, boundary


def byte_counting(sp, vocab_size: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], bool]:
    """(luts, space_after_boundary_counts) in the right mode for `sp`: exact text bytes for ours, golf's rule else."""
    exact = is_exact(sp)
    return byte_luts(sp, vocab_size, exact=exact), exact


def token_bytes(tokens: np.ndarray, prev_tokens: np.ndarray, luts: Sequence[np.ndarray],
                space_after_boundary_counts: bool = False) -> np.ndarray:
    """Bytes of text each of `tokens` stands for (int64, same shape), each predicted after its `prev_tokens` entry.

    The one byte rule (training, data build and eval all count with it): base bytes plus one for a leading "▁"
    unless the previous token is a boundary (golf's rule). Our exact tokenizer adds no dummy prefix, so a "▁"
    opening a document after BOS is a real space: with `space_after_boundary_counts` it counts too (golf's text
    is stripped, so its documents never open with one).
    """
    base, lead, boundary = (np.asarray(x) for x in luts)
    t = np.asarray(tokens, dtype=np.int64)
    p = np.asarray(prev_tokens, dtype=np.int64)
    if t.shape != p.shape:
        raise QpackInputError(f"tokens {t.shape} and prev_tokens {p.shape} differ in shape")
    space = lead[t] if space_after_boundary_counts else lead[t] & ~boundary[p].astype(bool)
    return base[t].astype(np.int64) + space.astype(np.int64)


def count_bytes(tokens: np.ndarray, prev_tokens: np.ndarray, luts: Sequence[np.ndarray],
                space_after_boundary_counts: bool = False) -> int:
    """Total of token_bytes: the bytes of text `tokens` stand for."""
    return int(token_bytes(tokens, prev_tokens, luts, space_after_boundary_counts).sum())


def encode_documents(sp, docs: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
    """Encode each document (paragraph chunks in one threaded batch) to a uint16-ready int32 id array."""
    chunks: list[str] = []
    owners: list[int] = []
    for k, d in enumerate(docs):
        parts = chunk_text(d)
        chunks.extend(parts)
        owners.extend([k] * len(parts))
    ids = sp.encode(chunks, num_threads=num_threads) if chunks else []
    per_doc: list[list[int]] = [[] for _ in docs]
    for k, piece_ids in zip(owners, ids):
        per_doc[k].extend(piece_ids)
    return [np.asarray(x, dtype=np.int32) for x in per_doc]


def tokenizer_settings(sp) -> dict:
    """The facts about a tokenizer that the manifest records and eval needs."""
    return {
        "vocab_size": int(sp.get_piece_size()),
        "bos_id": int(sp.bos_id()),
        "eos_id": int(sp.eos_id()),
        "unk_id": int(sp.unk_id()),
        "exact": is_exact(sp),
        "space_after_boundary_counts": is_exact(sp),
    }
