"""ANS frames of the `ans` codec (versions 1 and 2) parsed, checked and decoded with numpy alone.

This module is both a library module (qpack/codecs/ans_codec.py parses frames with it) and a part of the
exported loader (the text below the PART marker is pasted into qpack_load.py). It repeats constriction's
arithmetic exactly: a stack rANS coder with a 64-bit state, 32-bit words and 24-bit probabilities, whose
categorical model is the "fast" fixed-point quantization of the stored counts. A version-2 frame cuts each
group into lanes, each an independent such stack, so that every lane of every section decodes in lock step:
one numpy operation per step serves thousands of lanes. Frame layouts are specified in docs/FORMAT.md.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from .base import _CODECS, QpkLoadError, _err

# PART
_PREC = 24
_LB = 10  # lookup buckets per table: 2^_LB


def _uv(b, p):
    # Unsigned LEB128 varint at b[p]; returns (value, next position).
    v = 0
    for i in range(10):
        if p + i >= len(b):
            _err("ans: truncated frame")
        v |= (b[p + i] & 127) << 7 * i
        if b[p + i] < 128:
            return v, p + i + 1
    _err("ans: varint longer than 10 bytes")


def ans_cdf(counts):
    """constriction's fast quantized CDF of `counts` (int64, >= 2 entries): span + 1 ints ending at 2**24."""
    p = counts.astype(np.float64) / float(counts.sum())
    cum = np.cumsum(p)  # sequential sums, as constriction adds them
    norm = float(cum[-1])
    n = len(counts)
    scale = float((1 << _PREC) - n) / norm
    left = np.concatenate([[0.0], cum[:-1]]) * scale
    return np.concatenate([left.astype(np.int64) + np.arange(n), [1 << _PREC]])


def ans_parse(b, size):
    """Check a frame against the promised `size` before any work; returns (crc, groups, words).

    groups: [(start, length, lo, counts or None, lanes)] where lanes is [(n_symbols, first_word, n_words)]
    (a version-1 frame has one lane holding every coded group, on one stack); counts is None for a group
    of one symbol value, which costs no bits."""
    if not b or b[0] not in (1, 2):
        _err("ans: unknown frame version")
    ver = b[0]
    group, p = _uv(b, 1)
    if p + 4 > len(b):
        _err("ans: truncated frame")
    crc = struct.unpack_from("<I", b, p)[0]
    p += 4
    ng = 0 if size == 0 else 1 if group == 0 or group >= size else -(-size // group)
    if ng * 3 > len(b) - p:  # every table takes at least 3 bytes
        _err("ans: frame too short for its tables")
    groups = []
    for g in range(ng):
        length = size - group * g if g == ng - 1 else (group if ng > 1 else size)
        if p + 2 > len(b):
            _err("ans: truncated frame")
        lo, span = b[p], b[p + 1] + 1
        p += 2
        if lo + span > 256:
            _err("ans: frequency table runs past symbol 255")
        counts = []
        for _ in range(span):
            c, p = _uv(b, p)
            if c > length:
                _err("ans: frequency table count too large")
            counts.append(c)
        if sum(counts) != length:
            _err(f"ans: frequency table counts {sum(counts)} symbols, the group holds {length}")
        counts = np.array(counts, dtype=np.int64)
        nz = np.flatnonzero(counts)
        if len(nz) == 1:
            lo, counts = lo + int(nz[0]), None
        groups.append([g * group, length, lo, counts, []])
    coded = [g for g in groups if g[3] is not None]
    if ver == 2:
        for g in coded:
            per, p = _uv(b, p)
            if per < 1:
                _err("ans: lane length 0")
            n = -(-g[1] // per)
            if n > len(b) - p:  # every lane's word count takes at least one byte
                _err("ans: frame too short for its lanes")
            for j in range(n):
                w, p = _uv(b, p)
                g[4].append((min(per, g[1] - j * per), w))
    rest = len(b) - p
    if rest % 4:
        _err("ans: payload is not whole 32-bit words")
    words = np.frombuffer(b, dtype="<u4", offset=p)
    if ver == 1:
        if coded:
            coded[0][4].append((-1, len(words)))  # one stack for all groups (-1: read by _ans_v1)
    elif sum(w for g in coded for _, w in g[4]) != len(words):
        _err("ans: lane word counts disagree with the payload")
    at = 0
    for g in coded:
        g[4] = [(n, at + sum(w for _, w in g[4][:j]), w) for j, (n, w) in enumerate(g[4])]
        at += sum(w for _, _, w in g[4])
    return crc, groups, words


def _ans_init(words, first, n):
    # constriction's AnsCoder.from_compressed: pop the top word (never 0), then one more if the state is small.
    if n == 0:
        return 0, first
    top = int(words[first + n - 1])
    if top == 0:
        _err("ans: stack ends in a zero word")
    end = first + n - 1
    if end > first:
        end -= 1
        top = top << 32 | int(words[end])
    return top, end


def ans_lanes(words, tables, lanes, state=None):
    """Decode independent lanes in lock step. tables: [(cdf, symbol values)]; lanes: [(table, n, first_word,
    n_words)]; returns one uint8 array per lane. Each lane must end with its state 0 and every word read.
    With `state` (x, next word) one lane continues a stack instead: returns (its symbols, the new state)."""
    m = len(lanes)
    if not m:
        return []
    order = sorted(range(m), key=lambda i: -lanes[i][1])
    L = [lanes[i] for i in order]
    n = np.array([x[1] for x in L], dtype=np.int64)
    st = np.zeros(m, dtype=np.uint64)
    ptr = np.zeros(m, dtype=np.int64)
    lo = np.array([x[2] for x in L], dtype=np.int64)
    for i, x in enumerate(L):
        st[i], ptr[i] = state or _ans_init(words, x[2], x[3])
    # Every table's entries side by side; lut[table * 2^B + (q >> 24-B)] is the first entry whose interval
    # reaches q's bucket, and a few steps along `right` (the next cumulative) finish the search exactly.
    left, right, sym, lut, at = [], [], [], [], 0
    for c, v in tables:
        left.append(c[:-1])
        right.append(c[1:])
        sym.append(v)
        lut.append(np.searchsorted(c, np.arange(1 << _LB) << _PREC - _LB, "right") - 1 + at)
        at += len(v)
    left, right = (np.concatenate(a).astype(np.uint64) for a in (left, right))
    prob, sym, lut = right - left, np.concatenate(sym), np.concatenate(lut).astype(np.int64)
    tb = np.array([x[0] << _LB for x in L], dtype=np.int64)
    w = words.astype(np.uint64)
    T = int(n[0])
    out = np.zeros((T, m), dtype=np.uint8)
    mask, b32, sh, lim, bsh = (np.uint64(v) for v in ((1 << _PREC) - 1, 32, _PREC, 1 << 32, _PREC - _LB))
    k = m
    t = 0
    while t < T:
        while n[k - 1] <= t:
            k -= 1
        stop = int(n[k - 1])
        s, pt, lw, bs = st[:k], ptr[:k], lo[:k], tb[:k]
        for t in range(t, stop):
            q = s & mask
            i = lut[bs + (q >> bsh).view(np.int64)]
            adv = right[i] <= q
            while adv.any():
                i += adv
                adv = right[i] <= q
            out[t, :k] = sym[i]
            s = (s >> sh) * prob[i] + (q - left[i])
            j = np.flatnonzero((s < lim) & (pt > lw))
            if len(j):
                pt[j] -= 1
                s[j] = (s[j] << b32) | w[pt[j]]
        st[:k] = s
        t = stop
    if state:
        return out[:, 0], (int(st[0]), int(ptr[0]))
    if st.any() or (ptr != lo).any():
        _err("ans: payload disagrees with the tables")
    res = [None] * m
    outT = out.T
    for j, i in enumerate(order):
        res[i] = outT[j, : L[j][1]]
    return res


def _ans_v1(words, coded, out):
    # Version 1 with several groups: one stack, group after group, so one lane continued table by table.
    x = _ans_init(words, 0, len(words))
    for g in coded:
        if g[1]:
            out[g[0] : g[0] + g[1]], x = ans_lanes(words, [_table(g)], [(0, g[1], 0, 0)], x)
    if x[0] or x[1]:
        _err("ans: payload disagrees with the tables")


def _table(g):
    return ans_cdf(g[3]), (g[2] + np.arange(len(g[3]))).astype(np.uint8)


def _ans(items):
    # Decode many ans sections at once: every lane of every section joins one lock-step batch.
    outs, tables, lanes, where, base = [], [], [], [], 0
    words_all = []
    for data, size, _ in items:
        crc, groups, words = ans_parse(bytes(data), size)
        out = np.zeros(size, dtype=np.uint8)
        coded = [g for g in groups if g[3] is not None]
        for g in groups:
            if g[3] is None:
                out[g[0] : g[0] + g[1]] = g[2]
        if coded and coded[0][4][0][0] == -1:
            if len(coded) > 1:
                _ans_v1(words, coded, out)
                coded = []
            else:
                coded[0][4] = [(coded[0][1], 0, len(words))]
        for g in coded:
            tables.append(_table(g))
            at = g[0]
            for n, first, nw in g[4]:
                lanes.append((len(tables) - 1, n, base + first, nw))
                where.append((len(outs), at, n))
                at += n
        words_all.append(words)
        base += len(words)
        outs.append((out, crc))
    allw = np.concatenate(words_all) if words_all else np.zeros(0, np.uint32)
    for dec, (o, at, n) in zip(ans_lanes(allw, tables, lanes), where):
        outs[o][0][at : at + n] = dec
    res = []
    for out, crc in outs:
        raw = out.tobytes()
        if zlib.crc32(raw) != crc:
            _err("ans: decoded data fails its CRC-32")
        res.append(raw)
    return res


_CODECS["ans"] = (_ans, {"group": range((1 << 40) + 1), "lane_bytes": range((1 << 30) + 1)})
