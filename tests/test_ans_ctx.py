"""The `ans_ctx` codec: rows coded against a reference row; round trips, size against an independent
conditional entropy, refusal of corrupt frames, and the exported loader's parity with qpack.load."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from qpack.artifact import TensorEntry, read_artifact, write_artifact
from qpack.codecs import CodecError, make_codec
from qpack.codecs.ans_codec import _varint
from qpack.errors import QpackError, QpackInputError
from qpack.loader import parse_codecs
from qpack.quant.base import Quantized

from codecframes import assert_damage_never_misdecodes, assert_shipped_loader_matches


def laplace(rng, shape, scale: float, qmax: int) -> np.ndarray:
    return (np.clip(np.round(rng.laplace(0.0, scale, shape)), -qmax, qmax) + qmax).astype(np.uint8)


def clustered(seed: int = 0, parents: int = 48, children: int = 3, width: int = 128, flip: float = 0.08):
    """Rows with real cross-row dependence: `parents` order-0 Laplace rows, each with `children` copies in
    which a few symbols moved by +-1, all shuffled. Returns (rows, the row index of each row's parent or -1)."""
    rng = np.random.default_rng(seed)
    base = laplace(rng, (parents, width), 6.0, 31).astype(np.int16)
    rows, parent = [], []
    for p in range(parents):
        at = len(rows)
        rows.append(base[p])
        parent.append(-1)
        for _ in range(children):
            step = rng.choice([-1, 1], width) * (rng.random(width) < flip)
            rows.append(np.clip(base[p] + step, 0, 62))
            parent.append(at)
    order = rng.permutation(len(rows))  # copies are scattered, not next to their parent
    new_index = np.argsort(order)
    parent = np.array(parent)[order]
    return np.stack(rows)[order].astype(np.uint8), np.where(parent < 0, -1, new_index[np.maximum(parent, 0)])


def entropy_bits(values: np.ndarray) -> float:
    """Empirical order-0 entropy of `values` in bits, times their count."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def frame_width(frame: bytes) -> int:
    """The row width a frame codes with (varint after version and CRC)."""
    w, shift, i = 0, 0, 5
    while True:
        w |= (frame[i] & 127) << shift
        if frame[i] < 128:
            return w
        i, shift = i + 1, shift + 7


@pytest.mark.parametrize("data", [
    b"", b"\x05", b"\x00" * 4096, bytes(range(256)), bytes(range(256)) * 64,
    np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8).tobytes(),
    np.random.default_rng(2).integers(0, 256, 1001, dtype=np.uint8).tobytes(),  # no width divides 1001
], ids=["empty", "one", "constant", "all256", "all256_rows", "random", "odd"])
@pytest.mark.parametrize("params", [{}, {"width": 256}, {"width": 64, "candidates": 1, "lane_bytes": 64}])
def test_round_trip(data, params):
    codec = make_codec("ans_ctx", params)
    frame = codec.encode(data)
    assert codec.encode(data) == frame
    assert make_codec("ans_ctx").decode(frame, len(data)) == data


def test_repeated_rows_of_all_256_symbols_use_rows():
    data = bytes(range(256)) * 64  # 64 equal rows of every byte value: each copy costs nothing
    frame = make_codec("ans_ctx").encode(data)
    assert frame_width(frame) in (32, 64, 128, 256)  # any width dividing the period finds the copies
    assert len(frame) < len(make_codec("ans").encode(data)) / 10
    assert make_codec("ans_ctx").decode(frame, len(data)) == data


def test_context_source_codes_near_its_conditional_entropy():
    rows, parent = clustered()
    data = rows.tobytes()
    frame = make_codec("ans_ctx").encode(data)
    assert frame_width(frame) == 128
    assert make_codec("ans_ctx").decode(frame, len(data)) == data
    # Independent estimate: parents at their order-0 entropy, each copy at the entropy of its difference from
    # its parent (the generator's own context), plus about three bytes per copy to name its reference.
    copies = np.flatnonzero(parent >= 0)
    plain = rows[parent < 0].reshape(-1)
    diffs = (rows[copies].astype(np.int16) - rows[parent[copies]]).reshape(-1)
    bound = (entropy_bits(plain) + entropy_bits(diffs)) / 8 + 3 * int((parent >= 0).sum())
    ans = len(make_codec("ans").encode(data))
    assert len(frame) < 0.5 * ans
    assert 0.9 * bound < len(frame) < 1.06 * bound


def test_unrelated_rows_cost_no_more_than_ans_plus_six_bytes():
    data = laplace(np.random.default_rng(4), 64 * 128, 6.0, 31).tobytes()
    frame = make_codec("ans_ctx").encode(data)
    assert frame_width(frame) == 0
    assert len(frame) == len(make_codec("ans").encode(data)) + 6


def test_bad_parameters():
    for params in ({"width": -1}, {"candidates": 0}, {"candidates": 65}, {"lane_bytes": 0}, {"width": "8"}):
        with pytest.raises(QpackInputError):
            make_codec("ans_ctx", params)


def _frame(size: int, width: int, rows: list[int], refs: list[int], plain: bytes, resid: bytes) -> bytes:
    """A hand-made frame (CRC of nothing in particular: the checks under test come first)."""
    gaps = np.diff(np.array(rows), prepend=-1) - 1
    zz = [2 * (r - f) if r >= f else 2 * (f - r) - 1 for r, f in zip(rows, refs)]
    return (b"\x01" + struct.pack("<I", 0) + _varint(width) + _varint(len(rows))
            + b"".join(_varint(int(g)) for g in gaps) + b"".join(_varint(z) for z in zz)
            + _varint(len(plain)) + plain + resid)


def test_hostile_frames_are_refused():
    codec = make_codec("ans_ctx")
    ans = make_codec("ans")
    row = bytes(range(16))
    plain = ans.encode(row * 2)
    resid = ans.encode(bytes([128]) * 32)
    cases = {  # frame -> what the refusal must say (each check is the first to see its defect)
        "version": (b"\x02" + bytes(8), "unknown frame version"),
        "short": (b"\x01\x00", "truncated"),
        "width does not divide": (_frame(64, 24, [], [], plain, b""), "does not divide"),
        "more rows than the stream": (_frame(64, 16, [0, 1, 2, 3, 4], [1, 2, 3, 4, 0], plain, resid), "more context rows"),
        "row past the end": (_frame(64, 16, [5], [0], plain, resid), "past the last row"),
        "self reference": (_frame(64, 16, [2], [2], plain, resid), "reference row out of range"),
        "reference past the end": (_frame(64, 16, [2], [9], plain, resid), "reference row out of range"),
        "cycle": (_frame(64, 16, [2, 3], [3, 2], plain, resid), "cycle"),
        "sub-frame length past the end": (_frame(64, 16, [2, 3], [0, 1], plain, resid)[:-len(resid) - 5], "truncated"),
        "huge varint": (b"\x01" + bytes(4) + b"\xff" * 10 + b"\x01", "varint longer"),
    }
    for label, (frame, says) in cases.items():
        with pytest.raises(CodecError, match=f"ans_ctx.*{says}"):
            codec.decode(frame, 64)
    # The same frame with its CRC right decodes: the refusals above come from the checks, not the CRC.
    good = _frame(64, 16, [2, 3], [0, 1], plain, resid)
    want = row * 4
    good = good[:1] + struct.pack("<I", zlib.crc32(want)) + good[5:]
    assert codec.decode(good, 64) == want
    with pytest.raises(CodecError, match="CRC"):
        codec.decode(good[:1] + struct.pack("<I", 1) + good[5:], 64)


def test_corrupted_frames_never_decode_to_other_bytes():
    rows, _ = clustered(seed=5, parents=6)
    data = rows.tobytes()
    frame = make_codec("ans_ctx").encode(data)
    assert frame_width(frame) == 128
    codec = make_codec("ans_ctx")
    assert_damage_never_misdecodes(codec, frame, data, head=12)


def _artifact(path, rows: np.ndarray, codec: str = "ans_ctx"):
    """An artifact with one int6 tensor holding `rows` as its codes, stored with `codec`, and a small one."""
    q = torch.from_numpy(rows.astype(np.int16) - 31).to(torch.int8)
    scales = torch.full((q.shape[0], 1), 0.01, dtype=torch.float16)
    qz = Quantized(q, scales, tuple(q.shape), 6, "rtn")
    write_artifact(path, [TensorEntry("emb.weight", qz, codec=make_codec(codec)),
                          TensorEntry("norm.weight", torch.ones(8), codec=make_codec(codec))])


def test_exported_loader_matches_qpack_load(tmp_path):
    rows, _ = clustered(seed=7)
    path = tmp_path / "m.qpk"
    _artifact(path, rows)
    art = read_artifact(path)
    assert frame_width(art.container.encoded("emb.weight:codes")) == 128
    assert parse_codecs("ans_ctx") == ["raw", "ans", "ans_ctx"]  # its part calls the ans part
    assert_shipped_loader_matches(tmp_path, ["ans_ctx"], path)
    # A wrong CRC inside the frame is refused by the loader too (the section CRC is fixed up to let it in).
    from qpack.loader.parts.ans_ctx_part import _ans_ctx
    from qpack.loader.parts.base import QpkLoadError

    frame = art.container.encoded("emb.weight:codes")
    bad = frame[:1] + struct.pack("<I", zlib.crc32(frame) & 0xFFFF) + frame[5:]
    with pytest.raises(QpkLoadError, match="CRC"):
        _ans_ctx([(bad, rows.size, {})])
    assert _ans_ctx([(frame, rows.size, {})]) == [rows.tobytes()]


def test_codec_errors_are_qpack_errors():
    assert issubclass(CodecError, QpackError)


def test_plain_frame_kept_when_rows_do_not_pay_after_all():
    from qpack.codecs.ans_ctx_codec import plan_rows

    data = bytes(range(16)) * 2  # the plan codes row 1 against row 0, but two tables cost more than one
    assert plan_rows(np.frombuffer(data, np.uint8), 16, 8)[0].tolist() == [1]
    frame = make_codec("ans_ctx", {"width": 16}).encode(data)
    assert frame_width(frame) == 0 and len(frame) == len(make_codec("ans").encode(data)) + 6


def test_deep_reference_chain_decodes_in_both_decoders():
    # Row i refers to row i - 1 for 1,999 rows: the rebuild goes level by level, 1,999 levels deep.
    from qpack.loader.parts.ans_ctx_part import _ans_ctx

    rng = np.random.default_rng(9)
    n, w = 2000, 16
    first = rng.integers(0, 256, w, dtype=np.uint8)
    steps = rng.integers(127, 130, (n - 1, w), dtype=np.uint8)  # residual bytes: differences -1, 0, +1
    want = np.cumsum(np.vstack([first.astype(np.int64), steps.astype(np.int64) - 128]), axis=0) % 256
    want = want.astype(np.uint8).tobytes()
    ans = make_codec("ans")
    frame = _frame(n * w, w, list(range(1, n)), list(range(n - 1)), ans.encode(first.tobytes()),
                   ans.encode(steps.tobytes()))
    frame = frame[:1] + struct.pack("<I", zlib.crc32(want)) + frame[5:]
    assert make_codec("ans_ctx").decode(frame, n * w) == want
    assert _ans_ctx([(frame, n * w, {})]) == [want]
