"""Bit packing for quantized codes: dense widths 1..8 (signed or unsigned), trits, and code layouts.

Codes wider than 8 bits (9..16) have one layout, "planes": each code q as its zigzag symbol z (0, -1, 1, -2, ...
-> 0, 1, 2, 3, ...), the high bytes of all symbols, then their low bytes. Zigzag keeps every code under 128 in
magnitude at high byte 0, so the high plane is nearly constant and the low plane holds the shape of the
distribution: an order-0 coder with one table per plane stays close to the codes' own entropy.

Bit order is little-endian throughout: value i occupies stream bits [i*w, (i+1)*w), least significant
bit first, and stream bit k lives in byte k // 8 at bit k % 8. So int4 is two nibbles per byte (low
nibble first) and int6 is four values in three bytes. Eight values of width w always fill exactly w
bytes, which lets one vectorized path serve every width: values are grouped in eights, each group is
assembled into one little-endian uint64, and its low w bytes are kept.

Decoders treat their input as untrusted: lengths, padding bits and value ranges are checked and any
violation raises ValueError (callers that read files wrap it in their own error type).
"""
from __future__ import annotations

import numpy as np

LAYOUTS = ("byte", "packed", "trit", "planes")
PLANES_BITS = (9, 16)  # the widths layout "planes" holds (inclusive)
_TRITS_PER_BYTE = 5
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _check_width(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 1..8, got {bits!r}")


def _check_count(count: int) -> None:
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")


def value_range(bits: int, signed: bool) -> tuple[int, int]:
    """Inclusive (lo, hi) of integers representable in `bits` bits (two's complement when signed)."""
    _check_width(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of width `bits` occupy when packed densely."""
    _check_width(bits)
    _check_count(count)
    return (count * bits + 7) // 8


def pack_bits(values, bits: int, signed: bool) -> bytes:
    """Pack integers of width `bits` (1..8) densely, little-endian bit order; raises ValueError if out of range."""
    _check_width(bits)
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"pack_bits needs integer values, got dtype {v.dtype}")
    lo, hi = value_range(bits, signed)
    vmin, vmax = int(v.min()), int(v.max())
    if vmin < lo or vmax > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values span [{vmin}, {vmax}], outside the {kind} {bits}-bit range [{lo}, {hi}]")
    # Two's complement in `bits` bits; the mask drops the sign-extension bits of negatives.
    u = (v.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint64)
    n = u.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = u
    padded = padded.reshape(groups, 8)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(padded << shifts, axis=1).astype("<u8")
    out = words.view(np.uint8).reshape(groups, 8)[:, :bits].reshape(-1)
    return out[: packed_size(n, bits)].tobytes()


def unpack_bits(data: bytes, bits: int, signed: bool, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` values as int16 (signed) or uint8 (unsigned); checks length and padding."""
    _check_width(bits)
    _check_count(count)
    want = packed_size(count, bits)
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if buf.size != want:
        raise ValueError(f"packed data holds {buf.size} bytes, {count} values of {bits} bits need {want}")
    if count == 0:
        return np.zeros(0, dtype=np.int16 if signed else np.uint8)
    tail_bits = (count * bits) % 8
    if tail_bits and int(buf[-1]) >> tail_bits:
        raise ValueError("packed data has non-zero padding bits after the last value")
    groups = -(-count // 8)
    cells = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[:want] = buf
    cells[:, :bits] = flat.reshape(groups, bits)
    words = cells.reshape(-1).view("<u8").astype(np.uint64)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    u = ((words[:, None] >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    if not signed:
        return u.astype(np.uint8)
    s = u.astype(np.int16)
    s[s >= (1 << (bits - 1))] -= 1 << bits
    return s


def trit_size(count: int) -> int:
    """Bytes that `count` trits occupy (five per byte)."""
    _check_count(count)
    return -(-count // _TRITS_PER_BYTE)


def pack_trits(values) -> bytes:
    """Pack values in {-1, 0, 1} five per byte, base 3, first value least significant (byte <= 242)."""
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"pack_trits needs integer values, got dtype {v.dtype}")
    if int(v.min()) < -1 or int(v.max()) > 1:
        raise ValueError(f"trits must be in {{-1, 0, 1}}, got values in [{int(v.min())}, {int(v.max())}]")
    n = v.size
    digits = np.zeros(trit_size(n) * _TRITS_PER_BYTE, dtype=np.uint8)
    digits[:n] = (v + 1).astype(np.uint8)
    # Padding digits are 0, so the decoder can insist on them.
    return (digits.reshape(-1, _TRITS_PER_BYTE) * _POW3).sum(axis=1, dtype=np.uint8).tobytes()


def unpack_trits(data: bytes, count: int) -> np.ndarray:
    """Inverse of pack_trits: `count` int8 values in {-1, 0, 1}; checks length, byte range and padding."""
    want = trit_size(count)
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if buf.size != want:
        raise ValueError(f"trit data holds {buf.size} bytes, {count} trits need {want}")
    if count == 0:
        return np.zeros(0, dtype=np.int8)
    if int(buf.max()) > 242:
        raise ValueError(f"trit byte {int(buf.max())} is above 242 (3**5 - 1)")
    tail = count % _TRITS_PER_BYTE
    if tail and int(buf[-1]) >= 3**tail:
        raise ValueError("trit data has non-zero padding trits after the last value")
    digits = (buf[:, None] // _POW3) % 3
    return (digits.reshape(-1)[:count].astype(np.int8) - 1)


def zigzag(q) -> np.ndarray:
    """Signed codes -> zigzag symbols (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) as uint16, layout "planes"'s symbols."""
    w = np.asarray(q).astype(np.int32)
    return np.where(w >= 0, 2 * w, -2 * w - 1).astype(np.uint16)


def unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of zigzag: int16 codes."""
    z = z.astype(np.int32)
    return np.where(z & 1, -((z + 1) >> 1), z >> 1).astype(np.int16)


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _check_layout(layout: str, bits: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown code layout {layout!r}; known: {', '.join(LAYOUTS)}")
    lo, hi = PLANES_BITS
    wide = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and lo <= bits <= hi
    if layout == "planes":
        if not wide:
            raise ValueError(f"layout 'planes' holds {lo}..{hi}-bit codes, got {bits!r} bits")
        return
    if wide:
        raise ValueError(f"layout {layout!r} holds codes of at most 8 bits, got {bits}; wider codes use 'planes'")
    _check_width(bits)
    if layout == "trit" and bits != 2:
        raise ValueError(f"layout 'trit' holds 2-bit codes (values -1..1) only, got {bits} bits")


def layout_size(count: int, bits: int, layout: str) -> int:
    """Encoded size in bytes of `count` codes at `bits` in `layout`."""
    _check_layout(layout, bits)
    _check_count(count)
    if layout == "byte":
        return count
    if layout == "planes":
        return 2 * count
    if layout == "trit":
        return trit_size(count)
    return packed_size(count, bits)


def encode_codes(q, bits: int, layout: str) -> bytes:
    """Symmetric codes q in [-qmax, qmax] -> bytes: "byte" one symbol q+qmax per byte, "packed" dense, "trit" base 3,
    "planes" (9..16 bits) the zigzag symbols' high bytes, then their low bytes."""
    _check_layout(layout, bits)
    v = np.asarray(q).reshape(-1)
    if v.size and not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {v.dtype}")
    m = _qmax(bits)
    if v.size and (int(v.min()) < -m or int(v.max()) > m):
        raise ValueError(f"codes span [{int(v.min())}, {int(v.max())}], outside [-{m}, {m}] for {bits} bits")
    if layout == "trit":
        return pack_trits(v)
    if layout == "planes":
        z = zigzag(v)
        return (z >> 8).astype(np.uint8).tobytes() + (z & 0xFF).astype(np.uint8).tobytes()
    symbols = (v.astype(np.int16) + m).astype(np.uint8)
    if layout == "byte":
        return symbols.tobytes()
    return pack_bits(symbols, bits, signed=False)


def decode_codes(data: bytes, bits: int, layout: str, count: int) -> np.ndarray:
    """Inverse of encode_codes: `count` codes (int8; int16 from "planes"); raises ValueError on a wrong length or a
    symbol > 2*qmax."""
    want = layout_size(count, bits, layout)
    if len(data) != want:
        raise ValueError(f"{layout} codes hold {len(data)} bytes, {count} codes at {bits} bits need {want}")
    if layout == "trit":
        return unpack_trits(data, count)
    m = _qmax(bits)
    if layout == "planes":
        planes = np.frombuffer(bytes(data), dtype=np.uint8).reshape(2, count).astype(np.int32)
        z = (planes[0] << 8) | planes[1]
        if z.size and int(z.max()) > 2 * m:
            raise ValueError(f"zigzag code symbol {int(z.max())} is above {2 * m}, the largest at {bits} bits")
        return unzigzag(z)
    if layout == "byte":
        symbols = np.frombuffer(bytes(data), dtype=np.uint8)
    else:
        symbols = unpack_bits(data, bits, signed=False, count=count)
    if symbols.size and int(symbols.max()) > 2 * m:
        raise ValueError(f"code symbol {int(symbols.max())} is above {2 * m}, the largest at {bits} bits")
    return (symbols.astype(np.int16) - m).astype(np.int8)
