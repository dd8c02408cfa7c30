"""Bit packing: exact round trips, bit-for-bit agreement with a slow reference, and strict decoders."""
from __future__ import annotations

import numpy as np
import pytest

from qpack.pack import (
    decode_codes,
    encode_codes,
    layout_size,
    pack_bits,
    pack_trits,
    packed_size,
    unpack_bits,
    unpack_trits,
    value_range,
)

WIDTHS = range(1, 9)
LENGTHS = [0, 1, 7, 8, 9, 1001]


def reference_pack(values: list[int], bits: int) -> bytes:
    """Obviously correct packer: append each value's bits, LSB first, to a bit list; 8 bits make a byte."""
    stream: list[int] = []
    for v in values:
        u = v % (1 << bits)  # two's complement for negatives
        stream.extend((u >> k) & 1 for k in range(bits))
    while len(stream) % 8:
        stream.append(0)
    return bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))


def reference_trits(values: list[int]) -> bytes:
    out = []
    for i in range(0, len(values), 5):
        chunk = values[i : i + 5]
        out.append(sum((t + 1) * 3**k for k, t in enumerate(chunk)))
    return bytes(out)


def random_values(rng: np.random.Generator, bits: int, signed: bool, n: int) -> np.ndarray:
    lo, hi = value_range(bits, signed)
    return rng.integers(lo, hi + 1, size=n)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_reference(bits, signed, n):
    rng = np.random.default_rng(bits * 1000 + n + signed)
    v = random_values(rng, bits, signed, n)
    data = pack_bits(v, bits, signed)
    assert len(data) == packed_size(n, bits) == (n * bits + 7) // 8
    assert data == reference_pack([int(x) for x in v], bits)
    back = unpack_bits(data, bits, signed, n)
    assert back.shape == (n,)
    np.testing.assert_array_equal(back.astype(np.int64), v)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [False, True])
def test_extremes_round_trip(bits, signed):
    lo, hi = value_range(bits, signed)
    v = np.array([lo, hi, lo, hi, 0, hi, lo] * 3)
    assert (unpack_bits(pack_bits(v, bits, signed), bits, signed, v.size).astype(np.int64) == v).all()


def test_known_layouts():
    # int4: two nibbles per byte, low nibble first.
    assert pack_bits([1, 2, 0xF], 4, False) == bytes([0x21, 0x0F])
    # int6: four values in three bytes; 1 | 2<<6 | 3<<12 | 4<<18 = 0x103081.
    assert pack_bits([1, 2, 3, 4], 6, False) == bytes([0x81, 0x30, 0x10])
    assert pack_bits([-1], 4, True) == bytes([0x0F])
    assert pack_bits([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, False) == bytes([0b1101, 1])


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_rejects_out_of_range(bits):
    lo, hi = value_range(bits, True)
    with pytest.raises(ValueError, match="range"):
        pack_bits([hi + 1], bits, True)
    with pytest.raises(ValueError, match="range"):
        pack_bits([lo - 1], bits, True)
    with pytest.raises(ValueError, match="range"):
        pack_bits([-1], bits, False)


@pytest.mark.parametrize("bits", [0, 9, 2.0, True])
def test_bad_width(bits):
    with pytest.raises(ValueError, match="bit width"):
        pack_bits([0], bits, False)


def test_unpack_checks_length_and_padding():
    data = pack_bits([5, 6, 7], 3, False)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(ValueError, match="need 2"):
        unpack_bits(data + b"\x00", 3, False, 3)
    with pytest.raises(ValueError, match="need 2"):
        unpack_bits(data[:1], 3, False, 3)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(data[:1] + bytes([data[1] | 0x80]), 3, False, 3)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(b"", 3, False, -1)


@pytest.mark.parametrize("n", LENGTHS)
def test_trits(n):
    rng = np.random.default_rng(n)
    v = rng.integers(-1, 2, size=n)
    data = pack_trits(v)
    assert len(data) == -(-n // 5)
    assert data == reference_trits([int(x) for x in v])
    np.testing.assert_array_equal(unpack_trits(data, n), v)


def test_trits_reject_bad_input():
    with pytest.raises(ValueError, match="trits"):
        pack_trits([2])
    with pytest.raises(ValueError, match="242"):
        unpack_trits(bytes([243]), 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_trits(bytes([3]), 1)  # second trit set in a one-trit byte
    with pytest.raises(ValueError, match="need 1"):
        unpack_trits(b"", 1)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("layout", ["byte", "packed"])
@pytest.mark.parametrize("n", LENGTHS)
def test_code_layouts_round_trip(bits, layout, n):
    m = (1 << (bits - 1)) - 1
    q = np.random.default_rng(n + bits).integers(-m, m + 1, size=n).astype(np.int8)
    data = encode_codes(q, bits, layout)
    assert len(data) == layout_size(n, bits, layout)
    if layout == "byte":
        assert data == (q.astype(np.int16) + m).astype(np.uint8).tobytes()
    else:
        assert data == reference_pack([int(x) + m for x in q], bits)
    back = decode_codes(data, bits, layout, n)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, q)


def test_trit_layout():
    q = np.array([-1, 0, 1, 1, 1, -1, 0], dtype=np.int8)
    data = encode_codes(q, 2, "trit")
    assert len(data) == layout_size(7, 2, "trit") == 2
    np.testing.assert_array_equal(decode_codes(data, 2, "trit", 7), q)
    with pytest.raises(ValueError, match="2-bit"):
        encode_codes(q, 3, "trit")


def test_planes_layout_by_hand():
    # zigzag 0, 1, 2, 511, 510: high bytes 0 0 0 1 1, then low bytes 0 1 2 255 254
    q = np.array([0, -1, 1, -256, 255], dtype=np.int16)
    data = encode_codes(q, 10, "planes")
    assert data == bytes([0, 0, 0, 1, 1, 0, 1, 2, 255, 254]) and layout_size(5, 10, "planes") == 10
    got = decode_codes(data, 10, "planes", 5)
    assert got.dtype == np.int16 and np.array_equal(got, q)
    with pytest.raises(ValueError, match="above 1022"):  # zigzag 1023 is -512, outside 10 bits' [-511, 511]
        decode_codes(bytes([3, 255]), 10, "planes", 1)
    with pytest.raises(ValueError, match="planes"):
        encode_codes(np.zeros(2, dtype=np.int8), 8, "planes")
    with pytest.raises(ValueError, match="at most 8 bits"):
        encode_codes(np.zeros(2, dtype=np.int16), 9, "byte")


def test_decode_codes_validates():
    with pytest.raises(ValueError, match="above 62"):
        decode_codes(bytes([63]), 6, "byte", 1)
    with pytest.raises(ValueError, match="above 14"):
        decode_codes(pack_bits([15], 4, False), 4, "packed", 1)
    with pytest.raises(ValueError, match="need 3"):
        decode_codes(b"\x00\x00", 6, "packed", 4)
    with pytest.raises(ValueError, match="outside"):
        encode_codes(np.array([32], dtype=np.int8), 6, "byte")
    with pytest.raises(ValueError, match="layout"):
        layout_size(4, 6, "nibble")
