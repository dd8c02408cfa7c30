"""An order-0 entropy coder for byte symbol streams: rANS from `constriction`, driven by stored counts.

Frame version 2 (written by default; all integers little-endian; varint = unsigned LEB128):
    version   1 byte   = 2
    group     varint   symbols per table; 0 = one table for the whole stream
    crc32     4 bytes  CRC-32 of the decoded bytes (catches garbled payloads the coder cannot notice)
    tables    one per group: lo (1 byte), span-1 (1 byte), then `span` varint counts of symbols lo..lo+span-1
    lanes     per group with two or more symbol values: lane length (varint, symbols), then one varint per
              lane: its number of words
    words     the rest: each lane's own ANS stack as uint32 words, lane after lane
A group of n symbols is cut into ceil(n / lane length) lanes of consecutive symbols. Lanes are independent, so
a decoder may run all of them (of every section) in lock step: qpack/loader/parts/ans.py does that with numpy.
The encoder sizes lanes to about `lane_bytes` coded bytes each (each lane costs a few bytes of state).

Frame version 1 (`lane_bytes=0`; the format of older files, still read): version = 1, group, crc32, tables as
above, then the words of one ANS stack on which the groups are pushed in reverse, so they pop in order.

Each table holds exact counts, so the model is the group's empirical distribution and the coded size is
its entropy plus the table. The counts of a group must sum to its length, which is checked against the
promised size before anything is decoded.
"""
from __future__ import annotations

from typing import Iterator

import struct
import zlib

import numpy as np

from ..loader.parts.ans_part import QpkLoadError, ans_parse
from ._validate import check_int
from .base import Codec, CodecError, register_codec

_VERSION = 1
_MAX_LANE_BYTES = 1 << 30
_MAX_VARINT_BYTES = 10


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise CodecError("ans: truncated frame (inside a varint)")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise CodecError("ans: varint longer than 10 bytes")


def _n_groups(size: int, group: int) -> int:
    """How many frequency tables a stream of `size` symbols has."""
    if size == 0:
        return 0
    return 1 if group == 0 or group >= size else -(-size // group)


def _group_tables(sym: np.ndarray, group: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, int, bytes]]:
    """Per group of `sym`: (symbols, counts[256], used symbols, lo, hi, the frame's table bytes for it)."""
    start = 0
    for length in _group_lengths(sym.size, group):
        part = sym[start : start + length]
        start += length
        counts = np.bincount(part, minlength=256)
        used = np.flatnonzero(counts)
        lo, hi = int(used[0]), int(used[-1])
        yield part, counts, used, lo, hi, bytes([lo, hi - lo]) + b"".join(_varint(int(c)) for c in counts[lo : hi + 1])


def _group_lengths(size: int, group: int) -> Iterator[int]:
    """Symbols in each group, lazily: a hostile header may claim billions of groups."""
    n = _n_groups(size, group)
    for i in range(n):
        yield size - group * i if i == n - 1 and n > 1 else (group if n > 1 else size)


def _model(counts: np.ndarray):
    """The categorical model both sides build from the same integer counts (hence the same fixed-point table)."""
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64) / float(counts.sum()), perfect=False)


def lane_length(counts: np.ndarray, lane_bytes: int) -> int:
    """Symbols per lane so that a lane codes to about `lane_bytes` bytes (the group's entropy decides);
    rounded to a multiple of 1024 so that float rounding cannot change it between machines."""
    p = counts[counts > 0] / float(counts.sum())
    bits = float(-(p * np.log2(p)).sum())
    per = int(lane_bytes * 8 / max(bits, 1e-3))
    return max(1024, min(per, 1 << 40) // 1024 * 1024)


@register_codec("ans")
class Ans(Codec):
    """rANS with one exact frequency table per stream or per group of `group` symbols."""

    defaults = {"group": 0, "lane_bytes": 8192}

    def validate(self) -> None:
        check_int(self.name, "group", self.params["group"], 0, 1 << 40)
        check_int(self.name, "lane_bytes", self.params["lane_bytes"], 0, _MAX_LANE_BYTES)

    def encode(self, data: bytes) -> bytes:
        if self.params["lane_bytes"]:
            return self._encode_lanes(bytes(data))
        import constriction

        sym = np.frombuffer(bytes(data), dtype=np.uint8)
        group = self.params["group"]
        header = [bytes([_VERSION]), _varint(group), struct.pack("<I", zlib.crc32(sym.tobytes()))]
        tables, jobs = [], []
        for part, counts, used, lo, hi, table in _group_tables(sym, group):
            tables.append(table)
            if used.size > 1:  # a single-symbol group costs no bits
                jobs.append(((part - lo).astype(np.int32), _model(counts[lo : hi + 1])))
        coder = constriction.stream.stack.AnsCoder()
        for symbols, model in reversed(jobs):
            coder.encode_reverse(symbols, model)
        words = coder.get_compressed().astype("<u4").tobytes()
        return b"".join(header + tables) + words

    def _encode_lanes(self, data: bytes) -> bytes:
        """A version-2 frame: every group cut into lanes of about lane_bytes coded bytes, one stack each."""
        import constriction

        sym = np.frombuffer(data, dtype=np.uint8)
        group = self.params["group"]
        head = [bytes([2]), _varint(group), struct.pack("<I", zlib.crc32(data))]
        tables, lanes, words = [], [], []
        for part, counts, used, lo, hi, table in _group_tables(sym, group):
            tables.append(table)
            if used.size == 1:  # a single-symbol group costs no bits
                continue
            per = lane_length(counts[used], self.params["lane_bytes"])
            model = _model(counts[lo : hi + 1])
            lanes.append(_varint(per))
            symbols = (part - lo).astype(np.int32)
            for a in range(0, part.size, per):
                coder = constriction.stream.stack.AnsCoder()
                coder.encode_reverse(symbols[a : a + per], model)
                w = coder.get_compressed().astype("<u4")
                lanes.append(_varint(w.size))
                words.append(w.tobytes())
        return b"".join(head + tables + lanes + words)

    def decode(self, data: bytes, size: int) -> bytes:
        buf = bytes(data)
        if buf[:1] == b"\x02":
            return self._decode_lanes(buf, size)
        if len(buf) < 1 or buf[0] != _VERSION:
            raise CodecError(f"ans: unknown frame version {buf[0] if buf else 'missing'} (expected 1 or 2)")
        group, pos = _read_varint(buf, 1)
        if pos + 4 > len(buf):
            raise CodecError("ans: truncated frame (no checksum)")
        (crc,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        # Every table takes at least 3 bytes; a frame too short for its tables is refused before any work.
        if _n_groups(size, group) * 3 > len(buf) - pos:
            raise CodecError(f"ans: {_n_groups(size, group):,} groups of {group} symbols cannot fit in a "
                             f"{len(buf):,}-byte frame")
        plan = []
        for length in _group_lengths(size, group):
            if pos + 2 > len(buf):
                raise CodecError("ans: truncated frame (inside a frequency table)")
            lo, span = buf[pos], buf[pos + 1] + 1
            pos += 2
            if lo + span > 256:
                raise CodecError(f"ans: frequency table covers symbols {lo}..{lo + span - 1}, past 255")
            counts = np.zeros(span, dtype=np.int64)
            for i in range(span):
                count, pos = _read_varint(buf, pos)
                if count > length:  # checked on the Python int: a huge varint must not reach int64
                    raise CodecError(f"ans: frequency table claims {count} symbols, the group holds {length}")
                counts[i] = count
            # Checked before decoding: the table must account for exactly this group's share of `size`.
            if int(counts.sum()) != length:
                raise CodecError(f"ans: frequency table counts {int(counts.sum())} symbols, the group holds {length}")
            plan.append((lo, counts, length))
        rest = len(buf) - pos
        if rest % 4:
            raise CodecError(f"ans: payload of {rest} bytes is not a whole number of 32-bit words")
        out = self._decode_groups(buf[pos:], plan, size)
        if zlib.crc32(out) != crc:
            raise CodecError("ans: decoded data fails its CRC-32 (corrupt frame)")
        return out

    @staticmethod
    def _decode_lanes(buf: bytes, size: int) -> bytes:
        """A version-2 frame: parsed and checked by the loader's parser, each lane decoded by constriction."""
        import constriction

        try:
            crc, groups, words = ans_parse(buf, size)
        except QpkLoadError as exc:
            raise CodecError(str(exc)) from None
        out = np.empty(size, dtype=np.uint8)
        for start, length, lo, counts, lanes in groups:
            if counts is None:
                out[start : start + length] = lo
                continue
            model = _model(counts)
            for n, first, nw in lanes:
                try:
                    coder = constriction.stream.stack.AnsCoder(words[first : first + nw].astype(np.uint32))
                    out[start : start + n] = coder.decode(model, n) + lo
                    empty = coder.is_empty()
                except (ValueError, RuntimeError, OverflowError) as exc:
                    raise CodecError(f"ans: corrupt payload ({exc})") from None
                if not empty:
                    raise CodecError("ans: payload holds more data than the tables account for")
                start += n
        out = out.tobytes()
        if zlib.crc32(out) != crc:
            raise CodecError("ans: decoded data fails its CRC-32 (corrupt frame)")
        return out

    @staticmethod
    def _decode_groups(payload: bytes, plan, size: int) -> bytes:
        import constriction

        out = np.empty(size, dtype=np.uint8)
        try:
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
            start = 0
            for lo, counts, length in plan:
                nonzero = np.flatnonzero(counts)
                if nonzero.size == 1:
                    out[start : start + length] = lo + int(nonzero[0])
                else:
                    out[start : start + length] = coder.decode(_model(counts), length) + lo
                start += length
            empty = coder.is_empty()
        except (ValueError, RuntimeError, OverflowError) as exc:  # constriction reports bad words as these
            raise CodecError(f"ans: corrupt payload ({exc})") from None
        if not empty:
            raise CodecError("ans: payload holds more data than the tables account for")
        return out.tobytes()
