"""Every registered codec: exact round trips, strict decoding, bomb guards, parameter validation."""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from qpack.codecs import CodecError, codec_names, make_codec
from qpack.errors import QpackInputError

ALL = codec_names()
# Codecs whose frames carry a checksum: a garbled frame must never decode to different bytes.
CHECKED = {"zlib", "lzma", "ans"}


def laplace_symbols(n: int, scale: float, qmax: int, seed: int) -> bytes:
    x = np.random.default_rng(seed).laplace(0.0, scale, n)
    return (np.clip(np.round(x), -qmax, qmax) + qmax).astype(np.uint8).tobytes()


def payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    return {
        "empty": b"",
        "one": b"\x2a",
        "odd": rng.integers(0, 256, 1001, dtype=np.uint8).tobytes(),
        "random": rng.integers(0, 256, 20011, dtype=np.uint8).tobytes(),
        "int6_symbols": laplace_symbols(30001, 5.0, 31, 1),
        "low_entropy": laplace_symbols(20000, 0.3, 7, 2),
        "constant": b"\x07" * 777,
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", list(payloads()))
def test_round_trip(name, kind):
    data = payloads()[kind]
    codec = make_codec(name)
    frame = codec.encode(data)
    assert isinstance(frame, bytes)
    assert codec.encode(data) == frame  # deterministic
    assert make_codec(name, codec.params).decode(frame, len(data)) == data


@pytest.mark.parametrize("name", ALL)
def test_wrong_size_raises(name):
    codec = make_codec(name)
    for data in (b"", b"abc", payloads()["int6_symbols"]):
        frame = codec.encode(data)
        with pytest.raises(CodecError):
            codec.decode(frame, len(data) + 1)
        if data:
            with pytest.raises(CodecError):
                codec.decode(frame, len(data) - 1)
            with pytest.raises(CodecError):
                codec.decode(frame, 0)


@pytest.mark.parametrize("name", ALL)
def test_truncation_raises(name):
    codec = make_codec(name)
    data = laplace_symbols(300, 3.0, 31, 3)
    frame = codec.encode(data)
    for cut in range(len(frame)):
        with pytest.raises(CodecError):
            codec.decode(frame[:cut], len(data))
    with pytest.raises(CodecError):
        codec.decode(frame + b"\x00", len(data))


@pytest.mark.parametrize("name", ALL)
def test_garbled_frames_fail_cleanly(name):
    codec = make_codec(name)
    data = laplace_symbols(300, 3.0, 31, 4)
    frame = codec.encode(data)
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0xA5
        try:
            out = codec.decode(bytes(bad), len(data))
        except CodecError:
            continue
        assert len(out) == len(data)
        if name in CHECKED:
            assert out == data, f"byte {i} garbled, {name} returned wrong bytes"


@pytest.mark.parametrize("name", ALL)
def test_random_garbage_fails_cleanly(name):
    codec = make_codec(name)
    rng = np.random.default_rng(11)
    for _ in range(100):
        junk = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        size = int(rng.integers(0, 100))
        try:
            out = codec.decode(junk, size)
        except CodecError:
            continue
        assert len(out) == size


@pytest.mark.parametrize("name", ALL)
def test_bomb_is_refused_without_allocating(name):
    # Fast settings with small working memory (lzma's decoder allocates its whole dictionary up front).
    fast = {"zstd": {"level": 1}, "brotli": {"quality": 1}, "lzma": {"preset": 0}, "zlib": {"level": 1}}
    codec = make_codec(name, fast.get(name))
    big = bytes(20_000_000)
    frame = codec.encode(big)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            codec.decode(frame, 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{name} allocated {peak} bytes decoding to a 1000-byte promise"


@pytest.mark.parametrize(
    "name,params",
    [
        ("zstd", {"level": 20}),
        ("zstd", {"level": 22}),
        ("zstd", {"level": 19, "window_log": 27, "long": True}),
        ("zstd", {"level": 3, "long": True}),
        ("lzma", {"preset": 9, "extreme": True}),
        ("lzma", {"preset": 0}),
        ("lzma", {"format": "raw"}),
        ("lzma", {"filters": [{"id": "delta", "dist": 1}, {"id": "lzma2", "preset": 9, "extreme": True}]}),
        ("lzma", {"format": "raw", "filters": [{"id": "lzma2", "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0,
                                                "mf": "bt4", "mode": "normal", "nice_len": 273}]}),
        ("brotli", {"quality": 0}),
        ("brotli", {"quality": 11, "lgwin": 24}),
        ("brotli", {"quality": 5, "lgwin": 10}),
        ("zlib", {"level": 0}),
        ("zlib", {"level": 9, "wbits": 9}),
        ("ans", {"group": 1}),
        ("ans", {"group": 4096}),
        ("ans", {"group": 1000}),
    ],
)
def test_parameters_round_trip(name, params):
    codec = make_codec(name, params)
    for data in (b"", b"\x01", laplace_symbols(10007, 2.0, 15, 5)):
        frame = codec.encode(data)
        assert make_codec(name, codec.params).decode(frame, len(data)) == data


@pytest.mark.parametrize(
    "name,params,param",
    [
        ("zlib", {"level": 10}, "level"),
        ("zlib", {"wbits": 16}, "wbits"),
        ("zstd", {"level": 23}, "level"),
        ("zstd", {"level": 0}, "level"),
        ("zstd", {"window_log": 5}, "window_log"),
        ("zstd", {"long": "yes"}, "long"),
        ("lzma", {"preset": 10}, "preset"),
        ("lzma", {"extreme": 1}, "extreme"),
        ("lzma", {"format": "zip"}, "format"),
        ("lzma", {"filters": [{"id": "bcj"}]}, "filters"),
        ("lzma", {"filters": [{"id": "lzma2"}, {"id": "delta"}]}, "filters"),
        ("lzma", {"filters": [{"id": "delta", "dist": 0}, {"id": "lzma2"}]}, "filters.delta.dist"),
        ("lzma", {"filters": [{"id": "lzma2", "lc": 4, "lp": 1}]}, "filters"),
        ("lzma", {"filters": "delta"}, "filters"),
        ("brotli", {"quality": 12}, "quality"),
        ("brotli", {"lgwin": 25}, "lgwin"),
        ("ans", {"group": -1}, "group"),
        ("ans", {"group": 1.5}, "group"),
        ("ans", {"speed": 3}, "speed"),
    ],
)
def test_parameter_errors_name_the_parameter(name, params, param):
    with pytest.raises(QpackInputError, match=param.replace(".", r"\.")):
        make_codec(name, params)


def entropy_bits(data: bytes) -> float:
    """Order-0 empirical entropy in bits of the whole byte string, by the formula."""
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum() * len(data))


@pytest.mark.parametrize("scale,qmax", [(0.3, 7), (2.0, 15), (6.0, 31)])
def test_ans_is_close_to_entropy(scale, qmax):
    data = laplace_symbols(200_000, scale, qmax, 9)
    frame = make_codec("ans").encode(data)
    bound = entropy_bits(data) / 8
    # Entropy plus a table (under 4 bytes per symbol value), the 6-byte header and two words of ANS state.
    assert bound <= len(frame) <= bound * 1.001 + 4 * (2 * qmax + 1) + 6 + 8


def test_ans_group_tables_adapt():
    # Two halves with different alphabets: per-half tables beat one table over the union.
    a = laplace_symbols(50_000, 0.5, 7, 1)
    b = bytes(x + 100 for x in laplace_symbols(50_000, 0.5, 7, 2))
    one = len(make_codec("ans").encode(a + b))
    two = len(make_codec("ans", {"group": 50_000}).encode(a + b))
    assert two < one - 50_000 * 0.9 / 8 * 2 * 0.9  # about a bit per symbol saved (which half it is)
    assert math.isclose(two, (entropy_bits(a) + entropy_bits(b)) / 8, rel_tol=0.01)


def test_ans_refuses_table_that_disagrees_with_size():
    frame = make_codec("ans").encode(b"\x01\x02\x01\x02\x03")
    with pytest.raises(CodecError, match="counts 5 symbols"):
        make_codec("ans").decode(frame, 6)


@pytest.mark.parametrize("name, params, label", [
    ("zstd", {}, "zstd-19"), ("zstd", {"level": 22, "long": True}, "zstd-22+long"),
    ("zstd", {"level": 3, "window_log": 27}, "zstd-3/w27"), ("ans", {}, "ans"), ("ans", {"group": 5}, "ans(group=5)"),
    ("lzma", {"preset": 9, "extreme": True}, "lzma-9e"), ("lzma", {"format": "raw"}, "lzma-6-raw"),
    ("brotli", {}, "brotli-11"), ("brotli", {"quality": 5, "lgwin": 24}, "brotli-5/w24"), ("zlib", {}, "zlib-9"),
    ("raw", {}, "raw"),
])
def test_table_labels_are_short_and_tell_codecs_apart(name, params, label):
    # the per-tensor table shows these; the manifest keeps the full spec
    assert make_codec(name, params).label() == label


# ---- ans frame version 2 (interleaved lanes) and the numpy decoder of the exported loader

def _numpy_decode(frame: bytes, size: int) -> bytes:
    from qpack.loader.parts.ans_part import _ans

    return _ans([(frame, size, {})])[0]


def test_ans_writes_lane_frames_by_default_and_still_reads_version_1():
    data = laplace_symbols(300_000, 6.0, 31, 4)
    v2, v1 = make_codec("ans").encode(data), make_codec("ans", {"lane_bytes": 0}).encode(data)
    assert v2[0] == 2 and v1[0] == 1
    assert make_codec("ans").decode(v1, len(data)) == data == make_codec("ans").decode(v2, len(data))
    # about 8 KB of output per lane: a 180 KB stream has many lanes, each one stack of its own
    from qpack.loader.parts.ans_part import ans_parse

    _, groups, _ = ans_parse(v2, len(data))
    assert len(groups[0][4]) == -(-len(data) // groups[0][4][0][0]) > 10


def test_ans_lanes_cost_under_a_tenth_of_a_percent_on_int6_symbols():
    data = laplace_symbols(400_000, 6.0, 31, 5)
    v2, v1 = make_codec("ans").encode(data), make_codec("ans", {"lane_bytes": 0}).encode(data)
    assert len(v1) < len(v2) <= len(v1) * 1.001


@pytest.mark.parametrize("params", [{}, {"lane_bytes": 0}, {"group": 3000}, {"group": 3000, "lane_bytes": 0},
                                    {"lane_bytes": 1}])
@pytest.mark.parametrize("kind", list(payloads()))
def test_numpy_decoder_is_bit_exact_with_constriction(params, kind):
    data = payloads()[kind]
    frame = make_codec("ans", params).encode(data)
    assert _numpy_decode(frame, len(data)) == data


def test_numpy_decoder_batches_sections_of_both_versions():
    from qpack.loader.parts.ans_part import _ans

    rng = np.random.default_rng(3)
    datas = [laplace_symbols(int(rng.integers(0, 40_000)), float(rng.uniform(0.3, 8)), 31, i) for i in range(12)]
    frames = [make_codec("ans", {"lane_bytes": [0, 2048][i % 2]}).encode(d) for i, d in enumerate(datas)]
    assert _ans([(f, len(d), {}) for f, d in zip(frames, datas)]) == datas


def test_ans_v2_garbage_is_refused_by_both_decoders():
    from qpack.loader.parts.ans_part import QpkLoadError

    data = laplace_symbols(50_000, 3.0, 15, 6)
    frame = make_codec("ans", {"lane_bytes": 2048}).encode(data)
    rng = np.random.default_rng(8)
    cases = [frame[:-4], frame[:-1], frame + b"\0\0\0\0", frame[:9]]
    for _ in range(40):
        pos = int(rng.integers(1, len(frame)))
        cases.append(frame[:pos] + bytes([frame[pos] ^ int(rng.integers(1, 256))]) + frame[pos + 1 :])
    for bad in cases:
        with pytest.raises(CodecError):
            make_codec("ans").decode(bad, len(data))
        with pytest.raises(QpkLoadError):
            _numpy_decode(bad, len(data))
