"""`ans_cols`: rANS with one table per class of columns, for a matrix's codes stored one symbol per byte.

A trained matrix's input columns differ in spread (its inputs differ in scale; MLP units that rarely fire), so
the codes of a narrow column pile up near the centre and those of a wide one spread out; one order-0 table
averages the two. On the codes of our checkpoints (`benchmarks/codecs/rows.py`) tables per column class take
0.9-2.3% off `ans`, about what the records' context-mixing coder on sorted, transposed rows (lrzip) finds
below the order-0 floor. The encoder ranks the columns by their mean |symbol - median|, cuts them into K
classes of ceil(width / K) columns, estimates the frame at K = 2, 4, 8 (entropies plus exact table sizes),
codes the best and keeps it when it is smaller than the plain `ans` frame. The row width comes from the
caller (`width`; qpack.artifact sets it to a codes matrix's columns); with width 0 the frame is the plain one.
The frame is specified in qpack/loader/parts/ans_cols_part.py (its parser and rebuild live there, shared with
the exported loader).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from ..loader.parts.ans_cols_part import _ACOL_MAX_W, ans_cols_class_sizes, ans_cols_parse, ans_cols_rebuild
from ..loader.parts.base import QpkLoadError
from ._validate import check_int
from .ans_codec import Ans, _varint
from .base import Codec, CodecError, register_codec

_VERSION = 1
_TRIED = (2, 4, 8)  # more classes than 8 cost more in tables than they save on the matrices measured


def column_rank(x: np.ndarray) -> np.ndarray:
    """Each column's rank by mean |symbol - median| (stable: ties keep column order)."""
    spread = np.abs(x.astype(np.int16) - np.int16(np.median(x))).sum(axis=0)
    rank = np.empty(x.shape[1], dtype=np.int64)
    rank[np.argsort(spread, kind="stable")] = np.arange(x.shape[1])
    return rank


def column_classes(rank: np.ndarray, k: int) -> np.ndarray:
    """Each column's class among `k` from its rank: ceil(width / k) columns a class."""
    return rank // -(-rank.size // k)


def class_order(x: np.ndarray, ids: np.ndarray) -> bytes:
    """The symbols of `x` (rows x width) class by class, each class row-major over its columns."""
    return b"".join(x[:, ids == k].tobytes() for k in range(int(ids.max()) + 1))


def estimated_bits(x: np.ndarray, ids: np.ndarray, k: int) -> float:
    """Order-0 entropy of each of the `k` classes plus its `ans` table (exact varint counts), in bits."""
    counts = np.bincount((ids * 256 + x).reshape(-1), minlength=256 * k).reshape(k, 256).astype(np.float64)
    total = 0.0
    for c in counts:
        nz = np.flatnonzero(c)
        span, used = c[nz[0] : nz[-1] + 1], c[nz]
        table = 2 + (np.floor(np.log2(np.maximum(span, 1))) // 7 + 1).sum()
        total += float(-(used * np.log2(used / used.sum())).sum() + 8 * table)
    return total


def _pack_ids(ids: np.ndarray, k: int) -> bytes:
    nb = (k - 1).bit_length()
    bits = ((ids[:, None] >> np.arange(nb)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


@register_codec("ans_cols")
class AnsCols(Codec):
    """rANS with one table per class of columns (see the module)."""

    defaults = {"width": 0, "lane_bytes": 8192}

    def validate(self) -> None:
        check_int(self.name, "width", self.params["width"], 0, _ACOL_MAX_W)
        check_int(self.name, "lane_bytes", self.params["lane_bytes"], 1, 1 << 30)

    def encode(self, data: bytes) -> bytes:
        data = bytes(data)
        head = bytes([_VERSION]) + struct.pack("<I", zlib.crc32(data))
        best = head + _varint(0) + Ans(lane_bytes=self.params["lane_bytes"]).encode(data)
        w = self.params["width"]
        if not w or len(data) % w or len(data) // w < 2:
            return best
        x = np.frombuffer(data, dtype=np.uint8).reshape(-1, w)
        rank = column_rank(x)
        pick = None  # (estimated bits with the class ids, k, ids, columns a class)
        for k in _TRIED:
            sizes = ans_cols_class_sizes(w, k)
            if sizes is not None:
                ids = column_classes(rank, k)
                est = estimated_bits(x, ids, k) + w * (k - 1).bit_length()
                if pick is None or est < pick[0]:
                    pick = (est, k, ids, sizes[0])
        if pick is None:
            return best
        _, k, ids, per_class = pick
        inner = Ans(group=x.shape[0] * per_class, lane_bytes=self.params["lane_bytes"]).encode(class_order(x, ids))
        framed = head + _varint(w) + _varint(k) + _pack_ids(ids, k) + inner
        return framed if len(framed) < len(best) else best

    def decode(self, data: bytes, size: int) -> bytes:
        try:
            crc, w, ids, frame = ans_cols_parse(bytes(data), size)
        except QpkLoadError as exc:  # the shared parser's messages; its varint reader says "ans:"
            msg = str(exc)
            raise CodecError(msg if msg.startswith("ans_cols") else f"ans_cols: {msg}") from None
        try:
            raw = Ans(lane_bytes=self.params["lane_bytes"]).decode(frame, size)
        except CodecError as exc:
            raise CodecError(f"ans_cols: inner frame: {exc}") from None
        out = raw if not w else ans_cols_rebuild(w, ids, np.frombuffer(raw, np.uint8)).tobytes()
        if zlib.crc32(out) != crc:
            raise CodecError("ans_cols: decoded data fails its CRC-32 (corrupt frame)")
        return out
