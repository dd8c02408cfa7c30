"""`ans_ctx`: rANS where a row may be coded in the context of another row: as its difference from it.

Measured on quantized GPT weights (README "## Codecs"), order-0 ANS leaves little on the table inside a
row: tables conditioned on the previous symbol's magnitude, or on a row class, lower the
conditional entropy by under 1% and cost more than that in tables. The structure an order-0 coder misses
is across rows: a trained embedding holds many near-copies of one row (tokens the data rarely shows), which
brotli finds as matches. This codec sorts the rows by a fixed random projection, pairs each with its
nearest neighbours in that order, and codes a row as its difference from a reference row (its parent in a
minimum spanning forest of those pairs) when the estimate says it pays; the other rows are coded order-0.
The frame is specified in qpack/loader/parts/ans_ctx_part.py (its parser and rebuild live there, shared
with the exported loader). The stream is seen as rows of `width` symbols; with width 0 the encoder tries
the model-like widths (2^k, 3 * 2^k, 5 * 2^k) that divide the stream and keeps the one estimated smallest,
and it keeps the plain (order-0) frame whenever that is not larger.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from ..loader.parts.ans_ctx_part import _ACTX_MAX_W, ans_ctx_parse, ans_ctx_rebuild
from ..loader.parts.base import QpkLoadError
from ._validate import check_int
from .ans_codec import Ans, _varint
from .base import Codec, CodecError, register_codec

_VERSION = 1
_ONE = 256  # costs are in 1/256 bit, integers, so that the plan is the same on every machine
_REF_COST = 24 * _ONE  # about what a row's index gap and reference take in the frame
_MIN_W, _MAX_AUTO_W = 32, 1 << 15
_PLAN_SYMBOLS = 1 << 18  # auto width is chosen on a sample of rows of about this many symbols


def _costs(counts: np.ndarray) -> np.ndarray:
    """Code length of each byte value in 1/256 bit under `counts` (add-half smoothed: unseen values cost much)."""
    c = counts.astype(np.float64) + 0.5
    return np.round(-np.log2(c / c.sum()) * _ONE).astype(np.int64)


def _proxy_costs() -> np.ndarray:
    """A first guess at residual costs before any residual is seen: about 1 + 2 log2(1 + |d|) bits."""
    d = np.abs(np.arange(256) - 128)
    return np.round((1 + 2 * np.log2(1 + d)) * _ONE).astype(np.int64)


def _projection(width: int) -> np.ndarray:
    """Fixed +-1 weights (a multiplicative hash of the column): near-equal rows get near-equal projections."""
    h = (np.arange(width, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)) & np.uint64(0xFFFFFFFF)
    return np.where((h >> np.uint64(15)) & np.uint64(1), 1, -1).astype(np.int64)


def plan_rows(sym: np.ndarray, width: int, neighbours: int, exact: bool = True
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows to code against a reference, their references, and the estimated saving (1/256 bit) over order-0.

    Rows are sorted by a projection and each may pair with the `neighbours` rows after it in that order. Residual
    costs are first guessed, then priced by the residuals of the cheapest pairs. With `exact` the references are
    a minimum spanning forest of those pairs (a virtual root stands for "coded order-0", at the row's own cost),
    so each cluster of near-copies is a tree and no reference cycle can arise; without it (quick, to choose a
    width) the saving is that of each row taking its cheapest earlier neighbour."""
    none = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    x = sym.reshape(-1, width)
    n_rows = x.shape[0]
    own = _row_costs(_costs(np.bincount(sym, minlength=256)), x)
    # float64 holds these integer sums (< 2^38) exactly, and BLAS makes the product quick
    order = np.argsort(x.astype(np.float64) @ _projection(width).astype(np.float64), kind="stable")
    xs = x[order]
    # uint8 arithmetic wraps: exactly the frame's (x - x_ref + 128) mod 256
    resid = [xs[o:] - xs[:-o] + np.uint8(128) for o in range(1, min(neighbours, n_rows - 1) + 1)]
    if not resid:
        return none
    cost = _proxy_costs()
    for _ in range(2 if exact else 1):  # choosing a width needs only the sign and rough size of the saving
        best = np.full(n_rows, 1 << 60, dtype=np.int64)  # far above any row, and no overflow
        pick = np.zeros(n_rows, dtype=np.int64)
        for o, r in enumerate(resid, 1):
            c = _row_costs(cost, r)
            better = c < best[o:]
            best[o:][better] = c[better]
            pick[o:][better] = o
        use = best + _REF_COST < own[order]
        if not use.any():
            return none
        chosen = np.concatenate([r[np.flatnonzero(use & (pick == o)) - o] for o, r in enumerate(resid, 1)])
        cost = _costs(np.bincount(chosen.reshape(-1), minlength=256))
    saving = int((own[order][use] - best[use] - _REF_COST).sum())
    if not exact:
        return none[0], none[1], saving
    return _forest(order, own, [_row_costs(cost, r) + _REF_COST for r in resid])


def _row_costs(cost: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's code length under the per-byte `cost` table (int64 sums of int32 lookups)."""
    return np.take(cost.astype(np.int32), rows).sum(axis=1, dtype=np.int64)


def _forest(order: np.ndarray, own: np.ndarray, pair_costs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Kruskal's minimum spanning tree over the rows and a root (node n: coded order-0), oriented from the root:
    (rows with a reference, their references, saving over order-0), rows increasing."""
    n = own.size
    us = [np.full(n, n, np.int64)] + [order[o:] for o in range(1, len(pair_costs) + 1)]
    vs = [np.arange(n, dtype=np.int64)] + [order[:-o] for o in range(1, len(pair_costs) + 1)]
    ws = np.concatenate([own.astype(np.int64)] + pair_costs)
    us, vs = np.concatenate(us), np.concatenate(vs)
    # A pair dearer than both rows' own costs comes after both joined the root (ties too: the stable sort puts
    # root edges first), so it can never join the tree: dropping it first leaves the loop the useful pairs.
    own_of = np.append(own, 0)
    keep = (us == n) | (ws < np.maximum(own_of[us], own_of[vs]))
    us, vs, ws = us[keep], vs[keep], ws[keep]
    up = list(range(n + 1))

    def root(i: int) -> int:
        while up[i] != i:
            up[i] = up[up[i]]
            i = up[i]
        return i

    adj: list[list[int]] = [[] for _ in range(n + 1)]
    taken, total = 0, 0
    for e in np.argsort(ws, kind="stable").tolist():
        a, b = int(us[e]), int(vs[e])
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        up[ra] = rb
        adj[a].append(b)
        adj[b].append(a)
        total += int(ws[e])
        taken += 1
        if taken == n:
            break
    ref = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n + 1, dtype=bool)
    seen[n] = True
    todo = [n]
    while todo:  # orient every edge away from the root: a row's reference is its parent in the tree
        a = todo.pop()
        for b in adj[a]:
            if not seen[b]:
                seen[b] = True
                ref[b] = a if a < n else -1
                todo.append(b)
    rows = np.flatnonzero(ref >= 0)
    return rows, ref[rows], int(own.sum()) - total


def _widths(size: int) -> list[int]:
    """Row widths the encoder tries by itself: 2^k, 3 * 2^k and 5 * 2^k from 32 up (the widths of model
    matrices) that divide `size` and leave at least 2 rows; each costs a planning pass, so not every divisor."""
    out = {m << k for m in (1, 3, 5) for k in range(5, 16)}
    return sorted(w for w in out if _MIN_W <= w <= min(_MAX_AUTO_W, size // 2) and size % w == 0)


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


@register_codec("ans_ctx")
class AnsCtx(Codec):
    """rANS in which a row that nearly repeats another is coded as the difference from it (see the module)."""

    defaults = {"width": 0, "candidates": 8, "lane_bytes": 8192}

    def validate(self) -> None:
        check_int(self.name, "width", self.params["width"], 0, _ACTX_MAX_W)
        check_int(self.name, "candidates", self.params["candidates"], 1, 64)
        check_int(self.name, "lane_bytes", self.params["lane_bytes"], 1, 1 << 30)

    def _ans(self) -> Ans:
        return Ans(lane_bytes=self.params["lane_bytes"])

    def choose_width(self, sym: np.ndarray) -> int:
        """The row width to code with: the parameter, or the divisor estimated best (0: none pays)."""
        w = self.params["width"]
        if w:
            return w if sym.size % w == 0 and sym.size // w >= 2 else 0
        best, best_w = 0, 0
        for w in _widths(sym.size):
            rows = sym.size // w
            step = max(1, rows * w // _PLAN_SYMBOLS)  # a regular sample of rows keeps large streams quick
            sample = sym.reshape(rows, w)[::step].reshape(-1)
            saving = plan_rows(sample, w, 1, exact=False)[2] * step
            if saving > best:
                best, best_w = saving, w
        return best_w

    def encode(self, data: bytes) -> bytes:
        data = bytes(data)
        sym = np.frombuffer(data, dtype=np.uint8)
        head = bytes([_VERSION]) + struct.pack("<I", zlib.crc32(data))
        plain = head + _varint(0) + self._ans().encode(data)
        w = self.choose_width(sym) if sym.size else 0
        if not w:
            return plain
        rows, refs, _ = plan_rows(sym, w, self.params["candidates"])
        if not rows.size:
            return plain
        x = sym.reshape(-1, w)
        keep = np.ones(x.shape[0], dtype=bool)
        keep[rows] = False
        resid = ((x[rows].astype(np.int16) - x[refs] + 128) & 255).astype(np.uint8)
        sub_a = self._ans().encode(x[keep].tobytes())
        sub_b = self._ans().encode(resid.tobytes())
        gaps = np.diff(rows, prepend=-1) - 1
        table = b"".join(_varint(int(g)) for g in gaps) + b"".join(_varint(_zigzag(int(d))) for d in rows - refs)
        framed = head + _varint(w) + _varint(rows.size) + table + _varint(len(sub_a)) + sub_a + sub_b
        return framed if len(framed) < len(plain) else plain

    def decode(self, data: bytes, size: int) -> bytes:
        try:
            crc, w, rows, refs, plain, resid = ans_ctx_parse(bytes(data), size)
            if not w:
                out = self._sub(plain, size)
            else:
                n = rows.size * w
                a = np.frombuffer(self._sub(plain, size - n), dtype=np.uint8)
                b = np.frombuffer(self._sub(resid, n), dtype=np.uint8)
                out = ans_ctx_rebuild(w, size, rows, refs, a, b).tobytes()
        except QpkLoadError as exc:  # the shared parser's messages; its varint reader says "ans:"
            msg = str(exc)
            raise CodecError(msg if msg.startswith("ans_ctx") else f"ans_ctx: {msg}") from None
        if zlib.crc32(out) != crc:
            raise CodecError("ans_ctx: decoded data fails its CRC-32 (corrupt frame)")
        return out

    def _sub(self, frame: bytes, size: int) -> bytes:
        try:
            return self._ans().decode(frame, size)
        except CodecError as exc:
            raise CodecError(f"ans_ctx: sub-frame: {exc}") from None
