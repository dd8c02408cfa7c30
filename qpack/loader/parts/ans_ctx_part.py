"""Frames of the `ans_ctx` codec parsed, checked and rebuilt with numpy alone (ANS sub-frames go to the ans part).

An `ans_ctx` frame codes a byte stream seen as rows of `width` symbols. Some rows are coded in context: as
the difference from a reference row (another row of the same section, decoded before it), so a row that
nearly repeats another costs the entropy of the small differences, not of its values. The rest are coded
order-0. Both streams are `ans` version-2 frames, so their lanes join the ans part's lock-step batch.

This module is a library module (qpack/codecs/ans_ctx_codec.py parses frames with it) and a part of the
exported loader (the text below the PART marker is pasted into qpack_load.py after the ans part).

Frame version 1 (integers little-endian; varint = unsigned LEB128):
    version   1 byte   = 1
    crc32     4 bytes  CRC-32 of the decoded bytes
    width     varint   symbols per row; 0 = no rows: the rest is one `ans` frame of the whole stream
    (width > 0, the stream length a multiple of it:)
    count     varint   P, rows coded against a reference row
    rows      P varints: the gaps between those rows' indices (the first counted from -1), increasing
    refs      P varints: zigzag(row - reference); a reference is any other row, the graph has no cycle
    length    varint   bytes of the first sub-frame
    plain     `ans` frame of the other rows, in row order ((rows - P) * width symbols)
    residual  `ans` frame (the rest) of the P rows, in row order: (x - x_ref + 128) mod 256 per symbol
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from .ans_part import _ans, _uv
from .base import _CODECS, _err

# PART
_ACTX_MAX_W = 1 << 30


def ans_ctx_parse(b, size):
    """Check a frame against the promised `size` before any work; returns (crc, width, rows, refs, plain,
    residual): rows and refs int64 arrays, the two sub-frames as bytes (plain alone when width is 0)."""
    if len(b) < 5 or b[0] != 1:
        _err("ans_ctx: unknown frame version or truncated frame")
    crc = struct.unpack_from("<I", b, 1)[0]
    w, p = _uv(b, 5)
    if w == 0:
        return crc, 0, None, None, b[p:], b""
    if w > _ACTX_MAX_W or size % w:
        _err(f"ans_ctx: row width {w} does not divide the {size} bytes promised")
    nr = size // w
    cnt, p = _uv(b, p)
    if cnt > nr or 2 * cnt > len(b) - p:  # each row takes two varints of at least one byte
        _err("ans_ctx: more context rows than the frame or the stream can hold")
    rows = np.zeros(cnt, dtype=np.int64)
    refs = np.zeros(cnt, dtype=np.int64)
    r = -1
    for i in range(cnt):
        g, p = _uv(b, p)
        r += g + 1
        if r >= nr:
            _err("ans_ctx: context row past the last row")
        rows[i] = r
    for i in range(cnt):
        z, p = _uv(b, p)
        ref = int(rows[i]) - ((z >> 1) ^ -(z & 1))
        if z == 0 or not 0 <= ref < nr:
            _err("ans_ctx: reference row out of range")
        refs[i] = ref
    n1, p = _uv(b, p)
    if n1 > len(b) - p:
        _err("ans_ctx: truncated frame")
    return crc, w, rows, refs, b[p : p + n1], b[p + n1 :]


def ans_ctx_rebuild(width, size, rows, refs, plain, resid):
    """The decoded stream from the parsed rows and the two decoded sub-streams (numpy uint8 arrays)."""
    nr = size // width
    out = np.zeros((nr, width), dtype=np.uint8)
    coded = np.zeros(nr, dtype=bool)
    coded[rows] = True
    out[~coded] = plain.reshape(-1, width)
    res = resid.reshape(-1, width)
    # Level by level from the order-0 rows: each level is the rows whose reference the last level rebuilt
    # (found in the references sorted), so all the work is linear in the rows, whatever the trees' depth.
    by_ref = np.argsort(refs, kind="stable")
    sref = refs[by_ref]
    cur = np.flatnonzero(~coded[refs])
    done = 0
    while len(cur):
        out[rows[cur]] = res[cur] + out[refs[cur]] + np.uint8(128)
        done += len(cur)
        lo = np.searchsorted(sref, rows[cur], "left")
        n = np.searchsorted(sref, rows[cur], "right") - lo
        at = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        cur = by_ref[at]
    if done != len(rows):  # the rows never reached hang on a reference cycle
        _err("ans_ctx: reference rows form a cycle")
    return out.reshape(-1)


def _ans_ctx(items):
    # Every sub-frame of every section joins one call of the ans part, so all their lanes decode in lock step.
    parsed, subs = [], []
    for data, size, _ in items:
        crc, w, rows, refs, plain, resid = ans_ctx_parse(bytes(data), size)
        n = len(rows) * w if w else 0
        subs += [(plain, size - n, {}), (resid, n, {})] if w else [(plain, size, {})]
        parsed.append((crc, w, size, rows, refs))
    dec = _ans(subs)
    out, at = [], 0
    for crc, w, size, rows, refs in parsed:
        if w:
            raw = ans_ctx_rebuild(w, size, rows, refs, *(np.frombuffer(x, np.uint8) for x in dec[at : at + 2]))
            raw, at = raw.tobytes(), at + 2
        else:
            raw, at = dec[at], at + 1
        if zlib.crc32(raw) != crc:
            _err("ans_ctx: decoded data fails its CRC-32")
        out.append(raw)
    return out


_CODECS["ans_ctx"] = (_ans_ctx, {"width": range(_ACTX_MAX_W + 1), "candidates": range(1, 65),
                                 "lane_bytes": range((1 << 30) + 1)})
