"""Token shards in the parameter-golf layout: 256 little-endian int32 header words, then uint16 tokens.

Header word 0 is the magic 20240520, word 1 the version (1), word 2 the token count; the rest are zero.
Files are named `NAME_train_NNNNNN.bin` / `NAME_val_NNNNNN.bin` for any NAME, so parameter-golf's own
`fineweb_*` shards drop in unchanged.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import QpackFormatError, QpackInputError, Reason
from ..fsio import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
TOKEN_DTYPE = np.dtype("<u2")
BOS_ID = 1
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^(?P<name>.+)_(?P<split>train|val)_(?P<index>\d{6})\.bin$")


def shard_name(name: str, split: str, index: int) -> str:
    """The file name of shard `index` of `split`: NAME_split_NNNNNN.bin."""
    if split not in SPLITS:
        raise QpackInputError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not 0 <= index <= 999_999:
        raise QpackInputError(f"shard index {index} does not fit in six digits")
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Iterable[int]) -> int:
    """Write `tokens` (ids in 0..65535) as one golf shard, atomically; returns the bytes written."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise QpackInputError(f"{path}: shard tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise QpackInputError(f"{path}: shard tokens must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise QpackInputError(f"{path}: token ids must lie in 0..65535 to fit uint16")
    if arr.size > np.iinfo(np.int32).max:
        raise QpackInputError(f"{path}: {arr.size} tokens do not fit the int32 count in a shard header")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    body = arr.astype(TOKEN_DTYPE, copy=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, [header.tobytes(), body.tobytes()])
    return HEADER_BYTES + body.nbytes


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header against its file size and return its token count (reads 1 KiB only)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise QpackFormatError(p, Reason.IO, f"cannot read shard: {exc.strerror or exc}") from None
    if len(raw) < HEADER_BYTES:
        raise QpackFormatError(p, Reason.TRUNCATED,
                               f"shard is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise QpackFormatError(p, Reason.BAD_MAGIC,
                               f"not a token shard: magic {int(header[0])}, expected {MAGIC}")
    if int(header[1]) != VERSION:
        raise QpackFormatError(p, Reason.BAD_VERSION,
                               f"shard version {int(header[1])} is not supported (this qpack reads version {VERSION})")
    count = int(header[2])
    if count < 0:
        raise QpackFormatError(p, Reason.BAD_HEADER, f"shard header gives a negative token count ({count})")
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        reason = Reason.TRUNCATED if size < expected else Reason.TRAILING
        raise QpackFormatError(p, reason,
                               f"header says {count} tokens ({expected} bytes) but the file holds {size} bytes; "
                               "the shard is truncated or corrupted: rebuild it")
    return count


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Read one shard as uint16 tokens; the header is checked before any token memory is allocated."""
    p = Path(path)
    count = read_header(p)
    try:
        with open(p, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.fromfile(f, dtype=TOKEN_DTYPE, count=count)
    except OSError as exc:
        raise QpackFormatError(p, Reason.IO, f"cannot read shard: {exc.strerror or exc}") from None
    if tokens.size != count:  # the file changed under us between stat and read
        raise QpackFormatError(p, Reason.TRUNCATED, f"expected {count} tokens, read {tokens.size}")
    tokens = tokens.astype(np.uint16, copy=False)  # native byte order for callers
    if vocab_size is not None and count:
        top = int(tokens.max())
        if top >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise QpackFormatError(p, Reason.LIMIT,
                                   f"token id {top} (first bad one at position {where}) is outside the "
                                   f"tokenizer's vocabulary of {vocab_size}: shard and tokenizer do not match")
    return tokens


def find_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """The `*_split_NNNNNN.bin` files in `directory`, in index order; one NAME prefix only."""
    if split not in SPLITS:
        raise QpackInputError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    d = Path(directory)
    if not d.is_dir():
        raise QpackFormatError(d, Reason.IO, "data directory does not exist; build it with `qpack data build --out DIR`")
    found: dict[str, list[tuple[int, Path]]] = {}
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m.group("split") == split and p.is_file():
            found.setdefault(m.group("name"), []).append((int(m.group("index")), p))
    if not found:
        raise QpackFormatError(d, Reason.IO,
                               f"no {split} shards (NAME_{split}_NNNNNN.bin) in this directory; "
                               "build them with `qpack data build --out DIR`")
    if len(found) > 1:
        raise QpackFormatError(d, Reason.LAYOUT,
                               f"{split} shards with several name prefixes ({', '.join(sorted(found))}); "
                               "keep one data set per directory")
    return [p for _, p in sorted(next(iter(found.values())))]


def load_split(directory: str | os.PathLike, split: str, vocab_size: int | None = None) -> np.ndarray:
    """All tokens of `split` in shard order, as one uint16 array."""
    parts = [read_shard(p, vocab_size) for p in find_shards(directory, split)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def split_at_bos(tokens: np.ndarray, bos_id: int = BOS_ID) -> list[np.ndarray]:
    """Cut a token stream into documents, each starting at a BOS token (a leading fragment is kept as is)."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], len(tokens))
    return [tokens[s:e] for s, e in zip(starts, ends) if e > s]
