"""Frames of the `ans_cols` codec parsed, checked and rebuilt with numpy alone (the ANS frame goes to the ans part).

An `ans_cols` frame codes a byte stream seen as rows of `width` symbols (a quantized matrix, one code per byte)
with one order-0 table per class of columns: input columns differ in spread, which one table averages away.
The columns are cut into K classes of c = ceil(width / K) columns (the last class holds the rest); the stream
coded is class 0's symbols row-major over its columns, then class 1's, ..., as one `ans` frame, which the
encoder gives one table per class (group = rows * c). The classes are stored; how they were chosen is the
encoder's business.

This module is a library module (qpack/codecs/ans_cols_codec.py parses frames with it) and a part of the
exported loader (the text below the PART marker is pasted into qpack_load.py after the ans part).

Frame version 1 (integers little-endian; varint = unsigned LEB128):
    version   1 byte   = 1
    crc32     4 bytes  CRC-32 of the decoded bytes
    width     varint   symbols per row; 0 = no classes: the rest is one `ans` frame of the whole stream
    (width > 0, the stream length a multiple of it:)
    classes   varint   K, 2..16, with (K - 1) * ceil(width / K) < width (no empty class)
    ids       ceil(width * b / 8) bytes: each column's class (b = bits of K - 1), b bits per column, LSB first;
              class k < K - 1 holds exactly ceil(width / K) columns
    frame     `ans` frame (the rest) of the width * rows symbols in class order
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from .ans_part import _ans, _uv
from .base import _CODECS, _err

# PART
_ACOL_MAX_W = 1 << 24
_ACOL_MAX_K = 16


def ans_cols_class_sizes(width, k):
    """Columns per class: ceil(width / k) each, the last the rest (None when a class would be empty)."""
    if k < 2:
        return None
    c = -(-width // k)
    last = width - (k - 1) * c
    return None if last < 1 else [c] * (k - 1) + [last]


def ans_cols_parse(b, size):
    """Check a frame against the promised `size` before any work; returns (crc, width, class ids, ans frame):
    ids an int64 array of one class per column (None when width is 0)."""
    if len(b) < 5 or b[0] != 1:
        _err("ans_cols: unknown frame version or truncated frame")
    crc = struct.unpack_from("<I", b, 1)[0]
    w, p = _uv(b, 5)
    if w == 0:
        return crc, 0, None, b[p:]
    if w > _ACOL_MAX_W or size % w:
        _err(f"ans_cols: row width {w} does not divide the {size} bytes promised")
    k, p = _uv(b, p)
    sizes = ans_cols_class_sizes(w, k) if k <= _ACOL_MAX_K else None
    if sizes is None:
        _err(f"ans_cols: {k} column classes cannot cut {w} columns")
    nb = (k - 1).bit_length()
    n = -(-w * nb // 8)
    if n > len(b) - p:
        _err("ans_cols: truncated frame (column classes)")
    bits = np.unpackbits(np.frombuffer(b, np.uint8, n, p), bitorder="little")[: w * nb].reshape(w, nb)
    ids = (bits.astype(np.int64) << np.arange(nb)).sum(axis=1)
    if ids.max() >= k or not np.array_equal(np.bincount(ids, minlength=k), sizes):
        _err("ans_cols: column classes do not have the sizes the frame's width and class count imply")
    return crc, w, ids, b[p + n :]


def ans_cols_rebuild(width, ids, coded):
    """The decoded stream (uint8) from the class-ordered symbols `coded` (uint8, a whole number of rows)."""
    rows = coded.size // width
    out = np.empty((rows, width), dtype=np.uint8)
    at = 0
    for k in range(int(ids.max()) + 1):
        cols = np.flatnonzero(ids == k)
        out[:, cols] = coded[at : at + rows * cols.size].reshape(rows, cols.size)
        at += rows * cols.size
    return out.reshape(-1)


def _ans_cols(items):
    # Every section's ans frame joins one call of the ans part, so all their lanes decode in lock step.
    parsed = [ans_cols_parse(bytes(data), size) for data, size, _ in items]
    dec = _ans([(frame, size, {}) for (_, _, _, frame), (_, size, _) in zip(parsed, items)])
    out = []
    for (crc, w, ids, _), raw in zip(parsed, dec):
        if w:
            raw = ans_cols_rebuild(w, ids, np.frombuffer(raw, np.uint8)).tobytes()
        if zlib.crc32(raw) != crc:
            _err("ans_cols: decoded data fails its CRC-32")
        out.append(raw)
    return out


_CODECS["ans_cols"] = (_ans_cols, {"width": range(_ACOL_MAX_W + 1), "lane_bytes": range((1 << 30) + 1)})
